"""Non-finite numbers (NaN, infinity) in a run: found, named by their step, and refused.

A float16 model can overflow: one infinity in a UNet block turns the latents into NaN, and a NaN
latent decodes to an image that ``image_processor.postprocess`` turns black. The pipelines check
their latents at every denoising step (`FiniteWatch`) and their decoded pixels (`check_pixels`)
and raise `NonFiniteError` instead of returning such an image.

The per-step check costs no device sync on an accelerator: each step writes one flag into a tensor
on the device, read once after the loop (the step is still named exactly). On the CPU, where a
check is a plain read, it raises at the step itself.
"""

from __future__ import annotations

import torch

#: What to try when a float16 run overflows.
FLOAT16_ADVICE = "load the model in bfloat16 or float32 (p2p --dtype bfloat16)"


class NonFiniteError(ValueError):
    """NaN or infinity in the latents or the decoded images: ``"non-finite latents at step 7 of
    50 (float16 overflow?): load the model in bfloat16 or float32 ..."``. ``step`` is 1-based
    (None for the decoded images)."""

    def __init__(self, what: str, dtype: torch.dtype, step: int | None = None, steps: int | None = None):
        self.what, self.dtype, self.step, self.steps = what, dtype, step, steps
        where = f" at step {step} of {steps}" if step is not None else ""
        if dtype == torch.float16:
            cause = f"(float16 overflow?): {FLOAT16_ADVICE}"
        else:
            cause = f"(in {str(dtype).removeprefix('torch.')}): the model's output overflowed; check the model's weights and inputs"
        super().__init__(f"non-finite {what}{where} {cause}")


def all_finite(values: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on ``values``' device: every element is finite (no sync)."""
    return torch.isfinite(values).all()


class FiniteWatch:
    """Watches the latents of a denoising loop of ``steps`` steps.

    Call `step` after each step and `finish` after the loop; either raises `NonFiniteError` naming
    the first step whose latents hold NaN or infinity (on the CPU `step` raises at once; elsewhere
    the flags stay on the device until `finish`, one sync for the whole loop). ``eager`` overrides
    the choice the device makes.
    """

    def __init__(self, steps: int, device: torch.device | str, eager: bool | None = None):
        self.steps = steps
        self.device = torch.device(device)
        self.eager = self.device.type == "cpu" if eager is None else eager  # False: the accelerator's way, anywhere
        self.bad = None if self.eager else torch.zeros(steps, dtype=torch.bool, device=self.device)  # (steps,)

    def step(self, index: int, latents: torch.Tensor) -> None:
        """Check (or flag) the latents after step ``index`` (0-based)."""
        ok = all_finite(latents)
        if self.eager:
            if not bool(ok):
                raise NonFiniteError("latents", latents.dtype, index + 1, self.steps)
        else:
            self.bad[index] = ~ok
            self.dtype = latents.dtype

    def finish(self) -> None:
        """Raise for the first flagged step (one device sync), if any."""
        if self.eager or not bool(self.bad.any()):
            return
        first = int(self.bad.nonzero()[0, 0])
        raise NonFiniteError("latents", self.dtype, first + 1, self.steps)


def check_pixels(images: torch.Tensor) -> torch.Tensor:
    """``images`` (decoded, ``(prompts, 3, height, width)``) when every value is finite.

    Raises:
        NonFiniteError: a NaN or infinite pixel (a VAE that overflowed), which would be saved black.
    """
    if not bool(all_finite(images)):
        raise NonFiniteError("pixels from the VAE decoder", images.dtype)
    return images
