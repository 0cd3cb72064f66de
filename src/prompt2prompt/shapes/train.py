"""Train the bundled shapes-world text-to-image model (latent diffusion, the Stable Diffusion stack).

Stages of one resumable run folder:
1. ``vae``: a small `AutoencoderKL` (64x64x3 -> 16x16x4) on rendered scenes;
2. ``unet``: a `UNet2DConditionModel` and a `CLIPTextModel` trained together from scratch on the
   frozen autoencoder's latents, epsilon prediction, SD's noise schedule, 10% empty captions for
   classifier-free guidance, an EMA of the weights, learning-rate warm-up and cosine decay;
3. ``decoder`` (optional, at any time): the autoencoder's decoder alone, fine-tuned on the frozen
   encoder's latent means. The encoder, and so the latent space the UNet learned, stays bit for
   bit the same, so this can improve a trained model's pictures without retraining its UNet.

Every run is deterministic: scene ``k`` of the data stream is rendered from seed ``k``, and each
step's noise comes from a generator seeded by the step. A run stops after ``--minutes`` and writes
its state; the same command resumes it. Checkpoint files are safetensors of at most 16 MB each.

    python -m prompt2prompt.shapes.train RUN_DIR --stage vae --steps 3000 --minutes 10
    python -m prompt2prompt.shapes.train RUN_DIR --stage unet --steps 200000 --minutes 10
    python -m prompt2prompt.shapes.train RUN_DIR --export src/prompt2prompt/shapes/model
    python -m prompt2prompt.shapes.train RUN2 --init src/prompt2prompt/shapes/model --stage unet --minutes 10 --export OUT
    python -m prompt2prompt.shapes.train RUN3 --init src/prompt2prompt/shapes/model --stage decoder --minutes 60 --export OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

MAX_FILE_BYTES = 16 * 1024 * 1024
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def model_configs(tokenizer) -> dict:
    """The bundled model's architecture (shapes come from here and from the tokenizer only)."""
    return {
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64), norm_num_groups=32,
        ),
        "unet": dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(64, 96, 128), norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=128, attention_head_dim=4,
        ),
        "text_encoder": dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
    }


# ----------------------------------------------------------------------------- checkpoint files

def save_sharded(tensors: dict[str, torch.Tensor], path_prefix: Path, max_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """Save tensors in safetensors shards of at most ``max_bytes`` each (temp file, then rename)."""
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += n
    shards.append(current)
    names = []
    for i, shard in enumerate(shards):
        name = f"{path_prefix.name}-{i:02d}.safetensors"
        tmp = path_prefix.parent / (name + ".tmp")
        save_file(shard, str(tmp))
        os.replace(tmp, path_prefix.parent / name)
        names.append(name)
    return names


def load_sharded(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        out.update(load_file(str(folder / name)))
    return out


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors plus JSON-able metadata (no pickle)."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                meta["scalars"][f"{idx}.{k}"] = v
    return tensors, meta


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ----------------------------------------------------------------------------- data

def render_range(start: int, size: int, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """Scenes ``start .. start+size-1`` of the stream: uint8 ``(batch, h, w, 3)`` and captions."""
    from . import world

    images, captions = world.render_batch(list(range(start, start + size)), split)
    return images, list(captions)


def batch_images(start: int, size: int, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """Scenes ``start .. start+size-1`` of the stream as ``(batch, 3, 64, 64)`` in [-1, 1] and captions."""
    images, captions = render_range(start, size, split)
    return images_to_tensor(images), captions


def images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``(batch, h, w, 3)`` -> float ``(batch, 3, h, w)`` in [-1, 1] on ``device``. The bytes
    travel and the floats are made there (a quarter of the transfer; the same values on any device)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # (batch, h, w, 3) uint8
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (batch, 3, h, w)


BACKGROUND_REGION = 2  # region index of the background; objects are 0 and 1 (`grounding_targets`)


def grounding_targets(spec, filled: np.ndarray, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """What each caption token should look at, for `grounding_loss`: ``masks`` (3, h, w) bool, the
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
    from ..alignment import normalize_word, tokenize_words
    from . import world

    tokens = tokenize_words(spec.caption, tokenizer)
    words = [normalize_word(w) for w in tokens.words]
    regions = np.full(int(tokenizer.model_max_length), -1, np.int8)
    masks = np.zeros((3, *filled.shape[1:]), bool)
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


def render_grounded(start: int, size: int, tokenizer) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Scenes ``start .. start+size-1`` of the training stream with their `grounding_targets`:
    uint8 images (batch, h, w, 3), captions, masks (batch, 3, h, w) bool, regions (batch, max_length) int8."""
    from . import world

    images = np.empty((size, world.SIZE, world.SIZE, 3), np.uint8)
    masks = np.empty((size, 3, world.SIZE, world.SIZE), bool)
    regions = np.empty((size, int(tokenizer.model_max_length)), np.int8)
    captions = []
    for i in range(size):
        scene = world.sample_scene(start + i)
        images[i] = scene.image
        masks[i], regions[i] = grounding_targets(scene.spec, scene.filled, tokenizer)
        captions.append(scene.spec.caption)
    return images, captions, masks, regions


_WORKER_TOKENIZER = None


def _worker_init(tok_dir: str | None) -> None:
    global _WORKER_TOKENIZER
    torch.set_num_threads(1)
    if tok_dir is not None:
        from transformers import CLIPTokenizer

        _WORKER_TOKENIZER = CLIPTokenizer.from_pretrained(tok_dir)


def _render(start: int, size: int, tokenizer, grounding: bool) -> tuple:
    """One batch: images, captions, token ids (None without a tokenizer) and, with ``grounding``,
    ``(masks, regions)`` of `render_grounded` (else None)."""
    targets = None
    if grounding:
        images, captions, masks, regions = render_grounded(start, size, tokenizer)
        targets = (masks, regions)
    else:
        images, captions = render_range(start, size)
    ids = None
    if tokenizer is not None:
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="np").input_ids
    return images, captions, ids, targets


def _render_job(start: int, size: int, grounding: bool = False) -> tuple:
    """One batch rendered (and tokenized, if the worker has a tokenizer) in a worker process (`_render`)."""
    return _render(start, size, _WORKER_TOKENIZER, grounding)


class Batches:
    """Batches ``first, first+1, ...`` of the scene stream, rendered ahead by ``workers`` processes.

    Batch ``k`` is always scenes ``offset + k*size ..`` so the stream is the same with any number of
    workers (or none); at most ``2*workers`` batches are in flight, so memory stays bounded.
    """

    def __init__(self, first: int, size: int, offset: int, workers: int, tok_dir: str | None, grounding: bool = False):
        self.next, self.size, self.offset, self.grounding = first, size, offset, grounding
        if grounding and tok_dir is None:
            raise ValueError("grounding targets need the tokenizer (tok_dir)")
        self.tok_dir, self.pool, self.pending = tok_dir, None, []
        self.tokenizer = None
        if workers > 0:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(workers, _worker_init, (tok_dir,))
            self.depth = 2 * workers
        elif tok_dir is not None:
            from transformers import CLIPTokenizer

            self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    def _submit(self) -> None:
        start = self.offset + self.next * self.size
        self.pending.append(self.pool.apply_async(_render_job, (start, self.size, self.grounding)))
        self.next += 1

    def get(self) -> tuple[np.ndarray, list[str], torch.Tensor | None, tuple | None]:
        """The next batch: uint8 images ``(batch, h, w, 3)``, captions, token ids (or None), and
        with ``grounding`` the `render_grounded` masks and regions as tensors (else None)."""
        if self.pool is None:
            images, captions, ids, targets = _render(self.offset + self.next * self.size, self.size, self.tokenizer, self.grounding)
            self.next += 1
        else:
            while len(self.pending) < self.depth:
                self._submit()
            images, captions, ids, targets = self.pending.pop(0).get()
            self._submit()
        ids = None if ids is None else torch.from_numpy(ids)
        if targets is not None:
            targets = tuple(torch.from_numpy(t) for t in targets)
        return images, captions, ids, targets

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def fit_total(step: int, started_step: int, elapsed: float, minutes: float) -> int:
    """The stage's total step count that makes the run end at ``minutes`` at the measured pace."""
    per_step = elapsed / max(1, step - started_step)
    return step + max(1, int((minutes * 60 - elapsed) / per_step))


def training_noise(shape: tuple[int, int, int, int], generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise ``(batch, C, h, w)``, plus ``offset * N(0, 1)`` constant over each sample's
    channel when ``offset`` > 0 ("offset noise"): it lets the model move a latent's mean, which SD's
    schedule never fully noises (sqrt(alpha_bar_T) = 0.068)."""
    noise = torch.randn(shape, generator=generator, device=generator.device)  # (batch, C, h, w), on the generator's device
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator, device=generator.device)  # (batch, C, 1, 1)
    return noise


def min_snr_weights(alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al., 2023, eq. 8 for epsilon prediction):
    ``min(SNR(t), gamma) / SNR(t)`` with ``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)``. Steps whose
    SNR exceeds ``gamma`` (nearly clean latents, fine detail) are weighted down, so that the
    conflicting gradients of easy steps do not slow the learning of layout; ``gamma <= 0``: all 1."""
    if gamma <= 0:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


class GroundingAttnProcessor:
    """A diffusers attention processor for training with `grounding_loss`: cross-attention forms its
    probabilities explicitly (softmax in float32) and appends their mean over heads to
    ``self.maps``; self-attention is plain SDPA. The output is the layer's usual one, so the
    diffusion loss is unchanged. Installed for a step and removed after (`Run.train_unet`).

    Args:
        maps: the list the maps are appended to, ``(batch, pixels, tokens)`` each.
        sides: the square sides (e.g. ``{8, 4}``) whose cross-attention maps are collected; the
            other layers run plain SDPA and are not supervised. None: every layer.
    """

    def __init__(self, maps: list, sides: frozenset[int] | None = None):
        self.maps = maps
        self.sides = sides

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
        if is_cross and (self.sides is None or math.isqrt(hidden_states.shape[1]) in self.sides):
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


def cross_attention_sides(unet, length: int) -> list[int]:
    """The square sides of the UNet's cross-attention maps, largest first (e.g. ``[16, 8, 4]``),
    read from the map shapes of one dry forward pass on a zero latent of the config's
    ``sample_size`` and ``length`` zero text states."""
    maps: list[torch.Tensor] = []
    original = unet.attn_processors
    p = next(unet.parameters())
    side = unet.config.sample_size
    z = torch.zeros(1, unet.config.in_channels, side, side, device=p.device, dtype=p.dtype)  # (1, C, h, w)
    states = torch.zeros(1, length, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)  # (1, tokens, dim)
    unet.set_attn_processor(GroundingAttnProcessor(maps))
    try:
        with torch.no_grad():
            unet(z, 0, encoder_hidden_states=states)
    finally:
        unet.set_attn_processor(original)
    return sorted({math.isqrt(a.shape[1]) for a in maps}, reverse=True)  # a: (1, pixels, tokens)


def check_grounding_sides(unet, length: int, sides) -> None:
    """Raise ValueError unless ``sides`` is a non-empty subset of `cross_attention_sides`."""
    available = cross_attention_sides(unet, length)
    if not sides or not set(sides) <= set(available):
        raise ValueError(f"grounding sides {list(sides)} are not among this model's cross-attention map sides "
                         f"{available}; pass some of those (e.g. --grounding-sides {','.join(map(str, available[1:] or available))})")


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


def chunk_record(stage: str, steps: tuple[int, int], seconds: float, device: torch.device, settings: dict,
                 command: str | None) -> dict:
    """One training chunk, as the run's log and the exported ``training.json`` keep it: the stage,
    its first and last step, samples, wall time, the date (UTC), the hardware it ran on, its
    settings (batch, learning rate, ...) and the command line that started it (None from the API)."""
    if device.type == "cuda":
        hardware = f"1x {torch.cuda.get_device_name(device)}"
    else:
        hardware = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return {"stage": stage, "steps": list(steps), "samples": (steps[1] - steps[0]) * settings["batch"], "seconds": seconds,
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "hardware": hardware, **settings, "command": command}


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- the run

class Run:
    """A resumable training run in ``folder`` (state.json + safetensors shards + loss.csv)."""

    def __init__(self, folder: str | os.PathLike, device: str, init: str | os.PathLike | None = None):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        self.folder = Path(folder)
        resuming = (self.folder / "state.json").exists()
        if init is not None and not resuming:
            init = Path(init)
            missing = [n for n in ("model_index.json", "training.json", "unet", "vae", "text_encoder", "tokenizer") if not (init / n).exists()]
            if missing:
                raise ValueError(f"--init {init}: not an exported shapes model (missing {', '.join(missing)}); "
                                 "pass a folder written by --export, e.g. src/prompt2prompt/shapes/model")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        tok_dir = self.folder / "tokenizer"
        if init is not None and not resuming and not tok_dir.exists():
            CLIPTokenizer.from_pretrained(str(init / "tokenizer")).save_pretrained(str(tok_dir))
        if not any((tok_dir / n).exists() for n in ("vocab.json", "tokenizer.json")):
            from .tokenizer import build_from_world

            build_from_world(tok_dir)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        cfg = model_configs(self.tokenizer)
        torch.manual_seed(0)
        self.vae = AutoencoderKL(**cfg["vae"]).to(self.device)
        self.unet = UNet2DConditionModel(**cfg["unet"]).to(self.device)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).to(self.device)
        self.ema = {
            "unet": {k: v.detach().clone().float() for k, v in self.unet.state_dict().items()},
            "text_encoder": {k: v.detach().clone().float() for k, v in self.text_encoder.state_dict().items()},
        }
        self.state = {"vae_step": 0, "unet_step": 0, "scaling_factor": None, "files": {}, "samples_seen": {"vae": 0, "unet": 0}, "seconds": {"vae": 0.0, "unet": 0.0}}
        self.command: str | None = None  # the command line of this process, for the chunk log (`main` sets it)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=1e-3, weight_decay=0.0)
        self.decoder_opt = torch.optim.AdamW(self._decoder_params(), lr=1e-4, weight_decay=0.0)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        # The fused kernel on CUDA: one fused update instead of the default foreach path's ten or so multi-tensor ops.
        self.opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01, fused=self.device.type == "cuda")
        if resuming:
            self._load()
        elif init is not None:
            self._init_from(init)

    def _init_from(self, model_dir: Path) -> None:
        """Start from an exported model: its (EMA) weights become the weights and the EMA, its
        scaling factor and step counts carry on, and the UNet stage's schedule restarts here (fresh
        optimizer state, a new warm-up and decay); the VAE is taken as it is."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        info = json.loads((model_dir / "training.json").read_text())
        self.vae.load_state_dict(AutoencoderKL.from_pretrained(model_dir / "vae").state_dict())
        self.unet.load_state_dict(UNet2DConditionModel.from_pretrained(model_dir / "unet").state_dict())
        self.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(model_dir / "text_encoder").state_dict())
        for part, m in (("unet", self.unet), ("text_encoder", self.text_encoder)):
            self.ema[part] = {k: v.detach().clone().float() for k, v in m.state_dict().items()}
        for key in ("vae_step", "unet_step", "scaling_factor", "samples_seen", "seconds"):
            self.state[key] = info[key]
        for key in ("offset_noise", "min_snr_gamma"):  # the settings of the model's last UNet chunk
            if key in info:
                self.state[key] = info[key]
        if "decoder_step" in info:
            self.state["decoder_step"] = info["decoder_step"]
            self.state["decoder_from"] = info["decoder_step"]
        self.state["unet_from"] = info["unet_step"]
        earlier = {k: info[k] for k in ("unet_step", "samples_seen", "seconds", "chunks") if k in info}
        self.state["history"] = info.get("history", []) + [json.loads(json.dumps(earlier))]  # a copy: the counts go on

    def _decoder_params(self) -> list[torch.nn.Parameter]:
        """What the ``decoder`` stage trains: everything after the latent (``post_quant_conv``, ``decoder``)."""
        return list(self.vae.post_quant_conv.parameters()) + list(self.vae.decoder.parameters())

    def _optimizers(self) -> tuple[tuple[str, torch.optim.Optimizer], ...]:
        return (("vae_opt", self.vae_opt), ("opt", self.opt), ("decoder_opt", self.decoder_opt))

    # -- persistence
    def _load(self) -> None:
        self.state = json.loads((self.folder / "state.json").read_text())
        files = self.state["files"]
        self.vae.load_state_dict(load_sharded(self.folder, files["vae"]))
        self.unet.load_state_dict(load_sharded(self.folder, files["unet"]))
        self.text_encoder.load_state_dict(load_sharded(self.folder, files["text_encoder"]))
        ema = load_sharded(self.folder, files["ema"])
        for part in self.ema:
            self.ema[part] = {k.split(".", 1)[1]: v.to(self.device) for k, v in ema.items() if k.startswith(part + ".")}
        for name, opt in self._optimizers():
            if name in files:
                load_optimizer(opt, {k: v.to(self.device) for k, v in load_sharded(self.folder, files[name]).items()}, self.state[name + "_meta"])

    def save(self) -> None:
        files = {
            "vae": save_sharded(self.vae.state_dict(), self.folder / "vae"),
            "unet": save_sharded(self.unet.state_dict(), self.folder / "unet"),
            "text_encoder": save_sharded(self.text_encoder.state_dict(), self.folder / "text_encoder"),
            "ema": save_sharded({f"{p}.{k}": v for p, sd in self.ema.items() for k, v in sd.items()}, self.folder / "ema"),
        }
        for name, opt in self._optimizers():
            if opt.state:
                tensors, meta = optimizer_tensors(opt)
                files[name] = save_sharded(tensors, self.folder / name)
                self.state[name + "_meta"] = meta
        self.state["files"] = files
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.folder / "state.json")

    def log(self, stage: str, step: int, loss: float, lr: float) -> None:
        path = self.folder / "loss.csv"
        new = not path.exists()
        with open(path, "a") as f:
            if new:
                f.write("stage,step,loss,lr,time\n")
            f.write(f"{stage},{step},{loss:.6f},{lr:.3g},{time.time():.0f}\n")

    # -- stages
    def _total(self, stage: str, steps: int | None) -> int | None:
        """The stage's total steps: given, recorded by an earlier chunk, or None (fit to the time budget)."""
        if steps is not None:
            self.state[stage + "_total"] = steps
        return self.state.get(stage + "_total")

    def _loop(self, stage: str, steps: int | None, batch: int, minutes: float, workers: int, offset: int,
              base_lr: float, warmup: int | None, opt: torch.optim.Optimizer, step_fn, grounding: bool = False,
              settings: dict | None = None) -> None:
        """Run ``step_fn(x, ids, step, targets)`` until the stage's total or ``minutes``; then
        checkpoint. ``targets`` are the batch's `render_grounded` masks and regions with
        ``grounding``, else None. The chunk is logged in ``state["chunks"]`` (`chunk_record`, with
        the stage's own ``settings``), which the export carries into ``training.json``.

        With ``steps=None`` and no recorded total, the total (which sets the cosine decay) is fitted
        after 30 timed steps so that the run ends with ``minutes``; it is recorded, so a resumed
        chunk keeps the same schedule.
        """
        total = self._total(stage, steps)
        if warmup is None:
            warmup = min({"vae": 200, "decoder": 100}.get(stage, 1000), ((total or 5000) - self.state.get(stage + "_from", 0)) // 10)
        key = stage + "_step"
        self.state.setdefault(key, 0)  # runs (and exports) older than the stage lack its counts
        self.state["samples_seen"].setdefault(stage, 0)
        self.state["seconds"].setdefault(stage, 0.0)
        start, step = time.time(), self.state[key]
        tok_dir = str(self.folder / "tokenizer") if stage == "unet" else None
        data = Batches(step, batch, offset, workers, tok_dir, grounding)
        calib_from = calib_t = None
        waited = 0.0  # seconds spent waiting for rendered batches: the data pipeline's share of the chunk
        try:
            while (total is None or step < total) and time.time() - start < minutes * 60:
                if total is None and calib_from is None and step - self.state[key] == 5:
                    self._sync()
                    calib_from, calib_t = step, time.time()
                if total is None and calib_from is not None and step - calib_from == 30:
                    self._sync()
                    total = fit_total(step, calib_from, time.time() - calib_t, minutes - (calib_t - start) / 60)
                    self.state[stage + "_total"] = total
                    print(f"{stage}: {(time.time() - calib_t) / 30 * 1000:.1f} ms/step; total fitted to {total} steps", flush=True)
                t0 = time.time()
                images, _, ids, targets = data.get()
                waited += time.time() - t0
                x = images_to_tensor(images, self.device)  # (batch, 3, h, w) in [-1, 1]
                first = self.state.get(stage + "_from", 0)  # where this stage's schedule began (--init)
                lr = lr_at(step - first, (total or 10**9) - first, base_lr, warmup)
                for g in opt.param_groups:
                    g["lr"] = lr
                loss = step_fn(x, ids, step, targets)
                step += 1
                if step % 50 == 0:
                    self.log(stage, step, loss.item(), lr)
        finally:
            data.close()
        self._sync()
        elapsed = time.time() - start
        print(f"{stage}: {step - self.state[key]} steps x {batch} in {elapsed:.0f} s, {waited:.0f} s of it waiting for "
              f"rendered batches ({workers} workers, {torch.get_num_threads()} torch threads here)", flush=True)
        self.state["seconds"][stage] += elapsed
        self.state.setdefault("data_wait_seconds", {}).setdefault(stage, 0.0)
        self.state["data_wait_seconds"][stage] += waited
        self.state["samples_seen"][stage] += (step - self.state[key]) * batch
        precision = "float32" + (", TF32 matmuls" if self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "")
        lr_settings = {"batch": batch, "lr": base_lr, "warmup": warmup, "total": total, "workers": workers,
                       "data_wait_seconds": waited, "precision": precision}  # a stage's own settings may name its precision
        self.state.setdefault("chunks", []).append(
            chunk_record(stage, (self.state[key], step), elapsed, self.device, {**lr_settings, **(settings or {})}, self.command))
        self.state[key] = step
        self.save()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_vae(self, steps: int | None, batch: int, minutes: float, kl_weight: float = 1e-6, workers: int = 0,
                  lr: float = 1e-3, warmup: int | None = None) -> None:
        self.vae.train().requires_grad_(True)  # an earlier stage in this process may have frozen it

        def step_fn(x, _ids, step, _targets):
            x = x.to(self.device)
            posterior = self.vae.encode(x).latent_dist
            gen = torch.Generator(device=self.device).manual_seed(step)
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen, device=self.device)
            rec = self.vae.decode(z).sample
            loss = F.mse_loss(rec, x) + kl_weight * posterior.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            return loss.detach()

        self._loop("vae", steps, batch, minutes, workers, 10_000_000, lr, warmup, self.vae_opt, step_fn)

    def train_decoder(self, steps: int | None, batch: int, minutes: float, workers: int = 0,
                      lr: float = 1e-4, warmup: int | None = None) -> None:
        """Fine-tune the decoder (and ``post_quant_conv``) to reconstruct scenes from the frozen
        encoder's latent means, the latents the UNet was trained to produce (`_latents` without the
        scaling). The encoder and ``quant_conv`` get no gradient and no optimizer, so the latent
        space, the scaling factor and every UNet trained on them stay valid."""
        self.vae.eval()  # the encoder's normalisation layers are group norms: no running statistics
        self.vae.requires_grad_(False)
        params = self._decoder_params()
        for p in params:
            p.requires_grad_(True)

        def step_fn(x, _ids, step, _targets):
            x = x.to(self.device)
            with torch.no_grad():
                z = self.vae.encode(x).latent_dist.mean  # (batch, latent_channels, h/f, w/f)
            rec = self.vae.decode(z).sample  # (batch, 3, h, w)
            loss = F.mse_loss(rec, x)
            self.decoder_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.decoder_opt.step()
            return loss.detach()

        try:
            self._loop("decoder", steps, batch, minutes, workers, 30_000_000, lr, warmup, self.decoder_opt, step_fn)
        finally:
            self.vae.requires_grad_(False)

    @torch.no_grad()
    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            mean = self.vae.encode(x).latent_dist.mean  # (batch, latent_channels, h/f, w/f)
        return mean.float() * self.state["scaling_factor"]

    def _ensure_scaling_factor(self) -> None:
        if self.state["scaling_factor"] is None:
            self.vae.eval()
            x, _ = batch_images(20_000_000, 256)
            with torch.no_grad():
                z = self.vae.encode(x.to(self.device)).latent_dist.mean
            self.state["scaling_factor"] = float(1.0 / z.std())

    def train_unet(self, steps: int | None, batch: int, minutes: float, ema_decay: float = 0.999, workers: int = 0,
                   lr: float = 3e-4, warmup: int | None = None, offset_noise: float = 0.0, min_snr_gamma: float = 0.0,
                   grounding: float = 0.0, grounding_share: float = 0.0,
                   grounding_sides: tuple[int, ...] | None = None, grounding_text: bool = True,
                   grounding_share_words: bool = False) -> None:
        """Train the UNet and text encoder. ``offset_noise`` adds ``offset_noise * N(0, 1)`` per
        sample and channel to the noise (constant over the image): with SD's schedule the noisiest
        step still leaks the latent's mean (sqrt(alpha_bar_T) = 0.068), so without it the model
        learns to read a flat background's colour from the starting noise instead of the caption.
        ``min_snr_gamma`` > 0 weights each sample's loss by `min_snr_weights`; the logged loss stays
        the unweighted MSE, comparable across runs. ``grounding`` > 0 adds that multiple of
        `grounding_loss` on every cross-attention layer's maps, so that the caption's object and
        background words attend to their own pixels (the scenes' masks are known); the model's
        architecture and inference path do not change. ``grounding_share`` > 0 adds that multiple of
        `grounding_share_loss`: the region's words hold its pixels' attention. ``grounding_sides``
        (e.g. ``(8, 4)``) restricts both losses to the cross-attention maps of those square sides
        (`cross_attention_sides` lists the model's); None: every layer. ``grounding_text=False``
        keeps the losses' gradient out of the text encoder (it still learns from the diffusion loss).
        ``grounding_share_words`` takes the pixel side's share among the caption's words only
        (`grounding_share_loss`'s ``words``), leaving the start token's and the padding's mass alone."""
        from diffusers import DDPMScheduler

        length = self.tokenizer.model_max_length
        if grounding_sides is not None:
            check_grounding_sides(self.unet, length, grounding_sides)
        self._ensure_scaling_factor()
        self.state["offset_noise"] = offset_noise
        self.state["min_snr_gamma"] = min_snr_gamma
        self.state["grounding"] = grounding
        self.state["grounding_share"] = grounding_share
        grounded = grounding > 0 or grounding_share > 0
        self.state["grounding_sides"] = sorted(grounding_sides, reverse=True) if grounded and grounding_sides else None
        self.state["grounding_text"] = grounding_text if grounded else None
        self.state["grounding_share_words"] = grounding_share_words if grounding_share > 0 else None
        specials = torch.tensor(sorted({self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}),
                                device=self.device)  # tokens that are not the caption's words
        noise_sched = DDPMScheduler(**SCHEDULE)
        alphas = noise_sched.alphas_cumprod.to(self.device)
        self.vae.eval().requires_grad_(False)
        self.unet.train()
        self.text_encoder.train()
        amp = self.device.type == "cuda"
        empty = self.tokenizer([""], padding="max_length", max_length=length, return_tensors="pt").input_ids  # (1, length)
        models = (("unet", self.unet), ("text_encoder", self.text_encoder))
        params = [p for _, m in models for p in m.parameters()]
        unet_params = list(self.unet.parameters())
        ema_params = [self.ema[part][k] for part, m in models for k, _ in m.named_parameters()]

        empty = empty.to(self.device)

        maps: list[torch.Tensor] = []  # the step's cross-attention maps, with grounding

        def step_fn(x, ids, step, targets):
            # The step's random numbers are drawn where they are used: on a GPU the host only
            # launches (benchmarks/shapes_training_cost.py times the draws on the host).
            gen = torch.Generator(device=self.device).manual_seed(1_000_000 + step)
            drop = torch.rand(x.shape[0], generator=gen, device=self.device) < 0.1
            ids = torch.where(drop[:, None], empty, ids.to(self.device))  # (batch, length); 10% empty captions
            z0 = self._latents(x.to(self.device))  # (batch, 4, h/8, w/8), float32
            noise = training_noise(tuple(z0.shape), gen, offset_noise)  # (batch, C, h, w)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (x.shape[0],), generator=gen, device=self.device)
            a = alphas[t].view(-1, 1, 1, 1)  # (batch, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                states = self.text_encoder(ids)[0]
                pred = self.unet(zt, t, encoder_hidden_states=states).sample
            mse = (pred.float() - noise).pow(2).mean((1, 2, 3))  # (batch,)
            weighted = (min_snr_weights(alphas[t], min_snr_gamma) * mse).mean()
            if grounded:
                masks, regions = (v.to(self.device) for v in targets)
                regions = torch.where(drop[:, None], -1, regions.long())  # (batch, length): no targets for empty captions
                ground = grounding_loss(maps, masks, regions)
                words = ~torch.isin(ids, specials) if grounding_share_words else None  # (batch, length)
                share = grounding_share_loss(maps, masks, regions, words)
                extra = grounding * ground + grounding_share * share
                maps.clear()
                if (step + 1) % 50 == 0:  # with the loss log's cadence (one host sync)
                    print(f"unet step {step + 1}: grounding loss {ground.item():.4f}, share loss {share.item():.4f}", flush=True)
            self.opt.zero_grad(set_to_none=True)
            if grounded and not grounding_text:
                backward_split(weighted, extra, unet_params)
            else:
                (weighted + extra if grounded else weighted).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], 1 - decay)
            return mse.mean().detach()

        original = self.unet.attn_processors
        if grounded:
            sides = frozenset(grounding_sides) if grounding_sides else None
            self.unet.set_attn_processor(GroundingAttnProcessor(maps, sides))
        try:
            settings = {k: self.state[k] for k in ("offset_noise", "min_snr_gamma", "grounding", "grounding_share", "grounding_sides",
                                                     "grounding_text", "grounding_share_words")}
            if amp:
                settings["precision"] = "bf16 autocast (UNet, text encoder, VAE encode)" + (
                    ", TF32 matmuls" if torch.backends.cuda.matmul.allow_tf32 else "")
            self._loop("unet", steps, batch, minutes, workers, 0, lr, warmup, self.opt, step_fn, grounding=grounded,
                       settings={"ema_decay": ema_decay, **settings})
        finally:
            self.unet.set_attn_processor(original)
        with torch.no_grad():  # buffers (e.g. position ids) are not trained: copy them as they are
            for part, m in models:
                for k, v in m.named_buffers():
                    if k in self.ema[part]:
                        self.ema[part][k].copy_(v)

    def export(self, out_dir: str | os.PathLike) -> Path:
        """Write the EMA weights as a diffusers Stable Diffusion folder (safetensors)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self._ensure_scaling_factor()
        self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        unet = type(self.unet).from_config(self.unet.config)
        unet.load_state_dict(self.ema["unet"])
        text_encoder = type(self.text_encoder)(self.text_encoder.config)
        text_encoder.load_state_dict(self.ema["text_encoder"])
        scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(self.folder / "tokenizer"))  # fresh: no padding state from training
        pipe = StableDiffusionPipeline(
            vae=self.vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="15MB")
        info = {k: self.state[k] for k in ("vae_step", "unet_step", "samples_seen", "seconds", "scaling_factor")}
        if self.state.get("decoder_step"):
            info["decoder_step"] = self.state["decoder_step"]
        info["offset_noise"] = self.state.get("offset_noise", 0.0)  # of the last UNet chunk
        info["min_snr_gamma"] = self.state.get("min_snr_gamma", 0.0)
        info["grounding"] = self.state.get("grounding", 0.0)
        info["grounding_share"] = self.state.get("grounding_share", 0.0)
        info["grounding_sides"] = self.state.get("grounding_sides")  # None: every layer
        info["grounding_text"] = self.state.get("grounding_text")  # False: the losses did not train the text encoder
        info["grounding_share_words"] = self.state.get("grounding_share_words")  # True: the share among the words only
        info["chunks"] = self.state.get("chunks", [])  # this run's chunks: steps, settings, hardware, command
        if self.state.get("history"):
            info["history"] = self.state["history"]  # the exported models this run continued from
        (tmp / "training.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
        self.vae.to(self.device)
        return out


def plot_loss(csv_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 720, height: int = 300) -> Path:
    """Draw a run's ``loss.csv`` (one panel per stage, log-scale loss against step) as a PNG."""
    from PIL import Image, ImageDraw

    rows: dict[str, list[tuple[int, float]]] = {}
    for line in Path(csv_path).read_text().splitlines()[1:]:
        stage, step, loss = line.split(",")[:3]
        rows.setdefault(stage, []).append((int(step), float(loss)))
    if not rows:
        raise ValueError(f"{csv_path} holds no loss rows; train a few hundred steps first")
    img = Image.new("RGB", (width, height * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    for k, (stage, points) in enumerate(rows.items()):
        top, left, right, bottom = k * height + 28, 60, width - 16, (k + 1) * height - 28
        steps = [s for s, _ in points]
        logs = [math.log10(max(v, 1e-8)) for _, v in points]
        lo, hi = math.floor(min(logs) * 4) / 4, math.ceil(max(logs) * 4) / 4 + 1e-9
        x = lambda s: left + (right - left) * (s - steps[0]) / max(1, steps[-1] - steps[0])  # noqa: E731
        y = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)  # noqa: E731
        draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
        for tick in np.arange(lo, hi, 0.25):
            draw.line((left, y(tick), right, y(tick)), fill=(225, 225, 225))
            draw.text((4, y(tick) - 6), f"{10 ** tick:.3g}", fill="black")
        draw.line([(x(s), y(v)) for s, v in zip(steps, logs)], fill=(40, 80, 220), width=2)
        draw.text((left, top - 20), f"{stage}: training loss (log scale) vs step, {steps[0]}..{steps[-1]}", fill="black")
        draw.text((right - 60, bottom + 6), f"step {steps[-1]}", fill="black")
    out = Path(png_path)
    tmp = out.with_name(out.name + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--stage", choices=("vae", "unet", "decoder"), default=None,
                        help="vae, then unet; decoder fine-tunes the autoencoder's decoder alone (keeps the latent space)")
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps of the stage (the run stops there; default: fitted so that the first chunk ends after --minutes)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0, help="stop and checkpoint after this long")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of this process (default: torch's, or with --workers the cores the workers leave)")
    parser.add_argument("--workers", type=int, default=0, help="processes that render batches ahead (0: render in the training loop)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: vae 1e-3, unet 3e-4, decoder 1e-4)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: min(vae 200 | unet 1000 | decoder 100, total/10))")
    parser.add_argument("--offset-noise", type=float, default=0.0, metavar="S",
                        help="add S * N(0,1) per sample and channel to the training noise (e.g. 0.1), so that "
                             "flat colours come from the caption, not from the starting noise's mean")
    parser.add_argument("--min-snr", type=float, default=0.0, metavar="GAMMA",
                        help="weight each sample's loss by min(SNR, GAMMA) / SNR (Min-SNR-gamma, e.g. 5; 0: off)")
    parser.add_argument("--grounding", type=float, default=0.0, metavar="W",
                        help="add W x a token grounding loss on the cross-attention maps (TokenCompose's L_token; "
                             "object and background words attend to their own pixels), e.g. 0.05; 0: off")
    parser.add_argument("--grounding-share", type=float, default=0.0, metavar="W",
                        help="add W x the pixel side of the grounding loss (each region's words hold its pixels' "
                             "attention, so that re-weighting and LocalBlend act there), e.g. 0.05; 0: off")
    parser.add_argument("--grounding-sides", default=None, metavar="SIDES",
                        help="comma-separated square sides of the cross-attention maps the grounding losses act on "
                             "(e.g. 8,4 for the shapes model's two coarsest levels; default: every layer)")
    parser.add_argument("--grounding-no-text", action="store_true",
                        help="keep the grounding losses' gradient out of the text encoder (it still learns from the "
                             "diffusion loss); the losses then train the UNet only (a second backward pass)")
    parser.add_argument("--grounding-share-words", action="store_true",
                        help="take --grounding-share's share among the caption's words only, so that the start token "
                             "and the padding keep their attention")
    parser.add_argument("--init", default=None, metavar="MODEL_DIR",
                        help="start a new run from an exported model (e.g. the shipped one) instead of random weights; "
                             "training accumulates across machines without carrying optimizer state")
    parser.add_argument("--export", default=None, metavar="DIR", help="write the EMA model as a diffusers folder")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw RUN_DIR/loss.csv (or RUN_DIR itself, if it is a CSV) and exit")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.workers > 0:  # the rendering workers busy their own cores: more threads here would oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.workers))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.plot:
        csv = Path(args.run_dir)
        print(plot_loss(csv if csv.suffix == ".csv" else csv / "loss.csv", args.plot))
        return
    for flag, value in (("--offset-noise", args.offset_noise), ("--min-snr", args.min_snr), ("--grounding", args.grounding),
                        ("--grounding-share", args.grounding_share)):
        if not value >= 0:  # also catches nan
            parser.exit(2, f"error: {flag} must be a number >= 0 (0: off), got {value}\n")
    if (args.grounding_sides is not None or args.grounding_no_text) and not (args.grounding > 0 or args.grounding_share > 0):
        parser.exit(2, "error: --grounding-sides and --grounding-no-text set how the grounding losses act; "
                       "add --grounding W and/or --grounding-share W\n")
    if args.grounding_share_words and not args.grounding_share > 0:
        parser.exit(2, "error: --grounding-share-words sets how --grounding-share's loss is taken; add --grounding-share W\n")
    sides = None
    if args.grounding_sides is not None:
        try:
            sides = tuple(int(v) for v in args.grounding_sides.split(","))
        except ValueError:
            sides = ()
        if not sides or min(sides) < 1:
            parser.exit(2, f"error: --grounding-sides takes positive integers separated by commas (e.g. 8,4), got {args.grounding_sides!r}\n")
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTokenizer

        from . import MODEL_DIR

        tok = CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"))  # the UNet's shapes do not depend on it
        try:  # before the run folder is made
            check_grounding_sides(UNet2DConditionModel(**model_configs(tok)["unet"]), tok.model_max_length, sides)
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
    try:
        run = Run(args.run_dir, args.device, init=args.init)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    run.command = shlex.join(["python", "-m", "prompt2prompt.shapes.train", *(sys.argv[1:] if argv is None else argv)])
    if args.stage == "vae":
        run.train_vae(args.steps, args.batch, args.minutes, workers=args.workers, lr=args.lr or 1e-3, warmup=args.warmup)
        print(f"vae step {run.state['vae_step']}")
    elif args.stage == "unet":
        run.train_unet(args.steps, args.batch, args.minutes, workers=args.workers, lr=args.lr or 3e-4, warmup=args.warmup,
                       offset_noise=args.offset_noise, min_snr_gamma=args.min_snr, grounding=args.grounding,
                       grounding_share=args.grounding_share, grounding_sides=sides, grounding_text=not args.grounding_no_text,
                       grounding_share_words=args.grounding_share_words)
        print(f"unet step {run.state['unet_step']}")
    elif args.stage == "decoder":
        run.train_decoder(args.steps, args.batch, args.minutes, workers=args.workers, lr=args.lr or 1e-4, warmup=args.warmup)
        print(f"decoder step {run.state['decoder_step']}")
    if args.export:
        print(run.export(args.export))


if __name__ == "__main__":
    main()
