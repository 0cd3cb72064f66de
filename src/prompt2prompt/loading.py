"""Which pipeline a model needs, and loading it: one place for the command line and the web page.

The choice reads only the model folder's own metadata (`model_folder.model_family`): an SDXL
folder loads `Prompt2PromptXLPipeline`, anything else (a Stable Diffusion folder, a hub id, the
bundled shapes model) `Prompt2PromptPipeline`.
"""

from __future__ import annotations

import os

from .model_folder import model_family

def pipeline_class_for(model: str | os.PathLike | None):
    """`Prompt2PromptXLPipeline` for an SDXL folder, else `Prompt2PromptPipeline`.

    Args:
        model: a local diffusers folder, a hub id, or None (the bundled shapes model).
    """
    from .pipeline import Prompt2PromptPipeline
    from .pipeline_xl import Prompt2PromptXLPipeline

    return Prompt2PromptXLPipeline if model_family(model) == "sdxl" else Prompt2PromptPipeline


def load_pipeline(model: str | os.PathLike | None = None, *args, allow_pickle: bool = False, **kwargs):
    """Load ``model`` with the pipeline its folder needs (`pipeline_class_for`).

    Args:
        model: a local diffusers folder, a hub id, or None (the bundled shapes model).
        *args: passed on to ``from_pretrained``.
        allow_pickle: allow pickle (``.bin``) checkpoints.
        **kwargs: passed on to ``from_pretrained`` (e.g. ``torch_dtype``).

    Returns:
        The loaded pipeline; its ``model_family`` is ``"sd"`` or ``"sdxl"``.
    """
    return pipeline_class_for(model).from_pretrained(model, *args, allow_pickle=allow_pickle, **kwargs)

