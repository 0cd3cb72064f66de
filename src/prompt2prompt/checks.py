"""Checks of the pipeline's own argument values, shared by its call and its ``invert``.

They are built on the one set of value checks in `arguments` (`arguments.number`,
`arguments.integer`, ...), with ``text=False``: a library value must already be a number, never
a string that reads as one. Each raises `ArgumentError` naming the argument by its library name,
and returns the value when it is good.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch

from .arguments import OUTPUT_TYPES, ArgumentError, integer, number


def positive_int(name: str, value) -> int:
    """``value`` when it is an integer >= 1 (not a bool).

    Args:
        name: the argument's library name (``"num_inference_steps"``).
        value: the value given.

    Raises:
        ArgumentError: ``value`` is not a positive integer.
    """
    return integer(value, name, name, "a positive integer", minimum=1, text=False)


def finite_number(name: str, value) -> Real:
    """``value`` when it is a finite real number (not a bool).

    Args:
        name: the argument's library name (``"guidance_scale"``).
        value: the value given.

    Raises:
        ArgumentError: ``value`` is not a finite number.
    """
    number(value, name, name, text=False)
    return value


def eta(value) -> Real:
    """``value`` when it is a number in [0, 1] (DDIM's eta).

    Above 1 the step's noise variance can exceed what the DDIM update leaves room for (the square
    root of a negative number), and the images come out NaN.

    Raises:
        ArgumentError: of ``eta``.
    """
    what = "a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise)"
    if not 0 <= number(value, "eta", "eta", what, text=False) <= 1:
        raise ArgumentError("eta", f"eta must be {what}, got {value!r}")
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
    what = f"a positive multiple of {factor} (the VAE's factor)"
    if integer(value, name, name, what, minimum=1, text=False) % factor:
        raise ArgumentError(name, f"{name} must be {what}, got {value!r}")
    return value


def self_replace_max_res(value, default_side: int, sides: Sequence[int]) -> int:
    """The largest map side whose self-attention is injected: ``value``, or ``default_side`` for None.

    Args:
        value: the side asked for: None, 0 (no self-attention injection) or one of ``sides``.
        default_side: the side None stands for (not checked: the nearest smaller sides are injected).
        sides: the model's attention map sides at this size (`attention.attention_sides`).

    Raises:
        ArgumentError: of ``self_replace_max_res``, for anything else than None, 0 or a side the
            model has; the message lists the sides it has.
    """
    if value is None:
        return default_side
    integer(value, "self_replace_max_res", "self_replace_max_res", "a non-negative integer side or None", text=False)
    if value and value not in sides:
        raise ArgumentError("self_replace_max_res", f"self_replace_max_res {value} is not an attention map side of this model at "
                            f"this size; use one of {list(sides)}, or 0 for no self-attention injection")
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
