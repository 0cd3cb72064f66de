"""The picture-making functions of `prompt2prompt.visualisation` on hand-made arrays (no model)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from prompt2prompt.alignment import PromptTokens, tokenize_words
from prompt2prompt.edits import EditMode
from prompt2prompt.pipeline import AttentionMaps
from prompt2prompt.visualisation import (
    MARK_COLOUR,
    align_words,
    caption_pieces,
    colormap,
    gray_image,
    labelled_grid,
    normalise_map,
    overlay,
    resize_map,
    self_attention_components,
    token_heatmaps,
)


@pytest.fixture(scope="module")
def shapes_tokenizer():
    from transformers import CLIPTokenizer

    from prompt2prompt.shapes import MODEL_DIR

    return CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")


def _image(w=32, h=24, value=128):
    return PIL.Image.fromarray(np.full((h, w, 3), value, np.uint8), "RGB")


# ----------------------------------------------------------------------------- colour and overlays


def test_colormap_shape_range_and_ends():
    values = np.linspace(-0.5, 1.5, 21).reshape(3, 7)
    colours = colormap(values)
    assert colours.shape == (3, 7, 3) and colours.dtype == np.uint8
    low, high = colormap(np.array([0.0, 1.0]))
    assert low[2] > 100 and low[0] == 0  # 0: dark blue
    assert high[0] > 100 and high[2] == 0  # 1: dark red
    assert (colormap(np.array([-3.0])) == colormap(np.array([0.0]))).all()  # clipped
    assert (colormap(np.array([np.nan])) == colormap(np.array([0.0]))).all()


def test_resize_map_bilinear_and_rejects_non_2d():
    heat = np.zeros((4, 4), np.float32)
    heat[1, 2] = 1.0
    big = resize_map(heat, (16, 8))  # (width, height)
    assert big.shape == (8, 16) and big.dtype == np.float32
    assert 0.0 <= big.min() and big.max() <= 1.0 and big.max() > 0.5
    assert resize_map(heat, (4, 4)) is not None and np.array_equal(resize_map(heat, (4, 4)), heat)
    with pytest.raises(ValueError, match="2-D"):
        resize_map(np.zeros((2, 2, 2)), (4, 4))


def test_overlay_mixes_image_and_colour():
    image = _image(32, 24, 100)
    heat = torch.rand(4, 4)
    out = overlay(image, heat, alpha=0.5)
    assert out.size == image.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(overlay(image, heat, alpha=0.0)), np.asarray(image))
    pure = np.asarray(overlay(image, heat, alpha=1.0))
    assert np.array_equal(pure, colormap(resize_map(heat, image.size)))
    # arrays in [0, 1] work as images too
    out2 = overlay(np.full((24, 32, 3), 100 / 255, np.float32), heat)
    assert np.abs(np.asarray(out2).astype(int) - np.asarray(out).astype(int)).max() <= 1
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, heat, alpha=1.5)


def test_normalise_map():
    heat = np.array([[0.0, 0.5], [0.25, 2.0]])
    norm = normalise_map(heat)
    assert norm.max() == pytest.approx(1.0) and norm[0, 1] == pytest.approx(0.25)
    assert (normalise_map(np.zeros((3, 3))) == 0).all()


def _fake_tokens(prompt: str, length: int = 12) -> PromptTokens:
    words = tuple(prompt.split())
    return PromptTokens(prompt, words, tuple((k + 1,) for k in range(len(words))), tuple(range(len(words) + 2)), length)


def test_token_heatmaps_one_overlay_per_word_hot_where_the_word_attends():
    tokens = _fake_tokens("a red circle")
    maps = torch.full((1, 4, 4, tokens.max_length), 0.01)
    spots = {0: (0, 0), 1: (3, 3), 2: (0, 3)}  # word -> (row, col) of its attention
    for k, (r, c) in spots.items():
        maps[0, r, c, k + 1] = 1.0
    attention = AttentionMaps(maps, [tokens], 4)
    image = _image(64, 64, 90)
    out = token_heatmaps(image, attention, 0, alpha=1.0)
    assert [w for w, _ in out] == ["a", "red", "circle"]
    for k, (word, picture) in enumerate(out):
        assert picture.size == image.size
        expected = colormap(resize_map(normalise_map(maps[0, :, :, k + 1]), image.size))
        assert np.array_equal(np.asarray(picture), expected)
        for j, (r, c) in spots.items():
            red, _, blue = np.asarray(picture)[r * 16 + 8, c * 16 + 8].astype(int)  # centre of a map cell
            assert (red > 100 and blue == 0) if j == k else (blue > red), (word, j)
    with pytest.raises(ValueError, match="prompt_index"):
        token_heatmaps(image, attention, 3)


# ----------------------------------------------------------------------------- self-attention components


def test_svd_components_span_a_low_rank_map():
    rng = np.random.default_rng(0)
    side, rank = 5, 3
    pixels = side * side
    low_rank = rng.normal(size=(pixels, rank)) @ rng.normal(size=(rank, pixels))
    low_rank -= low_rank.mean(axis=1, keepdims=True)  # already row-centred
    matrix = low_rank + rng.normal(size=(pixels, 1))  # constant per row: removed by the centring
    comps = self_attention_components(torch.tensor(matrix, dtype=torch.float64), side, k=rank)
    assert comps.images.shape == (rank, side, side) and comps.images.dtype == np.float32
    assert comps.vectors.shape == (rank, pixels)
    # the components reconstruct the centred map: projecting onto them loses nothing
    projected = low_rank @ comps.vectors.T @ comps.vectors
    np.testing.assert_allclose(projected, low_rank, atol=1e-8)
    np.testing.assert_allclose(comps.vectors @ comps.vectors.T, np.eye(rank), atol=1e-10)
    # singular values match numpy's and descend; further components are ~0
    expected = np.linalg.svd(low_rank, compute_uv=False)
    np.testing.assert_allclose(comps.singular_values, expected[:rank], rtol=1e-8)
    more = self_attention_components(matrix, side, k=rank + 2)
    assert more.singular_values[rank:].max() < 1e-8 * more.singular_values[0]
    assert (np.diff(more.singular_values) <= 1e-12).all()


def test_svd_component_images_are_scaled_and_signed_deterministically():
    rng = np.random.default_rng(1)
    side = 4
    attention = rng.random((side * side, side * side))
    attention /= attention.sum(axis=1, keepdims=True)  # rows sum to 1, as a real self-attention map
    comps = self_attention_components(attention, side, k=6)
    assert comps.images.min() >= 0.0 and comps.images.max() <= 1.0
    assert np.allclose(comps.images.reshape(6, -1).max(axis=1), 1.0)
    assert np.allclose(comps.images.reshape(6, -1).min(axis=1), 0.0)
    largest = np.abs(comps.vectors).argmax(axis=1)
    assert (comps.vectors[np.arange(6), largest] > 0).all()
    again = self_attention_components(attention, side, k=6)
    assert np.array_equal(again.images, comps.images)
    # k is capped at the number of pixels
    assert self_attention_components(np.eye(4), 2, k=10).images.shape == (4, 2, 2)


@pytest.mark.parametrize(
    "matrix, side, k, match",
    [
        (np.zeros((16, 16)), 3, 2, "shape"),
        (np.zeros((16, 8)), 4, 2, "shape"),
        (np.zeros((16, 16)), 4, 0, "k must"),
        (np.zeros((16, 16)), 0, 2, "side must"),
    ],
)
def test_svd_components_reject_bad_input(matrix, side, k, match):
    with pytest.raises(ValueError, match=match):
        self_attention_components(matrix, side, k)


def test_gray_image():
    image = gray_image(np.array([[0.0, 1.0], [0.5, 2.0]]), (8, 8))
    assert image.size == (8, 8) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels[0, 0, 0] == 0 and pixels[0, 7, 0] == 255 and pixels[7, 7, 0] == 255


# ----------------------------------------------------------------------------- grids


def test_caption_pieces_mark_by_index_and_by_word():
    pieces = caption_pieces("a red circle, a blue square", {2, "SQUARE"})
    text = "".join(t for t, _ in pieces)
    assert text == "a red [circle], a blue [square]"
    assert [t for t, m in pieces if m] == ["[circle]", "[square]"]
    assert caption_pieces("two  spaces\nnewline") == [("two", False), ("  ", False), ("spaces", False), ("\n", False), ("newline", False)]


def _red_pixels(image: PIL.Image.Image) -> int:
    pixels = np.asarray(image).astype(int)
    target = np.array(MARK_COLOUR)
    return int((np.abs(pixels - target).max(axis=-1) < 60).sum())


def test_labelled_grid_layout_and_marks():
    images = [_image(64, 64, v) for v in (0, 120, 240)]
    labels = ["a red circle on a blue background", "a red square on a blue background", "a long caption " * 6]
    grid = labelled_grid(images, labels, min_cell=192)
    assert grid.mode == "RGB"
    assert grid.width == 3 * 192 + 4 * 6  # three cells (64 px enlarged x3) and gaps
    assert grid.height > 192
    assert _red_pixels(grid) == 0
    marked = labelled_grid(images, labels, [set(), {2}, set()], min_cell=192)
    assert marked.size[0] == grid.size[0]
    assert _red_pixels(marked) > 20
    # the enlarged image sits in its cell unchanged (nearest-neighbour)
    cell = np.asarray(marked)[6 : 6 + 192, 6 + 192 + 6 : 6 + 2 * 192 + 6]
    assert (cell == 120).all()


def test_labelled_grid_columns_and_errors():
    images = [_image(200, 100, 50)] * 5
    grid = labelled_grid(images, ["x"] * 5, columns=2)
    assert grid.width == 2 * 200 + 3 * 6
    one_row = labelled_grid(images[:1], ["x"])
    assert grid.height > 2 * one_row.height  # three rows
    with pytest.raises(ValueError, match="labels"):
        labelled_grid(images, ["x"])
    with pytest.raises(ValueError, match="marked"):
        labelled_grid(images, ["x"] * 5, [set()])
    with pytest.raises(ValueError, match="at least one"):
        labelled_grid([], [])
    with pytest.raises(ValueError, match="columns"):
        labelled_grid(images, ["x"] * 5, columns=0)


# ----------------------------------------------------------------------------- word alignment


def test_align_words_replace(shapes_tokenizer):
    source = tokenize_words("a red circle on a blue background", shapes_tokenizer)
    target = tokenize_words("a red square on a blue background", shapes_tokenizer)
    alignment = align_words(source, target, "auto")
    assert alignment.mode is EditMode.REPLACE
    assert alignment.pairs == tuple((k, k) for k in range(7))
    assert alignment.changed_target == {2} and alignment.changed_source == {2}
    assert alignment.describe() == "circle -> square"
    assert align_words(source, source, "replace").describe() == "no words differ"
    with pytest.raises(ValueError, match="same number of words"):
        align_words(source, tokenize_words("a red circle", shapes_tokenizer), "replace")


def test_align_words_refine(shapes_tokenizer):
    source = tokenize_words("a red circle on a blue background", shapes_tokenizer)
    target = tokenize_words("a red circle on a blue background in pixel art style", shapes_tokenizer)
    alignment = align_words(source, target, EditMode.REFINE)
    assert alignment.mode is EditMode.REFINE
    assert alignment.pairs[:7] == tuple((k, k) for k in range(7))
    assert [s for s, _ in alignment.pairs[7:]] == [None] * 4
    assert alignment.changed_target == {7, 8, 9, 10} and alignment.changed_source == set()
    assert alignment.describe() == "+in, +pixel, +art, +style"
    # removing words: the source's extra words are "removed"; "none" aligns as auto would
    shorter = align_words(target, source, "none")
    assert shorter.mode is EditMode.REFINE
    assert shorter.removed == (7, 8, 9, 10)
    assert shorter.describe() == "-in, -pixel, -art, -style"
