"""Learning curves for the bundled model's redesign (issue 27): short CPU runs of candidate designs,
scored by the project's evaluation at fixed steps, on fixed prompts and seeds.

Every candidate trains a UNet and a text encoder from scratch on the frozen shipped autoencoder's
latents, over a *narrow world*: one object of a training colour/shape pair on a plain background,
caption template 0 ("a [big|small] red circle on a blue background"), no pattern, no style. The
scenes are rendered and encoded once into a cache shared by all candidates (scene k is drawn from
seed k), so the candidates see the same data in the same order and differ only in what the
candidate names. At each ``--eval-every`` steps the EMA weights are scored with
`prompt2prompt.shapes.evaluate.evaluate_model` (adherence on training and held-out pairs, word swaps)
at the CLI's guidance, and the figures go to ``RUN_DIR/curve.json`` and to the results JSON.

A run checkpoints at every evaluation (safetensors, no pickle) and the same command resumes it, so a
long curve can be spread over several chunks of at most 150 minutes.

    python benchmarks/shapes_learning_curve.py runs/curves --candidate small_b32 --steps 3000 --eval-every 500
    python benchmarks/shapes_learning_curve.py runs/curves --stage autoencoder --steps 8000 --eval-every 250
    python benchmarks/shapes_learning_curve.py runs/curves --stage decoder --steps 6000 --eval-every 250
    python benchmarks/shapes_learning_curve.py runs/curves --candidate lean_f2_b32 --steps 3000
    python benchmarks/shapes_learning_curve.py runs/curves --list
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from prompt2prompt.shapes import MODEL_DIR, world
from prompt2prompt.shapes.checkpoints import load_optimizer, optimizer_tensors
from prompt2prompt.shapes.objective import SCHEDULE, lr_at, training_noise, training_target

RESULTS = Path(__file__).with_name("results_shapes_learning_curves.json")  # every candidate's curve, by name
CACHE_SCENES = 40_000  # rendered and encoded once; at batch 32 that is 1,250 steps an epoch
EVAL_PARTS = ("adherence_train", "adherence", "swap")
CAPTION_DROPOUT = 0.1  # share of empty captions, for classifier-free guidance (as the shipped model)

SMALL_UNET = dict(block_out_channels=(32, 64, 128), attention_head_dim=4)  # cross-attention maps at 16, 8, 4
LEAN_UNET = dict(  # no attention at the latent's full side: cross-attention maps at 8 and 4 only
    block_out_channels=(32, 64, 128), attention_head_dim=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SMALL_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)

#: name -> what differs from the base recipe (shipped UNet and text encoder shapes, batch 32, lr 5e-4,
#: uniform timesteps, EMA 0.999, 100 warm-up steps, constant rate after it).
CANDIDATES: dict[str, dict] = {
    "shipped_arch_b32": {},
    "small_b32": dict(unet=SMALL_UNET),
    "small_b32_logitnormal": dict(unet=SMALL_UNET, timesteps=("logit_normal", 0.5, 1.0)),
    "small_b16": dict(unet=SMALL_UNET, batch=16),
    "small_b32_smalltext": dict(unet=SMALL_UNET, text=SMALL_TEXT),
    "lean_b32": dict(unet=LEAN_UNET),
    "lean_b32_logitnormal": dict(unet=LEAN_UNET, timesteps=("logit_normal", 0.5, 1.0)),
    # the same UNet on the latents of a factor-2 autoencoder (32x32x4; `--stage autoencoder` trains it):
    # maps at 16 and 8, as the pixel-space model of shared/notes/cpu-training.md
    "lean_f2_b32": dict(unet=LEAN_UNET, autoencoder="f2"),
    "lean_f2_b32_logitnormal": dict(unet=LEAN_UNET, autoencoder="f2", timesteps=("logit_normal", 0.5, 1.0)),
    "lean_f2_b16_lr1e3": dict(unet=LEAN_UNET, autoencoder="f2", batch=16, lr=1e-3),  # twice the steps a sample, twice the rate
    # lean_f2_b32's run from its last checkpoint, on a world with the pattern words and styles refinement needs
    "lean_f2_b32_refine": dict(unet=LEAN_UNET, autoencoder="f2", world="refine", init="lean_f2_b32"),
    # lean_f2_b32's run from its last checkpoint with offset noise 0.1: its objects are mostly right by
    # step 4,500 but its plain backgrounds drift toward gray, a latent mean SD's schedule never fully noises
    "lean_f2_b32_offset": dict(unet=LEAN_UNET, autoencoder="f2", init="lean_f2_b32", offset_noise=0.1),
    # lean_f2_b32's run from its last checkpoint, retrained to v-prediction on a zero-terminal-SNR schedule
    # (Lin et al., 2024): at the first sampling step the model sees pure noise and must take the
    # background from the text, where offset noise 0.1 left it following the noise's mean
    "lean_f2_b32_zsnr": dict(unet=LEAN_UNET, autoencoder="f2", init="lean_f2_b32", schedule="zero_snr_v"),
    # lean_f2_b32_zsnr's run from its last checkpoint on the refine world (pattern words and styles)
    "lean_f2_b32_zsnr_refine": dict(unet=LEAN_UNET, autoencoder="f2", world="refine", init="lean_f2_b32_zsnr",
                                    schedule="zero_snr_v"),
    # and that run's from its last checkpoint in the latents of the autoencoder the encoder stage
    # widened to the whole world (narrow-world latents anchored to the old ones)
    "lean_f2_b32_zsnr_wide_refine": dict(unet=LEAN_UNET, autoencoder="f2_wide", world="refine",
                                         init="lean_f2_b32_zsnr_refine", schedule="zero_snr_v"),
}
BASE = dict(unet={}, text={}, batch=32, lr=5e-4, warmup=100, timesteps=("uniform",), ema=0.999, autoencoder="shipped",
            world="narrow", init=None, offset_noise=0.0, schedule="sd")

#: schedule name -> (noise-schedule settings for training, the shipped DDIM scheduler's overrides for
#: sampling). "sd": Stable Diffusion's (epsilon; sqrt(alpha_bar) is 0.068 at t = 999, so a latent's mean
#: is never fully noised); "zero_snr_v": its betas rescaled to zero terminal SNR, v-prediction, and
#: trailing timesteps so sampling starts at t = 999 (Lin et al., 2024, sec. 3.1-3.3).
SCHEDULES: dict[str, tuple[dict, dict]] = {
    "sd": ({}, {}),
    "zero_snr_v": (dict(rescale_betas_zero_snr=True),
                   dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
}


def sampling_scheduler(recipe: dict):
    """The DDIM scheduler a candidate samples with: the shipped one, with its schedule's overrides."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(MODEL_DIR / "scheduler", **SCHEDULES[recipe["schedule"]][1])

#: A factor-2 autoencoder (64x64x3 -> 32x32x4): two encoder blocks, one downsampling.
F2_AUTOENCODER = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      block_out_channels=(32, 64), norm_num_groups=32,
                      mid_block_add_attention=False)  # attention over 32x32 = 1,024 positions cost 1.4x a step
AE_KL_WEIGHT = 1e-6  # as the shipped autoencoder: the latent stays close to a plain autoencoder's
AE_TEST_SCENES = 256  # held apart from the training stream: scenes 10,000,000.. of the narrow world


def train_pairs() -> list[tuple[str, str]]:
    """The colour/shape pairs of the training split (every pair not held out)."""
    return [(c, s) for c in world.COLOUR_NAMES for s in world.SHAPES if (c, s) not in world.HELDOUT_PAIRS]


def narrow_spec(k: int, pattern_share: float = 0.0, style_share: float = 0.0) -> world.SceneSpec:
    """Scene ``k`` of the narrow world: one object of a training pair on a plain background. With
    ``pattern_share`` / ``style_share`` > 0, scene ``k`` keeps the same object, size and background
    and, drawn from a stream of its own, adds a pattern word (any of the world's, where the pattern
    shows: `world.pattern_visible`) or a style (any of the world's) to that share of scenes."""
    rng = np.random.default_rng([k, 27])
    pairs = train_pairs()
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    size = ("big", "small")[int(rng.integers(2))]
    backgrounds = [c for c in world.COLOUR_NAMES if c != colour]
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    say = bool(rng.random() < 0.5)
    extra = np.random.default_rng([k, 28])
    pattern = world.PATTERNS[int(extra.integers(len(world.PATTERNS)))] if extra.random() < pattern_share else None
    style = world.STYLES[int(extra.integers(len(world.STYLES)))] if extra.random() < style_share else None
    obj = dict(shape=shape, colour=colour, size=size, say_size=say)
    spec = world.make_spec([dict(obj, pattern=pattern)], bg, style=style, seed=k, template=0)
    if pattern is not None and not world.pattern_visible(colour, spec.background):
        spec = world.make_spec([obj], bg, style=style, seed=k, template=0)  # no caption names a hidden pattern
    return spec


#: world name -> (description, share of scenes with a pattern word, share with a style, evaluation parts)
WORLDS: dict[str, tuple[str, float, float, tuple[str, ...]]] = {
    "narrow": ("narrow: one object, training pairs, plain background, template 0", 0.0, 0.0, EVAL_PARTS),
    # what refinement needs besides: a pattern word (30% of scenes) and a style (20%), all of the world's
    "refine": ("narrow plus refinement: one object, training pairs, plain background, template 0; a pattern word "
               "in 30% of scenes, a style in 20%", 0.3, 0.2, EVAL_PARTS + ("refine",)),
}


def world_spec(name: str, k: int) -> world.SceneSpec:
    """Scene ``k`` of the curve world ``name`` (a key of `WORLDS`)."""
    _, patterns, styles, _ = WORLDS[name]
    return narrow_spec(k, patterns, styles)


def sample_timesteps(kind: tuple, n: int, num_train: int, gen: torch.Generator) -> torch.Tensor:
    """Training timesteps ``(n,)``: uniform, or logit-normal (Esser et al., 2024, eq. 19: ``t = sigmoid(m + s * N(0, 1))``),
    whose mean ``m`` > 0 puts more of the steps at high noise, where layout, shape and colour are decided."""
    if kind[0] == "uniform":
        return torch.randint(0, num_train, (n,), generator=gen)
    _, m, s = kind
    u = torch.sigmoid(m + s * torch.randn(n, generator=gen))  # (n,) in (0, 1)
    return (u * num_train).long().clamp(0, num_train - 1)


def build_cache(path: Path, vae, tokenizer, n: int = CACHE_SCENES, batch: int = 250, world_name: str = "narrow") -> dict[str, torch.Tensor]:
    """Render scenes ``0..n-1`` of the curve world ``world_name``, encode them with the frozen ``vae`` (latent means
    times its scaling factor) and tokenize their captions; saved as safetensors at ``path``."""
    if path.exists():
        return load_file(str(path))
    length = tokenizer.model_max_length
    latents, ids = [], []
    t0 = time.time()
    for start in range(0, n, batch):
        specs = [world_spec(world_name, k) for k in range(start, min(n, start + batch))]
        images = np.stack([world.render(s).image for s in specs])  # (b, H, W, 3) uint8
        x = to_tensor(images)  # (b, 3, H, W) in [-1, 1]
        with torch.no_grad():
            latents.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)  # (b, C, h, w)
        ids.append(tokenizer([s.caption for s in specs], padding="max_length", max_length=length,
                             truncation=True, return_tensors="pt").input_ids)  # (b, length)
        print(f"cache: {start + len(specs)}/{n} scenes, {time.time() - t0:.0f} s", flush=True)
    cache = {"latents": torch.cat(latents).contiguous(), "ids": torch.cat(ids).to(torch.int32).contiguous()}
    tmp = path.with_suffix(".tmp")
    save_file(cache, str(tmp))
    os.replace(tmp, path)
    return cache


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(b, H, W, 3)`` -> float ``(b, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (b, 3, H, W)


def round_trip_psnr(vae, first: int = 10_000_000, n: int = AE_TEST_SCENES) -> float:
    """Mean PSNR (dB, 8-bit) of narrow-world scenes ``first..first+n-1`` through ``vae``'s latent means
    and back: what the autoencoder alone keeps of a flat-colour picture."""
    return round_trip_psnr_of(vae, np.stack([world.render(narrow_spec(k)).image for k in range(first, first + n)]))


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + MSE between a round trip and its input (both ``(batch, 3, H, W)`` in [-1, 1])."""
    return (rec - x).abs().mean() + (rec - x).pow(2).mean()


AE_BATCH = 8  # a step at batch 32 took 2.4 s on one thread: small steps, many of them

def train_autoencoder(folder: Path, steps: int, batch: int = AE_BATCH, lr: float = 1e-3, check_every: int = 100,
                      test_scenes: int = AE_TEST_SCENES) -> None:
    """Train the factor-2 autoencoder on narrow-world scenes (scene k of the stream from seed k; L1 +
    MSE reconstruction and a small KL term); a rerun resumes from the last saved weights with a fresh
    optimizer. At each ``check_every`` steps save it as a
    diffusers folder (with its scaling factor, 1 / the latents' std) and log its round-trip PSNR."""
    from diffusers import AutoencoderKL

    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "autoencoder_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {"config": F2_AUTOENCODER, "points": []}
    vae = AutoencoderKL.from_pretrained(folder / "vae") if (folder / "vae").exists() else AutoencoderKL(**F2_AUTOENCODER)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step = log["points"][-1]["step"] if log["points"] else 0
    while step < steps:
        images = np.stack([world.render(narrow_spec(k)).image for k in range(step * batch, (step + 1) * batch)])
        x = to_tensor(images)  # (batch, 3, H, W)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(step))).sample  # (batch, 3, H, W)
        loss = reconstruction_loss(rec, x) + AE_KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % check_every == 0 or step == steps:
            vae.eval()
            with torch.no_grad():
                z = vae.encode(to_tensor(images)).latent_dist.mean  # (batch, C, h, w)
            vae.register_to_config(scaling_factor=float(1.0 / z.std()))
            point = {"step": step, "samples": step * batch, "loss": loss.item(),
                     "round_trip_db": round_trip_psnr(vae, n=test_scenes)}
            vae.save_pretrained(folder / "vae")  # safetensors
            log["points"].append(point)
            log_path.write_text(json.dumps(log, indent=1))
            print(json.dumps(point), flush=True)
            vae.train()


def drawn_pictures(first: int, n: int, side: int) -> np.ndarray:
    """``n`` flat-colour pictures drawn with PIL, not by the shapes world: any RGB background, one to
    three ellipses, rectangles or polygons of any RGB colour, size and place, no antialiasing.
    Picture k comes from seed k, so ``first..first+n-1`` is a fixed set: ``(n, side, side, 3)`` uint8.
    They stand for the "pictures drawn outside the project" whose round trip issue 27 asks to raise."""
    from PIL import Image, ImageDraw

    out = np.empty((n, side, side, 3), np.uint8)
    for i, k in enumerate(range(first, first + n)):
        rng = np.random.default_rng(k)
        img = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0, y0 = rng.uniform(-0.1, 0.8, 2) * side
            w, h = rng.uniform(0.1, 0.6, 2) * side
            kind = int(rng.integers(0, 3))
            if kind == 0:
                draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
            elif kind == 1:
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
            else:
                points = rng.uniform(0, 1, (int(rng.integers(3, 7)), 2)) * (w, h) + (x0, y0)  # (corners, 2)
                draw.polygon([tuple(p) for p in points], fill=colour)
        out[i] = np.asarray(img)
    return out


def round_trip_psnr_of(vae, images: np.ndarray) -> float:
    """Mean PSNR (dB, 8-bit) of ``images`` (``(n, H, W, 3)`` uint8) through ``vae``'s latent means and back."""
    from prompt2prompt.shapes.metrics import psnr

    with torch.no_grad():
        rec = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample  # (n, 3, H, W)
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)  # (n, H, W, 3)
    everywhere = np.ones(images.shape[1:3], bool)
    return float(np.mean([psnr(a, b, everywhere) for a, b in zip(images, rec)]))


DRAWN_TEST = 10_000_000  # drawn pictures 10,000,000.. are held apart from the decoder's training stream


#: fine-tune stage -> (the weights it starts from, its folder, its log, whether the encoder trains too)
AE_FINETUNES = {
    "decoder": ("autoencoder_f2", "autoencoder_f2_decoder", "decoder_log.json", False),
    "encoder": ("autoencoder_f2_decoder", "autoencoder_f2_wide", "wide_log.json", True),
}
ANCHOR_WEIGHT = 10.0  # the encoder stage's penalty on moving narrow-world latents (scaled units, squared)


def whole_world_pictures(first: int, n: int) -> np.ndarray:
    """Scenes ``first..first+n-1`` of the whole world's training split (textured backgrounds,
    patterns, styles, two objects): ``(n, H, W, 3)`` uint8."""
    return np.stack([world.sample_scene(k, "train").image for k in range(first, first + n)])


def finetune_autoencoder(root: Path, steps: int, batch: int = AE_BATCH, lr: float = 5e-4, warmup: int = 50,
                  check_every: int = 250, test_scenes: int = AE_TEST_SCENES, drawn_share: float = 0.5,
                  stage: str = "decoder") -> None:
    """Fine-tune the factor-2 autoencoder: a cosine-decaying rate from ``lr`` (linear warm-up), L1 +
    MSE on the round trip of the latent means; the optimizer is saved with the weights, so a rerun
    resumes exactly. At each ``check_every`` steps the round trip is logged on held-apart
    narrow-world scenes, drawn pictures and whole-world scenes.

    ``stage="decoder"``: the decoder alone, the encoder frozen, so every latent (and the latent
    caches the curves train on) stays as it is; each batch is narrow-world scenes (a fresh stream,
    scenes 20,000,000..) and, for ``drawn_share`` of it, `drawn_pictures`. Starts from
    ``root/autoencoder_f2``, writes ``root/autoencoder_f2_decoder``.

    ``stage="encoder"``: encoder and decoder, from ``root/autoencoder_f2_decoder`` to
    ``root/autoencoder_f2_wide``; each batch is half whole-world scenes, a quarter drawn pictures, a
    quarter narrow-world scenes, and the loss adds ``ANCHOR_WEIGHT`` times the squared distance of the
    narrow scenes' latents (scaled, the UNet's units) from the starting encoder's, so that a UNet
    trained on the old latents stays valid; ``anchor_rmse`` logs that distance on the test scenes."""
    import copy

    from diffusers import AutoencoderKL

    source, out, log_name, train_encoder = AE_FINETUNES[stage]
    folder = root / out
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / log_name
    start = root / source / "vae"
    if not start.exists():
        raise SystemExit(f"no autoencoder at {start}: run " + ("--stage autoencoder" if stage == "decoder" else "--stage decoder") + " first")
    resume = (folder / "vae").exists() and log_path.exists()
    vae = AutoencoderKL.from_pretrained(folder / "vae" if resume else start)
    old = AutoencoderKL.from_pretrained(start).eval().requires_grad_(False)  # the latents to stay near
    scale = vae.config.scaling_factor
    side = vae.config.sample_size
    if not train_encoder:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def narrow_test() -> np.ndarray:
        return np.stack([world.render(narrow_spec(k)).image for k in range(10_000_000, 10_000_000 + test_scenes)])

    def test(v) -> dict:
        with torch.no_grad():
            x = to_tensor(narrow_test())  # (n, 3, H, W)
            drift = (v.encode(x).latent_dist.mean - old.encode(x).latent_dist.mean) * scale  # (n, C, h, w)
        return {"narrow_db": round_trip_psnr(v, n=test_scenes),
                "drawn_db": round_trip_psnr_of(v, drawn_pictures(DRAWN_TEST, test_scenes, side)),
                "whole_db": round_trip_psnr_of(v, whole_world_pictures(10_000_000, test_scenes)),
                "anchor_rmse": float(drift.pow(2).mean().sqrt())}

    if resume:
        log = json.loads(log_path.read_text())
        load_optimizer(opt, load_file(str(folder / "optimizer.safetensors")), log["optimizer"])
        step = log["points"][-1]["step"]
    else:
        log = {"start": str(start), "stage": stage, "lr": lr, "warmup": warmup, "steps": steps, "batch": batch,
               "drawn_share": drawn_share if stage == "decoder" else 0.25,
               "anchor_weight": ANCHOR_WEIGHT if train_encoder else None,
               "points": [{"step": 0, "samples": 0, **test(vae.eval())}]}
        step = 0
        print(json.dumps(log["points"][0]), flush=True)

    def set_mode() -> None:
        vae.train()
        if not train_encoder:
            vae.encoder.eval()

    set_mode()
    cpu0 = time.process_time()
    while step < steps:
        first = step * batch
        if train_encoder:
            n_narrow = n_drawn = batch // 4
            parts = [np.stack([world.render(narrow_spec(k)).image for k in range(20_000_000 + first, 20_000_000 + first + n_narrow)]),
                     drawn_pictures(first, n_drawn, side), whole_world_pictures(30_000_000 + first, batch - n_narrow - n_drawn)]
        else:
            n_narrow, n_drawn = batch - int(round(batch * drawn_share)), int(round(batch * drawn_share))
            parts = [np.stack([world.render(narrow_spec(k)).image for k in range(20_000_000 + first, 20_000_000 + first + n_narrow)]),
                     drawn_pictures(first, n_drawn, side)]
        x = to_tensor(np.concatenate(parts))  # (batch, 3, H, W); the narrow scenes first
        with torch.set_grad_enabled(train_encoder):
            z = vae.encode(x).latent_dist.mean  # (batch, C, h, w)
        rec = vae.decode(z).sample  # (batch, 3, H, W)
        loss = reconstruction_loss(rec, x)
        if train_encoder:
            with torch.no_grad():
                z_old = old.encode(x[:n_narrow]).latent_dist.mean  # (n_narrow, C, h, w)
            loss = loss + ANCHOR_WEIGHT * ((z[:n_narrow] - z_old) * scale).pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % check_every == 0 or step == steps:
            vae.eval()
            point = {"step": step, "samples": step * batch, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                     **test(vae), "cpu_seconds": round(time.process_time() - cpu0, 1)}
            vae.save_pretrained(folder / "vae.tmp")  # safetensors; then swapped in whole
            if (folder / "vae").exists():
                os.replace(folder / "vae", folder / "vae.old")
            os.replace(folder / "vae.tmp", folder / "vae")
            shutil.rmtree(folder / "vae.old", ignore_errors=True)
            opt_t, opt_meta = optimizer_tensors(opt)
            save_file({k: v.contiguous() for k, v in opt_t.items()}, str(folder / "optimizer.tmp"))
            os.replace(folder / "optimizer.tmp", folder / "optimizer.safetensors")
            log["optimizer"] = opt_meta
            log["points"].append(point)
            tmp = log_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(log, indent=1))
            os.replace(tmp, log_path)
            print(json.dumps(point), flush=True)
            cpu0 = time.process_time()
            set_mode()


#: a candidate's ``autoencoder`` -> (its folder under RUN_DIR, its log there, the stage that trains it)
AUTOENCODERS: dict[str, tuple[str, str, str]] = {
    "f2": ("autoencoder_f2", "autoencoder_log.json", "autoencoder"),
    "f2_wide": ("autoencoder_f2_wide", "wide_log.json", "encoder"),  # encoder and decoder on the whole world
}


def autoencoder_record(root: Path, name: str) -> dict | str:
    """The last logged point of autoencoder ``name``'s training (for provenance), or ``"shipped"``."""
    if name == "shipped":
        return "shipped"
    folder, log, _ = AUTOENCODERS[name]
    return json.loads((root / folder / log).read_text())["points"][-1]


def load_autoencoder(recipe: dict, root: Path):
    """The frozen autoencoder a candidate's latents come from: the shipped one, or a factor-2 one
    trained under ``root`` by ``--stage autoencoder`` (``"f2"``) or ``--stage encoder`` (``"f2_wide"``)."""
    from diffusers import AutoencoderKL

    if recipe["autoencoder"] == "shipped":
        return AutoencoderKL.from_pretrained(MODEL_DIR / "vae").eval().requires_grad_(False)
    name, _, stage = AUTOENCODERS[recipe["autoencoder"]]
    folder = root / name / "vae"
    if not folder.exists():
        raise SystemExit(f"no factor-2 autoencoder at {folder}: train it first with --stage {stage}")
    return AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)


def build_models(recipe: dict, tokenizer, latent_side: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg = json.loads((MODEL_DIR / "unet" / "config.json").read_text())
    unet_cfg = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
    unet_cfg.update(recipe["unet"])
    text_cfg = json.loads((MODEL_DIR / "text_encoder" / "config.json").read_text())
    text_cfg = {k: v for k, v in text_cfg.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    text_cfg.update(recipe["text"])
    unet_cfg["cross_attention_dim"] = text_cfg["hidden_size"]
    unet_cfg["sample_size"] = latent_side
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    return unet, text_encoder


def evaluate(unet, text_encoder, ema: dict, vae, tokenizer, samples: int, steps: int, guidance: float,
             parts: tuple[str, ...] = EVAL_PARTS, scheduler=None) -> dict:
    """Score the EMA weights with the project's evaluation (its ``parts``), sampling with
    ``scheduler`` (default: the shipped DDIM scheduler)."""
    import copy

    from prompt2prompt import Prompt2PromptPipeline
    from prompt2prompt.shapes.evaluation import evaluate_model

    u, te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    u.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")}, strict=False)
    te.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("text.")}, strict=False)
    sched = scheduler if scheduler is not None else sampling_scheduler(BASE)
    pipe = Prompt2PromptPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=u, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return evaluate_model(pipe, n=samples, steps=steps, guidance=guidance, parts=parts)


def headline(r: dict) -> dict:
    """The figures the curves are read by."""
    sw = r["word_swap"]
    return {"train_colour": r["adherence_train"]["colour"], "train_shape": r["adherence_train"]["shape"],
            "heldout_colour": r["adherence"]["colour"], "heldout_shape": r["adherence"]["shape"],
            "train_background": r["adherence_train"]["background_correct"], "heldout_background": r["adherence"]["background_correct"],
            "swap_colour_target": sw["colour_p2p"]["target_rate"], "swap_colour_iou": sw["colour_p2p"]["median_mask_iou"],
            "swap_shape_target": sw["shape_p2p"]["target_rate"], "swap_shape_shift_px": sw["shape_p2p"]["median_centroid_shift_px"],
            **({} if "refine" not in r else {
                "refine_pattern_shown": r["refine"]["pattern"]["p2p"]["pattern_rate"],
                "refine_pattern_iou": r["refine"]["pattern"]["p2p"]["object_kept_median_iou"],
                **{f"refine_{style.replace(' ', '_')}_iou": v["layout_kept_median_iou"] for style, v in r["refine"]["style"]["p2p"].items()}})}


def save_results(path: Path, name: str, curve: dict) -> None:
    """Put ``curve`` under ``name`` in the results JSON at ``path`` (temporary file, then rename)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = curve
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run(args) -> None:
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    torch.set_num_threads(args.threads)
    recipe = {**BASE, **CANDIDATES[args.candidate]}
    root = Path(args.run_dir)
    folder = root / args.candidate
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    vae = load_autoencoder(recipe, root)
    description, _, _, parts = WORLDS[recipe["world"]]
    cache_name = f"{recipe['world']}_cache_{args.cache_scenes}" + ("" if recipe["autoencoder"] == "shipped" else f"_{recipe['autoencoder']}")
    cache = build_cache(root / f"{cache_name}.safetensors", vae, tokenizer, args.cache_scenes, world_name=recipe["world"])
    unet, text_encoder = build_models(recipe, tokenizer, latent_side=int(cache["latents"].shape[-1]))
    models = {"unet": unet, "text": text_encoder}
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.01)
    ema = {f"{n}.{k}": v.detach().clone() for n, m in models.items() for k, v in m.state_dict().items()}
    ema_keys = [f"{n}.{k}" for n, m in models.items() for k, _ in m.named_parameters()]
    curve_path = folder / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else {
        "candidate": args.candidate, "recipe": recipe, "points": [], "cpu_seconds": 0.0,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "text_parameters": sum(p.numel() for p in text_encoder.parameters()),
        "world": description, "cache_scenes": args.cache_scenes,
        "evaluation": {"parts": parts, "samples": args.eval_samples, "steps": args.eval_steps, "guidance": args.guidance}}
    step = 0
    start = folder
    if not (folder / "state.safetensors").exists() and recipe.get("init"):
        start = root / recipe["init"]  # continue another candidate's run (weights, EMA, optimizer) on this one's world
        if not (start / "state.safetensors").exists():
            raise SystemExit(f"{args.candidate} starts from {recipe['init']}'s checkpoint, and {start} has none: run that curve first")
    if (start / "state.safetensors").exists():
        state = load_file(str(start / "state.safetensors"))
        meta = json.loads((start / "state.json").read_text())
        for n, m in models.items():
            m.load_state_dict({k[len(n) + 1:]: v for k, v in state.items() if k.startswith(n + ".")})
        ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
        load_optimizer(opt, {k[4:]: v for k, v in state.items() if k.startswith("opt.")}, meta["optimizer"])
        step = meta["step"]
        if start != folder:
            init_curve = json.loads((start / "curve.json").read_text())
            cpu = next(p["train_cpu_seconds"] for p in init_curve["points"] if p["step"] == step)
            curve["init"] = {"candidate": recipe["init"], "step": step, "train_cpu_seconds": cpu}
            curve["cpu_seconds"] = cpu  # the curve's axes count the samples and CPU time before the switch too
        print(f"{'resumed' if start == folder else 'started from ' + recipe['init'] + ' at'} {args.candidate} step {step}", flush=True)
    sched = DDPMScheduler(**SCHEDULE, **SCHEDULES[recipe["schedule"]][0])
    alphas = sched.alphas_cumprod  # (num_train,)
    prediction_type = sampling_scheduler(recipe).config.prediction_type
    num_train = sched.config.num_train_timesteps
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    order = torch.randperm(args.cache_scenes, generator=torch.Generator().manual_seed(0))  # one fixed order, repeated
    batch, losses = recipe["batch"], []
    cpu0 = time.process_time()
    for m in models.values():
        m.train()
    while step < args.steps:
        gen = torch.Generator().manual_seed(1_000_000 + step)
        idx = order[(torch.arange(batch) + step * batch) % args.cache_scenes]  # (batch,)
        z0 = cache["latents"][idx]  # (batch, C, h, w)
        ids = cache["ids"][idx].long()  # (batch, length)
        drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
        ids = torch.where(drop[:, None], empty, ids)  # (batch, length)
        noise = training_noise(tuple(z0.shape), gen, recipe["offset_noise"])  # (batch, C, h, w)
        t = sample_timesteps(recipe["timesteps"], batch, num_train, gen)  # (batch,)
        a = alphas[t].view(-1, 1, 1, 1)  # (batch, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        states = text_encoder(ids)[0]  # (batch, length, width)
        pred = unet(zt, t, encoder_hidden_states=states).sample  # (batch, C, h, w)
        loss = (pred - training_target(noise, z0, a, prediction_type)).pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, 10 ** 9, recipe["lr"], recipe["warmup"]) if step < recipe["warmup"] else recipe["lr"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(recipe["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            flat = [p.detach() for p in params]
            torch._foreach_lerp_([ema[k] for k in ema_keys], flat, 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"{args.candidate} step {step}: loss {np.mean(losses[-50:]):.4f}", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            curve["cpu_seconds"] += time.process_time() - cpu0
            t_eval = time.process_time()
            r = evaluate(unet, text_encoder, ema, vae, tokenizer, args.eval_samples, args.eval_steps, args.guidance, parts,
                         sampling_scheduler(recipe))
            point = {"step": step, "samples": step * batch, "train_cpu_seconds": round(curve["cpu_seconds"], 1),
                     "loss": float(np.mean(losses[-200:])), **headline(r), "full": r,
                     "eval_cpu_seconds": round(time.process_time() - t_eval, 1)}
            curve["points"] = [p for p in curve["points"] if p["step"] != step] + [point]
            print(json.dumps({k: v for k, v in point.items() if k != "full"}), flush=True)
            state = {f"{n}.{k}": v.contiguous() for n, m in models.items() for k, v in m.state_dict().items()}
            state.update({f"ema.{k}": v.contiguous() for k, v in ema.items()})
            opt_t, opt_meta = optimizer_tensors(opt)
            state.update({f"opt.{k}": v.contiguous() for k, v in opt_t.items()})
            save_file(state, str(folder / "state.tmp"))
            os.replace(folder / "state.tmp", folder / "state.safetensors")
            (folder / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta}))
            curve_path.write_text(json.dumps(curve, indent=1))
            save_results(Path(args.results), args.candidate, curve)
            cpu0 = time.process_time()
            for m in models.values():
                m.train()


def world_words(name: str = "narrow", n: int = 5000) -> list[str]:
    """Every word the captions of curve world ``name`` contain (scenes ``0..n-1`` use all of them)."""
    return sorted({w for k in range(n) for w in world.split_words(world_spec(name, k).caption)})


def export(args) -> Path:
    """Write a candidate's EMA weights at its last checkpoint as a diffusers Stable Diffusion folder
    (safetensors, shards <= 15 MB) with its autoencoder (``--decoder``: the fine-tuned decoder of
    ``--stage decoder``), the shipped DDIM scheduler (with the candidate's schedule) and tokenizer, ``training.json`` (provenance:
    candidate, recipe, steps, samples, CPU seconds, commands) and ``world.json`` (the words it was
    trained on, which `Prompt2PromptPipeline.from_pretrained` warns outside of)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    recipe = {**BASE, **CANDIDATES[args.candidate]}
    root = Path(args.run_dir)
    folder = root / args.candidate
    if not (folder / "state.safetensors").exists():
        raise SystemExit(f"no checkpoint at {folder}: run the curve first")
    state = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    curve = json.loads((folder / "curve.json").read_text())
    if args.decoder and recipe["autoencoder"] != "f2":
        raise SystemExit(f"--decoder fine-tunes the first factor-2 autoencoder; this candidate uses {recipe['autoencoder']!r}")
    vae = load_autoencoder(recipe, root)
    if args.decoder:
        from diffusers import AutoencoderKL

        tuned = AutoencoderKL.from_pretrained(root / "autoencoder_f2_decoder" / "vae").eval()
        encoder_same = all(torch.equal(a, b) for a, b in zip(vae.encoder.state_dict().values(), tuned.encoder.state_dict().values()))
        if not encoder_same:
            raise SystemExit("the fine-tuned decoder's encoder differs from the one the latents came from")
        vae = tuned
    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    unet, text_encoder = build_models(recipe, tokenizer, latent_side=side)
    unet.load_state_dict({k[len("ema.unet."):]: v for k, v in state.items() if k.startswith("ema.unet.")})
    text_encoder.load_state_dict({k[len("ema.text."):]: v for k, v in state.items() if k.startswith("ema.text.")})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=sampling_scheduler(recipe), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    out = Path(args.export)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="15MB")
    last = max(curve["points"], key=lambda p: p["step"])
    info = {"candidate": args.candidate, "recipe": recipe, "unet_step": meta["step"],
            "samples_seen": meta["step"] * recipe["batch"], "train_cpu_seconds": last["train_cpu_seconds"] if last["step"] == meta["step"] else None,
            "world": curve["world"], "cache_scenes": curve["cache_scenes"],
            "autoencoder": json.loads((root / AE_FINETUNES["decoder"][1] / AE_FINETUNES["decoder"][2]).read_text())["points"][-1]
            if args.decoder else autoencoder_record(root, recipe["autoencoder"]),
            "decoder_fine_tuned": bool(args.decoder),
            "command": f"python benchmarks/shapes_learning_curve.py RUN_DIR --candidate {args.candidate} --steps {meta['step']} "
                       f"--eval-every {args.eval_every} --threads 1"}
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    (tmp / "world.json").write_text(json.dumps({"world": curve["world"], "words": world_words(recipe["world"])}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"exported {args.candidate} at step {meta['step']} to {out}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--candidate", choices=sorted(CANDIDATES))
    p.add_argument("--stage", choices=("curve", "autoencoder", *AE_FINETUNES), default="curve",
                   help="autoencoder: train the factor-2 autoencoder (RUN_DIR/autoencoder_f2) for --steps steps; "
                        "decoder: fine-tune its decoder, encoder frozen (RUN_DIR/autoencoder_f2_decoder); "
                        "encoder: then both on the whole world, narrow latents anchored (RUN_DIR/autoencoder_f2_wide)")
    p.add_argument("--lr", type=float, default=5e-4, help="decoder stage: peak learning rate (cosine decay over --steps)")
    p.add_argument("--list", action="store_true", help="print the candidates and exit")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=16, help="prompts per part (autoencoder stage: 16x this many test scenes)")
    p.add_argument("--eval-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5, help="the CLI's default")
    p.add_argument("--cache-scenes", type=int, default=CACHE_SCENES, help="narrow-world scenes rendered and encoded once")
    p.add_argument("--results", default=str(RESULTS), help="the JSON every candidate's curve goes to (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--export", metavar="DIR", help="write the candidate's last checkpoint (EMA) as a diffusers folder and exit")
    p.add_argument("--decoder", action="store_true", help="--export with the decoder fine-tuned by --stage decoder")
    args = p.parse_args(argv)
    if args.stage == "autoencoder":
        torch.set_num_threads(args.threads)
        train_autoencoder(Path(args.run_dir) / "autoencoder_f2", args.steps, check_every=args.eval_every,
                          test_scenes=args.eval_samples * 16)
        return
    if args.stage in AE_FINETUNES:
        torch.set_num_threads(args.threads)
        finetune_autoencoder(Path(args.run_dir), args.steps, lr=args.lr, check_every=args.eval_every,
                      test_scenes=args.eval_samples * 16, stage=args.stage)
        return
    if args.list or not args.candidate:
        for name, diff in CANDIDATES.items():
            print(f"{name}: {diff or 'the base recipe'}")
        print(f"base: {BASE}")
        return
    if args.export:
        export(args)
        return
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
