"""The training run: a resumable run folder (state.json, safetensors shards, loss.csv) and its stages.

1. ``vae``: a small `AutoencoderKL` on rendered scenes;
2. ``unet``: a `UNet2DConditionModel` and a `CLIPTextModel` trained together on the frozen
   autoencoder's latents (epsilon prediction, SD's noise schedule, empty captions for
   classifier-free guidance, an EMA of the weights), optionally with the grounding losses;
3. ``decoder``: the autoencoder's decoder alone, fine-tuned on the frozen encoder's latent means.

Each stage runs in chunks (`Run._loop`): until the stage's total steps or the chunk's minutes, then
a checkpoint and a log entry (`chunk_record`). `Run.export` writes the EMA weights as a diffusers
Stable Diffusion folder.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoints import load_optimizer, load_sharded, optimizer_tensors, save_sharded
from .data import Batches, batch_images, images_to_tensor
from .grounding import backward_split, check_grounding_sides, grounding_attention, grounding_loss, grounding_share_loss
from .objective import SCHEDULE, fit_total, lr_at, min_snr_weights, training_noise

# Where each stage's scenes start in the training stream (scene k is rendered from seed k).
STREAM_OFFSETS = {"unet": 0, "vae": 10_000_000, "decoder": 30_000_000}
_SCALING_SCENES = (20_000_000, 256)  # first scene and count of the scenes whose latents set the scaling factor
_WARMUP = {"vae": 200, "decoder": 100, "unet": 1000}  # default warm-up steps, at most a tenth of the stage's steps
_PLANNED_TOTAL = 5000  # the steps a stage without a total plans its default warm-up for
_FAR_TOTAL = 10**9  # the total the learning rate decays towards until one is fitted: no decay yet
_UNTIMED_STEPS, _TIMED_STEPS = 5, 30  # fitting a total: steps left untimed (allocation, caches), then steps timed
_LOG_EVERY = 50  # steps between rows of loss.csv (each costs a host sync)
_EMPTY_CAPTIONS = 0.1  # share of captions dropped to "" so that the model learns the unconditional prediction
_UNET_STEP_SEEDS = 1_000_000  # the UNet step's generator seed is this plus the step (the VAE step's is the step)
_MAX_GRAD_NORM = 1.0  # gradient clipping of the UNet stage


def unet_config() -> dict:
    """The bundled model's UNet (16x16 latents, three levels, cross-attention at each)."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 96, 128), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=128, attention_head_dim=4,
    )


def model_configs(tokenizer) -> dict:
    """The bundled model's architecture (shapes come from here and from the tokenizer only)."""
    return {
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64), norm_num_groups=32,
        ),
        "unet": unet_config(),
        "text_encoder": dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
    }


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


def check_export(model_dir: Path) -> None:
    """Raise ValueError unless ``model_dir`` is a folder written by `Run.export`."""
    missing = [n for n in ("model_index.json", "training.json", "unet", "vae", "text_encoder", "tokenizer") if not (model_dir / n).exists()]
    if missing:
        raise ValueError(f"--init {model_dir}: not an exported shapes model (missing {', '.join(missing)}); "
                         "pass a folder written by --export, e.g. src/prompt2prompt/shapes/model")


class _Pace:
    """Fits a stage's total steps to a chunk's time budget when none is set: after `_UNTIMED_STEPS`
    steps it times `_TIMED_STEPS` more and extrapolates (`fit_total`)."""

    def __init__(self, stage: str, first_step: int, start: float, minutes: float, sync):
        self.stage, self.first_step, self.start, self.minutes, self.sync = stage, first_step, start, minutes, sync
        self.timed_from: int | None = None
        self.timed_at = 0.0

    def fitted_total(self, step: int) -> int | None:
        """Called before each step while the stage has no total: the fitted total once the timed
        steps are done, else None."""
        if self.timed_from is None and step - self.first_step == _UNTIMED_STEPS:
            self.sync()
            self.timed_from, self.timed_at = step, time.time()
        if self.timed_from is None or step - self.timed_from != _TIMED_STEPS:
            return None
        self.sync()
        total = fit_total(step, self.timed_from, time.time() - self.timed_at, self.minutes - (self.timed_at - self.start) / 60)
        print(f"{self.stage}: {(time.time() - self.timed_at) / _TIMED_STEPS * 1000:.1f} ms/step; total fitted to {total} steps", flush=True)
        return total


class Run:
    """A resumable training run in ``folder`` (state.json + safetensors shards + loss.csv).

    Args:
        folder: the run folder; an existing run there is resumed.
        device: where the models train (e.g. ``"cuda"`` or ``"cpu"``).
        init: for a new run, an exported model (`export`) to start from instead of random weights.
    """

    def __init__(self, folder: str | os.PathLike, device: str, init: str | os.PathLike | None = None):
        self.folder = Path(folder)
        resuming = (self.folder / "state.json").exists()
        if init is not None and not resuming:
            init = Path(init)
            check_export(init)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        self.tokenizer = self._tokenizer(None if resuming else init)
        self._build_models()
        self.state = {"vae_step": 0, "unet_step": 0, "scaling_factor": None, "files": {}, "samples_seen": {"vae": 0, "unet": 0},
                      "seconds": {"vae": 0.0, "unet": 0.0}}
        self.command: str | None = None  # the command line of this process, for the chunk log (the CLI sets it)
        # The learning rates here are placeholders: `_loop` sets each step's (`lr_at`).
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=1e-3, weight_decay=0.0)
        self.decoder_opt = torch.optim.AdamW(self._decoder_params(), lr=1e-4, weight_decay=0.0)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        # The fused kernel on CUDA: one fused update instead of the default foreach path's ten or so multi-tensor ops.
        self.opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01, fused=self.device.type == "cuda")
        if resuming:
            self._load()
        elif init is not None:
            self._init_from(init)

    def _tokenizer(self, init: Path | None):
        """The run's tokenizer, saved in the run folder: ``init``'s, else one built from the world's captions."""
        from transformers import CLIPTokenizer

        tok_dir = self.folder / "tokenizer"
        if init is not None and not tok_dir.exists():
            CLIPTokenizer.from_pretrained(str(init / "tokenizer")).save_pretrained(str(tok_dir))
        if not any((tok_dir / n).exists() for n in ("vocab.json", "tokenizer.json")):
            from .tokenizer import build_from_world

            build_from_world(tok_dir)
        return CLIPTokenizer.from_pretrained(str(tok_dir))

    def _build_models(self) -> None:
        """The models with their seeded initial weights, and the EMA of the UNet and text encoder."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = model_configs(self.tokenizer)
        torch.manual_seed(0)
        self.vae = AutoencoderKL(**cfg["vae"]).to(self.device)
        self.unet = UNet2DConditionModel(**cfg["unet"]).to(self.device)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).to(self.device)
        self.ema = {
            "unet": {k: v.detach().clone().float() for k, v in self.unet.state_dict().items()},
            "text_encoder": {k: v.detach().clone().float() for k, v in self.text_encoder.state_dict().items()},
        }

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
        """The optimizers by the names their state is saved under."""
        return (("vae_opt", self.vae_opt), ("opt", self.opt), ("decoder_opt", self.decoder_opt))

    # -- persistence
    def _load(self) -> None:
        """Resume: the state, weights, EMA and optimizer state that `save` wrote."""
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
        """Write the weights, the EMA and the optimizers' state as shards, then ``state.json``."""
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
        """Append a row to ``loss.csv``."""
        path = self.folder / "loss.csv"
        new = not path.exists()
        with open(path, "a") as f:
            if new:
                f.write("stage,step,loss,lr,time\n")
            f.write(f"{stage},{step},{loss:.6f},{lr:.3g},{time.time():.0f}\n")

    # -- the chunk loop
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
        after the first timed steps so that the run ends with ``minutes`` (`_Pace`); it is recorded,
        so a resumed chunk keeps the same schedule.
        """
        total = self._total(stage, steps)
        first = self.state.get(stage + "_from", 0)  # where this stage's schedule began (--init)
        if warmup is None:
            warmup = min(_WARMUP[stage], ((total or _PLANNED_TOTAL) - first) // 10)
        key = stage + "_step"
        self.state.setdefault(key, 0)  # runs (and exports) from before the stage existed lack its counts
        self.state["samples_seen"].setdefault(stage, 0)
        self.state["seconds"].setdefault(stage, 0.0)
        start, step = time.time(), self.state[key]
        pace = _Pace(stage, step, start, minutes, self._sync)
        data = Batches(step, batch, offset, workers, str(self.folder / "tokenizer") if stage == "unet" else None, grounding)
        waited = 0.0  # seconds spent waiting for rendered batches: the data pipeline's share of the chunk
        try:
            while (total is None or step < total) and time.time() - start < minutes * 60:
                if total is None:
                    total = pace.fitted_total(step)
                    if total is not None:
                        self.state[stage + "_total"] = total
                t0 = time.time()
                images, _, ids, targets = data.get()
                waited += time.time() - t0
                x = images_to_tensor(images, self.device)  # (batch, 3, h, w) in [-1, 1]
                lr = lr_at(step - first, (total or _FAR_TOTAL) - first, base_lr, warmup)
                for g in opt.param_groups:
                    g["lr"] = lr
                loss = step_fn(x, ids, step, targets)
                step += 1
                if step % _LOG_EVERY == 0:
                    self.log(stage, step, loss.item(), lr)
        finally:
            data.close()
        self._sync()
        lr_settings = {"batch": batch, "lr": base_lr, "warmup": warmup, "total": total, "workers": workers}
        self._end_chunk(stage, step, batch, time.time() - start, waited, {**lr_settings, "data_wait_seconds": waited}, settings)

    def _end_chunk(self, stage: str, step: int, batch: int, elapsed: float, waited: float, loop_settings: dict,
                   settings: dict | None) -> None:
        """Count a chunk that ended at ``step`` into the state, log it (`chunk_record`) and checkpoint."""
        key = stage + "_step"
        print(f"{stage}: {step - self.state[key]} steps x {batch} in {elapsed:.0f} s, {waited:.0f} s of it waiting for "
              f"rendered batches ({loop_settings['workers']} workers, {torch.get_num_threads()} torch threads here)", flush=True)
        self.state["seconds"][stage] += elapsed
        self.state.setdefault("data_wait_seconds", {}).setdefault(stage, 0.0)
        self.state["data_wait_seconds"][stage] += waited
        self.state["samples_seen"][stage] += (step - self.state[key]) * batch
        precision = "float32" + (", TF32 matmuls" if self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "")
        loop_settings = {**loop_settings, "precision": precision}  # a stage's own settings may name its precision
        self.state.setdefault("chunks", []).append(
            chunk_record(stage, (self.state[key], step), elapsed, self.device, {**loop_settings, **(settings or {})}, self.command))
        self.state[key] = step
        self.save()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the stages
    def train_vae(self, steps: int | None, batch: int, minutes: float, kl_weight: float = 1e-6, workers: int = 0,
                  lr: float = 1e-3, warmup: int | None = None) -> None:
        """Train the autoencoder: reconstruction MSE of a posterior sample plus ``kl_weight`` times its KL."""
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

        self._loop("vae", steps, batch, minutes, workers, STREAM_OFFSETS["vae"], lr, warmup, self.vae_opt, step_fn)

    def train_decoder(self, steps: int | None, batch: int, minutes: float, workers: int = 0,
                      lr: float = 1e-4, warmup: int | None = None) -> None:
        """Fine-tune the decoder (and ``post_quant_conv``) to reconstruct scenes from the frozen
        encoder's latent means, the latents the UNet was trained to produce (`latents` without the
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
            self._loop("decoder", steps, batch, minutes, workers, STREAM_OFFSETS["decoder"], lr, warmup, self.decoder_opt, step_fn)
        finally:
            self.vae.requires_grad_(False)

    @torch.no_grad()
    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled latent means ``(batch, latent_channels, h/f, w/f)`` float32 of images ``x``
        ``(batch, 3, h, w)`` in [-1, 1], ``f`` the autoencoder's downsampling; the encoder runs in
        bf16 autocast on CUDA."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            mean = self.vae.encode(x).latent_dist.mean  # (batch, latent_channels, h/f, w/f)
        return mean.float() * self.state["scaling_factor"]

    def _ensure_scaling_factor(self) -> None:
        """Set the latents' scaling factor, once: one over the standard deviation of a fixed set of
        scenes' latent means (SD's convention: unit variance latents)."""
        if self.state["scaling_factor"] is None:
            self.vae.eval()
            x, _ = batch_images(*_SCALING_SCENES)
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
        (`grounding.map_sides` lists the model's); None: every layer. ``grounding_text=False``
        keeps the losses' gradient out of the text encoder (it still learns from the diffusion loss).
        ``grounding_share_words`` takes the pixel side's share among the caption's words only
        (`grounding_share_loss`'s ``words``), leaving the start token's and the padding's mass alone."""
        if grounding_sides is not None:
            check_grounding_sides(self.unet, grounding_sides)
        self._ensure_scaling_factor()
        settings = self._unet_settings(offset_noise, min_snr_gamma, grounding, grounding_share, grounding_sides, grounding_text,
                                       grounding_share_words)
        self.vae.eval().requires_grad_(False)
        self.unet.train()
        self.text_encoder.train()
        step_fn = _UnetStep(self, ema_decay, offset_noise, min_snr_gamma, grounding, grounding_share, grounding_text,
                            grounding_share_words)
        sides = frozenset(grounding_sides) if grounding_sides else None
        with grounding_attention(self.unet, step_fn.maps, sides) if step_fn.grounded else nullcontext():
            self._loop("unet", steps, batch, minutes, workers, STREAM_OFFSETS["unet"], lr, warmup, self.opt, step_fn,
                       grounding=step_fn.grounded, settings={"ema_decay": ema_decay, **settings})
        with torch.no_grad():  # buffers (e.g. position ids) are not trained: copy them as they are
            for part, m in (("unet", self.unet), ("text_encoder", self.text_encoder)):
                for k, v in m.named_buffers():
                    if k in self.ema[part]:
                        self.ema[part][k].copy_(v)

    def _unet_settings(self, offset_noise: float, min_snr_gamma: float, grounding: float, grounding_share: float,
                       grounding_sides, grounding_text: bool, grounding_share_words: bool) -> dict:
        """Record a UNet chunk's loss settings in the state (the export carries the last chunk's) and
        return them, with the precision on CUDA, for the chunk log. Settings that do not apply are None."""
        grounded = grounding > 0 or grounding_share > 0
        self.state.update(offset_noise=offset_noise, min_snr_gamma=min_snr_gamma, grounding=grounding, grounding_share=grounding_share)
        self.state["grounding_sides"] = sorted(grounding_sides, reverse=True) if grounded and grounding_sides else None
        self.state["grounding_text"] = grounding_text if grounded else None
        self.state["grounding_share_words"] = grounding_share_words if grounding_share > 0 else None
        settings = {k: self.state[k] for k in ("offset_noise", "min_snr_gamma", "grounding", "grounding_share", "grounding_sides",
                                                 "grounding_text", "grounding_share_words")}
        if self.device.type == "cuda":
            settings["precision"] = "bf16 autocast (UNet, text encoder, VAE encode)" + (
                ", TF32 matmuls" if torch.backends.cuda.matmul.allow_tf32 else "")
        return settings

    # -- export
    def export(self, out_dir: str | os.PathLike) -> Path:
        """Write the EMA weights as a diffusers Stable Diffusion folder (safetensors)."""
        pipe = self._pipeline()
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="15MB")
        (tmp / "training.json").write_text(json.dumps(self._training_info(), indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        self.vae.to(self.device)
        return out

    def _pipeline(self):
        """A `StableDiffusionPipeline` on the CPU of the VAE, the EMA weights and a DDIM scheduler."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from transformers import CLIPTokenizer

        self._ensure_scaling_factor()
        self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        unet = type(self.unet).from_config(self.unet.config)
        unet.load_state_dict(self.ema["unet"])
        text_encoder = type(self.text_encoder)(self.text_encoder.config)
        text_encoder.load_state_dict(self.ema["text_encoder"])
        scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        tokenizer = CLIPTokenizer.from_pretrained(str(self.folder / "tokenizer"))  # fresh: no padding state from training
        return StableDiffusionPipeline(
            vae=self.vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def _training_info(self) -> dict:
        """The exported ``training.json``: counts, the last UNet chunk's settings, the chunk log and history."""
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
        return info


class _UnetStep:
    """One training step of the UNet stage (`Run.train_unet`), called by `Run._loop` as
    ``step_fn(x, ids, step, targets)``: the diffusion loss (with Min-SNR weights), the grounding
    losses when asked, the update with gradient clipping, and the EMA. Returns the unweighted MSE.

    ``maps`` collects the step's cross-attention maps while `grounding.grounding_attention` is
    installed (``grounded``).
    """

    def __init__(self, run: Run, ema_decay: float, offset_noise: float, min_snr_gamma: float, grounding: float,
                 grounding_share: float, grounding_text: bool, grounding_share_words: bool):
        from diffusers import DDPMScheduler

        self.run, self.device = run, run.device
        self.ema_decay, self.offset_noise, self.min_snr_gamma = ema_decay, offset_noise, min_snr_gamma
        self.grounding, self.grounding_share = grounding, grounding_share
        self.grounding_text, self.grounding_share_words = grounding_text, grounding_share_words
        self.grounded = grounding > 0 or grounding_share > 0
        tok = run.tokenizer
        self.specials = torch.tensor(sorted({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}),
                                     device=self.device)  # tokens that are not the caption's words
        noise_sched = DDPMScheduler(**SCHEDULE)
        self.timesteps = noise_sched.config.num_train_timesteps
        self.alphas = noise_sched.alphas_cumprod.to(self.device)  # alpha_bar_t
        self.amp = self.device.type == "cuda"
        self.empty = tok([""], padding="max_length", max_length=tok.model_max_length,
                         return_tensors="pt").input_ids.to(self.device)  # (1, length)
        models = (("unet", run.unet), ("text_encoder", run.text_encoder))
        self.params = [p for _, m in models for p in m.parameters()]
        self.unet_params = list(run.unet.parameters())
        self.ema_params = [run.ema[part][k] for part, m in models for k, _ in m.named_parameters()]
        self.maps: list[torch.Tensor] = []  # the step's cross-attention maps, with grounding

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, step: int, targets) -> torch.Tensor:
        run = self.run
        # The step's random numbers are drawn where they are used: on a GPU the host only
        # launches (benchmarks/shapes_training_cost.py times the draws on the host).
        gen = torch.Generator(device=self.device).manual_seed(_UNET_STEP_SEEDS + step)
        drop = torch.rand(x.shape[0], generator=gen, device=self.device) < _EMPTY_CAPTIONS
        ids = torch.where(drop[:, None], self.empty, ids.to(self.device))  # (batch, length)
        z0 = run.latents(x.to(self.device))  # (batch, latent_channels, h/f, w/f), float32
        noise = training_noise(tuple(z0.shape), gen, self.offset_noise)  # (batch, latent_channels, h/f, w/f)
        t = torch.randint(0, self.timesteps, (x.shape[0],), generator=gen, device=self.device)
        a = self.alphas[t].view(-1, 1, 1, 1)  # (batch, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            states = run.text_encoder(ids)[0]
            pred = run.unet(zt, t, encoder_hidden_states=states).sample
        mse = (pred.float() - noise).pow(2).mean((1, 2, 3))  # (batch,)
        weighted = (min_snr_weights(self.alphas[t], self.min_snr_gamma) * mse).mean()
        extra = self._grounding_losses(ids, drop, targets, step) if self.grounded else None
        self._update(weighted, extra, step)
        return mse.mean().detach()

    def _grounding_losses(self, ids: torch.Tensor, drop: torch.Tensor, targets, step: int) -> torch.Tensor:
        """The weighted grounding losses on the step's collected maps (then cleared); empty captions
        have no targets."""
        masks, regions = (v.to(self.device) for v in targets)
        regions = torch.where(drop[:, None], -1, regions.long())  # (batch, length)
        ground = grounding_loss(self.maps, masks, regions)
        words = ~torch.isin(ids, self.specials) if self.grounding_share_words else None  # (batch, length)
        share = grounding_share_loss(self.maps, masks, regions, words)
        extra = self.grounding * ground + self.grounding_share * share
        self.maps.clear()
        if (step + 1) % _LOG_EVERY == 0:  # with the loss log's cadence (one host sync)
            print(f"unet step {step + 1}: grounding loss {ground.item():.4f}, share loss {share.item():.4f}", flush=True)
        return extra

    def _update(self, weighted: torch.Tensor, extra: torch.Tensor | None, step: int) -> None:
        """Backward (the grounding losses kept out of the text encoder unless ``grounding_text``),
        clip, step, and move the EMA towards the weights."""
        opt = self.run.opt
        opt.zero_grad(set_to_none=True)
        if extra is not None and not self.grounding_text:
            backward_split(weighted, extra, self.unet_params)
        else:
            (weighted if extra is None else weighted + extra).backward()
        torch.nn.utils.clip_grad_norm_(self.params, _MAX_GRAD_NORM)
        opt.step()
        decay = min(self.ema_decay, (1 + step) / (10 + step))  # a short memory while the EMA is young
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, [p.detach().float() for p in self.params], 1 - decay)
