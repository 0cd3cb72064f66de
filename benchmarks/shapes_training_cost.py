#!/usr/bin/env python
"""What one training step of the bundled shapes model costs: arithmetic and operator launches.

Counts, on any device (the counts do not depend on it), for the exported model in ``--model``:
- floating-point operations per sample (`torch.utils.flop_counter`): the frozen VAE's encode, and
  the UNet and text encoder forward and backward, and per step at ``--batch``;
- ATen operators per step of the model work (encode, forward, loss, backward), views left out.
  The optimizer and the EMA are not counted: on CUDA they are a fused AdamW and foreach updates, a
  handful of launches, while on a CPU they run per tensor;
- host time, on this machine with ``--threads``, of two pieces of per-step work that train.py now
  does on the training device: turning a batch of uint8 images into floats, and drawing the step's
  random numbers (best of 3);
- with ``--memory`` (Linux), the peak memory that the model work adds at batch 128 in float32
  (process peak RSS), scaled to ``--batch``: what a GPU needs for the activations, before bf16
  autocast halves much of it.

On an H200 a step at batch 512 took 113-149 ms (DEVELOPERS.md). Set against what this prints, the
step is bound neither by the arithmetic nor by kernel launches alone, which the chunk's own timing
of its wait for rendered batches (train.py) then tells apart.

    python benchmarks/shapes_training_cost.py [--model DIR] [--batch 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from profile_edit import OpCounter, kernels
    from prompt2prompt.shapes import MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL_DIR), help="an exported shapes model (default: the bundled one)")
    parser.add_argument("--batch", type=int, default=512, help="batch for the per-step figure (default 512)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the host timings (default 2)")
    parser.add_argument("--memory", action="store_true", help="also measure the activation memory (Linux, about 1 min)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.model)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    n = 4  # samples measured; FLOPs scale with the batch, operator counts do not
    size = vae.config.sample_size
    ids = torch.randint(0, text_encoder.config.vocab_size, (n, text_encoder.config.max_position_embeddings))  # (n, tokens)
    images = torch.rand(n, vae.config.in_channels, size, size) * 2 - 1  # (n, 3, h, w) in [-1, 1]
    t = torch.randint(0, 1000, (n,))

    def encode():
        with torch.no_grad():
            return vae.encode(images).latent_dist.mean  # (n, C, h/f, w/f)

    def train_step(z):
        states = text_encoder(ids)[0]  # (n, tokens, width)
        pred = unet(z, t, encoder_hidden_states=states).sample  # (n, C, h/f, w/f)
        loss = (pred - torch.randn_like(pred)).pow(2).mean()
        loss.backward()

    with FlopCounterMode(display=False) as flops:
        z = encode()
    encode_flops = flops.get_total_flops() / n
    with FlopCounterMode(display=False) as flops:
        train_step(z)
    train_flops = flops.get_total_flops() / n
    with OpCounter() as ops:
        train_step(encode())
    per_sample = encode_flops + train_flops
    print(f"model: {folder}")
    print(f"FLOPs per sample: VAE encode {encode_flops / 1e9:.3f} G, UNet + text encoder forward and backward "
          f"{train_flops / 1e9:.3f} G, together {per_sample / 1e9:.3f} G")
    print(f"FLOPs per step at batch {args.batch}: {per_sample * args.batch / 1e12:.2f} T")
    print(f"operators per step (model work, optimizer and EMA left out): {sum(ops.counts.values()):.0f}, "
          f"of which kernels (not views): {kernels(ops.counts):.0f}")
    import time

    import numpy as np

    from prompt2prompt.shapes.data import images_to_tensor
    from prompt2prompt.shapes.objective import training_noise

    batch = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, vae.config.in_channels), dtype=np.uint8)
    side = size // 2 ** (len(vae.config.block_out_channels) - 1)  # the latent's side
    latent = (args.batch, vae.config.latent_channels, side, side)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1000

    def draws():
        gen = torch.Generator().manual_seed(0)
        torch.rand(args.batch, generator=gen)
        training_noise(latent, gen, 0.1)
        torch.randint(0, 1000, (args.batch,), generator=gen)

    print(f"host time at batch {args.batch} on {torch.get_num_threads()} threads: uint8 -> float {best(lambda: images_to_tensor(batch)):.1f} ms, "
          f"the step's random numbers {best(draws):.1f} ms")
    if args.memory:
        def peak_gb() -> float:
            with open("/proc/self/status") as f:
                return int(f.read().split("VmHWM:")[1].split()[0]) / 1e6  # kB -> GB

        small = 128
        z = torch.randn(small, *latent[1:])  # (128, C, h, w)
        ids_small = torch.randint(0, text_encoder.config.vocab_size, (small, text_encoder.config.max_position_embeddings))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current RSS
        before = peak_gb()
        pred = unet(z, torch.randint(0, 1000, (small,)), encoder_hidden_states=text_encoder(ids_small)[0]).sample
        pred.pow(2).mean().backward()
        added = peak_gb() - before
        print(f"memory: forward and backward at batch {small} in float32 add {added:.2f} GB; "
              f"at batch {args.batch} about {added * args.batch / small:.0f} GB")


if __name__ == "__main__":
    main()
