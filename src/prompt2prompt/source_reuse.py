"""What the command line and the web page need to keep a `SourcePass` and edit from it again.

Small and free of model work, so that the tools stay thin layers: the injection budget a set of
edits needs (`covering_window`, `budget_of`), and the record of what made a pass (`pass_record`,
`record_mismatch`), which the tools compare before they hand a kept pass to the pipeline. The
pipeline itself refuses a pass whose source-side arguments or budget do not fit an edit (an
`ArgumentError` naming the argument); these helpers only decide which pass to try.

(Written on the tools' branch for issue 30; it belongs beside `SourcePass` in `source_pass`.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: The options of an edit that fix its source's pass (the command line's names). The budget (the
#: injection windows) is checked by the pipeline; the photo by its SHA-256.
SOURCE_KEYS = ("model", "dtype", "prompt", "seed", "steps", "guidance", "image", "invert")


def _bounds(window) -> tuple[float, float]:
    """``f`` -> (0, f); ``(start, end)`` or ``[start, end]`` -> itself."""
    if isinstance(window, (list, tuple)):
        start, end = window
        return float(start), float(end)
    return 0.0, float(window)


def covering_window(windows: Iterable) -> float | tuple[float, float]:
    """The smallest window that holds every one of ``windows`` (fractions ``f`` meaning ``(0, f)``,
    ``(start, end)`` pairs, or dicts of them per word as ``cross_replace_steps`` takes, whose values
    all count): the earliest start to the latest end. A plain fraction when it starts at 0.

    Raises:
        ValueError: no window given.
    """
    bounds = []
    for window in windows:
        if isinstance(window, Mapping):
            bounds.extend(_bounds(w) for w in window.values())
        else:
            bounds.append(_bounds(window))
    if not bounds:
        raise ValueError("covering_window needs at least one window")
    start, end = min(b[0] for b in bounds), max(b[1] for b in bounds)
    return end if start == 0 else (start, end)


def budget_of(cross_windows: Iterable, self_windows: Iterable) -> dict[str, Any]:
    """``pipe.source``'s budget arguments (``cross_replace_steps``, ``self_replace_steps``) that
    cover every given cross-attention window (per-word dicts included) and self-attention window."""
    return {"cross_replace_steps": covering_window(cross_windows), "self_replace_steps": covering_window(self_windows)}


def pass_record(options: Mapping, photo_sha256: str | None = None) -> dict[str, Any]:
    """What made a pass, from an edit's canonical options (`options.EDIT_KEYS`): the model, dtype,
    source prompt, seed (or the photo's SHA-256 and inversion method), steps and guidance."""
    record = {key: options.get(key) for key in SOURCE_KEYS}
    if options.get("image"):
        record["seed"] = None  # an inversion fixes the noise, not the seed
        record["image"] = photo_sha256
    else:
        record["invert"] = None
    return record


#: How a note names each key of a record.
_KEY_NAMES = {"model": "model", "dtype": "dtype", "prompt": "source prompt", "seed": "seed", "steps": "steps",
              "guidance": "guidance", "image": "photo", "invert": "inversion method"}


def record_mismatch(kept: Mapping, wanted: Mapping) -> str | None:
    """None when the record of a kept pass equals the wanted one, else the first difference in a few
    words (``"this edit's seed is 3, the pass's 2"``)."""
    for key in SOURCE_KEYS:
        if kept.get(key) != wanted.get(key):
            if key == "image":
                return "this edit's photo is not the pass's (their SHA-256 differ)"
            show = repr if key in ("prompt", "model") else str
            return f"this edit's {_KEY_NAMES[key]} is {show(wanted.get(key))}, the pass's {show(kept.get(key))}"
    return None
