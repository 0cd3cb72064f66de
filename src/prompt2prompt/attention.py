"""Prompt-to-Prompt attention processors for diffusers UNets.

A processor's place comes from its key and from tensor shapes: self vs cross from whether
text states are given, the map's side from the pixel count and the latent size. The current
denoising step is passed in by the loop (``cross_attention_kwargs={"p2p_step": i}``); nothing
counts calls.

Cost model (the reason for this design):
- self-attention always runs through ``scaled_dot_product_attention``. Injecting the source's
  self-attention map ``softmax(q_s k_s^T)`` into a target is ``SDPA(q_s, k_s, v_t)``, so the
  target rows just take the source's queries and keys;
- every cross-attention edit (word swap, refinement, re-weighting, per-word schedules) is linear
  in the two softmax maps, so it moves onto the values (`edit_ops.value_weights`): target ``k``
  gets ``SDPA(q_s, k_s, S_k v_k)``, plus ``SDPA(q_k, k_k, o_k * v_k)`` where some of its tokens
  keep their own maps (refinement's new words, windows that have ended). A same-length word swap
  is a diagonal ``S`` (the equalizer) and no second term;
- cross-attention probabilities (pixels x tokens) are computed explicitly (softmax in float32)
  only for the sides that are recorded (the text-conditioned rows), and for an edit only in layers
  that the value form does not cover (an attention mask, a ``to_v`` with a bias, normalised text
  states). The source rows and the unconditional half always come out of SDPA.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from .edit_ops import edit_cross_attention
from .edits import EditPlan, ValueInjection


def place_of(key: str) -> str:
    """``down`` / ``mid`` / ``up`` from a processor key such as ``up_blocks.1.attentions.0...``.

    Args:
        key: a processor key of ``unet.attn_processors`` or a module name of the UNet.

    Returns:
        ``"down"``, ``"mid"`` or ``"up"`` for keys under ``down_blocks``, ``mid_block`` or ``up_blocks``;
        otherwise the key's first dotted component unchanged.
    """
    head = key.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, head)


def map_size(pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The ``(height, width)`` of an attention map with ``pixels`` positions in a UNet whose input
    latent is ``latent_hw`` (sides halve, rounding up, at each downsampling).

    Args:
        pixels: the number of query positions of the attention layer (``height * width``).
        latent_hw: the latent ``(height, width)`` the UNet was called with.

    Returns:
        The ``(height, width)`` of the first halving of ``latent_hw`` (the latent itself included)
        that has ``pixels`` positions.

    Raises:
        RuntimeError: no halving of ``latent_hw`` has exactly ``pixels`` positions.
    """
    h, w = latent_hw
    while h * w > pixels and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != pixels:
        raise RuntimeError(f"an attention layer has {pixels} positions, which fits no downsampling of the latent {latent_hw}")
    return h, w


class P2PController:
    """Per-call state shared by the processors: the plan, the batch layout, the recorded maps, and
    where the source's rows come from.

    The source's rows come from one of three places (``source`` and ``capture``):

    - the batch (``source=None``, the default): the source is the first prompt of each half;
    - a kept `source_pass.SourcePass` (cached mode): the batch holds the target prompts only, and
      the source's queries, keys, text states, maps and latents are read from the pass;
    - the batch, its source's rows kept into a `SourcePass` as it runs (``capture=True``): the batch is
      the source alone (`Prompt2PromptPipeline.source`), or every prompt, source first, with the
      edit applied as without a capture (a call with ``keep_source=True``).

    Args:
        plan: the compiled edit, or None to only record maps.
        num_prompts: prompts in the batch (the source first, unless the source is a kept pass).
        guidance: whether the batch is ``[unconditional, conditional]`` (classifier-free guidance).
        latent_hw: the latent ``(height, width)``.
        record_sides: map sides whose conditional cross-attention is accumulated (head-averaged,
            float32, summed over layers and steps), for LocalBlend and visualisation.
        self_record_side: map side whose self-attention of the source prompt (conditional row) is
            accumulated the same way, or None; a set of sides is accepted too.
        source_sides: map sides, beyond ``record_sides``, whose conditional cross-attention is
            accumulated for the source's row alone (what a capture keeps of the sides the call's
            output does not read).
        source: a `source_pass.SourcePass` to read the source's rows from, or to keep them into
            with ``capture``.
        capture: keep the source's rows into ``source`` as the batch (the source first) runs.
        keep_device: where a capture keeps its tensors (None: where they are made).
    """

    def __init__(self, plan: EditPlan | None, num_prompts: int, guidance: bool, latent_hw: tuple[int, int], record_sides=(),
                 self_record_side=None, source=None, capture: bool = False, keep_device=None, source_sides=()):
        self.plan = plan
        self.num_prompts = num_prompts
        self.guidance = guidance
        self.latent_hw = latent_hw
        self.record_sides = set(record_sides)
        self.source_sides = set(source_sides) - self.record_sides
        self.maps: dict[int, torch.Tensor] = {}  # side -> (prompts, h, w, tokens) float32 sums
        self.layer_calls: dict[int, int] = {}  # side -> number of (layer, step) maps summed
        sides = self_record_side if isinstance(self_record_side, (set, frozenset)) else {self_record_side} - {None}
        self.self_record_sides = set(sides)
        self.self_maps: dict[int, torch.Tensor] = {}  # side -> (pixels, pixels) float32 sum for the source
        self.self_calls: dict[int, int] = {}
        self.source = source
        self.capture = capture
        self.cached = source is not None and not capture
        self.keep_device = keep_device
        if self.cached:  # the source's self-attention sums are the pass's; no row of the batch is the source's
            self.self_maps, self.self_calls = dict(source.self_maps), dict(source.self_calls)
            self.self_record_sides = set()
        self._sizes: dict[int, tuple[int, int]] = {}
        self._head_means: dict[tuple, torch.Tensor] = {}  # (prompts, heads, device) -> (prompts, 1, heads) of 1/heads
        self._states_cache: dict[tuple, tuple] = {}  # this step's text states for the values and keys
        self._states_step: int | None = None

    @property
    def cond(self) -> slice:
        """Rows of the text-conditioned half of the batch; only these are ever edited."""
        n = self.num_prompts
        return slice(n, 2 * n) if self.guidance else slice(0, n)

    @property
    def targets(self) -> slice:
        """Rows of the conditional target prompts (contiguous; after the source's row when it is in the batch)."""
        return slice(self.cond.start + (0 if self.cached else 1), self.cond.stop)

    def source_row(self, x: torch.Tensor, what: str, layer: str | None = None, step: int | None = None) -> torch.Tensor | None:
        """The source's conditional row of ``x``: from the batch, or from the kept pass in cached mode.

        Args:
            x: ``(batch, ...)`` rows in the batch layout (its device is the row's).
            what: what ``x`` is, for the pass: ``"self_q"``, ``"self_k"``, ``"cross_q"`` or ``"text"``.
            layer: the processor key (for the pass).
            step: the denoising step (for the pass).

        Returns:
            ``(1, ...)``; None in cached mode where the pass did not keep it.
        """
        if not self.cached:
            return x[self.cond.start : self.cond.start + 1]  # (1, ...)
        return self.source.row(what, layer, step, x.device)

    def with_source_rows(self, x: torch.Tensor, append_targets: bool = False, source_row: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (batch, ...) with each target row of the conditional half replaced by the source's
        row: one concatenation (rows before the targets, the source's row repeated, the rest), and
        with ``append_targets`` the targets' own rows after them (batch + targets, ...).

        Args:
            x: ``(batch, ...)`` rows in the batch layout (e.g. queries ``(batch, heads, pixels, dim)``
                or text states ``(batch, tokens, channels)``).
            append_targets: also append the conditional targets' own rows of ``x`` at the end.
            source_row: ``(1, ...)`` the source's row (`source_row`); None: the batch's (not in cached mode).
            mask: ``(targets,)`` bool, the targets that take the source's row (the others keep
                their own); None: all of them (`edits.EditPlan.self_targets`).

        Returns:
            ``(batch, ...)``, or ``(batch + targets, ...)`` with ``append_targets``; a new tensor.
        """
        t = self.targets
        if source_row is None:
            source_row = x[self.cond.start : self.cond.start + 1]  # (1, ...)
        rows = source_row.expand(t.stop - t.start, *x.shape[1:])  # (targets, ...)
        if mask is not None:
            rows = torch.where(mask.view(-1, *[1] * (x.ndim - 1)), rows, x[t])  # (targets, ...)
        parts = [x[: t.start], rows, x[t.stop :]]
        if append_targets:
            parts.append(x[t])
        return torch.cat(parts)  # (batch [+ targets], ...)

    def with_target_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, ...) with its conditional target rows replaced by ``rows`` (targets, ...).

        Args:
            x: ``(batch, ...)`` rows in the batch layout.
            rows: ``(targets, ...)`` the new rows of the conditional target prompts, in their order.

        Returns:
            ``(batch, ...)``, a new tensor (``x`` is not modified).
        """
        return torch.cat([x[: self.targets.start], rows, x[self.targets.stop :]])  # (batch, ...)

    def recorded_rows(self, side: int) -> slice | None:
        """The rows whose cross-attention maps at ``side`` are recorded: the conditional half (a side
        of ``record_sides``), its source row alone (``source_sides``), or None."""
        if side in self.record_sides:
            return self.cond
        if side in self.source_sides:
            return slice(self.cond.start, self.cond.start + 1)
        return None

    def _per_step(self, step: int, what: str, states: torch.Tensor, make) -> torch.Tensor:
        """``make()``, made once per step for the text ``states``: they are the same tensor in every
        cross-attention layer of a step, so what is derived from them is shared by the layers."""
        if step != self._states_step:
            self._states_cache.clear()
            self._states_step = step
        key = (what, states.data_ptr(), tuple(states.shape), states.dtype, states.device)
        if key not in self._states_cache:
            self._states_cache[key] = (states, make())  # holding ``states`` keeps its address unique
        return self._states_cache[key][1]

    def source_key_states(self, step: int, states: torch.Tensor, append_targets: bool) -> torch.Tensor:
        """Text states whose key projections are the keys of a value-form edit: each target row of
        the conditional half takes the source's states (and with ``append_targets`` the targets' own
        follow), so ``to_k`` of them equals `with_source_rows` of the keys. ``to_k`` acts on each
        row alone, so this moves a concatenation per layer onto the states, once per step.

        Args:
            step: the denoising step index (``p2p_step``); the result is cached for this step.
            states: ``(batch, tokens, channels)`` the text states (``encoder_hidden_states``) of the layer.
            append_targets: append the targets' own states as extra rows (when the injection needs
                both terms, `ValueInjection.both_terms`).

        Returns:
            ``(batch, tokens, channels)``, or ``(batch + targets, tokens, channels)`` with ``append_targets``.
        """
        return self._per_step(step, f"keys{int(append_targets)}", states,
                              lambda: self.with_source_rows(states, append_targets, self.source_row(states, "text")))

    def injected_states(self, inj: ValueInjection, step: int, states: torch.Tensor) -> torch.Tensor:
        """Text states whose value projections are the edit's values (`edit_ops.value_weights`).

        For a layer whose value projection ``to_v`` is linear without a bias, ``S_k V_k =
        to_v(S_k E_k)`` and ``o_k * V_k = to_v(o_k * E_k)``: the edit moves onto the text states
        ``E`` (batch, tokens, channels), once per step for every layer. Returns the states for the
        values: the target rows are ``S_k E_k`` (or ``o_k * E_k`` when nothing comes from the source),
        and when both terms are needed ``o_k * E_k`` follows as extra rows (batch + targets, tokens,
        channels), the values of a second attention that the same SDPA call computes.

        Args:
            inj: this step's `ValueInjection` (``S_k`` as ``source``/``source_diagonal``, ``o_k`` as ``own``).
            step: the denoising step index (``p2p_step``); the result is cached for this step.
            states: ``(batch, tokens, channels)`` the text states (``encoder_hidden_states``) of the layer.

        Returns:
            ``(batch, tokens, channels)``, or ``(batch + targets, tokens, channels)`` when
            ``inj.both_terms``; rows off the conditional targets are ``states`` unchanged.
        """
        def make() -> torch.Tensor:
            t = self.targets

            def rows(factors: torch.Tensor) -> torch.Tensor:  # (targets, tokens) -> (batch, tokens, 1), 1 off the targets
                full = torch.ones(states.shape[0], states.shape[1], 1, dtype=states.dtype, device=states.device)
                full[t, :, 0] = factors.to(states.device, states.dtype)
                return full

            if inj.source is None:
                values = states * rows(inj.own)  # (batch, tokens, channels)
            elif inj.source_is_identity:
                values = states
            elif inj.source_diagonal is not None:
                values = states * rows(inj.source_diagonal)  # (batch, tokens, channels)
            else:
                mapped = torch.matmul(inj.source.to(states.device, states.dtype), states[t])  # (targets, tokens_src, channels)
                values = self.with_target_rows(states, mapped)  # (batch, tokens, channels)
            if inj.both_terms:
                own = states[t] * inj.own[:, :, None].to(states.device, states.dtype)  # (targets, tokens, channels)
                values = torch.cat([values, own])  # (batch + targets, tokens, channels)
            return values

        return self._per_step(step, "values", states, make)

    def size(self, pixels: int) -> tuple[int, int]:
        """The ``(height, width)`` of an attention map with ``pixels`` positions (`map_size`, cached).

        Args:
            pixels: the number of query positions of the attention layer.

        Returns:
            The map's ``(height, width)`` at ``self.latent_hw``.

        Raises:
            RuntimeError: ``pixels`` fits no downsampling of the latent (see `map_size`).
        """
        if pixels not in self._sizes:
            self._sizes[pixels] = map_size(pixels, self.latent_hw)
        return self._sizes[pixels]

    def record(self, side: int, hw: tuple[int, int], probs: torch.Tensor) -> None:
        """Add head-averaged float32 maps ``(prompts, heads, pixels, tokens)`` to the sum at ``side``.

        The average over heads and the sum are one batched product, ``sum += (1/heads) @ probs``
        (one kernel where ``mean`` and ``+=`` would be two; this runs in every recorded layer).

        Args:
            side: the map side (``max(hw)``) whose sum ``self.maps[side]`` is added to; also counted
                in ``self.layer_calls[side]``.
            hw: the map's ``(height, width)``; ``pixels`` is ``height * width``, row-major.
            probs: ``(prompts, heads, pixels, tokens)`` float32 attention probabilities of the
                conditional rows, one per prompt of the batch (source first; in cached mode the
                targets only, whose sums follow the source's row that `end_step` sets from the pass).
        """
        prompts, heads, pixels, tokens = probs.shape
        key = (prompts, heads, probs.device)
        if key not in self._head_means:
            self._head_means[key] = torch.full((prompts, 1, heads), 1.0 / heads, dtype=torch.float32, device=probs.device)
        mean = self._head_means[key]  # (prompts, 1, heads)
        offset = 1 if self.cached else 0  # cached mode: row 0 is the source's, from the pass
        if side not in self.maps:
            self.maps[side] = torch.zeros(offset + prompts, *hw, tokens, dtype=torch.float32, device=probs.device)
        acc = self.maps[side][offset:].view(prompts, 1, pixels * tokens)  # (prompts, 1, pixels * tokens), a view of the sum
        acc.baddbmm_(mean, probs.reshape(prompts, heads, pixels * tokens))  # (prompts, 1, heads) @ (prompts, heads, pixels * tokens)
        self.layer_calls[side] = self.layer_calls.get(side, 0) + 1

    def record_self(self, side: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """Add the source's head-averaged self-attention ``softmax(q k^T * scale)`` from its
        ``(heads, pixels, dim)`` query and key to the running sum at ``side``.

        The ``(pixels, pixels)`` float32 map is added to ``self.self_maps[side]`` and
        ``self.self_calls[side]`` is incremented.

        Args:
            side: the map's side.
            query: ``(heads, pixels, dim)`` the source's conditional-row queries.
            key: ``(heads, pixels, dim)`` the source's conditional-row keys.
            scale: the factor on ``q k^T`` (the layer's ``attn.scale``, usually ``dim ** -0.5``).
        """
        probs = (torch.einsum("hpd,hqd->hpq", query.float(), key.float()) * scale).softmax(-1)  # (heads, pixels, pixels)
        probs = probs.mean(0)  # (pixels, pixels)
        self.self_maps[side] = probs if side not in self.self_maps else self.self_maps[side] + probs
        self.self_calls[side] = self.self_calls.get(side, 0) + 1

    # ------------------------------------------------------------- a kept source pass

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``x`` on the capture's device (one copy, holding nothing of the batch).
        From a GPU to the CPU the copy goes into pinned memory without waiting for it (the capture
        synchronises once at its end), so the loop never stalls on a copy, and a later edit's copy
        back to the GPU does not either."""
        device = torch.device(self.keep_device or x.device)
        pinned = x.is_cuda and device.type == "cpu"
        out = torch.empty(x.shape, dtype=x.dtype, device=device, pin_memory=pinned)
        return out.copy_(x, non_blocking=pinned)

    def keep_self(self, layer: str, step: int, side: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """In a capture, keep the source's self-attention queries and keys of a layer where the
        pass's budget covers ``step`` and ``side``; otherwise nothing.

        Args:
            layer: the processor key.
            step: the denoising step.
            side: the map's side.
            query: ``(batch, heads, pixels, dim)`` the layer's queries (the source's row is kept).
            key: ``(batch, heads, pixels, dim)`` its keys.
        """
        if self.capture and self.source.keeps_self(step, side):
            row = self.cond.start
            self.source.self_queries[f"{step}/{layer}"] = self._keep(query[row])  # (heads, pixels, dim)
            self.source.self_keys[f"{step}/{layer}"] = self._keep(key[row])  # (heads, pixels, dim)

    def keep_cross(self, layer: str, step: int, query: torch.Tensor) -> None:
        """In a capture, keep the source's cross-attention queries ``(heads, pixels, dim)`` of a
        layer (from ``query`` (batch, heads, pixels, dim)) where the budget covers ``step``."""
        if self.capture and self.source.keeps_cross(step):
            self.source.cross_queries[f"{step}/{layer}"] = self._keep(query[self.cond.start])  # (heads, pixels, dim)

    def end_step(self, step: int, latents: torch.Tensor) -> None:
        """What the loop does after each step: a capture keeps the source's latents ``(1, C, h, w)``
        and its summed cross-attention maps; in cached mode the source's sums of the maps so far
        become row 0 of the recorded maps (before LocalBlend reads them).

        Args:
            step: the step just made.
            latents: ``(prompts, C, h, w)`` the batch's latents after it.
        """
        if self.capture:
            self.source.latents[step + 1].copy_(latents[0])
            for side, maps in self.maps.items():
                if side not in self.source.cross_maps:
                    self.source.cross_maps[side] = torch.zeros(self.source.latents.shape[0] - 1, *maps.shape[1:],
                                                               dtype=torch.float32, device=self.source.latents.device)
                self.source.cross_maps[side][step].copy_(maps[0])  # (h, w, tokens)
        elif self.cached:
            for side, maps in self.maps.items():
                maps[0].copy_(self.source.cross_maps[side][step])  # (h, w, tokens)

    def with_source_latents(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        """``latents`` with the source's row first: as they are, or in cached mode the pass's
        ``latents[index]`` (``(1, C, h, w)``) before the targets' ``(targets, C, h, w)``."""
        if not self.cached:
            return latents
        source = self.source.latents[index : index + 1 if index != -1 else None].to(latents.device, latents.dtype)  # (1, C, h, w)
        return torch.cat([source, latents])  # (1 + targets, C, h, w)

    def without_source_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `with_source_latents`: the rows the batch denoises."""
        return latents[1:] if self.cached else latents


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(rows, length, heads * dim)`` -> ``(rows, heads, length, dim)``, a view."""
    return x.view(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)  # (rows, heads, length, dim)


class P2PAttnProcessor:
    """A diffusers attention processor that applies Prompt-to-Prompt's edits.

    Each call takes one of three paths, by the layer and the step (``p2p_step``, passed in by the
    loop; without it the layer attends as diffusers' ``AttnProcessor2_0`` does):

    - `self_attention`: the source's self-attention map injected into the targets, and the source's
      map recorded;
    - `cross_attention_values`: a cross-attention edit on the values (`edits.ValueInjection`), in
      layers whose value projection is linear without a bias, with plain text states and no mask;
    - `cross_attention_explicit`: the maps formed, recorded and edited (`edit_ops.edit_cross_attention`)
      where the value form does not apply, and plain attention at steps without an edit.

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
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            batch, channels, height, width = image_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (batch, pixels, channels)
        batch, pixels, _ = hidden_states.shape
        if attention_mask is not None:
            keys = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else pixels
            attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])  # (batch, heads, pixels, keys)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)  # (batch, pixels, channels)
        if p2p_step is not None:
            self._check_batch(batch)

        if encoder_hidden_states is None:
            out = self.self_attention(attn, hidden_states, attention_mask, p2p_step)
        else:
            injection = self._value_injection(attn, attention_mask, p2p_step)
            if injection is not None:
                out = self.cross_attention_values(attn, hidden_states, encoder_hidden_states, p2p_step, injection)
            else:
                out = self.cross_attention_explicit(attn, hidden_states, encoder_hidden_states, attention_mask, p2p_step)

        hidden_states = out.transpose(1, 2).reshape(batch, pixels, -1)  # (batch, pixels, heads * dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)  # (batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _check_batch(self, batch: int) -> None:
        ctrl = self.controller
        if batch != (2 if ctrl.guidance else 1) * ctrl.num_prompts:
            raise RuntimeError(
                f"{self.key}: batch of {batch} does not match {ctrl.num_prompts} prompts "
                f"{'with' if ctrl.guidance else 'without'} guidance"
            )

    def _value_injection(self, attn, attention_mask: torch.Tensor | None, step: int | None) -> ValueInjection | None:
        """This step's cross-attention edit on the values, or None: no edit at this step, or a layer
        the value form does not cover (a mask, normalised text states, a ``to_v`` with a bias)."""
        plan = self.controller.plan
        if step is None or plan is None or not plan.cross_active[step]:
            return None
        if attention_mask is not None or attn.norm_cross or getattr(attn.to_v, "bias", None) is not None:
            return None
        return plan.value_injection(step)

    def self_attention(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, step: int | None) -> torch.Tensor:
        """Self-attention, with the source's map ``softmax(q_s k_s^T)`` injected into the targets
        where the plan says so: ``SDPA(q_s, k_s, v_t)``, the target rows take the source's queries and keys.

        Args:
            attn: the diffusers ``Attention`` module.
            hidden_states: ``(batch, pixels, channels)``, normalised.
            attention_mask: ``(batch, heads, pixels, pixels)`` or None.
            step: the denoising step (``p2p_step``), or None outside the pipeline's loop.

        Returns:
            ``(batch, heads, pixels, dim)``.
        """
        ctrl = self.controller
        query, key, value = _project(attn, hidden_states, hidden_states, hidden_states)  # (batch, heads, pixels, dim) each
        side = max(ctrl.size(hidden_states.shape[1])) if step is not None else 0
        if step is not None:
            ctrl.keep_self(self.key, step, side, query, key)
        if step is not None and ctrl.plan is not None and ctrl.plan.self_active(step, side):
            mask = ctrl.plan.self_targets(step)  # None: every target takes the source's queries and keys
            query = ctrl.with_source_rows(query, source_row=ctrl.source_row(query, "self_q", self.key, step), mask=mask)  # (batch, heads, pixels, dim)
            key = ctrl.with_source_rows(key, source_row=ctrl.source_row(key, "self_k", self.key, step), mask=mask)  # (batch, heads, pixels, dim)
        if step is not None and side in ctrl.self_record_sides:
            ctrl.record_self(side, query[ctrl.cond.start], key[ctrl.cond.start], attn.scale)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale)

    def cross_attention_values(self, attn, hidden_states: torch.Tensor, text: torch.Tensor, step: int, injection: ValueInjection) -> torch.Tensor:
        """A cross-attention edit on the values, no map formed: the target rows attend with the
        source's queries and keys to ``S V_k``; where tokens keep their own maps (new words, windows
        that have ended), extra rows attend with the targets' own queries and keys to ``o * V_k`` in
        the same SDPA call and are added to them. The path is the same whether this side is
        recorded or not, so the images do not depend on what is recorded.

        Args:
            attn: the diffusers ``Attention`` module (``to_v`` without a bias, no ``norm_cross``).
            hidden_states: ``(batch, pixels, channels)``, normalised.
            text: ``(batch, tokens, channels)`` the text states.
            step: the denoising step (``p2p_step``).
            injection: this step's `ValueInjection`.

        Returns:
            ``(batch, heads, pixels, dim)``.
        """
        ctrl = self.controller
        source_keys = injection.source is not None  # the targets take the source's maps (and keys)
        key_states = ctrl.source_key_states(step, text, injection.both_terms) if source_keys else text
        value_states = ctrl.injected_states(injection, step, text)
        query, key, value = _project(attn, hidden_states, key_states, value_states)  # (batch [+ targets], heads, pixels or tokens, dim)
        ctrl.keep_cross(self.key, step, query)  # the batch's own queries (the source's row is kept)
        hw = ctrl.size(hidden_states.shape[1])
        rows = ctrl.recorded_rows(max(hw))
        if rows is not None:  # each prompt's own maps: its own keys where the targets took the source's
            targets = source_keys and rows == ctrl.cond  # the targets' rows (a source row alone: ``key``'s is its own)
            own_key = _split_heads(attn.to_k(text), attn.heads) if targets else key  # (batch, heads, tokens, dim)
            if targets and attn.norm_k is not None:
                own_key = attn.norm_k(own_key)
            ctrl.record(max(hw), hw, _probabilities(attn, query[rows], own_key[rows], None))
        if source_keys:
            source_query = ctrl.source_row(query, "cross_q", self.key, step)  # (1, heads, pixels, dim)
            query = ctrl.with_source_rows(query, injection.both_terms, source_query)  # (batch [+ targets], heads, pixels, dim)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=attn.scale)  # (batch [+ targets], heads, pixels, dim)
        if not injection.both_terms:
            return out
        batch = hidden_states.shape[0]
        own, out = out[batch:], out[:batch]  # (targets, heads, pixels, dim), (batch, heads, pixels, dim)
        if torch.is_grad_enabled():  # SDPA's output is saved for its backward: keep it intact
            out = out.clone()
        out[ctrl.targets].add_(own)
        return out

    def _source_and_targets(self, attn, probs: torch.Tensor, attention_mask, step: int):
        """``(source (heads, pixels, tokens), targets (targets, heads, pixels, tokens))`` of the
        conditional rows' probabilities ``probs``: the source's is the first row, or in cached mode
        made from the pass (`_source_probabilities_from_pass`), when ``probs`` holds the targets only."""
        ctrl = self.controller
        if not ctrl.cached:
            return probs[0], probs[1:]
        return _source_probabilities_from_pass(attn, ctrl, self.key, step, probs, attention_mask), probs

    def cross_attention_explicit(self, attn, hidden_states: torch.Tensor, text: torch.Tensor, attention_mask: torch.Tensor | None,
                                 step: int | None) -> torch.Tensor:
        """Cross-attention through SDPA, with the maps formed where they are recorded or edited: the
        targets' edited maps (`edit_ops.edit_cross_attention`) times their values replace their rows.

        Args:
            attn: the diffusers ``Attention`` module.
            hidden_states: ``(batch, pixels, channels)``, normalised.
            text: ``(batch, tokens, channels)`` the text states.
            attention_mask: ``(batch, heads, pixels, tokens)`` or None.
            step: the denoising step (``p2p_step``), or None outside the pipeline's loop.

        Returns:
            ``(batch, heads, pixels, dim)``.
        """
        ctrl, plan = self.controller, self.controller.plan
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        query, key, value = _project(attn, hidden_states, text, text)  # (batch, heads, pixels or tokens, dim)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale)  # (batch, heads, pixels, dim)
        if step is None:
            return out
        ctrl.keep_cross(self.key, step, query)
        hw = ctrl.size(hidden_states.shape[1])
        rows = ctrl.recorded_rows(max(hw))
        edit = plan is not None and plan.cross_active[step]
        if not (rows is not None or edit):
            return out
        cond = ctrl.cond if edit else rows
        probs = _probabilities(attn, query[cond], key[cond], attention_mask[cond] if attention_mask is not None else None)  # (prompts, heads, pixels, tokens)
        if rows is not None:  # each prompt's own maps, before the edit, as in the paper's code
            ctrl.record(max(hw), hw, probs[rows.start - cond.start : rows.stop - cond.start])
        if edit:
            source_probs, target_probs = self._source_and_targets(attn, probs, attention_mask, step)
            edited = edit_cross_attention(
                source_probs, target_probs, plan.fast_mapper, plan.fast_alphas, plan.step_weights(step), plan.equalizer
            )  # (targets, heads, pixels, tokens)
            if torch.is_grad_enabled():  # SDPA's output is saved for its backward: keep it intact
                out = out.clone()
            out[ctrl.targets] = torch.matmul(edited.to(value.dtype), value[ctrl.targets])  # (targets, heads, pixels, dim)
        return out


def _source_probabilities_from_pass(attn, ctrl: P2PController, layer: str, step: int, like: torch.Tensor,
                                    mask: torch.Tensor | None) -> torch.Tensor:
    """In cached mode, the source's cross-attention probabilities ``(heads, pixels, tokens)`` float32
    of one layer: its kept queries against ``to_k`` of its kept text states; zeros where the pass
    kept no queries for this step (only an edit that takes nothing from the source gets there,
    `source_pass.check_budget` refuses the others).

    Args:
        attn: the diffusers ``Attention`` module.
        ctrl: the controller (cached mode).
        layer: the processor key.
        step: the denoising step.
        like: ``(prompts, heads, pixels, tokens)`` the targets' probabilities (shape and device).
        mask: ``(batch, heads, pixels, tokens)`` the layer's additive mask, or None.
    """
    query = ctrl.source_row(like, "cross_q", layer, step)  # (1, heads, pixels, dim)
    if query is None:
        return torch.zeros_like(like[0])  # (heads, pixels, tokens)
    text = ctrl.source_row(like, "text")  # (1, tokens, channels)
    if attn.norm_cross:
        text = attn.norm_encoder_hidden_states(text)
    key = _split_heads(attn.to_k(text), attn.heads)  # (1, heads, tokens, dim)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return _probabilities(attn, query, key, None if mask is None else mask[ctrl.cond][:1])[0]  # (heads, pixels, tokens)


def _project(attn, hidden_states: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor):
    """The layer's queries, keys and values, split into heads and normalised as the layer does.

    Args:
        attn: the diffusers ``Attention`` module.
        hidden_states: ``(batch, pixels, channels)``.
        key_states: ``(rows, keys, channels)`` the states the keys come from.
        value_states: ``(rows, keys, channels)`` the states the values come from.

    Returns:
        ``(query (batch, heads, pixels, dim), key (rows, heads, keys, dim), value (rows, heads, keys, dim))``.
    """
    query = attn.to_q(hidden_states)
    key = attn.to_k(key_states)
    value = attn.to_v(value_states)
    query = _split_heads(query, attn.heads)  # (batch, heads, pixels, dim)
    key = _split_heads(key, attn.heads)  # (rows, heads, keys, dim)
    value = _split_heads(value, attn.heads)  # (rows, heads, keys, dim)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _probabilities(attn, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities as diffusers' ``AttnProcessor`` forms them: scores in the model's dtype
    (float32 if the layer upcasts attention), softmax in float32. Few ops: this runs in every edited
    or recorded layer.

    Args:
        attn: the diffusers ``Attention`` module (``scale``, ``upcast_attention``).
        query: ``(prompts, heads, pixels, dim)``.
        key: ``(prompts, heads, tokens, dim)``.
        attention_mask: ``(prompts, heads, pixels, tokens)`` additive, or None.

    Returns:
        ``(prompts, heads, pixels, tokens)`` float32.
    """
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    scores = torch.matmul(query * attn.scale, key.transpose(-1, -2))  # (prompts, heads, pixels, tokens)
    if attention_mask is not None:
        scores = scores + attention_mask.to(scores.dtype)
    return scores.softmax(dim=-1, dtype=torch.float32)  # (prompts, heads, pixels, tokens)


@contextmanager
def p2p_attention(unet, controller: P2PController) -> Iterator[None]:
    """Install `P2PAttnProcessor` on every attention layer of ``unet``; restore the originals on exit,
    also when the body raises.

    Args:
        unet: a diffusers UNet (``attn_processors`` / ``set_attn_processor``, e.g. `UNet2DConditionModel`).
        controller: the `P2PController` that every installed processor shares.

    Yields:
        None, while the processors are installed.
    """
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

    Args:
        unet: a diffusers `UNet2DConditionModel` (its ``config.down_block_types`` gives the depth;
            modules with ``is_cross_attention`` set are the cross-attention layers).
        latent_hw: the latent ``(height, width)``; each level halves it, rounding up.

    Returns:
        The distinct sides ``max(height, width)`` of the cross-attention maps, ascending.
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
