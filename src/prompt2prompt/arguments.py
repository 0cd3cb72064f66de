"""One source of truth for the arguments of an edit: their defaults, ranges and names, and their checks.

`ARGUMENTS` is the table: for each argument its library name, the option key that sets it in
the command line, batch files and the web page, its command-line flag, the web page's field and
label, its default, and how a value given as text is checked (kind and range). The pipeline's
signature, `prompt2prompt.options` (the command line's and batch files' defaults), the web page's
request and sliders, and `LocalBlend` all read their defaults from it.

A library error about an argument is an `ArgumentError` whose ``.argument`` is the library's name
for it, so that the command line and the web page find the flag or the field it belongs to through
that attribute and the table, never through the message's text.

`number`, `fraction`, `integer`, `window` and `choice` are the one set of checks that the options,
the web page and the library share. Each takes the value, the argument it sets (carried by the
error), the name the user knows it by (which leads the message) and ``text``: True for what a person
typed or a JSON file holds (numbers may come as strings; a whole float counts as an integer),
False for a library argument (Python numbers only).

This module imports nothing else of the package, so every other module may import it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

#: The largest seed: ``torch.Generator.manual_seed`` takes a 64-bit signed integer.
MAX_INT64 = 2**63 - 1

#: Choices of the options that name one.
MODES = ("auto", "replace", "refine", "none")
INVERT_METHODS = ("null-text", "direct", "negative-prompt", "ddim")
DTYPES = ("float32", "float16", "bfloat16")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class ArgumentError(ValueError):
    """A bad argument value, raised before any work starts.

    Args:
        argument: the library's name of the argument (``"cross_replace_steps"``); a field of a
            `LocalBlend` is ``"local_blend.<field>"`` (``"local_blend.threshold"``). A key of `ARGUMENTS`
            (None only for an `options.OptionError` that is about no argument: a file, the device).
        message: what is wrong and how to fix it.
    """

    def __init__(self, argument: str | None, message: str):
        super().__init__(message)
        self.argument = argument


_SAME = object()  # `Argument.option_default` not given: the option's default is the library's


@dataclass(frozen=True)
class Argument:
    """One argument of an edit (a row of `ARGUMENTS`).

    Args:
        name: the library's name (the pipeline's keyword, ``local_blend.<field>``, or for an option
            the library does not have, the option's key).
        option: the key of the option that sets it in the command line, batch files and the web
            page's request (None: only the library has it).
        default: its default value, in the library's form.
        option_default: the option's default, in the options' canonical form, where it differs
            from ``default`` (the seed 0 for the library's fresh generator, ``{}`` for no re-weighting).
        flag: the command line's spelling of the option (``PROMPT`` for the positional prompt; None:
            no flag sets it).
        field: the web page's error slot beside the fields that set it (one of `web.FIELDS`; None:
            the page does not set it, so its errors go to ``general``).
        label: the web page's name for it (its messages start with it).
        kind: how a value given as text is checked: ``"integer"``, ``"number"``, ``"fraction"``,
            ``"window"`` or ``"choice"``; None where the options have a check of their own.
        what: how a message describes a valid value (``"a positive integer"``).
        minimum: smallest value allowed (integers and numbers).
        maximum: largest value allowed (None: no limit but the type's).
        choices: the values allowed (kind ``"choice"``).
        slider: the web page's slider, ``(minimum, maximum, step)``; the options accept any value
            the kind and range allow.
        library: whether the library takes it (False: an option of the command line only).
    """

    name: str
    option: str | None
    default: Any
    option_default: Any = _SAME
    flag: str | None = None
    field: str | None = None
    label: str | None = None
    kind: str | None = None
    what: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    slider: tuple[float, float, float] | None = None
    library: bool = True

    def __post_init__(self):
        if self.option_default is _SAME:
            object.__setattr__(self, "option_default", self.default)


#: The page's sliders of fractions: 0 to 1 in steps of 5% of the denoising steps.
_FRACTION_SLIDER = (0.0, 1.0, 0.05)

ARGUMENTS: dict[str, Argument] = {a.name: a for a in (
    # the prompts and the edit
    Argument("prompt", "prompt", None, flag="PROMPT", field="prompt", label="Source prompt"),
    Argument("edit_prompts", "to", None, flag="--to", field="edit_prompts", label="Target prompt"),
    Argument("edit", "mode", "auto", flag="--mode", field="mode", label="Edit mode", kind="choice", choices=MODES),
    Argument("cross_replace_steps", "cross_steps", 0.8, flag="--cross-steps", field="cross",
             label="Cross-attention replace steps", kind="window", slider=_FRACTION_SLIDER),
    Argument("cross_steps_word", "cross_steps_word", {}, flag="--cross-steps-word", field="cross", library=False),
    Argument("sweep", "sweep", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], flag="--cross-steps", library=False),
    Argument("self_replace_steps", "self_steps", 0.4, flag="--self-steps", field="self",
             label="Self-attention replace steps", kind="window", slider=_FRACTION_SLIDER),
    Argument("self_replace_max_res", None, None, field="self", kind="integer", what="a non-negative integer side", minimum=0),
    Argument("equalizer", "reweight", None, option_default={}, flag="--reweight", field="reweight", label="Re-weighting"),
    Argument("local_blend", "blend", None, flag="--blend", field="blend", label="Local blend words"),
    Argument("local_blend.threshold", "blend_threshold", 0.3, flag="--blend-threshold", field="blend",
             label="Local blend threshold", kind="fraction", slider=_FRACTION_SLIDER),
    Argument("local_blend.resolution", "blend_res", None, flag="--blend-res", field="blend", label="Local blend map side",
             kind="integer", what="a positive integer side of the cross-attention maps", minimum=1),
    # the paper's code starts blending after a fifth of the steps
    Argument("local_blend.start", None, 0.2, field="blend", kind="fraction"),
    # sampling; the page's sliders cover the usual counts and scales, the command line takes any
    Argument("num_inference_steps", "steps", 50, flag="--steps", field="sampling", label="Steps",
             kind="integer", what="a positive integer", minimum=1, slider=(1, 100, 1)),
    Argument("guidance_scale", "guidance", 7.5, flag="--guidance", field="sampling", label="Guidance",
             kind="number", what="a finite number", slider=(0.0, 15.0, 0.5)),
    # the library draws fresh noise without a generator; the options always seed one, from 0
    Argument("generator", "seed", None, option_default=0, flag="--seed", field="sampling", label="Seed",
             kind="integer", what="a non-negative integer", minimum=0, maximum=MAX_INT64),
    Argument("eta", None, 0.0, field="sampling", kind="fraction", what="a number in [0, 1]", minimum=0.0, maximum=1.0),
    Argument("height", None, None),
    Argument("width", None, None),
    Argument("negative_prompt", None, None),
    Argument("latents", None, None),
    Argument("output_type", None, "pil", kind="choice", choices=OUTPUT_TYPES),
    Argument("return_dict", None, True),
    Argument("return_attention", None, True),
    Argument("cross_attention_kwargs", None, None),
    Argument("truncate_prompts", None, False),
    # the attention pictures (`p2p attention`)
    Argument("return_self_attention", None, False),
    Argument("attention_res", "res", None, flag="--res", kind="integer", what="a positive integer side of the attention maps", minimum=1),
    Argument("top_k", "top_k", 6, flag="--top-k", kind="integer", what="a positive integer", minimum=1),
    # a real photo: the pipeline's `inversion`, and `Prompt2PromptPipeline.invert`'s own arguments
    Argument("inversion", None, None, flag="--image", field="image"),
    Argument("source", None, None),
    Argument("keep_source", None, False),
    Argument("source_device", None, None),
    Argument("image", "image", None, flag="--image", field="image", label="Photo"),
    # the option is None without a photo; with one, the method is the library's default
    Argument("method", "invert", "null-text", option_default=None, flag="--invert", field="image", label="Inversion",
             kind="choice", choices=INVERT_METHODS),
    Argument("num_inner_steps", None, 10, field="image"),
    Argument("early_stop_epsilon", None, 1e-5, field="image"),
    Argument("cuda_graph", None, False),
    # SDXL (`Prompt2PromptXLPipeline`): the second text encoder's prompts and the added conditions
    Argument("prompt_2", None, None),
    Argument("negative_prompt_2", None, None),
    Argument("original_size", None, None),
    Argument("crops_coords_top_left", None, (0, 0)),
    Argument("target_size", None, None),
    Argument("guidance_rescale", None, 0.0),
    # the model (the command line loads it; the web page is served with one)
    Argument("model", "model", None, flag="--model", library=False),
    Argument("dtype", "dtype", "float32", flag="--dtype", kind="choice", choices=DTYPES, library=False),
)}

#: The rows by option key.
OPTIONS: dict[str, Argument] = {a.option: a for a in ARGUMENTS.values() if a.option is not None}


def default(name: str) -> Any:
    """The default of the argument ``name`` (a library name, see `ARGUMENTS`), a fresh copy."""
    return copy.deepcopy(ARGUMENTS[name].default)


def option_default(key: str) -> Any:
    """The default of the option ``key`` (as `prompt2prompt.options` spells it), a fresh copy."""
    return copy.deepcopy(OPTIONS[key].option_default)


def argument_of(error: BaseException) -> Argument | None:
    """The row of the argument an error is about: its ``.argument`` in the table, else None."""
    return ARGUMENTS.get(getattr(error, "argument", None) or "")


# ============================================================================ checks


def shown(value) -> str:
    """A value as a message shows it: text as typed, a pair as ``START:END``, anything else its repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ":".join(shown(v) for v in value)
    return repr(value)


def _float(value, text: bool) -> float | None:
    """``value`` as a float, or None when it is not a number (bools never are; strings only as text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Real):
        try:
            return float(value)
        except OverflowError:
            return None
    if not text:
        return None
    try:
        return float(str(value).strip())
    except (ValueError, OverflowError):
        return None


def number(value, argument: str, name: str, what: str = "a finite number", *, text: bool = True) -> float:
    """A finite number.

    Raises:
        ArgumentError: ``"{name} must be {what}, got {value!r}"``.
    """
    result = _float(value, text)
    if result is None or not math.isfinite(result):
        raise ArgumentError(argument, f"{name} must be {what}, got {value!r}")
    return result


def fraction(value, argument: str, name: str, *, text: bool = True) -> float:
    """A number in [0, 1].

    Raises:
        ArgumentError: ``"{name} must be a number in [0, 1], got ..."``.
    """
    result = number(value, argument, name, "a number in [0, 1]", text=text)
    if not 0.0 <= result <= 1.0:
        raise ArgumentError(argument, f"{name} must be a number in [0, 1], got {shown(value)}")
    return result


def integer(value, argument: str, name: str, what: str, minimum: int = 0, maximum: int = MAX_INT64, *, text: bool = True) -> int:
    """A whole number in [minimum, maximum]; as text, ``7``, ``"7"`` and ``7.0`` count, ``7.5`` does not.

    Raises:
        ArgumentError: ``"{name} must be {what}, got {value!r}"`` (with ``up to {maximum}`` above it).
    """
    if isinstance(value, bool) or not isinstance(value, int) and not text:
        whole = None
    elif isinstance(value, float):
        whole = int(value) if value.is_integer() else None
    else:
        try:
            whole = int(value) if isinstance(value, int) else int(str(value).strip())
        except ValueError:
            whole = None
    if whole is None or whole < minimum:
        raise ArgumentError(argument, f"{name} must be {what}, got {value!r}")
    if whole > maximum:
        raise ArgumentError(argument, f"{name} must be {what} up to {maximum}, got {value!r}")
    return whole


def choice(value, argument: str, name: str, choices: Sequence[str]) -> str:
    """One of ``choices``, in any case and with spaces around it.

    Raises:
        ArgumentError: ``"{name} must be one of ..., got {value!r}"``.
    """
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in choices:
        raise ArgumentError(argument, f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return text


def window(value, argument: str, name: str, *, text: bool = True) -> tuple[float, float]:
    """An injection window: a fraction ``f`` of the steps (meaning ``(0, f)``) or a ``(start, end)``
    pair of fractions with ``start <= end``; as text also ``"f"`` and ``"START:END"``.

    Returns:
        ``(start, end)`` as floats.

    Raises:
        ArgumentError: not a fraction or a pair, not finite, outside [0, 1], or start after end.
    """
    pair_form, example = ("START:END", "0.2:0.8") if text else ("a (start, end) pair", "(0.2, 0.8)")
    if text and isinstance(value, str) and ":" in value:
        parts = value.split(":")
    elif isinstance(value, Sequence) and not isinstance(value, str):
        parts = list(value)
    else:
        parts = [0.0, value]
    numbers = [_float(p, text) for p in parts]
    if len(parts) != 2 or None in numbers:
        raise ArgumentError(argument, f"{name} must be a fraction of the steps like 0.8, or {pair_form} like {example}, got {value!r}")
    if not all(math.isfinite(v) for v in numbers):
        raise ArgumentError(argument, f"{name} must hold finite numbers in [0, 1], got {value!r}")
    start, end = numbers
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ArgumentError(argument, f"{name} {shown(value)} is outside [0, 1]; the fractions of the steps must lie in [0, 1], "
                                      f"e.g. 0.8 or {example}")
    if start > end:
        swapped = f"{end:g}:{start:g}" if text else f"({end:g}, {start:g})"
        rule = "START:END with START <= END" if text else "(start, end) with start <= end"
        raise ArgumentError(argument, f"{name} has start {start:g} after end {end:g}; give {rule}, e.g. {swapped}")
    return start, end
