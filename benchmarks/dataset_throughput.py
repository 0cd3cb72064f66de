"""``p2p dataset`` throughput with candidates batched by seed: pairs/s and candidates/s for
``--candidates-per-seed`` M = 1 (a call per candidate) against larger M (a call per group).

Each measured pair is `dataset.run_pair` (generation and the detector's scoring, what a worker
does for a pair, without writing shards) on the bundled shapes model, in this process. Method: one
warm-up pair per M, then ``--repeats`` rounds; each round runs every M over the same pairs, the
order of the M values alternating from round to round. Reported per (M, round): wall seconds,
process CPU seconds (`time.process_time`: on a shared machine it leaves out the time the process
waited for a core), pairs/s and candidates/s; and the median speed-up over M=1. The load average
(``os.getloadavg``) before and after is recorded: other jobs on the cores move wall time.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/dataset_throughput.py --threads 1 \\
        --out benchmarks/results_cpu_dataset_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from prompt2prompt import dataset
from prompt2prompt.imageio import atomic_write_json

#: Caption pairs of the shapes world (replace edits: one word changes).
CAPTIONS = [
    ("a red circle on a blue background", "a red square on a blue background"),
    ("a green star on a yellow background", "a blue star on a yellow background"),
    ("a big red circle on a white background", "a big red triangle on a white background"),
    ("a small yellow square on a green background", "a small yellow circle on a green background"),
    ("a blue triangle on a white background", "a purple triangle on a white background"),
    ("a red star on a black background", "a red circle on a black background"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs per measurement (at most %d)" % len(CAPTIONS))
    parser.add_argument("--samples-per-pair", type=int, default=8, help="N candidates per pair")
    parser.add_argument("--per-seed", default="1,4,8", help="the M values, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def measure(pipe, settings: dataset.DatasetSettings, pairs: list[dataset.Pair], device: str) -> dict:
    """Run every pair once: wall and CPU seconds, pairs/s and candidates/s."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for pair in pairs:
        dataset.run_pair(pipe, settings, pair)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    candidates = len(pairs) * settings.samples_per_pair
    return {"seconds": wall, "cpu_seconds": cpu, "pairs_per_s": len(pairs) / wall, "candidates_per_s": candidates / wall,
            "candidates_per_cpu_s": candidates / cpu}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    per_seed = [int(m) for m in args.per_seed.split(",")]
    pairs = [dataset.Pair(k, a, b) for k, (a, b) in enumerate(CAPTIONS[:args.pairs])]
    configs = {m: dataset.DatasetSettings(samples_per_pair=args.samples_per_pair, keep=1, steps=args.steps, min_score=0.0,
                                          candidates_per_seed=m) for m in per_seed}
    load_before = os.getloadavg()
    pipe = dataset.load_worker_pipeline(None, "float32", args.device)
    with torch.inference_mode():
        for m in per_seed:  # warm-up
            dataset.run_pair(pipe, configs[m], pairs[0])
        runs = []
        for round_ in range(args.repeats):
            for m in (per_seed if round_ % 2 == 0 else per_seed[::-1]):
                result = {"candidates_per_seed": m, "round": round_, **measure(pipe, configs[m], pairs, args.device)}
                runs.append(result)
                print(json.dumps(result), flush=True)
    median = {m: statistics.median(r["seconds"] for r in runs if r["candidates_per_seed"] == m) for m in per_seed}
    median_cpu = {m: statistics.median(r["cpu_seconds"] for r in runs if r["candidates_per_seed"] == m) for m in per_seed}
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": "bundled shapes model", "device": args.device, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "pairs": len(pairs), "samples_per_pair": args.samples_per_pair, "steps": args.steps, "repeats": args.repeats,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "runs": runs,
        "median_seconds": median, "median_cpu_seconds": median_cpu,
        "speedup_over_m1": {m: median[per_seed[0]] / median[m] for m in per_seed},
        "cpu_speedup_over_m1": {m: median_cpu[per_seed[0]] / median_cpu[m] for m in per_seed},
    }
    print(json.dumps({k: report[k] for k in ("median_seconds", "speedup_over_m1", "cpu_speedup_over_m1",
                                             "load_average_before", "load_average_after")}))
    if args.out is not None:
        atomic_write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
