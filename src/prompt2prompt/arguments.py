"""One source of truth for the arguments of an edit: their defaults, and the error that names one.

The pipeline's signature, the command line, batch files and the web page all read their defaults
from `ARGUMENTS`; a library error about an argument is an `ArgumentError` whose ``.argument`` is the
library's name for it, so that the command line and the web page find the flag or the field it
belongs to through that attribute, never through the message's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ArgumentError(ValueError):
    """A bad argument value, raised before any work starts.

    Args:
        argument: the library's name of the argument (``"cross_replace_steps"``); a field of a
            `LocalBlend` is ``"local_blend.<field>"`` (``"local_blend.threshold"``).
        message: what is wrong and how to fix it.
    """

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


@dataclass(frozen=True)
class Argument:
    """One argument of an edit.

    Args:
        name: the library's name (the pipeline's keyword, or ``local_blend.<field>``).
        option: the key of the option that sets it in the command line, batch files and the web
            page's request (None: the library alone has it).
        default: its default value, in the library's form.
    """

    name: str
    option: str | None
    default: Any


ARGUMENTS: dict[str, Argument] = {a.name: a for a in (
    Argument("prompt", "prompt", None),
    Argument("edit_prompts", "to", None),
    Argument("edit", "mode", "auto"),
    Argument("cross_replace_steps", "cross_steps", 0.8),
    Argument("self_replace_steps", "self_steps", 0.4),
    Argument("self_replace_max_res", None, None),
    Argument("equalizer", "reweight", None),
    Argument("local_blend", "blend", None),
    Argument("local_blend.threshold", "blend_threshold", 0.3),
    Argument("local_blend.resolution", "blend_res", None),
    Argument("num_inference_steps", "steps", 50),
    Argument("guidance_scale", "guidance", 7.5),
    Argument("generator", "seed", None),
    Argument("attention_res", "res", None),
    Argument("height", None, None),
    Argument("width", None, None),
    Argument("negative_prompt", None, None),
    Argument("latents", None, None),
    Argument("eta", None, 0.0),
    Argument("output_type", None, "pil"),
    Argument("return_self_attention", None, False),
    Argument("truncate_prompts", None, False),
    Argument("inversion", None, None),
    # Pipeline.invert's own arguments
    Argument("image", "image", None),
    Argument("method", "invert", "null-text"),
    Argument("num_inner_steps", None, 10),
    Argument("early_stop_epsilon", None, 1e-5),
    # the attention pictures (`p2p attention`)
    Argument("top_k", "top_k", 6),
)}


def default(name: str) -> Any:
    """The default of the argument ``name`` (a library name, see `ARGUMENTS`)."""
    return ARGUMENTS[name].default
