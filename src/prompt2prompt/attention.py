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
        self._head_means: dict[tuple, torch.Tensor] = {}  # (prompts, heads, device) -> (prompts, 1, heads) of 1/heads
        self._states_cache: dict[tuple, tuple] = {}  # this step's text states for the values and keys
        self._states_step: int | None = None

    @property
    def cond(self) -> slice:
        """Rows of the text-conditioned half of the batch; only these are ever edited."""
        n = self.num_prompts
        return slice(n, 2 * n) if self.guidance else slice(0, n)

    def with_source_rows(self, x: torch.Tensor, append_targets: bool = False) -> torch.Tensor:
        """``x`` (batch, ...) with each target row of the conditional half replaced by the source's
        row: one concatenation (rows before the targets, the source's row repeated, the rest), and
        with ``append_targets`` the targets' own rows after them (batch + targets, ...).

        Args:
            x: ``(batch, ...)`` rows in the batch layout (e.g. queries ``(batch, heads, pixels, dim)``
                or text states ``(batch, tokens, channels)``).
            append_targets: also append the conditional targets' own rows of ``x`` at the end.

        Returns:
            ``(batch, ...)``, or ``(batch + targets, ...)`` with ``append_targets``; a new tensor.
        """
        src, stop = self.cond.start, self.cond.stop
        parts = [x[: src + 1], x[src : src + 1].expand(stop - src - 1, *x.shape[1:]), x[stop:]]
        if append_targets:
            parts.append(x[src + 1 : stop])
        return torch.cat(parts)  # (batch [+ targets], ...)

    @property
    def targets(self) -> slice:
        """Rows of the conditional target prompts (contiguous, after the source's row)."""
        return slice(self.cond.start + 1, self.cond.stop)

    def with_target_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, ...) with its conditional target rows replaced by ``rows`` (targets, ...).

        Args:
            x: ``(batch, ...)`` rows in the batch layout.
            rows: ``(targets, ...)`` the new rows of the conditional target prompts, in their order.

        Returns:
            ``(batch, ...)``, a new tensor (``x`` is not modified).
        """
        return torch.cat([x[: self.targets.start], rows, x[self.targets.stop :]])  # (batch, ...)

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
        return self._per_step(step, f"keys{int(append_targets)}", states, lambda: self.with_source_rows(states, append_targets))

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
                conditional rows, one per prompt (source first).
        """
        prompts, heads, pixels, tokens = probs.shape
        key = (prompts, heads, probs.device)
        if key not in self._head_means:
            self._head_means[key] = torch.full((prompts, 1, heads), 1.0 / heads, dtype=torch.float32, device=probs.device)
        mean = self._head_means[key]  # (prompts, 1, heads)
        if side not in self.maps:
            self.maps[side] = torch.zeros(prompts, *hw, tokens, dtype=torch.float32, device=probs.device)
        acc = self.maps[side].view(prompts, 1, pixels * tokens)  # (prompts, 1, pixels * tokens), a view of the sum
        acc.baddbmm_(mean, probs.reshape(prompts, heads, pixels * tokens))  # (prompts, 1, heads) @ (prompts, heads, pixels * tokens)
        self.layer_calls[side] = self.layer_calls.get(side, 0) + 1

    def record_self(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """Add the source's head-averaged self-attention ``softmax(q k^T * scale)`` from its
        ``(heads, pixels, dim)`` query and key to the running sum.

        The ``(pixels, pixels)`` float32 map is added to ``self.self_map`` and ``self.self_calls``
        is incremented.

        Args:
            query: ``(heads, pixels, dim)`` the source's conditional-row queries.
            key: ``(heads, pixels, dim)`` the source's conditional-row keys.
            scale: the factor on ``q k^T`` (the layer's ``attn.scale``, usually ``dim ** -0.5``).
        """
        probs = (torch.einsum("hpd,hqd->hpq", query.float(), key.float()) * scale).softmax(-1)  # (heads, pixels, pixels)
        probs = probs.mean(0)  # (pixels, pixels)
        self.self_map = probs if self.self_map is None else self.self_map + probs
        self.self_calls += 1


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(rows, length, heads * dim)`` -> ``(rows, heads, length, dim)``, a view."""
    return x.view(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)  # (rows, heads, length, dim)


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
        # The cross-attention edit moves onto the values (edit_ops.value_weights) where the value
        # projection is linear without a bias, the text states are not normalised and there is no
        # mask; otherwise the maps are formed and edited below.
        injection = None
        if edit and attention_mask is None and not attn.norm_cross and getattr(attn.to_v, "bias", None) is None:
            injection = plan.value_injection(p2p_step)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        # A value-form edit that takes the source's maps gives the target rows the source's keys:
        # taken from the text states (once per step), not by copying keys in every layer.
        source_keys = injection is not None and injection.source is not None
        key_states = encoder_hidden_states
        if source_keys:
            key_states = ctrl.source_key_states(p2p_step, encoder_hidden_states, injection.both_terms)
        key = attn.to_k(key_states)
        value = attn.to_v(encoder_hidden_states if injection is None else ctrl.injected_states(injection, p2p_step, encoder_hidden_states))
        head_dim = key.shape[-1] // attn.heads
        query = _split_heads(query, attn.heads)  # (batch, heads, pixels, dim)
        key = _split_heads(key, attn.heads)  # (batch [+ targets], heads, keys, dim)
        value = _split_heads(value, attn.heads)  # (batch [+ targets], heads, keys, dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if active and not is_cross and plan is not None and plan.self_active(p2p_step, side):
            # Inject the source's self-attention map: SDPA(q_src, k_src, v_tgt) for every target.
            query = ctrl.with_source_rows(query)  # (batch, heads, pixels, dim)
            key = ctrl.with_source_rows(key)  # (batch, heads, keys, dim)
        own_query, own_key = query, key  # each prompt's own, for the maps that are recorded
        if source_keys and record:  # the keys above are the source's in the target rows
            own_key = _split_heads(attn.to_k(encoder_hidden_states), attn.heads)  # (batch, heads, tokens, dim)
            if attn.norm_k is not None:
                own_key = attn.norm_k(own_key)
        own_rows = injection is not None and injection.both_terms  # extra rows: the targets' own term
        if injection is not None:
            # The target rows attend with the source's queries and keys to S V_k. Where tokens keep
            # their own maps (new words, windows that have ended), extra rows attend with the
            # targets' own queries and keys to o * V_k in the same call, and are added to them. No
            # map is formed, and the path does not depend on whether this side is recorded, so
            # neither do the images.
            if source_keys:  # the keys already are (source_key_states)
                query = ctrl.with_source_rows(query, append_targets=own_rows)  # (batch [+ targets], heads, pixels, dim)
            edit = False  # done

        if active and not is_cross and side == ctrl.self_record_side:
            ctrl.record_self(query[cond.start], key[cond.start], attn.scale)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale)  # (batch [+ targets], heads, pixels, dim)
        if own_rows:
            own, out = out[batch:], out[:batch]  # (targets, heads, pixels, dim), (batch, heads, pixels, dim)
            if torch.is_grad_enabled():  # SDPA's output is saved for its backward: keep it intact
                out = out.clone()
            out[ctrl.targets].add_(own)

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
                targets = ctrl.targets
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
