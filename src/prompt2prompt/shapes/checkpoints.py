"""A training run's checkpoint files: safetensors shards of at most 16 MB each (what a device call
brings back in one file), written to a temporary name and renamed, and optimizer state as flat
tensors plus JSON metadata (no pickle)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MAX_FILE_BYTES = 16 * 1024 * 1024  # the largest file a device call brings back


def save_sharded(tensors: dict[str, torch.Tensor], path_prefix: Path, max_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """Save tensors in safetensors shards of at most ``max_bytes`` each (temp file, then rename)."""
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += n
    shards.append(current)
    names = []
    for i, shard in enumerate(shards):
        name = f"{path_prefix.name}-{i:02d}.safetensors"
        tmp = path_prefix.parent / (name + ".tmp")
        save_file(shard, str(tmp))
        os.replace(tmp, path_prefix.parent / name)
        names.append(name)
    return names


def load_sharded(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of the shards ``names`` in ``folder`` (as `save_sharded` returned them), merged."""
    out = {}
    for name in names:
        out.update(load_file(str(folder / name)))
    return out


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors plus JSON-able metadata (no pickle)."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                meta["scalars"][f"{idx}.{k}"] = v
    return tensors, meta


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore ``opt``'s state from `optimizer_tensors`' tensors and metadata."""
    state: dict = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

