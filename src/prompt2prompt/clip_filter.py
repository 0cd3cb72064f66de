"""InstructPix2Pix's CLIP filter for ``p2p dataset --clip PATH``: three similarities in CLIP space.

For a candidate (input image, edited image) of a caption pair (input caption, output caption), with
``E_img`` and ``E_txt`` a CLIP model's L2-normalised projected embeddings (`get_image_features`,
`get_text_features`):

- directional similarity: ``cos(E_img(edited) - E_img(input), E_txt(output) - E_txt(input))``, whether
  the images changed the way the captions did (Gal et al. 2022, "StyleGAN-NADA");
- image-image similarity: ``cos(E_img(input), E_img(edited))``, whether the edit kept the image;
- image-caption similarity: ``cos(E_img(edited), E_txt(output))``, whether the edit shows its caption.

Brooks et al. 2023, "InstructPix2Pix", section 3.1.2 (CLIP-based filtering) generates 100
candidates a pair and keeps those that pass all three thresholds, the best by directional
similarity; the thresholds reported with it, image-image >= 0.75, directional >= 0.2,
image-caption >= 0.2, are the defaults here. The authors' released script
(``dataset_creation/generate_img_dataset.py``, with ``metrics/clip_similarity.py``: the same three
cosines of normalised CLIP ViT-L/14 embeddings) defaults its image-image threshold to 0.7 and also
asks the input image to match the input caption (``--min-image-similarity 0.7`` gives the former).

The arithmetic (`clip_scores`, `clip_passes`) is pure numpy on embeddings; `ClipScorer` embeds
PIL images and captions with a local ``transformers`` CLIP folder (`load_clip`), safetensors
weights only unless pickle is allowed, never from the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .model_folder import check_weights_folder

#: InstructPix2Pix's thresholds (section 3.1.2): a candidate passes when each score reaches its threshold.
MIN_DIRECTIONAL = 0.2
MIN_IMAGE_SIMILARITY = 0.75
MIN_CAPTION_SIMILARITY = 0.2
#: The three scores `clip_scores` returns, in the order of the thresholds above.
SCORE_KEYS = ("directional", "image", "caption")
#: The files a tokenizer may be saved as (one of these sets must be in the folder).
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
#: The image processor's file (``CLIPImageProcessor.save_pretrained``).
_PREPROCESSOR_FILE = "preprocessor_config.json"
#: How to fix a folder that is not a complete CLIP folder.
_FIX = ("save the model, its tokenizer and its image processor with save_pretrained into the folder "
        "(e.g. CLIPModel, CLIPProcessor), safetensors weights")


class ClipError(ValueError):
    """A folder that is not a usable CLIP model folder, or thresholds out of range."""


# ============================================================================ arithmetic


def unit(vector: np.ndarray) -> np.ndarray:
    """``vector / |vector|`` along the last axis (a zero vector stays zero)."""
    vector = np.asarray(vector, dtype=np.float64)
    norm = np.linalg.norm(vector, axis=-1, keepdims=True)
    return vector / np.where(norm > 0, norm, 1.0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The cosine of the angle between two 1-D vectors (0.0 when either is zero)."""
    return float(np.dot(unit(a), unit(b)))


def clip_scores(image_in: np.ndarray, image_out: np.ndarray, text_in: np.ndarray, text_out: np.ndarray) -> dict:
    """InstructPix2Pix's three CLIP similarities from four ``(d,)`` embeddings (normalised here).

    Returns:
        ``{"directional": cos(I_out - I_in, T_out - T_in), "image": cos(I_in, I_out),
        "caption": cos(I_out, T_out)}``, each in [-1, 1].
    """
    image_in, image_out, text_in, text_out = (unit(v) for v in (image_in, image_out, text_in, text_out))
    return {"directional": cosine(image_out - image_in, text_out - text_in),
            "image": cosine(image_in, image_out),
            "caption": cosine(image_out, text_out)}


@dataclass(frozen=True)
class ClipThresholds:
    """The least directional, image-image and image-caption similarity a passing candidate has."""

    directional: float = MIN_DIRECTIONAL
    image: float = MIN_IMAGE_SIMILARITY
    caption: float = MIN_CAPTION_SIMILARITY

    def __post_init__(self):
        for key in SCORE_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
                raise ClipError(f"the {key} threshold must be a number in [-1, 1] (a cosine), got {value!r}")

    def passes(self, scores: dict) -> bool:
        """Whether every score of `clip_scores` reaches its threshold."""
        return all(scores[key] >= getattr(self, key) for key in SCORE_KEYS)


# ============================================================================ the model folder


def check_clip_folder(path: str | Path, allow_pickle: bool = False) -> None:
    """Raise `ClipError` naming ``path`` unless it is a local CLIP folder that `load_clip` can load.

    It must hold ``config.json`` of a ``CLIPModel`` (``model_type`` ``"clip"``), complete weights
    (safetensors; pickle only with ``allow_pickle``), a tokenizer and ``preprocessor_config.json``.
    Reads headers only, never the tensors.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ClipError(f"{path}: no such folder; name a local folder holding a transformers CLIP model ({_FIX})")
    config = folder / "config.json"
    if not config.is_file():
        raise ClipError(f"{config}: missing, so {path} is not a transformers model folder; {_FIX}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        raise ClipError(f"{config}: not a readable JSON object; {_FIX}") from None
    if model_type != "clip":
        raise ClipError(f"{path}: a {model_type or 'untyped'!r} model, not a CLIP model (config.json's model_type "
                        f"must be 'clip'); name a CLIPModel folder")
    try:
        check_weights_folder(folder, "the CLIP model", allow_pickle)
    except ValueError as err:
        raise ClipError(str(err)) from None
    if not any(all((folder / name).is_file() for name in names) for names in _TOKENIZER_FILES):
        raise ClipError(f"{path}: no tokenizer (tokenizer.json, or vocab.json and merges.txt); {_FIX}")
    if not (folder / _PREPROCESSOR_FILE).is_file():
        raise ClipError(f"{folder / _PREPROCESSOR_FILE}: missing (the image processor); {_FIX}")


def image_processor_class():
    """The CLIP image processor on PIL (the same pixels with or without torchvision), where transformers has one."""
    try:
        from transformers import CLIPImageProcessorPil as processor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as processor
    return processor


@dataclass
class ClipScorer:
    """A CLIP model, its tokenizer and image processor: embeds images and captions, scores candidates.

    The captions' embeddings of the last pair are kept: a pair's candidates share their captions.
    """

    model: object
    tokenizer: object
    image_processor: object
    device: str = "cpu"
    _texts: dict = field(default_factory=dict, repr=False)

    def image_features(self, images: list) -> np.ndarray:
        """PIL images -> ``(n, d)`` L2-normalised projected image embeddings."""
        import torch

        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        return unit(_features(out))

    def text_features(self, texts: list[str]) -> np.ndarray:
        """Captions -> ``(n, d)`` L2-normalised projected text embeddings (truncated to the model's length)."""
        import torch

        length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=length, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                               attention_mask=tokens["attention_mask"].to(self.device))
        return unit(_features(out))

    def caption_features(self, text_in: str, text_out: str) -> np.ndarray:
        """``(2, d)``: the input and output captions' embeddings (the last pair's are reused)."""
        key = (text_in, text_out)
        if key not in self._texts:
            self._texts.clear()
            self._texts[key] = self.text_features([text_in, text_out])
        return self._texts[key]

    def score(self, input_image, edited_image, pair) -> dict:
        """`clip_scores` of a candidate: its two PIL images and its pair's captions (``pair.input``, ``pair.output``)."""
        images = self.image_features([input_image, edited_image])  # (2, d): input, edited
        texts = self.caption_features(pair.input, pair.output)  # (2, d): input caption, output caption
        return clip_scores(images[0], images[1], texts[0], texts[1])


def _features(out) -> np.ndarray:
    """``get_*_features``' result as a float64 ``(n, d)`` array: a tensor (transformers 4) or an
    output whose ``pooler_output`` is the projection (transformers 5)."""
    tensor = out if hasattr(out, "detach") else out.pooler_output
    return tensor.detach().float().cpu().numpy().astype(np.float64)


def load_clip(path: str | Path, device: str = "cpu", allow_pickle: bool = False) -> ClipScorer:
    """Load a local CLIP folder (checked by `check_clip_folder` first) as a `ClipScorer` on ``device``.

    Never reaches the network (``local_files_only``); safetensors weights unless ``allow_pickle``.
    """
    from transformers import AutoTokenizer, CLIPModel

    check_clip_folder(path, allow_pickle)
    folder = str(Path(path).expanduser())
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=None if allow_pickle else True)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = image_processor_class().from_pretrained(folder, local_files_only=True)
    return ClipScorer(model, tokenizer, processor, device)
