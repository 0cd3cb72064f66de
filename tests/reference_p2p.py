"""Test oracle: a plain re-implementation of the released Prompt-to-Prompt reference code.

Source being mirrored: Hertz et al. 2022, github.com/google/prompt-to-prompt
(``prompt-to-prompt_stable.ipynb``, ``ptp_utils.py``, ``seq_aligner.py``).  The algorithm is kept
identical - including the layer-call-counting controller, the in-place style edits of the
conditional half of the CFG batch, the alignment tie-breaking and the quirks of the replacement
mapper - because the library's optimised engine is tested for equality against this module.
This file is a test oracle only; it is not part of the library and it is deliberately unoptimised.

Adaptations to the reference (each one is deliberate):

1. Hooking.  The reference monkeypatches ``CrossAttention.forward``.  Here a diffusers attention
   processor (:class:`P2PReferenceProcessor`) does the same computation: q, k, v via
   ``attn.to_q/to_k/to_v``, heads via ``attn.head_to_batch_dim``, probabilities computed explicitly
   as ``softmax(q @ k^T * attn.scale)`` in float32 with shape ``(batch*heads, pixels, tokens)``,
   then ``controller(probs, is_cross, place_in_unet)`` exactly like ``register_attention_control``,
   then ``probs @ v``, ``attn.batch_to_head_dim``, ``to_out[0]``, ``to_out[1]``.  ``place_in_unet``
   ("down" / "mid" / "up") comes from the processor key prefix.  Installed with
   ``unet.set_attn_processor`` and the original processors are restored in a ``finally``.
   ``num_att_layers`` = number of attention processors (the reference counts every Attention
   module under down/mid/up, which is the same set).
2. Model constants come from the components: ``max_num_words = tokenizer.model_max_length``; the
   self-attention replacement test ``attn.shape[1] <= 16**2`` becomes ``<= self_max_res**2``; the
   AttentionStore ``<= 32**2`` storage limit is dropped (everything is stored); LocalBlend's
   ``down_cross[2:4] + up_cross[:3]`` (the 16x16 cross layers of SD at 512 px) becomes "every
   stored cross map (down, mid, up, in that order) whose pixel count == blend_res**2", each
   reshaped to ``(n_prompts, heads, 1, res, res, max_words)`` and concatenated on dim 1.
3. Two documented semantic choices of the project, followed here too:
   (a) step windows: a fraction f of T = num_inference_steps means step index int(f*T) for BOTH the
       cross and the self schedule.  The reference's cross alpha table has T+1 rows (so it uses
       int(f*(T+1))); here the table has T rows.
   (b) LocalBlend reads each prompt's own cross-attention maps BEFORE the edit.  The reference
       stores a view that its later in-place edit overwrites; here AttentionStore stores a
       ``.clone()`` taken before any editing.
4. LocalBlend is the newer reference version (``substruct_words``, ``start_blend``, ``th``), and it
   reads the attention store summed over the steps so far (``between_steps`` runs at the end of a
   UNet call, before ``step_callback``) - as in the reference.
5. Runner: :func:`run_reference` mirrors ``text2image_ldm_stable`` + ``diffusion_step`` for a generic
   diffusers scheduler (``init_noise_sigma``, ``scale_model_input``), returns latents (no decode);
   :func:`decode_latents` decodes like ``latent2image`` but returns a float tensor in [0, 1].
6. No globals: controllers take ``tokenizer`` / ``device`` (and LocalBlend ``num_steps``) as
   arguments.  ``LOW_RESOURCE`` is fixed to False, so only the conditional half ``attn[h//2:]`` of
   the CFG batch is stored / edited.
7. Minor robustness only (no algorithmic change): a dict ``cross_replace_steps`` is copied instead
   of mutated; integer bounds are accepted like floats; word indices are turned into a LongTensor.
8. Opt-in only (``aligned_tail=True`` of :class:`AttentionReplace`): the project's documented word
   swap keeps the tokens after a word whose token count changed aligned (source ``i`` -> target
   ``j``), where the reference writes ``mapper[j, j]``; target positions past the source's end read
   the source's last position.  Off by default, so the reference quirk is what the oracle checks.
9. SDXL (:func:`run_reference_xl`): the conditioning of diffusers' ``StableDiffusionXLPipeline``,
   written out here - both tokenizers pad to their own ``model_max_length`` with their own pad token,
   each encoder's penultimate hidden state, concatenated on the feature axis; the second encoder's
   projected pooled output as ``text_embeds``; ``time_ids`` = (H, W, 0, 0, H, W) of the image size;
   every prompt row (source and targets) gets its own pooled embedding; the unconditional half is
   zeros (``force_zeros_for_empty_prompt``) or the encoding of "".  The controllers are unchanged:
   they see ``(batch*heads, pixels, tokens)`` maps whose token axis is shared by both encoders, and
   compute word indices / mappers with whichever tokenizer they are given.
"""

from __future__ import annotations

import abc
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as nnf

LOW_RESOURCE = False  # the reference's flag; only the non-low-resource path is reproduced


# --------------------------------------------------------------------------------------------
# ptp_utils: word indices and the cross-attention time/word schedule
# --------------------------------------------------------------------------------------------


def get_word_inds(text: str, word_place, tokenizer) -> np.ndarray:
    """Token positions (1-based, BOS is 0) of a word given by its text or its index in text.split(' ')."""
    words = text.split(" ")
    if isinstance(word_place, str):
        places = [i for i, w in enumerate(words) if w == word_place]
    elif isinstance(word_place, (int, np.integer)):
        places = [int(word_place)]
    else:
        places = list(word_place)
    result = []
    if len(places) > 0:
        pieces = [tokenizer.decode([tok]).strip("#") for tok in tokenizer.encode(text)][1:-1]
        consumed, word_ptr = 0, 0
        for i, piece in enumerate(pieces):
            consumed += len(piece)
            if word_ptr in places:
                result.append(i + 1)
            if consumed >= len(words[word_ptr]):
                word_ptr += 1
                consumed = 0
    return np.array(result)


def update_alpha_time_word(alpha: torch.Tensor, bounds, prompt_ind: int, word_inds=None) -> torch.Tensor:
    if isinstance(bounds, (int, float)):
        bounds = 0, bounds
    n_rows = alpha.shape[0]
    start, end = int(bounds[0] * n_rows), int(bounds[1] * n_rows)
    if word_inds is None:
        word_inds = torch.arange(alpha.shape[2])
    else:
        word_inds = torch.as_tensor(np.asarray(word_inds), dtype=torch.long)
    alpha[:start, prompt_ind, word_inds] = 0
    alpha[start:end, prompt_ind, word_inds] = 1
    alpha[end:, prompt_ind, word_inds] = 0
    return alpha


def get_time_words_attention_alpha(prompts, num_steps: int, cross_replace_steps, tokenizer,
                                   max_num_words: Optional[int] = None) -> torch.Tensor:
    """Schedule table of shape (T, n_prompts-1, 1, 1, max_num_words) - T rows (adaptation 3a)."""
    if max_num_words is None:
        max_num_words = tokenizer.model_max_length
    if not isinstance(cross_replace_steps, dict):
        cross_replace_steps = {"default_": cross_replace_steps}
    else:
        cross_replace_steps = dict(cross_replace_steps)
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0.0, 1.0)
    n_edit = len(prompts) - 1
    table = torch.zeros(num_steps, n_edit, max_num_words)
    for i in range(n_edit):
        table = update_alpha_time_word(table, cross_replace_steps["default_"], i)
    for key, bounds in cross_replace_steps.items():
        if key == "default_":
            continue
        per_prompt = [get_word_inds(prompts[i], key, tokenizer) for i in range(1, len(prompts))]
        for i, inds in enumerate(per_prompt):
            if len(inds) > 0:
                table = update_alpha_time_word(table, bounds, i, inds)
    return table.reshape(num_steps, n_edit, 1, 1, max_num_words)


# --------------------------------------------------------------------------------------------
# seq_aligner: replacement mapper and refinement (global alignment) mapper
# --------------------------------------------------------------------------------------------


class ScoreParams:
    def __init__(self, gap: int, match: int, mismatch: int):
        self.gap = gap
        self.match = match
        self.mismatch = mismatch

    def mis_match_char(self, a, b) -> int:
        return self.match if a == b else self.mismatch


def _score_matrix(size_x: int, size_y: int, gap: int) -> np.ndarray:
    m = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    m[0, 1:] = (np.arange(size_y) + 1) * gap
    m[1:, 0] = (np.arange(size_x) + 1) * gap
    return m


def _traceback_matrix(size_x: int, size_y: int) -> np.ndarray:
    # 1 = left (gap in x), 2 = up (gap in y), 3 = diagonal, 4 = origin
    tb = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    tb[0, 1:] = 1
    tb[1:, 0] = 2
    tb[0, 0] = 4
    return tb


def global_align(x, y, score: ScoreParams):
    m = _score_matrix(len(x), len(y), score.gap)
    tb = _traceback_matrix(len(x), len(y))
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = m[i, j - 1] + score.gap
            up = m[i - 1, j] + score.gap
            diag = m[i - 1, j - 1] + score.mis_match_char(x[i - 1], y[j - 1])
            best = max(left, up, diag)
            m[i, j] = best
            # tie-breaking of the reference: left, then up, then diagonal
            if best == left:
                tb[i, j] = 1
            elif best == up:
                tb[i, j] = 2
            else:
                tb[i, j] = 3
    return m, tb


def get_aligned_sequences(x, y, tb):
    """Walk the trace-back; returns (x_aligned, y_aligned, mapper (len(y), 2) of (j, i or -1))."""
    x_out, y_out, y_to_x = [], [], []
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        move = tb[i, j]
        if move == 3:
            x_out.append(x[i - 1])
            y_out.append(y[j - 1])
            i -= 1
            j -= 1
            y_to_x.append((j, i))
        elif move == 1:
            x_out.append("-")
            y_out.append(y[j - 1])
            j -= 1
            y_to_x.append((j, -1))
        elif move == 2:
            x_out.append(x[i - 1])
            y_out.append("-")
            i -= 1
        else:  # 4: origin
            break
    y_to_x.reverse()
    return x_out, y_out, torch.tensor(y_to_x, dtype=torch.int64)


def get_mapper(x: str, y: str, tokenizer, max_len: int):
    x_ids = tokenizer.encode(x)
    y_ids = tokenizer.encode(y)
    _, tb = global_align(x_ids, y_ids, ScoreParams(0, 1, -1))
    base = get_aligned_sequences(x_ids, y_ids, tb)[-1]
    alphas = torch.ones(max_len)
    alphas[: base.shape[0]] = base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: base.shape[0]] = base[:, 1]
    mapper[base.shape[0]:] = len(y_ids) + torch.arange(max_len - len(y_ids))
    return mapper, alphas


def get_refinement_mapper(prompts, tokenizer, max_len: Optional[int] = None):
    """Returns (mappers (n-1, max_len) int64, alphas (n-1, max_len) float); alpha 0 = inserted token."""
    if max_len is None:
        max_len = tokenizer.model_max_length
    mappers, alphas = [], []
    for target in prompts[1:]:
        mapper, alpha = get_mapper(prompts[0], target, tokenizer, max_len)
        mappers.append(mapper)
        alphas.append(alpha)
    return torch.stack(mappers), torch.stack(alphas)


def get_replacement_mapper_(x: str, y: str, tokenizer, max_len: int, aligned_tail: bool = False) -> torch.Tensor:
    words_x = x.split(" ")
    words_y = y.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError(
            "attention replacement edit can only be applied on prompts with the same length"
            f" but prompt A has {len(words_x)} words and prompt B has {len(words_y)} words."
        )
    changed = [k for k in range(len(words_y)) if words_y[k] != words_x[k]]
    src = [get_word_inds(x, k, tokenizer) for k in changed]
    tgt = [get_word_inds(y, k, tokenizer) for k in changed]
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur = 0
    while i < max_len and j < max_len:
        if cur < len(src) and src[cur][0] == i:
            s, t = src[cur], tgt[cur]
            if len(s) == len(t):
                mapper[s, t] = 1
            else:
                share = 1 / len(t)
                for t_ind in t:
                    mapper[s, t_ind] = share
            cur += 1
            i += len(s)
            j += len(t)
        elif cur < len(src):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            # reference quirk kept on purpose: after the last changed word it writes [j, j], not [i, j]
            # (adaptation 8: [i, j] when aligned_tail)
            mapper[i if aligned_tail else j, j] = 1
            i += 1
            j += 1
    if aligned_tail:
        for j_rest in range(j, max_len):  # the source ran out first: the rest reads its last position
            mapper[max_len - 1, j_rest] = 1
    return torch.from_numpy(mapper).float()


def get_replacement_mapper(prompts, tokenizer, max_len: Optional[int] = None, aligned_tail: bool = False) -> torch.Tensor:
    """(n-1, max_len, max_len) float; mapper[s, t] = weight of source token s for target token t."""
    if max_len is None:
        max_len = tokenizer.model_max_length
    return torch.stack([get_replacement_mapper_(prompts[0], p, tokenizer, max_len, aligned_tail) for p in prompts[1:]])


# --------------------------------------------------------------------------------------------
# Notebook: LocalBlend and the controllers
# --------------------------------------------------------------------------------------------


def _word_alpha_layers(prompts, words, tokenizer, max_num_words) -> torch.Tensor:
    layers = torch.zeros(len(prompts), 1, 1, 1, 1, max_num_words)
    for i, (prompt, words_) in enumerate(zip(prompts, words)):
        if isinstance(words_, str):
            words_ = [words_]
        for word in words_:
            inds = torch.as_tensor(get_word_inds(prompt, word, tokenizer), dtype=torch.long)
            layers[i, :, :, :, :, inds] = 1
    return layers


class LocalBlend:
    def __init__(self, prompts: List[str], words, substruct_words=None, start_blend: float = 0.2,
                 th: Tuple[float, float] = (0.3, 0.3), *, tokenizer, num_steps: int, blend_res: int = 16,
                 device="cpu"):
        self.max_num_words = tokenizer.model_max_length
        self.alpha_layers = _word_alpha_layers(prompts, words, tokenizer, self.max_num_words).to(device)
        if substruct_words is not None:
            self.substruct_layers = _word_alpha_layers(prompts, substruct_words, tokenizer,
                                                       self.max_num_words).to(device)
        else:
            self.substruct_layers = None
        self.start_blend = int(start_blend * num_steps)
        self.counter = 0
        self.th = th
        self.blend_res = blend_res

    def get_mask(self, x_t, maps, alpha, use_pool: bool):
        k = 1
        maps = (maps * alpha).sum(-1).mean(1)
        if use_pool:
            maps = nnf.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
        mask = nnf.interpolate(maps, size=x_t.shape[2:])
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(self.th[1 - int(use_pool)])
        mask = mask[:1] + mask  # bool add == union with the source prompt's mask
        return mask

    def _collect_maps(self, attention_store):
        res = self.blend_res
        selected = []
        for key in ("down_cross", "mid_cross", "up_cross"):
            for item in attention_store[key]:
                if item.shape[1] == res * res:
                    selected.append(item)
        if not selected:
            raise ValueError(f"no stored cross-attention map has {res}x{res} pixels")
        n = self.alpha_layers.shape[0]
        selected = [item.reshape(n, -1, 1, res, res, self.max_num_words) for item in selected]
        return torch.cat(selected, dim=1)

    def __call__(self, x_t, attention_store):
        self.counter += 1
        if self.counter > self.start_blend:
            maps = self._collect_maps(attention_store)
            mask = self.get_mask(x_t, maps, self.alpha_layers, True)
            if self.substruct_layers is not None:
                sub = ~self.get_mask(x_t, maps, self.substruct_layers, False)
                mask = mask * sub
            mask = mask.float()
            x_t = x_t[:1] + mask * (x_t - x_t[:1])
        return x_t


class AttentionControl(abc.ABC):
    def __init__(self):
        self.cur_step = 0
        self.num_att_layers = -1
        self.cur_att_layer = 0

    def step_callback(self, x_t):
        return x_t

    def between_steps(self):
        return

    @property
    def num_uncond_att_layers(self):
        return self.num_att_layers if LOW_RESOURCE else 0

    @abc.abstractmethod
    def forward(self, attn, is_cross: bool, place_in_unet: str):
        raise NotImplementedError

    def __call__(self, attn, is_cross: bool, place_in_unet: str):
        if self.cur_att_layer >= self.num_uncond_att_layers:
            h = attn.shape[0]
            attn[h // 2:] = self.forward(attn[h // 2:], is_cross, place_in_unet)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers + self.num_uncond_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def reset(self):
        self.cur_step = 0
        self.cur_att_layer = 0


class EmptyControl(AttentionControl):
    def forward(self, attn, is_cross: bool, place_in_unet: str):
        return attn


class AttentionStore(AttentionControl):
    @staticmethod
    def get_empty_store():
        return {"down_cross": [], "mid_cross": [], "up_cross": [],
                "down_self": [], "mid_self": [], "up_self": []}

    def __init__(self):
        super().__init__()
        self.step_store = self.get_empty_store()
        self.attention_store = {}

    def forward(self, attn, is_cross: bool, place_in_unet: str):
        key = f"{place_in_unet}_{'cross' if is_cross else 'self'}"
        # adaptation 2: no 32**2 limit; adaptation 3b: a copy taken before any edit
        self.step_store[key].append(attn.clone())
        return attn

    def between_steps(self):
        if len(self.attention_store) == 0:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self.get_empty_store()

    def get_average_attention(self):
        return {key: [item / self.cur_step for item in items] for key, items in self.attention_store.items()}

    def reset(self):
        super().reset()
        self.step_store = self.get_empty_store()
        self.attention_store = {}


class AttentionControlEdit(AttentionStore, abc.ABC):
    def __init__(self, prompts, num_steps: int, cross_replace_steps, self_replace_steps,
                 local_blend: Optional[LocalBlend], *, tokenizer, device="cpu", self_max_res: int = 16):
        super().__init__()
        self.batch_size = len(prompts)
        self.max_num_words = tokenizer.model_max_length
        self.cross_replace_alpha = get_time_words_attention_alpha(
            prompts, num_steps, cross_replace_steps, tokenizer, self.max_num_words).to(device)
        if isinstance(self_replace_steps, (int, float)):
            self_replace_steps = 0, self_replace_steps
        self.num_self_replace = int(num_steps * self_replace_steps[0]), int(num_steps * self_replace_steps[1])
        self.local_blend = local_blend
        self.self_max_res = self_max_res

    def step_callback(self, x_t):
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store)
        return x_t

    def replace_self_attention(self, attn_base, att_replace):
        if att_replace.shape[2] <= self.self_max_res ** 2:
            return attn_base.unsqueeze(0).expand(att_replace.shape[0], *attn_base.shape)
        return att_replace

    @abc.abstractmethod
    def replace_cross_attention(self, attn_base, att_replace):
        raise NotImplementedError

    def forward(self, attn, is_cross: bool, place_in_unet: str):
        super().forward(attn, is_cross, place_in_unet)
        if is_cross or (self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]):
            heads = attn.shape[0] // self.batch_size
            attn = attn.reshape(self.batch_size, heads, *attn.shape[1:])
            attn_base, attn_replace = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step]
                new = self.replace_cross_attention(attn_base, attn_replace) * alpha_words \
                    + (1 - alpha_words) * attn_replace
                attn[1:] = new
            else:
                attn[1:] = self.replace_self_attention(attn_base, attn_replace)
            attn = attn.reshape(self.batch_size * heads, *attn.shape[2:])
        return attn


class AttentionReplace(AttentionControlEdit):
    def __init__(self, prompts, num_steps: int, cross_replace_steps, self_replace_steps,
                 local_blend: Optional[LocalBlend] = None, *, tokenizer, device="cpu", self_max_res: int = 16,
                 aligned_tail: bool = False):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend,
                         tokenizer=tokenizer, device=device, self_max_res=self_max_res)
        self.mapper = get_replacement_mapper(prompts, tokenizer, self.max_num_words, aligned_tail).to(device)

    def replace_cross_attention(self, attn_base, att_replace):
        return torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper)


class AttentionRefine(AttentionControlEdit):
    def __init__(self, prompts, num_steps: int, cross_replace_steps, self_replace_steps,
                 local_blend: Optional[LocalBlend] = None, *, tokenizer, device="cpu", self_max_res: int = 16):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend,
                         tokenizer=tokenizer, device=device, self_max_res=self_max_res)
        mapper, alphas = get_refinement_mapper(prompts, tokenizer, self.max_num_words)
        self.mapper = mapper.to(device)
        self.alphas = alphas.to(device).reshape(alphas.shape[0], 1, 1, alphas.shape[1])

    def replace_cross_attention(self, attn_base, att_replace):
        base_mapped = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
        return base_mapped * self.alphas + att_replace * (1 - self.alphas)


class AttentionReweight(AttentionControlEdit):
    def __init__(self, prompts, num_steps: int, cross_replace_steps, self_replace_steps, equalizer,
                 local_blend: Optional[LocalBlend] = None, controller: Optional[AttentionControlEdit] = None,
                 *, tokenizer, device="cpu", self_max_res: int = 16):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend,
                         tokenizer=tokenizer, device=device, self_max_res=self_max_res)
        self.equalizer = equalizer.to(device)
        self.prev_controller = controller

    def replace_cross_attention(self, attn_base, att_replace):
        if self.prev_controller is not None:
            attn_base = self.prev_controller.replace_cross_attention(attn_base, att_replace)
        return attn_base[None, :, :, :] * self.equalizer[:, None, None, :]


def get_equalizer(text: str, word_select, values, tokenizer) -> torch.Tensor:
    """(1, max_num_words) ones, with `values` at the tokens of the selected words."""
    if isinstance(word_select, (int, str)):
        word_select = (word_select,)
    equalizer = torch.ones(1, tokenizer.model_max_length)
    for word, val in zip(word_select, values):
        inds = torch.as_tensor(get_word_inds(text, word, tokenizer), dtype=torch.long)
        equalizer[:, inds] = val
    return equalizer


# --------------------------------------------------------------------------------------------
# Hooking (adaptation 1) and runner (adaptation 5)
# --------------------------------------------------------------------------------------------


class P2PReferenceProcessor:
    """Diffusers attention processor that exposes explicit float32 probabilities to the controller."""

    def __init__(self, controller, place_in_unet: str):
        self.controller = controller
        self.place_in_unet = place_in_unet

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 **kwargs):
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        scores = torch.bmm(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = scores.softmax(dim=-1)  # (batch*heads, pixels, tokens), float32
        probs = self.controller(probs, is_cross, self.place_in_unet)

        hidden_states = torch.bmm(probs.to(value.dtype), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _place_in_unet(processor_key: str) -> str:
    if processor_key.startswith("down"):
        return "down"
    if processor_key.startswith("mid"):
        return "mid"
    if processor_key.startswith("up"):
        return "up"
    raise ValueError(f"attention processor outside down/mid/up blocks: {processor_key}")


def register_attention_control(unet, controller) -> dict:
    """Installs reference processors; returns the original processors (to restore afterwards)."""
    original = dict(unet.attn_processors)
    procs = {key: P2PReferenceProcessor(controller, _place_in_unet(key)) for key in original}
    controller.num_att_layers = len(procs)
    unet.set_attn_processor(procs)
    return original


def diffusion_step(unet, scheduler, controller, latents, context, t, guidance_scale, added_cond_kwargs=None):
    latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
    noise_pred = unet(latent_model_input, t, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs).sample
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    latents = scheduler.step(noise_pred, t, latents).prev_sample
    latents = controller.step_callback(latents)
    return latents


def _encode(tokenizer, text_encoder, texts, device):
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def run_reference(components: dict, prompts: List[str], controller, num_inference_steps: int,
                  guidance_scale: float, latent: torch.Tensor) -> torch.Tensor:
    """Reference text2image loop; returns final latents (n_prompts, C, h, w)."""
    unet = components["unet"]
    tokenizer = components["tokenizer"]
    text_encoder = components["text_encoder"]
    scheduler = components["scheduler"]
    device, dtype = unet.device, unet.dtype
    if controller is None:
        controller = EmptyControl()
    n = len(prompts)

    original = register_attention_control(unet, controller)
    try:
        text_emb = _encode(tokenizer, text_encoder, list(prompts), device)
        uncond_emb = _encode(tokenizer, text_encoder, [""] * n, device)
        context = torch.cat([uncond_emb, text_emb]).to(dtype)

        latents = latent.to(device=device, dtype=dtype).expand(n, *latent.shape[1:])
        scheduler.set_timesteps(num_inference_steps)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            latents = diffusion_step(unet, scheduler, controller, latents, context, t, guidance_scale)
    finally:
        unet.set_attn_processor(dict(original))
    return latents


def _encode_xl(components: dict, texts: List[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning of ``texts`` (adaptation 9), as diffusers' SDXL ``encode_prompt``.

    Returns (states (n, tokens, dim_1 + dim_2), pooled (n, projection_dim)).
    """
    states = []
    for tok_key, enc_key in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = components[tok_key], components[enc_key]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # (n, tokens), padded with this tokenizer's pad token
        out = encoder(ids.to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])  # penultimate layer: (n, tokens, dim_k)
    pooled = out.text_embeds  # the second encoder's projected pooled output: (n, projection_dim)
    return torch.cat(states, dim=-1), pooled  # states: (n, tokens, dim_1 + dim_2)


@torch.no_grad()
def run_reference_xl(components: dict, prompts: List[str], controller, num_inference_steps: int,
                     guidance_scale: float, latent: torch.Tensor, zero_uncond: bool = True) -> torch.Tensor:
    """The reference loop on SDXL's conditioning (adaptation 9); returns final latents (n_prompts, C, h, w).

    ``zero_uncond``: the unconditional states and pooled embedding are zeros (SDXL base's
    ``force_zeros_for_empty_prompt`` without a negative prompt), else the encoding of "".
    """
    unet = components["unet"]
    scheduler = components["scheduler"]
    device, dtype = unet.device, unet.dtype
    if controller is None:
        controller = EmptyControl()
    n = len(prompts)

    original = register_attention_control(unet, controller)
    try:
        text_emb, text_pooled = _encode_xl(components, list(prompts), device)  # one pooled row per prompt
        if zero_uncond:
            uncond_emb, uncond_pooled = torch.zeros_like(text_emb), torch.zeros_like(text_pooled)
        else:
            uncond_emb, uncond_pooled = _encode_xl(components, [""] * n, device)
        context = torch.cat([uncond_emb, text_emb]).to(dtype)  # (2n, tokens, dim_1 + dim_2)
        pooled = torch.cat([uncond_pooled, text_pooled]).to(dtype)  # (2n, projection_dim)

        vae_factor = 2 ** (len(components["vae"].config.block_out_channels) - 1)
        height, width = latent.shape[-2] * vae_factor, latent.shape[-1] * vae_factor
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)  # (1, 6)
        added = {"text_embeds": pooled, "time_ids": time_ids.repeat(2 * n, 1)}  # time ids: (2n, 6)

        latents = latent.to(device=device, dtype=dtype).expand(n, *latent.shape[1:])
        scheduler.set_timesteps(num_inference_steps)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            latents = diffusion_step(unet, scheduler, controller, latents, context, t, guidance_scale, added)
    finally:
        unet.set_attn_processor(dict(original))
    return latents


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Like the reference's latent2image, but returns a float tensor (n, 3, H, W) in [0, 1]."""
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)
