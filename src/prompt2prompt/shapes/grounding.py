"""The grounding losses: training terms on the UNet's cross-attention maps that bind the caption's
words to the pixels they name (the scenes' masks are known).

`grounding_targets` says which region each token should look at; `GroundingAttnProcessor` (installed
by `grounding_attention`) collects the maps of a training step; `grounding_loss` (TokenCompose's
L_token) puts each word's attention inside its region and `grounding_share_loss` makes each
region's words hold its pixels' attention. The map sides come from the engine's own
`attention.attention_sides` and `attention.map_size`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..alignment import normalize_word, tokenize_words
from ..attention import attention_sides, map_size
from . import world

BACKGROUND_REGION = 2  # region index of the background; objects are 0 and 1 (`grounding_targets`)
REGIONS = BACKGROUND_REGION + 1  # the masks of `grounding_targets`: two objects and the background


def grounding_targets(spec, filled: np.ndarray, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """What each caption token should look at, for `grounding_loss`: ``masks`` (`REGIONS`, h, w) bool, the
    filled shape of object 0 and object 1 (all False when absent) and the background (neither), and
    ``regions`` (max_length,) int8, the mask index of each token position: the words of an object's
    phrase (size, pattern, colour, shape; as `world.caption` writes it, objects in order) look at
    that object, the background phrase's words (colour and "background", or the scene) at the
    background, every other token (articles, relations, styles, start, end, padding) at none (-1).

    Args:
        spec: the scene's `world.SceneSpec`.
        filled: (objects, h, w) bool, the scene's `Scene.filled`.
        tokenizer: the CLIP tokenizer of the model being trained.
    """
    tokens = tokenize_words(spec.caption, tokenizer)
    words = [normalize_word(w) for w in tokens.words]
    regions = np.full(int(tokenizer.model_max_length), -1, np.int8)
    masks = np.zeros((REGIONS, *filled.shape[1:]), bool)
    masks[: len(filled)] = filled
    masks[BACKGROUND_REGION] = ~filled.any(0)

    def find(phrase: list[str], start: int) -> int:
        for i in range(start, len(words) - len(phrase) + 1):
            if words[i : i + len(phrase)] == phrase:
                return i
        return -1

    def mark(first: int, count: int, region: int) -> None:
        for k in range(first, first + count):
            regions[list(tokens.word_positions[k])] = region

    after = 0
    for i, o in enumerate(spec.objects):
        phrase = world.object_phrase(o, article=False).split()
        at = find(phrase, after)
        if at >= 0:
            mark(at, len(phrase), i)
            after = at + len(phrase)
    background = [w for w in world.background_phrase(spec.background, on=False).split() if w not in ("a", "an")]
    at = find(background, 0)
    if at >= 0:
        mark(at, len(background), BACKGROUND_REGION)
    return masks, regions


class GroundingAttnProcessor:
    """A diffusers attention processor for training with `grounding_loss`: cross-attention forms its
    probabilities explicitly (softmax in float32) and appends their mean over heads to
    ``self.maps``; self-attention is plain SDPA. The output is the layer's usual one, so the
    diffusion loss is unchanged. `grounding_attention` installs it for a chunk and restores the
    UNet's processors after.

    Args:
        maps: the list the maps are appended to, ``(batch, pixels, tokens)`` each.
        sides: the map sides (e.g. ``{8, 4}``) whose cross-attention maps are collected; the
            other layers run plain SDPA and are not supervised. None: every layer.
        latent_hw: the latent ``(height, width)`` the UNet is called with; a layer's map side is
            ``max`` of its `attention.map_size`.
    """

    def __init__(self, maps: list, sides: frozenset[int] | None = None, *, latent_hw: tuple[int, int]):
        self.maps = maps
        self.sides = sides
        self.latent_hw = tuple(latent_hw)

    def collects(self, pixels: int) -> bool:
        """Whether the cross-attention map of a layer with ``pixels`` query positions is collected."""
        return self.sides is None or max(map_size(pixels, self.latent_hw)) in self.sides

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
            raise ValueError("GroundingAttnProcessor supports the plain transformer-block attention of the shapes UNet only")
        h = attn.heads
        q = attn.to_q(hidden_states)  # (batch, pixels, heads * dim)
        k, v = attn.to_k(context), attn.to_v(context)  # (batch, keys, heads * dim)
        q, k, v = (x.view(batch, x.shape[1], h, -1).transpose(1, 2) for x in (q, k, v))  # (batch, heads, length, dim)
        if is_cross and self.collects(hidden_states.shape[1]):
            probs = (torch.matmul(q, k.transpose(-1, -2)) * attn.scale).softmax(-1, dtype=torch.float32)  # (batch, heads, pixels, tokens)
            self.maps.append(probs.mean(1))  # (batch, pixels, tokens)
            out = torch.matmul(probs.to(v.dtype), v)  # (batch, heads, pixels, dim)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (batch, heads, pixels, dim)
        out = out.transpose(1, 2).reshape(batch, -1, h * out.shape[-1])  # (batch, pixels, heads * dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def latent_size(unet) -> tuple[int, int]:
    """The latent ``(height, width)`` the UNet is trained on: its config's ``sample_size``."""
    size = unet.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def map_sides(unet) -> list[int]:
    """The sides of the UNet's cross-attention maps at its training latent size, largest first
    (e.g. ``[16, 8, 4]``; `attention.attention_sides`)."""
    return sorted(attention_sides(unet, latent_size(unet)), reverse=True)


def check_grounding_sides(unet, sides) -> None:
    """Raise ValueError unless ``sides`` is a non-empty subset of `map_sides`."""
    available = map_sides(unet)
    if not sides or not set(sides) <= set(available):
        raise ValueError(f"grounding sides {list(sides)} are not among this model's cross-attention map sides "
                         f"{available}; pass some of those (e.g. --grounding-sides {','.join(map(str, available[1:] or available))})")


@contextmanager
def grounding_attention(unet, maps: list, sides: frozenset[int] | None = None) -> Iterator[None]:
    """Install a `GroundingAttnProcessor` that collects into ``maps`` on every attention layer of
    ``unet`` (``unet.set_attn_processor``); restore the original processors on exit, also when the
    body raises."""
    original = unet.attn_processors
    unet.set_attn_processor(GroundingAttnProcessor(maps, sides, latent_hw=latent_size(unet)))
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def grounding_loss(maps: list[torch.Tensor], masks: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Token-level grounding loss on cross-attention maps (TokenCompose's L_token, Wang et al.,
    CVPR 2024): for each caption token ``j`` that names a region ``R`` and each layer's
    head-averaged map ``A`` (a distribution over tokens at each pixel), ``(1 - sum_p A_pj R_p /
    sum_p A_pj)^2``: zero when the token's attention lies inside its region, averaged over the
    supervised tokens of the batch and over the layers.

    Args:
        maps: per layer ``(batch, pixels, tokens)`` float32, ``pixels`` a square side's cells.
        masks: ``(batch, regions, H, W)`` bool or float, the regions at image resolution.
        regions: ``(batch, tokens)`` int, each token's region index, or < 0 for none.

    Returns:
        A scalar; zero if no token is supervised.
    """
    valid = (regions >= 0).to(maps[0].dtype)  # (batch, tokens)
    count = valid.sum().clamp_min(1)  # no host sync: a batch with no supervised token gives 0
    total = maps[0].new_zeros(())
    for a in maps:
        side = math.isqrt(a.shape[1])
        r = F.adaptive_avg_pool2d(masks.to(a.dtype), side).flatten(2)  # (batch, regions, pixels): coverage of each cell
        target = r.gather(1, regions.clamp(min=0).long()[..., None].expand(-1, -1, r.shape[2]))  # (batch, tokens, pixels)
        inside = (a.transpose(1, 2) * target).sum(-1)  # (batch, tokens)
        share = inside / a.sum(1).clamp_min(1e-8)  # (batch, tokens)
        total = total + (((1 - share) ** 2) * valid).sum() / count
    return total / len(maps)


def grounding_share_loss(maps: list[torch.Tensor], masks: torch.Tensor, regions: torch.Tensor,
                         words: torch.Tensor | None = None) -> torch.Tensor:
    """The pixel side of `grounding_loss`: at each cell of a region, the share of the cell's
    attention that the tokens naming that region hold together, ``s_p = sum_{j in R} A_pj``, and
    the loss ``(1 - s_p)^2``, averaged over the region's cells weighted by how much of them it
    covers, then over the regions that a token names (each region counts once, so that a small
    object weighs as much as the background), then over the layers. `grounding_loss` puts a word's
    attention inside its region; this one makes the region's words, not the start token or the
    padding, hold its pixels' attention, so that re-weighting a word (the paper's Sec. 3.2 scales its
    column ``M_pj``) and LocalBlend's mask act where the word is. TokenCompose's L_pixel pursues the
    same with a per-token BCE.

    Args:
        maps: per layer ``(batch, pixels, tokens)`` float32, ``pixels`` a square side's cells.
        masks: ``(batch, regions, H, W)`` bool or float, the regions at image resolution.
        regions: ``(batch, tokens)`` int, each token's region index, or < 0 for none.
        words: optional ``(batch, tokens)`` bool, the caption's word tokens. Given, the share is
            taken among them, ``s_p = sum_{j in R} A_pj / sum_{j in words} A_pj``: the region's
            words should outweigh the caption's other words at its pixels, and the start token and
            the padding keep whatever mass they hold.

    Returns:
        A scalar; zero if no token is supervised.
    """
    n_regions = masks.shape[1]
    onehot = F.one_hot(regions.clamp(min=0).long(), n_regions).to(maps[0].dtype)  # (batch, tokens, regions)
    onehot = onehot * (regions >= 0)[..., None].to(onehot.dtype)
    named = (onehot.sum(1) > 0).to(maps[0].dtype)  # (batch, regions): regions some token names
    total = maps[0].new_zeros(())
    for a in maps:
        side = math.isqrt(a.shape[1])
        cover = F.adaptive_avg_pool2d(masks.to(a.dtype), side).flatten(2)  # (batch, regions, pixels)
        share = torch.einsum("bpt,btr->brp", a, onehot)  # (batch, regions, pixels): the region's words' share of each cell
        if words is not None:
            held = torch.einsum("bpt,bt->bp", a, words.to(a.dtype))  # (batch, pixels): all the words' share
            share = share / held[:, None, :].clamp_min(1e-8)  # (batch, regions, pixels): among the words
        per_region = (cover * (1 - share) ** 2).sum(-1) / cover.sum(-1).clamp_min(1e-8)  # (batch, regions)
        scored = named * (cover.sum(-1) > 0).to(named.dtype)  # (batch, regions): named and present at this side
        total = total + (per_region * scored).sum() / scored.sum().clamp_min(1)  # no host sync
    return total / len(maps)


def backward_split(loss: torch.Tensor, extra: torch.Tensor, extra_params: list[torch.Tensor]) -> None:
    """Accumulate into ``.grad`` the gradient of ``loss`` for every parameter and that of ``extra``
    for ``extra_params`` only: e.g. a grounding loss that trains the UNet but not the text encoder,
    which still learns from the diffusion loss. Two backward passes over the shared graph: the
    first, restricted to ``extra_params`` (it skips what only the others need), keeps the graph for
    the second."""
    torch.autograd.backward(extra, inputs=extra_params, retain_graph=True)
    loss.backward()

