#!/usr/bin/env python
"""Profile a Prompt-to-Prompt edit against plain generation with torch.profiler.

Builds the same model as speed.py, runs plain StableDiffusionPipeline and the edit
(``--variant``, default replace) for ``--steps`` steps under the profiler, and prints each side's
top operators by device time and by CPU time, plus the totals. Used to find what an edit costs
beyond plain generation (issue 7).

    python benchmarks/profile_edit.py --model sd15-shape --device cuda --steps 10
    python benchmarks/profile_edit.py --model tiny --steps 5
    python benchmarks/profile_edit.py --model small --count-ops

``--count-ops`` counts the ATen operators each side dispatches per denoising step instead (the
difference between a run of ``2 * --steps`` and one of ``--steps`` steps, so the one-off work of a
call drops out), for every variant. On a GPU where the call is bound by kernel launches, extra
operators per step are what an edit costs; the count is the same on any device, so it can be
checked on a CPU.
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("replace", "none", "replace_localblend", "refine", "reweight")
# Operators that only make a new view of a tensor: no kernel runs.
VIEW_OPS = frozenset("view _unsafe_view reshape _reshape_alias as_strided alias detach transpose t permute expand "
                     "slice select unsqueeze squeeze split split_with_sizes chunk unbind".split())


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(call, steps: int) -> collections.Counter:
    """Operators per denoising step of ``call(num_inference_steps)``: the count at ``2*steps``
    minus the count at ``steps``, divided by ``steps``."""
    counts = []
    for n in (steps, 2 * steps):
        with OpCounter() as counter:
            call(n)
        counts.append(counter.counts)
    return collections.Counter({k: (counts[1][k] - counts[0].get(k, 0)) / steps for k in counts[1]})


def kernels(counts: collections.Counter) -> float:
    return sum(v for k, v in counts.items() if k not in VIEW_OPS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", default="replace", choices=VARIANTS)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--count-ops", action="store_true", help="count operators per step for every variant (no profiler)")
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
    edits = {
        "replace": (tgt, dict(edit="replace")), "none": (tgt, dict(edit="none")),
        "refine": ("a cat riding a red bicycle", dict(edit="refine")),
        "reweight": (src, dict(edit="replace", equalizer={"bicycle": 2.0})),
        "replace_localblend": (tgt, dict(edit="replace", local_blend=LocalBlend("bicycle", "car"))),
    }
    if args.count_ops:
        with torch.inference_mode():
            base = ops_per_step(lambda n: plain(prompt=[src, tgt], latents=noise.expand(2, -1, -1, -1).clone(), num_inference_steps=n, output_type="latent"), args.steps)
            print(f"operators per denoising step ({args.model}, {dtype}; kernels = operators that are not views)")
            print(f"{'side':20s} {'operators':>10s} {'kernels':>8s} {'extra kernels':>14s}  most frequent extra operators")
            print(f"{'plain':20s} {sum(base.values()):10.1f} {kernels(base):8.1f} {0:14.1f}")
            sides = {name: (base, lambda n, target=target, kw=kw: p2p(prompt=src, edit_prompts=[target], latents=noise.clone(),
                                                                   num_inference_steps=n, output_type="latent", **kw))
                     for name, (target, kw) in edits.items()}
            # `p2p attention`: the source alone with its maps recorded, against plain generation of that one prompt
            single = ops_per_step(lambda n: plain(prompt=[src], latents=noise.clone(), num_inference_steps=n, output_type="latent"), args.steps)
            sides["attention"] = (single, lambda n: p2p(prompt=src, latents=noise.clone(), num_inference_steps=n, output_type="latent"))
            for name, (ref, call) in sides.items():
                c = ops_per_step(call, args.steps)
                extra = sorted(((k, c[k] - ref.get(k, 0)) for k in c if k not in VIEW_OPS and c[k] - ref.get(k, 0) > 0), key=lambda kv: -kv[1])
                print(f"{name:20s} {sum(c.values()):10.1f} {kernels(c):8.1f} {kernels(c) - kernels(ref):14.1f}  "
                      + ", ".join(f"{k} {v:g}" for k, v in extra[:6]))
            print(f"(attention: against plain generation of the source alone, {kernels(single):.1f} kernels a step)")
        return
    common = dict(num_inference_steps=args.steps, output_type="latent")
    tgt, kwargs = edits[args.variant]
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
