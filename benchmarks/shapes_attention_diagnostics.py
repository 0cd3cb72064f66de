#!/usr/bin/env python
"""Why the bundled model's cross-attention maps do not bind words to pixels: two diagnostics.

1. Per cross-attention layer, for one caption on pure noise at three timesteps: each head's
   attention over the tokens, as its entropy divided by log(tokens) (1.0 = uniform), the mean of
   its largest probability (uniform: 1 / tokens), and the spread of the logits over the tokens.
2. The text encoder's output states: cosine similarity between the states of one caption's tokens,
   and between two captions that differ only in their colour words, position by position. If the
   state of "red" equals the state of "green" at the same position, no key can tell them apart.

    python benchmarks/shapes_attention_diagnostics.py [--model DIR]

The spatial counterpart (do the maps put the object's words on the object?) is the evaluation's
``localisation`` part: ``python -m prompt2prompt.shapes.evaluate --parts localisation --samples 32``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from prompt2prompt import Prompt2PromptPipeline
from prompt2prompt.alignment import tokenize_words


def head_statistics(pipe, caption: str, timesteps=(900, 500, 100), seed: int = 0) -> list[tuple]:
    """``(timestep, layer key, pixels, heads, mean normalised entropy, mean max probability, logit spread)``
    for every cross-attention layer, from the layer's own ``to_q``/``to_k`` outputs (forward hooks)."""
    unet = pipe.unet
    layers = {n: m for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False)}
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in layers.items():
        for part in ("to_q", "to_k"):
            hooks.append(getattr(m, part).register_forward_hook(lambda mod, inp, out, key=f"{name}.{part}": seen.__setitem__(key, out)))
    tokens = tokenize_words(caption, pipe.tokenizer)
    rows = []
    try:
        with torch.no_grad():
            states, _ = pipe.encode_prompt([tokens], "cpu", do_classifier_free_guidance=False)  # (1, tokens, dim)
            side = unet.config.sample_size
            latents = torch.randn(1, unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))
            for t in timesteps:
                unet(latents, t, encoder_hidden_states=states)
                for name, m in layers.items():
                    q, k = seen[f"{name}.to_q"], seen[f"{name}.to_k"]  # (1, pixels, heads * dim), (1, tokens, heads * dim)
                    d = q.shape[-1] // m.heads
                    q = q.view(1, -1, m.heads, d).transpose(1, 2)  # (1, heads, pixels, dim)
                    k = k.view(1, -1, m.heads, d).transpose(1, 2)  # (1, heads, tokens, dim)
                    logits = (q @ k.transpose(-1, -2)) * m.scale  # (1, heads, pixels, tokens)
                    p = logits.softmax(-1)
                    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])  # (1, heads, pixels)
                    rows.append((t, name, p.shape[2], m.heads, float(entropy.mean()), float(p.amax(-1).mean()), float(logits.std(-1).mean())))
    finally:
        for h in hooks:
            h.remove()
    return rows


def state_similarity(pipe, a: str, b: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cosine similarities of the text encoder's output states: ``(tokens, tokens)`` within caption
    ``a``, and ``(tokens,)`` between ``a`` and ``b`` at each position (same token count), with
    ``a``'s token strings."""
    ta, tb = tokenize_words(a, pipe.tokenizer), tokenize_words(b, pipe.tokenizer)
    if len(ta.ids) != len(tb.ids):
        raise ValueError("the two captions must have the same number of tokens")
    with torch.no_grad():
        s, _ = pipe.encode_prompt([ta, tb], "cpu", do_classifier_free_guidance=False)  # (2, length, dim)
    n = torch.nn.functional.normalize(s[:, : len(ta.ids)], dim=-1)  # (2, tokens, dim)
    within = (n[0] @ n[0].T).numpy()  # (tokens, tokens)
    across = (n[0] * n[1]).sum(-1).numpy()  # (tokens,)
    return within, across, pipe.tokenizer.convert_ids_to_tokens(list(ta.ids))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a diffusers folder (default: the bundled model)")
    parser.add_argument("--caption", default="a big red star on a blue background")
    parser.add_argument("--other", default="a big green star on a yellow background", help="the caption with other colour words")
    args = parser.parse_args(argv)
    pipe = Prompt2PromptPipeline.from_pretrained(args.model)
    print(f"caption: {args.caption!r}; uniform attention over {pipe.tokenizer.model_max_length} tokens: "
          f"normalised entropy 1.000, max probability {1 / pipe.tokenizer.model_max_length:.3f}")
    print(f"{'t':>4}  {'layer':52s} {'pixels':>6} {'heads':>5}  entropy  max prob  logit spread")
    for t, name, pixels, heads, ent, top, spread in head_statistics(pipe, args.caption):
        print(f"{t:>4}  {name:52s} {pixels:>6} {heads:>5}  {ent:7.3f}  {top:8.3f}  {spread:12.3f}")
    within, across, toks = state_similarity(pipe, args.caption, args.other)
    np.set_printoptions(precision=2, suppress=True, linewidth=200)
    print("\ntext states: cosine similarity between the tokens of the caption", toks)
    print(within)
    print(f"\nposition by position against {args.other!r}:")
    print(across)


if __name__ == "__main__":
    main()
