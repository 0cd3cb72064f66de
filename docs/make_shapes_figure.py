#!/usr/bin/env python
"""Draw docs/shapes_edits.png: the bundled model's sources and Prompt-to-Prompt edits.

    python docs/make_shapes_figure.py [OUT.png] [--steps 50]

Each row: the source, a word swap (cross 0.8, self 0.4), the same target without injection
(same seed), and the word swap with LocalBlend on the object words.
"""

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from prompt2prompt import LocalBlend, Prompt2PromptPipeline
from prompt2prompt.imageio import save_png

ROWS = [
    ("a big red circle on a blue background", "a big red square on a blue background", "circle", "square"),
    ("a yellow star on grass", "a yellow heart on grass", "star", "heart"),
    ("a big green diamond on sand", "a big purple diamond on sand", "green", "purple"),
    ("a striped blue ring on a white background", "a striped orange ring on a white background", "blue", "orange"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=str(Path(__file__).with_name("shapes_edits.png")))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    pipe = Prompt2PromptPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    scale, label = 3, 16
    tiles = []
    for source, target, a, b in ROWS:
        common = dict(num_inference_steps=args.steps, output_type="np", return_attention=False)
        seed = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
        p2p = pipe(source, [target], generator=seed(), cross_replace_steps=0.8, self_replace_steps=0.4, **common).images
        none = pipe(source, [target], generator=seed(), edit="none", **common).images[1]
        blend = pipe(source, [target], generator=seed(), local_blend=LocalBlend(a, b), **common).images[1]
        tiles.append([p2p[0], p2p[1], none, blend])
    size = tiles[0][0].shape[0] * scale
    heads = ["source", "word swap (P2P)", "no injection", "P2P + LocalBlend"]
    img = Image.new("RGB", (4 * size, len(tiles) * (size + label) + label), "white")
    draw = ImageDraw.Draw(img)
    for c, head in enumerate(heads):
        draw.text((c * size + 4, 2), head, fill="black")
    for r, (row, (source, target, a, b)) in enumerate(zip(tiles, ROWS)):
        y = label + r * (size + label)
        for c, im in enumerate(row):
            tile = Image.fromarray((im * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
            img.paste(tile, (c * size, y))
        draw.text((4, y + size + 2), f"{source}  ->  {b} (was {a})", fill="black")
    # atomically, carrying the command that drew it
    save_png(args.out, img, metadata={"script": "docs/make_shapes_figure.py", "arguments": vars(args)}, parameters=shlex.join(sys.argv))
    print(args.out)


if __name__ == "__main__":
    main()
