"""The shapes world: captioned 64x64 RGB scenes of one or two simple objects, with ground truth.

Everything a scene can contain is listed in ``vocabulary.json`` next to this file (loaded into
:data:`VOCAB`): 8 shapes, 10 colours (one canonical RGB each), 2 sizes, 3 patterns (striped,
dotted, outlined), plain-colour backgrounds and 5 textured scenes (grass, sky, sand, water, night),
2 global styles (pencil sketch, pixel art) and 5 relations between two objects.

    spec = sample_spec(seed, split)   # attributes, geometry and caption (a frozen SceneSpec)
    scene = render(spec)              # image (64, 64, 3) uint8 + per-object masks
    images, captions = render_batch(range(1000))

Determinism: all randomness comes from ``numpy.random.default_rng([seed, stream])`` with separate
streams for the attributes (0), the geometry (1), the rendering (2: colour jitter, texture variant),
an unspecified size (3) and the redraw of a plain background that would hide a striped or dotted
object's pattern (4); no global random state is used. The geometry stream depends only on the
number of objects, their sizes and the relation, so two specs that differ only in shape, colour,
pattern, background or style (for instance ``make_spec`` with the same seed) put their objects at
the same places, sizes and rotations.

Splits: ``"train"`` never renders a held-out (colour, shape) pair (``VOCAB["heldout_pairs"]``);
``"heldout"`` renders only scenes in which at least one object is a held-out pair.

Geometry: ``ObjectSpec.diameter`` is the larger side of the shape's unrotated bounding box in pixels
(small: 14-20, big: 26-36); rotation is at most 15 degrees either way; objects never overlap and lie
at least 1 px inside the image. With two objects, "A above B" puts the whole of A above the whole of
B (at least 3 px apart), likewise for below / left of / right of; "next to" is left or right. Two big
objects that do not fit side by side are shrunk toward 26 px (and, if needed, unrotated).

Captions (4 templates, ``VOCAB["templates"]``): e.g. "a big red circle on a blue background",
"red circle, blue background", "a striped yellow star on grass in pencil sketch style",
"a small blue square above a green heart on sand", "pixel art of a ring on a night sky".
The size is said only when ``ObjectSpec.say_size`` is true; the rendered size is always concrete.

Run ``python -m prompt2prompt.shapes.world OUT.png [N] [--split S]`` to save a grid of scenes.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

VOCAB: dict = json.loads((Path(__file__).with_name("vocabulary.json")).read_text(encoding="utf-8"))

SIZE = int(VOCAB["image_size"])
SHAPES: tuple[str, ...] = tuple(VOCAB["shapes"])
COLOURS: dict[str, tuple[int, int, int]] = {k: tuple(v) for k, v in VOCAB["colours"].items()}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
JITTER = int(VOCAB["colour_jitter"])
SIZES: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in VOCAB["sizes"].items()}
PATTERNS: tuple[str, ...] = tuple(VOCAB["patterns"])
STYLES: tuple[str, ...] = tuple(VOCAB["styles"])
RELATIONS: tuple[str, ...] = tuple(VOCAB["relations"])
SCENES: tuple[str, ...] = tuple(VOCAB["scenes"])
NUM_TEMPLATES = len(VOCAB["templates"])
MAX_ROTATION = float(VOCAB["max_rotation_degrees"])
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset((c, s) for c, s in VOCAB["heldout_pairs"])
SPLITS = ("train", "heldout")

TRAIN_PAIRS = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELDOUT_PAIRS]  # (colour, shape) seen in training
_ALL_PAIRS = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
_HELDOUT_LIST = [tuple(p) for p in VOCAB["heldout_pairs"]]

# sampling probabilities (attribute stream)
P_TWO_OBJECTS = 0.4
P_SAY_SIZE = 0.5
P_PATTERN = 0.3
P_PLAIN_BACKGROUND = 0.5
P_STYLE = 0.3  # split evenly between the styles

_GAP = 3.0  # px between the bounding boxes of two objects along the relation's axis
_MARGIN = 1.0  # px between an object's bounding box and the image border
STRIPE_WIDTH = 2.5  # px across each stripe; the object's colour and the pattern's alternate
DOT_SPACING = 6.0  # px between dot centres, a square grid in the object's frame
DOT_RADIUS = 1.6  # px
_LIGHT = np.array([250.0, 250.0, 250.0], np.float32)  # pattern colour on dark objects
_DARK = np.array([30.0, 30.0, 30.0], np.float32)  # pattern colour on light objects


# ----------------------------------------------------------------------------- data classes

@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    size: str  # "small" | "big" (always concrete; said in the caption only if say_size)
    pattern: str | None  # None | "striped" | "dotted" | "outlined"
    center: tuple[float, float]  # (x, y) in pixels, y down; pixel i spans [i, i+1)
    diameter: float  # larger side of the unrotated bounding box, px
    rotation: float  # degrees, counter-clockwise as seen
    say_size: bool = True


@dataclass(frozen=True)
class Background:
    kind: str  # "plain" | "scene"
    name: str  # a colour name (plain) or a scene name


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[ObjectSpec, ...]
    background: Background
    style: str | None  # None | "pencil sketch" | "pixel art"
    relation: str | None  # None (one object) or "A <relation> B" with A = objects[0]
    caption: str
    seed: int
    template: int


@dataclass(frozen=True, eq=False)
class Scene:
    image: np.ndarray  # (64, 64, 3) uint8, final (styled) image
    masks: np.ndarray  # (n, 64, 64) bool: drawn pixels of each object (outline only if outlined),
    #                    geometric (before any style; for pixel art the un-anti-aliased shape)
    filled: np.ndarray  # (n, 64, 64) bool: the full shape of each object
    alpha: np.ndarray  # (n, 64, 64) float32 coverage of the drawn pixels (masks = alpha >= 0.5)
    background_image: np.ndarray  # (64, 64, 3) uint8, the unstyled background alone
    background_rgb: tuple[int, int, int] | None  # jittered plain colour; None for scenes
    object_rgb: tuple[tuple[int, int, int], ...]  # jittered colour used for each object
    spec: SceneSpec


# ----------------------------------------------------------------------------- shapes

def _raw_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the shape's own frame (y up), before normalisation."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "diamond":
        return np.abs(u) / 0.72 + np.abs(v) <= 1.0
    if shape == "triangle":
        return (v >= -0.732) & (v <= 1.0 - 1.732 * np.abs(u))
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
    if shape == "heart":
        a = u * u + v * v - 1.0
        return a * a * a - u * u * v * v * v <= 0.0
    if shape == "star":  # five points, inner radius 0.45; folded into one sector by reflections
        k1x, k1y = math.cos(math.pi / 5), -math.sin(math.pi / 5)
        x = np.abs(u)
        y = v
        t = np.maximum(k1x * x + k1y * y, 0) * 2
        x, y = x - t * k1x, y - t * k1y
        t = np.maximum(-k1x * x + k1y * y, 0) * 2
        x, y = np.abs(x + t * k1x), y - t * k1y - 1.0
        bax, bay = -0.45 * k1y, 0.45 * k1x - 1.0
        return y * bax - x * bay <= 0.0
    raise ValueError(f"unknown shape {shape!r}")


def _normalisation(shape: str) -> tuple[float, float, float]:
    """(cx, cy, half) so that the shape's bounding box is centred and its larger side spans [-1, 1]."""
    t = np.linspace(-1.6, 1.6, 1601)
    inside = _raw_inside(shape, t[None, :], t[::-1, None])
    cols, rows = np.nonzero(inside.any(0))[0], np.nonzero(inside.any(1))[0]
    x0, x1 = t[cols[0]], t[cols[-1]]
    y1, y0 = t[::-1][rows[0]], t[::-1][rows[-1]]
    return (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2


_NORM = {s: _normalisation(s) for s in SHAPES}


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in normalised coordinates (y up): the bounding box's larger side spans [-1, 1]."""
    cx, cy, half = _NORM[shape]
    return _raw_inside(shape, cx + u * half, cy + v * half)


# ----------------------------------------------------------------------------- captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(o: ObjectSpec, article: bool) -> str:
    """An object's words as captions name it: ``[article] [size] [pattern] colour shape``."""
    words = ([o.size] if o.say_size else []) + ([o.pattern] if o.pattern else []) + [o.colour, o.shape]
    if article:
        words.insert(0, _article(words[0]))
    return " ".join(words)


def background_phrase(bg: Background, on: bool) -> str:
    """The background's phrase: after an object (``on``: "on a blue background") or on its own."""
    if bg.kind == "plain":
        return VOCAB["plain_background"]["on" if on else "bare"].format(colour=bg.name, a=_article(bg.name))
    return VOCAB["scenes"][bg.name]["on" if on else "bare"]


def caption(spec: SceneSpec, template: int | None = None) -> str:
    """The caption of ``spec`` in phrasing ``template`` (default: the spec's own)."""
    t = spec.template if template is None else int(template)
    if not 0 <= t < NUM_TEMPLATES:
        raise ValueError(f"template must be in [0, {NUM_TEMPLATES}), got {t}")
    article = t != 1
    objs = object_phrase(spec.objects[0], article)
    if len(spec.objects) > 1:
        objs += f" {spec.relation} " + object_phrase(spec.objects[1], article)
    style = spec.style
    if t == 0:
        return f"{objs} {background_phrase(spec.background, True)}" + (f" in {style} style" if style else "")
    if t == 1:
        return f"{objs}, {background_phrase(spec.background, False)}" + (f", {style}" if style else "")
    if t == 2:
        if style:
            return f"{style} of {objs} {background_phrase(spec.background, True)}"
        return f"{background_phrase(spec.background, True)}, {objs}"
    return f"{objs} {background_phrase(spec.background, True)}" + (f", {style}" if style else "")


def caption_words() -> frozenset[str]:
    """Every word (and ',') a caption can contain."""
    words = set(SHAPES) | set(COLOUR_NAMES) | set(SIZES) | set(PATTERNS) | set(VOCAB["template_words"])
    for phrase in list(STYLES) + list(RELATIONS) + list(VOCAB["plain_background"].values()):
        words.update(phrase.replace("{colour}", "").replace("{a}", "").split())
    for s in VOCAB["scenes"].values():
        words.update(s["on"].split() + s["bare"].split())
    return frozenset(words)


def split_words(text: str) -> list[str]:
    """Words and commas of a caption, in order."""
    return re.findall(r"[a-z]+|,", text.lower())


# ----------------------------------------------------------------------------- geometry

def _extent_factor(rotation_deg: float) -> float:
    """Bounding-box side of any shape inside [-1, 1]^2 rotated by ``rotation``, relative to 2."""
    r = math.radians(rotation_deg)
    return abs(math.cos(r)) + abs(math.sin(r))


def _place(seed: int, sizes: Sequence[str], relation: str | None):
    """Centres, diameters and rotations from the geometry stream (shape-independent)."""
    rng = np.random.default_rng([seed, 1])
    n = len(sizes)
    u = rng.random(12).tolist()  # a fixed number of draws
    rot = [(2 * u[2 * i] - 1) * MAX_ROTATION for i in range(n)]
    lo = [SIZES[s][0] for s in sizes]
    hi = [SIZES[s][1] for s in sizes]
    d = [lo[i] + u[2 * i + 1] * (hi[i] - lo[i]) for i in range(n)]
    room = SIZE - 2 * _MARGIN
    if n == 1:
        h = 0.5 * d[0] * _extent_factor(rot[0])
        cx = _MARGIN + h + u[2] * max(0.0, room - 2 * h)
        cy = _MARGIN + h + u[3] * max(0.0, room - 2 * h)
        centers = [(cx, cy)]
    elif n == 2:
        if relation not in RELATIONS:
            raise ValueError(f"two objects need a relation in {RELATIONS}, got {relation!r}")
        f = [_extent_factor(r) for r in rot]
        avail = room - _GAP
        if f[0] * d[0] + f[1] * d[1] > avail:  # shrink toward the size range's minimum
            spare = f[0] * (d[0] - lo[0]) + f[1] * (d[1] - lo[1])
            need = avail - f[0] * lo[0] - f[1] * lo[1]
            if need >= 0 and spare > 0:
                lam = need / spare
                d = [lo[i] + lam * (d[i] - lo[i]) for i in range(2)]
            else:
                d, rot, f = list(lo), [0.0, 0.0], [1.0, 1.0]
        h = [0.5 * d[i] * f[i] for i in range(2)]
        first = 0
        if relation in ("right of", "below"):
            first = 1
        elif relation == "next to":
            first = int(u[4] < 0.5)
        a, b = first, 1 - first
        slack = max(0.0, room - 2 * h[a] - 2 * h[b] - _GAP)
        s1, s2 = sorted((u[5], u[6]))
        along = [0.0, 0.0]
        along[a] = _MARGIN + slack * s1 + h[a]
        along[b] = along[a] + h[a] + _GAP + slack * (s2 - s1) + h[b]
        hm = max(h)
        common = _MARGIN + hm + u[7] * (room - 2 * hm)
        across = [min(max(common + (2 * u[8 + i] - 1) * 5.0, _MARGIN + h[i]), SIZE - _MARGIN - h[i]) for i in range(2)]
        if relation in ("above", "below"):
            centers = [(across[i], along[i]) for i in range(2)]
        else:
            centers = [(along[i], across[i]) for i in range(2)]
    else:
        raise ValueError(f"one or two objects, got {n}")
    return [(round(float(x), 3), round(float(y), 3)) for x, y in centers], [round(float(x), 3) for x in d], [round(float(r), 3) for r in rot]


# ----------------------------------------------------------------------------- specs

def _choose(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_spec(seed: int, split: str = "train") -> SceneSpec:
    """A random scene specification, deterministic in ``(seed, split)``."""
    _check_split(split)
    seed = int(seed)
    rng = np.random.default_rng([seed, 0])
    n = 2 if rng.random() < P_TWO_OBJECTS else 1
    if split == "train":
        pairs = [_choose(rng, TRAIN_PAIRS) for _ in range(n)]
        while n == 2 and pairs[1] == pairs[0]:
            pairs[1] = _choose(rng, TRAIN_PAIRS)
    else:
        k = int(rng.integers(n))
        pairs = [_choose(rng, _ALL_PAIRS) for _ in range(n)]
        pairs[k] = _choose(rng, _HELDOUT_LIST)
        while n == 2 and pairs[1] == pairs[0]:
            pairs[1 - k] = _choose(rng, _ALL_PAIRS)
    objects = []
    for colour, shape in pairs:
        objects.append(dict(
            shape=shape, colour=colour, size="big" if rng.random() < 0.5 else "small",
            say_size=bool(rng.random() < P_SAY_SIZE),
            pattern=_choose(rng, PATTERNS) if rng.random() < P_PATTERN else None,
        ))
    relation = _choose(rng, RELATIONS) if n == 2 else None
    colours = {o["colour"] for o in objects}
    if rng.random() < P_PLAIN_BACKGROUND:
        background = Background("plain", _choose(rng, [c for c in COLOUR_NAMES if c not in colours]))
        if not _patterns_show(objects, background):  # redrawn from its own stream: no other scene changes
            background = Background("plain", _choose(np.random.default_rng([seed, 4]), _plain_backgrounds(objects)))
    else:
        ok = [s for s in SCENES if not colours & set(VOCAB["scenes"][s]["avoid_colours"])]
        background = Background("scene", _choose(rng, ok))
    style = _choose(rng, STYLES) if rng.random() < P_STYLE else None
    template = int(rng.integers(NUM_TEMPLATES))
    return _build(objects, background, style, relation, seed, template)


def _patterns_show(objects: Sequence[dict], background: Background) -> bool:
    """Whether every striped or dotted object's pattern shows on ``background`` (:func:`pattern_visible`)."""
    return all(pattern_visible(o["colour"], background) for o in objects if o["pattern"] in ("striped", "dotted"))


def _plain_backgrounds(objects: Sequence[dict]) -> list[str]:
    """The plain background colours a sampled scene may have: none of its objects' colours, and none
    that hides a striped or dotted object's pattern, so that a caption never names a pattern that
    the image does not show."""
    colours = {o["colour"] for o in objects}
    return [c for c in COLOUR_NAMES if c not in colours and _patterns_show(objects, Background("plain", c))]


def _build(objects: Sequence[dict], background: Background, style, relation, seed: int, template: int) -> SceneSpec:
    centers, diameters, rotations = _place(seed, [o["size"] for o in objects], relation)
    objs = tuple(
        ObjectSpec(shape=o["shape"], colour=o["colour"], size=o["size"], pattern=o["pattern"], center=c,
                   diameter=dm, rotation=r, say_size=o["say_size"])
        for o, c, dm, r in zip(objects, centers, diameters, rotations)
    )
    spec = SceneSpec(objs, background, style, relation if len(objs) == 2 else None, "", seed, template)
    return SceneSpec(objs, background, spec.style, spec.relation, caption(spec), seed, template)


def make_spec(
    objects: Sequence[Mapping],
    background: str | Background,
    style: str | None = None,
    relation: str | None = None,
    seed: int = 0,
    template: int = 0,
) -> SceneSpec:
    """A spec from explicit attributes, placed deterministically from ``seed``.

    ``objects``: one or two mappings with ``shape``, ``colour`` (or ``color``) and optionally
    ``size`` ("small" | "big" | None = drawn from the seed and not said), ``pattern`` (None) and
    ``say_size`` (default: whether a size was given). ``background``: a colour name (plain), a
    scene name, or a :class:`Background`. Held-out pairs are allowed here. The placement equals
    ``sample_spec``'s for the same seed, number of objects, sizes and relation.
    """
    if not 1 <= len(objects) <= 2:
        raise ValueError("one or two objects")
    size_rng = np.random.default_rng([int(seed), 3])
    size_draws = size_rng.random(2)
    objs = []
    for i, o in enumerate(objects):
        shape, colour = o["shape"], o.get("colour", o.get("color"))
        size, pattern = o.get("size"), o.get("pattern")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}")
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}")
        if pattern is not None and pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}")
        say = o.get("say_size", size is not None)
        if size is None:
            size = "big" if size_draws[i] < 0.5 else "small"
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}")
        objs.append(dict(shape=shape, colour=colour, size=size, pattern=pattern, say_size=bool(say)))
    if isinstance(background, str):
        if background in COLOURS:
            background = Background("plain", background)
        elif background in SCENES:
            background = Background("scene", background)
        else:
            raise ValueError(f"background must be a colour or a scene name, got {background!r}")
    if background.kind == "plain" and any(o["colour"] == background.name for o in objs):
        raise ValueError("an object's colour must differ from the plain background's")
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown style {style!r}")
    if len(objs) == 1 and relation is not None:
        raise ValueError("a relation needs two objects")
    return _build(objs, background, style, relation, int(seed), int(template))


# ----------------------------------------------------------------------------- textures

_GRASS = [(76, 150, 52), (40, 104, 32), (122, 188, 72)]
_SKY = [(62, 122, 214), (152, 196, 240), (248, 248, 252)]
_SAND = [(224, 198, 142), (172, 142, 96), (246, 230, 188)]
_WATER = [(30, 92, 172), (22, 68, 148), (122, 182, 236)]
_NIGHT = [(8, 10, 30), (22, 30, 68), (250, 246, 220)]
_PALETTE = np.array(list(COLOURS.values()) + _GRASS + _SKY + _SAND + _WATER + _NIGHT + [(250, 250, 250), (30, 30, 30)], np.float32)
_PALETTE_SQ = (_PALETTE ** 2).sum(-1)
_VARIANTS = 16


def _rgb(c) -> np.ndarray:
    return np.asarray(c, np.float32)


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """(64, 64) smooth noise in [-1, 1], periodic in x (bilinear value noise)."""
    grid = rng.uniform(-1, 1, (cells + 1, cells))
    t = (np.arange(SIZE) + 0.5) * cells / SIZE - 0.5
    i0 = np.floor(t).astype(int)
    w = t - i0
    w = w * w * (3 - 2 * w)
    ix0, ix1 = i0 % cells, (i0 + 1) % cells
    iy0, iy1 = np.clip(i0, 0, cells), np.clip(i0 + 1, 0, cells)
    rows = grid[iy0][:, ix0] * (1 - w)[None, :] + grid[iy0][:, ix1] * w[None, :]
    rows1 = grid[iy1][:, ix0] * (1 - w)[None, :] + grid[iy1][:, ix1] * w[None, :]
    return rows * (1 - w)[:, None] + rows1 * w[:, None]


def _vgradient(top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None, None]
    return np.broadcast_to(_rgb(top) * (1 - t) + _rgb(bottom) * t, (SIZE, SIZE, 3)).copy()


def _texture(name: str, variant: int) -> np.ndarray:
    """One (64, 64, 3) float32 texture, periodic in x, from a fixed seed."""
    rng = np.random.default_rng([7919, SCENES.index(name), variant])
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if name == "grass":
        img = _vgradient(np.array(_GRASS[0]) * 1.08, np.array(_GRASS[0]) * 0.92)
        img *= (1 + 0.08 * _smooth_noise(rng, 8))[..., None]
        nb, ln = 420, 7
        x0, y0 = rng.uniform(0, SIZE, nb), rng.uniform(0, SIZE + 4, nb)
        length = rng.integers(3, ln + 1, nb)
        slant = rng.uniform(-0.45, 0.45, nb)
        tone = rng.random(nb) < 0.6
        t = np.arange(ln)
        px = np.round(x0[:, None] + slant[:, None] * t).astype(int) % SIZE
        py = np.round(y0[:, None] - t).astype(int)
        ok = (t[None, :] < length[:, None]) & (py >= 0) & (py < SIZE)
        dark = np.broadcast_to(tone[:, None], ok.shape)
        img[py[ok & dark], px[ok & dark]] = _rgb(_GRASS[1])
        img[py[ok & ~dark], px[ok & ~dark]] = _rgb(_GRASS[2])
        img += rng.normal(0, 4, (SIZE, SIZE, 1))
    elif name == "sky":
        img = _vgradient(_SKY[0], _SKY[1])
        alpha = np.zeros((SIZE, SIZE), np.float32)
        for _ in range(int(rng.integers(2, 4))):
            cx, cy = rng.uniform(0, SIZE), rng.uniform(5, 48)
            for _ in range(int(rng.integers(4, 7))):
                bx, by, r = cx + rng.uniform(-9, 9), cy + rng.uniform(-2.5, 2.5), rng.uniform(3, 6.5)
                dx = (xs - bx + SIZE / 2) % SIZE - SIZE / 2
                dist = np.sqrt(dx * dx + (ys - by) ** 2)
                alpha = np.maximum(alpha, np.clip((r - dist) / 1.5, 0, 1))
        img = img * (1 - alpha[..., None]) + _rgb(_SKY[2]) * alpha[..., None]
    elif name == "sand":
        img = np.broadcast_to(_rgb(_SAND[0]), (SIZE, SIZE, 3)).copy()
        img *= (1 + 0.05 * _smooth_noise(rng, 6) + 0.03 * np.sin(2 * np.pi * (ys / 7 + 0.2 * np.sin(2 * np.pi * xs / 32 + rng.uniform(0, 6.3)))))[..., None]
        speck = rng.random((SIZE, SIZE))
        img[speck < 0.07] = _rgb(_SAND[1])
        img[speck > 0.96] = _rgb(_SAND[2])
        img += rng.normal(0, 3, (SIZE, SIZE, 1))
    elif name == "water":
        img = _vgradient(_WATER[0], _WATER[1])
        img *= (1 + 0.06 * _smooth_noise(rng, 4))[..., None]
        period = rng.uniform(6, 8)
        wave = np.sin(2 * np.pi * (ys / period + 0.35 * np.sin(2 * np.pi * xs / 32 + rng.uniform(0, 6.3))
                                   + 0.1 * np.sin(2 * np.pi * xs / 16 + rng.uniform(0, 6.3))))
        a = np.clip((wave - 0.55) / 0.45, 0, 1) * (0.55 + 0.45 * (_smooth_noise(rng, 4) > -0.3))
        img = img * (1 - a[..., None]) + _rgb(_WATER[2]) * a[..., None]
    elif name == "night":
        img = _vgradient(_NIGHT[0], _NIGHT[1])
        k = int(rng.integers(22, 34))
        sx, sy = rng.integers(0, SIZE, k), rng.integers(0, SIZE, k)
        b = rng.uniform(0.55, 1.0, k)
        star = _rgb(_NIGHT[2])
        img[sy, sx] = img[sy, sx] * (1 - b[:, None]) + star * b[:, None]
        for j in range(3):  # a few bright stars with a small glow
            x, y = sx[j], sy[j]
            for ddx, ddy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy = y + ddy
                if 0 <= yy < SIZE:
                    xx = (x + ddx) % SIZE
                    img[yy, xx] = img[yy, xx] * 0.5 + star * 0.5
    else:
        raise ValueError(f"unknown scene {name!r}")
    return np.clip(img, 0, 255).astype(np.float32)


@lru_cache(maxsize=None)
def _texture_bank(name: str) -> np.ndarray:
    """(variants, 3, 64, 128) planar: each texture twice side by side, so a crop ``[..., r:r+64]`` rolls it."""
    bank = np.stack([_texture(name, v).transpose(2, 0, 1) for v in range(_VARIANTS)])
    bank = np.ascontiguousarray(np.concatenate([bank, bank], axis=3))
    bank.setflags(write=False)
    return bank


# ----------------------------------------------------------------------------- rendering

def erode(m: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion by an octagon of radius ``k`` (alternating 4- and 8-neighbourhoods)."""
    for i in range(k):
        p = np.pad(m, 1)
        e = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        if i % 2:
            e &= p[:-2, :-2] & p[:-2, 2:] & p[2:, :-2] & p[2:, 2:]
        m = e
    return m


def _down(m: np.ndarray) -> np.ndarray:
    """2x2 box downsample of a supersampled mask to float coverage."""
    m = m.view(np.uint8)
    s = m[0::2, 0::2] + m[1::2, 0::2]
    s += m[0::2, 1::2]
    s += m[1::2, 1::2]
    return s * np.float32(0.25)


def _pattern_colour(rgb: np.ndarray, background: Background) -> np.ndarray:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    light = lum < 140
    if background.kind == "plain" and background.name in ("white", "black"):
        light = background.name == "black"
    return _LIGHT if light else _DARK


def pattern_visible(colour: str, background: Background) -> bool:
    """Whether stripes or dots show on an object of canonical ``colour``. They are drawn in near-white
    on dark objects and near-black on light ones, except that on a plain white (black) background
    they are always near-black (near-white) so that the object's outline stays whole; a black
    object on white, or a white one on black, thus gets stripes of its own colour (less than the
    colour jitter apart), and its pattern is in the caption only."""
    rgb = _rgb(COLOURS[colour])
    return float(np.sqrt(((_pattern_colour(rgb, background) - rgb) ** 2).sum())) > 2 * JITTER * math.sqrt(3)


def _draw_object(img: np.ndarray, o: ObjectSpec, rgb: np.ndarray, background: Background,
                 alpha: np.ndarray, filled: np.ndarray, hard: bool = False) -> None:
    """Composite one object into ``img`` ((3, 64, 64) float32, in place) and write its drawn-pixel coverage
    into ``alpha`` and its full-shape coverage into ``filled`` (both (64, 64), zero on entry).

    Anti-aliased (2x2 supersampling) unless ``hard``: then each pixel takes its majority colour.
    """
    half = 0.5 * o.diameter
    ext = half * _extent_factor(o.rotation) + 1.0
    cx, cy = o.center
    x0, x1 = max(0, int(math.floor(cx - ext))), min(SIZE, int(math.ceil(cx + ext)))
    y0, y1 = max(0, int(math.floor(cy - ext))), min(SIZE, int(math.ceil(cy + ext)))
    if x1 <= x0 or y1 <= y0:
        return
    X = np.arange(2 * x0, 2 * x1, dtype=np.float32) * 0.5 + (0.25 - cx)  # sample offsets, px
    Y = (cy - 0.25) - np.arange(2 * y0, 2 * y1, dtype=np.float32) * 0.5  # y up
    r = math.radians(o.rotation)
    c, s = math.cos(r), math.sin(r)
    ncx, ncy, nh = _NORM[o.shape]
    k = nh / half  # px -> the raw shape's units
    ru = (ncx + k * c * X)[None, :] + (k * s * Y)[:, None]
    rv = (ncy - k * s * X)[None, :] + (k * c * Y)[:, None]
    m = _raw_inside(o.shape, ru, rv)
    fill = _down(m)
    if hard:
        fill = (fill >= 0.5).astype(np.float32)
    box = img[:, y0:y1, x0:x1]
    rgb = rgb[:, None, None]
    if o.pattern == "outlined":
        thick = (2.5 if o.size == "big" else 2.0) if o.shape != "ring" else (1.5 if o.size == "big" else 1.0)
        draw = _down(m & ~erode(m, int(round(2 * thick))))
        if hard:
            draw = (draw >= 0.5).astype(np.float32)
        box += draw * (rgb - box)
    elif o.pattern in ("striped", "dotted"):
        up = (c * X)[None, :] + (s * Y)[:, None]  # object frame, px
        vp = (-s * X)[None, :] + (c * Y)[:, None]
        if o.pattern == "striped":
            sec = np.floor((up + vp) * (1 / (math.sqrt(2) * STRIPE_WIDTH))) % 2 == 1
        else:
            p = DOT_SPACING
            gu, gv = up - p * np.round(up / p), vp - p * np.round(vp / p)
            sec = gu * gu + gv * gv <= DOT_RADIUS ** 2
        a_sec = _down(m & sec)
        if hard:
            a_sec = fill * (a_sec * 2 > _down(m))
        box *= 1 - fill
        box += (fill - a_sec) * rgb + a_sec * _pattern_colour(rgb[:, 0, 0], background)[:, None, None]
        draw = fill
    else:
        box += fill * (rgb - box)
        draw = fill
    alpha[y0:y1, x0:x1] = draw
    filled[y0:y1, x0:x1] = fill


def object_masks(o: ObjectSpec) -> tuple[np.ndarray, np.ndarray]:
    """The pixels ``render`` draws for the object ``o`` alone (outline only if outlined; stripes and
    dots included) and its full shape, both ``(64, 64)`` bool: the renderer's own geometry, which the
    evaluation's detector compares candidate objects with."""
    img = np.zeros((3, SIZE, SIZE), np.float32)
    alpha = np.zeros((SIZE, SIZE), np.float32)
    filled = np.zeros((SIZE, SIZE), np.float32)
    _draw_object(img, o, np.zeros(3, np.float32), Background("plain", "gray"), alpha, filled)
    return alpha >= 0.5, filled >= 0.5


def _pixel_art(img: np.ndarray, background: np.ndarray, alpha: np.ndarray, rgbs: Sequence[np.ndarray],
               outlined: Sequence[bool], cell: int = 4) -> np.ndarray:
    """16 x 16 cells of ``cell`` px, each one palette colour (the canonical colours and the scenes'
    main colours), upscaled (nearest). A cell belongs to an object when the object covers enough of it
    (40%; 25% for outlines so that they survive) and then takes the object's colour at the cell's
    centre (its main colour if the centre misses the object); other cells take the centre's colour,
    or the background's there if the centre falls on an object. Planar (3, 64, 64) in and out."""
    n = SIZE // cell
    c = cell // 2
    small = img[:, c::cell, c::cell].copy()
    bg = background[:, c::cell, c::cell]
    cover = alpha.reshape(len(alpha), n, cell, n, cell).mean((2, 4))
    centre = alpha[:, c::cell, c::cell] >= 0.5
    owned = np.zeros((n, n), bool)
    for i in range(len(alpha)):
        own = cover[i] >= (0.25 if outlined[i] else 0.4)
        miss = centre[i] & ~own
        small[:, miss] = bg[:, miss]
        fill = own & ~centre[i]
        small[:, fill] = rgbs[i][:, None]
        owned |= own
    small = small.reshape(3, -1)
    d = _PALETTE_SQ[:, None] - 2 * _PALETTE @ small  # + |small|^2, the same for every palette entry
    q = _PALETTE.T[:, d.argmin(0)].reshape(3, n, 1, n, 1)
    return np.broadcast_to(q, (3, n, cell, n, cell)).reshape(3, SIZE, SIZE)


_PAPER = np.array([242, 240, 232], np.float32)
_GRAPHITE = np.array([58, 58, 66], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32) / 255.0
_YS, _XS = np.mgrid[0:SIZE, 0:SIZE]
_HATCH = [(((_XS + _YS + p) % 4 == 0) * np.float32(0.45), ((_XS - _YS + p) % 4 == 0) * np.float32(0.45)) for p in range(4)]


def _pencil_sketch(img: np.ndarray, alpha: np.ndarray, phase: int) -> np.ndarray:
    """Grayscale pencil look: dark object outlines, lighter lines where the colour changes,
    diagonal hatching (and cross-hatching) for dark tones, on off-white paper."""
    a = alpha.sum(0)  # objects never overlap
    dx = np.abs(img[:, :, 1:] - img[:, :, :-1])
    dy = np.abs(img[:, 1:] - img[:, :-1])
    ex = np.maximum(dx[0] + dx[1] + dx[2] - 60.0, 0) * (0.55 / 120)
    ey = np.maximum(dy[0] + dy[1] + dy[2] - 60.0, 0) * (0.55 / 120)
    ex = np.maximum(ex, np.abs(a[:, 1:] - a[:, :-1]))  # the objects' own contours, drawn firmly
    ey = np.maximum(ey, np.abs(a[1:] - a[:-1]))
    edge = np.zeros((SIZE, SIZE), np.float32)
    edge[:, 1:] = ex
    edge[:, :-1] = np.maximum(edge[:, :-1], ex)
    edge[1:] = np.maximum(edge[1:], ey)
    edge[:-1] = np.maximum(edge[:-1], ey)
    dark = 1 - (_LUMA @ img.reshape(3, -1)).reshape(SIZE, SIZE)
    h1, h2 = _HATCH[phase % 4]
    k = np.minimum(0.95 * edge + h1 * (dark > 0.3) + h2 * (dark > 0.55) + 0.12 * dark, 1)
    return _PAPER[:, None, None] + k * (_GRAPHITE - _PAPER)[:, None, None]


def render(spec: SceneSpec) -> Scene:
    """Render ``spec`` (deterministic: jitter and texture choice come from ``spec.seed``)."""
    rng = np.random.default_rng([int(spec.seed), 2])
    jit = rng.integers(-JITTER, JITTER + 1, (len(spec.objects) + 1, 3))
    tex = rng.integers(0, 1 << 16, 4)
    bg = spec.background
    if bg.kind == "plain":
        bg_rgb = np.minimum(np.maximum(_rgb(COLOURS[bg.name]) + jit[-1], 0), 255)
        img = np.empty((3, SIZE, SIZE), np.float32)  # planar while rendering
        img[:] = bg_rgb[:, None, None]
        background_rgb = tuple(int(x) for x in bg_rgb)
    elif bg.kind == "scene":
        r = int(tex[1] % SIZE)
        img = _texture_bank(bg.name)[tex[0] % _VARIANTS, :, :, r:r + SIZE]
        if tex[2] % 2:
            img = img[:, :, ::-1]
        img = np.minimum(img * np.float32(1 + ((tex[3] % 81) - 40) / 1000.0), np.float32(255))
        background_rgb = None
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}")
    background_image = np.ascontiguousarray((img + np.float32(0.5)).astype(np.uint8).transpose(1, 2, 0))  # within [0, 255]
    pixel_art = spec.style == "pixel art"
    if pixel_art:
        bg_img = img.copy()
    n = len(spec.objects)
    alpha = np.zeros((n, SIZE, SIZE), np.float32)
    filled = np.zeros((n, SIZE, SIZE), np.float32)
    rgbs = []
    for i, o in enumerate(spec.objects):
        rgb = np.minimum(np.maximum(_rgb(COLOURS[o.colour]) + jit[i], 0), 255).astype(np.float32)
        rgbs.append(rgb)
        _draw_object(img, o, rgb, bg, alpha[i], filled[i], hard=pixel_art)
    object_rgb = tuple(tuple(int(x) for x in rgb) for rgb in rgbs)
    if pixel_art:
        img = _pixel_art(img, bg_img, alpha, rgbs, [o.pattern == "outlined" for o in spec.objects])
    elif spec.style == "pencil sketch":
        img = _pencil_sketch(img, alpha, int(tex[0] % 4))
    elif spec.style is not None:
        raise ValueError(f"unknown style {spec.style!r}")
    image = np.ascontiguousarray((img + np.float32(0.5)).astype(np.uint8).transpose(1, 2, 0))  # steps keep [0, 255]
    return Scene(image, alpha >= 0.5, filled >= 0.5, alpha, background_image, background_rgb, object_rgb, spec)


def sample_scene(seed: int, split: str = "train") -> Scene:
    return render(sample_spec(seed, split))


def render_batch(seeds: Sequence[int], split: str = "train") -> tuple[np.ndarray, list[str]]:
    """Images ``(n, 64, 64, 3)`` uint8 and captions of the scenes of ``seeds``."""
    images = np.empty((len(seeds), SIZE, SIZE, 3), np.uint8)
    captions = []
    for i, seed in enumerate(seeds):
        spec = sample_spec(seed, split)
        images[i] = render(spec).image
        captions.append(spec.caption)
    return images, captions


def benchmark(n: int = 2000, split: str = "train") -> float:
    """Scenes per second of ``render_batch`` (one process)."""
    _, _ = render_batch(range(50), split)  # warm the texture banks
    t0 = time.perf_counter()
    render_batch(range(n), split)
    return n / (time.perf_counter() - t0)


def grid(seeds: Sequence[int], split: str = "train", columns: int = 8, scale: int = 2) -> np.ndarray:
    """A uint8 image grid of the scenes of ``seeds`` (for looking at them)."""
    images, _ = render_batch(seeds, split)
    rows = -(-len(images) // columns)
    pad = 2
    out = np.full((rows * (SIZE * scale + pad) + pad, columns * (SIZE * scale + pad) + pad, 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        big = np.repeat(np.repeat(im, scale, 0), scale, 1)
        y, x = pad + r * (SIZE * scale + pad), pad + c * (SIZE * scale + pad)
        out[y:y + SIZE * scale, x:x + SIZE * scale] = big
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from PIL import Image

    parser = argparse.ArgumentParser(description="Save a grid of shapes-world scenes and print their captions.")
    parser.add_argument("out")
    parser.add_argument("n", nargs="?", type=int, default=32)
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--start", type=int, default=0)
    args = parser.parse_args(argv)
    seeds = list(range(args.start, args.start + args.n))
    Image.fromarray(grid(seeds, args.split)).save(args.out)
    for s in seeds:
        print(s, sample_spec(s, args.split).caption)
    print(f"{benchmark(1000, args.split):.0f} scenes/s", file=sys.stderr)


if __name__ == "__main__":
    main()
