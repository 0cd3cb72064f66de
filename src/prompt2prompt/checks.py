"""Checks of single argument values, shared by the pipeline's call and its ``invert``.

Each check raises `ArgumentError` naming the argument by its library name (see `arguments`), and
returns the value when it is good. Checks that need the model (sizes, latents, map sides) are
the pipeline's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

from .arguments import ArgumentError

#: The ``output_type`` values the pipeline accepts.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def positive_int(name: str, value) -> int:
    """``value`` when it is an integer >= 1 (not a bool).

    Args:
        name: the argument's library name (``"num_inference_steps"``).
        value: the value given.

    Raises:
        ArgumentError: ``value`` is not a positive integer.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(name, f"{name} must be a positive integer, got {value!r}")
    return value


def finite_number(name: str, value) -> Real:
    """``value`` when it is a finite real number (not a bool).

    Args:
        name: the argument's library name (``"guidance_scale"``).
        value: the value given.

    Raises:
        ArgumentError: ``value`` is not a finite number.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ArgumentError(name, f"{name} must be a finite number, got {value!r}")
    return value


def eta(value) -> Real:
    """``value`` when it is a finite number >= 0 (DDIM's eta).

    Raises:
        ArgumentError: of ``eta``.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ArgumentError("eta", f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {value!r}")
    return value


def early_stop_epsilon(value) -> Real:
    """``value`` when it is a number >= 0 (null-text inversion's early-stop threshold at step 0).

    Raises:
        ArgumentError: of ``early_stop_epsilon``.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
        raise ArgumentError("early_stop_epsilon", f"early_stop_epsilon must be a number >= 0, got {value!r}")
    return value


def one_generator(generator) -> torch.Generator | None:
    """The run's one generator: ``generator``, or its only item when it is a list of one (diffusers'
    form for one image).

    Raises:
        ArgumentError: of ``generator``, for anything else than None or one `torch.Generator`
            (the source and every target share its seed).
    """
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentError("generator", f"generator must be one torch.Generator (the source and every target share its seed), got {generator!r}")
    return generator


def output_type(value) -> str:
    """``value`` when it is one of `OUTPUT_TYPES`.

    Raises:
        ArgumentError: of ``output_type``.
    """
    if value not in OUTPUT_TYPES:
        raise ArgumentError("output_type", f"output_type must be 'pil', 'np', 'pt' or 'latent', got {value!r}")
    return value


def multiple_of(name: str, value, factor: int) -> int:
    """``value`` when it is a positive integer multiple of the VAE's factor ``factor``.

    Args:
        name: ``"height"`` or ``"width"``.
        value: the value given.
        factor: the VAE's downsampling factor (`Prompt2PromptPipeline.vae_scale_factor`).

    Raises:
        ArgumentError: of ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
        raise ArgumentError(name, f"{name} must be a positive multiple of {factor} (the VAE's factor), got {value!r}")
    return value


def self_replace_max_res(value, default_side: int) -> int:
    """The largest map side whose self-attention is injected: ``value``, or ``default_side`` for None.

    Raises:
        ArgumentError: of ``self_replace_max_res``, for anything else than None or an integer >= 0.
    """
    if value is None:
        return default_side
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArgumentError("self_replace_max_res", f"self_replace_max_res must be a non-negative integer side or None, got {value!r}")
    return value


def map_side(name: str, side: int, sides: Sequence[int]) -> int:
    """``side`` when it is one of the model's cross-attention map ``sides`` at this size.

    Args:
        name: ``"attention_res"`` or ``"local_blend.resolution"``.
        side: the map side asked for.
        sides: the model's cross-attention map sides at this size (`attention.attention_sides`).

    Raises:
        ArgumentError: of ``name``; the message starts as the command line and the page expect
            (``attention_res 7 ...``, ``LocalBlend resolution 7 ...``).
    """
    if side not in sides:
        what = "LocalBlend resolution" if name == "local_blend.resolution" else name
        raise ArgumentError(name, f"{what} {side} is not a cross-attention map side of this model at this size; use one of {list(sides)}")
    return side


def closest_side(sides: Sequence[int], wanted: int) -> int:
    """The side of ``sides`` nearest to ``wanted``, the larger one on a tie."""
    return min(sides, key=lambda s: (abs(s - wanted), -s))
