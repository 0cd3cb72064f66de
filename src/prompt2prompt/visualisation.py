"""Pictures of attention and of edits: pure functions of arrays and images, no model needed.

- `overlay`: a heat map drawn in colour over an image.
- `token_heatmaps`: one overlay per word of a prompt from its cross-attention maps (the paper's
  cross-attention figure).
- `self_attention_components`: the top principal components of a self-attention map (the paper's
  self-attention figure).
- `labelled_grid`: images side by side with a caption under each, chosen words marked.
- `align_words`: which source word each target word was aligned to by an edit, from the
  library's own alignments (`replacement_mapper`, `refinement_mapper`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .alignment import PromptTokens, normalize_word, refinement_mapper, replacement_mapper, split_words
from .arguments import ArgumentError, default
from .edits import EditMode, resolve_mode

#: Colour of marked (changed) words in `labelled_grid` captions.
MARK_COLOUR = (200, 20, 20)
TEXT_COLOUR = (20, 20, 20)
BACKGROUND = (255, 255, 255)


# ----------------------------------------------------------------------------- arrays and images


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; half precision becomes float32 (numpy has no bfloat16)
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _as_rgb(image) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    array = _as_numpy(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return PIL.Image.fromarray(array, "RGB")


def colormap(values) -> np.ndarray:
    """The "jet" colour map: values in [0, 1] (clipped) ``(...)`` -> uint8 RGB ``(..., 3)``;
    0 is dark blue, 0.5 green-yellow, 1 dark red."""
    x = np.clip(np.nan_to_num(_as_numpy(values).astype(np.float64)), 0.0, 1.0)
    channels = [np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]  # r, g, b
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)


def resize_map(heat, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map to ``size = (width, height)``."""
    heat = np.nan_to_num(_as_numpy(heat).astype(np.float32))
    if heat.ndim != 2:
        raise ValueError(f"a heat map must be 2-D (height, width), got shape {heat.shape}")
    if (heat.shape[1], heat.shape[0]) == tuple(size):
        return heat
    return np.asarray(PIL.Image.fromarray(heat, mode="F").resize(size, PIL.Image.BILINEAR))


def overlay(image, heat, alpha: float = 0.5) -> PIL.Image.Image:
    """Draw ``heat`` (a ``(h, w)`` map with values in [0, 1], clipped) over ``image`` in colour.

    The map is resized bilinearly to the image, coloured with `colormap` and mixed with the image:
    ``(1 - alpha) * image + alpha * colour``.

    Args:
        image: a PIL image or an array ``(H, W, 3)`` (uint8, or floats in [0, 1]).
        heat: ``(h, w)`` array or tensor; any size.
        alpha: weight of the colour, in [0, 1].

    Returns:
        An RGB PIL image of the image's size.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    base = _as_rgb(image)
    colour = colormap(resize_map(heat, base.size)).astype(np.float32)  # (H, W, 3)
    mixed = (1.0 - alpha) * np.asarray(base, dtype=np.float32) + alpha * colour
    return PIL.Image.fromarray(np.clip(mixed.round(), 0, 255).astype(np.uint8), "RGB")


def normalise_map(heat) -> np.ndarray:
    """``heat / heat.max()`` (zeros stay zeros), as the paper's figure normalises each token's map."""
    heat = np.nan_to_num(_as_numpy(heat).astype(np.float32))
    top = float(heat.max()) if heat.size else 0.0
    return heat / top if top > 0 else np.zeros_like(heat)


def token_heatmaps(image, attention_maps, prompt_index: int = 0, alpha: float = 0.5) -> list[tuple[str, PIL.Image.Image]]:
    """One heat map per word of a prompt, drawn over its image (the paper's cross-attention figure).

    Each word's map is `AttentionMaps.word` (its tokens' maps summed), divided by its maximum and
    drawn with `overlay`.

    Args:
        image: the prompt's generated image (PIL or array).
        attention_maps: an `AttentionMaps` (``maps`` of shape ``(prompts, h, w, tokens)``).
        prompt_index: which prompt of ``attention_maps`` (0 = the source).
        alpha: the overlay's colour weight.

    Returns:
        ``[(word, overlay image), ...]`` in the prompt's word order.
    """
    prompts = attention_maps.prompts
    if not -len(prompts) <= prompt_index < len(prompts):
        raise ValueError(f"prompt_index {prompt_index} is out of range for {len(prompts)} prompts")
    words = prompts[prompt_index].words
    return [(word, overlay(image, normalise_map(attention_maps.word(prompt_index, k)), alpha)) for k, word in enumerate(words)]


@dataclass(frozen=True)
class SelfAttentionComponents:
    """The top principal components of a self-attention map.

    Attributes:
        images: ``(k, side, side)`` float32, each component min-max scaled to [0, 1] for display.
        vectors: ``(k, pixels)`` float64, the unit right singular vectors of the row-centred map
            (the sign of each chosen so that its largest-magnitude entry is positive).
        singular_values: ``(k,)`` float64, descending.
    """

    images: np.ndarray
    vectors: np.ndarray
    singular_values: np.ndarray


def self_attention_components(self_map, side: int, k: int = default("top_k")) -> SelfAttentionComponents:
    """Top-``k`` SVD components of a ``(pixels, pixels)`` self-attention map (the paper's Fig. 4 view).

    As the paper's code: subtract each row's mean, take the SVD ``U S Vh``, and show each of the
    first ``k`` rows of ``Vh`` as a ``(side, side)`` image. Pixels are row-major, as
    `Prompt2PromptPipelineOutput.self_attention` stores them.

    Args:
        self_map: ``(pixels, pixels)`` array or tensor with ``pixels == side * side``.
        side: the map's side.
        k: number of components (at most ``pixels``; fewer are returned when the map is smaller).

    Raises:
        ValueError: the map is not square, or not ``side * side`` pixels; `ArgumentError` (of
            ``top_k``, the command line's ``--top-k``) for ``k < 1``.
    """
    matrix = np.nan_to_num(_as_numpy(self_map).astype(np.float64))
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise ValueError(f"side must be a positive integer, got {side!r}")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != side * side:
        raise ValueError(f"self_map must have shape ({side * side}, {side * side}) for side {side}, got {matrix.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ArgumentError("top_k", f"k must be a positive integer, got {k!r}")
    k = min(k, matrix.shape[0])
    centred = matrix - matrix.mean(axis=1, keepdims=True)
    _, values, vh = np.linalg.svd(centred, full_matrices=False)
    vectors = vh[:k].copy()  # (k, pixels)
    largest = np.abs(vectors).argmax(axis=1)
    signs = np.sign(vectors[np.arange(k), largest])
    vectors *= np.where(signs == 0, 1.0, signs)[:, None]
    images = vectors.reshape(k, side, side)
    low = images.min(axis=(1, 2), keepdims=True)
    span = images.max(axis=(1, 2), keepdims=True) - low
    scaled = np.where(span > 0, (images - low) / np.where(span > 0, span, 1.0), 0.0)
    return SelfAttentionComponents(scaled.astype(np.float32), vectors, values[:k].copy())


def gray_image(values, size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """A ``(h, w)`` array in [0, 1] (clipped) as a grey RGB image, resized (nearest) to ``size = (width, height)``."""
    array = (np.clip(np.nan_to_num(_as_numpy(values).astype(np.float64)), 0.0, 1.0) * 255).round().astype(np.uint8)
    image = PIL.Image.fromarray(array, "L").convert("RGB")
    return image.resize(size, PIL.Image.NEAREST) if size is not None and tuple(size) != image.size else image


# ----------------------------------------------------------------------------- captions and grids


@lru_cache(maxsize=4)
def _font(size: int):
    try:
        return PIL.ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # no FreeType: the fixed bitmap font
        return PIL.ImageFont.load_default()


def _text_width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else font.getbbox(text)[2]


def caption_pieces(label: str, marked: Collection[int | str] = ()) -> list[tuple[str, bool]]:
    """Split a caption into ``(text, marked)`` pieces; words (`split_words`) named in ``marked`` by
    index or by text (case-insensitive) are marked and bracketed, everything else kept as written."""
    marked_index = {m for m in marked if isinstance(m, int) and not isinstance(m, bool)}
    marked_text = {normalize_word(m) for m in marked if isinstance(m, str)}
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for index, word in enumerate(split_words(label)):
        start = label.find(word, cursor)
        if start < 0:  # cannot happen for split_words' output; keep the rest as plain text
            break
        if start > cursor:
            pieces.append((label[cursor:start], False))
        mark = index in marked_index or normalize_word(word) in marked_text
        pieces.append((f"[{word}]" if mark else word, mark))
        cursor = start + len(word)
    if cursor < len(label):
        pieces.append((label[cursor:], False))
    return pieces


def _wrap(pieces: list[tuple[str, bool]], font, width: float) -> list[list[tuple[str, bool]]]:
    """Greedy word wrap of coloured pieces at whitespace (and at newlines) to ``width`` pixels."""
    lines: list[list[tuple[str, bool]]] = [[]]
    line_width = 0.0
    space = _text_width(font, " ")
    unit: list[tuple[str, bool]] = []

    def flush_unit():
        nonlocal unit, line_width
        if not unit:
            return
        unit_width = sum(_text_width(font, t) for t, _ in unit)
        if lines[-1] and line_width + space + unit_width > width:
            lines.append([])
            line_width = 0.0
        if lines[-1]:
            lines[-1].append((" ", False))
            line_width += space
        lines[-1].extend(unit)
        line_width += unit_width
        unit = []

    for text, mark in pieces:
        buffer = ""
        for char in text:
            if char.isspace():
                if buffer:
                    unit.append((buffer, mark))
                    buffer = ""
                flush_unit()
                if char == "\n":
                    lines.append([])
                    line_width = 0.0
            else:
                buffer += char
        if buffer:
            unit.append((buffer, mark))
    flush_unit()
    return lines


def labelled_grid(
    images: Sequence,
    labels: Sequence[str],
    marked_words: Sequence[Collection[int | str]] | None = None,
    columns: int | None = None,
    min_cell: int = 192,
    font_size: int = 14,
) -> PIL.Image.Image:
    """Images side by side with a caption under each; marked words in colour and brackets.

    Small images are enlarged by a whole factor (nearest neighbour) so that a cell is at least
    ``min_cell`` pixels wide; captions wrap at spaces (and at ``\\n``).

    Args:
        images: PIL images or arrays ``(H, W, 3)``; different sizes are centred in equal cells.
        labels: one caption per image.
        marked_words: per image, the words to mark: indices into `split_words` of its caption, or
            words (case-insensitive); None marks nothing.
        columns: images per row (default: all in one row).
        min_cell: smallest cell width in pixels.
        font_size: caption font size (with FreeType; else the fixed default font).

    Returns:
        One RGB PIL image.
    """
    if len(images) == 0:
        raise ValueError("labelled_grid needs at least one image")
    if len(labels) != len(images):
        raise ValueError(f"labelled_grid got {len(images)} images but {len(labels)} labels")
    if marked_words is not None and len(marked_words) != len(images):
        raise ValueError(f"labelled_grid got {len(images)} images but {len(marked_words)} sets of marked words")
    columns = len(images) if columns is None else columns
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns!r}")
    pictures = [_as_rgb(im) for im in images]
    max_w = max(p.width for p in pictures)
    max_h = max(p.height for p in pictures)
    scale = max(1, math.ceil(min_cell / max_w))
    cell_w, cell_h = max_w * scale, max_h * scale
    pad = 6
    font = _font(font_size)
    top, bottom = font.getbbox("Ag[")[1], font.getbbox("Ag[")[3]
    line_h = int(bottom - min(top, 0)) + 3
    wrapped = [
        _wrap(caption_pieces(str(label), marked_words[i] if marked_words is not None else ()), font, cell_w - 2 * pad)
        for i, label in enumerate(labels)
    ]
    caption_h = max(len(lines) for lines in wrapped) * line_h + 2 * pad
    rows = math.ceil(len(pictures) / columns)
    used_columns = min(columns, len(pictures))
    gap = pad
    grid = PIL.Image.new("RGB", (used_columns * cell_w + (used_columns + 1) * gap, rows * (cell_h + caption_h) + (rows + 1) * gap - gap), BACKGROUND)
    for i, picture in enumerate(pictures):
        row, col = divmod(i, columns)
        x0 = gap + col * (cell_w + gap)
        y0 = gap + row * (cell_h + caption_h)
        if scale > 1:
            picture = picture.resize((picture.width * scale, picture.height * scale), PIL.Image.NEAREST)
        grid.paste(picture, (x0 + (cell_w - picture.width) // 2, y0 + (cell_h - picture.height) // 2))
        caption = PIL.Image.new("RGB", (cell_w, caption_h), BACKGROUND)  # drawn apart so long words are clipped
        draw = PIL.ImageDraw.Draw(caption)
        for n, line in enumerate(wrapped[i]):
            line_width = sum(_text_width(font, t) for t, _ in line)
            x = max(pad, (cell_w - line_width) / 2)
            for text, mark in line:
                draw.text((x, pad + n * line_h), text, fill=MARK_COLOUR if mark else TEXT_COLOUR, font=font)
                x += _text_width(font, text)
        grid.paste(caption, (x0, y0 + cell_h))
    return grid


# ----------------------------------------------------------------------------- word alignment


@dataclass(frozen=True)
class WordAlignment:
    """How an edit aligned the words of a target prompt to the source prompt.

    Attributes:
        mode: the alignment used: ``REPLACE`` (word swap) or ``REFINE`` (global alignment).
        source: the tokenized source prompt.
        target: the tokenized target prompt.
        pairs: for each target word, ``(source word index or None when the word is new, target word index)``.
        removed: source word indices that no target word is aligned to.
    """

    mode: EditMode
    source: PromptTokens
    target: PromptTokens
    pairs: tuple[tuple[int | None, int], ...]
    removed: tuple[int, ...]
    partial: tuple[int, ...] = ()

    @property
    def changed_target(self) -> set[int]:
        """Target words that are new, partly new, or differ from their source word."""
        out = set(self.partial)
        for src, tgt in self.pairs:
            if src is None or normalize_word(self.source.words[src]) != normalize_word(self.target.words[tgt]):
                out.add(tgt)
        return out

    @property
    def changed_source(self) -> set[int]:
        """Source words that were swapped or removed."""
        out = set(self.removed)
        for src, tgt in self.pairs:
            if src is not None and normalize_word(self.source.words[src]) != normalize_word(self.target.words[tgt]):
                out.add(src)
        return out

    def describe(self) -> str:
        """One line: ``circle -> square`` for swaps, ``+word`` for new words, ``-word`` for removed ones."""
        parts = []
        for src, tgt in self.pairs:
            word = self.target.words[tgt]
            if src is None:
                parts.append(f"+{word}")
            elif normalize_word(self.source.words[src]) != normalize_word(word):
                parts.append(f"{self.source.words[src]} -> {word}")
            elif tgt in self.partial:
                parts.append(f"{self.source.words[src]} ~ {word}")
        parts += [f"-{self.source.words[k]}" for k in self.removed]
        return ", ".join(parts) if parts else "no words differ"


def align_words(source: PromptTokens, target: PromptTokens, mode: EditMode | str) -> WordAlignment:
    """Which source word each target word was aligned to, from the edit's own token alignment.

    ``replace`` reads `replacement_mapper` (same number of words, position by position);
    ``refine`` reads `refinement_mapper` (global alignment of the token sequences; tokens it
    inserts are new). ``auto`` and ``none`` align as ``auto`` would choose (``none`` injects
    nothing; its alignment only says which words differ).

    Raises:
        ValueError: ``replace`` for prompts with different numbers of words.
    """
    mode = EditMode.parse(mode)
    if mode in (EditMode.AUTO, EditMode.NONE):
        mode = resolve_mode(EditMode.AUTO, source, [target])
    word_of = {p: k for k, positions in enumerate(source.word_positions) for p in positions}
    pairs: list[tuple[int | None, int]] = []
    partial: list[int] = []
    if mode is EditMode.REPLACE:
        mapper = replacement_mapper(source, target)  # (source tokens, target tokens)
        for k, positions in enumerate(target.word_positions):
            rows = sorted({int(r) for r in mapper[:, list(positions)].nonzero()[:, 0].tolist()})
            words = [word_of[r] for r in rows if r in word_of]
            pairs.append((words[0] if words else None, k))
    else:
        index, alphas = refinement_mapper(source, target)  # (tokens,) source position, (tokens,) 1 = aligned
        for k, positions in enumerate(target.word_positions):
            aligned = [p for p in positions if alphas[p] > 0]
            if aligned and len(aligned) < len(positions):
                partial.append(k)
            words = [word_of[int(index[p])] for p in aligned if int(index[p]) in word_of]
            pairs.append((words[0] if words else None, k))
    used = {s for s, _ in pairs if s is not None}
    removed = tuple(k for k in range(len(source.words)) if k not in used)
    return WordAlignment(mode, source, target, tuple(pairs), removed, tuple(partial))
