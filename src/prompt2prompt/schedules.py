"""Step schedules: which denoising steps inject attention, as fractions of the steps.

The paper's Eq. for the injection window: ``Edit(M_t, M*_t, t) = M*_t if t < tau else M_t``.
A window ``(f0, f1)`` of ``T`` steps covers step indices ``[int(f0*T), int(f1*T))``, rounding as the
paper's code does; a single number ``f`` means ``(0, f)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .alignment import PromptTokens, positions_in_each
from .arguments import window

Window = float | tuple[float, float]


def parse_window(bounds, name: str, argument: str | None = None) -> tuple[float, float]:
    """Validate a fraction or a ``(start, end)`` pair of fractions of the denoising steps.

    Args:
        bounds: a number ``f`` (meaning ``(0, f)``) or a ``(start, end)`` pair of numbers in [0, 1].
        name: the setting's name, for the error messages.
        argument: the library name of the setting, which the error carries (default: ``name``).

    Returns:
        ``(start, end)`` as floats.

    Raises:
        ArgumentError: not numbers, outside [0, 1], or start > end (`arguments.window`).
    """
    return window(bounds, argument or name, name, text=False)


def step_window(bounds: tuple[float, float], num_steps: int) -> tuple[int, int]:
    """Step indices ``[int(f0*T), int(f1*T))`` of a window of fractions (paper's code rounding).

    Args:
        bounds: ``(f0, f1)`` fractions of the steps, as `parse_window` returns them.
        num_steps: the number of denoising steps ``T``.

    Returns:
        ``(first, stop)`` step indices; ``stop`` is excluded.
    """
    return int(bounds[0] * num_steps), int(bounds[1] * num_steps)


def cross_step_weights(
    targets: Sequence[PromptTokens],
    cross_replace_steps: Window | Mapping[str, Window],
    num_steps: int,
) -> torch.Tensor:
    """Per step, target and token: 1 where the source's cross-attention is injected, else 0.

    ``cross_replace_steps`` is one window for all tokens, or a dict of windows per word of the
    target prompts with ``"default_"`` for the rest (``(0, 1)`` when absent), as the paper's
    per-word injection (its Fig. 5 object preservation: ``{"default_": 0.0, "butterfly": 1.0}``).

    Args:
        targets: the tokenized target prompts (``max_length`` is taken from the first).
        cross_replace_steps: a window (fraction or ``(start, end)``) for all tokens, or a dict of
            word -> window; a word's window replaces the default on its tokens in every target that has it.
        num_steps: the number of denoising steps.

    Returns:
        ``(num_steps, num_targets, max_length)`` float tensor.

    Raises:
        ArgumentError: (of ``cross_replace_steps``) a bad window, or a word that is in none of the
            target prompts.
    """
    length = targets[0].max_length
    if isinstance(cross_replace_steps, Mapping):
        windows = dict(cross_replace_steps)
        default, name = windows.pop("default_", (0.0, 1.0)), "cross_replace_steps['default_']"
    else:
        windows, default, name = {}, cross_replace_steps, "cross_replace_steps"
    weights = torch.zeros(num_steps, len(targets), length)  # (steps, targets, tokens)
    start, end = step_window(parse_window(default, name, "cross_replace_steps"), num_steps)
    weights[start:end] = 1.0
    for word, bounds in windows.items():
        start, end = step_window(parse_window(bounds, f"cross_replace_steps[{word!r}]", "cross_replace_steps"), num_steps)
        for k, positions in enumerate(positions_in_each(list(targets), word, "cross_replace_steps")):
            weights[:, k, positions] = 0.0
            weights[start:end, k, positions] = 1.0
    return weights
