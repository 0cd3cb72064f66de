"""The shapes world renderer: determinism, captions, ground truth, geometry, splits, styles."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from prompt2prompt.shapes import world

N_TRAIN = 2000


@pytest.fixture(scope="module")
def train_specs():
    return [world.sample_spec(s, "train") for s in range(N_TRAIN)]


@pytest.fixture(scope="module")
def train_scenes(train_specs):
    return [world.render(spec) for spec in train_specs[:600]]


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_file_is_the_source():
    v = world.VOCAB
    assert v["shapes"] == ["circle", "square", "triangle", "star", "heart", "diamond", "cross", "ring"]
    assert v["colours"]["red"] == [220, 40, 40] and len(v["colours"]) == 10
    assert set(v["scenes"]) == {"grass", "sky", "sand", "water", "night"}
    assert v["sizes"] == {"small": [14, 20], "big": [26, 36]}
    pairs = {tuple(p) for p in v["heldout_pairs"]}
    assert len(pairs) == len(v["heldout_pairs"]) == 8  # 10% of the 80 (colour, shape) pairs
    assert all(c in v["colours"] and s in v["shapes"] for c, s in pairs)
    assert world.HELDOUT_PAIRS == pairs


# ----------------------------------------------------------------------------- determinism


def test_deterministic_per_seed():
    for seed in (0, 1, 17, 123456):
        for split in world.SPLITS:
            a, b = world.sample_spec(seed, split), world.sample_spec(seed, split)
            assert a == b
            sa, sb = world.render(a), world.render(b)
            assert np.array_equal(sa.image, sb.image)
            assert np.array_equal(sa.masks, sb.masks)
            assert sa.image.dtype == np.uint8 and sa.image.shape == (64, 64, 3)
    images, captions = world.render_batch([5, 6, 7])
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    for i, seed in enumerate([5, 6, 7]):
        scene = world.sample_scene(seed)
        assert np.array_equal(images[i], scene.image) and captions[i] == scene.spec.caption
    assert not np.array_equal(world.sample_scene(1).image, world.sample_scene(2).image)


def test_render_does_not_use_global_rng():
    np.random.seed(0)
    a = world.sample_scene(42).image
    np.random.seed(1)
    np.random.rand(100)
    assert np.array_equal(a, world.sample_scene(42).image)


# ----------------------------------------------------------------------------- captions


def test_caption_words_are_in_the_vocabulary(train_specs):
    allowed = world.caption_words()
    extra = {"a", "an", "on", "in", "of", "the", "style", "background", ","}
    assert extra <= allowed
    specs = train_specs + [world.sample_spec(s, "heldout") for s in range(300)]
    for spec in specs:
        for t in range(world.NUM_TEMPLATES):
            words = world.split_words(world.caption(spec, t))
            assert set(words) <= allowed, (world.caption(spec, t), set(words) - allowed)


def test_captions_mention_every_attribute(train_specs):
    seen_templates = set()
    for spec in train_specs:
        text = spec.caption
        assert text == world.caption(spec)
        seen_templates.add(spec.template)
        words = world.split_words(text)
        for o in spec.objects:
            assert o.colour in words and o.shape in words
            assert (o.size in words) == o.say_size or (len(spec.objects) == 2 and spec.objects[0].size == spec.objects[1].size)
            if o.pattern:
                assert o.pattern in words
        for p in world.PATTERNS:
            if p in words:
                assert any(o.pattern == p for o in spec.objects)
        if spec.relation:
            assert f" {spec.relation} " in text
        assert spec.background.name in words
        if spec.style:
            assert spec.style in text
        else:
            assert "style" not in words and "sketch" not in words and "art" not in words
    assert seen_templates == set(range(world.NUM_TEMPLATES))


def test_caption_examples():
    spec = world.make_spec([dict(shape="circle", colour="red", size="big")], "blue", seed=3)
    assert spec.caption == "a big red circle on a blue background"
    assert world.caption(spec, 1) == "big red circle, blue background"
    spec = world.make_spec([dict(shape="star", colour="yellow", pattern="striped")], "grass", "pencil sketch", seed=3)
    assert spec.caption == "a striped yellow star on grass in pencil sketch style"
    spec = world.make_spec([dict(shape="square", colour="blue", size="small"), dict(shape="heart", colour="green")],
                           "sand", relation="above", seed=3)
    assert spec.caption == "a small blue square above a green heart on sand"
    spec = world.make_spec([dict(shape="ring", colour="orange")], "night", "pixel art", seed=3, template=2)
    assert spec.caption == "pixel art of an orange ring on a night sky"
    spec = world.make_spec([dict(shape="ring", colour="red")], "orange", seed=3)
    assert spec.caption == "a red ring on an orange background"


# ----------------------------------------------------------------------------- ground truth


def test_masks_match_colours(train_scenes):
    checked = 0
    for scene in train_scenes:
        spec = scene.spec
        assert scene.masks.shape == scene.filled.shape == scene.alpha.shape == (len(spec.objects), 64, 64)
        for i, o in enumerate(spec.objects):
            canon = np.array(world.COLOURS[o.colour])
            assert np.all(np.abs(np.array(scene.object_rgb[i]) - canon) <= world.JITTER)
            assert scene.masks[i].sum() > 10 and np.all(scene.masks[i] <= scene.filled[i])
            if spec.style or o.pattern:
                continue
            full = scene.alpha[i] == 1.0
            assert full.sum() >= 0.6 * scene.masks[i].sum()
            px = scene.image[full].astype(int)
            assert np.all(np.abs(px - canon) <= world.JITTER + 1), (spec.caption, np.abs(px - canon).max())
            checked += 1
        if spec.background.kind == "plain":
            canon = np.array(world.COLOURS[spec.background.name])
            assert np.all(np.abs(np.array(scene.background_rgb) - canon) <= world.JITTER)
            assert np.all(scene.background_image == np.array(scene.background_rgb, np.uint8))
            if spec.style is None:
                near = np.pad(scene.alpha.sum(0) > 0, 1)
                near = near[1:-1, 1:-1] | near[:-2, 1:-1] | near[2:, 1:-1] | near[1:-1, :-2] | near[1:-1, 2:]
                assert np.all(scene.image[~near] == np.array(scene.background_rgb, np.uint8))
    assert checked > 200


def test_objects_do_not_overlap_and_stay_inside(train_scenes):
    for scene in train_scenes:
        f = scene.filled
        assert f.sum(0).max() <= 1
        assert not f[:, 0].any() and not f[:, -1].any() and not f[:, :, 0].any() and not f[:, :, -1].any()


def test_sizes_within_ranges(train_specs, train_scenes):
    for spec in train_specs:
        for o in spec.objects:
            lo, hi = world.SIZES[o.size]
            assert lo - 1e-6 <= o.diameter <= hi + 1e-6
            assert abs(o.rotation) <= world.MAX_ROTATION + 1e-6
    for scene in train_scenes:
        for i, o in enumerate(scene.spec.objects):
            ys, xs = np.nonzero(scene.filled[i])
            w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            factor = abs(math.cos(math.radians(o.rotation))) + abs(math.sin(math.radians(o.rotation)))
            assert 0.85 * o.diameter - 1.5 <= max(w, h) <= factor * o.diameter + 1.5, (o, w, h)
            if o.shape in ("circle", "ring"):
                assert abs(w - o.diameter) <= 1.5 and abs(h - o.diameter) <= 1.5


def test_relations_honoured():
    n = 0
    for seed in range(3000):
        spec = world.sample_spec(seed)
        if len(spec.objects) != 2:
            continue
        scene = world.render(spec)
        (ax, ay), (bx, by) = (_centroid(m) for m in scene.filled)
        r = spec.relation
        if r == "above":
            assert ay < by - 8
        elif r == "below":
            assert ay > by + 8
        elif r == "left of":
            assert ax < bx - 8
        elif r == "right of":
            assert ax > bx + 8
        else:
            assert abs(ax - bx) > 8 and abs(ax - bx) > abs(ay - by)
        if r in ("above", "below"):
            assert abs(ay - by) > abs(ax - bx)
        elif r in ("left of", "right of"):
            assert abs(ax - bx) > abs(ay - by)
        n += 1
        if n >= 300:
            break
    assert n == 300


def test_outlined_interior_shows_background():
    for seed, shape in enumerate(world.SHAPES):
        for bg in ("pink", "grass", "night"):
            spec = world.make_spec([dict(shape=shape, colour="red", size="big", pattern="outlined")], bg, seed=seed)
            scene = world.render(spec)
            interior = scene.filled[0] & (scene.alpha[0] == 0)
            assert interior.sum() > (5 if shape == "ring" else 20), shape
            assert np.array_equal(scene.image[interior], scene.background_image[interior])
            outline = scene.masks[0]
            assert np.all(outline <= scene.filled[0]) and outline.sum() < 0.8 * scene.filled[0].sum()
            full = scene.alpha[0] == 1.0
            assert np.all(np.abs(scene.image[full].astype(int) - np.array(world.COLOURS["red"])) <= world.JITTER + 1)


def test_backgrounds_contrast_with_objects(train_specs):
    kinds = set()
    for spec in train_specs:
        bg = spec.background
        kinds.add(bg.kind)
        colours = {o.colour for o in spec.objects}
        if bg.kind == "plain":
            assert bg.name in world.COLOURS and bg.name not in colours
        else:
            assert bg.name in world.SCENES
            assert not colours & set(world.VOCAB["scenes"][bg.name]["avoid_colours"])
    assert kinds == {"plain", "scene"}


def test_sampled_scenes_never_caption_a_hidden_pattern():
    """A striped or dotted white object on black (black on white) is drawn without a visible
    pattern; sampled scenes redraw such a background, so no training caption names a pattern the
    image does not show. Only those scenes change: their plain background is redrawn."""
    white_or_black_patterned_on_plain = 0
    for split in world.SPLITS:
        for seed in range(6000):
            spec = world.sample_spec(seed, split)
            patterned = [o for o in spec.objects if o.pattern in ("striped", "dotted")]
            assert all(world.pattern_visible(o.colour, spec.background) for o in patterned), spec.caption
            if spec.background.kind == "plain":
                assert spec.background.name not in {o.colour for o in spec.objects}, spec.caption
                white_or_black_patterned_on_plain += any(o.colour in ("white", "black") for o in patterned)
    assert white_or_black_patterned_on_plain > 20  # white and black patterned objects on plain backgrounds do occur
    objects = [dict(colour="white", pattern="striped"), dict(colour="red", pattern=None)]
    assert world._plain_backgrounds(objects) == [c for c in world.COLOUR_NAMES if c not in ("white", "red", "black")]


# ----------------------------------------------------------------------------- splits


def test_heldout_pairs_never_in_train(train_specs):
    held = world.HELDOUT_PAIRS
    for spec in train_specs:
        assert not any((o.colour, o.shape) in held for o in spec.objects), spec.caption
    seen = set()
    for seed in range(400):
        spec = world.sample_spec(seed, "heldout")
        pairs = {(o.colour, o.shape) for o in spec.objects}
        assert pairs & held, spec.caption
        seen |= pairs & held
    assert seen == held
    with pytest.raises(ValueError):
        world.sample_spec(0, "test")


# ----------------------------------------------------------------------------- make_spec


def test_make_spec_placement_is_attribute_independent():
    base = world.make_spec([dict(shape="circle", colour="red", size="big"), dict(shape="star", colour="blue", size="small")],
                           "white", relation="left of", seed=11)
    other = world.make_spec([dict(shape="heart", colour="green", size="big", pattern="dotted"),
                             dict(shape="ring", colour="yellow", size="small")], "grass", "pixel art", relation="left of", seed=11)
    for a, b in zip(base.objects, other.objects):
        assert (a.center, a.diameter, a.rotation) == (b.center, b.diameter, b.rotation)
    assert base.objects[0].center[0] < base.objects[1].center[0]
    spec = world.make_spec([dict(shape="star", colour="purple")], "blue", seed=2)  # held-out pairs allowed here
    assert spec.objects[0].say_size is False and spec.caption == "a purple star on a blue background"
    with pytest.raises(ValueError):
        world.make_spec([dict(shape="star", colour="blue")], "blue")
    with pytest.raises(ValueError):
        world.make_spec([dict(shape="star", colour="red"), dict(shape="ring", colour="red")], "blue")  # no relation
    with pytest.raises(ValueError):
        world.make_spec([dict(shape="blob", colour="red")], "blue")
    big2 = world.make_spec([dict(shape="square", colour="red", size="big"), dict(shape="cross", colour="blue", size="big")],
                           "white", relation="above", seed=4)
    scene = world.render(big2)
    assert scene.filled.sum(0).max() == 1
    assert all(26 - 1e-6 <= o.diameter <= 36 for o in big2.objects)


# ----------------------------------------------------------------------------- styles


def test_styles_look_the_part():
    for seed in range(6):
        obj = [dict(shape=world.SHAPES[seed], colour="red", size="big")]
        bg = ["blue", "grass", "sky", "sand", "water", "night"][seed]
        sketch = world.render(world.make_spec(obj, bg, "pencil sketch", seed=seed)).image.astype(int)
        assert np.abs(sketch - sketch.mean(-1, keepdims=True)).max() <= 12  # grayscale-ish
        pix = world.render(world.make_spec(obj, bg, "pixel art", seed=seed)).image
        cells = pix.reshape(16, 4, 16, 4, 3)
        assert np.all(cells == cells[:, :1, :, :1])  # constant 4x4 cells
        colours = {tuple(c) for c in pix.reshape(-1, 3)}
        assert colours <= {tuple(int(x) for x in c) for c in world._PALETTE}
        assert tuple(world.COLOURS["red"]) in colours


def test_textures_differ_between_scenes():
    means = {}
    for name in world.SCENES:
        img = world.render(world.make_spec([dict(shape="circle", colour="white", size="small")], name, seed=1)).background_image
        means[name] = img.reshape(-1, 3).mean(0)
        assert img.std() > 3  # textured, not flat
    assert means["grass"][1] > means["grass"][0] and means["grass"][1] > means["grass"][2]
    assert means["sky"][2] > means["sky"][0] and means["water"][2] > means["water"][0]
    assert means["night"].max() < 60 and means["sand"].min() > 120


def test_render_speed_reported():
    world.render_batch(range(50))
    t0 = time.perf_counter()
    n = 500
    world.render_batch(range(1000, 1000 + n))
    print(f"\nshapes world: {n / (time.perf_counter() - t0):.0f} scenes/s (one process)")
