#!/usr/bin/env python
"""Profile a Prompt-to-Prompt edit against plain generation with torch.profiler.

Builds the same model as speed.py, runs plain StableDiffusionPipeline and the edit
(``--variant``, default replace) for ``--steps`` steps under the profiler, and prints each side's
top operators by device time and by CPU time, plus the totals. Used to find what an edit costs
beyond plain generation (issue 7).

    python benchmarks/profile_edit.py --model sd15-shape --device cuda --steps 10
    python benchmarks/profile_edit.py --model tiny --steps 5
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", default="replace", choices=("replace", "none", "replace_localblend", "refine"))
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    from speed import build_pipelines
    from diffusers.utils import logging as dlogging

    from prompt2prompt import LocalBlend

    dlogging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    _, plain, p2p = build_pipelines(args.model, device, dtype)
    size = p2p._default_size()
    noise = torch.randn((1, 4, size // p2p.vae_scale_factor, size // p2p.vae_scale_factor), generator=torch.Generator().manual_seed(0))
    noise = noise.to(device, dtype)  # (1, C, h, w)
    src, tgt = "a cat riding a bicycle", "a cat riding a car"
    common = dict(num_inference_steps=args.steps, output_type="latent")
    kwargs = {"replace": dict(edit="replace"), "none": dict(edit="none"), "refine": dict(edit="refine"),
              "replace_localblend": dict(edit="replace", local_blend=LocalBlend("bicycle", "car"))}[args.variant]
    if args.variant == "refine":
        tgt = "a cat riding a red bicycle"
    sides = {
        "plain": lambda: plain(prompt=[src, tgt], latents=noise.expand(2, -1, -1, -1).clone(), **common),
        "edit": lambda: p2p(prompt=src, edit_prompts=[tgt], latents=noise.clone(), **kwargs, **common),
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        for fn in sides.values():  # warm-up
            fn()
        for name, fn in sides.items():
            with profile(activities=activities) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            events = prof.key_averages()
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            total_dev = sum(getattr(e, key, 0) for e in events)
            total_cpu = sum(e.self_cpu_time_total for e in events)
            print(f"\n===== {name}: {args.model} {dtype} {args.steps} steps; self device total {total_dev / 1e3:.1f} ms, self CPU total {total_cpu / 1e3:.1f} ms")
            print(events.table(sort_by=key, row_limit=args.rows))
            if device.type == "cuda":
                print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows // 2))


if __name__ == "__main__":
    main()
