"""Test helpers."""

import torch


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to floating-point precision relative to the data's scale (random tiny models give
    latents up to ~10, where fp32 batch-layout differences reach ~1e-5)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, b.abs().max().item())
    diff = (a - b).abs().max().item()
    assert diff <= rel * scale, f"max difference {diff:.3g} exceeds {rel:g} x scale {scale:.3g}"
