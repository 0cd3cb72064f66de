#!/usr/bin/env python
"""How much of a generated background's colour comes from the starting noise instead of the caption.

For a fixed prompt and many seeds, regresses the image border's mean RGB on the starting latent's
per-channel mean (plus a constant) and prints R^2 per colour channel, beside the same fit with the
means shuffled across seeds (the chance level for this many regressors). With the caption fixed,
a high R^2 says the background colour follows the noise: Stable Diffusion's schedule never fully
noises a latent's mean (sqrt(alpha_bar_T) = 0.068), so a model can learn to read a flat
background's colour from it (the motivation for ``train.py --offset-noise``).

    python benchmarks/shapes_background_vs_noise.py [--model DIR] [--seeds 40] [--steps 20]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

PROMPTS = (("a big red circle on a blue background", "blue"), ("a small yellow star on a purple background", "purple"))


def border_rgb(image: np.ndarray, width: int = 3) -> np.ndarray:
    """Mean RGB of the ``width``-pixel frame of an ``(h, w, 3)`` image."""
    frame = np.zeros(image.shape[:2], bool)
    frame[:width], frame[-width:], frame[:, :width], frame[:, -width:] = True, True, True, True
    return image[frame].mean(0)


def r_squared(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-column R^2 of the least-squares fit ``y ~ [x, 1]``."""
    design = np.c_[x, np.ones(len(x))]
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return 1 - ((y - design @ coef) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a diffusers folder (default: the bundled model)")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from prompt2prompt import Prompt2PromptPipeline
    from prompt2prompt.shapes import world

    pipe = Prompt2PromptPipeline.from_pretrained(args.model) if args.model else Prompt2PromptPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    side = pipe._default_size() // pipe.vae_scale_factor
    for prompt, background in PROMPTS:
        means, colours = [], []
        for seed in range(args.seeds):
            latents = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))
            out = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents,
                       output_type="np", return_attention=False)
            means.append(latents.mean((2, 3))[0].numpy())  # (channels,)
            colours.append(border_rgb(out.images[0] * 255))
        x, y = np.array(means), np.array(colours)
        shuffled = x[np.random.default_rng(0).permutation(len(x))]
        named = np.mean([min(world.COLOUR_NAMES, key=lambda c: np.sum((np.array(world.COLOURS[c]) - v) ** 2)) == background for v in y])
        print(f"{prompt!r}: border RGB std over {args.seeds} seeds {np.round(y.std(0), 1)}; "
              f"R^2 from the noise's channel means {np.round(r_squared(x, y), 2)} (shuffled: {np.round(r_squared(shuffled, y), 2)}); "
              f"border nearest the named colour {named:.0%}")


if __name__ == "__main__":
    main()
