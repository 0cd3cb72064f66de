"""Prompt-to-Prompt image editing (Hertz et al., 2022) on Hugging Face diffusers."""

from .alignment import PromptTokens, tokenize_words
from .attention import P2PAttnProcessor, P2PController, p2p_attention
from .edits import EditMode, EditPlan, LocalBlend, build_edit_plan
from .finite import NonFiniteError
from .inversion import Inversion, InversionMethod, load_image
from .loading import load_pipeline, pipeline_class_for
from .model_folder import model_family
from .pipeline import AttentionMaps, Prompt2PromptPipeline, Prompt2PromptPipelineOutput
from .pipeline_xl import Prompt2PromptXLPipeline
from .source_pass import SourcePass

__version__ = "0.1.0"

__all__ = [
    "AttentionMaps",
    "EditMode",
    "EditPlan",
    "Inversion",
    "InversionMethod",
    "LocalBlend",
    "NonFiniteError",
    "P2PAttnProcessor",
    "P2PController",
    "Prompt2PromptPipeline",
    "Prompt2PromptPipelineOutput",
    "Prompt2PromptXLPipeline",
    "PromptTokens",
    "SourcePass",
    "build_edit_plan",
    "load_image",
    "load_pipeline",
    "model_family",
    "p2p_attention",
    "pipeline_class_for",
    "tokenize_words",
]
