"""The evaluation's printed table: one row per figure of an `evaluation.evaluate_model` result,
with its value (a rate with its 95% Wilson interval) and, where the issues set one, its goal.

The goals are data (`GOALS`): each names the result's key path it applies to, the comparison and
the threshold; the table looks a row's goal up by the row's key path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import world
from .evaluation import LOCALISATION_ROLES
from .metrics import wilson_interval

ANY = "*"  # in a goal's key path: any key at that place (e.g. every cross-attention map side)


@dataclass(frozen=True)
class Goal:
    """A goal for one figure of an `evaluation.evaluate_model` result.

    Args:
        figure: what the figure is, in words.
        path: the figure's key path in the result; `ANY` matches any key at its place.
        comparison: ``">="``, ``"<="``, ``">"`` or ``"<"``: how the figure should compare with ``threshold``.
        threshold: the value the figure should reach.
        percent: the figure is a rate, its threshold written as a percentage.
    """

    figure: str
    path: tuple[str, ...]
    comparison: str
    threshold: float
    percent: bool = False

    def applies_to(self, path: tuple[str, ...]) -> bool:
        """Whether this goal is the goal of the figure at ``path``."""
        return len(path) == len(self.path) and all(g in (ANY, p) for g, p in zip(self.path, path))

    def text(self) -> str:
        """The goal as the table writes it, e.g. ``>= 90%`` or ``<= 3``."""
        return f"{self.comparison} {self.threshold:.0%}" if self.percent else f"{self.comparison} {self.threshold:g}"


#: The goals of the issues (issue 3 for the edits), for the model's generations and edits. The
#: baselines without injection and the diagnostics have none.
GOALS: tuple[Goal, ...] = (
    Goal("adherence, held-out pairs: colour", ("adherence", "colour"), ">=", 0.9, percent=True),
    Goal("adherence, held-out pairs: shape", ("adherence", "shape"), ">=", 0.8, percent=True),
    Goal("shape word swap: target shape", ("word_swap", "shape_p2p", "target_rate"), ">=", 0.8, percent=True),
    Goal("shape word swap: median centroid shift px", ("word_swap", "shape_p2p", "median_centroid_shift_px"), "<=", 3),
    Goal("colour word swap: target colour", ("word_swap", "colour_p2p", "target_rate"), ">=", 0.9, percent=True),
    Goal("colour word swap: median mask IoU", ("word_swap", "colour_p2p", "median_mask_iou"), ">=", 0.8),
    Goal("LocalBlend: median background PSNR dB", ("local_blend", "median_background_psnr_db"), ">=", 30),
    Goal("two objects, held-out pairs: both present", ("two_objects_held_out", "model", "both_present"), ">=", 0.7, percent=True),
    Goal("refine pattern: object kept, median IoU", ("refine", "pattern", "p2p", "object_kept_median_iou"), ">=", 0.7),
    Goal("refine pattern: pattern shown", ("refine", "pattern", "p2p", "pattern_rate"), ">=", 0.7, percent=True),
    Goal("reweight pattern word: median Spearman rho", ("reweight", "pattern", "median_rho"), ">=", 0.8),
    Goal("reweight colour word: median Spearman rho", ("reweight", "colour", "median_rho"), ">=", 0.8),
    *(Goal(f"cross-attention, {role} word: inside / outside the object", ("localisation", "sides", ANY, f"{role}_inside_outside"),
           ">" if role in ("shape", "colour") else "<", 1) for role in LOCALISATION_ROLES),
    Goal("cross-attention: binding contrast", ("localisation", "sides", ANY, "binding_contrast"), ">", 1),
)

#: Figures that bound others rather than having a goal: what the detector reads after the
#: autoencoder's round trip caps the adherence and word-swap figures.
CEILINGS: tuple[tuple[str, ...], ...] = (("reconstruction", "detector_big_plain", "colour"),
                                         ("reconstruction", "detector_big_plain", "shape"))


def goal_text(path: tuple[str, ...]) -> str:
    """The goal column of the figure at ``path``: its `Goal`'s text, "ceiling" or empty."""
    goal = next((g for g in GOALS if g.applies_to(path)), None)
    if goal is not None:
        return goal.text()
    return "ceiling" if path in CEILINGS else ""


def _fmt(v, pct: bool, n: int | None = None) -> str:
    """A figure as the table writes it: "-" when missing, a rate over ``n`` with its Wilson interval."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if pct and n:
        lo, hi = wilson_interval(v * n, n)
        return f"{v:.1%} [{lo:.0%}-{hi:.0%}]"
    return f"{v:.1%}" if pct else f"{v:.3f}" if isinstance(v, float) else str(v)


class _Rows:
    """The table's rows, built part by part: `add` reads a figure at its key path in the result."""

    def __init__(self, model: dict):
        self.model = model
        self.rows: list[tuple[str, str, str]] = []
        self.samples = model.get("settings", {}).get("samples")

    def add(self, name: str, path: tuple[str, ...], pct: bool = False, n: int | None = None) -> None:
        """A row ``name`` for the figure at ``path``; a rate (``pct``) over ``n`` samples (default:
        the result's) carries its Wilson interval, none with ``n=0``."""
        value = self.model
        for key in path:
            value = value[key]
        self.rows.append((name, _fmt(value, pct, (self.samples if n is None else n) if pct else None), goal_text(path)))


def summary_rows(model: dict) -> list[tuple[str, str, str]]:
    """(figure, value, goal) rows of an `evaluate_model` result, for the printed table. A rate over
    the part's samples carries its 95% Wilson interval in brackets."""
    rows = _Rows(model)
    for part_rows in (_adherence_rows, _word_swap_rows, _local_blend_rows, _two_object_rows, _refine_rows, _reweight_rows,
                      _sweep_rows, _reconstruction_rows, _localisation_rows):
        part_rows(rows, model)
    return rows.rows


def _adherence_rows(rows: _Rows, model: dict) -> None:
    for key, label in (("adherence", "held-out pairs"), ("adherence_train", "training pairs")):
        if key not in model:
            continue
        n = model[key]["n"]
        for figure, name in (("background_correct", "background correct"), ("background_has_object_colour", "background in the object's colour"),
                             ("found", "object found"), ("colour", "colour"), ("shape", "shape")):
            rows.add(f"adherence ({label}): {name}", (key, figure), True, n=n)


def _word_swap_rows(rows: _Rows, model: dict) -> None:
    for key, v in model.get("word_swap", {}).items():  # the no-injection rows are the baseline
        rows.add(f"word swap {key}: target rate", ("word_swap", key, "target_rate"), True)
        rows.add(f"word swap {key}: median mask IoU (n={v['n_scored']})", ("word_swap", key, "median_mask_iou"))
        rows.add(f"word swap {key}: median centroid shift px", ("word_swap", key, "median_centroid_shift_px"))


def _local_blend_rows(rows: _Rows, model: dict) -> None:
    if "local_blend" in model:
        rows.add("LocalBlend: median background PSNR dB", ("local_blend", "median_background_psnr_db"))
        if "target_rate" in model["local_blend"]:  # older results lack it
            rows.add("LocalBlend: the edit has the target colour", ("local_blend", "target_rate"), True)
    for side, v in model.get("local_blend_sides", {}).get("sides", {}).items():
        path = ("local_blend_sides", "sides", side)
        rows.add(f"LocalBlend, mask from the {side}x{side} maps: median background PSNR dB (n={v['n_scored']})",
                 (*path, "median_background_psnr_db"))
        rows.add(f"LocalBlend, mask from the {side}x{side} maps: the edit has the target colour", (*path, "target_rate"), True)


def _two_object_rows(rows: _Rows, model: dict) -> None:
    for part, label in (("two_objects", "two objects, training pairs"), ("two_objects_held_out", "two objects, held-out pairs")):
        if part not in model:
            continue
        for key in ("model", "rendered"):
            rows.add(f"{label} ({key}): both present (colours)", (part, key, "both_present"), True)
            rows.add(f"{label} ({key}): both present (colours+shapes)", (part, key, "both_present_with_shape"), True)
            rows.add(f"{label} ({key}): relation correct | both present", (part, key, "relation_correct"), True,
                     n=model[part][key].get("relation_scored"))


def _refine_rows(rows: _Rows, model: dict) -> None:
    if "refine" not in model:
        return
    r = model["refine"]
    for mode in ("p2p", "none"):
        path = ("refine", "pattern", mode)
        rows.add(f"refine pattern ({mode}): object kept, median IoU (n={r['pattern'][mode]['n_scored']})", (*path, "object_kept_median_iou"))
        rows.add(f"refine pattern ({mode}): pattern shown", (*path, "pattern_rate"), True)
        rows.add(f"refine pattern ({mode}): same pattern called in source", (*path, "pattern_rate_in_source"), True)
    rows.add("refine pattern (rendered): pattern shown", ("refine", "pattern", "rendered", "pattern_rate"), True)
    for s in world.STYLES:
        for mode in ("p2p", "none"):
            rows.add(f"refine style {s} ({mode}): layout kept, median IoU (n={r['style'][mode][s]['n_scored']})",
                     ("refine", "style", mode, s, "layout_kept_median_iou"))
        rows.add(f"refine style {s} (rendered): layout kept, median IoU", ("refine", "style", "rendered", s, "layout_kept_median_iou"))
        rows.add(f"refine style {s} (p2p): median colourfulness", ("refine", "style", "p2p", s, "median_colourfulness"))


def _reweight_rows(rows: _Rows, model: dict) -> None:
    if "reweight" not in model:
        return
    for kind in ("pattern", "colour"):
        w = model["reweight"][kind]
        rows.add(f"reweight {kind} word: median Spearman rho (n={w['n_scored']})", ("reweight", kind, "median_rho"))
        if "median_effect_change" in w:  # older results lack these figures
            lo, hi = model["reweight"]["factors"][0], model["reweight"]["factors"][-1]
            rows.add(f"reweight {kind} word: median change of {w['effect']}, factor {lo:g} -> {hi:g}", ("reweight", kind, "median_effect_change"))
            rows.add(f"reweight {kind} word: median range of {w['effect']} over the factors", ("reweight", kind, "median_effect_range"))
    w = model["reweight"]["colour"]["image_wide"]
    rows.add(f"reweight colour word, image-wide: median Spearman rho (n={w['n_scored']})", ("reweight", "colour", "image_wide", "median_rho"))


def _sweep_rows(rows: _Rows, model: dict) -> None:
    if "sweep" not in model:
        return
    for name, v in model["sweep"]["cross_replace_steps"].items():
        path = ("sweep", "cross_replace_steps", name)
        rows.add(f"sweep cross_replace_steps={name}: median mask IoU (n={v['n_scored']})", (*path, "median_mask_iou"))
        rows.add(f"sweep cross_replace_steps={name}: target shape", (*path, "target_rate"), True)


def _reconstruction_rows(rows: _Rows, model: dict) -> None:
    if "reconstruction" not in model:
        return
    r = model["reconstruction"]
    for key, where in (("median_psnr_db", "image"), ("median_object_psnr_db", "objects"), ("median_background_psnr_db", "background")):
        rows.add(f"autoencoder round trip (n={r['n']} scenes): median PSNR dB, {where}", ("reconstruction", key))
    for part, label, keys in (("detector_big_plain", "big plain", ("colour", "shape")),
                              ("detector_big", "big, patterned in 3/5", ("colour", "shape", "pattern")),
                              ("detector_small", "small, patterned in 3/5", ("colour", "shape", "pattern"))):
        if part in r:  # older results lack these figures
            for key in keys:
                rows.add(f"autoencoder round trip, {label} objects (n={r['n']}): detector reads {key}", ("reconstruction", part, key),
                         True, n=r["n"])


def _localisation_rows(rows: _Rows, model: dict) -> None:
    if "localisation" not in model:
        return
    for side, v in model["localisation"]["sides"].items():
        path = ("localisation", "sides", side)
        for role in LOCALISATION_ROLES:
            rows.add(f"cross-attention {side}x{side}, {role} word: attention inside / outside the object (n={v['n_scored']})",
                     (*path, f"{role}_inside_outside"))
        rows.add(f"cross-attention {side}x{side}: binding contrast, object's words over background's", (*path, "binding_contrast"))
        for role in LOCALISATION_ROLES:
            if f"{role}_share_own" in v:  # older results lack these figures
                rows.add(f"cross-attention {side}x{side}, {role} word: its share of its own region's attention", (*path, f"{role}_share_own"))
        rows.add(f"cross-attention {side}x{side}: median share of attention on the caption's words", (*path, "word_share"), True, n=0)
        if "padding_share" in v:
            rows.add(f"cross-attention {side}x{side}: median share of attention on the padding", (*path, "padding_share"), True, n=0)


def format_table(model: dict) -> str:
    """A plain-text table of `summary_rows`."""
    rows = [("figure", "value", "goal")] + summary_rows(model)
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, "-" * (w0 + w1 + 10))
    return "\n".join(lines)
