"""`Prompt2PromptPipeline`: Algorithm 1 of Prompt-to-Prompt as a diffusers pipeline.

The call runs the stages diffusers' Stable Diffusion pipeline names (`check_inputs`,
`encode_prompt`, `prepare_latents`, `prepare_extra_step_kwargs`, `decode_latents`) around the
edit: plan it (`edits.build_edit_plan`), install the attention processors (`attention.p2p_attention`),
denoise every prompt together, blend, decode. `Prompt2PromptPipeline.invert` builds an `Inversion`
of a real image on the same stages and the formulas of `inversion`.
"""

import inspect
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as _transformers_logging

# Without torchvision, transformers announces a fallback on first access to CLIPImageProcessor (the
# safety checker's feature extractor, optional here); keep that harmless notice out of every import.
_verbosity = _transformers_logging.get_verbosity()
_transformers_logging.set_verbosity_error()
try:
    from transformers import CLIPImageProcessor
finally:
    _transformers_logging.set_verbosity(_verbosity)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import checks
from .alignment import PromptTokens, tokenize_words
from .arguments import ArgumentError, default
from .attention import P2PController, attention_sides, p2p_attention
from .edit_ops import blend_latents, local_blend_mask
from .edits import EditMode, EditPlan, LocalBlend, build_edit_plan
from .finite import FiniteWatch, check_pixels
from .inversion import (
    Inversion,
    InversionMethod,
    alpha_at,
    capture_sample,
    ddim_inversion,
    frozen,
    graphed_eps,
    inversion_scheduler,
    load_image,
    null_text_optimisation,
    predict_eps,
    unet_eps,
)
from .model_folder import check_model_folder, folder_vocabulary, model_family as folder_family
from .schedules import parse_window, step_window
from .source_pass import (
    SourcePass,
    check_budget,
    check_initial_latents,
    check_is_pass,
    check_same_pass,
    covering_window,
    fill_defaults,
    model_identity,
    scheduler_identity,
    source_row_values,
    tensor_digest,
)

logger = logging.getLogger(__name__)

#: The default side of the attention maps that LocalBlend reads and the call records, and of
#: ``self_replace_max_res``, is the latent's side over this: the paper's code uses the 16 x 16 maps
#: of Stable Diffusion's 64 x 64 latent. The nearest side the UNet has is taken.
MAP_SIDE_DIVISOR = 4
#: Seeds drawn from torch's global generator for a stochastic sampler's step noise lie below this
#: (any value `torch.Generator.manual_seed` takes; ``torch.randint`` needs it to fit an int64).
_SEED_BOUND = 2**62


@dataclass
class AttentionMaps:
    """Cross-attention maps of every prompt, per token, averaged over heads, layers and steps.

    Attributes:
        maps: ``(prompts, height, width, tokens)`` float32 at side ``resolution``.
        prompts: the tokenized prompts, source first (words, token positions, ids).
        resolution: the side of the maps.
    """

    maps: torch.Tensor
    prompts: list[PromptTokens]
    resolution: int

    def word(self, prompt_index: int, word: str | int) -> torch.Tensor:
        """``(height, width)`` map of a word of prompt ``prompt_index``: the sum over its tokens.

        Args:
            prompt_index: index into ``prompts``: 0 for the source, ``k`` for the ``k``-th target.
            word: a word, phrase or word index of that prompt, as `PromptTokens.positions` takes it.

        Returns:
            ``(height, width)`` float32 map at side ``resolution``.

        Raises:
            ValueError: the word is not in that prompt (see `PromptTokens.positions`).
        """
        positions = self.prompts[prompt_index].positions(word)
        return self.maps[prompt_index][..., positions].sum(-1)


@dataclass
class Prompt2PromptPipelineOutput(BaseOutput):
    """Output of `Prompt2PromptPipeline`.

    Args:
        images: the source image followed by one image per target prompt (PIL images, a numpy
            array ``(prompts, height, width, 3)``, or latents for ``output_type="latent"``).
        attention: the recorded `AttentionMaps`, or None when ``return_attention=False``.
        self_attention: with ``return_self_attention=True``, the source prompt's self-attention
            ``(pixels, pixels)`` (rows sum to 1; pixels row-major at side ``self_attention_res``),
            averaged over heads, layers and steps; else None.
        self_attention_res: the side of ``self_attention``.
        edit_mode: the edit that ran (``auto`` resolved to ``replace`` or ``refine``); None without targets.
        nsfw_content_detected: the safety checker's verdicts when the pipeline has one.
        source_pass: with ``keep_source=True``, the source row's `SourcePass` kept while the batch
            ran (the one ``pipe.source`` makes with the call's windows); else None.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    attention: AttentionMaps | None
    edit_mode: EditMode | None
    nsfw_content_detected: list[bool] | None = None
    self_attention: torch.Tensor | None = None
    self_attention_res: int | None = None
    source_pass: SourcePass | None = None


def same_noise_generators(generator: torch.Generator, n: int) -> list[torch.Generator]:
    """``n`` copies of ``generator``'s state, for one stochastic scheduler step of ``n`` prompt rows.

    Prompt-to-Prompt runs every prompt with the same seed (Hertz et al., 2022, Algorithm 1), so a
    sampler that adds noise at each step (DDPM, Euler ancestral, DDIM with ``eta > 0``) must add
    the same noise to every row. diffusers' ``randn_tensor`` draws row ``i`` from ``generator[i]``,
    so equal copies give equal rows, and row 0 is what ``generator`` alone would draw for one image.
    After the step, ``generator.set_state(copies[0].get_state())`` moves the original past the draw.

    Args:
        generator: the run's generator (its device decides the copies').
        n: the number of prompt rows the step denoises.

    Returns:
        ``n`` new generators, each in ``generator``'s current state (``generator`` is not advanced).
    """
    state = generator.get_state()
    return [torch.Generator(device=generator.device).set_state(state) for _ in range(n)]


def scheduler_step(scheduler, noise: torch.Tensor, t, latents: torch.Tensor, extra: Mapping) -> torch.Tensor:
    """One scheduler step of every prompt row, with one noise draw for all of them.

    Args:
        scheduler: the call's scheduler.
        noise: the guided noise prediction ``(prompts, C, h, w)``.
        t: the step's timestep.
        latents: ``(prompts, C, h, w)``.
        extra: `Prompt2PromptPipeline.prepare_extra_step_kwargs`; its ``generator``, when there is
            one, draws the step's noise once for all rows (`same_noise_generators`) and is advanced
            past that draw.

    Returns:
        The latents of the next step ``(prompts, C, h, w)``.
    """
    kwargs = dict(extra)
    generator = extra.get("generator")
    if generator is not None:
        kwargs["generator"] = same_noise_generators(generator, latents.shape[0])
    latents = scheduler.step(noise, t, latents, **kwargs, return_dict=False)[0]
    if generator is not None:
        generator.set_state(kwargs["generator"][0].get_state())
    return latents


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales, the ``timestep_cond`` of a guidance-distilled UNet.

    Latent Consistency Models (Luo et al., 2023, "Latent Consistency Models", section 4.2) distil
    classifier-free guidance into the UNet: the scale ``w`` is an input, embedded like a timestep
    and added to the timestep embedding (the UNet's ``time_cond_proj_dim`` is this embedding's
    width). The embedding is the Fourier one of Variational Diffusion Models (Kingma et al., 2021;
    google-research/vdm ``model_vdm.py``, ``get_timestep_embedding``) of ``1000 * w``:
    ``[sin(1000 w f_k), cos(1000 w f_k)]`` with ``f_k = 10000^(-k / (dim/2 - 1))``, ``k < dim/2``,
    and a zero column when ``dim`` is odd. diffusers' LCM pipelines pass ``w = guidance_scale - 1``.

    Args:
        w: ``(rows,)`` guidance values.
        dim: the embedding width (``unet.config.time_cond_proj_dim``).

    Returns:
        ``(rows, dim)`` float32.
    """
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) / (half - 1) * torch.arange(half, dtype=torch.float32))  # (half,)
    angles = 1000.0 * w.float()[:, None] * freqs[None, :]  # (rows, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (rows, 2 * half)
    return torch.nn.functional.pad(emb, (0, dim % 2))  # (rows, dim)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al., 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", section 3.4): the guided prediction scaled to the conditional prediction's standard
    deviation per row, mixed with the unscaled one by ``rescale``.

    Args:
        guided: the guided noise prediction ``(prompts, C, h, w)``.
        cond: the conditional prediction ``(prompts, C, h, w)``.
        rescale: the mix, 0 (no rescale) to 1 (fully rescaled).

    Returns:
        ``(prompts, C, h, w)``.
    """
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)  # (prompts, 1, 1, 1)
    std_guided = guided.std(dim=dims, keepdim=True)  # (prompts, 1, 1, 1)
    rescaled = guided * (std_cond / std_guided)  # (prompts, C, h, w)
    return rescale * rescaled + (1 - rescale) * guided


@dataclass(frozen=True)
class CheckedInputs:
    """A call's arguments after `Prompt2PromptPipeline.check_inputs`: tokenized, defaults resolved.

    Attributes:
        source: the tokenized source prompt.
        targets: the tokenized target prompts (none: the source alone is generated).
        mode: the `EditMode` asked for (``auto`` is resolved by the plan).
        num_inference_steps: denoising steps (the table's default or the inversion's when not given).
        guidance_scale: classifier-free guidance scale (likewise).
        height: image height in pixels.
        width: image width in pixels.
        latent_hw: the latent ``(height, width)``: the image's over the VAE's factor.
        generator: the run's one generator, or None.
        negative_ids: token ids of the unconditional prompt, one row per prompt.
        self_replace_max_res: largest map side whose self-attention is injected.
        blend_res: the map side LocalBlend reads, or None without ``local_blend``.
        record_res: the side of the recorded cross-attention maps, or None when none are returned.
        self_res: the side of the recorded self-attention, or None when it is not returned.
        guidance_embedding_dim: the UNet's ``time_cond_proj_dim`` when it takes the guidance
            scale as an input (a guidance-distilled UNet, LCM), else None.
    """

    source: PromptTokens
    targets: list[PromptTokens]
    mode: EditMode
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    latent_hw: tuple[int, int]
    generator: torch.Generator | None
    negative_ids: list[list[int]]
    self_replace_max_res: int
    blend_res: int | None = None
    record_res: int | None = None
    self_res: int | None = None
    guidance_embedding_dim: int | None = None

    @property
    def record_sides(self) -> set[int]:
        """The map sides whose cross-attention the call accumulates: the recorded one and LocalBlend's."""
        return {s for s in (self.record_res, self.blend_res) if s is not None}

    @property
    def prompts(self) -> list[PromptTokens]:
        """The source followed by the targets: the rows of every batch."""
        return [self.source, *self.targets]

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the unconditional half runs: at a scale <= 1 guidance adds nothing to the
        conditional prediction, or takes from it (diffusers' convention), and a guidance-distilled
        UNet takes the scale as an input instead (`guidance_embedding`)."""
        return self.guidance_scale > 1.0 and self.guidance_embedding_dim is None


@dataclass(frozen=True)
class CheckedInvert:
    """`Prompt2PromptPipeline.invert`'s arguments after `_check_invert_inputs`.

    Attributes:
        method: the `InversionMethod`.
        prompt: the source prompt (the caption).
        source: its tokens.
        num_inference_steps: DDIM steps.
        guidance_scale: the guidance the edits will use (null-text optimises for it).
        height: image height in pixels.
        width: image width in pixels.
        num_inner_steps: null-text: Adam evaluations per step at most.
        early_stop_epsilon: null-text: the early-stop threshold at step 0.
        cuda_graph: null-text: replay the UNet as CUDA graphs.
        negative_prompt: the unconditional prompt, or None.
        negative_ids: its token ids, one row.
    """

    method: InversionMethod
    prompt: str
    source: PromptTokens
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    num_inner_steps: int
    early_stop_epsilon: float
    cuda_graph: bool
    negative_prompt: str | None
    negative_ids: list[list[int]]


@dataclass(frozen=True)
class InversionConditioning:
    """What conditions the UNet in an inversion, besides the latent and the timestep.

    Attributes:
        cond: the source prompt's text states ``(1, tokens, dim)``.
        uncond: the unconditional text states ``(1, tokens, dim)`` (null-text's starting point).
        cond_added: the conditional row's added conditions for the UNet (SDXL: its pooled text
            embedding and the time ids), or None.
        uncond_added: the unconditional row's, with its own pooled embedding, or None.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_added: Mapping | None = None
    uncond_added: Mapping | None = None


class Prompt2PromptPipeline(DiffusionPipeline):
    r"""Text-to-image generation with Prompt-to-Prompt editing (Hertz et al., 2022).

    The source prompt and every target prompt are denoised together in one batch from the same
    initial noise; the source's attention is injected into the targets as the edit prescribes.

    Args:
        vae: the `AutoencoderKL` that decodes latents.
        text_encoder: a CLIP text encoder.
        tokenizer: its tokenizer.
        unet: a `UNet2DConditionModel`.
        scheduler: any diffusers scheduler (DDIM recommended, as in the paper).
        safety_checker: optional Stable Diffusion safety checker, run on decoded images when present.
        feature_extractor: the safety checker's image processor.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    #: The model family this pipeline runs (`model_folder.FAMILIES`), recorded with every image.
    model_family = "sd"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self._init_state()

    def _init_state(self) -> None:
        """What every pipeline of the family sets after registering its modules (``self.vae`` among them)."""
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # each VAE block but the last halves the image
        #: Words the model was trained on (the bundled shapes model sets it); others are warned about once.
        self.vocabulary: frozenset[str] | None = None
        self._warned_words: set[str] = set()
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, allow_pickle: bool = False, **kwargs):
        """Load a diffusers Stable Diffusion folder or hub id (see `DiffusionPipeline.from_pretrained`).

        With no argument, loads the bundled shapes-world model (`prompt2prompt.shapes.MODEL_DIR`),
        which needs no network. Weights load from safetensors only; pickle checkpoints (``.bin``)
        are refused unless ``allow_pickle=True``, since unpickling can run arbitrary code. A local
        folder is checked first (`check_model_folder`): a missing or damaged file raises a
        ``ValueError`` that names it.

        Args:
            pretrained_model_name_or_path: a local diffusers pipeline folder or a hub id; None loads
                the bundled shapes-world model. For it, and for a folder with a ``world.json`` (a
                shapes-world model's export), ``pipe.vocabulary`` is set to the words it was trained
                on, and words outside them are warned about.
            *args: passed on to `DiffusionPipeline.from_pretrained`.
            allow_pickle: allow pickle (``.bin``) checkpoints; otherwise ``use_safetensors=True`` is passed.
            **kwargs: passed on to `DiffusionPipeline.from_pretrained` (e.g. ``torch_dtype``).

        Returns:
            The loaded `Prompt2PromptPipeline`.

        Raises:
            ArgumentError: (``model``) a local folder of another family (an SDXL folder: use
                `prompt2prompt.load_pipeline` or `Prompt2PromptXLPipeline`).
            ValueError: the bundled model is missing, ``use_safetensors=False`` without
                ``allow_pickle``, or a local folder lacks or has a damaged file.
        """
        if pretrained_model_name_or_path is None:
            from .shapes import MODEL_DIR

            if not (MODEL_DIR / "model_index.json").is_file():
                raise ValueError(f"the bundled shapes model is missing from {MODEL_DIR}; reinstall the package or name a model folder")
            pipe = cls.from_pretrained(MODEL_DIR, *args, allow_pickle=allow_pickle, **kwargs)
            from .shapes import world

            pipe.vocabulary = pipe.vocabulary or world.caption_words()  # world.json, else every word the world knows
            return pipe
        if kwargs.get("use_safetensors") is False and not allow_pickle:
            raise ValueError("use_safetensors=False loads pickle checkpoints, which can run code; pass allow_pickle=True to allow it")
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and Path(pretrained_model_name_or_path).is_dir():
            family = folder_family(pretrained_model_name_or_path)
            if family != cls.model_family:
                raise ArgumentError("model", f"{pretrained_model_name_or_path} is an {family.upper()} model, which {cls.__name__} "
                                    "does not run; load it with prompt2prompt.load_pipeline, which picks the pipeline from the folder"
                                    + (" (Prompt2PromptXLPipeline)" if family == "sdxl" else ""))
            check_model_folder(pretrained_model_name_or_path, allow_pickle=allow_pickle)  # names a missing or damaged file
            vocabulary = folder_vocabulary(pretrained_model_name_or_path)  # a shapes-world model's words, else None
            pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            pipe.vocabulary = vocabulary
            return pipe
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # ----------------------------------------------------------------- checks

    def check_inputs(
        self,
        prompt: str,
        edit_prompts: Sequence[str] | str | None = default("edit_prompts"),
        edit: EditMode | str = default("edit"),
        equalizer: Mapping | None = default("equalizer"),
        local_blend: LocalBlend | None = default("local_blend"),
        self_replace_max_res: int | None = default("self_replace_max_res"),
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = default("height"),
        width: int | None = default("width"),
        negative_prompt: str | Sequence[str] | None = default("negative_prompt"),
        generator: torch.Generator | None = default("generator"),
        latents: torch.Tensor | None = default("latents"),
        output_type: str = default("output_type"),
        return_attention: bool = True,
        return_self_attention: bool = default("return_self_attention"),
        attention_res: int | None = default("attention_res"),
        truncate_prompts: bool = default("truncate_prompts"),
        eta: float = default("eta"),
        inversion: Inversion | None = default("inversion"),
    ) -> CheckedInputs:
        """Check a call's arguments against the model and resolve their defaults; no model runs.

        ``cross_replace_steps``, ``self_replace_steps`` and the words of ``equalizer`` and
        ``local_blend`` are checked when the edit is planned (`edits.build_edit_plan`).

        Args:
            prompt: the source prompt.
            edit_prompts: the target prompt(s), or None.
            edit: the `EditMode` or its name.
            equalizer: ``{word: factor}``; needs ``edit_prompts``.
            local_blend: a `LocalBlend`; needs ``edit_prompts``; its resolution is checked here.
            self_replace_max_res: largest side whose self-attention is injected (0 or a side the
                UNet has at this size), or None.
            num_inference_steps: denoising steps, or None (the inversion's, or the table's).
            guidance_scale: guidance scale, or None (the inversion's, or the table's).
            height: pixels, or None (the model's).
            width: pixels, or None (the model's).
            negative_prompt: the unconditional prompt, or one per prompt, or None.
            generator: one `torch.Generator` (or a list of one), or None.
            latents: initial latents ``(1 or prompts, C, h, w)`` in the model's dtype, or None.
            output_type: one of `arguments.OUTPUT_TYPES`.
            return_attention: whether cross-attention maps are recorded.
            return_self_attention: whether the source's self-attention is recorded.
            attention_res: the side of the recorded maps, or None.
            truncate_prompts: cut prompts longer than the tokenizer's limit instead of raising.
            eta: DDIM's eta.
            inversion: an `Inversion`, checked against the other arguments and this model.

        Returns:
            The `CheckedInputs`.

        Raises:
            ArgumentError: naming the first bad argument (``.argument``), and ValueError from the
                edit's own checks (`edits.EditMode.parse`).
        """
        source, targets = self._check_prompts(prompt, edit_prompts, equalizer, local_blend, truncate_prompts)
        mode = EditMode.parse(edit)
        self._warn_unknown_words([source, *targets])
        checks.eta(eta)
        if inversion is not None:
            num_inference_steps, guidance_scale, height, width = self._check_inversion(
                inversion, prompt, num_inference_steps, guidance_scale, height, width, latents, negative_prompt, eta
            )
        steps = default("num_inference_steps") if num_inference_steps is None else num_inference_steps
        scale = default("guidance_scale") if guidance_scale is None else guidance_scale
        checks.positive_int("num_inference_steps", steps)
        checks.finite_number("guidance_scale", scale)
        generator = checks.one_generator(generator)
        checks.output_type(output_type)
        height = checks.multiple_of("height", self._default_size() if height is None else height, self.vae_scale_factor)
        width = checks.multiple_of("width", self._default_size() if width is None else width, self.vae_scale_factor)
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        self._check_latents(latents, 1 + len(targets), latent_hw)
        blend_res, record_res, self_res, max_res = self._map_sides(latent_hw, local_blend, attention_res, return_attention,
                                                                   return_self_attention, self_replace_max_res)
        negative_ids = self._negative_ids(negative_prompt, 1 + len(targets), truncate_prompts)
        return CheckedInputs(source, targets, mode, steps, scale, height, width, latent_hw, generator, negative_ids, max_res,
                             blend_res, record_res, self_res, self.unet.config.get("time_cond_proj_dim"))

    def _check_prompts(self, prompt, edit_prompts, equalizer, local_blend, truncate: bool) -> tuple[PromptTokens, list[PromptTokens]]:
        """The tokenized source and targets; checks that equalizer and local_blend have targets to edit."""
        source = self._tokenize(prompt, "prompt", truncate)
        if isinstance(edit_prompts, str):
            edit_prompts = [edit_prompts]
        if edit_prompts is not None:
            if not isinstance(edit_prompts, Sequence) or len(edit_prompts) == 0:
                raise ArgumentError("edit_prompts", "edit_prompts is empty; give at least one target prompt, or None to only generate")
            targets = [self._tokenize(p, f"edit_prompts[{k}]", truncate) for k, p in enumerate(edit_prompts)]
        else:
            targets = []
            if equalizer is not None or local_blend is not None:
                raise ArgumentError("equalizer" if equalizer is not None else "local_blend",
                                    "equalizer and local_blend edit target prompts; give edit_prompts as well")
        if local_blend is not None and not isinstance(local_blend, LocalBlend):
            raise ArgumentError("local_blend", f"local_blend must be a LocalBlend, got {type(local_blend).__name__}")
        return source, targets

    def _tokenize(self, prompt, name: str, truncate: bool, tokenizer=None) -> PromptTokens:
        """``prompt`` tokenized by ``tokenizer`` (default ``self.tokenizer``); ``name`` is how messages
        call it (``prompt``, ``edit_prompts[1]``)."""
        argument = name.split("[", 1)[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ArgumentError(argument, f"{name} must be a non-empty string, got {prompt!r}")
        try:
            return tokenize_words(prompt, self.tokenizer if tokenizer is None else tokenizer, truncate=truncate)
        except ValueError as err:
            raise ArgumentError(argument, f"{name}: {err}") from None

    def _negative_ids(self, negative_prompt, count: int, truncate: bool, tokenizer=None,
                      name: str = "negative_prompt") -> list[list[int]]:
        """Token ids by ``tokenizer`` (default ``self.tokenizer``) of the unconditional prompt of each
        of ``count`` rows (``""`` when None); ``name`` is the argument messages name."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if negative_prompt is None:
            negative_prompt = ""
        listed = isinstance(negative_prompt, Sequence) and not isinstance(negative_prompt, str)
        rows = [negative_prompt] * count if not listed else list(negative_prompt)
        if len(rows) != count or not all(isinstance(r, str) for r in rows):
            raise ArgumentError(name, f"{name} must be a string or a list of {count} strings (one per prompt), got {negative_prompt!r}")
        out = []
        length = tokenizer.model_max_length
        for row in rows:
            ids = list(tokenizer(row, truncation=False, verbose=False)["input_ids"])
            if len(ids) > length:
                if not truncate:
                    raise ArgumentError(name,
                                        f"{name} is {len(ids)} tokens long but the text encoder takes at most {length}; "
                                        "shorten it, or pass truncate_prompts=True")
                ids = ids[: length - 1] + ids[-1:]  # keep the end-of-text token
            out.append(ids)
        return out

    def _warn_unknown_words(self, prompts: Sequence[PromptTokens]) -> None:
        """Warn once per word that is outside ``self.vocabulary`` (the prompt still runs)."""
        if self.vocabulary is None:
            return
        unknown = {w.casefold() for p in prompts for w in p.words if w.casefold() not in self.vocabulary and w.isalnum()}
        new = sorted(unknown - self._warned_words)
        if new:
            self._warned_words.update(new)
            warnings.warn(
                f"words outside this model's vocabulary: {', '.join(new)}; the model will do what it can with them",
                stacklevel=4,
            )

    def _default_size(self) -> int:
        """The image side in pixels the UNet was made for: its sample size times the VAE's factor."""
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def _check_latents(self, latents, count: int, latent_hw: tuple[int, int]) -> None:
        """Refuse initial latents of another shape, dtype or device than the model's."""
        if latents is None:
            return
        channels = self.unet.config.in_channels
        device, dtype = self._execution_device, self.unet.dtype
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] not in (1, count) or tuple(latents.shape[1:]) != (channels, *latent_hw):
            shape = getattr(latents, "shape", None)
            raise ArgumentError("latents", f"latents must have shape (1 or {count}, {channels}, {latent_hw[0]}, {latent_hw[1]}), got {shape}")
        if latents.dtype != dtype or latents.device.type != torch.device(device).type:
            raise ArgumentError("latents",
                                f"latents are {latents.dtype} on {latents.device} but the model is {dtype} on {device}; "
                                f"pass latents.to(device={str(device)!r}, dtype={dtype})")

    def _map_sides(self, latent_hw, local_blend, attention_res, return_attention: bool, return_self_attention: bool,
                   self_replace_max_res=None):
        """``(blend_res, record_res, self_res, self_replace_max_res)``: the map sides LocalBlend reads
        and the call records (None where unused) and the largest side whose self-attention is
        injected, each given one checked against the UNet's attention sides at this size."""
        sides = attention_sides(self.unet, latent_hw)
        max_res = checks.self_replace_max_res(self_replace_max_res, max(latent_hw) // MAP_SIDE_DIVISOR, sides)

        def fallback() -> int:
            return checks.closest_side(sides, max(latent_hw) // MAP_SIDE_DIVISOR)

        blend_res = None
        if local_blend is not None:
            wanted = local_blend.resolution if local_blend.resolution is not None else fallback()
            blend_res = checks.map_side("local_blend.resolution", wanted, sides)
        if attention_res is not None:
            checks.map_side("attention_res", attention_res, sides)
        record_res = (attention_res or fallback()) if return_attention else None
        self_res = (attention_res or fallback()) if return_self_attention else None
        return blend_res, record_res, self_res, max_res

    def _check_inversion(self, inv, prompt, steps, guidance, height, width, latents, negative_prompt, eta):
        """Check a call's arguments against its `Inversion`; returns (steps, guidance, height, width)."""
        if not isinstance(inv, Inversion):
            raise ArgumentError("inversion", f"inversion must be an Inversion (from pipe.invert or Inversion.load), got {type(inv).__name__}")
        if inv.family != self.model_family:
            raise ArgumentError("inversion", f"the image was inverted with an {inv.family.upper()} model, but this pipeline runs an "
                                f"{self.model_family.upper()} model; invert the image with this pipeline")
        if prompt != inv.prompt:
            raise ArgumentError("prompt", f"the image was inverted with the prompt {inv.prompt!r}; pass it as prompt (edit through edit_prompts)")
        if latents is not None:
            raise ArgumentError("latents", "latents and inversion both give the initial latent; pass only one")
        if eta:
            raise ArgumentError("eta", "inversion needs the deterministic DDIM sampler; pass eta=0")
        if negative_prompt is not None and inv.method in (InversionMethod.NULL_TEXT, InversionMethod.NEGATIVE_PROMPT):
            raise ArgumentError("negative_prompt", f"{inv.method.value} inversion sets the unconditional embedding itself; drop negative_prompt")
        if steps is not None and steps != inv.num_inference_steps:
            raise ArgumentError("num_inference_steps", f"num_inference_steps={steps!r} but the image was inverted with {inv.num_inference_steps}; "
                                f"leave it out or invert again with num_inference_steps={steps!r}")
        if inv.method is InversionMethod.NULL_TEXT and guidance is not None and guidance != inv.guidance_scale:
            raise ArgumentError("guidance_scale", f"guidance_scale={guidance!r} but the null-text embeddings were optimised for {inv.guidance_scale}; "
                                "leave it out or invert again with that guidance_scale")
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != getattr(inv, name):
                raise ArgumentError(name, f"{name}={value!r} but the inverted image is {inv.width}x{inv.height}; leave it out")
        self._check_inversion_shapes(inv)
        return inv.num_inference_steps, (inv.guidance_scale if guidance is None else guidance), inv.height, inv.width

    def _check_inversion_shapes(self, inv: Inversion) -> None:
        """Refuse an inversion made with a model of other latent or text-state shapes."""
        channels = self.unet.config.in_channels
        shape = (1, channels, inv.height // self.vae_scale_factor, inv.width // self.vae_scale_factor)
        if tuple(inv.latent.shape) != shape:
            raise ArgumentError("inversion", f"the inversion's latent has shape {tuple(inv.latent.shape)}, this model's is {shape}; invert the image with this model")
        if inv.null_embeddings is not None:
            want = (inv.num_inference_steps, self.tokenizer.model_max_length, self._text_state_width())
            if tuple(inv.null_embeddings.shape) != want:
                raise ArgumentError("inversion", f"the inversion's null-text embeddings are {tuple(inv.null_embeddings.shape)}, this model needs {want}; invert with this model")

    def _text_state_width(self) -> int:
        """The width of the text states the UNet attends to: the text encoder's hidden size."""
        return self.text_encoder.config.hidden_size

    # ----------------------------------------------------------------- stages

    def encode_prompt(
        self,
        prompts: Sequence[PromptTokens],
        device: torch.device,
        do_classifier_free_guidance: bool,
        negative_ids: Sequence[Sequence[int]] | None = None,
        source_as_negative: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder states of the prompts and, with guidance, of each row's unconditional prompt.

        Args:
            prompts: the tokenized prompts, source first (`CheckedInputs.prompts`).
            device: where the states are made.
            do_classifier_free_guidance: also make the unconditional states.
            negative_ids: token ids of the unconditional prompt, one row per prompt
                (`CheckedInputs.negative_ids`); needed with guidance unless ``source_as_negative``.
            source_as_negative: negative-prompt inversion (Miyake et al., 2023): the source
                prompt's states are every row's unconditional states.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each ``(prompts, tokens, dim)`` in the UNet's
            dtype; ``negative_prompt_embeds`` is None without guidance.
        """
        dtype = self.unet.dtype
        prompt_embeds = self._encode([p.ids for p in prompts], device, dtype)  # (prompts, tokens, dim)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if source_as_negative:
            return prompt_embeds, prompt_embeds[:1].expand(len(prompts), -1, -1)  # (prompts, tokens, dim)
        return prompt_embeds, self._encode(negative_ids, device, dtype)  # (prompts, tokens, dim)

    def _encode(self, id_rows: Sequence[Sequence[int]], device, dtype) -> torch.Tensor:
        """Text-encoder states ``(prompts, max_length, dim)`` of token ids padded as diffusers pads."""
        length = self.tokenizer.model_max_length
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([list(r) + [pad] * (length - len(r)) for r in id_rows], device=device)  # (prompts, tokens)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in id_rows], device=device)  # (prompts, tokens)
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        states = self.text_encoder(ids, attention_mask=mask if use_mask else None)[0]
        return states.to(dtype=dtype)

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None,
        latents: torch.Tensor | None = None,
        scheduler=None,
    ) -> torch.Tensor:
        """The initial latents of every prompt: one noise (or ``latents``) shared by all rows.

        Args:
            batch_size: the number of prompts (source and targets).
            num_channels_latents: the UNet's input channels.
            height: image height in pixels (the latent's is this over ``vae_scale_factor``).
            width: image width in pixels.
            dtype: the latents' dtype.
            device: the latents' device.
            generator: draws the noise when ``latents`` is None.
            latents: ``(1 or batch_size, C, h, w)`` initial latents (checked by `check_inputs`),
                or an inversion's ``x_T``.
            scheduler: the call's scheduler (default ``self.scheduler``), whose ``init_noise_sigma``
                scales the latents.

        Returns:
            ``(batch_size, C, h, w)``.
        """
        scheduler = self.scheduler if scheduler is None else scheduler
        shape = (1, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)  # (1, C, h, w)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents.expand(batch_size, -1, -1, -1).clone() * scheduler.init_noise_sigma  # (prompts, C, h, w)

    def prepare_extra_step_kwargs(self, generator: torch.Generator | None, eta: float, scheduler=None) -> dict:
        """The keywords of ``scheduler.step`` that not every scheduler takes: ``eta`` and ``generator``.

        Args:
            generator: draws a stochastic sampler's step noise. None: a generator seeded from
                torch's global generator, so that ``torch.manual_seed`` reproduces the run.
            eta: DDIM's eta.
            scheduler: the call's scheduler (default ``self.scheduler``).

        Returns:
            The keywords; pass them through `scheduler_step`, which draws one noise for all prompts.
        """
        scheduler = self.scheduler if scheduler is None else scheduler
        accepted = set(inspect.signature(scheduler.step).parameters)
        extra = {}
        if "eta" in accepted:
            extra["eta"] = eta
        if "generator" in accepted:
            if generator is None:
                generator = torch.Generator(device=self._execution_device).manual_seed(int(torch.randint(_SEED_BOUND, ())))
            extra["generator"] = generator
        return extra

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's images of ``latents``.

        Args:
            latents: ``(prompts, C, h, w)``.

        Returns:
            ``(prompts, 3, height, width)`` in about ``[-1, 1]``, in the VAE's dtype (see
            ``image_processor.postprocess``).
        """
        scaled = latents / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None):
            scaled = scaled + self.vae.config.shift_factor
        return self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]

    def run_safety_checker(self, image: torch.Tensor, device, dtype) -> tuple[torch.Tensor, list[bool] | None]:
        """The safety checker's verdicts on decoded images (and the images it blacks out), when
        the pipeline has one; ``(image, None)`` otherwise."""
        if self.safety_checker is None:
            return image, None
        pil = self.image_processor.postprocess(image, output_type="pil")
        features = self.feature_extractor(pil, return_tensors="pt").to(device)
        image, flags = self.safety_checker(images=image, clip_input=features.pixel_values.to(dtype))
        return image, flags

    def _prepare_scheduler(self, num_inference_steps: int, inversion: Inversion | None, device):
        """The call's scheduler with its timesteps set: the pipeline's, or DDIM for an inversion,
        whose timesteps must be the inversion's."""
        scheduler = self.scheduler if inversion is None else inversion_scheduler(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        if inversion is not None and not torch.equal(scheduler.timesteps.cpu().long(), inversion.timesteps.long()):
            raise ArgumentError("inversion", "this pipeline's scheduler config gives other DDIM timesteps than the inversion's; invert the image with this pipeline")
        return scheduler, scheduler.timesteps

    def _plan_edit(self, inputs: CheckedInputs, num_steps: int, cross_replace_steps, self_replace_steps, equalizer, local_blend,
                   device) -> EditPlan | None:
        """The compiled edit (`edits.build_edit_plan`), or None without target prompts."""
        if not inputs.targets:
            return None
        plan = build_edit_plan(
            inputs.source, inputs.targets, inputs.mode, num_steps, cross_replace_steps, self_replace_steps,
            inputs.self_replace_max_res, equalizer, local_blend, inputs.blend_res or 0,
        ).to(device)
        if inputs.mode is EditMode.AUTO:
            logger.info("edit='auto' chose %s", plan.mode.value)
        injects = any(plan.cross_active) or plan.self_steps[0] < plan.self_steps[1] or plan.blend is not None
        if plan.mode is not EditMode.NONE and not injects:
            warnings.warn(f"cross_replace_steps and self_replace_steps cover none of the {num_steps} steps (a fraction f covers "
                          f"steps int(f0 * steps) to int(f1 * steps), as the paper's code rounds), so the targets are not edited; "
                          "with this few steps pass cross_replace_steps=1.0 (and self_replace_steps)", stacklevel=4)
        return plan

    # ----------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        edit_prompts: Sequence[str] | str | None = default("edit_prompts"),
        edit: EditMode | str = default("edit"),
        cross_replace_steps: float | tuple[float, float] | Mapping = default("cross_replace_steps"),
        self_replace_steps: float | tuple[float, float] = default("self_replace_steps"),
        self_replace_max_res: int | None = default("self_replace_max_res"),
        equalizer: Mapping | None = default("equalizer"),
        local_blend: LocalBlend | None = default("local_blend"),
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = default("height"),
        width: int | None = default("width"),
        negative_prompt: str | Sequence[str] | None = default("negative_prompt"),
        generator: torch.Generator | None = default("generator"),
        latents: torch.Tensor | None = default("latents"),
        output_type: str = default("output_type"),
        return_dict: bool = True,
        return_attention: bool = True,
        return_self_attention: bool = default("return_self_attention"),
        attention_res: int | None = default("attention_res"),
        truncate_prompts: bool = default("truncate_prompts"),
        eta: float = default("eta"),
        cross_attention_kwargs: dict | None = None,
        inversion: Inversion | None = default("inversion"),
        source: SourcePass | None = default("source"),
        keep_source: bool = default("keep_source"),
        source_device=default("source_device"),
    ):
        r"""Generate the source image and edit it into one image per target prompt.

        Defaults come from `arguments.ARGUMENTS`.

        Args:
            prompt: the source prompt.
            edit_prompts: one or more target prompts, denoised together with the source. None
                generates the source alone (its attention maps are still recorded).
            edit: ``"auto"`` (replace when the word counts match, else refine), ``"replace"``,
                ``"refine"`` or ``"none"`` (same noise only, no injection).
            cross_replace_steps: fraction of the steps, ``(start, end)`` fractions, or a dict of
                such per target word with ``"default_"`` for the other tokens, during which the
                source's cross-attention is injected; a list gives one of these per target prompt.
            self_replace_steps: fraction or ``(start, end)`` during which the source's
                self-attention is injected; a list gives one per target prompt.
            self_replace_max_res: largest attention-map side whose self-attention is injected: 0
                (none) or a side the UNet has at this size; None = the latent side //
                `MAP_SIDE_DIVISOR` (16 for a 64 x 64 latent, as the paper's code).
            equalizer: ``{word: factor}`` (or a list of factors, one per target) re-weighting the
                attention of target words; 0, negative and > 1 are allowed. Applied where
                cross-attention is injected; with ``edit="none"`` it scales the target's own maps.
            local_blend: a `LocalBlend` restricting the edit to the named words' region.
            num_inference_steps: denoising steps; None = the inversion's, or the table's default.
            guidance_scale: classifier-free guidance scale; <= 1 disables guidance. None = the
                inversion's, or the table's default. An LCM-distilled UNet (``time_cond_proj_dim``
                set) takes it as ``timestep_cond`` (`guidance_embedding`) and runs no unconditional half.
            height: image height in pixels (default: the UNet's sample size times the VAE factor).
            width: image width in pixels.
            negative_prompt: prompt(s) for the unconditional half of guidance (None: ``""``).
            generator: draws the one initial noise that the source and all targets share and, with a
                stochastic scheduler (DDPM, Euler ancestral, DDIM with ``eta > 0``), each step's
                noise, again one draw for all prompts (`same_noise_generators`).
            latents: initial noise ``(1 or prompts, channels, height / f, width / f)``, ``f`` the
                VAE's factor (``vae_scale_factor``), with the model's dtype and device.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a `Prompt2PromptPipelineOutput` rather than a tuple.
            return_attention: record the cross-attention maps for ``output.attention``.
            return_self_attention: record the source's self-attention at side ``attention_res``
                (default as for the cross maps) for ``output.self_attention``.
            attention_res: side of the recorded maps; None = like LocalBlend's default.
            truncate_prompts: cut prompts longer than the tokenizer's limit instead of raising.
            eta: DDIM eta (0 = deterministic).
            cross_attention_kwargs: passed on to the attention processors.
            inversion: an `Inversion` of a real image (`invert`): the source starts from its
                ``x_T`` and reconstructs the image, the targets edit it. ``prompt`` must be the
                inverted prompt; steps, size and (for null-text) guidance follow the inversion;
                DDIM is used whatever the pipeline's scheduler.
            source: a `SourcePass` of this prompt (`source`): only the target rows are denoised,
                the source's are read from it, with the same images, maps and ``out`` fields as the
                call without it. Steps, guidance, size, negative prompt, generator and latents left
                None take the pass's; any that would change the source's pass is refused, as is an
                edit that injects more than the pass kept.
            keep_source: also keep the source row's pass while the whole batch runs, as
                ``out.source_pass``: the `SourcePass` that ``pipe.source`` makes with this call's
                windows as its budget (``cross_replace_steps``, every word's, and ``self_replace_steps``,
                ``self_replace_max_res``), in the same one batch; the images are the call's without it.
            source_device: where a kept pass's tensors go (``"cpu"`` keeps them off the GPU; None:
                the pipeline's device), as ``pipe.source``'s ``device``.

        Returns:
            `Prompt2PromptPipelineOutput` (or ``(images, attention)`` when ``return_dict=False``).

        Raises:
            ArgumentError: a bad argument, named by ``.argument``, before any denoising starts
                (the edit's own checks raise ValueError; `check_inputs`, `edits.build_edit_plan`).
            NonFiniteError: NaN or infinity in the latents (naming the first such step) or in the
                decoded images (a float16 overflow, most often; `finite`), rather than a black image.
        """
        device = self._execution_device
        if source is not None:
            num_inference_steps, guidance_scale, height, width, negative_prompt = self._source_defaults(
                source, edit_prompts, num_inference_steps, guidance_scale, height, width, negative_prompt)
        inputs = self.check_inputs(
            prompt, edit_prompts, edit, equalizer, local_blend, self_replace_max_res, num_inference_steps, guidance_scale,
            height, width, negative_prompt, generator, latents, output_type, return_attention, return_self_attention,
            attention_res, truncate_prompts, eta, inversion,
        )
        scheduler, timesteps = self._prepare_scheduler(inputs.num_inference_steps, inversion, device)
        plan = self._plan_edit(inputs, len(timesteps), cross_replace_steps, self_replace_steps, equalizer, local_blend, device)
        budget = self._keep_budget(keep_source, source, return_dict, cross_replace_steps, self_replace_steps, len(timesteps))
        if source is not None:
            latents = self._check_source(source, inputs, plan, scheduler, eta, inversion, dict(negative_prompt=negative_prompt),
                                         generator, latents)

        # Algorithm 1: every prompt, source first, in one batch from the same initial latent
        guidance, n = inputs.do_classifier_free_guidance, len(inputs.prompts)
        method = inversion.method if inversion is not None else None
        prompt_embeds, negative_embeds = self.encode_prompt(
            inputs.prompts, device, guidance, inputs.negative_ids, source_as_negative=method is InversionMethod.NEGATIVE_PROMPT
        )
        embeds = torch.cat([negative_embeds, prompt_embeds]) if guidance else prompt_embeds  # (2 * prompts or prompts, tokens, dim)
        null_embeds, trajectory = self._inversion_guides(inversion, guidance, device)
        noise = self._initial_noise(inputs, inversion, latents, device, draw=budget is not None)
        latents = self.prepare_latents(n, self.unet.config.in_channels, inputs.height, inputs.width, self.unet.dtype, device,
                                       inputs.generator, noise, scheduler)
        extra = self.prepare_extra_step_kwargs(inputs.generator, eta, scheduler)
        controller = kept = None
        if source is not None:  # the targets only: their rows of the batch, the source's read from the pass
            latents, embeds, _, extra, controller = self._targets_of(source, inputs, plan, generator, latents, embeds, None, extra,
                                                                     "inversion" if inversion is not None else None)
            trajectory = None  # direct inversion sets the source's row only
        elif budget is not None:  # the whole batch, the source's row kept as it runs
            kept, controller = self._start_pass(inputs, plan, scheduler, len(timesteps), eta, inversion, budget, noise, latents, embeds,
                                                extra, source_device, source_row_values(negative_prompt=negative_prompt))

        latents, controller = self._denoise(inputs, plan, scheduler, timesteps, latents, embeds, extra, cross_attention_kwargs,
                                            null_embeds=null_embeds, trajectory=trajectory, controller=controller)
        self._finish_pass(kept, controller)
        latents = controller.with_source_latents(latents, -1)  # (prompts, C, h, w): a kept source's final latents first
        images, flags = self._postprocess(latents, output_type, device, prompt_embeds.dtype)
        self.maybe_free_model_hooks()
        return self._output(images, flags, controller, inputs, plan, return_dict, kept)

    # ----------------------------------------------------------------- a kept source pass

    @torch.no_grad()
    def source(
        self,
        prompt: str,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = default("height"),
        width: int | None = default("width"),
        negative_prompt: str | None = default("negative_prompt"),
        generator: torch.Generator | None = default("generator"),
        latents: torch.Tensor | None = default("latents"),
        inversion: Inversion | None = default("inversion"),
        eta: float = default("eta"),
        cross_replace_steps: float | tuple[float, float] = default("cross_replace_steps"),
        self_replace_steps: float | tuple[float, float] = default("self_replace_steps"),
        self_replace_max_res: int | None = default("self_replace_max_res"),
        device=None,
    ) -> SourcePass:
        r"""Run the source prompt alone once and keep what later edits read from it (`SourcePass`):
        ``pipe(prompt, edit_prompts, source=src)`` then denoises only the target rows.

        The arguments up to ``eta`` are `__call__`'s and make the same source image; the last three
        are the budget: the injection windows and sides that edits from this pass may use.

        Args:
            prompt: the source prompt.
            num_inference_steps: denoising steps; None = the inversion's, or the table's default.
            guidance_scale: classifier-free guidance; None = the inversion's, or the table's default.
            height: image height in pixels (default: the model's).
            width: image width in pixels.
            negative_prompt: the unconditional prompt (None: ``""``).
            generator: draws the initial noise (and a stochastic sampler's step noise).
            latents: initial noise ``(1, C, h, w)``, instead of ``generator``.
            inversion: an `Inversion` of a real image; ``prompt`` must be its prompt.
            eta: DDIM's eta.
            cross_replace_steps: the steps (fraction or ``(start, end)``) whose cross-attention is kept;
                edits whose windows (every word's) lie inside it can use the pass.
            self_replace_steps: the steps whose self-attention is kept.
            self_replace_max_res: the largest map side whose self-attention is kept (None: the
                call's default, the latent side // `MAP_SIDE_DIVISOR`; 0: none).
            device: where the pass's tensors are kept (``"cpu"`` keeps them off the GPU); None: the
                pipeline's device.

        Returns:
            The `SourcePass` (``src.nbytes`` its size; ``src.save(path)`` to keep it).

        Raises:
            ArgumentError: a bad argument, named by ``.argument``, before any UNet call.
        """
        inputs = self.check_inputs(prompt, None, "none", None, None, self_replace_max_res, num_inference_steps, guidance_scale,
                                   height, width, negative_prompt, generator, latents, "latent", False, False, None, False, eta,
                                   inversion)
        given = source_row_values(negative_prompt=negative_prompt)  # one row: the source's
        return self._capture(inputs, inversion, eta, latents, cross_replace_steps, self_replace_steps, device, given)

    def _capture(self, inputs: CheckedInputs, inversion, eta: float, latents, cross_replace_steps, self_replace_steps, device,
                 given: dict) -> SourcePass:
        """`source`'s work once its arguments are checked: the source row denoised alone under a
        capturing `P2PController`, which fills the `SourcePass`."""
        run_device = self._execution_device
        scheduler, timesteps = self._prepare_scheduler(inputs.num_inference_steps, inversion, run_device)
        budget = [step_window(_budget_window(w, name), len(timesteps))
                  for w, name in ((cross_replace_steps, "cross_replace_steps"), (self_replace_steps, "self_replace_steps"))]
        embeds, added = self._pass_conditioning(inputs, inversion, run_device)
        null_embeds, trajectory = self._inversion_guides(inversion, inputs.do_classifier_free_guidance, run_device)
        noise = self._initial_noise(inputs, inversion, latents, run_device, draw=True)  # (1, C, h, w), as prepare_latents draws
        latents = self.prepare_latents(1, noise.shape[1], inputs.height, inputs.width, self.unet.dtype, run_device, None, noise,
                                       scheduler)
        extra = self.prepare_extra_step_kwargs(inputs.generator, eta, scheduler)
        src, controller = self._start_pass(inputs, None, scheduler, len(timesteps), eta, inversion, budget, noise, latents, embeds,
                                           extra, device, given)
        self._denoise(inputs, None, scheduler, timesteps, latents, embeds, extra, None, added, getattr(inputs, "guidance_rescale", None),
                      null_embeds, trajectory, controller)
        self._finish_pass(src, controller)
        self.maybe_free_model_hooks()
        return src

    def _keep_budget(self, keep_source, source, return_dict: bool, cross_replace_steps, self_replace_steps,
                     steps: int) -> list[tuple[int, int]] | None:
        """The ``[(first, stop) cross, (first, stop) self]`` step windows of the pass a call keeps
        (``keep_source``): its own windows, every word's cross window covered by one; None when it
        keeps none. Refuses ``keep_source`` that is no bool, beside ``source=``, or without ``return_dict``."""
        if not isinstance(keep_source, bool):
            raise ArgumentError("keep_source", f"keep_source must be True or False, got {keep_source!r}")
        if not keep_source:
            return None
        if source is not None:
            raise ArgumentError("keep_source", "keep_source=True keeps the source's pass of a full call; a call with source= "
                                "already has its pass (the one given): drop keep_source")
        if not return_dict:
            raise ArgumentError("keep_source", "keep_source=True returns the pass as out.source_pass: pass return_dict=True")
        cross = covering_window([cross_replace_steps]) if isinstance(cross_replace_steps, Mapping) else cross_replace_steps
        return [step_window(_budget_window(w, name), steps) for w, name in ((cross, "cross_replace_steps"),
                                                                             (self_replace_steps, "self_replace_steps"))]

    def _initial_noise(self, inputs: CheckedInputs, inversion: Inversion | None, latents, device, draw: bool):
        """The initial noise before the scheduler's ``init_noise_sigma``: the inversion's ``x_T``, or
        ``latents``, or with ``draw`` one ``(1, C, h, w)`` drawn from the call's generator as
        `prepare_latents` draws it (None without ``draw``: `prepare_latents` draws it)."""
        noise = inversion.latent if inversion is not None else latents
        if noise is None and draw:
            shape = (1, self.unet.config.in_channels, *inputs.latent_hw)
            noise = randn_tensor(shape, generator=inputs.generator, device=device, dtype=self.unet.dtype)  # (1, C, h, w)
        return noise

    def _start_pass(self, inputs: CheckedInputs, plan: EditPlan | None, scheduler, steps: int, eta: float,
                    inversion: Inversion | None, budget: list[tuple[int, int]], noise: torch.Tensor, latents: torch.Tensor,
                    embeds: torch.Tensor, extra: Mapping, device, given: dict) -> tuple[SourcePass, P2PController]:
        """An empty `SourcePass` of the batch's source row and the capturing `P2PController` that fills
        it as the batch runs (`source`: the source alone; a ``keep_source`` call: every prompt).

        Args:
            inputs: the checked call (its prompts are the batch's, the source first).
            plan: the call's edit, or None (`source`).
            scheduler: the call's scheduler (the pass's identity).
            steps: the denoising steps the loop runs.
            eta: DDIM's eta.
            inversion: the call's inversion, or None.
            budget: ``[(first, stop) cross, (first, stop) self]`` the steps whose queries are kept.
            noise: ``(1 or prompts, C, h, w)`` the initial noise (its first row is the source's).
            latents: ``(prompts, C, h, w)`` the initial latents.
            embeds: ``(2 * prompts or prompts, tokens, dim)`` the batch's text states.
            extra: the scheduler step's keywords (a stochastic sampler's generator, whose state is kept).
            device: where the pass's tensors go (None: the pipeline's device).
            given: the source row's arguments as given (`source_pass.source_row_values`).

        Returns:
            ``(pass, controller)``; `_finish_pass` completes the pass after the loop.
        """
        run_device, dtype, n = self._execution_device, self.unet.dtype, len(inputs.prompts)
        keep = torch.device(device) if device is not None else run_device
        step_generator = extra.get("generator")
        kept = torch.empty(steps + 1, *latents.shape[1:], dtype=dtype, device=keep)  # (steps + 1, C, h, w)
        kept[0].copy_(latents[0])
        given = {**given, "num_inference_steps": inputs.num_inference_steps, "guidance_scale": inputs.guidance_scale,
                 "height": inputs.height, "width": inputs.width}
        src = SourcePass(
            identity=self._pass_identity(inputs, scheduler, eta, inversion), given=given, cross_steps=budget[0], self_steps=budget[1],
            self_max_res=inputs.self_replace_max_res, noise=noise[:1].to(keep, dtype, copy=True), latents=kept,
            text_states=embeds[len(embeds) - n : len(embeds) - n + 1].to(keep, copy=True),  # (1, tokens, channels): conditional source row
            step_generator=None if step_generator is None else step_generator.get_state(),
            generator_device=None if step_generator is None else step_generator.device.type,
        )
        # the pass sums the source's maps at every side: the source's row alone beside the call's own sides (which its output reads)
        self_record = set(_all_sides(self.unet, inputs.latent_hw)) | ({inputs.self_res} - {None})
        controller = P2PController(plan, n, inputs.do_classifier_free_guidance, inputs.latent_hw, inputs.record_sides, self_record,
                                   source=src, capture=True, keep_device=keep, source_sides=attention_sides(self.unet, inputs.latent_hw))
        return src, controller

    def _finish_pass(self, src: SourcePass | None, controller: P2PController) -> None:
        """The end of a capture (`_start_pass`): the source's self-attention sums into the pass, and
        on a GPU a wait for the copies into pinned CPU memory that the loop did not wait for (no
        capture, ``src`` None: nothing)."""
        if src is None:
            return
        keep = src.latents.device
        src.self_maps = {side: m.to(keep) for side, m in controller.self_maps.items()}
        src.self_calls = dict(controller.self_calls)
        run_device = self._execution_device
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)

    def _pass_conditioning(self, inputs: CheckedInputs, inversion: Inversion | None, device) -> tuple[torch.Tensor, Mapping | None]:
        """The batch rows' text states ``(2 * prompts or prompts, tokens, dim)`` and added conditions
        (None on Stable Diffusion) as `__call__` makes them."""
        guidance = inputs.do_classifier_free_guidance
        method = inversion.method if inversion is not None else None
        prompt_embeds, negative_embeds = self.encode_prompt(
            inputs.prompts, device, guidance, inputs.negative_ids, source_as_negative=method is InversionMethod.NEGATIVE_PROMPT
        )
        return (torch.cat([negative_embeds, prompt_embeds]) if guidance else prompt_embeds), None  # (2 * prompts or prompts, tokens, dim)

    def _pass_identity(self, inputs: CheckedInputs, scheduler, eta: float, inversion: Inversion | None) -> dict:
        """What identifies the source's pass of a call (`source_pass.SourcePass.identity`): the model,
        the source prompt and its unconditional ids, steps, guidance, size, scheduler, eta, inversion."""
        name = str(getattr(self, "name_or_path", "") or self.config.get("_name_or_path", "") or "")
        modules = [self.unet, self.text_encoder, getattr(self, "text_encoder_2", None), self.vae]
        inv = None
        if inversion is not None:
            inv = f"{inversion.method.value}:" + tensor_digest(
                [inversion.latent, inversion.null_embeddings, inversion.trajectory, getattr(inversion, "null_pooled", None)])
        return {
            "model": model_identity(self.model_family, name, modules, self.unet.dtype), "prompt": inputs.source.prompt,
            "num_inference_steps": inputs.num_inference_steps, "guidance_scale": float(inputs.guidance_scale),
            "height": inputs.height, "width": inputs.width, "negative_prompt": list(inputs.negative_ids[0]),
            "scheduler": scheduler_identity(scheduler), "eta": float(eta), "inversion": inv,
        }

    @staticmethod
    def _source_defaults(source, edit_prompts, num_inference_steps, guidance_scale, height, width, negative_prompt):
        """A call's arguments with each None taken from the `SourcePass` (`source_pass.fill_defaults`)."""
        check_is_pass(source)
        if edit_prompts is None:
            raise ArgumentError("edit_prompts", "with source=, give edit_prompts: the source's own image is the pass's (its latents[-1])")
        filled = fill_defaults(source, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                               width=width, negative_prompt=negative_prompt)
        return tuple(filled.values())

    def _check_source(self, source: SourcePass, inputs: CheckedInputs, plan: EditPlan, scheduler, eta, inversion, given: dict,
                      generator, latents):
        """Refuse, before any UNet call, a `SourcePass` that is not this call's source pass, or that
        kept less than the edit injects (`source_pass.check_same_pass`, `source_pass.check_budget`).
        Returns the call's initial latents: ``latents``, or the pass's noise when neither
        ``generator``, ``latents`` nor an inversion gives them."""
        check_same_pass(source, self._pass_identity(inputs, scheduler, eta, inversion), given)
        takes_source = plan.mode is not EditMode.NONE
        cross_needed = [i for i, active in enumerate(plan.cross_active) if active] if takes_source else []
        check_budget(source, cross_needed, plan.self_steps if takes_source else (0, 0), plan.self_max_res)
        if generator is None and latents is None and inversion is None:
            return source.noise.to(device=self._execution_device, dtype=self.unet.dtype)
        return latents

    def _targets_of(self, source: SourcePass, inputs: CheckedInputs, plan: EditPlan, generator, latents, embeds, added, extra,
                    argument: str | None):
        """The target rows of a call whose source is a kept pass: its initial latents checked against
        the pass's, the rows of ``latents`` ``(prompts, C, h, w)``, ``embeds`` ``(2 * prompts or
        prompts, tokens, dim)`` and ``added`` (SDXL, one row per ``embeds`` row) less the source's, the
        step noise's generator in the pass's state, and the cached-mode `P2PController`.

        Returns:
            ``(latents, embeds, added, extra, controller)``.
        """
        check_initial_latents(source, latents, argument or ("generator" if generator is not None else "latents"))
        n = len(inputs.prompts)
        rows = torch.tensor([i for i in range(len(embeds)) if i % n], device=embeds.device)  # every row but the source's (0 and n)
        embeds = embeds.index_select(0, rows)  # (2 * targets or targets, tokens, dim)
        if added is not None:
            added = {k: v.index_select(0, rows) for k, v in added.items()}  # one row per embeds row
        extra = dict(extra)
        if "generator" in extra and source.step_generator is not None:
            extra["generator"] = self._step_generator(source, generator, extra["generator"])
        controller = P2PController(plan, n - 1, inputs.do_classifier_free_guidance, inputs.latent_hw, inputs.record_sides,
                                   inputs.self_res, source=source)
        return latents[1:], embeds, added, extra, controller

    def _step_generator(self, source: SourcePass, given, made) -> torch.Generator:
        """The generator of a stochastic sampler's step noise in a call from a kept pass: the call's
        own when its state is the pass's, else (none given) ``made`` set to the pass's state."""
        state = source.step_generator
        if given is not None:
            if not torch.equal(given.get_state(), state):
                raise ArgumentError("generator", "the generator is not in the state the SourcePass's step noise was drawn from; "
                                    "pass a generator seeded as for pipe.source(...), or leave it out (the pass's state is used)")
            return given
        if made.device.type != source.generator_device:
            raise ArgumentError("source", f"this SourcePass drew its step noise on {source.generator_device}, but the pipeline runs on "
                                f"{made.device.type}; make the pass on this device")
        made.set_state(state)
        return made

    def _inversion_guides(self, inversion: Inversion | None, guidance: bool, device):
        """What an inversion sets at each step: null-text's unconditional embeddings ``(steps,
        tokens, dim)`` (with guidance) and direct inversion's trajectory ``(steps + 1, C, h, w)``;
        None where the method has none."""
        if inversion is None:
            return None, None
        dtype = self.unet.dtype
        null_embeds = trajectory = None
        if guidance and inversion.method is InversionMethod.NULL_TEXT:
            null_embeds = inversion.null_embeddings.to(device=device, dtype=dtype)  # (steps, tokens, dim)
        if inversion.method is InversionMethod.DIRECT:
            trajectory = inversion.trajectory.to(device=device, dtype=dtype)  # (steps + 1, C, h, w)
        return null_embeds, trajectory

    def _denoise(self, inputs: CheckedInputs, plan: EditPlan | None, scheduler, timesteps, latents, embeds, extra: Mapping,
                 cross_attention_kwargs, added_cond_kwargs: Mapping | None = None, guidance_rescale: float | None = None,
                 null_embeds=None, trajectory=None, controller: P2PController | None = None) -> tuple[torch.Tensor, P2PController]:
        """Algorithm 1's loop: every prompt row denoised together under the attention processors.

        ``embeds`` are ``(2 * rows or rows, tokens, dim)`` (unconditional half first with
        guidance); ``added_cond_kwargs`` (SDXL's pooled text states and time ids, one row per
        ``embeds`` row) go to the UNet as they are; ``null_embeds`` and ``trajectory`` are an
        inversion's (`_inversion_guides`). Returns the final latents ``(rows, C, h, w)`` and the
        controller that recorded the maps. A guidance-distilled UNet (``inputs.guidance_embedding_dim``)
        gets the scale as ``timestep_cond`` (`guidance_embedding`), one row per ``embeds`` row, as diffusers' pipelines pass it.
        ``controller``: one made by the caller (a capture into a `SourcePass`, or the targets of one;
        its ``num_prompts`` are the rows); None: every prompt of ``inputs``, source first."""
        guidance = inputs.do_classifier_free_guidance
        if controller is None:
            controller = P2PController(plan, len(inputs.prompts), guidance, inputs.latent_hw, inputs.record_sides, inputs.self_res)
        n = controller.num_prompts
        timestep_cond = None
        if inputs.guidance_embedding_dim is not None:
            w = torch.full((len(embeds),), inputs.guidance_scale - 1.0)  # (rows,): diffusers' w = guidance_scale - 1
            timestep_cond = guidance_embedding(w, inputs.guidance_embedding_dim).to(device=latents.device, dtype=latents.dtype)  # (rows, dim)
        watch = FiniteWatch(len(timesteps), latents.device)
        with p2p_attention(self.unet, controller), self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                if null_embeds is not None:  # null-text inversion: this step's optimised unconditional embedding
                    embeds[:n] = null_embeds[i]
                noise = self._predict_noise(latents, t, i, embeds, inputs.guidance_scale, guidance, scheduler, cross_attention_kwargs,
                                            added_cond_kwargs, guidance_rescale, timestep_cond)
                latents = scheduler_step(scheduler, noise, t, latents, extra)
                if trajectory is not None:  # direct inversion: the gap (inverted - denoised) added to the source row
                    latents[:1] = trajectory[i + 1 : i + 2]  # puts it on the inverted latent exactly
                controller.end_step(i, latents)
                if plan is not None and plan.blend is not None and i >= plan.blend.start_step:
                    rows = controller.with_source_latents(latents, i + 1)  # (prompts, C, h, w), the source first
                    rows = self._local_blend(rows, controller.maps[plan.blend.resolution], plan, inputs.latent_hw)
                    latents = controller.without_source_latents(rows)
                watch.step(i, latents)
                bar.update()
        watch.finish()
        return latents, controller

    def _predict_noise(self, latents, t, step: int, embeds, guidance_scale: float, guidance: bool, scheduler, cross_attention_kwargs,
                       added_cond_kwargs: Mapping | None = None, guidance_rescale: float | None = None,
                       timestep_cond: torch.Tensor | None = None):
        """The UNet's guided noise prediction ``(prompts, C, h, w)`` at step ``step`` (passed on to the
        attention processors as ``p2p_step``); ``added_cond_kwargs`` (SDXL) and ``timestep_cond``
        (``(batch, time_cond_proj_dim)``, a guidance-distilled UNet's `guidance_embedding`) go to the
        UNet, and with guidance a ``guidance_rescale`` other than None or 0 rescales the guided
        prediction (`rescale_guidance`)."""
        model_in = torch.cat([latents] * 2) if guidance else latents  # (batch, C, h, w)
        model_in = scheduler.scale_model_input(model_in, t)
        noise = self.unet(
            model_in, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond,
            cross_attention_kwargs={**(cross_attention_kwargs or {}), "p2p_step": step},
            added_cond_kwargs=None if added_cond_kwargs is None else dict(added_cond_kwargs), return_dict=False,
        )[0]  # (batch, C, h, w)
        if guidance:
            uncond, cond = noise.chunk(2)  # (prompts, C, h, w) each
            noise = uncond + guidance_scale * (cond - uncond)
            if guidance_rescale:  # None or 0: no rescale
                noise = rescale_guidance(noise, cond, guidance_rescale)
        return noise

    @staticmethod
    def _local_blend(latents: torch.Tensor, maps: torch.Tensor, plan: EditPlan, latent_hw) -> torch.Tensor:
        """LocalBlend: the targets' latents outside the words' region back to the source's."""
        blend = plan.blend
        mask = local_blend_mask(maps, blend.words, blend.threshold, latent_hw)  # (prompts, 1, h, w)
        if blend.subtract is not None:
            mask = mask & ~local_blend_mask(maps, blend.subtract, blend.subtract_threshold, latent_hw, pool=False)
        return blend_latents(latents, mask)

    def _postprocess(self, latents: torch.Tensor, output_type: str, device, dtype):
        """``(images, nsfw flags or None)`` in ``output_type``; latents stay as they are."""
        if output_type == "latent":
            return latents, None
        decoded = check_pixels(self.decode_latents(latents))  # (prompts, 3, height, width)
        decoded, flags = self.run_safety_checker(decoded, device, dtype)
        denormalize = [not f for f in flags] if flags is not None else None
        return self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=denormalize), flags

    def _output(self, images, flags, controller: P2PController, inputs: CheckedInputs, plan: EditPlan | None, return_dict: bool,
                source_pass: SourcePass | None = None):
        """The call's result, with the recorded maps averaged over layers and steps (and a kept pass)."""
        attention = None
        if inputs.record_res is not None:
            maps = controller.maps[inputs.record_res] / controller.layer_calls[inputs.record_res]  # (prompts, h, w, tokens)
            attention = AttentionMaps(maps.cpu(), inputs.prompts, inputs.record_res)
        if not return_dict:
            return images, attention
        self_map = None
        if inputs.self_res is not None and controller.self_calls.get(inputs.self_res):
            self_map = (controller.self_maps[inputs.self_res] / controller.self_calls[inputs.self_res]).cpu()  # (pixels, pixels)
        return Prompt2PromptPipelineOutput(
            images=images, attention=attention, edit_mode=plan.mode if plan is not None else None, nsfw_content_detected=flags,
            self_attention=self_map, self_attention_res=inputs.self_res if self_map is not None else None, source_pass=source_pass,
        )

    # ----------------------------------------------------------------- inversion

    def invert(
        self,
        image,
        prompt: str,
        method: InversionMethod | str = default("method"),
        num_inference_steps: int = default("num_inference_steps"),
        guidance_scale: float = default("guidance_scale"),
        height: int | None = default("height"),
        width: int | None = default("width"),
        num_inner_steps: int = default("num_inner_steps"),
        early_stop_epsilon: float = default("early_stop_epsilon"),
        negative_prompt: str | None = default("negative_prompt"),
        cuda_graph: bool = False,
    ) -> Inversion:
        r"""Invert a real image, to edit it with ``pipe(prompt, edit_prompts, inversion=inv)``.

        Defaults come from `arguments.ARGUMENTS`.

        Args:
            image: a path (PNG/JPEG/WebP...), PIL image, array or tensor; centre-cropped and resized
                to ``height`` x ``width`` (logged, and kept in ``inv.info["preprocessing"]``).
            prompt: a caption of the image; it becomes the source prompt of the edits.
            method: ``"null-text"`` (Mokady et al.), ``"negative-prompt"`` (Miyake et al.),
                ``"direct"`` (Ju et al., PnP Inversion) or ``"ddim"`` (plain DDIM inversion).
            num_inference_steps: DDIM steps (the edits use the same).
            guidance_scale: classifier-free guidance the edits will use (null-text optimises for it).
            height: pixels (default: the model's resolution).
            width: pixels (default: the model's resolution).
            num_inner_steps: null-text: at most this many Adam evaluations per step.
            early_stop_epsilon: null-text: stop a step's optimisation below `inversion.null_text_threshold`.
            negative_prompt: the text whose embedding starts the null-text optimisation (None: ``""``).
            cuda_graph: null-text on CUDA, experimental: capture the UNet's forward and backward once as
                CUDA graphs and replay them in the inner loop, where the GPU otherwise waits for
                kernel launches (`inversion.graphed_eps`; falls back to the plain loop, with a
                warning, if the capture fails). Not yet run on a GPU by this project.

        Returns:
            An `Inversion` (``save(path)`` / ``Inversion.load(path)`` to keep it), its tensors on the CPU.

        Raises:
            ArgumentError: a bad argument or unreadable image, named by ``.argument``, before any model work.
        """
        checked = self._check_invert_inputs(method, prompt, num_inference_steps, guidance_scale, height, width, num_inner_steps,
                                            early_stop_epsilon, cuda_graph, negative_prompt)
        return self._invert(image, checked)

    def _invert(self, image, checked: CheckedInvert) -> Inversion:
        """`invert`'s work once its arguments are checked, in stages a model family overrides: the
        text conditioning (`_inversion_conditioning`), the image's latent (`_encode_image`) and what
        the family adds to the `Inversion` (`_inversion_record`)."""
        method = checked.method
        pixels, note = load_image(image, checked.height, checked.width)
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        predict_eps(torch.zeros(1), torch.zeros(1), torch.ones(1), prediction_type)  # refuses other prediction types before any work
        logger.info("inversion: %s", note)

        start = time.perf_counter()
        device, dtype = self._execution_device, self.unet.dtype
        scheduler = inversion_scheduler(self.scheduler.config)
        scheduler.set_timesteps(checked.num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        step_ratio = scheduler.config.num_train_timesteps // checked.num_inference_steps  # timesteps between two DDIM steps
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

        def alpha_of(t) -> torch.Tensor:
            return alpha_at(scheduler, int(t))

        eps = unet_eps(self.unet, alpha_of, prediction_type, dtype)
        with torch.no_grad():
            image_latent = self._encode_image(pixels, device)  # (1, C, h, w)
            conditioning = self._inversion_conditioning(checked, device)
            with self.progress_bar(total=checked.num_inference_steps) as bar:
                trajectory = ddim_inversion(image_latent, timesteps, step_ratio, alpha_of, eps, conditioning.cond, bar.update,
                                            conditioning.cond_added)  # (steps + 1, C, h, w)
        info: dict = {"preprocessing": note, "model": str(getattr(self, "name_or_path", "") or self.config.get("_name_or_path", "")),
                      "negative_prompt": checked.negative_prompt or ""}
        null = None
        if method is InversionMethod.NULL_TEXT:
            null = self._null_text(trajectory, timesteps, step_ratio, alpha_of, conditioning, checked, eps, prediction_type, info)
        info["seconds"] = time.perf_counter() - start
        return Inversion(
            method=method, prompt=checked.prompt, num_inference_steps=checked.num_inference_steps,
            guidance_scale=float(checked.guidance_scale), timesteps=timesteps.cpu(), latent=trajectory[:1].cpu().clone(),
            image_latent=image_latent.cpu(), image=pixels, null_embeddings=null,
            trajectory=trajectory.cpu() if method is InversionMethod.DIRECT else None, family=self.model_family, info=info,
            **self._inversion_record(checked, conditioning),
        )

    def _check_invert_inputs(self, method, prompt, num_inference_steps, guidance_scale, height, width, num_inner_steps,
                             early_stop_epsilon, cuda_graph, negative_prompt=None) -> CheckedInvert:
        """`invert`'s arguments, all checked, as a `CheckedInvert`."""
        method = InversionMethod.parse(method)
        source = self._tokenize(prompt, "prompt", False)
        checks.positive_int("num_inference_steps", num_inference_steps)
        checks.finite_number("guidance_scale", guidance_scale)
        checks.positive_int("num_inner_steps", num_inner_steps)
        checks.early_stop_epsilon(early_stop_epsilon)
        if not isinstance(cuda_graph, bool):
            raise ArgumentError("cuda_graph", f"cuda_graph must be True or False, got {cuda_graph!r}")
        if cuda_graph and method is not InversionMethod.NULL_TEXT:
            raise ArgumentError("cuda_graph", f"cuda_graph=True speeds up null-text inversion only; drop it for method={method.value!r}")
        if cuda_graph and self._execution_device.type != "cuda":
            raise ArgumentError("cuda_graph", f"cuda_graph=True needs the pipeline on a CUDA device, but it is on {self._execution_device}; "
                                "move it with pipe.to('cuda') or drop cuda_graph")
        height = checks.multiple_of("height", self._default_size() if height is None else height, self.vae_scale_factor)
        width = checks.multiple_of("width", self._default_size() if width is None else width, self.vae_scale_factor)
        negative_ids = self._negative_ids(negative_prompt, 1, False)
        return CheckedInvert(method, prompt, source, num_inference_steps, guidance_scale, height, width, num_inner_steps,
                             early_stop_epsilon, cuda_graph, negative_prompt, negative_ids)

    def _inversion_conditioning(self, checked: CheckedInvert, device) -> InversionConditioning:
        """The source prompt's text states and the unconditional prompt's (``""`` or
        ``negative_prompt``), each ``(1, tokens, dim)``: what the inversion conditions the UNet on."""
        cond, uncond = self.encode_prompt([checked.source], device, True, checked.negative_ids)  # (1, tokens, dim) each
        return InversionConditioning(cond, uncond)

    def _inversion_record(self, checked: CheckedInvert, conditioning: InversionConditioning) -> dict:
        """What a model family adds to the `Inversion` (keyword arguments); Stable Diffusion adds nothing."""
        return {}

    def _encode_image(self, pixels: np.ndarray, device) -> torch.Tensor:
        """The VAE's latent ``(1, C, h, w)`` float32 of a ``(height, width, 3)`` uint8 picture (the
        mean of its latent distribution, shifted and scaled as `decode_latents` undoes)."""
        x = torch.from_numpy(pixels).to(device).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # (1, 3, H, W): 0..255 -> [-1, 1]
        latent = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()  # (1, C, h, w)
        return self._model_latent(latent)

    def _model_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latent ``(1, C, h, w)`` shifted and scaled into the UNet's space (what
        `decode_latents` undoes)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latent - shift) * self.vae.config.scaling_factor

    def _null_text(self, trajectory, timesteps, step_ratio, alpha_of, conditioning: InversionConditioning, checked: CheckedInvert,
                   eps, prediction_type: str, info: dict) -> torch.Tensor:
        """Null-text inversion's embeddings ``(steps, tokens, dim)`` (`inversion.null_text_optimisation`)
        of ``conditioning``'s unconditional states; its added conditions stay fixed. Its measurements go into ``info``."""
        eps_with_grad, graphed = eps, False
        cond, uncond = conditioning.cond, conditioning.uncond
        if checked.cuda_graph:
            sample = capture_sample(trajectory, timesteps, uncond, self.unet.dtype)
            eps_with_grad, graphed = graphed_eps(self.unet, sample, alpha_of, prediction_type, eps, conditioning.uncond_added)
        modules = [m for m in (self.unet, self.text_encoder, getattr(self, "text_encoder_2", None)) if m is not None]
        with frozen(modules), self.progress_bar(total=len(timesteps)) as bar:
            null, used, losses = null_text_optimisation(
                trajectory, timesteps, step_ratio, alpha_of, cond, uncond, checked.guidance_scale, checked.num_inner_steps,
                checked.early_stop_epsilon, eps, eps_with_grad, bar.update, conditioning.cond_added, conditioning.uncond_added,
            )
        # UNet passes: one per step for DDIM inversion, one per step for the conditional prediction, one per inner evaluation
        info.update(num_inner_steps=checked.num_inner_steps, early_stop_epsilon=checked.early_stop_epsilon, inner_steps_used=used,
                    final_losses=losses, unet_forward_passes=2 * len(timesteps) + sum(used), cuda_graph=graphed)
        return null


def _budget_window(window, name: str) -> tuple[float, float]:
    """A `SourcePass` budget window: a fraction or ``(start, end)``, never a dict of words."""
    if isinstance(window, Mapping):
        raise ArgumentError(name, f"{name} of a source pass is one window (a fraction or (start, end)) that covers every word's; "
                            f"got {window!r}")
    return parse_window(window, name)


def _all_sides(unet, latent_hw: tuple[int, int]) -> list[int]:
    """The map side ``max(h, w)`` of every level of ``unet`` at latent size ``latent_hw``."""
    h, w = latent_hw
    sides = []
    for _ in range(len(unet.config.down_block_types)):
        sides.append(max(h, w))
        h, w = -(-h // 2), -(-w // 2)
    return sides
