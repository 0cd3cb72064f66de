"""The paper's edit equations on attention maps and latents: small pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def edit_cross_attention(
    source: torch.Tensor,
    targets: torch.Tensor,
    mapper: torch.Tensor | None,
    alphas: torch.Tensor | None,
    weights: torch.Tensor | None,
    equalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edited cross-attention maps of the target prompts (paper Sec. 3.2 and Algorithm 1, line 8).

    For target ``k`` and token ``j``:

    - word swap: ``M^_j = sum_i M_i W_ij`` (the source map through the token mapper);
    - refinement: ``M^_j = M*_j`` if ``A(j) = None`` else ``M_{A(j)}`` (``alphas`` marks aligned tokens);
    - re-weighting: ``M^_j = c_j * M^_j`` (no renormalisation);
    - schedule: ``Edit = M^`` while injecting (``weights = 1``), else the target's own ``M*``.

    Args:
        source: ``(heads, pixels, tokens)`` the source prompt's maps.
        targets: ``(targets, heads, pixels, tokens)`` each target's own maps.
        mapper: ``(targets, tokens, tokens)`` source position -> target position weights, or
            ``(targets, tokens)`` long: the one source position each target position reads, or
            None: the identity (every target token reads the source token at its own position).
        alphas: ``(targets, tokens)`` 1 where the target token takes the mapped source map;
            None = all ones.
        weights: ``(targets, tokens)`` this step's injection weights; None = all ones.
        equalizer: ``(targets, tokens)`` re-weighting factors, or None.

    Returns:
        ``(targets, heads, pixels, tokens)`` edited maps.
    """
    if mapper is None:
        mapped = source.expand(targets.shape)  # (targets, heads, pixels, tokens), a view
    elif mapper.dtype == torch.long:
        mapped = source[:, :, mapper].permute(2, 0, 1, 3)  # (heads, pixels, targets, tokens) -> (targets, heads, pixels, tokens)
    else:
        mapped = torch.einsum("hpi,kij->khpj", source, mapper)  # (targets, heads, pixels, tokens)
    edited = mapped
    if alphas is not None:  # a * mapped + (1 - a) * targets, one op
        edited = torch.lerp(targets, mapped, alphas[:, None, None, :].to(targets.dtype))  # alphas: (targets, 1, 1, tokens)
    if equalizer is not None:
        edited = edited * equalizer[:, None, None, :]  # (targets, 1, 1, tokens) factors
    if weights is None:
        return edited
    return torch.lerp(targets, edited, weights[:, None, None, :].to(targets.dtype))  # w * edited + (1 - w) * targets


def value_weights(
    mapper: torch.Tensor,
    alphas: torch.Tensor,
    weights: torch.Tensor,
    equalizer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit of `edit_cross_attention` moved onto the values, so that no map has to be formed.

    The edited map of target ``k`` (Sec. 3.2, Algorithm 1 line 8) is linear in the two softmax maps:
    ``M^ = M_src S + M_k diag(o)`` with ``S = W diag(w c a)`` and ``o = w c (1 - a) + 1 - w``
    (``W`` the token mapper, ``a`` the alphas, ``w`` this step's injection weights, ``c`` the
    equalizer). Its product with the target's values is therefore two attentions:
    ``M^ V_k = softmax(Q_src K_src^T) (S V_k) + softmax(Q_k K_k^T) (o * V_k)``.

    Args:
        mapper: ``(targets, tokens_src, tokens_tgt)`` source position -> target position weights.
        alphas: ``(targets, tokens)`` 1 where the target token takes the mapped source map.
        weights: ``(targets, tokens)`` this step's injection weights.
        equalizer: ``(targets, tokens)`` re-weighting factors, or None (all ones).

    Returns:
        ``S`` ``(targets, tokens_src, tokens_tgt)`` and ``o`` ``(targets, tokens)``.
    """
    c = torch.ones_like(alphas) if equalizer is None else equalizer.to(alphas.dtype)
    injected = weights * c * alphas  # (targets, tokens): w c a
    source = mapper * injected[:, None, :]  # (targets, tokens_src, tokens_tgt): W diag(w c a)
    own = weights * c * (1 - alphas) + 1 - weights  # (targets, tokens)
    return source, own


def local_blend_mask(
    maps: torch.Tensor,
    words: torch.Tensor,
    threshold: float,
    size: tuple[int, int],
    pool: bool = True,
) -> torch.Tensor:
    """Boolean LocalBlend mask per prompt, united with the source's (paper Sec. 3.2, local editing).

    ``alpha = B(M_w) | B(M*_w*)`` with ``B`` = sum over the words' tokens, 3x3 max-pool, nearest
    resize to the latent, division by the maximum, threshold.

    Args:
        maps: ``(prompts, height, width, tokens)`` accumulated cross-attention maps.
        words: ``(prompts, tokens)`` 1 on the tokens of each prompt's blend words.
        threshold: value in [0, 1] above which a normalised pixel is in the mask.
        size: the latent ``(height, width)``.
        pool: max-pool 3x3 first (the paper's code does for the mask, not for subtract words).

    Returns:
        ``(prompts, 1, height, width)`` bool; row 0 is the source's own mask.
    """
    m = (maps * words[:, None, None, :]).sum(-1)[:, None]  # (prompts, 1, h, w)
    if pool:
        m = F.max_pool2d(m, kernel_size=3, stride=1, padding=1)
    m = F.interpolate(m, size=size)  # nearest, as the paper's code
    m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
    mask = m > threshold
    return mask[:1] | mask


def blend_latents(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``z*_t <- z_t + alpha * (z*_t - z_t)``: outside the mask, targets take the source latents.

    Args:
        latents: ``(prompts, channels, height, width)`` with the source in row 0.
        mask: ``(prompts, 1, height, width)`` bool or float.
    """
    return latents[:1] + mask.to(latents.dtype) * (latents - latents[:1])
