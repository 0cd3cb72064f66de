"""What a training step optimises and at what rate: Stable Diffusion's noise schedule, the training
noise (with offset noise), the regression target (epsilon or v), Min-SNR loss weights, the learning-rate schedule, and the step total
that fits a chunk to its time budget."""

from __future__ import annotations

import math

import torch

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SD's
LR_FLOOR = 0.1  # the cosine decay ends at this share of the peak learning rate


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def training_target(noise: torch.Tensor, latents: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet regresses for the noisy latent ``sqrt(a) x0 + sqrt(1 - a) eps``: ``eps`` itself
    (``"epsilon"``, DDPM, Ho et al., 2020, eq. 14) or the velocity ``v = sqrt(a) eps - sqrt(1 - a) x0``
    (``"v_prediction"``, Salimans & Ho, 2022, sec. 4). At a zero-terminal-SNR step (``a = 0``; Lin et
    al., 2024) ``v = -x0``: the model must draw the picture from the text alone, where an epsilon
    target would carry no information.

    Args:
        noise: ``eps``, ``(batch, C, h, w)``.
        latents: ``x0``, ``(batch, C, h, w)``.
        alpha_bar: ``a`` per sample, broadcastable, e.g. ``(batch, 1, 1, 1)``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (a diffusers scheduler config's value).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
