"""Step schedules: which denoising steps inject attention, as fractions of the steps.

The paper's Eq. for the injection window: ``Edit(M_t, M*_t, t) = M*_t if t < tau else M_t``.
A window ``(f0, f1)`` of ``T`` steps covers step indices ``[int(f0*T), int(f1*T))``, rounding as the
paper's code does; a single number ``f`` means ``(0, f)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real

import torch

from .alignment import PromptTokens, positions_in_each
from .arguments import ArgumentError, window

Window = float | tuple[float, float]


def per_target(value, num_targets: int, argument: str) -> list | None:
    """The windows of a setting given one per target prompt, or None when ``value`` is one window for all.

    A ``list`` holds one window per target (each what a single target takes: a fraction, a
    ``(start, end)`` pair or a per-word dict), as the paper's code keeps its alphas per target. For
    compatibility a list of two numbers is still one ``(start, end)`` window when there are not
    exactly two targets; with two targets it is one fraction per target (give a tuple for a window).

    Args:
        value: the setting (``cross_replace_steps`` or ``self_replace_steps``).
        num_targets: the number of target prompts.
        argument: the setting's library name, which the error carries.

    Returns:
        The list of ``num_targets`` windows, or None.

    Raises:
        ArgumentError: (of ``argument``) a list whose length is not the number of targets.
    """
    if not isinstance(value, list):
        return None
    pair = len(value) == 2 and all(isinstance(v, Real) and not isinstance(v, bool) for v in value)
    if pair and num_targets != 2:
        return None
    if len(value) != num_targets:
        raise ArgumentError(argument, f"{argument} gives {len(value)} windows for {num_targets} target prompt"
                                      f"{'s' if num_targets != 1 else ''}; give one window per target prompt "
                                      f"(a list of {num_targets}), or one window for all of them (a fraction like 0.8 "
                                      f"or a (start, end) tuple)")
    return list(value)


def self_step_windows(self_replace_steps, num_targets: int, num_steps: int) -> list[tuple[int, int]]:
    """The self-attention injection window of each target as step indices ``(first, stop)``.

    Args:
        self_replace_steps: one window for all targets, or a list of one per target (`per_target`).
        num_targets: the number of target prompts.
        num_steps: the number of denoising steps.

    Raises:
        ArgumentError: (of ``self_replace_steps``) a bad window or a list of the wrong length.
    """
    windows = per_target(self_replace_steps, num_targets, "self_replace_steps")
    if windows is None:
        return [step_window(parse_window(self_replace_steps, "self_replace_steps"), num_steps)] * num_targets
    return [step_window(parse_window(w, f"self_replace_steps[{k}]", "self_replace_steps"), num_steps) for k, w in enumerate(windows)]


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
    cross_replace_steps: Window | Mapping[str, Window] | list,
    num_steps: int,
) -> torch.Tensor:
    """Per step, target and token: 1 where the source's cross-attention is injected, else 0.

    ``cross_replace_steps`` is one window for all tokens, or a dict of windows per word of the
    target prompts with ``"default_"`` for the rest (``(0, 1)`` when absent), as the paper's
    per-word injection (its Fig. 5 object preservation: ``{"default_": 0.0, "butterfly": 1.0}``).
    A list gives one such setting per target prompt (`per_target`); a word of a target's dict is
    looked up in that target only.

    Args:
        targets: the tokenized target prompts (``max_length`` is taken from the first).
        cross_replace_steps: a window (fraction or ``(start, end)``) for all tokens, or a dict of
            word -> window; a word's window replaces the default on its tokens in every target that has it.
        num_steps: the number of denoising steps.

    Returns:
        ``(num_steps, num_targets, max_length)`` float tensor.

    Raises:
        ArgumentError: (of ``cross_replace_steps``) a bad window, a word that is in none of the
            target prompts, or a list whose length is not the number of targets.
    """
    windows = per_target(cross_replace_steps, len(targets), "cross_replace_steps")
    if windows is not None:
        weights = [_cross_weights([t], w, num_steps, f"cross_replace_steps[{k}]") for k, (t, w) in enumerate(zip(targets, windows))]
        return torch.cat(weights, dim=1)  # (steps, targets, tokens)
    return _cross_weights(targets, cross_replace_steps, num_steps, "cross_replace_steps")


def _cross_weights(targets: Sequence[PromptTokens], cross_replace_steps, num_steps: int, label: str) -> torch.Tensor:
    """`cross_step_weights` of one setting for all of ``targets``; ``label`` names it in messages."""
    length = targets[0].max_length
    if isinstance(cross_replace_steps, Mapping):
        windows = dict(cross_replace_steps)
        default, name = windows.pop("default_", (0.0, 1.0)), f"{label}['default_']"
    else:
        windows, default, name = {}, cross_replace_steps, label
    weights = torch.zeros(num_steps, len(targets), length)  # (steps, targets, tokens)
    start, end = step_window(parse_window(default, name, "cross_replace_steps"), num_steps)
    weights[start:end] = 1.0
    for word, bounds in windows.items():
        start, end = step_window(parse_window(bounds, f"{label}[{word!r}]", "cross_replace_steps"), num_steps)
        for k, positions in enumerate(positions_in_each(list(targets), word, "cross_replace_steps")):
            weights[:, k, positions] = 0.0
            weights[start:end, k, positions] = 1.0
    return weights
