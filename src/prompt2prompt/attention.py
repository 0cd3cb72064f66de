"""Prompt-to-Prompt attention processors for diffusers UNets.

A processor's place comes from its key and from tensor shapes: self vs cross from whether
text states are given, the map's side from the pixel count and the latent size. The current
denoising step is passed in by the loop (``cross_attention_kwargs={"p2p_step": i}``); nothing
counts calls.

Cost model (the reason for this design):
- self-attention always runs through ``scaled_dot_product_attention``. Injecting the source's
  self-attention map ``softmax(q_s k_s^T)`` into a target is ``SDPA(q_s, k_s, v_t)``, so the
  target rows just take the source's queries and keys;
- a cross-attention edit in which every target token takes the source's map at its own position
  (a same-length word swap, re-weighting) is the same injection: ``SDPA(q_s, k_s, c * v_t)`` with the
  equalizer ``c`` scaling the target's values per token (maps are not renormalised);
- otherwise cross-attention probabilities (pixels x tokens) are computed explicitly (softmax in
  float32), only for the text-conditioned rows and only at steps that edit them or at the sides
  that are recorded. The source rows and the unconditional half always come out of SDPA.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from .edit_ops import edit_cross_attention
from .edits import EditPlan


def place_of(key: str) -> str:
    """``down`` / ``mid`` / ``up`` from a processor key such as ``up_blocks.1.attentions.0...``."""
    head = key.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, head)


def map_size(pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(height, width)`` of an attention map with ``pixels`` positions in a UNet whose input
    latent is ``latent_hw`` (sides halve, rounding up, at each downsampling)."""
    h, w = latent_hw
    while h * w > pixels and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != pixels:
        raise RuntimeError(f"an attention layer has {pixels} positions, which fits no downsampling of the latent {latent_hw}")
    return h, w


class P2PController:
    """Per-call state shared by the processors: the plan, the batch layout, the recorded maps.

    Args:
        plan: the compiled edit, or None to only record maps.
        num_prompts: prompts in the batch (source first).
        guidance: whether the batch is ``[unconditional, conditional]`` (classifier-free guidance).
        latent_hw: the latent ``(height, width)``.
        record_sides: map sides whose conditional cross-attention is accumulated (head-averaged,
            float32, summed over layers and steps), for LocalBlend and visualisation.
        self_record_side: map side whose self-attention of the source prompt (conditional row) is
            accumulated the same way, or None.
    """

    def __init__(self, plan: EditPlan | None, num_prompts: int, guidance: bool, latent_hw: tuple[int, int], record_sides=(),
                 self_record_side: int | None = None):
        self.plan = plan
        self.num_prompts = num_prompts
        self.guidance = guidance
        self.latent_hw = latent_hw
        self.record_sides = set(record_sides)
        self.maps: dict[int, torch.Tensor] = {}  # side -> (prompts, h, w, tokens) float32 sums
        self.layer_calls: dict[int, int] = {}  # side -> number of (layer, step) maps summed
        self.self_record_side = self_record_side
        self.self_map: torch.Tensor | None = None  # (pixels, pixels) float32 sum for the source
        self.self_calls = 0
        self._sizes: dict[int, tuple[int, int]] = {}
        self._value_scales: dict[tuple, torch.Tensor] = {}

    @property
    def cond(self) -> slice:
        """Rows of the text-conditioned half of the batch; only these are ever edited."""
        n = self.num_prompts
        return slice(n, 2 * n) if self.guidance else slice(0, n)

    def with_source_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, ...) with each target row of the conditional half replaced by the source's
        row: one concatenation (rows before the targets, the source's row repeated, the rest)."""
        src, stop = self.cond.start, self.cond.stop
        return torch.cat([x[: src + 1], x[src : src + 1].expand(stop - src - 1, *x.shape[1:]), x[stop:]])  # (batch, ...)

    def value_scale(self, like: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, tokens, 1)``: the plan's equalizer on the conditional target rows, 1 elsewhere,
        in ``like``'s dtype and device (built once per call)."""
        key = (like.dtype, like.device, like.shape[2])
        if key not in self._value_scales:
            scale = torch.ones(like.shape[0], 1, like.shape[2], 1, dtype=like.dtype, device=like.device)  # (batch, 1, tokens, 1)
            targets = slice(self.cond.start + 1, self.cond.stop)
            scale[targets, 0, :, 0] = self.plan.equalizer.to(like.device, like.dtype)  # (targets, tokens)
            self._value_scales[key] = scale
        return self._value_scales[key]

    def size(self, pixels: int) -> tuple[int, int]:
        if pixels not in self._sizes:
            self._sizes[pixels] = map_size(pixels, self.latent_hw)
        return self._sizes[pixels]

    def record(self, side: int, hw: tuple[int, int], probs: torch.Tensor) -> None:
        """Add head-averaged maps ``(prompts, heads, pixels, tokens)`` to the sum at ``side``."""
        maps = probs.mean(1).reshape(probs.shape[0], *hw, probs.shape[-1])  # (prompts, h, w, tokens)
        if side in self.maps:
            self.maps[side] += maps
        else:
            self.maps[side] = maps.clone()
        self.layer_calls[side] = self.layer_calls.get(side, 0) + 1

    def record_self(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """Add the source's head-averaged self-attention ``softmax(q k^T * scale)`` from its
        ``(heads, pixels, dim)`` query and key to the running sum."""
        probs = (torch.einsum("hpd,hqd->hpq", query.float(), key.float()) * scale).softmax(-1)  # (heads, pixels, pixels)
        probs = probs.mean(0)  # (pixels, pixels)
        self.self_map = probs if self.self_map is None else self.self_map + probs
        self.self_calls += 1


class P2PAttnProcessor:
    """A diffusers attention processor that applies Prompt-to-Prompt's edits.

    Args:
        controller: the `P2PController` of the current call.
        key: the processor's key in ``unet.attn_processors`` (for its place and for messages).
    """

    def __init__(self, controller: P2PController, key: str):
        self.controller = controller
        self.key = key
        self.place = place_of(key)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        p2p_step: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # (batch, pixels, channels)
        is_cross = encoder_hidden_states is not None
        batch, pixels, _ = hidden_states.shape
        context_len = encoder_hidden_states.shape[1] if is_cross else pixels
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])  # (batch, heads, q, k)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, pixels, dim)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, keys, dim)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, keys, dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        ctrl = self.controller
        plan = ctrl.plan
        active = p2p_step is not None
        if active and batch != (2 if ctrl.guidance else 1) * ctrl.num_prompts:
            raise RuntimeError(
                f"{self.key}: batch of {batch} does not match {ctrl.num_prompts} prompts "
                f"{'with' if ctrl.guidance else 'without'} guidance"
            )
        hw = ctrl.size(pixels) if active else None
        side = max(hw) if active else 0
        cond = ctrl.cond

        record = active and is_cross and side in ctrl.record_sides
        edit = active and is_cross and plan is not None and plan.cross_active[p2p_step]
        if active and not is_cross and plan is not None and plan.self_active(p2p_step, side):
            # Inject the source's self-attention map: SDPA(q_src, k_src, v_tgt) for every target.
            query = ctrl.with_source_rows(query)  # (batch, heads, pixels, dim)
            key = ctrl.with_source_rows(key)  # (batch, heads, keys, dim)
        own_query, own_key = query, key  # each prompt's own, for the maps that are recorded
        if edit and attention_mask is None and plan.source_maps_only(p2p_step):
            # Every target's cross-attention map is the source's (times the equalizer): the same
            # injection, SDPA(q_src, k_src, c * v_tgt), with no explicit map. Taken whether or not
            # this side is recorded, so the images do not depend on what is recorded.
            query = ctrl.with_source_rows(query)  # (batch, heads, pixels, dim)
            key = ctrl.with_source_rows(key)  # (batch, heads, tokens, dim)
            if plan.equalizer is not None:
                value = value * ctrl.value_scale(value)  # (batch, heads, tokens, dim)
            edit = False  # done

        if active and not is_cross and side == ctrl.self_record_side:
            ctrl.record_self(query[cond.start], key[cond.start], attn.scale)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale)  # (batch, heads, pixels, dim)

        if record or edit:
            # As diffusers' AttnProcessor: scores in the model's dtype (float32 if the layer
            # upcasts attention), softmax in float32. Few ops: this runs in every edited layer.
            # Recorded maps are each prompt's own (before the edit), as in the paper's code.
            q, k = own_query[cond], own_key[cond]
            if attn.upcast_attention:
                q, k = q.float(), k.float()
            scores = torch.matmul(q * attn.scale, k.transpose(-1, -2))  # (prompts, heads, pixels, tokens)
            if attention_mask is not None:
                scores = scores + attention_mask[cond].to(scores.dtype)
            probs = scores.softmax(dim=-1, dtype=torch.float32)  # (prompts, heads, pixels, tokens)
            if record:
                ctrl.record(side, hw, probs)
            if edit:
                edited = edit_cross_attention(
                    probs[0], probs[1:], plan.fast_mapper, plan.fast_alphas, plan.step_weights(p2p_step), plan.equalizer
                )  # (targets, heads, pixels, tokens)
                targets = slice(cond.start + 1, cond.stop)
                if torch.is_grad_enabled():  # SDPA's output is saved for its backward: keep it intact
                    out = out.clone()
                out[targets] = torch.matmul(edited.to(value.dtype), value[targets])  # (targets, heads, pixels, dim)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (batch, pixels, channels)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)  # (batch, channels, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def p2p_attention(unet, controller: P2PController) -> Iterator[None]:
    """Install `P2PAttnProcessor` on every attention layer of ``unet``; restore the originals on exit,
    also when the body raises."""
    original = unet.attn_processors
    unet.set_attn_processor({key: P2PAttnProcessor(controller, key) for key in original})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def attention_sides(unet, latent_hw: tuple[int, int]) -> list[int]:
    """Map sides at which ``unet`` has cross-attention, read from each layer's key and the latent size.

    ``down_blocks.i`` works at the latent halved ``i`` times, ``mid_block`` at the deepest level and
    ``up_blocks.j`` at level ``deepest - j``.
    """
    deepest = len(unet.config.down_block_types) - 1
    sides = set()
    for name, module in unet.named_modules():
        if not getattr(module, "is_cross_attention", False):
            continue
        parts = name.split(".")
        place = place_of(name)
        level = {"down": lambda: int(parts[1]), "mid": lambda: deepest, "up": lambda: deepest - int(parts[1])}[place]()
        h, w = latent_hw
        for _ in range(level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        sides.add(max(h, w))
    return sorted(sides)
