#!/usr/bin/env python
"""Time and peak memory of a Prompt-to-Prompt edit versus plain diffusers generation.

The project claims that an edit costs at most 1.05x the time and 1.1x the peak memory of a plain
``StableDiffusionPipeline`` call that generates the same prompts. This script measures both sides
on the same components, prompts (source + one target), initial noise, scheduler (DDIM), number of
steps and guidance scale:

* plain: ``StableDiffusionPipeline(prompt=[source, target], latents=<noise repeated twice>)``
  (``StableDiffusionXLPipeline`` for the SDXL models ``sdxl-tiny`` and ``sdxl-shape``, whose edit
  side is ``Prompt2PromptXLPipeline``);
* edit:  ``Prompt2PromptPipeline(prompt=source, edit_prompts=[target], latents=<noise>, ...)`` in
  the variants ``replace`` (cross 0.8, self 0.4), ``replace_localblend`` (the same plus
  ``LocalBlend([source word], [target word])``) and ``none`` (same noise, no injection); all record
  attention maps (``return_attention=True``, the default). ``replace_noattn`` (``replace`` with
  ``return_attention=False``), ``refine`` (target ``--refine-target``, the source with a word added),
  ``reweight`` (target = source, ``equalizer={--reweight-word: 2}``) and ``three_targets`` (replace
  with three targets; its plain side generates four prompts) and ``attention`` (the source alone
  with its cross-attention maps recorded, as ``p2p attention``; plain generates one prompt) can be added with ``--variants``.

Two opt-in variants time re-editing from a kept source pass (issue 30) instead of plain generation:

* ``reedit``: the ``replace`` edit from a ``SourcePass`` made once beforehand (``pipe.source``, its
  budget the edit's windows) against the same full edit; only the target rows run.
* ``sweep6``: ``p2p sweep``'s six cross-attention windows (0, 0.2, ..., 1.0): one ``pipe.source``
  (budget: the widest window) and one call from it whose six targets each take one window
  (``cross_replace_steps`` as a list), against six full edits.

* ``first_edit``: what ``p2p edit`` and the web page do to keep a pass: the full call with
  ``keep_source=True`` (the source's pass kept while the one batch runs), against the same full
  call without it.

Their rows compare "full" (the ``plain`` columns) with "from pass" (the ``edit`` columns); the
passes' sizes (``SourcePass.nbytes``) and the largest pixel difference between an image made from
the pass and the full edit's are printed and written to the JSON.

Each variant gets a warm-up pair, then ``--repeats`` pairs; within a repeat every variant runs a
plain call and an edit call back to back, alternating which goes first, so that drift (thermal,
clocks, caches) hits both sides equally. Reported: the median seconds of each side and their ratio.

Memory:
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, per call: the
  absolute peak (weights included; this is what the claim is about) and the peak minus the memory
  allocated just before the call ("extra").
* CPU (Linux): the process's peak resident set size (``VmHWM``), reset before each call by writing
  5 to ``/proc/self/clear_refs`` (after ``gc.collect()`` and glibc ``malloc_trim``). It is process
  RSS, not tensor bytes: it includes the Python heap, libraries and allocator slack, so the absolute
  ratio is diluted by the baseline; the "extra" column (peak minus RSS before the call) is the part
  that the call itself adds. Off Linux, memory is not reported on CPU.

Examples::

    python benchmarks/speed.py --model tiny --steps 20 --repeats 5
    python benchmarks/speed.py --model small --steps 10 --repeats 3
    python benchmarks/speed.py --model sd15-shape --device cuda --json sd15.json
    python benchmarks/speed.py --model path:/models/stable-diffusion-v1-5 --device cuda
    python benchmarks/speed.py --model sdxl-tiny --steps 20 --repeats 7 --threads 1
    python benchmarks/speed.py --model sdxl-shape --device cuda --json sdxl.json   # 1024 px, float16
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ALL_VARIANTS = ("replace", "replace_localblend", "none", "replace_noattn", "refine", "reweight", "three_targets", "attention",
                "reedit", "sweep6", "first_edit")
#: Variants that time editing from a `SourcePass` against full edits (not against plain generation).
REEDIT_VARIANTS = ("reedit", "sweep6", "first_edit")
#: The cross-attention windows of ``sweep6`` (``p2p sweep``'s default values).
SWEEP_VALUES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
DEFAULT_VARIANTS = ("replace", "replace_localblend", "none")
XL_MODELS = ("sdxl-tiny", "sdxl-shape")
MODELS_HELP = "tiny, small, overhead, sd15-shape, sdxl-tiny, sdxl-shape or path:/folder"
GIB = 1024**3


# --------------------------------------------------------------------------- models


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tests_on_path():
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def _clip_tokenizer(tmp: str):
    """The real CLIP BPE tokenizer, built offline by the test suite's helper."""
    _tests_on_path()
    from conftest import build_clip_tokenizer_files
    from transformers import CLIPTokenizer

    folder = build_clip_tokenizer_files(Path(tmp) / "clip_tokenizer")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _clip_text(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, act: str = "quick_gelu", projection: int | None = None):
    """A random CLIP text encoder for ``tokenizer``; with ``projection``, a `CLIPTextModelWithProjection`
    (SDXL's second encoder, whose projected pooled embedding conditions the UNet)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _sd_unet(block_out_channels, cross_attention_dim: int, heads: int, sample_size: int):
    """A UNet with Stable Diffusion 1.x's block layout (3 cross-attention levels + 1 plain level)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,  # diffusers' historical name: SD 1.x's "attention_head_dim 8" is 8 heads
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
    )


def _sd_vae(block_out_channels, sample_size: int, scaling_factor: float = 0.18215):
    """A KL autoencoder with Stable Diffusion's block layout (SDXL's VAE has the same, scaling 0.13025)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def _sdxl_unet():
    """SDXL base 1.0's UNet config (2.57 B parameters): no attention at the top level, 1/2/10
    transformer layers per block, 2048-wide text states, "text_time" added conditions (six time ids
    embedded 256 wide + the 1280-wide pooled text embedding = 2816)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),  # diffusers' historical name: heads per level (64-wide heads)
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
    )


def _xl_tokenizers(tmp: str):
    """SDXL's two tokenizers: CLIP's BPE, the second padded with "!" (the test suite's helpers)."""
    _tests_on_path()
    from conftest import make_tokenizer_2

    tokenizer = _clip_tokenizer(tmp)
    return tokenizer, make_tokenizer_2(Path(tmp) / "clip_tokenizer_2", tokenizer.model_max_length)


def _xl_components(model: str, tmp: str, device: str) -> dict:
    """SDXL components (two encoders and tokenizers) for ``sdxl-tiny`` or ``sdxl-shape``, float32."""
    tokenizer, tokenizer_2 = _xl_tokenizers(tmp)
    if model == "sdxl-tiny":
        _tests_on_path()
        from conftest import make_tiny_xl

        return make_tiny_xl(tokenizer, tokenizer_2)
    torch.manual_seed(0)
    with torch.device(device):
        modules = sdxl_shape_modules(tokenizer, tokenizer_2)
    for module in modules.values():
        module.eval()
    return dict(**modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=_ddim())


def sdxl_shape_modules(tokenizer, tokenizer_2) -> dict:
    """SDXL base 1.0's exact architecture with random weights, on the current default device:
    ``unet`` (2,567,463,684 parameters), ``vae`` (83,653,863), ``text_encoder`` (CLIP ViT-L: 768
    wide, 12 layers; 123,060,480) and ``text_encoder_2`` (OpenCLIP ViT-bigG: 1280 wide, 32 layers,
    GELU, projection 1280; 694,659,840)."""
    return dict(
        unet=_sdxl_unet(),
        vae=_sd_vae((128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025),
        text_encoder=_clip_text(tokenizer, hidden=768, layers=12, heads=12, intermediate=3072),
        text_encoder_2=_clip_text(tokenizer_2, hidden=1280, layers=32, heads=20, intermediate=5120, act="gelu", projection=1280),
    )


def _folder_components(folder: str) -> dict:
    """The components of a diffusers Stable Diffusion or SDXL folder (safetensors; SDXL when it has a
    ``text_encoder_2``), with DDIM from its scheduler config."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    components = dict(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True),
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )
    if (Path(folder) / "text_encoder_2").is_dir():
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", use_safetensors=True)
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    return components


def build_components(model: str, tmp: str, device: str) -> dict:
    """Components (vae, text_encoder, tokenizer, unet, scheduler; SDXL models also text_encoder_2
    and tokenizer_2) in float32 on ``device``."""
    if model in XL_MODELS:
        return _xl_components(model, tmp, device)
    if model == "tiny":
        _tests_on_path()
        from conftest import make_tiny_components

        return make_tiny_components(_clip_tokenizer(tmp), "sd1")
    if model.startswith("path:"):
        return _folder_components(model[len("path:") :])
    tokenizer = _clip_tokenizer(tmp)
    torch.manual_seed(0)
    # Initialise on the target device (much faster for SD 1.5's 860M-parameter UNet on a GPU).
    with torch.device(device):
        if model == "small":
            # SD-1.5-shaped but narrow: same blocks, levels and 8 heads; 256 px images (latent 32).
            unet = _sd_unet((64, 128, 256, 256), cross_attention_dim=256, heads=8, sample_size=32)
            vae = _sd_vae((32, 64, 128, 128), sample_size=256)
            text_encoder = _clip_text(tokenizer, hidden=256, layers=4, heads=4, intermediate=1024)
        elif model == "overhead":
            # SD-1.5's block layout (levels, 2 layers per block, 8 heads) at almost no width: 32
            # channels, latent 16 (128 px; the deepest level is 2x2, so a group norm of one image still
            # has 4 values). The arithmetic is negligible, so a call's time is its Python and
            # operator-dispatch work: what bounds an SD 1.5 call on a fast GPU (issue 7's profile).
            unet = _sd_unet((32, 32, 32, 32), cross_attention_dim=32, heads=8, sample_size=16)
            vae = _sd_vae((32, 32, 32, 32), sample_size=128)
            text_encoder = _clip_text(tokenizer, hidden=32, layers=1, heads=4, intermediate=64)
        elif model == "sd15-shape":
            # Stable Diffusion 1.5's exact architecture, random weights.
            unet = _sd_unet((320, 640, 1280, 1280), cross_attention_dim=768, heads=8, sample_size=64)
            vae = _sd_vae((128, 256, 512, 512), sample_size=512)
            text_encoder = _clip_text(tokenizer, hidden=768, layers=12, heads=12, intermediate=3072)
        else:
            raise SystemExit(f"unknown --model {model!r}: use {MODELS_HELP}")
    for module in (unet, vae, text_encoder):
        module.eval()
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_ddim())


def _pipelines_of(components: dict):
    """``(plain pipeline, Prompt2Prompt pipeline)`` of ``components``' family: diffusers'
    `StableDiffusionXLPipeline` (no watermark) and `Prompt2PromptXLPipeline` for SDXL, else
    `StableDiffusionPipeline` (no safety checker) and `Prompt2PromptPipeline`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from prompt2prompt import Prompt2PromptPipeline, Prompt2PromptXLPipeline

    if "text_encoder_2" in components:
        return StableDiffusionXLPipeline(**components, add_watermarker=False), Prompt2PromptXLPipeline(**components)
    plain = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return plain, Prompt2PromptPipeline(**components)


def build_pipelines(model: str, device, dtype):
    """``(components, plain diffusers pipeline, Prompt2Prompt pipeline)`` on the same weights,
    moved to ``device``/``dtype``, progress bars off (SD or SDXL by the model, `_pipelines_of`)."""
    with tempfile.TemporaryDirectory() as tmp:
        components = build_components(model, tmp, str(device))
    for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
        if name in components:
            components[name].to(device=device, dtype=dtype)
    plain, p2p = _pipelines_of(components)
    for pipe in (plain, p2p):
        pipe.set_progress_bar_config(disable=True)
    return components, plain, p2p


# --------------------------------------------------------------------------- memory probes


class CudaPeak:
    name = "CUDA max_memory_allocated"

    def __init__(self, device):
        self.device = device

    def start(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self):
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return peak, peak - self.base


class RssPeak:
    """Linux peak RSS of this process (VmHWM), reset before each call through /proc/self/clear_refs."""

    name = "process peak RSS (VmHWM reset via /proc/self/clear_refs)"

    def __init__(self):
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.malloc_trim(0)
        except (OSError, AttributeError):
            self._libc = None

    @staticmethod
    def available() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return RssPeak._read("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _read(field: str):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def start(self):
        if self._libc is not None:
            self._libc.malloc_trim(0)
        self.base = self._read("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS

    def stop(self):
        peak = self._read("VmHWM")
        return peak, peak - self.base


# --------------------------------------------------------------------------- benchmark


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, probe):
    """``(wall seconds, peak, extra, process CPU seconds)`` of one call of ``fn``. The CPU time
    counts only what this process ran, so with ``--threads 1`` on a shared machine it leaves out
    the time the process waited for a core (wall time does not)."""
    gc.collect()
    if probe is not None:
        probe.start()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak, extra = probe.stop() if probe is not None else (None, None)
    return seconds, peak, extra, cpu_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | small | overhead | sd15-shape | sdxl-tiny | sdxl-shape | path:/diffusers/sd/or/sdxl/folder (default tiny)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None, help="default float16 on CUDA, float32 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: tiny and sdxl-tiny 20, small 10, others 50)")
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed pairs per variant first (default 1)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's, 512 for sd15-shape, 1024 for sdxl-shape)")
    parser.add_argument("--output-type", choices=("pil", "np", "latent"), default="pil", help="both sides alike (default pil = full VAE decode)")
    parser.add_argument("--source", default="a cat riding a bicycle")
    parser.add_argument("--target", default="a cat riding a car")
    parser.add_argument("--refine-target", default="a cat riding a red bicycle")
    parser.add_argument("--reweight-word", default="bicycle")
    parser.add_argument("--extra-targets", nargs=2, default=("a cat riding a horse", "a cat riding a boat"))
    parser.add_argument("--blend-words", nargs=2, default=("bicycle", "car"), metavar=("SOURCE_WORD", "TARGET_WORD"))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(ALL_VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="OUT.json", help="also write the results here")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in ALL_VARIANTS:
            parser.error(f"unknown variant {v!r}; use {', '.join(ALL_VARIANTS)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    steps = args.steps or {"tiny": 20, "sdxl-tiny": 20, "small": 10}.get(args.model, 50)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if device.type == "cpu" and load is not None and load >= 0.5:
        print(
            f"warning: 1-minute load average is {load:.2f} before the run: other processes share the CPU, so timings "
            f"are noisy" + (f" and torch's {torch.get_num_threads()} threads may be oversubscribed (try --threads 1)" if torch.get_num_threads() > 1 else ""),
            file=sys.stderr,
        )

    import diffusers
    from diffusers.utils import logging as dlogging

    import prompt2prompt
    from prompt2prompt import LocalBlend

    dlogging.set_verbosity_error()
    warnings.filterwarnings("ignore")  # random fp16 weights overflow; casting NaN images warns

    components, plain, p2p = build_pipelines(args.model, device, dtype)

    size = args.size or p2p._default_size()
    factor = p2p.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(args.seed)
    noise = torch.randn((1, components["unet"].config.in_channels, size // factor, size // factor), generator=generator)
    noise = noise.to(device=device, dtype=dtype)  # (1, C, h, w)
    common = dict(num_inference_steps=steps, guidance_scale=args.guidance, height=size, width=size, output_type=args.output_type)

    def prompts_of(variant):
        if variant == "refine":
            return [args.source, args.refine_target]
        if variant == "reweight":
            return [args.source, args.source]
        if variant == "three_targets":
            return [args.source, args.target, *args.extra_targets]
        if variant == "attention":
            return [args.source]
        return [args.source, args.target]

    def plain_fn(variant):
        if variant in REEDIT_VARIANTS:
            return reedit_fns(variant)[0]
        prompts = prompts_of(variant)
        return lambda: plain(prompt=prompts, latents=noise.expand(len(prompts), -1, -1, -1).clone(), **common)

    sizing = dict(num_inference_steps=steps, guidance_scale=args.guidance, height=size, width=size)
    replace = dict(edit="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    passes = {}

    def source_pass(name, cross_budget):
        """The `SourcePass` of the source prompt from the benchmark's noise (made once, untimed for ``reedit``)."""
        return p2p.source(args.source, latents=noise.clone(), cross_replace_steps=cross_budget, self_replace_steps=0.4, **sizing)

    def full_edit(cross, output_type=args.output_type, **keep):
        return p2p(prompt=args.source, edit_prompts=[args.target], latents=noise.clone(),
                   **{**replace, "cross_replace_steps": cross}, **{**common, "output_type": output_type}, **keep)

    def from_pass(src, cross, output_type=args.output_type):
        return p2p(prompt=args.source, edit_prompts=[args.target], source=src,
                   **{**replace, "cross_replace_steps": cross}, **{**common, "output_type": output_type})

    def sweep_batch(src, output_type=args.output_type):
        """``p2p sweep``'s edit: every value of `SWEEP_VALUES` a target of one call from ``src``, each
        with its own cross-attention window (``cross_replace_steps`` as a list, one per target)."""
        return p2p(prompt=args.source, edit_prompts=[args.target] * len(SWEEP_VALUES), source=src,
                   **{**replace, "cross_replace_steps": list(SWEEP_VALUES)}, **{**common, "output_type": output_type})

    def reedit_fns(variant):
        """(full side, from-pass side) of a re-edit variant."""
        if variant == "first_edit":
            return (lambda: full_edit(0.8)), (lambda: full_edit(0.8, keep_source=True))
        if variant == "reedit":
            if "reedit" not in passes:
                passes["reedit"] = source_pass("reedit", 0.8)
            return (lambda: full_edit(0.8)), (lambda: from_pass(passes["reedit"], 0.8))

        def sweep_full():
            for value in SWEEP_VALUES:
                full_edit(value)

        def sweep_from_pass():
            src = source_pass("sweep6", max(SWEEP_VALUES))
            passes["sweep6"] = src
            sweep_batch(src)

        return sweep_full, sweep_from_pass

    def edit_fn(variant):
        if variant in REEDIT_VARIANTS:
            return reedit_fns(variant)[1]
        kwargs = dict(edit="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
        if variant == "replace_localblend":
            kwargs["local_blend"] = LocalBlend([args.blend_words[0]], [args.blend_words[1]])
        elif variant == "none":
            kwargs = dict(edit="none")
        elif variant == "replace_noattn":
            kwargs["return_attention"] = False
        elif variant == "refine":
            kwargs["edit"] = "refine"
        elif variant == "reweight":
            kwargs["equalizer"] = {args.reweight_word: 2.0}
        prompts = prompts_of(variant)
        if variant == "attention":
            return lambda: p2p(prompt=prompts[0], return_attention=True, latents=noise.clone(), **common)
        return lambda: p2p(prompt=prompts[0], edit_prompts=prompts[1:], latents=noise.clone(), **kwargs, **common)

    if device.type == "cuda":
        probe = CudaPeak(device)
    elif RssPeak.available():
        probe = RssPeak()
    else:
        probe = None
    memory_what = probe.name if probe is not None else "not measured (CUDA, or Linux /proc for CPU RSS)"

    results = {}
    reedit = {}
    with torch.inference_mode():
        if any(v in REEDIT_VARIANTS for v in variants):  # the images from a pass equal the full edit's
            check = source_pass("check", max(SWEEP_VALUES))
            diffs = []
            for value in (0.8, 0.4):
                full = full_edit(value, "np").images
                kept = from_pass(check, value, "np").images
                diffs.append(float(abs(full - kept).max()))
            reedit["max_pixel_diff_vs_full"] = max(diffs)
            reedit["checked_cross_windows"] = [0.8, 0.4]
            if "sweep6" in variants:  # each target of the sweep's batch against its own full edit
                batch = sweep_batch(check, "np").images
                reedit["sweep6_max_pixel_diff_vs_full"] = max(
                    float(abs(full_edit(value, "np").images[1] - batch[1 + k]).max()) for k, value in enumerate(SWEEP_VALUES))
            del check
        if "first_edit" in variants:  # keeping the pass leaves the full call's images as they are
            kept = full_edit(0.8, "np", keep_source=True)
            reedit["first_edit_max_pixel_diff_vs_full"] = float(abs(full_edit(0.8, "np").images - kept.images).max())
            reedit["first_edit_source_pass_bytes"] = int(kept.source_pass.nbytes)
            del kept
        for variant in variants:
            fn, run_plain = edit_fn(variant), plain_fn(variant)
            for _ in range(args.warmup):
                run_plain()
                fn()
            results[variant] = {"plain": [], "edit": []}
        for r in range(args.repeats):
            for variant in variants:
                order = (("plain", plain_fn(variant)), ("edit", edit_fn(variant)))
                for side, call in order if (r % 2 == 0) else order[::-1]:
                    results[variant][side].append(timed(call, device, probe))

    rows = []
    for variant in variants:
        row = {"variant": variant}
        for side in ("plain", "edit"):
            runs = results[variant][side]
            row[f"{side}_s"] = statistics.median(s for s, _, _, _ in runs)
            row[f"{side}_runs_s"] = [s for s, _, _, _ in runs]
            row[f"{side}_cpu_s"] = statistics.median(c for _, _, _, c in runs)
            row[f"{side}_runs_cpu_s"] = [c for _, _, _, c in runs]
            if probe is not None:
                row[f"{side}_peak_bytes"] = statistics.median(p for _, p, _, _ in runs)
                row[f"{side}_extra_bytes"] = statistics.median(e for _, _, e, _ in runs)
        for side in ("plain", "edit"):
            times = sorted(row[f"{side}_runs_s"])
            row[f"{side}_spread_s"] = [times[0], times[-1]]  # min, max of the timed runs
        row["time_ratio"] = row["edit_s"] / row["plain_s"]
        row["pair_ratios"] = [e[0] / p[0] for p, e in zip(results[variant]["plain"], results[variant]["edit"])]
        row["cpu_ratio"] = row["edit_cpu_s"] / row["plain_cpu_s"]  # process CPU time (see `timed`)
        row["pair_cpu_ratios"] = [e[3] / p[3] for p, e in zip(results[variant]["plain"], results[variant]["edit"])]
        if probe is not None:
            row["peak_ratio"] = row["edit_peak_bytes"] / row["plain_peak_bytes"]
            row["extra_ratio"] = row["edit_extra_bytes"] / row["plain_extra_bytes"] if row["plain_extra_bytes"] > 0 else None
        rows.append(row)

    for name, src in passes.items():
        reedit[f"{name}_source_pass_bytes"] = int(src.nbytes)
    command = " ".join(shlex.quote(a) for a in ["python", *([sys.argv[0]] if argv is None else ["speed.py"]), *(sys.argv[1:] if argv is None else argv)])
    unet = components["unet"]
    meta = {
        "command": command,
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_before": load,
        "dtype": dtype_name,
        "steps": steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "guidance_scale": args.guidance,
        "image_size": size,
        "latent_size": size // factor,
        "output_type": args.output_type,
        "source": args.source,
        "target": args.target,
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "memory": memory_what,
        "reedit": reedit or None,
        "sweep_values": list(SWEEP_VALUES) if "sweep6" in variants else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "prompt2prompt": prompt2prompt.__version__,
            "cuda": torch.version.cuda,
        },
    }

    print(f"command : {command}")
    print(
        f"model   : {args.model} (UNet {meta['unet_params_m']} M params), {size}x{size} px, latent {size // factor}, "
        f"{steps} DDIM steps, guidance {args.guidance}, output_type={args.output_type}"
    )
    print(f"device  : {device} ({meta['device_name']}), threads {meta['cpu_threads']}, dtype {dtype_name}")
    v = meta["versions"]
    print(f"versions: torch {v['torch']}, diffusers {v['diffusers']}, prompt2prompt {v['prompt2prompt']}, python {v['python']}")
    print(f"timing  : median of {args.repeats} interleaved pairs after {args.warmup} warm-up pair(s) per variant"
          + ("; wall seconds and this process's CPU seconds" if device.type == "cpu" else ""))
    print(f"memory  : {memory_what}")
    header = f"{'variant':<20}{'plain s':>10}{'edit s':>10}{'ratio':>8}{'spread plain / edit (min-max s)':>34}"
    show_cpu = device.type == "cpu"  # process CPU time: what a shared machine's wall time hides (see `timed`)
    if show_cpu:
        header += f"{'cpu s plain':>13}{'edit':>8}{'ratio':>8}"
    if probe is not None:
        header += f"{'peak GiB plain':>16}{'edit':>8}{'ratio':>8}{'extra GiB plain':>17}{'edit':>8}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["variant"] in REEDIT_VARIANTS:
            row["baseline"] = "six full edits" if row["variant"] == "sweep6" else "the full edit (one call)"
            row["sides"] = {"plain": "full", "edit": "full, keep_source=True" if row["variant"] == "first_edit" else "from the source pass"}
    print(f"{'':<20}(reedit, sweep6: 'plain' = the full edit(s), 'edit' = through a SourcePass; first_edit: 'edit' = the full edit "
          "keeping its pass)" if reedit else "", end="\n" if reedit else "")
    for row in rows:
        line = f"{row['variant']:<20}{row['plain_s']:>10.3f}{row['edit_s']:>10.3f}{row['time_ratio']:>8.3f}"
        spread = "{:.3f}-{:.3f} / {:.3f}-{:.3f}".format(*row["plain_spread_s"], *row["edit_spread_s"])
        line += f"{spread:>34}"
        if show_cpu:
            line += f"{row['plain_cpu_s']:>13.3f}{row['edit_cpu_s']:>8.3f}{row['cpu_ratio']:>8.3f}"
        if probe is not None:
            extra_ratio = f"{row['extra_ratio']:.3f}" if row["extra_ratio"] is not None else "n/a"
            line += (
                f"{row['plain_peak_bytes'] / GIB:>16.3f}{row['edit_peak_bytes'] / GIB:>8.3f}{row['peak_ratio']:>8.3f}"
                f"{row['plain_extra_bytes'] / GIB:>17.3f}{row['edit_extra_bytes'] / GIB:>8.3f}{extra_ratio:>8}"
            )
        print(line)

    for name in ("reedit", "sweep6", "first_edit"):
        if f"{name}_source_pass_bytes" in reedit:
            print(f"SourcePass ({name}): {reedit[f'{name}_source_pass_bytes'] / 2**20:.2f} MiB")
    if "max_pixel_diff_vs_full" in reedit:
        print(f"from the pass vs full edit: largest pixel difference {reedit['max_pixel_diff_vs_full']:.3g} (images in [0, 1])")
    if "first_edit_max_pixel_diff_vs_full" in reedit:
        print(f"full edit keeping its pass vs without: largest pixel difference {reedit['first_edit_max_pixel_diff_vs_full']:.3g}")
    if "sweep6_max_pixel_diff_vs_full" in reedit:
        print(f"sweep6's batch vs six full edits: largest pixel difference {reedit['sweep6_max_pixel_diff_vs_full']:.3g} (images in [0, 1])")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"meta": meta, "results": rows}, f, indent=2)
            os.replace(tmp_path, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            raise
        print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
