"""`Prompt2PromptXLPipeline`: Prompt-to-Prompt on Stable Diffusion XL.

The SDXL family differs from Stable Diffusion only in what conditions the UNet: two CLIP text
encoders whose penultimate hidden states are concatenated on the feature axis, and the "added
conditions" (the second encoder's pooled, projected text embedding and the six size and crop
"time ids") that go with every row of the batch. Everything else, the plan, the attention
processors, Algorithm 1's loop and LocalBlend, is `Prompt2PromptPipeline`'s, inherited.

Word positions come from the first tokenizer. SDXL's two tokenizers split words alike and differ
in padding only (the second pads with ``"!"``), so position ``i`` of the concatenated states holds
both encoders' states of the same token; `Prompt2PromptXLPipeline.check_inputs` refuses a prompt
the two tokenize differently.
"""

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import checks
from .alignment import PromptTokens
from .arguments import ArgumentError, default
from .edits import EditMode, LocalBlend
from .inversion import Inversion, InversionMethod
from .pipeline import CheckedInputs, CheckedInvert, InversionConditioning, Prompt2PromptPipeline
from .source_pass import SourcePass, fill_defaults, source_row_values

#: The components an SDXL folder has beyond Stable Diffusion's.
_XL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
#: The arguments whose pairs make the added time ids, in their order, each with its least value.
TIME_ID_ARGUMENTS = {"original_size": 1, "crops_coords_top_left": 0, "target_size": 1}
#: The text components Prompt-to-Prompt needs that an SDXL refiner (image-to-image only) lacks.
_BASE_COMPONENTS = ("text_encoder", "tokenizer")
_REFINER = ("; an SDXL refiner has no first text encoder, so Prompt-to-Prompt cannot condition it on the prompt's words: "
            "use the base SDXL model (refine its images separately)")


def missing_components(has, what: str, sd_fix: str) -> str | None:
    """Why a model's components are not a base SDXL model's, in one line, or None when they are.

    Args:
        has: ``has(name)`` tells whether the component ``name`` is present (not None).
        what: what the message calls the model (``"model"``, ``"pipeline"``).
        sd_fix: how to load it when it is a Stable Diffusion model (no second text encoder).

    Returns:
        ``"no <components>, ..."`` naming the missing components and the fix: a Stable Diffusion
        model lacks the second encoder, a refiner the first; None when all four text components are there.
    """
    missing_xl = [c for c in _XL_COMPONENTS if not has(c)]
    if missing_xl:
        return f"no {' or '.join(missing_xl)}, so it is not an SDXL {what}; {sd_fix}"
    missing_base = [c for c in _BASE_COMPONENTS if not has(c)]
    if missing_base:
        return f"no {' or '.join(missing_base)}{_REFINER}"
    return None


@dataclass(frozen=True)
class CheckedXLInputs(CheckedInputs):
    """`CheckedInputs` and what SDXL adds (`Prompt2PromptXLPipeline.check_inputs`).

    Attributes:
        ids_2: the second tokenizer's ids of each prompt row (source first): of ``prompt_2`` when
            given, else of the row's own prompt (then as long as the first tokenizer's).
        negative_ids_2: the second tokenizer's ids of each row's unconditional prompt.
        zero_negative: the unconditional rows are zeros (no ``negative_prompt`` and the pipeline's
            ``force_zeros_for_empty_prompt``), as diffusers' SDXL pipeline makes them.
        time_ids: ``original_size + crops_coords_top_left + target_size``, each ``(height, width)``
            or ``(top, left)``: the added "time ids" of every row.
        guidance_rescale: guidance rescale (0: none).
    """

    ids_2: tuple[tuple[int, ...], ...] = ()
    negative_ids_2: tuple[tuple[int, ...], ...] = ()
    zero_negative: bool = False
    time_ids: tuple[int, ...] = ()
    guidance_rescale: float = 0.0


@dataclass(frozen=True)
class CheckedXLInvert(CheckedInvert):
    """`CheckedInvert` and what SDXL adds (`Prompt2PromptXLPipeline.invert`).

    Attributes:
        ids_2: the second tokenizer's ids of the source prompt (one row).
        negative_ids_2: the second tokenizer's ids of the unconditional prompt (none with ``zero_negative``).
        zero_negative: the unconditional states and pooled embedding are zeros (no ``negative_prompt``
            and ``force_zeros_for_empty_prompt``).
        time_ids: ``original_size + crops_coords_top_left + target_size``.
    """

    ids_2: tuple[tuple[int, ...], ...] = ()
    negative_ids_2: tuple[tuple[int, ...], ...] = ()
    zero_negative: bool = False
    time_ids: tuple[int, ...] = ()


def time_ids_of(size: tuple[int, int], original_size, crops_coords_top_left, target_size) -> tuple[int, ...]:
    """SDXL's added time ids ``original_size + crops_coords_top_left + target_size`` (six integers),
    the sizes defaulting to the image's ``size`` ``(height, width)``; each pair checked (`_pair`)."""
    return (*_pair("original_size", size if original_size is None else original_size, 1),
            *_pair("crops_coords_top_left", crops_coords_top_left, 0),
            *_pair("target_size", size if target_size is None else target_size, 1))


def time_ids_against_inversion(inv: Inversion, original_size, crops_coords_top_left, target_size) -> tuple:
    """The edit's time-id arguments with the inversion's where a size is None; an `ArgumentError`
    naming the first argument given that differs from the inversion's."""
    given = (original_size, crops_coords_top_left, target_size)
    stored = [tuple(inv.time_ids[2 * k: 2 * k + 2]) for k in range(len(TIME_ID_ARGUMENTS))]  # pairs, in TIME_ID_ARGUMENTS' order
    out = []
    for (name, minimum), value, pair in zip(TIME_ID_ARGUMENTS.items(), given, stored):
        if value is None:
            out.append(pair)
            continue
        if _pair(name, value, minimum) != pair:
            raise ArgumentError(name, f"{name}={tuple(value)!r} but the image was inverted with {name}={pair!r}; the source row "
                                f"reconstructs the photo only under the same time ids, so leave it out or pass {pair!r}")
        out.append(value)
    return tuple(out)


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    """``value`` as a pair of integers >= ``minimum``, or an `ArgumentError` naming ``name``."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
    if not ok:
        raise ArgumentError(name, f"{name} must be a pair of integers >= {minimum} like (1024, 1024), got {value!r}")
    return int(value[0]), int(value[1])


def _rows(name: str, value, fallback: Sequence[str], count: int) -> list[str]:
    """One string per prompt row: ``fallback`` for None, ``value`` for each row when it is a
    string, else ``value`` itself (checked to hold ``count`` strings)."""
    if value is None:
        return list(fallback)
    rows = [value] * count if isinstance(value, str) else value
    if not isinstance(rows, Sequence) or len(rows) != count or not all(isinstance(r, str) for r in rows):
        raise ArgumentError(name, f"{name} must be a string or a list of {count} strings (one per prompt, source first), got {value!r}")
    return list(rows)


def check_xl_components(text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet) -> None:
    """Refuse components that are not SDXL's, before anything runs.

    Args:
        text_encoder: the first CLIP text encoder.
        text_encoder_2: the second, with a text projection (its pooled output is an added condition).
        tokenizer: the first tokenizer.
        tokenizer_2: the second tokenizer (same length limit as the first).
        unet: a UNet with ``addition_embed_type="text_time"`` whose cross-attention takes both
            encoders' states side by side.

    Raises:
        ValueError: naming the component that does not fit and what to use instead.
    """
    sd = "; a Stable Diffusion (not XL) model loads with Prompt2PromptPipeline"
    if text_encoder_2 is None or tokenizer_2 is None:
        raise ValueError(f"SDXL needs text_encoder_2 and tokenizer_2, got {type(text_encoder_2).__name__} and "
                         f"{type(tokenizer_2).__name__}{sd}")
    if text_encoder is None or tokenizer is None:
        raise ValueError(f"SDXL needs text_encoder and tokenizer, got {type(text_encoder).__name__} and "
                         f"{type(tokenizer).__name__}{_REFINER}")
    if getattr(text_encoder_2.config, "projection_dim", None) is None or not hasattr(text_encoder_2, "text_projection"):
        raise ValueError(f"text_encoder_2 must be a CLIPTextModelWithProjection (its text_embeds condition the UNet), "
                         f"got {type(text_encoder_2).__name__}")
    if unet.config.addition_embed_type != "text_time":
        raise ValueError(f"the unet's addition_embed_type is {unet.config.addition_embed_type!r}, SDXL's is 'text_time'{sd}")
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    if unet.config.cross_attention_dim != width:
        raise ValueError(f"the unet's cross_attention_dim is {unet.config.cross_attention_dim}, but the two text encoders' "
                         f"states concatenate to {width}; use the text encoders the UNet was trained with")
    if tokenizer.model_max_length != tokenizer_2.model_max_length:
        raise ValueError(f"tokenizer and tokenizer_2 take {tokenizer.model_max_length} and {tokenizer_2.model_max_length} tokens; "
                         "their states are concatenated position by position, so they must take the same length")


def check_xl_folder(folder: str | os.PathLike) -> None:
    """Refuse a local model folder whose ``model_index.json`` lacks SDXL's second text encoder or
    tokenizer (a Stable Diffusion folder) or its first ones (an SDXL refiner), naming the missing
    components (`missing_components`).

    Args:
        folder: a folder written by ``save_pretrained``; a missing or unreadable index is left to
            `model_folder.check_model_folder`, which names it.

    Raises:
        ArgumentError: (``model``) the folder is not an SDXL model.
    """
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return  # `check_model_folder` names the missing index
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # `check_model_folder` names the damaged index
    reason = missing_components(lambda c: isinstance(spec, dict) and isinstance(spec.get(c), list) and bool(spec[c])
                                and spec[c][0] is not None, "model", "load it with Prompt2PromptPipeline, or name an SDXL folder")
    if reason is not None:
        kind = spec.get("_class_name", "unknown class") if isinstance(spec, dict) else "no index"
        raise ArgumentError("model", f"{folder} ({kind}) has {reason}")


class Prompt2PromptXLPipeline(Prompt2PromptPipeline):
    r"""Prompt-to-Prompt editing (Hertz et al., 2022) on Stable Diffusion XL.

    The same call as `Prompt2PromptPipeline` (the source and every target denoised together from
    one noise, the source's attention injected into the targets), plus SDXL's ``prompt_2``,
    ``negative_prompt_2``, ``original_size``, ``crops_coords_top_left``, ``target_size`` and
    ``guidance_rescale``. `invert` and ``inversion=`` work as on Stable Diffusion (all four methods).

    Args:
        vae: the `AutoencoderKL` that decodes latents.
        text_encoder: the first CLIP text encoder (`CLIPTextModel`).
        text_encoder_2: the second, `CLIPTextModelWithProjection`.
        tokenizer: the first tokenizer; word positions are its token positions.
        tokenizer_2: the second tokenizer.
        unet: a `UNet2DConditionModel` with ``addition_embed_type="text_time"``.
        scheduler: any diffusers scheduler.
        force_zeros_for_empty_prompt: without ``negative_prompt``, the unconditional states and
            pooled embedding are zeros (SDXL base's setting), as in diffusers.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = []
    model_family = "sdxl"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        force_zeros_for_empty_prompt: bool = True,
    ):
        check_xl_components(text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet)
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self._init_state()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False, **kwargs):
        """Load a diffusers SDXL folder or hub id (see `Prompt2PromptPipeline.from_pretrained`:
        safetensors only unless ``allow_pickle``, a local folder checked file by file first).

        Args:
            pretrained_model_name_or_path: a local SDXL pipeline folder or a hub id.
            *args: passed on to `DiffusionPipeline.from_pretrained`.
            allow_pickle: allow pickle (``.bin``) checkpoints.
            **kwargs: passed on to `DiffusionPipeline.from_pretrained` (e.g. ``torch_dtype``).

        Returns:
            The loaded `Prompt2PromptXLPipeline`.

        Raises:
            ArgumentError: no folder named, or a local folder without SDXL's second encoder.
            ValueError: as `Prompt2PromptPipeline.from_pretrained`.
        """
        if pretrained_model_name_or_path is None:
            raise ArgumentError("model", "Prompt2PromptXLPipeline has no bundled model; name an SDXL folder or hub id")
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and Path(pretrained_model_name_or_path).is_dir():
            check_xl_folder(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, allow_pickle=allow_pickle, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """A `Prompt2PromptXLPipeline` on the modules of another SDXL pipeline (e.g. diffusers'
        `StableDiffusionXLPipeline`), sharing their weights.

        Args:
            pipeline: a pipeline with SDXL's components.
            **kwargs: components or config to replace (see `DiffusionPipeline.from_pipe`).

        Returns:
            The new pipeline.

        Raises:
            ArgumentError: ``pipeline`` lacks SDXL's second text encoder or tokenizer.
        """
        reason = missing_components(lambda c: kwargs[c] is not None if c in kwargs else getattr(pipeline, c, None) is not None,
                                    "pipeline", "use Prompt2PromptPipeline.from_pipe for Stable Diffusion")
        if reason is not None:
            raise ArgumentError("model", f"{type(pipeline).__name__} has {reason}")
        return super().from_pipe(pipeline, **kwargs)

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
        negative_prompt_2: str | None = default("negative_prompt_2"),
        original_size: tuple[int, int] | None = default("original_size"),
        crops_coords_top_left: tuple[int, int] = default("crops_coords_top_left"),
        target_size: tuple[int, int] | None = default("target_size"),
    ) -> Inversion:
        r"""Invert a real image on SDXL, to edit it with ``pipe(prompt, edit_prompts, inversion=inv)``.

        `Prompt2PromptPipeline.invert` with SDXL's conditioning: the UNet sees the source's
        concatenated text states, its pooled embedding and the time ids; the unconditional
        prediction its own states and pooled embedding (zeros with ``force_zeros_for_empty_prompt``
        and no ``negative_prompt``, else the negative prompt's). Null-text inversion optimises the
        per-token unconditional states ``(tokens, dim_1 + dim_2)`` of each step and keeps the pooled
        unconditional embedding fixed; the `Inversion` records it and the time ids, and edits use
        the same.

        Args:
            image: as `Prompt2PromptPipeline.invert`, as are the arguments up to ``cuda_graph``.
            prompt: a caption of the image; the source prompt of the edits.
            method: ``"null-text"``, ``"negative-prompt"``, ``"direct"`` or ``"ddim"``.
            num_inference_steps: DDIM steps (the edits use the same).
            guidance_scale: the guidance the edits will use (null-text optimises for it).
            height: pixels (default: the model's resolution).
            width: pixels (default: the model's resolution).
            num_inner_steps: null-text: at most this many Adam evaluations per step.
            early_stop_epsilon: null-text: the early-stop threshold at step 0.
            negative_prompt: the text whose states and pooled embedding make the unconditional
                prediction (None: zeros with ``force_zeros_for_empty_prompt``, else ``""``).
            cuda_graph: null-text on CUDA, experimental (see `Prompt2PromptPipeline.invert`).
            negative_prompt_2: the second encoder's unconditional text; None: ``negative_prompt``.
            original_size: SDXL's original-size condition ``(height, width)``; None: the image's.
            crops_coords_top_left: SDXL's crop condition ``(top, left)``.
            target_size: SDXL's target-size condition ``(height, width)``; None: the image's.

        Returns:
            An `Inversion` with ``family="sdxl"`` and its ``time_ids`` (and, for null-text, ``null_pooled``).

        Raises:
            ArgumentError: a bad argument or unreadable image, named by ``.argument``, before any model work.
        """
        checked = self._check_invert_inputs(method, prompt, num_inference_steps, guidance_scale, height, width, num_inner_steps,
                                            early_stop_epsilon, cuda_graph, negative_prompt, negative_prompt_2, original_size,
                                            crops_coords_top_left, target_size)
        return self._invert(image, checked)

    def _check_invert_inputs(self, method, prompt, num_inference_steps, guidance_scale, height, width, num_inner_steps,
                             early_stop_epsilon, cuda_graph, negative_prompt=None, negative_prompt_2=None, original_size=None,
                             crops_coords_top_left=(0, 0), target_size=None) -> CheckedXLInvert:
        """`invert`'s arguments, all checked: Stable Diffusion's, the second tokenizer's ids and the time ids."""
        base = super()._check_invert_inputs(method, prompt, num_inference_steps, guidance_scale, height, width, num_inner_steps,
                                            early_stop_epsilon, cuda_graph, negative_prompt)
        ids_2 = self._second_ids([base.source], None, False)
        zero = negative_prompt is None and bool(self.config.force_zeros_for_empty_prompt)
        negative_ids_2 = ()
        if not zero:
            name = "negative_prompt_2" if negative_prompt_2 else "negative_prompt"
            negative_ids_2 = self._negative_ids(negative_prompt_2 or negative_prompt, 1, False, self.tokenizer_2, name)
        time_ids = time_ids_of((base.height, base.width), original_size, crops_coords_top_left, target_size)
        self._check_time_ids(time_ids)
        checked = {f.name: getattr(base, f.name) for f in fields(CheckedInvert)}
        return CheckedXLInvert(**checked, ids_2=tuple(tuple(r) for r in ids_2), negative_ids_2=tuple(tuple(r) for r in negative_ids_2),
                               zero_negative=zero, time_ids=time_ids)

    def _inversion_conditioning(self, checked: CheckedXLInvert, device) -> InversionConditioning:
        """Both encoders' states of the source and of the unconditional prompt ``(1, tokens, dim_1 +
        dim_2)``, each with its own pooled embedding ``(1, projection_dim)`` and the time ids as the
        UNet's added conditions."""
        cond, uncond, pooled, uncond_pooled = self.encode_prompt(
            [checked.source], device, True, None if checked.zero_negative else checked.negative_ids, checked.ids_2,
            checked.negative_ids_2,
        )
        time_ids = torch.tensor([checked.time_ids], dtype=cond.dtype, device=device)  # (1, time ids)
        return InversionConditioning(cond, uncond, {"text_embeds": pooled, "time_ids": time_ids},
                                     {"text_embeds": uncond_pooled, "time_ids": time_ids})

    def _inversion_record(self, checked: CheckedXLInvert, conditioning: InversionConditioning) -> dict:
        """The time ids, and for null-text the pooled unconditional embedding ``(1, projection_dim)``
        that the optimisation held fixed: an edit must use the same."""
        null_pooled = None
        if checked.method is InversionMethod.NULL_TEXT:
            null_pooled = conditioning.uncond_added["text_embeds"].detach().float().cpu().clone()  # (1, projection_dim)
        return {"time_ids": tuple(checked.time_ids), "null_pooled": null_pooled}

    def _text_state_width(self) -> int:
        """The width of the text states the UNet attends to: both encoders' hidden sizes together."""
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    def _check_inversion_shapes(self, inv: Inversion) -> None:
        """Stable Diffusion's checks (latent, and null-text states ``dim_1 + dim_2`` wide), the time
        ids, and null-text's pooled unconditional embedding against ``text_encoder_2``'s projection."""
        super()._check_inversion_shapes(inv)
        if inv.time_ids is None or len(inv.time_ids) != 2 * len(TIME_ID_ARGUMENTS):
            raise ArgumentError("inversion", f"the inversion records the time ids {inv.time_ids!r}, not the {2 * len(TIME_ID_ARGUMENTS)} "
                                f"integers of {', '.join(TIME_ID_ARGUMENTS)}; invert the image with this pipeline")
        if inv.method is InversionMethod.NULL_TEXT:
            want = (1, self.text_encoder_2.config.projection_dim)
            got = None if inv.null_pooled is None else tuple(inv.null_pooled.shape)
            if got != want:
                raise ArgumentError("inversion", f"the inversion's pooled unconditional embedding is {got}, this model needs {want}; "
                                    "invert the image with this pipeline")

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
        prompt_2: str | Sequence[str] | None = default("prompt_2"),
        negative_prompt_2: str | Sequence[str] | None = default("negative_prompt_2"),
        original_size: tuple[int, int] | None = default("original_size"),
        crops_coords_top_left: tuple[int, int] = default("crops_coords_top_left"),
        target_size: tuple[int, int] | None = default("target_size"),
        guidance_rescale: float = default("guidance_rescale"),
    ) -> CheckedXLInputs:
        """Check a call's arguments against the model and resolve their defaults; no model runs.

        Args:
            prompt: see `Prompt2PromptPipeline.check_inputs`, as are the arguments up to ``eta``.
            edit_prompts: the target prompt(s), or None.
            edit: the `EditMode` or its name.
            equalizer: ``{word: factor}``; needs ``edit_prompts``.
            local_blend: a `LocalBlend`; needs ``edit_prompts``.
            self_replace_max_res: largest side whose self-attention is injected, or None.
            num_inference_steps: denoising steps, or None (the table's).
            guidance_scale: guidance scale, or None (the table's).
            height: pixels, or None (the model's).
            width: pixels, or None (the model's).
            negative_prompt: the unconditional prompt, or one per prompt, or None (zeros when
                ``force_zeros_for_empty_prompt``, else ``""``).
            generator: one `torch.Generator`, or None.
            latents: initial latents ``(1 or prompts, C, h, w)``, or None.
            output_type: one of `arguments.OUTPUT_TYPES`.
            return_attention: whether cross-attention maps are recorded.
            return_self_attention: whether the source's self-attention is recorded.
            attention_res: the side of the recorded maps, or None.
            truncate_prompts: cut prompts longer than the tokenizers' limit instead of raising.
            eta: DDIM's eta.
            inversion: an `Inversion` made by an SDXL model (`invert`), checked as on Stable Diffusion
                and against the time-id arguments: a size left None takes the inversion's, one that
                differs is refused.
            prompt_2: the second text encoder's text: one for every row, or one per prompt (source
                first); None: each row's own prompt, which must tokenize alike in both tokenizers.
            negative_prompt_2: the second encoder's unconditional text(s); None: ``negative_prompt``.
            original_size: the ``(height, width)`` time id of the training image's size (default
                the image's).
            crops_coords_top_left: the ``(top, left)`` crop time id.
            target_size: the ``(height, width)`` target-size time id (default the image's).
            guidance_rescale: 0 (none) or more; see `pipeline.rescale_guidance`.

        Returns:
            The `CheckedXLInputs`.

        Raises:
            ArgumentError: naming the first bad argument (``.argument``); ValueError from the edit's checks.
        """
        base = super().check_inputs(prompt, edit_prompts, edit, equalizer, local_blend, self_replace_max_res, num_inference_steps,
                                    guidance_scale, height, width, negative_prompt, generator, latents, output_type, return_attention,
                                    return_self_attention, attention_res, truncate_prompts, eta, inversion)
        if inversion is not None:
            self._check_xl_inversion(inversion, prompt_2, negative_prompt_2)
            original_size, crops_coords_top_left, target_size = time_ids_against_inversion(
                inversion, original_size, crops_coords_top_left, target_size)
        ids_2 = self._second_ids(base.prompts, prompt_2, truncate_prompts)
        zero = negative_prompt is None and bool(self.config.force_zeros_for_empty_prompt)
        negative_ids_2 = ()
        if not zero:
            name = "negative_prompt_2" if negative_prompt_2 else "negative_prompt"
            negative_ids_2 = self._negative_ids(negative_prompt_2 or negative_prompt, len(base.prompts), truncate_prompts, self.tokenizer_2, name)
        time_ids = time_ids_of((base.height, base.width), original_size, crops_coords_top_left, target_size)
        self._check_time_ids(time_ids)
        rescale = checks.finite_number("guidance_rescale", guidance_rescale)
        if rescale < 0:
            raise ArgumentError("guidance_rescale", f"guidance_rescale must be >= 0 (0: no rescale, 0.7 as Lin et al.), got {guidance_rescale!r}")
        checked = {f.name: getattr(base, f.name) for f in fields(CheckedInputs)}
        return CheckedXLInputs(**checked, ids_2=tuple(tuple(r) for r in ids_2), negative_ids_2=tuple(tuple(r) for r in negative_ids_2),
                               zero_negative=zero, time_ids=time_ids, guidance_rescale=float(rescale))

    @staticmethod
    def _check_xl_inversion(inv: Inversion, prompt_2, negative_prompt_2) -> None:
        """Refuse, with an inversion, a second-encoder text that would change the conditioning the
        source was inverted under (``prompt_2``), or the unconditional half that null-text and
        negative-prompt inversion set themselves (``negative_prompt_2``)."""
        if prompt_2 is not None:
            raise ArgumentError("prompt_2", "the image was inverted with each prompt's own text in both encoders; drop prompt_2")
        if negative_prompt_2 is not None and inv.method in (InversionMethod.NULL_TEXT, InversionMethod.NEGATIVE_PROMPT):
            raise ArgumentError("negative_prompt_2", f"{inv.method.value} inversion sets the unconditional embedding itself; "
                                "drop negative_prompt_2")

    def _second_ids(self, prompts: Sequence[PromptTokens], prompt_2, truncate: bool) -> list[tuple[int, ...]]:
        """The second tokenizer's ids of each row: of ``prompt_2`` when given, else of the row's
        prompt, which must then fall into the same token positions as in the first tokenizer."""
        names = ["prompt", *(f"edit_prompts[{k}]" for k in range(len(prompts) - 1))]
        texts = _rows("prompt_2", prompt_2, [p.prompt for p in prompts], len(prompts))
        out = []
        for name, tokens, text in zip(names, prompts, texts):
            if prompt_2 is not None:
                out.append(self._tokenize(text, "prompt_2", truncate, self.tokenizer_2).ids)
                continue
            second = self._tokenize(text, name, truncate, self.tokenizer_2)
            if len(second.ids) != len(tokens.ids) or second.word_positions != tokens.word_positions:
                raise ArgumentError(name.split("[", 1)[0],
                                    f"{name} is {len(tokens.ids)} tokens long with tokenizer but {len(second.ids)} with tokenizer_2"
                                    f"{self._first_split_difference(tokens, second)}; the edit addresses both encoders' states by the "
                                    "first tokenizer's positions, so use tokenizers that split words alike, or give prompt_2 explicitly")
            out.append(second.ids)
        return out

    def _first_split_difference(self, tokens: PromptTokens, second: PromptTokens) -> str:
        """Words for `_second_ids`'s error: the first word the two tokenizers split into different
        numbers of tokens, and a hint when it holds tokenizer_2's pad token (SDXL's second tokenizer
        pads with "!" and reads every "!" of a prompt as that one-character token, so "!!", one token
        of the first tokenizer, is two of the second)."""
        for word, a, b in zip(tokens.words, tokens.word_positions, second.word_positions):
            if len(a) != len(b):
                pad = self.tokenizer_2.pad_token
                hint = (f" (tokenizer_2 reads each {pad!r} as its pad token: separate them with spaces, like "
                        f"{' '.join(word)!r})") if pad and pad in word else ""
                count = f"{len(a)} token" + ("" if len(a) == 1 else "s")
                return f": the word {word!r} is {count} with tokenizer but {len(b)} with tokenizer_2{hint}"
        return " (its words fall on other tokens)"

    def _check_time_ids(self, time_ids: Sequence[int]) -> None:
        """Refuse a UNet whose added-condition embedding does not take these time ids and the
        second encoder's pooled embedding (diffusers' check, before any UNet call)."""
        passed = self.unet.config.addition_time_embed_dim * len(time_ids) + self.text_encoder_2.config.projection_dim
        expected = self.unet.config.projection_class_embeddings_input_dim
        if passed != expected:
            raise ValueError(f"the unet's added-condition embedding takes {expected} features, but {len(time_ids)} time ids of "
                             f"{self.unet.config.addition_time_embed_dim} and text_encoder_2's projection of "
                             f"{self.text_encoder_2.config.projection_dim} make {passed}; use the UNet and text_encoder_2 of one SDXL model")

    # ----------------------------------------------------------------- stages

    def encode_prompt(
        self,
        prompts: Sequence[PromptTokens],
        device: torch.device,
        do_classifier_free_guidance: bool,
        negative_ids: Sequence[Sequence[int]] | None = None,
        ids_2: Sequence[Sequence[int]] | None = None,
        negative_ids_2: Sequence[Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Both encoders' states of the prompts, their pooled embeddings, and with guidance the same
        of each row's unconditional prompt (diffusers' SDXL ``encode_prompt``).

        Args:
            prompts: the tokenized prompts, source first (`CheckedInputs.prompts`).
            device: where the states are made.
            do_classifier_free_guidance: also make the unconditional states.
            negative_ids: the first tokenizer's ids of each row's unconditional prompt; None with
                guidance: zeros (``force_zeros_for_empty_prompt``).
            ids_2: the second tokenizer's ids of each prompt (`CheckedXLInputs.ids_2`); None: the
                prompts' own text through the second tokenizer.
            negative_ids_2: the second tokenizer's ids of each unconditional prompt (needed with
                ``negative_ids``).

        Returns:
            ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)``:
            states ``(prompts, tokens, dim_1 + dim_2)`` and pooled ``(prompts, projection_dim)`` in the
            UNet's dtype; the negatives are None without guidance.
        """
        dtype = self.unet.dtype
        if ids_2 is None:
            ids_2 = [self._tokenize(p.prompt, "prompt", False, self.tokenizer_2).ids for p in prompts]
        embeds, pooled = self._encode_pair([p.ids for p in prompts], ids_2, device, dtype)
        if not do_classifier_free_guidance:
            return embeds, None, pooled, None
        if negative_ids is None:
            return embeds, torch.zeros_like(embeds), pooled, torch.zeros_like(pooled)
        negative_embeds, negative_pooled = self._encode_pair(negative_ids, negative_ids_2, device, dtype)
        return embeds, negative_embeds, pooled, negative_pooled

    def _encode_pair(self, ids_1, ids_2, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states, pooled)``: both encoders' penultimate hidden states side by side ``(rows,
        tokens, dim_1 + dim_2)`` and the second's projected pooled embedding ``(rows, projection_dim)``."""
        first = self._encoder_output(self.text_encoder, self.tokenizer, ids_1, device)
        second = self._encoder_output(self.text_encoder_2, self.tokenizer_2, ids_2, device)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (rows, tokens, dim_1 + dim_2)
        return states.to(dtype=dtype), second.text_embeds.to(dtype=dtype)  # pooled: (rows, projection_dim)

    @staticmethod
    def _encoder_output(encoder, tokenizer, id_rows, device):
        """``encoder``'s output, with its hidden states, for token ids padded with ``tokenizer``'s
        pad token to its ``model_max_length`` (as diffusers pads; no attention mask)."""
        length, pad = tokenizer.model_max_length, tokenizer.pad_token_id
        ids = torch.tensor([list(r) + [pad] * (length - len(r)) for r in id_rows], device=device)  # (rows, tokens)
        return encoder(ids, output_hidden_states=True)

    def _conditioning(self, inputs: CheckedXLInputs, inversion: Inversion | None, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(prompt_embeds, embeds, added)``: the prompts' states ``(prompts, tokens, dim)``, every
        batch row's states ``(2 * prompts or prompts, tokens, dim)`` (unconditional half first with
        guidance) and the UNet's added conditions, one row each: its pooled text embedding, the same
        time ids. With an inversion the unconditional rows are what its method sets (`_inverted_negatives`)."""
        guidance = inputs.do_classifier_free_guidance
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            inputs.prompts, device, guidance, None if inputs.zero_negative else inputs.negative_ids, inputs.ids_2,
            inputs.negative_ids_2,
        )
        if guidance and inversion is not None:
            negative_embeds, negative_pooled = self._inverted_negatives(inversion, prompt_embeds, negative_embeds, pooled, negative_pooled)
        embeds = torch.cat([negative_embeds, prompt_embeds]) if guidance else prompt_embeds  # (2 * prompts or prompts, tokens, dim)
        text_embeds = torch.cat([negative_pooled, pooled]) if guidance else pooled  # (2 * prompts or prompts, projection_dim)
        time_ids = torch.tensor([inputs.time_ids], dtype=prompt_embeds.dtype, device=device)  # (1, time ids)
        added = {"text_embeds": text_embeds, "time_ids": time_ids.expand(len(embeds), -1)}  # every row: its pooled text, the same time ids
        return prompt_embeds, embeds, added

    @staticmethod
    def _inverted_negatives(inv: Inversion, prompt_embeds, negative_embeds, pooled, negative_pooled) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional rows' states ``(prompts, tokens, dim)`` and pooled embeddings ``(prompts,
        projection_dim)`` under an inversion: negative-prompt inversion (Miyake et al., 2023) gives
        every row the source's states and pooled embedding; null-text gives every row the pooled
        embedding its optimisation held fixed (its states are set per step by `_denoise`); the
        other methods keep the call's own."""
        n = prompt_embeds.shape[0]
        if inv.method is InversionMethod.NEGATIVE_PROMPT:
            return prompt_embeds[:1].expand(n, -1, -1), pooled[:1].expand(n, -1)  # (prompts, tokens, dim), (prompts, projection_dim)
        if inv.method is InversionMethod.NULL_TEXT:
            null_pooled = inv.null_pooled.to(device=pooled.device, dtype=pooled.dtype)  # (1, projection_dim)
            return negative_embeds, null_pooled.expand(n, -1)  # (prompts, projection_dim)
        return negative_embeds, negative_pooled

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's images of ``latents``, unscaled with the VAE's ``latents_mean`` / ``latents_std``
        where its config has them, decoded in float32 when a float16 VAE asks for it (``force_upcast``).

        Args:
            latents: ``(prompts, C, h, w)``.

        Returns:
            ``(prompts, 3, height, width)`` in about ``[-1, 1]``.
        """
        config = self.vae.config
        stats = self._latent_stats(latents)
        if stats is not None:
            mean, std = stats
            scaled = latents * std / config.scaling_factor + mean
        else:
            scaled = latents / config.scaling_factor
        with self._vae_upcast():
            return self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]

    def _encode_image(self, pixels, device) -> torch.Tensor:
        """The VAE's latent ``(1, C, h, w)`` float32 of a ``(height, width, 3)`` uint8 picture, encoded
        in float32 when a float16 VAE asks for it (``force_upcast``), as `decode_latents` decodes."""
        with self._vae_upcast():
            return super()._encode_image(pixels, device)

    def _model_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latent ``(1, C, h, w)`` in the UNet's space: normalised by the VAE's
        ``latents_mean`` / ``latents_std`` where its config has them, and scaled (what `decode_latents` undoes)."""
        stats = self._latent_stats(latent)
        if stats is None:
            return latent * self.vae.config.scaling_factor
        mean, std = stats
        return (latent - mean) * self.vae.config.scaling_factor / std

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE config's ``(latents_mean, latents_std)``, each ``(1, C, 1, 1)`` like ``like``, or None
        when the config lacks them."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)  # (1, C, 1, 1) each

    @contextmanager
    def _vae_upcast(self) -> Iterator[None]:
        """Run the VAE in float32 inside the block when it is float16 and its config asks for it
        (``force_upcast``: SDXL's VAE overflows in float16); back to float16 after."""
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    def run_safety_checker(self, image: torch.Tensor, device, dtype) -> tuple[torch.Tensor, None]:
        """SDXL pipelines have no safety checker: ``(image, None)``."""
        return image, None

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
        prompt_2: str | None = default("prompt_2"),
        negative_prompt_2: str | None = default("negative_prompt_2"),
        original_size: tuple[int, int] | None = default("original_size"),
        crops_coords_top_left: tuple[int, int] = default("crops_coords_top_left"),
        target_size: tuple[int, int] | None = default("target_size"),
        guidance_rescale: float = default("guidance_rescale"),
    ) -> SourcePass:
        r"""Run the source prompt alone once and keep what later edits read from it, on SDXL (see
        `Prompt2PromptPipeline.source`; the SDXL conditions are `__call__`'s).

        Args:
            prompt: the source prompt.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance.
            height: image height in pixels.
            width: image width in pixels.
            negative_prompt: the unconditional prompt (None: zeros with ``force_zeros_for_empty_prompt``).
            generator: draws the initial noise.
            latents: initial noise ``(1, C, h, w)``.
            inversion: an `Inversion` made by an SDXL model.
            eta: DDIM's eta.
            cross_replace_steps: the steps whose cross-attention is kept.
            self_replace_steps: the steps whose self-attention is kept.
            self_replace_max_res: the largest map side whose self-attention is kept.
            device: where the pass's tensors are kept (None: the pipeline's device).
            prompt_2: the second text encoder's text (None: the prompt).
            negative_prompt_2: the second encoder's unconditional text.
            original_size: SDXL's original-size condition.
            crops_coords_top_left: SDXL's crop condition.
            target_size: SDXL's target-size condition.
            guidance_rescale: rescale of the guided prediction.

        Returns:
            The `SourcePass`.

        Raises:
            ArgumentError: a bad argument, named by ``.argument``, before any UNet call.
        """
        inputs = self.check_inputs(prompt, None, "none", None, None, self_replace_max_res, num_inference_steps, guidance_scale,
                                   height, width, negative_prompt, generator, latents, "latent", False, False, None, False, eta,
                                   inversion, prompt_2, negative_prompt_2, original_size, crops_coords_top_left, target_size,
                                   guidance_rescale)
        given = source_row_values(negative_prompt=negative_prompt, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                                  original_size=original_size, target_size=target_size)
        return self._capture(inputs, inversion, eta, latents, cross_replace_steps, self_replace_steps, device, given)

    def _pass_conditioning(self, inputs: CheckedXLInputs, inversion: Inversion | None, device):
        """The batch rows' text states ``(2 * prompts or prompts, tokens, dim)`` and added conditions
        (pooled embeddings and time ids, one row each) as `__call__` makes them (`_conditioning`)."""
        _, embeds, added = self._conditioning(inputs, inversion, device)
        return embeds, added

    def _pass_identity(self, inputs: CheckedXLInputs, scheduler, eta: float, inversion: Inversion | None) -> dict:
        """Stable Diffusion's identity of the source's pass (`Prompt2PromptPipeline._pass_identity`)
        and the SDXL conditions of the source row: its second tokenizer's ids, the unconditional
        ones (None: zeros), the time ids and the guidance rescale."""
        identity = super()._pass_identity(inputs, scheduler, eta, inversion)
        time_ids = list(inputs.time_ids)
        identity.update(
            negative_prompt=None if inputs.zero_negative else identity["negative_prompt"], prompt_2=list(inputs.ids_2[0]),
            negative_prompt_2=None if inputs.zero_negative else list(inputs.negative_ids_2[0]), original_size=time_ids[0:2],
            crops_coords_top_left=time_ids[2:4], target_size=time_ids[4:6], guidance_rescale=float(inputs.guidance_rescale),
        )
        return identity

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
        prompt_2: str | Sequence[str] | None = default("prompt_2"),
        negative_prompt_2: str | Sequence[str] | None = default("negative_prompt_2"),
        original_size: tuple[int, int] | None = default("original_size"),
        crops_coords_top_left: tuple[int, int] = default("crops_coords_top_left"),
        target_size: tuple[int, int] | None = default("target_size"),
        guidance_rescale: float = default("guidance_rescale"),
    ):
        r"""Generate the source image and edit it into one image per target prompt, on SDXL.

        The arguments up to ``inversion`` are `Prompt2PromptPipeline.__call__`'s; the rest are
        diffusers' SDXL arguments. Defaults
        come from `arguments.ARGUMENTS`; the image side defaults to the UNet's sample size times
        the VAE's factor, the map sides to the latent's side over `pipeline.MAP_SIDE_DIVISOR`.

        Args:
            prompt: the source prompt.
            edit_prompts: one or more target prompts, or None.
            edit: ``"auto"``, ``"replace"``, ``"refine"`` or ``"none"``.
            cross_replace_steps: when the source's cross-attention is injected.
            self_replace_steps: when the source's self-attention is injected.
            self_replace_max_res: largest map side whose self-attention is injected (0 or a side
                the UNet has at this size).
            equalizer: ``{word: factor}`` re-weighting target words.
            local_blend: a `LocalBlend`.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance; <= 1 runs no unconditional half (SDXL-Turbo:
                0); an LCM-distilled UNet (``time_cond_proj_dim``) takes it as ``timestep_cond``
                instead (`pipeline.guidance_embedding`).
            height: image height in pixels.
            width: image width in pixels.
            negative_prompt: the unconditional prompt(s); None: zeros with
                ``force_zeros_for_empty_prompt`` (SDXL base), else ``""``.
            generator: draws the one initial noise all prompts share.
            latents: initial noise ``(1 or prompts, C, h, w)``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a `Prompt2PromptPipelineOutput` rather than a tuple.
            return_attention: record the cross-attention maps.
            return_self_attention: record the source's self-attention.
            attention_res: side of the recorded maps.
            truncate_prompts: cut prompts longer than the tokenizers' limit instead of raising.
            eta: DDIM eta.
            cross_attention_kwargs: passed on to the attention processors.
            inversion: an `Inversion` of a real image made by an SDXL model (`invert`): the source
                starts from its ``x_T`` and reconstructs the image, the targets edit it; ``prompt``
                must be the inverted prompt, steps, size, time ids and (for null-text) guidance
                and the pooled unconditional embedding follow the inversion; DDIM is used.
            source: a `SourcePass` of this prompt (`source`): only the target rows are denoised (see
                `Prompt2PromptPipeline.__call__`); the SDXL conditions left None take the pass's.
            keep_source: keep the source row's pass as ``out.source_pass`` (`Prompt2PromptPipeline.__call__`).
            source_device: where a kept pass's tensors go (None: the pipeline's device).
            prompt_2: the second text encoder's text (one for all rows, or one per prompt, source
                first); None: each row's prompt. Word positions, mappers and the equalizer address
                the first tokenizer's tokens; a ``prompt_2`` other than the prompt puts other
                tokens of the second encoder at those positions.
            negative_prompt_2: the second encoder's unconditional text(s); None: ``negative_prompt``.
            original_size: SDXL's original-size condition ``(height, width)``; None: the image's.
            crops_coords_top_left: SDXL's crop condition ``(top, left)``.
            target_size: SDXL's target-size condition ``(height, width)``; None: the image's.
            guidance_rescale: rescale of the guided prediction (Lin et al., 2023); 0: none.

        Returns:
            `Prompt2PromptPipelineOutput` (or ``(images, attention)`` when ``return_dict=False``).

        Raises:
            ArgumentError: a bad argument, named by ``.argument``, before any denoising starts.
            NonFiniteError: NaN or infinity in the latents (naming the step) or the decoded images (`finite`).
        """
        device = self._execution_device
        if source is not None:
            num_inference_steps, guidance_scale, height, width, negative_prompt = self._source_defaults(
                source, edit_prompts, num_inference_steps, guidance_scale, height, width, negative_prompt)
            prompt_2, negative_prompt_2, original_size, target_size = fill_defaults(
                source, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size, target_size=target_size).values()
        inputs = self.check_inputs(
            prompt, edit_prompts, edit, equalizer, local_blend, self_replace_max_res, num_inference_steps, guidance_scale,
            height, width, negative_prompt, generator, latents, output_type, return_attention, return_self_attention,
            attention_res, truncate_prompts, eta, inversion, prompt_2, negative_prompt_2, original_size, crops_coords_top_left,
            target_size, guidance_rescale,
        )
        scheduler, timesteps = self._prepare_scheduler(inputs.num_inference_steps, inversion, device)
        plan = self._plan_edit(inputs, len(timesteps), cross_replace_steps, self_replace_steps, equalizer, local_blend, device)
        budget = self._keep_budget(keep_source, source, return_dict, cross_replace_steps, self_replace_steps, len(timesteps))
        given = source_row_values(negative_prompt=negative_prompt, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                                  original_size=original_size, target_size=target_size)
        if source is not None:
            latents = self._check_source(source, inputs, plan, scheduler, eta, inversion, given, generator, latents)

        # Algorithm 1: every prompt, source first, in one batch from the same initial latent
        guidance, n = inputs.do_classifier_free_guidance, len(inputs.prompts)
        prompt_embeds, embeds, added = self._conditioning(inputs, inversion, device)
        null_embeds, trajectory = self._inversion_guides(inversion, guidance, device)
        noise = self._initial_noise(inputs, inversion, latents, device, draw=budget is not None)
        latents = self.prepare_latents(n, self.unet.config.in_channels, inputs.height, inputs.width, self.unet.dtype, device,
                                       inputs.generator, noise, scheduler)
        extra = self.prepare_extra_step_kwargs(inputs.generator, eta, scheduler)
        controller = kept = None
        if source is not None:  # the targets only (see Prompt2PromptPipeline.__call__)
            latents, embeds, added, extra, controller = self._targets_of(source, inputs, plan, generator, latents, embeds, added, extra,
                                                                         "inversion" if inversion is not None else None)
            trajectory = None
        elif budget is not None:  # the whole batch, the source's row kept as it runs
            kept, controller = self._start_pass(inputs, plan, scheduler, len(timesteps), eta, inversion, budget, noise, latents, embeds,
                                                extra, source_device, given)
        latents, controller = self._denoise(inputs, plan, scheduler, timesteps, latents, embeds, extra, cross_attention_kwargs,
                                            added_cond_kwargs=added, guidance_rescale=inputs.guidance_rescale,
                                            null_embeds=null_embeds, trajectory=trajectory, controller=controller)
        self._finish_pass(kept, controller)
        latents = controller.with_source_latents(latents, -1)  # (prompts, C, h, w): a kept source's final latents first
        images, flags = self._postprocess(latents, output_type, device, prompt_embeds.dtype)
        self.maybe_free_model_hooks()
        return self._output(images, flags, controller, inputs, plan, return_dict, kept)
