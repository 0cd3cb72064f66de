"""Time the bundled shapes model on this machine: one generation and one edit (source + 1 target).

    python benchmarks/bench_shapes_model.py [--steps 50] [--repeats 3] [--threads N] [--model DIR]

Both with classifier-free guidance, at the model's resolution, float32 on the CPU, full decode.
Prints the median seconds of each.
"""

import argparse
import statistics
import time

import torch

from prompt2prompt import Prompt2PromptPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Prompt2PromptPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=args.steps, guidance_scale=5.0, output_type="pil")
    runs = {
        "generate": lambda: pipe("a big red circle on a blue background", generator=torch.Generator().manual_seed(0), **kw),
        "edit": lambda: pipe("a big red circle on a blue background", ["a big red square on a blue background"],
                             generator=torch.Generator().manual_seed(0), **kw),
    }
    for fn in runs.values():
        fn()  # warm-up
    for name, fn in runs.items():
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        print(f"{name:9s} {statistics.median(times):7.2f} s  (median of {args.repeats}, {args.steps} steps, threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
