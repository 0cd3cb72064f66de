"""`Prompt2PromptPipeline`: Algorithm 1 of Prompt-to-Prompt as a diffusers pipeline."""

import inspect
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
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

from .alignment import PromptTokens, tokenize_words
from .attention import P2PController, attention_sides, p2p_attention
from .edit_ops import blend_latents, local_blend_mask
from .edits import EditMode, EditPlan, LocalBlend, build_edit_plan
from .inversion import Inversion, InversionMethod, inversion_scheduler
from .model_folder import check_model_folder

logger = logging.getLogger(__name__)


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
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    attention: AttentionMaps | None
    edit_mode: EditMode | None
    nsfw_content_detected: list[bool] | None = None
    self_attention: torch.Tensor | None = None
    self_attention_res: int | None = None


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


def _closest_side(sides: Sequence[int], wanted: int) -> int:
    return min(sides, key=lambda s: (abs(s - wanted), -s))


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
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
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
                the bundled shapes-world model and sets ``pipe.vocabulary``.
            *args: passed on to `DiffusionPipeline.from_pretrained`.
            allow_pickle: allow pickle (``.bin``) checkpoints; otherwise ``use_safetensors=True`` is passed.
            **kwargs: passed on to `DiffusionPipeline.from_pretrained` (e.g. ``torch_dtype``).

        Returns:
            The loaded `Prompt2PromptPipeline`.

        Raises:
            ValueError: the bundled model is missing, ``use_safetensors=False`` without
                ``allow_pickle``, or a local folder lacks or has a damaged file.
        """
        if pretrained_model_name_or_path is None:
            from .shapes import MODEL_DIR

            if not (MODEL_DIR / "model_index.json").is_file():
                raise ValueError(f"the bundled shapes model is missing from {MODEL_DIR}; reinstall the package or name a model folder")
            pipe = cls.from_pretrained(MODEL_DIR, *args, allow_pickle=allow_pickle, **kwargs)
            from .shapes import world

            pipe.vocabulary = world.caption_words()
            return pipe
        if kwargs.get("use_safetensors") is False and not allow_pickle:
            raise ValueError("use_safetensors=False loads pickle checkpoints, which can run code; pass allow_pickle=True to allow it")
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and Path(pretrained_model_name_or_path).is_dir():
            check_model_folder(pretrained_model_name_or_path, allow_pickle=allow_pickle)  # names a missing or damaged file
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # ----------------------------------------------------------------- helpers

    def _default_size(self) -> int:
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def _tokenize(self, prompt, name: str, truncate: bool) -> PromptTokens:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{name} must be a non-empty string, got {prompt!r}")
        try:
            return tokenize_words(prompt, self.tokenizer, truncate=truncate)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    def _encode(self, id_rows: Sequence[Sequence[int]], device, dtype) -> torch.Tensor:
        """Text-encoder states ``(prompts, max_length, dim)`` of token ids padded as diffusers pads."""
        length = self.tokenizer.model_max_length
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([list(r) + [pad] * (length - len(r)) for r in id_rows], device=device)  # (prompts, tokens)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in id_rows], device=device)
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        states = self.text_encoder(ids, attention_mask=mask if use_mask else None)[0]
        return states.to(dtype=dtype)

    def _negative_ids(self, negative_prompt, count: int, truncate: bool) -> list[list[int]]:
        if negative_prompt is None:
            negative_prompt = ""
        listed = isinstance(negative_prompt, Sequence) and not isinstance(negative_prompt, str)
        rows = [negative_prompt] * count if not listed else list(negative_prompt)
        if len(rows) != count or not all(isinstance(r, str) for r in rows):
            raise ValueError(f"negative_prompt must be a string or a list of {count} strings (one per prompt), got {negative_prompt!r}")
        out = []
        length = self.tokenizer.model_max_length
        for row in rows:
            ids = list(self.tokenizer(row, truncation=False, verbose=False)["input_ids"])
            if len(ids) > length:
                if not truncate:
                    raise ValueError(
                        f"negative_prompt is {len(ids)} tokens long but the text encoder takes at most {length}; "
                        "shorten it, or pass truncate_prompts=True"
                    )
                ids = ids[: length - 1] + ids[-1:]
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
                stacklevel=3,
            )

    def _check_size(self, value, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
            raise ValueError(f"{name} must be a positive multiple of {self.vae_scale_factor} (the VAE's factor), got {value!r}")
        return value

    def _run_safety_checker(self, image: torch.Tensor, device, dtype):
        if self.safety_checker is None:
            return image, None
        pil = self.image_processor.postprocess(image, output_type="pil")
        features = self.feature_extractor(pil, return_tensors="pt").to(device)
        image, flags = self.safety_checker(images=image, clip_input=features.pixel_values.to(dtype))
        return image, flags

    def _check_inversion(self, inv, prompt, steps, guidance, height, width, latents, negative_prompt, eta):
        """Validate a call's arguments against its `Inversion`; returns (steps, guidance, height, width)."""
        if not isinstance(inv, Inversion):
            raise ValueError(f"inversion must be an Inversion (from pipe.invert or Inversion.load), got {type(inv).__name__}")
        if prompt != inv.prompt:
            raise ValueError(f"the image was inverted with the prompt {inv.prompt!r}; pass it as prompt (edit through edit_prompts)")
        if latents is not None:
            raise ValueError("latents and inversion both give the initial latent; pass only one")
        if eta:
            raise ValueError("inversion needs the deterministic DDIM sampler; pass eta=0")
        if negative_prompt is not None and inv.method in (InversionMethod.NULL_TEXT, InversionMethod.NEGATIVE_PROMPT):
            raise ValueError(f"{inv.method.value} inversion sets the unconditional embedding itself; drop negative_prompt")
        if steps is not None and steps != inv.num_inference_steps:
            raise ValueError(f"num_inference_steps={steps!r} but the image was inverted with {inv.num_inference_steps}; "
                             f"leave it out or invert again with num_inference_steps={steps!r}")
        if inv.method is InversionMethod.NULL_TEXT and guidance is not None and guidance != inv.guidance_scale:
            raise ValueError(f"guidance_scale={guidance!r} but the null-text embeddings were optimised for {inv.guidance_scale}; "
                             "leave it out or invert again with that guidance_scale")
        for name, value, own in (("height", height, inv.height), ("width", width, inv.width)):
            if value is not None and value != own:
                raise ValueError(f"{name}={value!r} but the inverted image is {inv.width}x{inv.height}; leave it out")
        channels = self.unet.config.in_channels
        shape = (1, channels, inv.height // self.vae_scale_factor, inv.width // self.vae_scale_factor)
        if tuple(inv.latent.shape) != shape:
            raise ValueError(f"the inversion's latent has shape {tuple(inv.latent.shape)}, this model's is {shape}; invert the image with this model")
        if inv.null_embeddings is not None:
            dim = self.text_encoder.config.hidden_size
            want = (inv.num_inference_steps, self.tokenizer.model_max_length, dim)
            if tuple(inv.null_embeddings.shape) != want:
                raise ValueError(f"the inversion's null-text embeddings are {tuple(inv.null_embeddings.shape)}, this model needs {want}; invert with this model")
        return inv.num_inference_steps, (inv.guidance_scale if guidance is None else guidance), inv.height, inv.width

    def invert(
        self,
        image,
        prompt: str,
        method: InversionMethod | str = "null-text",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_inner_steps: int = 10,
        early_stop_epsilon: float = 1e-5,
        negative_prompt: str | None = None,
        cuda_graph: bool = False,
    ) -> Inversion:
        r"""Invert a real image, to edit it with ``pipe(prompt, edit_prompts, inversion=inv)``.

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
            early_stop_epsilon: null-text: stop a step's optimisation below ``epsilon + i * 2e-5``.
            negative_prompt: the text whose embedding starts the null-text optimisation (default ``""``).
            cuda_graph: null-text on CUDA, experimental: capture the UNet's forward and backward once as
                CUDA graphs and replay them in the inner loop, where the GPU otherwise waits for
                kernel launches (`inversion.graphed_eps`; falls back to the plain loop, with a
                warning, if the capture fails). Not yet run on a GPU by this project.

        Returns:
            An `Inversion` (``save(path)`` / ``Inversion.load(path)`` to keep it).

        Raises:
            ValueError: a bad argument or unreadable image, before any model work.
        """
        from .inversion import invert

        return invert(self, image, prompt, method, num_inference_steps, guidance_scale, height, width,
                      num_inner_steps, early_stop_epsilon, negative_prompt, cuda_graph)

    # ----------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        edit_prompts: Sequence[str] | str | None = None,
        edit: EditMode | str = "auto",
        cross_replace_steps: float | tuple[float, float] | Mapping = 0.8,
        self_replace_steps: float | tuple[float, float] = 0.4,
        self_replace_max_res: int | None = None,
        equalizer: Mapping | None = None,
        local_blend: LocalBlend | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_attention: bool = True,
        return_self_attention: bool = False,
        attention_res: int | None = None,
        truncate_prompts: bool = False,
        eta: float = 0.0,
        cross_attention_kwargs: dict | None = None,
        inversion: Inversion | None = None,
    ):
        r"""Generate the source image and edit it into one image per target prompt.

        Args:
            prompt: the source prompt.
            edit_prompts: one or more target prompts, denoised together with the source. None
                generates the source alone (its attention maps are still recorded).
            edit: ``"auto"`` (replace when the word counts match, else refine), ``"replace"``,
                ``"refine"`` or ``"none"`` (same noise only, no injection).
            cross_replace_steps: fraction of the steps, ``(start, end)`` fractions, or a dict of
                such per target word with ``"default_"`` for the other tokens, during which the
                source's cross-attention is injected.
            self_replace_steps: fraction or ``(start, end)`` during which the source's
                self-attention is injected.
            self_replace_max_res: largest attention-map side whose self-attention is injected;
                None = the latent side // 4 (16 at SD 512, as the paper's code).
            equalizer: ``{word: factor}`` (or a list of factors, one per target) re-weighting the
                attention of target words; 0, negative and > 1 are allowed. Applied where
                cross-attention is injected; with ``edit="none"`` it scales the target's own maps.
            local_blend: a `LocalBlend` restricting the edit to the named words' region.
            num_inference_steps: denoising steps (default 50, or the inversion's).
            guidance_scale: classifier-free guidance scale; <= 1 disables guidance (default 7.5,
                or the inversion's).
            height: image height in pixels (default: the UNet's sample size times the VAE factor).
            width: image width in pixels.
            negative_prompt: prompt(s) for the unconditional half of guidance (default ``""``).
            generator: draws the one initial noise that the source and all targets share and, with a
                stochastic scheduler (DDPM, Euler ancestral, DDIM with ``eta > 0``), each step's
                noise, again one draw for all prompts (`same_noise_generators`).
            latents: initial noise ``(1 or prompts, channels, height/f, width/f)`` with the model's dtype and device.
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

        Returns:
            `Prompt2PromptPipelineOutput` (or ``(images, attention)`` when ``return_dict=False``).

        Raises:
            ValueError: any bad argument, before any denoising starts.
        """
        # ---- validate everything before any work
        device = self._execution_device
        dtype = self.unet.dtype
        source = self._tokenize(prompt, "prompt", truncate_prompts)
        if isinstance(edit_prompts, str):
            edit_prompts = [edit_prompts]
        if edit_prompts is not None:
            if not isinstance(edit_prompts, Sequence) or len(edit_prompts) == 0:
                raise ValueError("edit_prompts is empty; give at least one target prompt, or None to only generate")
            targets = [self._tokenize(p, f"edit_prompts[{k}]", truncate_prompts) for k, p in enumerate(edit_prompts)]
        else:
            targets = []
            if equalizer is not None or local_blend is not None:
                raise ValueError("equalizer and local_blend edit target prompts; give edit_prompts as well")
        if local_blend is not None and not isinstance(local_blend, LocalBlend):
            raise ValueError(f"local_blend must be a LocalBlend, got {type(local_blend).__name__}")
        mode = EditMode.parse(edit)
        self._warn_unknown_words([source, *targets])
        n = 1 + len(targets)
        if isinstance(eta, bool) or not isinstance(eta, Real) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta!r}")
        if inversion is not None:
            num_inference_steps, guidance_scale, height, width = self._check_inversion(
                inversion, prompt, num_inference_steps, guidance_scale, height, width, latents, negative_prompt, eta
            )
        num_inference_steps = 50 if num_inference_steps is None else num_inference_steps
        guidance_scale = 7.5 if guidance_scale is None else guidance_scale
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if isinstance(generator, list) and len(generator) == 1:  # diffusers' one-image form
            generator = generator[0]
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be one torch.Generator (the source and every target share its seed), got {generator!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        height = self._check_size(height if height is not None else self._default_size(), "height")
        width = self._check_size(width if width is not None else self._default_size(), "width")
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        channels = self.unet.config.in_channels
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] not in (1, n) or tuple(latents.shape[1:]) != (channels, *latent_hw):
                shape = getattr(latents, "shape", None)
                raise ValueError(f"latents must have shape (1 or {n}, {channels}, {latent_hw[0]}, {latent_hw[1]}), got {shape}")
            if latents.dtype != dtype or latents.device.type != torch.device(device).type:
                raise ValueError(
                    f"latents are {latents.dtype} on {latents.device} but the model is {dtype} on {device}; "
                    f"pass latents.to(device={str(device)!r}, dtype={dtype})"
                )
        sides = attention_sides(self.unet, latent_hw)
        default_side = max(latent_hw) // 4
        blend_res = None
        if local_blend is not None:
            blend_res = local_blend.resolution if local_blend.resolution is not None else _closest_side(sides, default_side)
            if blend_res not in sides:
                raise ValueError(f"LocalBlend resolution {blend_res} is not a cross-attention map side of this model at this size; use one of {sides}")
        if attention_res is not None and attention_res not in sides:
            raise ValueError(f"attention_res {attention_res} is not a cross-attention map side of this model at this size; use one of {sides}")
        record_res = (attention_res or _closest_side(sides, default_side)) if return_attention else None
        self_res = (attention_res or _closest_side(sides, default_side)) if return_self_attention else None
        if self_replace_max_res is None:
            self_replace_max_res = default_side
        elif isinstance(self_replace_max_res, bool) or not isinstance(self_replace_max_res, int) or self_replace_max_res < 0:
            raise ValueError(f"self_replace_max_res must be a non-negative integer side or None, got {self_replace_max_res!r}")
        negative_ids = self._negative_ids(negative_prompt, n, truncate_prompts)

        scheduler = self.scheduler if inversion is None else inversion_scheduler(self)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        if inversion is not None and not torch.equal(timesteps.cpu().long(), inversion.timesteps.long()):
            raise ValueError("this pipeline's scheduler config gives other DDIM timesteps than the inversion's; invert the image with this pipeline")
        plan: EditPlan | None = None
        if targets:
            plan = build_edit_plan(
                source, targets, mode, len(timesteps), cross_replace_steps, self_replace_steps,
                self_replace_max_res, equalizer, local_blend, blend_res or 0,
            ).to(device)
            if mode is EditMode.AUTO:
                logger.info("edit='auto' chose %s", plan.mode.value)

        # ---- prompts -> embeddings, noise
        guidance = guidance_scale > 1.0
        prompt_ids = [source.ids] + [t.ids for t in targets]
        embeds = self._encode(prompt_ids, device, dtype)  # (prompts, tokens, dim)
        method = inversion.method if inversion is not None else None
        null_embeds = None
        if guidance:
            if method is InversionMethod.NEGATIVE_PROMPT:
                negative = embeds[:1].expand(n, -1, -1)  # the source prompt's embedding as the null text
            else:
                negative = self._encode(negative_ids, device, dtype)
            embeds = torch.cat([negative, embeds])  # (2*prompts, tokens, dim)
            if method is InversionMethod.NULL_TEXT:
                null_embeds = inversion.null_embeddings.to(device=device, dtype=dtype)  # (steps, tokens, dim)
        trajectory = None
        if method is InversionMethod.DIRECT:
            trajectory = inversion.trajectory.to(device=device, dtype=dtype)  # (steps + 1, C, h, w)
        if inversion is not None:
            latents = inversion.latent.to(device=device, dtype=dtype)
        elif latents is None:
            latents = randn_tensor((1, channels, *latent_hw), generator=generator, device=device, dtype=dtype)
        latents = latents.expand(n, -1, -1, -1).clone() * scheduler.init_noise_sigma  # (prompts, C, h, w)
        extra = {}
        step_params = set(inspect.signature(scheduler.step).parameters)
        if "eta" in step_params:
            extra["eta"] = eta
        step_generator = None  # a stochastic step's noise: one draw, the same for every prompt row
        if "generator" in step_params:
            step_generator = generator
            if step_generator is None:  # seeded from torch's global generator, so torch.manual_seed reproduces it
                step_generator = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, ())))

        # ---- denoising loop with the P2P processors installed
        record = {s for s in (record_res, blend_res) if s is not None}
        controller = P2PController(plan, n, guidance, latent_hw, record, self_res)
        user_kwargs = dict(cross_attention_kwargs or {})
        with p2p_attention(self.unet, controller), self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                model_in = torch.cat([latents] * 2) if guidance else latents  # (batch, C, h, w)
                model_in = scheduler.scale_model_input(model_in, t)
                if null_embeds is not None:  # null-text inversion: this step's optimised unconditional embedding
                    embeds[:n] = null_embeds[i]
                noise = self.unet(
                    model_in, t, encoder_hidden_states=embeds,
                    cross_attention_kwargs={**user_kwargs, "p2p_step": i}, return_dict=False,
                )[0]
                if guidance:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                if step_generator is not None:
                    extra["generator"] = same_noise_generators(step_generator, n)
                latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                if step_generator is not None:
                    step_generator.set_state(extra["generator"][0].get_state())
                if trajectory is not None:  # direct inversion: adding the gap (inverted - denoised) to the source row
                    latents[:1] = trajectory[i + 1 : i + 2]  # puts it on the inverted latent exactly
                if plan is not None and plan.blend is not None and i >= plan.blend.start_step:
                    latents = self._local_blend(latents, controller.maps[plan.blend.resolution], plan, latent_hw)
                bar.update()

        # ---- decode
        attention = None
        if record_res is not None:
            maps = controller.maps[record_res] / controller.layer_calls[record_res]
            attention = AttentionMaps(maps.cpu(), [source, *targets], record_res)
        flags = None
        if output_type == "latent":
            images = latents
        else:
            scaled = latents / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None):
                scaled = scaled + self.vae.config.shift_factor
            decoded = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
            decoded, flags = self._run_safety_checker(decoded, device, embeds.dtype)
            denormalize = [not f for f in flags] if flags is not None else None
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        mode_out = plan.mode if plan is not None else None
        if not return_dict:
            return images, attention
        self_map = None
        if self_res is not None and controller.self_calls:
            self_map = (controller.self_map / controller.self_calls).cpu()  # (pixels, pixels)
        return Prompt2PromptPipelineOutput(
            images=images, attention=attention, edit_mode=mode_out, nsfw_content_detected=flags,
            self_attention=self_map, self_attention_res=self_res if self_map is not None else None,
        )

    @staticmethod
    def _local_blend(latents: torch.Tensor, maps: torch.Tensor, plan: EditPlan, latent_hw) -> torch.Tensor:
        blend = plan.blend
        mask = local_blend_mask(maps, blend.words, blend.threshold, latent_hw)  # (prompts, 1, h, w)
        if blend.subtract is not None:
            mask = mask & ~local_blend_mask(maps, blend.subtract, blend.subtract_threshold, latent_hw, pool=False)
        return blend_latents(latents, mask)
