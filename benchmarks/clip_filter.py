#!/usr/bin/env python
"""Seconds per candidate of ``p2p dataset``'s filters: the shapes detector and the CLIP filter.

The CLIP model is random (weights do not change the cost), built from ``transformers``' own
``CLIPConfig`` defaults (the ViT-B/32 shape) or, with ``--shape vit-l-14``, with the sizes of
``openai/clip-vit-large-patch14``'s config (the model InstructPix2Pix filtered with). A candidate
is two 64 px images (the bundled model's size; the processor resizes them to the model's) and its
pair's captions (embedded once a pair, as `ClipScorer` does).

Examples::

    OMP_NUM_THREADS=1 python benchmarks/clip_filter.py --threads 1 --candidates 8
    python benchmarks/clip_filter.py --shape vit-l-14 --device cuda --candidates 32 --json clip.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

#: ``openai/clip-vit-large-patch14``'s config.json sizes (the rest: CLIPConfig's defaults).
VIT_L_14 = {"text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                            "projection_dim": 768},
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                              "image_size": 224, "patch_size": 14, "projection_dim": 768},
            "projection_dim": 768}


def clip_scorer(shape: str, device: str):
    """A random CLIP of ``shape`` with the test suite's offline tokenizer, as a `ClipScorer`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from prompt2prompt.clip_filter import ClipScorer, image_processor_class

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_clip_tokenizer_files

    folder = build_clip_tokenizer_files(Path(tempfile.mkdtemp()))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    config = CLIPConfig(**(VIT_L_14 if shape == "vit-l-14" else {}))
    torch.manual_seed(0)
    model = CLIPModel(config).eval().to(device)
    size = config.vision_config.image_size
    processor = image_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return ClipScorer(model, tokenizer, processor, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("vit-b-32", "vit-l-14"), default="vit-b-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--candidates", type=int, default=8, help="candidates timed (after one warm-up)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from prompt2prompt.dataset import DetectorScorer, Pair

    pair = Pair(1, "a red circle on a blue background", "a red square on a blue background")
    rng = np.random.default_rng(0)
    images = [[PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
              for _ in range(args.candidates + 1)]
    results = {"shape": args.shape, "device": args.device, "threads": torch.get_num_threads(), "candidates": args.candidates}
    for name, scorer in (("detector", DetectorScorer()), ("clip", clip_scorer(args.shape, args.device))):
        seconds = []
        for before, after in images:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            scorer.score(before, after, pair)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        results[name] = {"median_s": statistics.median(seconds[1:]), "min_s": min(seconds[1:]), "max_s": max(seconds[1:]),
                         "first_s": seconds[0]}
        print(f"{name:8s} {results[name]['median_s'] * 1000:8.1f} ms a candidate (median of {args.candidates}; "
              f"min {results[name]['min_s'] * 1000:.1f}, max {results[name]['max_s'] * 1000:.1f}; first {seconds[0] * 1000:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
