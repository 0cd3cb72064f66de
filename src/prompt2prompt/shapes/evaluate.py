"""Measure the bundled model in the shapes world, where the truth of every pixel is known.

A detector segments objects against a plain background, and classifies them with the renderer's
own definitions: shape and size by fitting its shapes to the filled silhouette, filled or outlined
(and circle or ring) by comparing the drawn pixels with the renderer's drawing of each variant,
colour as the nearest canonical colour of the un-blended pixels, and stripes or dots by whether
the off-colour pixels follow the renderer's stripe period or dot grid. A component that covers
much of the image border is the background itself, not an object:
when the model paints the background in another colour than the prompt's, nothing is detected (the
scene fails). The detector is checked on rendered scenes first (`detector_accuracy`). For styled
images, whose background is no longer the plain colour, a looser segmentation (`foreground`) is used.
The evaluation then generates with the model and scores (the parts of ``--parts``):

- ``adherence``: plain generation on held-out colour/shape pairs (colour, shape);
- ``adherence_train``: the same on colour/shape pairs seen in training, with the same prompt form,
  which separates undertraining (both low) from a failure to generalise (held-out pairs lower);
- ``swap``: word swap with Prompt-to-Prompt against "same seed, no injection": target shape /
  colour rate, median centroid shift, median mask IoU between source and edit;
- ``blend``: LocalBlend: PSNR between source and edit outside the edited object's region;
- ``two_objects``: two objects and a relation (training pairs): both present, relation correct;
- ``two_objects_held_out``: the same with held-out pairs (the prompts of the issue's two-object goal);
- ``refine``: adding a pattern word (object kept, pattern shown) and a global style (layout kept);
- ``reweight``: attention re-weighting of a pattern or colour word over factors -2..2: Spearman's
  rho between the factor and the measured effect;
- ``sweep``: shape word swaps with cross-attention injected for 0..100% of the steps: structure
  kept (mask IoU) and target-shape rate at each value, against no injection;
- ``reconstruction``: the autoencoder alone (no generation): PSNR of rendered held-out scenes
  through encode (latent mean) and decode, over the whole image, the objects and the background;
  and the detector's accuracy on single-object scenes after that round trip, the ceiling the
  autoencoder sets on every generation figure;
- ``localisation``: whether the cross-attention maps bind the caption's words to the object's
  pixels, on rendered scenes noised to several levels (no generation; `eval_localisation`);
- ``blend_sides``: ``blend``'s prompts and seeds with LocalBlend's mask taken from each side of
  cross-attention map the UNet has, not only the default (a diagnostic; `eval_blend_sides`).

Every part also scores the rendered (ground-truth) scenes of its own prompts where that makes sense
(``rendered``): the ceiling that the detector allows.

    python -m prompt2prompt.shapes.evaluate [--model DIR] [--samples 16] [--steps 30] [--parts a,b] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import world

_MIN_PIXELS = 20
_BG_DISTANCE = 60.0
_MAX_BORDER = 0.1  # a component holding more than this share of the border pixels is background
_PALETTE = np.array([world.COLOURS[c] for c in world.COLOUR_NAMES], np.float32)
_BORDER = np.zeros((world.SIZE, world.SIZE), bool)
_BORDER[0, :] = _BORDER[-1, :] = _BORDER[:, 0] = _BORDER[:, -1] = True
_RING = world.erode(np.ones((world.SIZE, world.SIZE), bool), 2) == 0  # the 2 px border ring

# New parts go at the end: a part's place seeds its prompts and noise (`_part_rng`, `_SEED_OFFSET`).
PARTS = ("adherence", "swap", "blend", "two_objects", "refine", "reweight", "sweep", "adherence_train", "reconstruction",
         "two_objects_held_out", "localisation", "blend_sides")
RECONSTRUCTION_SCENES_PER_SAMPLE = 16  # the autoencoder is cheap to run: 16 scenes per "sample"
REWEIGHT_FACTORS = (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0)
SWEEP_STEPS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_SEED_OFFSET = {part: 1000 * i for i, part in enumerate(PARTS)}  # generator seeds of each part


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


_NEIGHBOURS = {4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
               8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))}


def _components(mask: np.ndarray, connectivity: int = 4) -> list[np.ndarray]:
    """4- or 8-connected components of a boolean image, largest first."""
    steps = _NEIGHBOURS[connectivity]
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
            for dy, dx in steps:
                yy, xx = y + dy, x + dx
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


def _is_background(comp: np.ndarray) -> bool:
    """Whether a component covers so much of the image border that it is the background itself
    (rendered objects always lie at least 1 px inside the image)."""
    return (comp & _BORDER).sum() > _MAX_BORDER * _BORDER.sum()


_GRID_Y, _GRID_X = np.mgrid[0 : world.SIZE, 0 : world.SIZE].astype(np.float32) + 0.5  # pixel centres


def _template(shape: str, cx: float, cy: float, diameter: float, rotation: float, window=np.s_[:, :]) -> np.ndarray:
    """The renderer's filled shape mask at a centre (px, y down), bounding-box side and rotation,
    over the pixels of ``window`` (a 2-d slice of the image; default all)."""
    ys, xs = _GRID_Y[window], _GRID_X[window]
    r = math.radians(rotation)
    c, s = math.cos(r), math.sin(r)
    dx, dy = (xs - cx) / (diameter / 2), (cy - ys) / (diameter / 2)  # normalised, y up
    return world.inside(shape, c * dx + s * dy, -s * dx + c * dy)


_ROTATIONS = tuple(float(r) for r in range(-int(world.MAX_ROTATION), int(world.MAX_ROTATION) + 1))  # 1 degree apart


@dataclass(frozen=True)
class _Fit:
    """A placement of one of the renderer's shapes: centre (px, y down), bounding-box side, rotation."""

    shape: str
    cx: float
    cy: float
    side: float
    rotation: float
    iou: float


@lru_cache(maxsize=None)
def _box_of(shape: str, rotation: float) -> tuple[float, float, float]:
    """The bounding box of ``shape`` rotated by ``rotation`` degrees, in the normalised units of
    `world.inside` (y up): its centre's offset from the rotation centre and its half-side."""
    t = np.linspace(-1.3, 1.3, 521, dtype=np.float32)
    u, v = np.meshgrid(t, t)
    inside = world.inside(shape, u, v)
    r = math.radians(rotation)
    c, s = math.cos(r), math.sin(r)
    X, Y = (c * u - s * v)[inside], (s * u + c * v)[inside]  # the rotation _template undoes
    return float(X.max() + X.min()) / 2, float(Y.max() + Y.min()) / 2, float(max(X.max() - X.min(), Y.max() - Y.min())) / 2


def _fit_filled(filled: np.ndarray) -> _Fit:
    """Best-IoU placement of the renderer's filled shapes (`world.inside`) on a filled mask.

    A coarse search over the shapes and the renderer's rotations (at most 15 degrees either way),
    each template sized and placed so that its own rotated bounding box matches the mask's (a
    rotated triangle's centre is far from its box's), then for the best one a finer search over the
    centre (+-0.5 px), rotation (+-2.5 degrees) and side (+-3%). A ring's filled mask is a disc, so
    rings are fitted as circles and told apart later by their drawn pixels (`_drawn_variant`).
    """
    ys, xs = np.nonzero(filled)
    bx, by = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2  # box centre, px, y down
    box = float(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
    # a window that holds the mask and every template tried: IoUs over the whole image
    h = int(math.ceil(0.75 * box)) + 3
    window = np.s_[max(0, int(by) - h) : int(by) + h + 1, max(0, int(bx) - h) : int(bx) + h + 1]
    sub = filled[window]

    def fit(shape, x, y, d, rot) -> _Fit:
        t = _template(shape, x, y, d, rot, window)
        return _Fit(shape, x, y, d, rot, float((t & sub).sum() / max(1, (t | sub).sum())))

    def placed(shape, rot) -> _Fit:
        ox, oy, half = _box_of(shape, float(rot))
        d = box / half  # the box spans 2 half normalised units of d / 2 px
        return fit(shape, bx - ox * d / 2, by + oy * d / 2, d, rot)

    coarse = max((placed(shape, rot) for shape in world.SHAPES if shape != "ring"
                  for rot in _ROTATIONS[::5]), key=lambda f: f.iou)
    rotations = sorted({min(world.MAX_ROTATION, max(-world.MAX_ROTATION, coarse.rotation + dr)) for dr in (-2.5, 0.0, 2.5)})
    return max((fit(coarse.shape, coarse.cx + dx, coarse.cy + dy, coarse.side * k, rot) for dx in (-0.5, 0.0, 0.5)
                for dy in (-0.5, 0.0, 0.5) for rot in rotations for k in (0.97, 1.0, 1.03)), key=lambda f: f.iou)


def _drawn_variant(drawn: np.ndarray, fit: _Fit, size: str) -> tuple[str, bool]:
    """Whether the drawn pixels are the fitted shape filled or outlined, and for a disc whether it
    is a circle or a ring: the variant whose drawn pixels, as the renderer draws them
    (`world.object_masks`) near the fitted place (centre +-0.5 px, side +-3%: a 1 px line needs
    that precision), have the largest IoU with ``drawn``. Returns (shape, outlined)."""
    def iou(shape, pattern, dx=0.0, dy=0.0, k=1.0) -> float:
        spec = world.ObjectSpec(shape, "gray", size, pattern, (fit.cx + dx, fit.cy + dy), fit.side * k, fit.rotation)
        mask = world.object_masks(spec)[0]
        return float((mask & drawn).sum() / max(1, (mask | drawn).sum()))

    variants = [(shape, pattern) for shape in (("circle", "ring") if fit.shape == "circle" else (fit.shape,))
                for pattern in (None, "outlined")]
    scores = sorted(((iou(*v), v) for v in variants), key=lambda sv: -sv[0])  # ties: the listed order
    if scores[0][0] - scores[1][0] < 0.15:  # close at the fitted place: compare each at its best placement
        steps = [(dx, dy, k) for dx in (-0.5, 0.0, 0.5) for dy in (-0.5, 0.0, 0.5) for k in (0.97, 1.0, 1.03)]
        scores = sorted(((max(iou(*v, *step) for step in steps), v) for v in variants), key=lambda sv: -sv[0])
    shape, pattern = scores[0][1]
    return shape, pattern == "outlined"


def _nearest_palette(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest canonical colour of each ``(k, 3)`` pixel and the RGB distance to it."""
    d2 = ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1)  # (pixels, colours)
    idx = np.argmin(d2, axis=1)
    return idx, np.sqrt(d2[np.arange(len(idx)), idx])


def _palette_counts(pixels: np.ndarray) -> np.ndarray:
    """How many of the ``(k, 3)`` pixels lie nearest to each canonical colour (``world.COLOUR_NAMES`` order)."""
    return np.bincount(_nearest_palette(pixels)[0], minlength=len(_PALETTE))


def _core_pixels(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` eroded by 1 px (all of them if the erosion leaves fewer than 8)."""
    core = world.erode(mask, 1)
    return img[core if core.sum() >= 8 else mask]


def pattern_strength(image: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of off-colour pixels inside ``mask`` (eroded by 1 px): those whose nearest canonical
    colour is not the most common one there. 0 for a plain object; stripes give about a half, dots
    less, an outline's background-coloured interior (with the filled mask) a lot. The detector's
    own pattern cue; NaN for an empty mask."""
    if not mask.any():
        return float("nan")
    counts = _palette_counts(_core_pixels(image.astype(np.float32), mask))
    return float(1.0 - counts.max() / counts.sum())


def colour_strength(image: np.ndarray, mask: np.ndarray, colour: str) -> float:
    """How close the pixels inside ``mask`` are to the canonical ``colour``: 1 minus their mean RGB
    distance to it over the largest possible distance (1 = exactly the colour); NaN for an empty mask."""
    if not mask.any():
        return float("nan")
    pixels = image.astype(np.float32)[mask]
    dist = np.sqrt(((pixels - np.array(world.COLOURS[colour], np.float32)) ** 2).sum(-1))
    return float(1.0 - dist.mean() / (255.0 * math.sqrt(3)))


_PURE = 20.0  # a pixel within this RGB distance of a canonical colour is un-blended (render jitter: <= 8 a channel)
_PATTERN_COLOURS = (world.COLOUR_NAMES.index("white"), world.COLOUR_NAMES.index("black"))  # stripes and dots
_STRIPE_PERIOD = 2 * world.STRIPE_WIDTH  # px across: a stripe of the object's colour, then one of the pattern's


def stripe_phase(ys: np.ndarray, xs: np.ndarray, cx: float, cy: float, rotation: float) -> complex:
    """Mean of ``exp(2 pi i t / 5)`` over pixels, ``t`` their signed distance (px) from the centre
    ``(cx, cy)`` across the renderer's stripes of an object rotated by ``rotation`` degrees:
    ``t = ((cos r - sin r) X + (cos r + sin r) Y) / sqrt 2`` with ``X, Y`` the offset from the centre
    (y up), so that the object's own colour lies where ``t mod 5 < 2.5`` (`world._draw_object`,
    stripes ``world.STRIPE_WIDTH`` wide).
    Its modulus is near 1 for pixels of one stripe colour and near 0 for pixels spread evenly across
    the stripes (dots, a plain object); its angle is near +90 degrees for the object's stripes and
    -90 degrees for the pattern's."""
    r = math.radians(rotation)
    c, s = math.cos(r), math.sin(r)
    X, Y = xs + 0.5 - cx, cy - (ys + 0.5)  # pixel centres, y up
    t = ((c - s) * X + (c + s) * Y) / math.sqrt(2.0)
    return complex(np.exp(2j * math.pi * t / _STRIPE_PERIOD).mean()) if len(t) else 0j


def stripe_fit(ys: np.ndarray, xs: np.ndarray) -> tuple[float, float]:
    """How stripe-like a set of pixels is: the largest ``|stripe_phase|`` over the renderer's
    rotations (-15..15 degrees, 1 degree apart), and that rotation. The modulus does not depend on
    where the stripes start, so no centre is needed. Returns (strength, rotation)."""
    return max((abs(stripe_phase(ys, xs, 0.0, 0.0, rot)), rot) for rot in _ROTATIONS)


def dot_strength(ys: np.ndarray, xs: np.ndarray) -> float:
    """How much a set of pixels looks like the renderer's dots, which sit on a square grid of
    ``p = world.DOT_SPACING`` (6 px) in the object's frame: over the rotations -15..15 degrees, the
    largest ``min(|mean exp(2 pi i u / p)|, |mean exp(2 pi i v / p)|)`` with ``(u, v)`` the pixels'
    centres rotated into that frame. Near 1 for dots, low for stripes (periodic across one axis only) and
    for scattered pixels; independent of where the grid starts. 0 for no pixels."""
    if not len(ys):
        return 0.0
    X, Y = xs + 0.5, -(ys + 0.5)  # pixel centres, y up (the origin does not matter)
    best = 0.0
    for rot in _ROTATIONS:
        r = math.radians(rot)
        c, s = math.cos(r), math.sin(r)
        u, v = c * X + s * Y, -s * X + c * Y
        p = world.DOT_SPACING
        best = max(best, min(abs(np.exp(2j * math.pi * u / p).mean()), abs(np.exp(2j * math.pi * v / p).mean())))
    return float(best)


def _object_colour(pixels: np.ndarray, ys: np.ndarray, xs: np.ndarray, fit: _Fit) -> tuple[str, np.ndarray]:
    """The object's canonical colour from its ``(k, 3)`` pixels at ``(ys, xs)``, and which of the
    pixels are pure pixels of another colour (its pattern) ((k,) bool).

    Counted over the pure pixels (within ``_PURE`` of a canonical colour) when there are enough of
    them, so that the blends along edges and stripes do not vote. Stripes and dots are drawn in
    near-white or near-black, so a white or black majority yields to another colour holding 20% of
    the pixels. An object that is white and black in large parts (a white object striped or dotted
    in black or the reverse, with gray blends between) is, for stripes, the colour of the renderer's
    stripes on the positive side of its centre (`stripe_phase`), for dots the larger part.
    """
    idx, dist = _nearest_palette(pixels)
    pure = dist <= _PURE
    use = pure if pure.sum() >= max(8, 0.25 * len(idx)) else np.ones(len(idx), bool)
    counts = np.bincount(idx[use], minlength=len(_PALETTE))
    total = counts.sum()
    white, black = _PATTERN_COLOURS
    if counts[white] >= 0.15 * total and counts[black] >= 0.15 * total:
        w, b = use & (idx == white), use & (idx == black)
        choice = white if counts[white] >= counts[black] else black
        minor = b if choice == white else w
        strength, rot = stripe_fit(ys[minor], xs[minor])
        if strength > dot_strength(ys[minor], xs[minor]):  # stripes: the object's own are at +90 degrees
            z = stripe_phase(ys[w], xs[w], fit.cx, fit.cy, rot) - stripe_phase(ys[b], xs[b], fit.cx, fit.cy, rot)
            choice = white if z.imag > 0 else black
    else:
        choice = int(np.argmax(counts))
        if choice in _PATTERN_COLOURS:
            others = counts.copy()
            others[list(_PATTERN_COLOURS)] = -1
            if others.max() >= 0.2 * total:
                choice = int(np.argmax(others))
    return world.COLOUR_NAMES[choice], use & (idx != choice)


def _closing(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary closing (`_dilate` then `world.erode`, ``k`` times each), never removing a pixel."""
    return world.erode(_dilate(mask, k), k) | mask


def _silhouette(drawn: np.ndarray) -> np.ndarray:
    """The filled shape of a component: holes filled after closing 1 px gaps, plus the interior of
    a thin outline whose anti-aliased line has gaps of up to 3 px (the holes of a 2 px closing; the
    wider closing itself is not kept, as it would also fill a star's or a cross's inner corners)."""
    closed = _closing(drawn, 2)
    return _fill_holes(_closing(drawn, 1)) | (_fill_holes(closed) & ~closed)


def detect(image: np.ndarray, background: str) -> list[Detection]:
    """Objects in a ``(64, 64, 3)`` uint8 image on the plain background colour ``background``.

    Pixels farther than ``_BG_DISTANCE`` from the background's canonical colour are foreground; a
    component that holds more than ``_MAX_BORDER`` of the border pixels is the background painted in
    another colour and is skipped with everything connected to it. A component inside another's
    outline (the inner circle of an outlined ring) belongs to it. Each object's filled silhouette
    (holes filled after closing 1 px gaps) is fitted with the renderer's shapes (`_fit_filled`);
    filled or outlined, circle or ring is the drawn variant that matches best (`_drawn_variant`);
    colour is `_object_colour`; a filled object is striped or dotted when enough of its pixels are
    off its colour, striped when those lie in the renderer's stripes (`stripe_fit`)."""
    img = image.astype(np.float32)
    bg = np.array(world.COLOURS[background], np.float32)
    far = np.sqrt(((img - bg) ** 2).sum(-1))  # (64, 64) distance from the background colour
    fg = far > _BG_DISTANCE
    objects: list[list[np.ndarray]] = []  # [drawn, filled] of each object
    for comp in _components(fg, 8):  # 8-connected: a thin anti-aliased outline may touch only diagonally
        if _is_background(comp):
            continue
        owner = next((o for o in objects if (comp & ~o[1]).sum() == 0), None)
        if owner is not None:
            owner[0] = owner[0] | comp
        elif comp.sum() >= _MIN_PIXELS:
            objects.append([comp, _silhouette(comp)])
    out = []
    for drawn, filled in objects:
        fit = _fit_filled(filled)
        size = "big" if fit.side >= 23 else "small"
        shape, outlined = _drawn_variant(drawn, fit, size)
        if outlined:  # a thin line: its pixels farthest from the background are the least blended
            where = drawn & (far >= 0.75 * far[drawn].max())
        else:  # the edge's blends left out
            where = world.erode(drawn, 1)
        if where.sum() < 8:
            where = drawn
        ys, xs = np.nonzero(where)
        colour, other = _object_colour(img[ys, xs], ys, xs, fit)
        pattern = "outlined" if outlined else None
        if not outlined and other.mean() > 0.05:
            stripes, dots = stripe_fit(ys[other], xs[other])[0], dot_strength(ys[other], xs[other])
            if other.mean() > 0.1 or max(stripes, dots) > 0.3:  # a few off pixels must form stripes or dots
                pattern = "striped" if stripes > dots else "dotted"
        ys, xs = np.nonzero(drawn)
        out.append(Detection(colour, shape, size, pattern, drawn, (float(xs.mean()), float(ys.mean())), fit.side))
    return out


def detector_accuracy(n: int = 300, seed: int = 0, transform=None, size: str | None = None,
                      plain: bool = False) -> dict[str, float]:
    """Detector correctness on ``n`` rendered single-object, plain-background, unstyled scenes
    (attributes drawn at random, one in five outlined, striped or dotted, two in five plain).

    Returns the fraction correct of each attribute over the ``n`` scenes (``found``: an object was
    detected at all). ``pattern`` counts over the scenes whose pattern the image shows
    (`world.pattern_visible`; a striped or dotted black object on white or white object on black is
    drawn in its own colour); ``pattern_all`` over every scene, and ``pattern_invisible`` is the
    share of scenes left out of ``pattern``.

    Args:
        transform: applied to the rendered images, a ``(n, h, w, 3)`` uint8 array, before detection
            (e.g. an autoencoder's round trip, `eval_reconstruction`); ``None`` scores the renders.
        size: draw every object ``"big"`` or ``"small"``; ``None`` draws either.
        plain: draw every object without a pattern (as the evaluation's adherence and word-swap
            prompts ask). The other attributes are the same scenes' whatever ``size`` and ``plain``."""
    if size not in (None, *world.SIZES):
        raise ValueError(f"size must be None or one of {world.SIZES}, got {size!r}")
    rng = np.random.default_rng(seed)
    truth, specs = [], []
    for k in range(n):
        shape = world.SHAPES[rng.integers(len(world.SHAPES))]
        colour, bg = (str(c) for c in rng.choice(world.COLOUR_NAMES, 2, replace=False))
        drawn_size = ("small", "big")[rng.integers(2)]
        pattern = [None, None, "striped", "dotted", "outlined"][rng.integers(5)]
        obj = dict(shape=shape, colour=colour, size=size or drawn_size, pattern=None if plain else pattern)
        specs.append(world.make_spec([obj], bg, seed=k + 100000 * seed))
        truth.append(obj)
    images = np.stack([world.render(spec).image for spec in specs])  # (n, h, w, 3) uint8
    if transform is not None:
        images = transform(images)
    hits = {"colour": 0, "shape": 0, "size": 0, "pattern": 0, "found": 0, "pattern_all": 0}
    invisible = 0
    for obj, spec, image in zip(truth, specs, images):
        visible = obj["pattern"] in (None, "outlined") or world.pattern_visible(obj["colour"], spec.background)
        invisible += not visible
        found = detect(image, spec.background.name)
        if not found:
            continue
        d = found[0]
        hits["found"] += 1
        hits["colour"] += d.colour == obj["colour"]
        hits["shape"] += d.shape == obj["shape"]
        hits["size"] += d.size == obj["size"]
        hits["pattern_all"] += d.pattern == obj["pattern"]
        hits["pattern"] += visible and d.pattern == obj["pattern"]
    out = {k: v / n for k, v in hits.items()}
    out["pattern"] = hits["pattern"] / max(1, n - invisible)
    out["pattern_invisible"] = invisible / n
    return out


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over ``(2 radius + 1)^2`` neighbourhoods (edges repeated), float32."""
    r = radius
    p = np.pad(image.astype(np.float32), ((r, r), (r, r), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    out = np.zeros((h, w, image.shape[2]), np.float32)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += p[dy : dy + h, dx : dx + w]
    return out / (2 * r + 1) ** 2


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation by a 4-neighbourhood, ``k`` times (nothing enters from outside the image)."""
    for _ in range(k):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The pixels whose centres lie in the convex hull of the centres of ``mask``'s pixels."""
    ys, xs = np.nonzero(mask)
    pts = sorted(set(zip(xs.tolist(), ys.tolist())))
    if len(pts) < 3:
        return mask.copy()

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []  # Andrew's monotone chain
    for pt in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], pt) <= 0:
            lower.pop()
        lower.append(pt)
    for pt in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], pt) <= 0:
            upper.pop()
        upper.append(pt)
    poly = lower[:-1] + upper[:-1]
    if len(poly) < 3:  # collinear
        return mask.copy()
    inside = np.ones(mask.shape, bool)
    gy, gx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
        inside &= (x1 - x0) * (gy - y0) - (y1 - y0) * (gx - x0) >= 0
    return inside


def foreground(image: np.ndarray, radius: int = 1, threshold: float = 40.0, join: int = 3) -> np.ndarray:
    """The layout region of the main object of a styled image (pencil sketch, pixel art), whose
    background is no longer the plain colour, by a deliberately looser segmentation than `detect`:
    blur by a ``radius`` box (hatching and pixel noise average out), take the median colour of the
    2 px border ring as the background, keep pixels farther from it than ``threshold``; fragments
    within ``2 join`` px of each other count as one object (a sketch's outline has gaps); the largest
    such object that is not the background is returned as its convex hull, eroded by ``radius`` to
    undo the blur's growth ((64, 64) bool; empty if nothing stands out). Compare it with the
    `convex_hull` of a `detect` mask. On rendered big objects the median IoU of the two is about
    0.95 unstyled, 0.88 pencil sketch and 0.87 pixel art (the ceiling of this measure)."""
    s = _box_blur(image, radius)
    ref = np.median(s[_RING], axis=0)
    fg = np.sqrt(((s - ref) ** 2).sum(-1)) > threshold
    for group in _components(_dilate(fg, join)):
        obj = fg & group
        if not _is_background(world.erode(obj, radius)):
            return world.erode(convex_hull(obj), radius)
    return np.zeros(s.shape[:2], bool)


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equally long sequences (ties get their average rank); NaN
    when either is constant, shorter than 2 or holds a NaN."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"two 1-d sequences of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2 or np.isnan(x).any() or np.isnan(y).any():
        return float("nan")

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v), np.float64)
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # average the ranks of ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """Whether object A at centroid ``a`` is ``relation`` object B at ``b`` (``(x, y)`` px, y down):
    the displacement's dominant axis and direction must agree ("next to": horizontal, either side)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    horizontal = abs(dx) > abs(dy)
    if relation == "next to":
        return horizontal
    if relation == "left of":
        return horizontal and dx > 0
    if relation == "right of":
        return horizontal and dx < 0
    if relation == "above":
        return not horizontal and dy > 0
    if relation == "below":
        return not horizontal and dy < 0
    raise ValueError(f"unknown relation {relation!r}")


#: The PSNR of pixels that did not change at all: a finite ceiling, so that a median counts a
#: perfect sample (an untouched background) among the best instead of dropping it as infinite.
PSNR_CEILING_DB = 100.0


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR of ``a`` against ``b`` over the pixels ``where``: NaN (not scored) when there are none,
    `PSNR_CEILING_DB` when they are identical."""
    if not where.any():
        return float("nan")
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2)[where].mean()
    return PSNR_CEILING_DB if mse == 0 else min(PSNR_CEILING_DB, float(10 * np.log10(255.0**2 / mse)))


def _grow(m: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation of ``m`` by ``k`` steps of the 4-neighbourhood (nothing grows in from outside the image)."""
    for _ in range(k):
        p = np.pad(m, 1)  # (h+2, w+2)
        m = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return m


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _kept_iou(source: list[Detection], edit: list[Detection], filled: bool = False) -> float | None:
    """IoU of the largest objects' masks (silhouettes if ``filled``): None when the source has no
    object (the sample is not scored), 0 when the edit lost it."""
    if not source:
        return None
    if not edit:
        return 0.0
    m = (lambda d: _fill_holes(d.mask)) if filled else (lambda d: d.mask)
    return _iou(m(source[0]), m(edit[0]))


def _median(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else None


def _pick(rng, options, exclude=()):
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


class _Generator:
    """Runs the pipeline for one sample: the generator seed is ``seed * 100003 + offset + k`` (so a
    part draws the same noise whether it runs alone or with the others); returns uint8 images."""

    def __init__(self, pipe, steps: int, guidance: float, seed: int):
        self.pipe, self.steps, self.guidance, self.seed = pipe, steps, guidance, seed

    def __call__(self, part: str, k: int, prompt: str, targets=None, **kwargs) -> list[np.ndarray]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 100_003 + _SEED_OFFSET[part] + k)
        out = self.pipe(prompt, targets, generator=g, num_inference_steps=self.steps, guidance_scale=self.guidance,
                        output_type="np", return_attention=False, **kwargs)
        return [(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for x in out.images]


def _part_rng(part: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, PARTS.index(part)])


def border_colour(image: np.ndarray) -> str:
    """The canonical colour nearest to the median of the image's 2 px border ring (the background)."""
    median = np.median(image[_RING].astype(np.float32), axis=0)
    return world.COLOUR_NAMES[int(np.argmin(((_PALETTE - median) ** 2).sum(-1)))]


def eval_adherence(gen: _Generator, n: int, seed: int = 0, part: str = "adherence") -> dict:
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


def eval_adherence_train(gen: _Generator, n: int, seed: int = 0) -> dict:
    """`eval_adherence` on colour/shape pairs seen in training (a random order of all of them)."""
    return eval_adherence(gen, n, seed, part="adherence_train")


def eval_word_swap(gen: _Generator, n: int, seed: int = 0) -> dict:
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
                "median_centroid_shift_px": _median(shifts),
                "median_mask_iou": _median(ious),
                "n_scored": sum(i is not None for i in ious),
            }
    return swap


def eval_local_blend(gen: _Generator, n: int, seed: int = 0, resolution: int | None = None) -> dict:
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
        psnrs.append(_psnr(a, b, ~_grow(region, 2)))  # outside the objects and a 2 px margin (the image's edge counts)
    scored = [p for p in psnrs if np.isfinite(p)]
    return {"median_background_psnr_db": _median(scored), "target_rate": hits / n, "n": n, "n_scored": len(scored)}


def eval_blend_sides(gen: _Generator, n: int, seed: int = 0) -> dict:
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


def eval_two_objects(gen: _Generator, n: int, seed: int = 0, split: str = "train") -> dict:
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


def eval_two_objects_held_out(gen: _Generator, n: int, seed: int = 0) -> dict:
    """`eval_two_objects` on held-out (colour, shape) pairs: the prompts the issue's two-object goal names."""
    return eval_two_objects(gen, n, seed, split="held_out")


def _colourfulness(image: np.ndarray) -> float:
    """Mean over pixels of the spread between the largest and smallest channel (0 for gray)."""
    img = image.astype(np.float32)
    return float((img.max(-1) - img.min(-1)).mean())


def eval_refine(gen: _Generator, n: int, seed: int = 0) -> dict:
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
    pat = {m: {"ious": [], "hits": 0, "src_hits": 0, "per": {p: [0, 0] for p in world.PATTERNS}, "strength": ([], [])}
           for m in ("p2p", "none")}
    pat_rendered = {"hits": 0}
    sty = {m: {s: {"ious": [], "colourful": [], "change": []} for s in world.STYLES} for m in ("p2p", "none")}
    sty_rendered = {s: [] for s in world.STYLES}
    for k in range(n):
        pattern = world.PATTERNS[k % len(world.PATTERNS)]
        shape = _pick(rng, world.SHAPES)
        colour = _pick(rng, world.COLOUR_NAMES)
        bg = _pick(rng, world.COLOUR_NAMES, (colour,))
        obj = dict(shape=shape, colour=colour, size="big")
        src, tgt = _caption([obj], bg), _caption([dict(obj, pattern=pattern)], bg)
        truth = detect(world.render(world.make_spec([dict(obj, pattern=pattern)], bg, seed=k)).image, bg)
        pat_rendered["hits"] += bool(truth) and truth[0].pattern == pattern
        for mode in ("p2p", "none"):
            a, b = gen("refine", k, src, [tgt], edit="refine" if mode == "p2p" else "none")
            da, db = detect(a, bg), detect(b, bg)
            r = pat[mode]
            r["ious"].append(_kept_iou(da, db, filled=True))
            hit = bool(db) and db[0].pattern == pattern
            r["hits"] += hit
            r["src_hits"] += bool(da) and da[0].pattern == pattern
            r["per"][pattern][0] += hit
            r["per"][pattern][1] += 1
            if da:
                silhouette = _fill_holes(da[0].mask)
                r["strength"][0].append(pattern_strength(a, silhouette))
                r["strength"][1].append(pattern_strength(b, silhouette))
        styled = [_caption([obj], bg, style=s) for s in world.STYLES]
        plain_truth = detect(world.render(world.make_spec([obj], bg, seed=n + k)).image, bg)
        for s in world.STYLES:
            fg = foreground(world.render(world.make_spec([obj], bg, style=s, seed=n + k)).image)
            sty_rendered[s].append(_iou(convex_hull(plain_truth[0].mask), fg) if plain_truth else None)
        for mode in ("p2p", "none"):
            images = gen("refine", n + k, src, styled, edit="refine" if mode == "p2p" else "none")
            da = detect(images[0], bg)
            for s, img in zip(world.STYLES, images[1:]):
                r = sty[mode][s]
                r["ious"].append(_iou(convex_hull(da[0].mask), foreground(img)) if da else None)
                r["colourful"].append(_colourfulness(img))
                r["change"].append(float(np.abs(img.astype(np.float32) - images[0].astype(np.float32)).mean()))
    out = {"pattern": {}, "style": {}}
    for mode, r in pat.items():
        out["pattern"][mode] = {
            "object_kept_median_iou": _median(r["ious"]), "n_scored": sum(i is not None for i in r["ious"]),
            "pattern_rate": r["hits"] / n, "pattern_rate_in_source": r["src_hits"] / n,
            "pattern_rate_by_pattern": {p: h / t if t else None for p, (h, t) in r["per"].items()},
            "median_strength_source": _median(r["strength"][0]), "median_strength_edit": _median(r["strength"][1]),
        }
    out["pattern"]["rendered"] = {"pattern_rate": pat_rendered["hits"] / n}
    for mode, per_style in sty.items():
        out["style"][mode] = {s: {"layout_kept_median_iou": _median(r["ious"]), "n_scored": sum(i is not None for i in r["ious"]),
                                  "median_colourfulness": _median(r["colourful"]), "median_abs_change": _median(r["change"])}
                              for s, r in per_style.items()}
    out["style"]["rendered"] = {s: {"layout_kept_median_iou": _median(v)} for s, v in sty_rendered.items()}
    out["n"] = n
    return out


def _rho_summary(factors, rhos: list[float], curves: list[list[float]]) -> dict:
    """Median / mean of the finite rhos, how many were scored or undefined, the median effect per
    factor, and how large the effect is: per sample the effect at the largest factor minus that at
    the smallest (``median_effect_change``, signed) and the curve's max minus min
    (``median_effect_range``). A rho of +-1 says only that a curve is monotonic; these say whether
    the weight changes the image by more than rounding."""
    finite = [r for r in rhos if np.isfinite(r)]
    whole = [c for c in curves if np.all(np.isfinite(c))]
    return {"median_rho": _median(finite), "mean_rho": float(np.mean(finite)) if finite else None,
            "n_scored": len(finite), "n_undefined": len(rhos) - len(finite),
            "median_effect_by_factor": {str(f): _median([c[i] for c in curves]) for i, f in enumerate(factors)},
            "median_effect_change": _median([float(c[-1] - c[0]) for c in whole]),
            "median_effect_range": _median([float(np.max(c) - np.min(c)) for c in whole])}


def eval_reweight(gen: _Generator, n: int, seed: int = 0, factors=REWEIGHT_FACTORS) -> dict:
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
            mask = _fill_holes(da[0].mask)
            if word_kind == "pattern":
                effect = [pattern_strength(img, mask) for img in images[1:]]
            else:
                effect = [colour_strength(img, mask, colour) for img in images[1:]]
            curves.append(effect)
            rhos.append(spearman(factors, effect))
        out[word_kind] = _rho_summary(factors, rhos, curves)
        out[word_kind]["effect"] = "pattern_strength" if word_kind == "pattern" else "colour_strength"
        if word_kind == "colour":
            out[word_kind]["image_wide"] = _rho_summary(factors, wide_rhos, wide_curves)
    out["factors"] = list(factors)
    out["n"] = n
    return out


def eval_sweep(gen: _Generator, n: int, seed: int = 0, steps=SWEEP_STEPS) -> dict:
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
        out[name] = {"median_mask_iou": _median(ious), "target_rate": hits / n, "source_shape_kept": kept / n,
                     "n_scored": sum(i is not None for i in ious)}
    return {"cross_replace_steps": out, "self_replace_steps": 0.4, "n": n}


def autoencoder_round_trip(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """``images`` (``(n, h, w, 3)`` uint8) encoded to their latent means, the latents the UNet is
    trained on, and decoded back to uint8: what the autoencoder alone keeps of a scene."""
    import torch

    from .train import images_to_tensor

    param = next(vae.parameters())
    out = np.empty_like(images)
    for i in range(0, len(images), batch):
        x = images_to_tensor(images[i:i + batch]).to(param.device, param.dtype)  # (b, 3, h, w) in [-1, 1]
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample  # (b, 3, h, w) in [-1, 1]
        rec = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)  # (b, h, w, 3)
        out[i:i + batch] = rec.cpu().numpy().astype(np.uint8)
    return out


def eval_reconstruction(gen: _Generator, n: int, seed: int = 0) -> dict:
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
    first = 50_000_000 + seed * 100_003 + _SEED_OFFSET["reconstruction"] * RECONSTRUCTION_SCENES_PER_SAMPLE
    scenes = [world.sample_scene(first + k, "heldout") for k in range(RECONSTRUCTION_SCENES_PER_SAMPLE * n)]
    images = np.stack([sc.image for sc in scenes])  # (scenes, h, w, 3) uint8
    out = autoencoder_round_trip(vae, images)
    whole, objects, background = [], [], []
    for sc, a, b in zip(scenes, images, out):
        drawn = sc.masks.any(0)  # (h, w)
        whole.append(_psnr(a, b, np.ones_like(drawn)))
        objects.append(_psnr(a, b, _grow(drawn, 1)))
        background.append(_psnr(a, b, ~_grow(drawn, 2)))
    result = {"median_psnr_db": _median(whole), "median_object_psnr_db": _median(objects),
              "median_background_psnr_db": _median(background), "n": len(scenes), "split": "heldout"}
    round_trip = lambda x: autoencoder_round_trip(vae, x)  # noqa: E731
    for key, size, plain in (("detector_big_plain", "big", True), ("detector_big", "big", False), ("detector_small", "small", False)):
        result[key] = detector_accuracy(len(scenes), seed, round_trip, size, plain)
    return result


LOCALISATION_TIMESTEPS = (0.25, 0.5, 0.75)  # noise levels, as fractions of the training timesteps
LOCALISATION_ROLES = ("shape", "colour", "background_colour", "background")


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
    states = pipe._encode([tokens.ids], param.device, param.dtype)  # (1, tokens, dim)
    hw = tuple(latents.shape[-2:])
    ctrl = P2PController(None, 1, False, hw, record_sides=attention_sides(unet, hw))
    with torch.no_grad(), p2p_attention(unet, ctrl):
        unet(latents.to(param.device, param.dtype), timestep, encoder_hidden_states=states, cross_attention_kwargs={"p2p_step": 0})
    return tokens, {side: (m[0] / ctrl.layer_calls[side]).cpu() for side, m in ctrl.maps.items()}


def _cell_coverage(mask: np.ndarray, side: int) -> np.ndarray:
    """The share of each cell of a ``side x side`` grid that ``mask`` (64x64 bool) covers."""
    f = mask.shape[0] // side
    return mask.reshape(side, f, side, f).mean((1, 3))  # (side, side)


_SHARE_KEYS = tuple(r + "_share" for r in LOCALISATION_ROLES)


def eval_localisation(gen: _Generator, n: int, seed: int = 0) -> dict:
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

    from .train import images_to_tensor

    pipe = gen.pipe
    vae, scheduler = pipe.vae, pipe.scheduler
    rng = _part_rng("localisation", seed)
    g = torch.Generator().manual_seed(seed * 100_003 + _SEED_OFFSET["localisation"])
    param = next(vae.parameters())
    ratios: dict[int, dict[str, list[float]]] = {}
    word_share: dict[int, list[float]] = {}
    padding_share: dict[int, list[float]] = {}
    for k in range(n):
        colour, shape = world.TRAIN_PAIRS[int(rng.integers(len(world.TRAIN_PAIRS)))]
        bg = _pick(rng, world.COLOUR_NAMES, (colour,))
        spec = world.make_spec([dict(shape=shape, colour=colour, size="big")], bg, seed=k)
        scene = world.render(spec)
        with torch.no_grad():
            x = images_to_tensor(scene.image[None]).to(param.device, param.dtype)  # (1, 3, h, w) in [-1, 1]
            latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor  # (1, channels, h/f, w/f)
        for frac in LOCALISATION_TIMESTEPS:
            t = int(frac * scheduler.config.num_train_timesteps)
            noise = torch.randn(latent.shape, generator=g).to(latent.device, latent.dtype)
            noisy = scheduler.add_noise(latent, noise, torch.tensor([t]))
            tokens, maps = cross_attention_of(pipe, noisy, t, spec.caption)
            words = {"shape": shape, "colour": colour, "background_colour": bg, "background": "background"}
            word_tokens = sorted({p for w in tokens.words for p in tokens.positions(w)})
            for side, m in maps.items():
                if world.SIZE % side:
                    continue
                cover = _cell_coverage(scene.filled[0], side)
                inside, outside = torch.from_numpy(cover >= 0.75), torch.from_numpy(cover == 0)
                if not inside.any() or not outside.any():
                    continue
                per = ratios.setdefault(side, {r: [] for r in LOCALISATION_ROLES + ("binding",) + _SHARE_KEYS})
                for role, word in words.items():
                    wm = m[..., tokens.positions(word)].sum(-1)  # (h, w)
                    per[role].append(float(wm[inside].mean() / wm[outside].mean()))
                    per[role + "_share"].append(float(wm[inside if role in ("shape", "colour") else outside].mean()))
                # the object's words against the background's: what all words share drops out
                per["binding"].append(math.sqrt(per["shape"][-1] * per["colour"][-1] / (per["background_colour"][-1] * per["background"][-1])))
                word_share.setdefault(side, []).append(float(m[..., word_tokens].sum(-1).median()))
                padding_share.setdefault(side, []).append(float(m[..., tokens.num_tokens :].sum(-1).median()))
    return {"sides": {str(side): {**{f"{r}_inside_outside": _median(per[r]) for r in LOCALISATION_ROLES},
                                  **{f"{r}_share_own": _median(per[r + "_share"]) for r in LOCALISATION_ROLES},
                                  "binding_contrast": _median(per["binding"]),
                                  "word_share": _median(word_share[side]), "padding_share": _median(padding_share[side]),
                                  "n_scored": len(per["shape"])}
                      for side, per in sorted(ratios.items(), reverse=True)},
            "n": n, "timesteps": list(LOCALISATION_TIMESTEPS)}


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
    gen = _Generator(pipe, steps, guidance, seed)
    result = {}
    for part in PARTS:
        if part in parts:
            result[_RESULT_KEY[part]] = _EVALS[part](gen, n, seed)
    result["settings"] = {"samples": n, "steps": steps, "guidance": guidance, "seed": seed}
    return result


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (Wilson, 1927) of a rate ``successes / n``: the range of true rates
    that the observation does not reject at the level of ``z`` (1.96: 95%). With 16 samples a rate
    is uncertain by up to +/- 22 points, with 32 by up to +/- 16, which the evaluation tables show."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _fmt(v, pct: bool, n: int | None = None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if pct and n:
        lo, hi = wilson_interval(v * n, n)
        return f"{v:.1%} [{lo:.0%}-{hi:.0%}]"
    return f"{v:.1%}" if pct else f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_rows(model: dict) -> list[tuple[str, str, str]]:
    """(figure, value, goal) rows of an `evaluate_model` result, for the printed table. A rate over
    the part's samples carries its 95% Wilson interval in brackets."""
    rows = []
    samples = model.get("settings", {}).get("samples")

    def add(name, v, pct=False, goal="", n=None):
        rows.append((name, _fmt(v, pct, (samples if n is None else n) if pct else None), goal))

    for key, label in (("adherence", "held-out pairs"), ("adherence_train", "training pairs")):
        if key in model:
            a = model[key]
            goal = key == "adherence"
            add(f"adherence ({label}): background correct", a["background_correct"], True, n=a["n"])
            add(f"adherence ({label}): background in the object's colour", a["background_has_object_colour"], True, n=a["n"])
            add(f"adherence ({label}): object found", a["found"], True, n=a["n"])
            add(f"adherence ({label}): colour", a["colour"], True, ">= 90%" if goal else "", n=a["n"])
            add(f"adherence ({label}): shape", a["shape"], True, ">= 80%" if goal else "", n=a["n"])
    if "word_swap" in model:
        for key, v in model["word_swap"].items():  # goals (issue 3) for P2P; the no-injection rows are the baseline
            p2p, shape = key.endswith("_p2p"), key.startswith("shape")
            add(f"word swap {key}: target rate", v["target_rate"], True, (">= 80%" if shape else ">= 90%") if p2p else "")
            add(f"word swap {key}: median mask IoU (n={v['n_scored']})", v["median_mask_iou"], goal=">= 0.8" if p2p and not shape else "")
            add(f"word swap {key}: median centroid shift px", v["median_centroid_shift_px"], goal="<= 3" if p2p and shape else "")
    if "local_blend" in model:
        add("LocalBlend: median background PSNR dB", model["local_blend"]["median_background_psnr_db"], goal=">= 30")
        if "target_rate" in model["local_blend"]:  # results older than 2026-12-02 lack it
            add("LocalBlend: the edit has the target colour", model["local_blend"]["target_rate"], True)
    for side, v in model.get("local_blend_sides", {}).get("sides", {}).items():
        add(f"LocalBlend, mask from the {side}x{side} maps: median background PSNR dB (n={v['n_scored']})", v["median_background_psnr_db"])
        add(f"LocalBlend, mask from the {side}x{side} maps: the edit has the target colour", v["target_rate"], True)
    for part, label in (("two_objects", "two objects, training pairs"), ("two_objects_held_out", "two objects, held-out pairs")):
        if part not in model:
            continue
        t = model[part]
        for key in ("model", "rendered"):
            goal = ">= 70%" if key == "model" and part == "two_objects_held_out" else ""
            add(f"{label} ({key}): both present (colours)", t[key]["both_present"], True, goal)
            add(f"{label} ({key}): both present (colours+shapes)", t[key]["both_present_with_shape"], True)
            add(f"{label} ({key}): relation correct | both present", t[key]["relation_correct"], True,
                n=t[key].get("relation_scored"))
    if "refine" in model:
        r = model["refine"]
        for mode in ("p2p", "none"):
            p = r["pattern"][mode]
            g = mode == "p2p"
            add(f"refine pattern ({mode}): object kept, median IoU (n={p['n_scored']})", p["object_kept_median_iou"], False,
                ">= 0.7" if g else "")
            add(f"refine pattern ({mode}): pattern shown", p["pattern_rate"], True, ">= 70%" if g else "")
            add(f"refine pattern ({mode}): same pattern called in source", p["pattern_rate_in_source"], True)
        add("refine pattern (rendered): pattern shown", r["pattern"]["rendered"]["pattern_rate"], True)
        for s in world.STYLES:
            for mode in ("p2p", "none"):
                v = r["style"][mode][s]
                add(f"refine style {s} ({mode}): layout kept, median IoU (n={v['n_scored']})", v["layout_kept_median_iou"])
            add(f"refine style {s} (rendered): layout kept, median IoU", r["style"]["rendered"][s]["layout_kept_median_iou"])
            add(f"refine style {s} (p2p): median colourfulness", r["style"]["p2p"][s]["median_colourfulness"])
    if "reweight" in model:
        for kind in ("pattern", "colour"):
            w = model["reweight"][kind]
            add(f"reweight {kind} word: median Spearman rho (n={w['n_scored']})", w["median_rho"], False, ">= 0.8")
            if "median_effect_change" in w:  # results written before these figures existed lack them
                lo, hi = model["reweight"]["factors"][0], model["reweight"]["factors"][-1]
                add(f"reweight {kind} word: median change of {w['effect']}, factor {lo:g} -> {hi:g}", w["median_effect_change"])
                add(f"reweight {kind} word: median range of {w['effect']} over the factors", w["median_effect_range"])
        w = model["reweight"]["colour"]["image_wide"]
        add(f"reweight colour word, image-wide: median Spearman rho (n={w['n_scored']})", w["median_rho"])
    if "sweep" in model:
        for name, v in model["sweep"]["cross_replace_steps"].items():
            add(f"sweep cross_replace_steps={name}: median mask IoU (n={v['n_scored']})", v["median_mask_iou"])
            add(f"sweep cross_replace_steps={name}: target shape", v["target_rate"], True)
    if "reconstruction" in model:
        r = model["reconstruction"]
        for key, where in (("median_psnr_db", "image"), ("median_object_psnr_db", "objects"), ("median_background_psnr_db", "background")):
            add(f"autoencoder round trip (n={r['n']} scenes): median PSNR dB, {where}", r[key])
        for part, label, keys in (("detector_big_plain", "big plain", ("colour", "shape")),
                                  ("detector_big", "big, patterned in 3/5", ("colour", "shape", "pattern")),
                                  ("detector_small", "small, patterned in 3/5", ("colour", "shape", "pattern"))):
            if part in r:  # results written before these figures existed lack them
                for key in keys:
                    add(f"autoencoder round trip, {label} objects (n={r['n']}): detector reads {key}", r[part][key], True,
                        "ceiling" if part == "detector_big_plain" else "", n=r["n"])
    if "localisation" in model:
        loc = model["localisation"]
        for side, v in loc["sides"].items():
            for role in LOCALISATION_ROLES:
                add(f"cross-attention {side}x{side}, {role} word: attention inside / outside the object (n={v['n_scored']})",
                    v[f"{role}_inside_outside"], goal=("> 1" if role in ("shape", "colour") else "< 1"))
            add(f"cross-attention {side}x{side}: binding contrast, object's words over background's", v["binding_contrast"], goal="> 1")
            for role in LOCALISATION_ROLES:
                if f"{role}_share_own" in v:  # results written before these figures existed lack them
                    add(f"cross-attention {side}x{side}, {role} word: its share of its own region's attention", v[f"{role}_share_own"])
            add(f"cross-attention {side}x{side}: median share of attention on the caption's words", v["word_share"], True, n=0)
            if "padding_share" in v:
                add(f"cross-attention {side}x{side}: median share of attention on the padding", v["padding_share"], True, n=0)
    return rows


def format_table(model: dict) -> str:
    """A plain-text table of `summary_rows`."""
    rows = [("figure", "value", "goal")] + summary_rows(model)
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, "-" * (w0 + w1 + 10))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector-only", action="store_true", help="only check the detector on rendered scenes")
    parser.add_argument("--n", type=int, default=300, help="rendered scenes for the detector check")
    parser.add_argument("--detector-seed", type=int, default=0, help="draw the detector check's scenes from this seed")
    parser.add_argument("--model", default=None, help="a diffusers folder (default: the bundled model)")
    parser.add_argument("--samples", type=int, default=16, help="generations (prompts) per measured figure")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    if args.n < 1:
        parser.error(f"--n must be a positive number of scenes, got {args.n}")
    if args.samples < 1 or args.steps < 1:
        parser.error(f"--samples and --steps must be positive, got {args.samples} and {args.steps}")
    result = {"detector": detector_accuracy(args.n, args.detector_seed)}
    for k, v in result["detector"].items():
        print(f"detector {k:17s} {v:6.1%}")
    if not args.detector_only:
        import torch

        from ..pipeline import Prompt2PromptPipeline

        torch.manual_seed(0)
        pipe = Prompt2PromptPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        result["model"] = evaluate_model(pipe, args.samples, args.steps, args.guidance, args.seed, parts)
        print(json.dumps(result["model"], indent=1))
        print()
        print(format_table(result["model"]))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
