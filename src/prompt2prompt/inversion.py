"""Real images into the diffusion model: DDIM, null-text, negative-prompt and direct inversion.

An `Inversion` holds what editing a real picture needs: the initial latent ``x_T`` found by DDIM
inversion, and per method

- ``ddim``: nothing more (DDIM inversion with the conditional prediction, w = 1; the baseline);
- ``null-text`` (Mokady et al., 2022): one optimised unconditional embedding per step, so that
  classifier-free guidance at scale w retraces the DDIM-inversion trajectory;
- ``negative-prompt`` (Miyake et al., 2023): nothing more; at edit time the source prompt's own
  embedding is the unconditional embedding of every row;
- ``direct`` (Ju et al., 2023, "PnP Inversion"): the whole inversion trajectory; at each edit step
  the gap between the inverted latent and the source branch's denoised latent is added back on the
  source branch only, so the source reconstructs the input exactly and the targets edit it.

This module holds the formulas and loops of inversion over plain callables and modules: the step
formulas (`predict_eps`, `ddim_step`, `ddim_inversion_step`), DDIM inversion (`ddim_inversion`),
null-text optimisation (`null_text_optimisation`, `null_text_lr`, `null_text_threshold`,
`graphed_eps`), image loading (`load_image`) and the result (`Inversion`, with ``save``/``load``).
`Prompt2PromptPipeline.invert` runs them with its models; nothing here knows the pipeline. The
UNet's added conditions (SDXL's pooled text embedding and time ids) travel as an ``added`` mapping
beside the text states, one for the conditional and one for the unconditional prediction.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

from . import checks
from .arguments import ArgumentError, default
from .imageio import save_tensor_file, tensor_file_paths
from .model_folder import check_safetensors

logger = logging.getLogger(__name__)

#: The ``format`` field of a saved inversion's sidecar.
FORMAT = "prompt2prompt-inversion"
#: The version of that format that `Inversion.save` writes. Version 2 added the model family and
#: SDXL's added conditions; a version-1 file (no family) was made by a Stable Diffusion model.
FORMAT_VERSION = 2
#: The versions `Inversion.load` reads.
READABLE_VERSIONS = (1, 2)
#: The model families an inversion can come from (`model_folder.model_family`'s names).
FAMILIES = ("sd", "sdxl")
#: Null-text inversion's Adam learning rate at step 0 (Mokady et al., 2022, their code).
NULL_TEXT_LR = 1e-2
#: How much null-text inversion's early-stop threshold grows per step (Mokady et al., 2022, their code).
NULL_TEXT_THRESHOLD_STEP = 2e-5


class InversionMethod(str, Enum):
    """How a real image is inverted (see the module docstring)."""

    DDIM = "ddim"
    NULL_TEXT = "null-text"
    NEGATIVE_PROMPT = "negative-prompt"
    DIRECT = "direct"

    @classmethod
    def parse(cls, value: "InversionMethod | str") -> "InversionMethod":
        """The `InversionMethod` that ``value`` names.

        Args:
            value: an `InversionMethod`, or its value: ``"ddim"``, ``"null-text"``, ``"negative-prompt"``
                or ``"direct"`` (exactly, lower case).

        Returns:
            The `InversionMethod`.

        Raises:
            ArgumentError: of ``method``: ``value`` names no method; the message lists the choices.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ArgumentError("method", f"inversion method must be one of {names}, got {value!r}") from None


# ----------------------------------------------------------------------------- step formulas


def predict_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise ``eps`` from a UNet output, for ``epsilon`` or ``v_prediction`` models.

    With ``x_t = sqrt(a) x_0 + sqrt(1-a) eps`` and ``v = sqrt(a) eps - sqrt(1-a) x_0`` (Salimans &
    Ho, 2022): ``eps = sqrt(a) v + sqrt(1-a) x_t``.

    Args:
        model_output: the UNet's prediction at ``(x_t, t)``, e.g. ``(1, channels, h, w)``.
        sample: ``x_t``, the latent the UNet was given, the same shape.
        alpha_t: ``a``, the cumulative alpha (``alphas_cumprod``) at ``t``; a tensor that broadcasts.
        prediction_type: the scheduler config's ``prediction_type``.

    Returns:
        ``eps``, the shape of ``model_output`` (``model_output`` itself for ``epsilon``).

    Raises:
        ValueError: ``prediction_type`` is neither ``"epsilon"`` nor ``"v_prediction"``.
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * sample
    raise ValueError(f"inversion supports epsilon and v_prediction models, not prediction_type={prediction_type!r}")


def ddim_step(sample: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM step ``x_t -> x_{t-1}`` (Song et al., 2021, eq. 12 with sigma = 0):
    ``x_{t-1} = sqrt(a_prev) * (x_t - sqrt(1-a_t) eps) / sqrt(a_t) + sqrt(1-a_prev) * eps``.

    Args:
        sample: ``x_t``, e.g. ``(1, channels, h, w)``.
        eps: the noise predicted at ``(x_t, t)``, the same shape.
        alpha_t: ``a_t``, the cumulative alpha at ``t`` (a tensor that broadcasts).
        alpha_prev: ``a_prev``, the cumulative alpha at the previous (less noisy) timestep; the
            scheduler's ``final_alpha_cumprod`` after the last step.

    Returns:
        ``x_{t-1}``, the shape of ``sample``.
    """
    x0 = (sample - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def ddim_inversion_step(sample: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """DDIM inversion ``x_{t-1} -> x_t``: the DDIM step run backwards with ``eps`` predicted at
    ``(x_{t-1}, t)`` (Mokady et al., 2022, eq. 2; Dhariwal & Nichol, 2021).

    Args:
        sample: ``x_{t-1}``, e.g. ``(1, channels, h, w)``.
        eps: the noise predicted at ``(x_{t-1}, t)``, the same shape.
        alpha_prev: the cumulative alpha at the timestep of ``x_{t-1}`` (note the order: before ``alpha_t``).
        alpha_t: the cumulative alpha at ``t``, the timestep stepped to.

    Returns:
        ``x_t``, the shape of ``sample``.
    """
    x0 = (sample - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
    return alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * eps


def null_text_lr(step: int, num_steps: int, base: float = NULL_TEXT_LR) -> float:
    """Adam learning rate at DDIM step ``step`` of ``num_steps``: ``base * (1 - step / (2 * num_steps))``.

    The paper's code (Mokady et al., 2022) uses ``1e-2 * (1 - step/100)`` for its 50 steps, which
    is this formula at ``num_steps=50``. Written against 100 it would turn negative after step 100
    (and Adam refuses it), so the decay is tied to the step count: from ``base`` down to half of it.

    Args:
        step: the DDIM step, 0 at the noisiest.
        num_steps: how many DDIM steps the inversion has.
        base: the learning rate at step 0.
    """
    return base * (1.0 - step / (2.0 * num_steps))


def null_text_threshold(step: int, epsilon: float = default("early_stop_epsilon")) -> float:
    """Early-stop threshold of the inner loop at step ``step``: ``epsilon + step *`` `NULL_TEXT_THRESHOLD_STEP`
    (``2e-5``, as the paper's code).

    Args:
        step: the DDIM step, 0 at the noisiest.
        epsilon: the threshold at step 0 (``early_stop_epsilon``).

    Returns:
        The MSE below which null-text optimisation stops at this step.
    """
    return epsilon + step * NULL_TEXT_THRESHOLD_STEP


# ----------------------------------------------------------------------------- images


def load_image(image: Any, height: int, width: int) -> tuple[np.ndarray, str]:
    """Any picture as ``(height, width, 3)`` uint8 RGB, centre-cropped to the aspect ratio and resized.

    Accepts a path (PNG, JPEG, WebP, anything PIL reads; EXIF rotation applied), a PIL image, a
    numpy array ``(h, w)``, ``(h, w, 1|3|4)`` (uint8, or float in [0, 1]) or a tensor ``(3, h, w)``
    / ``(1, 3, h, w)`` in [0, 1]. Transparency is composited on white, grey becomes RGB.

    Args:
        image: the picture (see above).
        height: the height in pixels to crop and resize to.
        width: the width in pixels to crop and resize to.

    Returns:
        The array and a sentence saying what was done to the picture.

    Raises:
        ArgumentError: of ``image``: a missing, empty or unreadable file, or an array of the wrong
            shape or range.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ArgumentError("image", f"image file {str(path)!r} does not exist; give the path of a PNG, JPEG or WebP picture")
        if path.stat().st_size == 0:
            raise ArgumentError("image", f"image file {str(path)!r} is empty; give a PNG, JPEG or WebP picture")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                pil = opened.copy() if not getattr(opened, "getexif", None) else PIL.ImageOps.exif_transpose(opened)
        except (PIL.UnidentifiedImageError, OSError, SyntaxError, PIL.Image.DecompressionBombError) as err:
            raise ArgumentError("image", f"image file {str(path)!r} is not a picture PIL can read ({err}); give a PNG, JPEG or WebP picture") from None
    elif isinstance(image, PIL.Image.Image):
        pil = PIL.ImageOps.exif_transpose(image)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        pil = _array_to_pil(image)
    else:
        raise ArgumentError("image", f"image must be a file path, a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    pil, deep = _deep_grey_to_8bit(pil)
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pil = PIL.Image.alpha_composite(white, rgba)
    original = pil.size
    pil = pil.convert("RGB")
    w, h = pil.size
    if w < 1 or h < 1:
        raise ArgumentError("image", f"image is {w}x{h} pixels; it has no content")
    target = width / height
    if w / h > target:  # too wide: crop the sides
        cw, ch = max(1, round(h * target)), h
    else:  # too tall: crop top and bottom
        cw, ch = w, max(1, round(w / target))
    left, top = (w - cw) // 2, (h - ch) // 2
    pil = pil.crop((left, top, left + cw, top + ch))
    steps = [deep] if deep else []
    if (cw, ch) != (w, h):
        steps.append(f"centre-cropped from {w}x{h} to {cw}x{ch}")
    if (cw, ch) != (width, height):
        pil = pil.resize((width, height), PIL.Image.LANCZOS)
        steps.append(f"resized to {width}x{height}")
    note = f"input {original[0]}x{original[1]}: " + (" and ".join(steps) if steps else "used as it is") + " (the model's resolution)"
    return np.asarray(pil, dtype=np.uint8).copy(), note


def _deep_grey_to_8bit(pil: PIL.Image.Image) -> tuple[PIL.Image.Image, str]:
    """16- or 32-bit greyscale (PIL modes ``I;16*``, ``I``, ``F``) as 8-bit ``L``, scaled to its range.

    ``convert("RGB")`` would clip these at 255, so a 16-bit PNG would come out nearly all white.
    ``I;16`` spans 0..65535; ``I`` is read as 8-bit if it stays within 255, else as 16-bit; ``F`` as
    [0, 1] if it stays within 1, else as 0..255. Returns the image and what was done ("" if nothing).
    """
    if not (pil.mode.startswith("I") or pil.mode == "F"):
        return pil, ""
    values = np.asarray(pil, dtype=np.float64)  # (h, w)
    top = values.max(initial=0.0)
    if pil.mode.startswith("I;16") or (pil.mode == "I" and top > 255):
        full = 65535.0 if top <= 65535 else top
    elif pil.mode == "F" and top <= 1:
        full = 1.0
    else:
        full = 255.0
    grey = np.clip(np.round(values * (255.0 / full)), 0, 255).astype(np.uint8)  # (h, w)
    return PIL.Image.fromarray(grey), f"{pil.mode} greyscale scaled from 0..{full:g} to 8 bits"


def _array_to_pil(image) -> PIL.Image.Image:
    arr = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if isinstance(image, torch.Tensor):
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4):
            raise ArgumentError("image", f"an image tensor must be (3, height, width) or (1, 3, height, width) in [0, 1], got {tuple(arr.shape)}")
        arr = arr.transpose(1, 2, 0)  # (h, w, channels)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ArgumentError("image", f"an image array must be (height, width), (height, width, 3) or (height, width, 4), got {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ArgumentError("image", "a non-uint8 image array must hold finite floats in [0, 1]; scale it (e.g. image / 255)")
        arr = (arr * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(arr)


# ----------------------------------------------------------------------------- the result


@dataclass
class Inversion:
    """A real image inverted for editing: ``pipe(prompt, edit_prompts, inversion=inv)``.

    Attributes:
        method: the `InversionMethod`.
        prompt: the source prompt the image was inverted with (edits must use it as ``prompt``).
        num_inference_steps: DDIM steps; edits run the same steps.
        guidance_scale: the scale null-text embeddings were optimised for (edits use it).
        timesteps: the DDIM timesteps ``(steps,)``, descending.
        latent: ``x_T`` ``(1, channels, h, w)`` float32, the initial latent of every prompt.
        image_latent: ``x_0`` ``(1, channels, h, w)``: the VAE encoding of the image.
        image: the preprocessed input ``(height, width, 3)`` uint8.
        null_embeddings: null-text only: ``(steps, tokens, dim)`` unconditional embeddings (on SDXL
            ``dim`` is both encoders' widths together, as the UNet's text states).
        trajectory: direct only: the inverted latents ``(steps + 1, channels, h, w)`` from ``x_T`` to ``x_0``.
        family: the model family that made it, ``"sd"`` or ``"sdxl"``; a pipeline of the other refuses it.
        null_pooled: SDXL null-text only: the pooled unconditional text embedding ``(1, projection_dim)``
            the optimisation held fixed (zeros, or the negative prompt's); edits use it in every
            unconditional row.
        time_ids: SDXL only: the six added time ids (original size, crop top-left, target size) the
            inversion ran with; edits must run with the same.
        info: parameters and measurements (preprocessing, inner steps used, seconds, model).
    """

    method: InversionMethod
    prompt: str
    num_inference_steps: int
    guidance_scale: float
    timesteps: torch.Tensor
    latent: torch.Tensor
    image_latent: torch.Tensor
    image: np.ndarray
    null_embeddings: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None
    family: str = "sd"
    null_pooled: torch.Tensor | None = None
    time_ids: tuple[int, ...] | None = None
    info: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        """The image height in pixels (of ``image``)."""
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        """The image width in pixels (of ``image``)."""
        return int(self.image.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (tensors, safetensors; ``.safetensors`` is appended if missing) and its
        JSON sidecar ``<path minus .safetensors>.json``; each through a temporary file and a rename.

        Args:
            path: the file to write; missing parent folders are created.

        Returns:
            The path of the ``.safetensors`` file written.
        """
        tensors = {  # cloned: safetensors refuses tensors that share memory
            "timesteps": self.timesteps.cpu().long().clone(),
            "latent": self.latent.cpu().float().clone(),
            "image_latent": self.image_latent.cpu().float().clone(),
            "image": torch.from_numpy(np.ascontiguousarray(self.image)),
        }
        if self.null_embeddings is not None:
            tensors["null_embeddings"] = self.null_embeddings.cpu().float().clone()
        if self.trajectory is not None:
            tensors["trajectory"] = self.trajectory.cpu().float().clone()
        if self.null_pooled is not None:
            tensors["null_pooled"] = self.null_pooled.cpu().float().clone()
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "method": self.method.value, "prompt": self.prompt,
            "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
            "height": self.height, "width": self.width, "family": self.family,
            "time_ids": None if self.time_ids is None else list(self.time_ids), "info": self.info,
        }
        return save_tensor_file(path, tensors, meta, FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Inversion":
        """Read an inversion written by `save` (safetensors only; nothing is unpickled).

        Args:
            path: the ``.safetensors`` file (the suffix is appended if missing); its ``.json``
                sidecar must lie beside it.

        Returns:
            The `Inversion`, with its tensors on the CPU.

        A version-1 file, written before SDXL inversion, records no family: it is ``"sd"``.

        Raises:
            ValueError: the file or its sidecar is missing or unreadable, is not this format in a
                readable version, or lacks what its method and family need.
        """
        from safetensors.torch import load_file

        path, sidecar = tensor_file_paths(path)
        for p in (path, sidecar):
            if not p.is_file():
                raise ValueError(f"{str(p)!r} does not exist; an inversion is a .safetensors file with a .json beside it (Inversion.save)")
        try:
            check_safetensors(path, "invert the image again")  # sizes against the file's, before reading
            meta = json.loads(sidecar.read_text())
            tensors = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
            raise ValueError(f"{str(path)!r} is not a readable inversion ({err}); invert the image again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
            versions = " or ".join(str(v) for v in READABLE_VERSIONS)
            raise ValueError(f"{str(sidecar)!r} is not a version-{versions} {FORMAT} file; invert the image again")
        try:
            method = InversionMethod.parse(meta["method"])
        except (KeyError, ValueError):
            raise ValueError(f"{str(sidecar)!r} names no inversion method; invert the image again") from None
        family = meta.get("family") or "sd"  # version 1: Stable Diffusion only
        if family not in FAMILIES:
            raise ValueError(f"{str(sidecar)!r} names the model family {family!r}, not one of {', '.join(FAMILIES)}; invert the image again")
        missing = _missing_parts(method, family, set(tensors), meta)
        if missing:
            made_by = " by an SDXL model" if family == "sdxl" else ""
            raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}, which a {method.value} inversion{made_by} needs; "
                             "invert the image again")
        wrong = _wrong_tensors(tensors)
        if wrong:
            raise ValueError(f"{str(path)!r} is damaged: {'; '.join(wrong)}; invert the image again")
        try:
            time_ids = meta.get("time_ids")
            fields = dict(prompt=meta["prompt"], num_inference_steps=checks.positive_int("num_inference_steps", meta["num_inference_steps"]),
                          guidance_scale=float(checks.finite_number("guidance_scale", meta["guidance_scale"])),
                          time_ids=None if time_ids is None else tuple(int(v) for v in time_ids), info=meta.get("info", {}))
            if not isinstance(fields["prompt"], str) or not isinstance(fields["info"], dict):
                raise TypeError("its prompt must be text and its info a JSON object")
        except (TypeError, ValueError) as err:
            raise ValueError(f"{str(sidecar)!r} is damaged ({err}); invert the image again") from None
        return cls(
            method=method, timesteps=tensors["timesteps"], latent=tensors["latent"], image_latent=tensors["image_latent"],
            image=tensors["image"].numpy(), null_embeddings=tensors.get("null_embeddings"),
            trajectory=tensors.get("trajectory"), family=family, null_pooled=tensors.get("null_pooled"), **fields,
        )


#: The dimensions of each tensor a saved inversion holds (`Inversion.save`).
_TENSOR_DIMS = {"timesteps": 1, "latent": 4, "image_latent": 4, "image": 3, "null_embeddings": 3, "trajectory": 4, "null_pooled": 2}


def _wrong_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with the tensors of a saved inversion: a dimension count, a dtype (integer
    timesteps, uint8 RGB image, finite floats elsewhere), or an image that is not ``(h, w, 3)``."""
    wrong = []
    for name, dims in _TENSOR_DIMS.items():
        t = tensors.get(name)
        if t is None:
            continue
        if t.dim() != dims or 0 in t.shape:
            wrong.append(f"{name} has shape {tuple(t.shape)}, not {dims} non-empty dimensions")
        elif name == "timesteps":
            if t.dtype != torch.int64 or bool((t < 0).any()):
                wrong.append(f"timesteps are {t.dtype}, not non-negative int64")
        elif name == "image":
            if t.dtype != torch.uint8 or t.shape[-1] != 3:
                wrong.append(f"the image is {t.dtype} {tuple(t.shape)}, not uint8 (height, width, 3)")
        elif t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
            wrong.append(f"{name} is not finite float32")
    return wrong


def _missing_parts(method: InversionMethod, family: str, tensors: set[str], meta: Mapping) -> list[str]:
    """The tensors and sidecar fields a saved inversion of ``method`` by a ``family`` model needs
    but lacks, sorted (tensors first)."""
    needed = {"timesteps", "latent", "image_latent", "image"}
    needed |= {InversionMethod.NULL_TEXT: {"null_embeddings"}, InversionMethod.DIRECT: {"trajectory"}}.get(method, set())
    fields_needed = {"prompt", "num_inference_steps", "guidance_scale"}
    if family == "sdxl":
        fields_needed.add("time_ids")
        if method is InversionMethod.NULL_TEXT:
            needed.add("null_pooled")
    present = {k for k, v in meta.items() if v is not None}
    return sorted(needed - tensors) + sorted(fields_needed - present)


def inversion_scheduler(config):
    """The deterministic DDIM scheduler that inversions and edits of inverted images share, built
    from a scheduler config (sample clipping and thresholding off).

    Args:
        config: a diffusers scheduler's ``config`` (the pipeline's; its scheduler is not changed).

    Returns:
        A new `diffusers.DDIMScheduler`.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, clip_sample=False, thresholding=False)


#: The least cumulative alpha the inversion steps use. A zero-terminal-SNR schedule (Lin et al., 2024)
#: has alpha_bar = 0 at its last timestep, where `ddim_step` cannot read x0 back from eps (0 / 0);
#: diffusers' Euler schedulers floor it at the same 2**-24, which changes no other schedule's value.
ALPHA_BAR_FLOOR = 2.0**-24


def alpha_at(scheduler, t: int) -> torch.Tensor:
    """The cumulative alpha of ``scheduler`` at timestep ``t``; its ``final_alpha_cumprod`` for
    ``t < 0`` (the step after the last one); never below `ALPHA_BAR_FLOOR`.

    Args:
        scheduler: a DDIM scheduler (``alphas_cumprod``, ``final_alpha_cumprod``).
        t: a timestep, or a negative number for "past the last step".

    Returns:
        A scalar tensor.
    """
    alpha = scheduler.alphas_cumprod[t] if t >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod)
    return alpha.clamp(min=ALPHA_BAR_FLOOR)


def unet_eps(unet, alpha_of: Callable[[torch.Tensor], torch.Tensor], prediction_type: str, dtype: torch.dtype):
    """``eps(latent, t, states, added=None)``: the UNet's noise prediction at one latent, in float32.

    ``added`` is the UNet's ``added_cond_kwargs`` for that one row, or None for a UNet without
    added conditions (Stable Diffusion). On SDXL it is ``{"text_embeds": (1, projection_dim),
    "time_ids": (1, 6)}``: the conditional and the unconditional prediction each pass their own
    pooled text embedding.

    Args:
        unet: a diffusers UNet.
        alpha_of: ``t -> a_t``, the cumulative alpha at a timestep (for `predict_eps`).
        prediction_type: the scheduler config's ``prediction_type`` (for `predict_eps`).
        dtype: the UNet's dtype; the latent is cast to it.

    Returns:
        ``eps(latent (1, C, h, w), t, states (1, tokens, dim), added) -> (1, C, h, w)`` float32.
    """

    def eps(latent: torch.Tensor, t: torch.Tensor, states: torch.Tensor, added: Mapping | None = None) -> torch.Tensor:
        kwargs = {} if added is None else {"added_cond_kwargs": dict(added)}
        out = unet(latent.to(dtype), t, encoder_hidden_states=states, return_dict=False, **kwargs)[0].float()  # (1, C, h, w)
        return predict_eps(out, latent, alpha_of(t), prediction_type)

    return eps


def ddim_inversion(image_latent: torch.Tensor, timesteps: torch.Tensor, step_ratio: int, alpha_of, eps, cond: torch.Tensor,
                   on_step: Callable[[], Any] = lambda: None, cond_added: Mapping | None = None) -> torch.Tensor:
    """DDIM inversion with the conditional prediction (w = 1): ``x_0 -> x_T`` along ``timesteps`` reversed.

    Args:
        image_latent: ``x_0`` ``(1, C, h, w)`` float32, the VAE encoding of the image.
        timesteps: the scheduler's timesteps ``(steps,)``, descending.
        step_ratio: timesteps between two DDIM steps (the step before ``t`` is ``t - step_ratio``).
        alpha_of: ``t -> a_t`` (`alpha_at`), also for timesteps below 0.
        eps: ``eps(latent, t, states, added)`` (`unet_eps`).
        cond: the prompt's text states ``(1, tokens, dim)``.
        on_step: called after each step (a progress bar's ``update``).
        cond_added: the prompt's added conditions for the UNet (SDXL), or None.

    Returns:
        The trajectory ``(steps + 1, C, h, w)``: ``x_T`` first, ``x_0`` last.
    """
    path = [image_latent]
    latent = image_latent
    for t in timesteps.flip(0):
        prev = int(t) - step_ratio
        latent = ddim_inversion_step(latent, eps(latent, t, cond, cond_added), alpha_of(prev), alpha_of(int(t)))
        path.append(latent)
        on_step()
    return torch.cat(path[::-1])  # (steps + 1, C, h, w): x_T ... x_0


@contextmanager
def frozen(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter of ``modules``; restore each on exit, also when
    the body raises (null-text inversion differentiates with respect to the embedding alone).

    Args:
        modules: the modules to freeze (the UNet and the text encoder).
    """
    params = [p for m in modules for p in m.parameters()]
    grad_state = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, g in zip(params, grad_state):
            p.requires_grad_(g)


def capture_sample(trajectory: torch.Tensor, timesteps: torch.Tensor, uncond: torch.Tensor, dtype: torch.dtype) -> tuple:
    """The sample inputs ``(latent, t, unconditional embedding)`` for `graphed_eps`' capture.

    A captured graph's inputs are static buffers that every replay overwrites, so each is a fresh
    tensor: ``trajectory[:1].to(dtype)`` alone would be a view of x_T when the dtype already
    matches (float32), and the replays would overwrite the inversion's x_T.

    Args:
        trajectory: the DDIM-inversion trajectory ``(steps + 1, C, h, w)``, x_T first.
        timesteps: the scheduler's timesteps.
        uncond: the unconditional embedding ``(1, tokens, dim)`` the optimisation starts from.
        dtype: the UNet's dtype.

    Returns:
        ``(latent (1, C, h, w), t, embedding that requires grad)``, none sharing memory with the inputs.
    """
    return trajectory[:1].to(dtype, copy=True), timesteps[0].clone(), uncond.detach().clone().requires_grad_(True)


def graphed_eps(unet, sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor], alpha_of, prediction_type: str, eager,
                added: Mapping | None = None):
    """``eps(latent, t, states, added=None)`` with the UNet's forward and backward captured once as CUDA graphs
    and replayed (`torch.cuda.make_graphed_callables`), for null-text inversion's inner loop.

    An inner iteration of SD 1.5 launches about 1,465 kernels for a few milliseconds of arithmetic
    at batch 1 (``benchmarks/inversion.py --count-ops``), so the GPU waits for the host; a replay
    launches them at once. ``sample`` is ``(latent, t, states)`` as the loop passes them (the
    states requiring their gradient); every call must match their shapes, dtypes and devices. The
    graph's output buffer is reused by the next replay, so the output is copied. Returns ``(eps,
    True)``, or ``(eager, False)`` with a warning when the capture fails (e.g. a UNet that
    synchronises with the host), so that the inversion still runs.

    Experimental: not yet run on a GPU by this project; ``benchmarks/gpu_bench.sh`` compares it with
    the eager loop (time and the null embeddings).

    Args:
        unet: the pipeline's UNet.
        sample: example ``(latent, t, states)`` for the capture: ``latent`` ``(1, channels, h, w)`` in the
            UNet's dtype, ``t`` a timestep tensor, ``states`` ``(1, tokens, dim)`` requiring its gradient.
        alpha_of: ``t -> a_t``, the cumulative alpha at a timestep (for `predict_eps`).
        prediction_type: the scheduler config's ``prediction_type`` (for `predict_eps`).
        eager: the uncaptured ``eps(latent, t, states, added)`` to fall back on.
        added: the UNet's added conditions (SDXL), or None: constants of the capture, the same at
            every replay; the ``added`` the returned ``eps`` is called with is not read.

    Returns:
        ``(eps, True)`` with ``eps(latent, t, states, added=None)`` returning float32 noise
        ``(1, channels, h, w)``, or ``(eager, False)`` when the capture fails.
    """
    kwargs = {} if added is None else {"added_cond_kwargs": dict(added)}

    def unet_call(latent: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return unet(latent, t, encoder_hidden_states=states, return_dict=False, **kwargs)[0]

    try:
        graphed = torch.cuda.make_graphed_callables(unet_call, sample)
    except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager loop
        logger.warning("null-text inversion: the CUDA graph capture failed (%s: %s); running without it", type(err).__name__, err)
        return eager, False
    dtype = sample[0].dtype

    def eps(latent: torch.Tensor, t: torch.Tensor, states: torch.Tensor, added: Mapping | None = None) -> torch.Tensor:
        out = graphed(latent.to(dtype), t, states.to(dtype)).clone().float()  # (1, C, h, w), out of the reused buffer
        return predict_eps(out, latent, alpha_of(t), prediction_type)

    return eps, True


def null_text_optimisation(trajectory: torch.Tensor, timesteps: torch.Tensor, step_ratio: int, alpha_of, cond: torch.Tensor,
                           uncond: torch.Tensor, guidance_scale: float, num_inner_steps: int, epsilon: float, eps,
                           eps_with_grad=None, on_step: Callable[[], Any] = lambda: None, cond_added: Mapping | None = None,
                           uncond_added: Mapping | None = None) -> tuple[torch.Tensor, list[int], list[float]]:
    """Null-text optimisation (Mokady et al., 2022, Algorithm 1) along the DDIM-inversion ``trajectory``.

    Per step i: Adam on the unconditional embedding, lr `null_text_lr` (the paper's ``1e-2 (1 - i/100)``
    at 50 steps), at most ``num_inner_steps`` evaluations, stopping once the MSE to the pivot
    ``z*_{t-1}`` is below `null_text_threshold`. The embedding kept is the last one evaluated (the
    update after the final evaluation is not taken), so its denoised latent is already known and
    continues the trajectory without another forward pass. The models behind ``eps`` should be
    `frozen`. Only the per-token unconditional states are optimised, as in the paper; added
    conditions (SDXL's pooled text embedding and time ids) stay as given.

    Args:
        trajectory: the DDIM-inversion trajectory ``(steps + 1, C, h, w)``, ``x_T`` first (`ddim_inversion`).
        timesteps: the scheduler's timesteps ``(steps,)``, descending.
        step_ratio: timesteps between two DDIM steps.
        alpha_of: ``t -> a_t`` (`alpha_at`).
        cond: the prompt's text states ``(1, tokens, dim)``.
        uncond: the unconditional text states ``(1, tokens, dim)`` the optimisation starts from.
        guidance_scale: the classifier-free guidance scale the embeddings are optimised for.
        num_inner_steps: at most this many evaluations per step.
        epsilon: the early-stop threshold at step 0 (``early_stop_epsilon``).
        eps: ``eps(latent, t, states, added)`` without gradients (`unet_eps`), for the conditional prediction.
        eps_with_grad: the same with gradients, for the unconditional prediction (`graphed_eps`;
            default ``eps``).
        on_step: called after each step (a progress bar's ``update``).
        cond_added: the conditional prediction's added conditions for the UNet (SDXL), or None.
        uncond_added: the unconditional prediction's (SDXL: its own pooled embedding), or None; fixed.

    Returns:
        ``(embeddings (steps, tokens, dim) on the CPU, evaluations used per step, final loss per step)``.
    """
    eps_with_grad = eps_with_grad or eps
    embeddings, used, losses = [], [], []
    latent = trajectory[:1]
    uncond = uncond.detach().float().clone()
    for i, t in enumerate(timesteps):
        alpha_t, alpha_prev = alpha_of(int(t)), alpha_of(int(t) - step_ratio)
        target = trajectory[i + 1 : i + 2]
        with torch.no_grad():
            eps_cond = eps(latent, t, cond, cond_added)
        uncond = uncond.detach().requires_grad_(True)
        opt = torch.optim.Adam([uncond], lr=null_text_lr(i, len(timesteps)))
        threshold = null_text_threshold(i, epsilon)
        for j in range(num_inner_steps):
            with torch.enable_grad():
                eps_uncond = eps_with_grad(latent, t, uncond.to(cond.dtype), uncond_added)
                guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                denoised = ddim_step(latent, guided, alpha_t, alpha_prev)
                loss = F.mse_loss(denoised, target)
                if loss.item() < threshold or j == num_inner_steps - 1:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
        used.append(j + 1)
        losses.append(float(loss.item()))
        embeddings.append(uncond.detach()[0].clone())
        latent = denoised.detach()
        on_step()
    return torch.stack(embeddings).cpu(), used, losses  # (steps, tokens, dim)
