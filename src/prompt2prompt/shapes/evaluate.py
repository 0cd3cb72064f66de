"""Measure the bundled model in the shapes world, where the truth of every pixel is known.

A detector segments objects against a plain background, and classifies colour (nearest canonical
colour), shape (best IoU against the renderer's own shape masks, filled or outlined), size and
pattern. It is checked on rendered scenes first (`detector_accuracy`). The evaluation then
generates with the model and scores:

- text adherence of plain generation on held-out colour/shape pairs (colour, shape);
- word swap with Prompt-to-Prompt against "same seed, no injection": target shape / colour rate,
  median centroid shift, median mask IoU between source and edit;
- LocalBlend: PSNR between source and edit outside the edited object's region.

    python -m prompt2prompt.shapes.evaluate [--model DIR] [--samples 16] [--steps 30] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from . import world

_MIN_PIXELS = 20
_BG_DISTANCE = 60.0


@dataclass(frozen=True)
class Detection:
    """One detected object."""

    colour: str
    shape: str
    size: str
    pattern: str | None  # "outlined", "striped", "dotted" or None
    mask: np.ndarray  # (64, 64) bool
    centroid: tuple[float, float]  # (x, y) px, y down
    diameter: float


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, largest first."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        lab = len(comps) + 1
        stack, pixels = [(y0, x0)], []
        labels[y0, x0] = lab
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = lab
                    stack.append((yy, xx))
        comp = np.zeros((h, w), bool)
        ys, xs = zip(*pixels)
        comp[list(ys), list(xs)] = True
        comps.append(comp)
    return sorted(comps, key=lambda c: -c.sum())


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every background region not connected to the image border."""
    outside = np.zeros_like(mask)
    border = np.zeros_like(mask)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    frontier = border & ~mask
    while frontier.any():
        outside |= frontier
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        frontier = grown & ~mask & ~outside
    return ~outside


def _template(shape: str, cx: float, cy: float, diameter: float, rotation: float) -> np.ndarray:
    """The renderer's filled shape mask at a centre (px, y down), bounding-box side and rotation."""
    ys, xs = np.mgrid[0 : world.SIZE, 0 : world.SIZE].astype(np.float32) + 0.5
    r = math.radians(rotation)
    c, s = math.cos(r), math.sin(r)
    dx, dy = (xs - cx) / (diameter / 2), (cy - ys) / (diameter / 2)  # normalised, y up
    return world.inside(shape, c * dx + s * dy, -s * dx + c * dy)


def _classify_shape(filled: np.ndarray) -> tuple[str, float]:
    """Best-IoU filled shape (a ring's filled mask is a disc: rings are told apart by their hole)."""
    ys, xs = np.nonzero(filled)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = float(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
    best = (-1.0, "circle", side)
    for shape in world.SHAPES:
        if shape == "ring":
            continue
        for rot in (-15, -10, -5, 0, 5, 10, 15):
            for scale in (0.9, 0.95, 1.0):
                t = _template(shape, cx, cy, side * scale, rot)
                iou = (t & filled).sum() / max(1, (t | filled).sum())
                if iou > best[0]:
                    best = (iou, shape, side * scale)
    return best[1], best[2]


def detect(image: np.ndarray, background: str) -> list[Detection]:
    """Objects in a ``(64, 64, 3)`` uint8 image on the plain background colour ``background``."""
    img = image.astype(np.float32)
    bg = np.array(world.COLOURS[background], np.float32)
    fg = np.sqrt(((img - bg) ** 2).sum(-1)) > _BG_DISTANCE
    palette = np.array([world.COLOURS[c] for c in world.COLOUR_NAMES], np.float32)
    out = []
    for comp in _components(fg):
        if comp.sum() < _MIN_PIXELS:
            break
        filled = _fill_holes(comp)
        hole = 1.0 - comp.sum() / filled.sum()
        shape, diameter = _classify_shape(filled)
        outlined = hole > 0.45 or (shape != "circle" and hole > 0.2)
        if shape == "circle" and 0.12 < hole <= 0.45:
            shape = "ring"
        core = world._erode(comp, 1) if not outlined else comp
        pixels = img[core if core.sum() >= 8 else comp]
        nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(nearest, minlength=len(palette))
        off = 1.0 - counts.max() / counts.sum()
        order = [world.COLOUR_NAMES[i] for i in np.argsort(-counts)]
        colour = order[0]
        # stripes and dots are drawn in near-white or near-black: prefer the object's own colour
        second = next(c for c in order if c not in ("white", "black"))
        if colour in ("white", "black") and counts[world.COLOUR_NAMES.index(second)] >= 0.2 * counts.sum():
            colour = second
        pattern = "outlined" if outlined else ("striped" if off > 0.36 else "dotted" if off > 0.1 else None)
        ys, xs = np.nonzero(comp)
        out.append(Detection(colour, shape, "big" if diameter >= 23 else "small", pattern, comp, (float(xs.mean()), float(ys.mean())), diameter))
    return out


def detector_accuracy(n: int = 300, seed: int = 0) -> dict[str, float]:
    """Detector correctness on rendered single-object, plain-background, unstyled scenes."""
    rng = np.random.default_rng(seed)
    hits = {"colour": 0, "shape": 0, "size": 0, "pattern": 0, "found": 0}
    for k in range(n):
        shape = world.SHAPES[rng.integers(len(world.SHAPES))]
        colour, bg = rng.choice(world.COLOUR_NAMES, 2, replace=False)
        size = ("small", "big")[rng.integers(2)]
        pattern = [None, None, "striped", "dotted", "outlined"][rng.integers(5)]
        spec = world.make_spec([dict(shape=shape, colour=str(colour), size=size, pattern=pattern)], str(bg), seed=k)
        found = detect(world.render(spec).image, str(bg))
        if not found:
            continue
        d = found[0]
        hits["found"] += 1
        hits["colour"] += d.colour == colour
        hits["shape"] += d.shape == shape
        hits["size"] += d.size == size
        hits["pattern"] += d.pattern == pattern
    return {k: v / n for k, v in hits.items()}


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return float("nan")
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2)[where].mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _pick(rng, options, exclude=()):
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def evaluate_model(pipe, n: int = 16, steps: int = 30, guidance: float = 5.0, seed: int = 0) -> dict:
    """Generate with ``pipe`` and score adherence, word swap and LocalBlend (plain backgrounds)."""
    import torch

    from ..edits import LocalBlend

    rng = np.random.default_rng(seed)
    gen = lambda k: torch.Generator().manual_seed(seed * 100_003 + k)  # noqa: E731
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np")

    def to_u8(x):
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)

    # 1. text adherence on held-out colour/shape pairs
    heldout = sorted(world.HELDOUT_PAIRS)
    colour_ok = shape_ok = 0
    for k in range(n):
        colour, shape = heldout[k % len(heldout)]
        bg = _pick(rng, world.COLOUR_NAMES, (colour,))
        img = to_u8(pipe(f"a big {colour} {shape} on a {bg} background", generator=gen(k), **kw).images[0])
        found = detect(img, bg)
        colour_ok += bool(found) and found[0].colour == colour
        shape_ok += bool(found) and found[0].shape == shape
    result = {"adherence": {"colour": colour_ok / n, "shape": shape_ok / n, "n": n}}

    # 2. word swap (shape and colour) with injection vs. the same seed without it
    swap = {}
    for kind in ("shape", "colour"):
        for mode in ("p2p", "none"):
            hits, shifts, ious, lb_psnr = 0, [], [], []
            for k in range(n):
                shape, shape2 = rng.choice(world.SHAPES, 2, replace=False)
                colour, colour2 = rng.choice(world.COLOUR_NAMES, 2, replace=False)
                bg = _pick(rng, world.COLOUR_NAMES, (colour, colour2))
                src = f"a big {colour} {shape} on a {bg} background"
                tgt = f"a big {colour2 if kind == 'colour' else colour} {shape2 if kind == 'shape' else shape} on a {bg} background"
                out = pipe(src, [tgt], edit="replace" if mode == "p2p" else "none", generator=gen(1000 + k), **kw).images
                a, b = to_u8(out[0]), to_u8(out[1])
                da, db = detect(a, bg), detect(b, bg)
                if db:
                    hits += db[0].shape == shape2 if kind == "shape" else db[0].colour == colour2
                if da and db:
                    shifts.append(math.dist(da[0].centroid, db[0].centroid))
                    ious.append(float((da[0].mask & db[0].mask).sum() / max(1, (da[0].mask | db[0].mask).sum())))
            swap[f"{kind}_{mode}"] = {
                "target_rate": hits / n,
                "median_centroid_shift_px": float(np.median(shifts)) if shifts else None,
                "median_mask_iou": float(np.median(ious)) if ious else None,
            }
    result["word_swap"] = swap

    # 3. LocalBlend: background kept outside the object
    psnrs = []
    for k in range(n):
        shape = str(rng.choice(world.SHAPES))
        colour, colour2 = rng.choice(world.COLOUR_NAMES, 2, replace=False)
        bg = _pick(rng, world.COLOUR_NAMES, (colour, colour2))
        out = pipe(f"a big {colour} {shape} on a {bg} background", [f"a big {colour2} {shape} on a {bg} background"],
                   local_blend=LocalBlend([shape], [shape]), generator=gen(2000 + k), **kw).images
        a, b = to_u8(out[0]), to_u8(out[1])
        region = np.zeros(a.shape[:2], bool)
        for d in detect(a, bg) + detect(b, bg):
            region |= d.mask
        psnrs.append(_psnr(a, b, world._erode(~region, 2)))  # outside the objects, 2 px margin
    finite = [p for p in psnrs if np.isfinite(p)]
    result["local_blend"] = {"median_background_psnr_db": float(np.median(finite)) if finite else None, "n": n}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector-only", action="store_true", help="only check the detector on rendered scenes")
    parser.add_argument("--n", type=int, default=300, help="rendered scenes for the detector check")
    parser.add_argument("--model", default=None, help="a diffusers folder (default: the bundled model)")
    parser.add_argument("--samples", type=int, default=16, help="generations per measured figure")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = {"detector": detector_accuracy(args.n)}
    for k, v in result["detector"].items():
        print(f"detector {k:8s} {v:6.1%}")
    if not args.detector_only:
        import torch

        from ..pipeline import Prompt2PromptPipeline

        torch.manual_seed(0)
        pipe = Prompt2PromptPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        result["model"] = evaluate_model(pipe, args.samples, args.steps, args.guidance)
        print(json.dumps(result["model"], indent=1))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
