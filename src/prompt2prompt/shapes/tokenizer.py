"""A CLIP-format BPE vocabulary learned from the shapes world's captions.

The files (``vocab.json``, ``merges.txt``) load with ``transformers.CLIPTokenizer`` like any
Stable Diffusion tokenizer. The vocabulary keeps CLIP's layout: the 256 byte symbols, the same with
the end-of-word mark ``</w>``, one entry per merge, then the start and end tokens; so any text
tokenizes, and words that are rare in the captions split into several tokens.

    python -m prompt2prompt.shapes.tokenizer OUT_DIR [--merges N] [--captions N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

END = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern, ASCII form: contractions, letter runs, single digits, punctuation runs.
_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def word_counts(texts: Iterable[str]) -> Counter:
    """Pre-token frequencies, lower-cased as CLIP does."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(_PRETOKEN.findall(text.lower()))
    return counts


def learn_merges(counts: Counter, num_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Greedy BPE (Sennrich et al., 2016): repeatedly merge the most frequent adjacent pair.

    Words end with ``</w>`` on their last symbol, as in CLIP. Ties break by the pair itself, so
    the result is deterministic.
    """
    words = {tuple(w[:-1]) + (w[-1] + END,): c for w, c in counts.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for symbols, c in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best, freq = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if freq < min_frequency:
            break
        merges.append(best)
        merged = {}
        for symbols, c in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = c
        words = merged
    return merges


def write_tokenizer(out_dir: str | os.PathLike, merges: list[tuple[str, str]], model_max_length: int) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (atomically, file by file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = symbols + [s + END for s in symbols]
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            vocab.append(a + b)
            seen.add(a + b)
    vocab += [BOS, EOS]
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    files = {
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2),
    }
    for name, text in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return out


def build_from_world(out_dir: str | os.PathLike, num_merges: int = 110, num_captions: int = 20000, model_max_length: int = 32) -> Path:
    """Learn the BPE from ``num_captions`` training captions of the shapes world and write it."""
    from . import world

    captions = [world.sample_spec(seed, "train").caption for seed in range(num_captions)]
    return write_tokenizer(out_dir, learn_merges(word_counts(captions), num_merges), model_max_length)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--merges", type=int, default=110)
    parser.add_argument("--captions", type=int, default=20000)
    parser.add_argument("--max-length", type=int, default=32)
    args = parser.parse_args(argv)
    print(build_from_world(args.out_dir, args.merges, args.captions, args.max_length))


if __name__ == "__main__":
    main()
