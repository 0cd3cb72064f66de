#!/usr/bin/env python
"""Draw a grid of attention re-weighting: one row per (model, prompt), one column per factor.

    python docs/make_reweight_figure.py OUT.png [--model DIR ...] [--steps 30]

Each row edits the prompt into itself with ``equalizer={word: factors}`` (the paper's Sec. 3.2:
the word's column of the cross-attention maps is scaled by the factor), as the evaluation's
``reweight`` part does. With several ``--model`` folders the rows of each model follow one another,
so that the same prompt and seed can be compared across checkpoints.
"""

import argparse
import shlex
import sys
from pathlib import Path

import torch
from prompt2prompt import Prompt2PromptPipeline
from prompt2prompt.imageio import save_png
from prompt2prompt.visualisation import labelled_grid

FACTORS = (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0)
ROWS = [
    ("a big red circle on a blue background", "red"),
    ("a big yellow star on a purple background", "yellow"),
    ("a big striped green square on a white background", "striped"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--model", action="append", default=None, help="a diffusers folder (default: the bundled model)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.out.endswith(".png"):
        parser.exit(2, f"error: OUT must end in .png, got {args.out!r}\n")
    images, labels, marked = [], [], []
    for model in args.model or [None]:
        name = Path(model).name if model else "bundled"
        pipe = Prompt2PromptPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        for prompt, word in ROWS:
            out = pipe(prompt, [prompt] * len(FACTORS), equalizer={word: list(FACTORS)}, num_inference_steps=args.steps,
                       generator=torch.Generator().manual_seed(args.seed), output_type="np")
            images += list(out.images[1:])  # (H, W, 3) each, one per factor
            labels += [f"{name}: {prompt}\n'{word}' x {f:g}" for f in FACTORS]
            marked += [[word]] * len(FACTORS)
    img = labelled_grid(images, labels, marked_words=marked, columns=len(FACTORS), min_cell=128, font_size=11)
    # atomically, carrying the command that drew it
    save_png(args.out, img, metadata={"script": "docs/make_reweight_figure.py", "arguments": vars(args)}, parameters=shlex.join(sys.argv))
    print(args.out)


if __name__ == "__main__":
    main()
