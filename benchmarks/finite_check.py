#!/usr/bin/env python
"""What the per-step non-finite check (`prompt2prompt.finite.FiniteWatch`) costs, next to a step.

Times ``FiniteWatch.step`` on latents of a given shape (the CPU's eager check, and the deferred
flag write an accelerator uses) and one denoising step of the bundled shapes model with the same
rows, and prints both and their ratio. Run: ``python benchmarks/finite_check.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from prompt2prompt.finite import FiniteWatch


def seconds_per_call(function, repeats: int, device: torch.device) -> float:
    """Median seconds of ``function()`` over ``repeats`` calls (synchronised on CUDA)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=2, help="prompt rows (source + targets; default 2)")
    parser.add_argument("--side", type=int, default=64, help="latent side of the timed check (64: SD 1.5 at 512 px)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    latents = torch.randn(args.rows, 4, args.side, args.side, device=device)
    for eager in (True, False):
        watch = FiniteWatch(args.repeats, device, eager=eager)
        step = iter(range(args.repeats))
        check = seconds_per_call(lambda: watch.step(next(step), latents), args.repeats, device)
        print(f"check ({'eager' if eager else 'deferred'}), latents {tuple(latents.shape)}: {check * 1e6:.1f} us")

    from prompt2prompt.loading import load_pipeline

    pipe = load_pipeline(None).to(device)
    side = pipe.unet.config.sample_size
    model_in = torch.randn(2 * args.rows, pipe.unet.config.in_channels, side, side, device=device)
    embeds = torch.randn(2 * args.rows, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, device=device)
    with torch.no_grad():
        unet = seconds_per_call(lambda: pipe.unet(model_in, 500, encoder_hidden_states=embeds), max(5, args.repeats // 20), device)
    small = FiniteWatch(args.repeats, device)
    step = iter(range(args.repeats))
    own = seconds_per_call(lambda: small.step(next(step), model_in[: args.rows]), args.repeats, device)
    print(f"bundled model: one UNet call (latent side {side}, {2 * args.rows} rows) {unet * 1e3:.2f} ms; "
          f"the check on its latents {own * 1e6:.1f} us ({own / unet:.4%} of the step)")


if __name__ == "__main__":
    main()
