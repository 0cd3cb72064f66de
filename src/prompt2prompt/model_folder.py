"""Checks of a local diffusers model folder before it loads, so that a missing or damaged file is
reported by its path (diffusers' own errors often name no file, or the wrong one).

A folder saved with ``save_pretrained`` holds ``model_index.json``, which names the components;
each component is a subfolder. A model component (UNet, VAE, text encoder, ...) holds
``config.json`` and its weights: ``*.safetensors`` files, possibly sharded with a
``*.safetensors.index.json`` that lists the shards. Tokenizers and schedulers hold their own JSON
and text files. Every check here reads file headers only, never the tensors.
"""

from __future__ import annotations

import struct
from pathlib import Path

from .imageio import json_value

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _read_json(path: Path, what: str):
    try:
        return json_value(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path}: {what} is not readable JSON ({err}); restore the file, or save the model again") from None


def check_safetensors(path: Path, fix: str = "download or copy it again, or save the model again") -> None:
    """Raise `ValueError` naming ``path`` unless it is a complete safetensors file.

    The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON giving each tensor's
    ``data_offsets`` into the data that follows; the file must hold the data up to the largest end
    offset (a truncated download or copy fails here). Sizes are checked against the file's size
    before anything is read, so a header claiming terabytes allocates nothing.

    Args:
        path: the file.
        fix: what the message tells the user to do.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than its header); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: damaged safetensors file (its header claims {n} bytes, the file has {size}); {fix}")
        try:
            header = json_value(f.read(n))
        except ValueError:
            raise ValueError(f"{path}: damaged safetensors file (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: damaged safetensors file (its header is not a JSON object); {fix}")
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int and v >= 0 for v in offsets) and offsets[0] <= offsets[1]):
            raise ValueError(f"{path}: damaged safetensors file (the tensor {name!r} has no valid data_offsets); {fix}")
        ends.append(offsets[1])
    needed = 8 + n + max(ends, default=0)
    if needed > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes of the {needed} its header describes); {fix}")


def _check_component(folder: Path, name: str, allow_pickle: bool) -> None:
    sub = folder / name
    if not sub.is_dir():
        raise ValueError(f"{sub}: missing folder of the component {name!r} that model_index.json lists; restore it, or save the model again")
    check_weights_folder(sub, f"the component {name!r}", allow_pickle)


def check_weights_folder(sub: Path, what: str, allow_pickle: bool) -> None:
    """Raise `ValueError` naming the first bad file of a ``save_pretrained`` model folder ``sub``.

    Every JSON file must parse; a folder with weights needs ``config.json``; a folder with
    ``config.json`` needs weights; every shard a ``*.safetensors.index.json`` lists must be there;
    each safetensors file must be complete; pickle-only weights are refused without
    ``allow_pickle``. A folder of JSON and text files only (a tokenizer, a scheduler) passes.
    ``what`` names the folder in the messages (e.g. ``"the component 'unet'"``).
    """
    files = [p for p in sub.iterdir() if p.is_file()]
    if not files:
        raise ValueError(f"{sub}: {what} is an empty folder; restore its files, or save the model again")
    for p in files:
        if p.suffix == ".json":
            _read_json(p, "a configuration file")
    weights = [p for p in files if p.name.endswith(_WEIGHT_SUFFIXES)]
    indexes = [p for p in files if p.name.endswith(".safetensors.index.json")]
    if not weights and not indexes:
        if (sub / "config.json").is_file():
            raise ValueError(f"{sub}: no weights file for {what} (expected *.safetensors); restore it, or save the model again")
        return  # a tokenizer, scheduler or feature extractor: JSON and text files only
    if not (sub / "config.json").is_file():
        raise ValueError(f"{sub / 'config.json'}: missing; {what} has weights but no configuration; restore it, or save the model again")
    for index in indexes:
        shards = sorted(set(_read_json(index, "a weights index").get("weight_map", {}).values()))
        for shard in shards:
            if not (sub / shard).is_file():
                raise ValueError(f"{sub / shard}: missing shard listed in {index.name}; restore it, or save the model again")
    safetensors = [p for p in weights if p.suffix == ".safetensors"]
    if not safetensors and not allow_pickle:
        raise ValueError(f"{sub}: {what} has only pickle weights ({', '.join(sorted(p.name for p in weights))}), "
                         "which can run code when loaded; convert them to safetensors, or allow pickle files you trust explicitly "
                         "(allow_pickle=True, p2p --allow-pickle)")
    for p in safetensors:
        check_safetensors(p)


def check_model_folder(folder: str | Path, allow_pickle: bool = False) -> None:
    """Raise `ValueError` naming the first missing or damaged file of the diffusers folder ``folder``.

    Checks that ``model_index.json`` and every JSON file of every component it lists parse, that
    each model component has ``config.json`` and weights, that every shard a weights index lists is
    there, and that each safetensors file is complete. Without ``allow_pickle`` a component whose
    only weights are pickle files (``.bin``, ...) is refused.

    Args:
        folder: a folder written by ``save_pretrained`` (e.g. ``./stable-diffusion-v1-5``).
        allow_pickle: accept components whose weights are pickle files only.
    """
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{index}: missing, so {folder} is not a diffusers model folder; name a folder saved with save_pretrained")
    spec = _read_json(index, "the model index")
    if not isinstance(spec, dict):
        raise ValueError(f"{index}: not a JSON object; restore the file, or save the model again")
    for name, entry in spec.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None or entry[1] is None:
            continue  # metadata ("_class_name", ...) and components saved as None (e.g. no safety checker)
        _check_component(folder, name, allow_pickle)


def prompt_token_limit(model: str | Path | None) -> int | None:
    """The most tokens a prompt may have for ``model``: its tokenizer's ``model_max_length``, read from
    ``tokenizer/tokenizer_config.json`` of a local folder (None: the bundled shapes model's).

    Returns:
        The limit, or None when it cannot be read here (a hub id, a folder without that file, a
        damaged or implausible value: `check_model_folder` and the tokenizer report those).
    """
    if model is None:
        from .shapes import MODEL_DIR

        model = MODEL_DIR
    config = Path(model).expanduser() / "tokenizer" / "tokenizer_config.json"
    try:
        value = json_value(config.read_text(encoding="utf-8")).get("model_max_length") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    # transformers writes a huge sentinel (1e30) when a tokenizer has no limit of its own
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31 else None


#: The model families: Stable Diffusion (1.x, 2.x) and Stable Diffusion XL.
FAMILIES = ("sd", "sdxl")


def model_family(model: str | Path | None) -> str:
    """The family of the model ``model`` names, read from a local folder's own ``model_index.json``:
    ``"sdxl"`` when its ``_class_name`` contains ``XL`` or it lists a ``text_encoder_2``, else ``"sd"``.

    Args:
        model: a local diffusers folder, a hub id, or None (the bundled shapes model). A hub id (no
            folder of that name here), a folder without a readable index and None are ``"sd"``
            (a missing or damaged index is `check_model_folder`'s to name).

    Returns:
        One of `FAMILIES`.
    """
    if model is None:
        return "sd"
    index = Path(model).expanduser() / "model_index.json"
    try:
        spec = json_value(index.read_text(encoding="utf-8")) if index.is_file() else None
    except (OSError, ValueError):
        spec = None
    if not isinstance(spec, dict):
        return "sd"
    encoder_2 = spec.get("text_encoder_2")
    has_encoder_2 = isinstance(encoder_2, list) and bool(encoder_2) and encoder_2[0] is not None
    return "sdxl" if "XL" in str(spec.get("_class_name", "")) or has_encoder_2 else "sd"


WORLD_FILE = "world.json"  # written beside model_index.json by a shapes-world model's export


def folder_vocabulary(folder: str | Path) -> frozenset[str] | None:
    """The words a shapes-world model was trained on, from ``folder/world.json`` (``{"words": [...]}``,
    written by its export), or None when the folder has no such file (any other model).

    Raises:
        ValueError: the file is not a JSON object whose ``"words"`` is a list of strings (names the file).
    """
    path = Path(folder) / WORLD_FILE
    if not path.is_file():
        return None
    data = _read_json(path, "the model's world description")
    words = data.get("words") if isinstance(data, dict) else None
    if not (isinstance(words, list) and words and all(isinstance(w, str) for w in words)):
        raise ValueError(f"{path}: expected a JSON object with a non-empty list of strings under \"words\"; "
                         "restore the file, or delete it to load the model without a vocabulary")
    return frozenset(w.casefold() for w in words)
