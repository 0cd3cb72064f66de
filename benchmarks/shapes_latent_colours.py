#!/usr/bin/env python
"""Does the autoencoder's latent keep the world's colours apart? A probe of the encoder alone.

Renders one big filled square and one big filled circle of every colour on every other plain
background (180 scenes), encodes each to its latent mean and takes the latent vector (all channels)
under the object's centre. Prints nearest-centroid accuracy per colour and, for each colour, the
mean distance of its vectors to their centroid ("spread") beside the distance to the nearest other
colour's centroid. A colour whose spread is close to that distance is not kept apart by the encoder,
and no decoder can restore it (see the decoder fine-tune in docs/shapes_model_experiments.md).

    python benchmarks/shapes_latent_colours.py [--model DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def centre_latents(vae, world) -> tuple[np.ndarray, np.ndarray]:
    """``(scenes, latent_channels)`` latent means under each object's centre, and the colour index of each."""
    from prompt2prompt.shapes.data import images_to_tensor

    feats, labels, k = [], [], 0
    for ci, colour in enumerate(world.COLOUR_NAMES):
        for background in world.COLOUR_NAMES:
            if background == colour:
                continue
            for shape in ("square", "circle"):
                k += 1
                scene = world.render(world.make_spec([dict(shape=shape, colour=colour, size="big")], background=background, seed=k))
                ys, xs = np.nonzero(scene.filled[0])
                x = images_to_tensor(scene.image[None])  # (1, 3, h, w) in [-1, 1]
                with torch.no_grad():
                    z = vae.encode(x).latent_dist.mean[0]  # (latent_channels, h/f, w/f)
                scale = z.shape[-1] / scene.image.shape[1]
                feats.append(z[:, int(ys.mean() * scale), int(xs.mean() * scale)].numpy())
                labels.append(ci)
    return np.stack(feats), np.array(labels)


def main(argv=None) -> None:
    from diffusers import AutoencoderKL

    from prompt2prompt.shapes import world

    default = Path(__file__).resolve().parents[1] / "src" / "prompt2prompt" / "shapes" / "model"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default), help="a diffusers folder with a vae/ (default: the bundled model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(Path(args.model) / "vae").eval()
    feats, labels = centre_latents(vae, world)
    n = len(world.COLOUR_NAMES)
    centroids = np.stack([feats[labels == i].mean(0) for i in range(n)])  # (colours, latent_channels)
    pred = np.argmin(((feats[:, None] - centroids[None]) ** 2).sum(-1), 1)  # (scenes,)
    print(f"nearest-centroid accuracy over {len(labels)} scenes: {(pred == labels).mean():.1%}")
    print(f"{'colour':8s} {'accuracy':>8s} {'spread':>7s}  nearest other centroid")
    for i, colour in enumerate(world.COLOUR_NAMES):
        spread = np.linalg.norm(feats[labels == i] - centroids[i], axis=1).mean()
        d = np.linalg.norm(centroids - centroids[i], axis=1)
        d[i] = np.inf
        j = int(np.argmin(d))
        print(f"{colour:8s} {(pred[labels == i] == i).mean():8.0%} {spread:7.2f}  {world.COLOUR_NAMES[j]} at {d[j]:.2f}")


if __name__ == "__main__":
    main()
