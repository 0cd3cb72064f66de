"""The evaluation's parts: generate with the model, score with the detector, return figures.

Each part (`PARTS`; `evaluate_model` runs a selection) draws its prompts from its own random stream
and its noise from its own generator seeds, so a part gives the same figures whether it runs alone
or with the others. The parts are described in ``python -m prompt2prompt.shapes.evaluate --help``
and in each ``eval_*`` function.
"""

from __future__ import annotations

import math

import numpy as np

from . import world
from .detector import (
    Detection, border_colour, colour_strength, convex_hull, detect, detector_accuracy, dilate, fill_holes, foreground,
    pattern_strength,
)
from .metrics import cell_coverage, colourfulness, iou, median, psnr, relation_holds, rho_summary, spearman

# New parts go at the end: a part's place seeds its prompts and noise (`_part_rng`, `_SEED_OFFSET`).
PARTS = ("adherence", "swap", "blend", "two_objects", "refine", "reweight", "sweep", "adherence_train", "reconstruction",
         "two_objects_held_out", "localisation", "blend_sides")
RECONSTRUCTION_SCENES_PER_SAMPLE = 16  # the autoencoder is cheap to run: 16 scenes per "sample"
REWEIGHT_FACTORS = (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0)
SWEEP_STEPS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_PART_SEEDS = 1000  # generator seeds a part may use: part i's start at i times this
_SEED_OFFSET = {part: _PART_SEEDS * i for i, part in enumerate(PARTS)}  # generator seeds of each part
_SEED_STRIDE = 100_003  # the seeds of evaluation seed s start at s times this, past every part's (a prime)
_RECONSTRUCTION_SCENES = 50_000_000  # where `eval_reconstruction`'s scenes start in the held-out stream
LOCALISATION_TIMESTEPS = (0.25, 0.5, 0.75)  # noise levels, as fractions of the training timesteps
LOCALISATION_ROLES = ("shape", "colour", "background_colour", "background")
_SHARE_KEYS = tuple(r + "_share" for r in LOCALISATION_ROLES)
_INSIDE_COVER = 0.75  # `eval_localisation` counts a map cell inside the object when the object covers this share of it


def _kept_iou(source: list[Detection], edit: list[Detection], filled: bool = False) -> float | None:
    """IoU of the largest objects' masks (silhouettes if ``filled``): None when the source has no
    object (the sample is not scored), 0 when the edit lost it."""
    if not source:
        return None
    if not edit:
        return 0.0
    m = (lambda d: fill_holes(d.mask)) if filled else (lambda d: d.mask)
    return iou(m(source[0]), m(edit[0]))


def _pick(rng, options, exclude=()):
    """One of ``options`` not in ``exclude``, drawn from ``rng``."""
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def _caption(objects, background: str, style: str | None = None, relation: str | None = None) -> str:
    """The world's own caption (template 0: "a big red circle on a blue background [in ... style]")."""
    return world.make_spec(objects, background, style=style, relation=relation).caption


def _match(found: list[Detection], wanted: list[dict]) -> list[Detection] | None:
    """One distinct detection (largest first) per wanted ``colour`` (and ``shape`` if given), or None."""
    chosen: list[Detection] = []
    for w in wanted:
        d = next((d for d in found if all(d is not c for c in chosen) and d.colour == w["colour"]
                  and w.get("shape") in (None, d.shape)), None)
        if d is None:
            return None
        chosen.append(d)
    return chosen


class Sampler:
    """Runs the pipeline for one sample: the generator seed is ``seed * 100003 + offset + k``, the
    offset the part's (so a part draws the same noise whether it runs alone or with the others);
    returns uint8 images. Every ``eval_*`` part takes one as ``gen``."""

    def __init__(self, pipe, steps: int, guidance: float, seed: int):
        self.pipe, self.steps, self.guidance, self.seed = pipe, steps, guidance, seed

    def __call__(self, part: str, k: int, prompt: str, targets=None, **kwargs) -> list[np.ndarray]:
        import torch

        g = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + _SEED_OFFSET[part] + k)
        out = self.pipe(prompt, targets, generator=g, num_inference_steps=self.steps, guidance_scale=self.guidance,
                        output_type="np", return_attention=False, **kwargs)
        return [(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for x in out.images]


def _part_rng(part: str, seed: int) -> np.random.Generator:
    """The random stream of a part's prompts: its own for each part and evaluation seed."""
    return np.random.default_rng([seed, PARTS.index(part)])


def eval_adherence(gen: Sampler, n: int, seed: int = 0, part: str = "adherence") -> dict:
    """Plain generation on held-out colour/shape pairs (``part="adherence_train"``: on pairs seen in
    training): the share of samples whose largest detected object has the named colour / shape
    (``found``: any object on the named background). Diagnostics: ``background_correct``, the image
    border is nearest to the named background colour; ``background_has_object_colour``, it is
    nearest to the named *object* colour (colours swapped)."""
    rng = _part_rng(part, seed)
    pairs = sorted(world.HELDOUT_PAIRS) if part == "adherence" else [world.TRAIN_PAIRS[i] for i in
                                                                     rng.permutation(len(world.TRAIN_PAIRS))]
    found_n = colour_ok = shape_ok = bg_ok = bg_swapped = 0
    for k in range(n):
        colour, shape = pairs[k % len(pairs)]
        bg = _pick(rng, world.COLOUR_NAMES, (colour,))
        image = gen(part, k, f"a big {colour} {shape} on a {bg} background")[0]
        found = detect(image, bg)
        found_n += bool(found)
        colour_ok += bool(found) and found[0].colour == colour
        shape_ok += bool(found) and found[0].shape == shape
        bg_ok += border_colour(image) == bg
        bg_swapped += border_colour(image) == colour
    return {"found": found_n / n, "colour": colour_ok / n, "shape": shape_ok / n,
            "background_correct": bg_ok / n, "background_has_object_colour": bg_swapped / n, "n": n}


def eval_adherence_train(gen: Sampler, n: int, seed: int = 0) -> dict:
    """`eval_adherence` on colour/shape pairs seen in training (a random order of all of them)."""
    return eval_adherence(gen, n, seed, part="adherence_train")


def eval_word_swap(gen: Sampler, n: int, seed: int = 0) -> dict:
    """Shape and colour word swaps with injection ("p2p", edit="replace") vs. the same prompts and seeds
    without it ("none"): target rate, median centroid shift (both detected) and median mask IoU (source detected;
    0 if the edit lost the object)."""
    rng = _part_rng("swap", seed)
    swap = {}
    for j, kind in enumerate(("shape", "colour")):
        samples = []  # the same prompts and noise with and without injection
        for k in range(n):
            shape, shape2 = rng.choice(world.SHAPES, 2, replace=False)
            colour, colour2 = rng.choice(world.COLOUR_NAMES, 2, replace=False)
            bg = _pick(rng, world.COLOUR_NAMES, (colour, colour2))
            samples.append((str(shape), str(shape2), str(colour), str(colour2), bg))
        for mode in ("p2p", "none"):
            hits, shifts, ious = 0, [], []
            for k, (shape, shape2, colour, colour2, bg) in enumerate(samples):
                src = f"a big {colour} {shape} on a {bg} background"
                tgt = f"a big {colour2 if kind == 'colour' else colour} {shape2 if kind == 'shape' else shape} on a {bg} background"
                a, b = gen("swap", j * n + k, src, [tgt], edit="replace" if mode == "p2p" else "none")
                da, db = detect(a, bg), detect(b, bg)
                if db:
                    hits += db[0].shape == shape2 if kind == "shape" else db[0].colour == colour2
                if da and db:
                    shifts.append(math.dist(da[0].centroid, db[0].centroid))
                ious.append(_kept_iou(da, db))
            swap[f"{kind}_{mode}"] = {
                "target_rate": hits / n,
                "median_centroid_shift_px": median(shifts),
                "median_mask_iou": median(ious),
                "n_scored": sum(i is not None for i in ious),
            }
    return swap


def eval_local_blend(gen: Sampler, n: int, seed: int = 0, resolution: int | None = None) -> dict:
    """LocalBlend on colour swaps: median PSNR between source and edit outside both images' objects
    (2 px margin); samples with nothing left outside or identical images are left out. The objects'
    region is the union of the detected masks and of both images' `foreground` (taken against the
    image's own border colour), so that an image whose background is not the named colour (where
    `detect` finds nothing) still has its object left out. ``target_rate``: the edit's largest
    detected object has the target colour (as `eval_word_swap`'s), so that a blend that kept the
    background by keeping everything does not pass unseen. ``resolution``: `LocalBlend`'s (None:
    its default, a quarter of the latent side)."""
    from ..edits import LocalBlend

    rng = _part_rng("blend", seed)
    psnrs, hits = [], 0
    for k in range(n):
        shape = str(rng.choice(world.SHAPES))
        colour, colour2 = rng.choice(world.COLOUR_NAMES, 2, replace=False)
        bg = _pick(rng, world.COLOUR_NAMES, (colour, colour2))
        a, b = gen("blend", k, f"a big {colour} {shape} on a {bg} background", [f"a big {colour2} {shape} on a {bg} background"],
                   local_blend=LocalBlend([shape], [shape], resolution=resolution))
        region = foreground(a) | foreground(b)
        found = detect(b, bg)
        hits += bool(found) and found[0].colour == colour2
        for d in detect(a, bg) + found:
            region |= d.mask
        psnrs.append(psnr(a, b, ~dilate(region, 2)))  # outside the objects and a 2 px margin (the image's edge counts)
    scored = [p for p in psnrs if np.isfinite(p)]
    return {"median_background_psnr_db": median(scored), "target_rate": hits / n, "n": n, "n_scored": len(scored)}


def eval_blend_sides(gen: Sampler, n: int, seed: int = 0) -> dict:
    """`eval_local_blend` (the same prompts and seeds) with the mask from each cross-attention map
    side of the UNet. The mask is max-pooled 3x3 at its side before it is resized (paper Sec. 3.2),
    so it reaches one cell, ``1/side`` of the image, beyond the words' cells: at SD's default
    (16 at 512 px) that is 32 px, at the shapes model's (4 at 64 px) a quarter of the image. The
    figure shows which maps bind a model's words tightly enough for the blend."""
    from ..attention import attention_sides

    side = gen.pipe.unet.config.sample_size  # the latent side at the model's own resolution
    return {"sides": {str(s): eval_local_blend(gen, n, seed, resolution=s) for s in attention_sides(gen.pipe.unet, (side, side))},
            "n": n}


def _score_two(found: list[Detection], objects: list[dict], relation: str) -> tuple[bool, bool, bool | None]:
    """(both colours present, both colour+shape present, relation correct among the colour matches or None)."""
    by_colour = _match(found, [dict(colour=o["colour"]) for o in objects])
    full = _match(found, objects)
    rel = relation_holds(by_colour[0].centroid, by_colour[1].centroid, relation) if by_colour else None
    return by_colour is not None, full is not None, rel


def eval_two_objects(gen: Sampler, n: int, seed: int = 0, split: str = "train") -> dict:
    """Two objects and a relation on a plain background, in the world's phrasing ("a red square left
    of a yellow star on a green background", sizes unsaid), with (colour, shape) pairs of different
    colours and shapes: *training* pairs (``split="train"``), so that composition is measured apart
    from generalisation, or held-out pairs (``"held_out"``, the issue's goal: both present >= 0.7).
    ``both_present``: the detector finds two distinct objects with the two named colours;
    ``both_present_with_shape``: also with the named shapes; ``relation_correct``: among the
    colour matches, the centroids satisfy the relation (`relation_holds`). ``rendered``: the same
    scoring on the world's renders of the same prompts."""
    part = "two_objects" if split == "train" else "two_objects_held_out"
    rng = _part_rng(part, seed)
    pairs = world.TRAIN_PAIRS if split == "train" else sorted(world.HELDOUT_PAIRS)
    counts = {"model": [0, 0, 0, 0, 0], "rendered": [0, 0, 0, 0, 0]}  # two found, both, both+shape, rel ok, rel scored
    for k in range(n):
        (c1, s1) = pairs[int(rng.integers(len(pairs)))]
        (c2, s2) = _pick(rng, pairs, [p for p in pairs if p[0] == c1 or p[1] == s1])
        relation = _pick(rng, world.RELATIONS)
        bg = _pick(rng, world.COLOUR_NAMES, (c1, c2))
        objects = [dict(colour=c1, shape=s1), dict(colour=c2, shape=s2)]
        spec = world.make_spec(objects, bg, relation=relation, seed=k)
        images = {"model": gen(part, k, spec.caption)[0], "rendered": world.render(spec).image}
        for key, img in images.items():
            found = detect(img, bg)
            both, full, rel = _score_two(found, objects, relation)
            c = counts[key]
            c[0] += len(found) >= 2
            c[1] += both
            c[2] += full
            c[3] += bool(rel)
            c[4] += rel is not None
    out = {}
    for key, c in counts.items():
        out[key] = {"two_found": c[0] / n, "both_present": c[1] / n, "both_present_with_shape": c[2] / n,
                    "relation_correct": c[3] / c[4] if c[4] else None, "relation_scored": c[4]}
    out["model"]["n"] = n
    out["pairs"] = split
    return out


def eval_two_objects_held_out(gen: Sampler, n: int, seed: int = 0) -> dict:
    """`eval_two_objects` on held-out (colour, shape) pairs: the prompts the issue's two-object goal names."""
    return eval_two_objects(gen, n, seed, split="held_out")


def eval_refine(gen: Sampler, n: int, seed: int = 0) -> dict:
    """Refinement (edit="refine") against the same seed without injection (edit="none").

    ``pattern``: "a big red circle on a blue background" -> "a big striped red circle on a blue
    background" (patterns in turn): ``object_kept_median_iou``, the silhouettes' (holes filled) IoU
    of the largest objects in source and edit (goal >= 0.7; 0 if the edit lost the object, samples
    without a source object not scored); ``pattern_rate``, the share of samples whose edit's largest
    object shows the added pattern (goal >= 0.7), with ``pattern_rate_in_source``, how often the
    detector already calls the *source* by that pattern (its false-positive rate on these images).

    ``median_strength_source`` / ``median_strength_edit``: `pattern_strength` inside the source's
    silhouette (a continuous view of the same cue).

    ``style``: "... in pencil sketch style" / "... in pixel art style" (the world's template 0).
    ``layout_kept_median_iou``: IoU of the convex hull of the source's detected object with the
    styled edit's `foreground` (a looser segmentation, as the background is no longer the plain
    colour; its ceiling on rendered scenes is in ``rendered``); ``median_colourfulness`` (mean
    channel spread: a rendered pencil sketch is near-gray, under 10) and ``median_abs_change`` (mean
    |edit - source|, 0-255) tell whether the style was applied at all."""
    rng = _part_rng("refine", seed)
    pattern_figures = {m: {"ious": [], "hits": 0, "src_hits": 0, "per": {p: [0, 0] for p in world.PATTERNS}, "strength": ([], [])}
                       for m in ("p2p", "none")}
    pattern_rendered = {"hits": 0}
    style_figures = {m: {s: {"ious": [], "colourful": [], "change": []} for s in world.STYLES} for m in ("p2p", "none")}
    style_rendered = {s: [] for s in world.STYLES}
    for k in range(n):
        pattern = world.PATTERNS[k % len(world.PATTERNS)]
        shape = _pick(rng, world.SHAPES)
        colour = _pick(rng, world.COLOUR_NAMES)
        bg = _pick(rng, world.COLOUR_NAMES, (colour,))
        obj = dict(shape=shape, colour=colour, size="big")
        _refine_pattern(gen, k, obj, bg, pattern, pattern_figures, pattern_rendered)
        _refine_style(gen, n + k, obj, bg, style_figures, style_rendered)
    out = {"pattern": {}, "style": {}}
    for mode, r in pattern_figures.items():
        out["pattern"][mode] = {
            "object_kept_median_iou": median(r["ious"]), "n_scored": sum(i is not None for i in r["ious"]),
            "pattern_rate": r["hits"] / n, "pattern_rate_in_source": r["src_hits"] / n,
            "pattern_rate_by_pattern": {p: h / t if t else None for p, (h, t) in r["per"].items()},
            "median_strength_source": median(r["strength"][0]), "median_strength_edit": median(r["strength"][1]),
        }
    out["pattern"]["rendered"] = {"pattern_rate": pattern_rendered["hits"] / n}
    for mode, per_style in style_figures.items():
        out["style"][mode] = {s: {"layout_kept_median_iou": median(r["ious"]), "n_scored": sum(i is not None for i in r["ious"]),
                                  "median_colourfulness": median(r["colourful"]), "median_abs_change": median(r["change"])}
                              for s, r in per_style.items()}
    out["style"]["rendered"] = {s: {"layout_kept_median_iou": median(v)} for s, v in style_rendered.items()}
    out["n"] = n
    return out


def _refine_pattern(gen: Sampler, k: int, obj: dict, bg: str, pattern: str, figures: dict, rendered: dict) -> None:
    """`eval_refine`'s sample ``k`` of adding ``pattern`` to ``obj``: the render of the edited
    prompt into ``rendered``, the refinement and the plain generation into ``figures[mode]``."""
    src, tgt = _caption([obj], bg), _caption([dict(obj, pattern=pattern)], bg)
    truth = detect(world.render(world.make_spec([dict(obj, pattern=pattern)], bg, seed=k)).image, bg)
    rendered["hits"] += bool(truth) and truth[0].pattern == pattern
    for mode in ("p2p", "none"):
        a, b = gen("refine", k, src, [tgt], edit="refine" if mode == "p2p" else "none")
        da, db = detect(a, bg), detect(b, bg)
        r = figures[mode]
        r["ious"].append(_kept_iou(da, db, filled=True))
        hit = bool(db) and db[0].pattern == pattern
        r["hits"] += hit
        r["src_hits"] += bool(da) and da[0].pattern == pattern
        r["per"][pattern][0] += hit
        r["per"][pattern][1] += 1
        if da:
            silhouette = fill_holes(da[0].mask)
            r["strength"][0].append(pattern_strength(a, silhouette))
            r["strength"][1].append(pattern_strength(b, silhouette))


def _refine_style(gen: Sampler, k: int, obj: dict, bg: str, figures: dict, rendered: dict) -> None:
    """`eval_refine`'s sample ``k`` of styling ``obj`` in each of the world's styles: the renders'
    layout ceiling into ``rendered[style]``, the refinement and the plain generation into
    ``figures[mode][style]``."""
    src = _caption([obj], bg)
    styled = [_caption([obj], bg, style=s) for s in world.STYLES]
    plain_truth = detect(world.render(world.make_spec([obj], bg, seed=k)).image, bg)
    for s in world.STYLES:
        fg = foreground(world.render(world.make_spec([obj], bg, style=s, seed=k)).image)
        rendered[s].append(iou(convex_hull(plain_truth[0].mask), fg) if plain_truth else None)
    for mode in ("p2p", "none"):
        images = gen("refine", k, src, styled, edit="refine" if mode == "p2p" else "none")
        da = detect(images[0], bg)
        for s, img in zip(world.STYLES, images[1:]):
            r = figures[mode][s]
            r["ious"].append(iou(convex_hull(da[0].mask), foreground(img)) if da else None)
            r["colourful"].append(colourfulness(img))
            r["change"].append(float(np.abs(img.astype(np.float32) - images[0].astype(np.float32)).mean()))


def eval_reweight(gen: Sampler, n: int, seed: int = 0, factors=REWEIGHT_FACTORS) -> dict:
    """Attention re-weighting: the source prompt ("a big striped red circle on a blue background")
    is edited into itself once per factor (edit="replace", ``equalizer={word: factors}``), for a
    pattern word (patterns in turn; effect: `pattern_strength` inside the source's silhouette) and a
    colour word (effect: `colour_strength` of the named colour there). Per sample, Spearman's rho
    between factor and effect; ``median_rho`` over the samples with a source object (goal >= 0.8;
    ``n_undefined``: constant effect), and the median effect at each factor.

    The model often binds the colour word to the background instead of the object; the colour
    word's ``image_wide`` figures therefore also score `colour_strength` over the whole image, for
    every sample (no detection needed): the word's effect wherever it lands."""
    rng = _part_rng("reweight", seed)
    out = {}
    for j, word_kind in enumerate(("pattern", "colour")):
        rhos, curves, wide_rhos, wide_curves = [], [], [], []
        everywhere = np.ones((world.SIZE, world.SIZE), bool)
        for k in range(n):
            pattern = world.PATTERNS[k % len(world.PATTERNS)] if word_kind == "pattern" else None
            shape = _pick(rng, world.SHAPES)
            colour = _pick(rng, world.COLOUR_NAMES)
            bg = _pick(rng, world.COLOUR_NAMES, (colour,))
            src = _caption([dict(shape=shape, colour=colour, size="big", pattern=pattern)], bg)
            word = pattern or colour
            images = gen("reweight", j * n + k, src, [src] * len(factors), edit="replace", equalizer={word: list(factors)})
            if word_kind == "colour":
                wide_curves.append([colour_strength(img, everywhere, colour) for img in images[1:]])
                wide_rhos.append(spearman(factors, wide_curves[-1]))
            da = detect(images[0], bg)
            if not da:
                continue
            mask = fill_holes(da[0].mask)
            if word_kind == "pattern":
                effect = [pattern_strength(img, mask) for img in images[1:]]
            else:
                effect = [colour_strength(img, mask, colour) for img in images[1:]]
            curves.append(effect)
            rhos.append(spearman(factors, effect))
        out[word_kind] = rho_summary(factors, rhos, curves)
        out[word_kind]["effect"] = "pattern_strength" if word_kind == "pattern" else "colour_strength"
        if word_kind == "colour":
            out[word_kind]["image_wide"] = rho_summary(factors, wide_rhos, wide_curves)
    out["factors"] = list(factors)
    out["n"] = n
    return out


def eval_sweep(gen: Sampler, n: int, seed: int = 0, steps=SWEEP_STEPS) -> dict:
    """Shape word swaps ("a big red circle ..." -> "a big red star ...", edit="replace") with the
    source's cross-attention injected for a fraction ``cross_replace_steps`` of the steps (self-attention
    fixed at the default 0.4), plus edit="none": at each value the median source/edit mask IoU (source
    detected; 0 if the edit lost the object), the target-shape rate and the rate at which the edit
    keeps the source's detected shape. The same prompts and noise at every value."""
    rng = _part_rng("sweep", seed)
    samples = []
    for k in range(n):
        shape, shape2 = rng.choice(world.SHAPES, 2, replace=False)
        colour = _pick(rng, world.COLOUR_NAMES)
        bg = _pick(rng, world.COLOUR_NAMES, (colour,))
        samples.append((str(shape), str(shape2), colour, bg))
    settings = [(str(v), dict(edit="replace", cross_replace_steps=float(v))) for v in steps] + [("none", dict(edit="none"))]
    out = {}
    for name, kwargs in settings:
        ious, hits, kept = [], 0, 0
        for k, (shape, shape2, colour, bg) in enumerate(samples):
            a, b = gen("sweep", k, f"a big {colour} {shape} on a {bg} background", [f"a big {colour} {shape2} on a {bg} background"], **kwargs)
            da, db = detect(a, bg), detect(b, bg)
            ious.append(_kept_iou(da, db))
            hits += bool(db) and db[0].shape == shape2
            kept += bool(da) and bool(db) and db[0].shape == da[0].shape
        out[name] = {"median_mask_iou": median(ious), "target_rate": hits / n, "source_shape_kept": kept / n,
                     "n_scored": sum(i is not None for i in ious)}
    return {"cross_replace_steps": out, "self_replace_steps": 0.4, "n": n}


def autoencoder_round_trip(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """``images`` (``(n, h, w, 3)`` uint8) encoded to their latent means, the latents the UNet is
    trained on, and decoded back to uint8: what the autoencoder alone keeps of a scene."""
    import torch

    from .data import images_to_tensor

    param = next(vae.parameters())
    out = np.empty_like(images)
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i:i + batch]).to(param.device, param.dtype)  # (b, 3, h, w) in [-1, 1]
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample  # (b, 3, h, w) in [-1, 1]
        rec = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)  # (b, h, w, 3)
        out[i:i + batch] = rec.cpu().numpy().astype(np.uint8)
    return out


def eval_reconstruction(gen: Sampler, n: int, seed: int = 0) -> dict:
    """The autoencoder's round trip, the ceiling of every picture the model makes and of inversion:
    ``16 * n`` rendered scenes of the held-out split (plain and textured backgrounds, patterns,
    styles) are encoded to their latent means, the latents the UNet is trained on, and decoded.
    Median PSNR over the whole image, over the objects (drawn pixels grown by 1 px, where the
    decoder's errors gather at the edges) and over the background (2 px away from any object).

    Then `detector_accuracy` on ``16 * n`` single-object scenes after the round trip:
    ``detector_big_plain`` (big objects without a pattern, the form of the adherence and word-swap
    prompts), ``detector_big`` (big, a pattern in three of five, the refinement's objects) and
    ``detector_small``. No UNet can score above what the detector reads after the round trip, so
    these are the ceilings the autoencoder sets on the generation figures."""
    vae = gen.pipe.vae
    first = _RECONSTRUCTION_SCENES + seed * _SEED_STRIDE + _SEED_OFFSET["reconstruction"] * RECONSTRUCTION_SCENES_PER_SAMPLE
    scenes = [world.sample_scene(first + k, "heldout") for k in range(RECONSTRUCTION_SCENES_PER_SAMPLE * n)]
    images = np.stack([sc.image for sc in scenes])  # (scenes, h, w, 3) uint8
    out = autoencoder_round_trip(vae, images)
    whole, objects, background = [], [], []
    for sc, a, b in zip(scenes, images, out):
        drawn = sc.masks.any(0)  # (h, w)
        whole.append(psnr(a, b, np.ones_like(drawn)))
        objects.append(psnr(a, b, dilate(drawn, 1)))
        background.append(psnr(a, b, ~dilate(drawn, 2)))
    result = {"median_psnr_db": median(whole), "median_object_psnr_db": median(objects),
              "median_background_psnr_db": median(background), "n": len(scenes), "split": "heldout"}
    round_trip = lambda x: autoencoder_round_trip(vae, x)  # noqa: E731
    for key, size, plain in (("detector_big_plain", "big", True), ("detector_big", "big", False), ("detector_small", "small", False)):
        result[key] = detector_accuracy(len(scenes), seed, round_trip, size, plain)
    return result


def cross_attention_of(pipe, latents, timestep: int, prompt: str) -> tuple:
    """The cross-attention maps of one UNet call on ``latents`` (no guidance), conditioned on
    ``prompt``: ``(PromptTokens, {side: (height, width, tokens) float32})``, each map averaged over
    heads and over the layers at that side, as `Prompt2PromptPipeline` records them."""
    import torch

    from ..alignment import tokenize_words
    from ..attention import P2PController, attention_sides, p2p_attention

    tokens = tokenize_words(prompt, pipe.tokenizer)
    unet = pipe.unet
    param = next(unet.parameters())
    states, _ = pipe.encode_prompt([tokens], param.device, do_classifier_free_guidance=False)  # (1, tokens, dim)
    hw = tuple(latents.shape[-2:])
    ctrl = P2PController(None, 1, False, hw, record_sides=attention_sides(unet, hw))
    with torch.no_grad(), p2p_attention(unet, ctrl):
        unet(latents.to(param.device, param.dtype), timestep, encoder_hidden_states=states, cross_attention_kwargs={"p2p_step": 0})
    return tokens, {side: (m[0] / ctrl.layer_calls[side]).cpu() for side, m in ctrl.maps.items()}


def eval_localisation(gen: Sampler, n: int, seed: int = 0) -> dict:
    """Whether the cross-attention maps bind words to pixels, which every edit relies on (the
    paper's premise; LocalBlend's mask is these maps). ``n`` rendered single-object scenes (big,
    plain background, training pairs, the world's caption) are encoded to their latent means and
    noised at `LOCALISATION_TIMESTEPS`; one UNet call records the maps. For each word role (the
    shape word, the object's colour word, the background's colour word, "background") and each
    map side: the median over scenes and noise levels of the word's mean attention over the cells
    inside the object (covered >= 75%) divided by its mean over the cells outside it (not
    covered). A map that binds the object's words to the object gives > 1 for ``shape`` and
    ``colour`` and < 1 for the background's words; maps that ignore the layout give 1.
    ``binding_contrast``: the median of the geometric mean of the object's two words' ratios over
    that of the background's two, so that a spatial pattern all tokens share cancels (1: no
    binding; a binding model is well above 1). Also the median share of each pixel's attention that
    goes to the caption's words and to the padding after the end token (``padding_share``: a causal
    text encoder's padding states summarise the whole caption, so a UNet can read the caption from
    them without looking at any word), and per role
    ``{role}_share_own``: the median of the word's mean share of the attention of the cells of its
    own region (inside the object for the object's words, outside for the background's). That share
    bounds what re-weighting can do: the paper's re-weighting (Sec. 3.2) scales the word's column of the map, so
    a factor ``c`` moves a cell's output by ``(c - 1)`` times the share of that word's value."""
    import torch

    pipe = gen.pipe
    scheduler = pipe.scheduler
    rng = _part_rng("localisation", seed)
    g = torch.Generator().manual_seed(seed * _SEED_STRIDE + _SEED_OFFSET["localisation"])
    per_side: dict[int, dict[str, list[float]]] = {}
    for k in range(n):
        colour, shape = world.TRAIN_PAIRS[int(rng.integers(len(world.TRAIN_PAIRS)))]
        bg = _pick(rng, world.COLOUR_NAMES, (colour,))
        spec = world.make_spec([dict(shape=shape, colour=colour, size="big")], bg, seed=k)
        scene = world.render(spec)
        latent = _scaled_latent(pipe.vae, scene.image)  # (1, channels, h/f, w/f)
        words = {"shape": shape, "colour": colour, "background_colour": bg, "background": "background"}
        for frac in LOCALISATION_TIMESTEPS:
            t = int(frac * scheduler.config.num_train_timesteps)
            noise = torch.randn(latent.shape, generator=g).to(latent.device, latent.dtype)
            noisy = scheduler.add_noise(latent, noise, torch.tensor([t]))
            tokens, maps = cross_attention_of(pipe, noisy, t, spec.caption)
            for side, m in maps.items():
                _score_localisation(per_side, side, m, tokens, scene.filled[0], words)
    return {"sides": {str(side): {**{f"{r}_inside_outside": median(per[r]) for r in LOCALISATION_ROLES},
                                  **{f"{r}_share_own": median(per[r + "_share"]) for r in LOCALISATION_ROLES},
                                  "binding_contrast": median(per["binding"]),
                                  "word_share": median(per["word_share"]), "padding_share": median(per["padding_share"]),
                                  "n_scored": len(per["shape"])}
                      for side, per in sorted(per_side.items(), reverse=True)},
            "n": n, "timesteps": list(LOCALISATION_TIMESTEPS)}


def _scaled_latent(vae, image: np.ndarray):
    """The autoencoder's latent mean of one uint8 ``(h, w, 3)`` image, times its scaling factor:
    the latent the UNet works on, ``(1, channels, h/f, w/f)``."""
    import torch

    from .data import images_to_tensor

    param = next(vae.parameters())
    with torch.no_grad():
        x = images_to_tensor(image[None]).to(param.device, param.dtype)  # (1, 3, h, w) in [-1, 1]
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


def _score_localisation(per_side: dict, side: int, m, tokens, filled: np.ndarray, words: dict[str, str]) -> None:
    """Add one map's `eval_localisation` figures to ``per_side[side]``: ``m`` is the ``(side, side,
    tokens)`` cross-attention map of the caption ``tokens`` (`PromptTokens`), ``filled`` the
    object's (h, w) mask, ``words`` each role's word. Sides that do not divide the image, and
    scenes without cells both inside and outside the object at this side, are not scored."""
    import torch

    if world.SIZE % side:
        return
    cover = cell_coverage(filled, side)
    inside, outside = torch.from_numpy(cover >= _INSIDE_COVER), torch.from_numpy(cover == 0)
    if not inside.any() or not outside.any():
        return
    keys = LOCALISATION_ROLES + ("binding",) + _SHARE_KEYS + ("word_share", "padding_share")
    per = per_side.setdefault(side, {key: [] for key in keys})
    for role, word in words.items():
        wm = m[..., tokens.positions(word)].sum(-1)  # (h, w)
        per[role].append(float(wm[inside].mean() / wm[outside].mean()))
        per[role + "_share"].append(float(wm[inside if role in ("shape", "colour") else outside].mean()))
    # the object's words against the background's: what all words share drops out
    per["binding"].append(math.sqrt(per["shape"][-1] * per["colour"][-1] / (per["background_colour"][-1] * per["background"][-1])))
    word_tokens = sorted({p for w in tokens.words for p in tokens.positions(w)})
    per["word_share"].append(float(m[..., word_tokens].sum(-1).median()))
    per["padding_share"].append(float(m[..., tokens.num_tokens :].sum(-1).median()))


_EVALS = {"adherence": eval_adherence, "adherence_train": eval_adherence_train, "swap": eval_word_swap, "blend": eval_local_blend, "two_objects": eval_two_objects,
          "two_objects_held_out": eval_two_objects_held_out, "refine": eval_refine, "reweight": eval_reweight, "sweep": eval_sweep, "reconstruction": eval_reconstruction,
          "localisation": eval_localisation, "blend_sides": eval_blend_sides}
_RESULT_KEY = {"adherence": "adherence", "swap": "word_swap", "blend": "local_blend", "two_objects": "two_objects",
               "two_objects_held_out": "two_objects_held_out",
               "refine": "refine", "reweight": "reweight", "sweep": "sweep", "adherence_train": "adherence_train",
               "reconstruction": "reconstruction", "localisation": "localisation", "blend_sides": "local_blend_sides"}


def evaluate_model(pipe, n: int = 16, steps: int = 30, guidance: float = 5.0, seed: int = 0, parts=PARTS) -> dict:
    """Generate with ``pipe`` and score the ``parts`` (see `PARTS`), ``n`` samples each (plain backgrounds)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {PARTS}")
    gen = Sampler(pipe, steps, guidance, seed)
    result = {}
    for part in PARTS:
        if part in parts:
            result[_RESULT_KEY[part]] = _EVALS[part](gen, n, seed)
    result["settings"] = {"samples": n, "steps": steps, "guidance": guidance, "seed": seed}
    return result


