"""`SourcePass`: the source prompt's denoising kept once, so that later edits run only their targets.

Editing is a loop: a person changes a word or a slider and edits again, and each edit would run
the source's denoising again although the source is the same image every time. In Algorithm 1 of
Prompt-to-Prompt the source row never depends on the targets; what the targets read from it is,
per step, its latents (LocalBlend, the source image), its attention (the injection) and its
cross-attention maps (LocalBlend's mask, ``out.attention``). `Prompt2PromptPipeline.source` runs
the source alone once and keeps exactly that; ``pipe(prompt, edit_prompts, source=src)`` then
runs the target rows only, half the UNet rows of a one-target edit.

What is kept, and why queries rather than maps:

- the latents after every step and the initial ones ``(steps + 1, C, h, w)``, in the run's dtype;
- self-attention: the conditional row's queries and keys ``(heads, pixels, dim)`` of every layer
  at sides <= ``self_replace_max_res``, at the steps of the ``self_replace_steps`` window. The
  injection is ``SDPA(q_s, k_s, v_t)``, so the fused kernel consumes them as they are, and they
  grow with the pixels where the map ``(heads, pixels, pixels)`` grows with their square (at side
  32 of SD 1.5 the map is 16 MiB in fp16, the query and key 2.5 MiB);
- cross-attention: the conditional row's queries of every layer at the steps of the
  ``cross_replace_steps`` window, and the source's text states once (the keys are ``to_k`` of
  them). A map ``(heads, pixels, tokens)`` is ``heads * 77 / dim`` times a query (2x at SD 1.5's
  8 heads of 40); the value form of the edit (`attention.P2PAttnProcessor.cross_attention_values`)
  needs the query and key, never the map;
- per step and cross-attention side, the source's head-averaged maps summed over that side's
  layers and the steps so far ``(steps, h, w, tokens)`` float32 (LocalBlend's cumulative mask and
  ``out.attention``), and its self-attention sums per side (``out.self_attention``);
- everything that identifies the pass (`SourcePass.identity`): a call that would change the
  source's own denoising is refused (`check_same_pass`), and so is an edit that needs more than
  the pass kept (`check_budget`).

At SD 1.5, 512 px, fp16, 50 steps and the default windows (cross 0.8, self 0.4, sides <= 16) the
pass is about 1.1 GB (`source_pass_bytes` computes it from the shapes: see docs/edits.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .arguments import ArgumentError
from .imageio import file_sha256, json_value, save_tensor_file, tensor_file_paths
from .model_folder import check_safetensors

#: The ``format`` field of a saved pass's sidecar.
FORMAT = "prompt2prompt-source-pass"
#: The version `SourcePass.save` writes and `SourcePass.load` reads.
FORMAT_VERSION = 1
#: The order in which a call's arguments are compared with the pass's (the first that differs is named).
IDENTITY_ORDER = ("prompt", "num_inference_steps", "guidance_scale", "height", "width", "negative_prompt", "scheduler", "eta",
                  "inversion", "prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
                  "guidance_rescale")
#: The call's arguments whose None takes the pass's value (`fill_defaults`).
FILLED = frozenset({"num_inference_steps", "guidance_scale", "height", "width", "negative_prompt", "prompt_2", "negative_prompt_2",
                    "original_size", "target_size"})
#: Identity fields that are no argument of the call: their mismatch is reported as ``source``.
_NOT_ARGUMENTS = {"scheduler"}


def _key(step: int, layer: str) -> str:
    """The name of one layer's tensor at one step, ``"<step>/<processor key>"``."""
    return f"{step}/{layer}"


@dataclass
class SourcePass:
    """The source prompt's pass, kept for edits that run only their targets (see the module's docstring).

    Attributes:
        identity: JSON-able values that define the pass, compared with a call's (`check_same_pass`):
            ``model`` (family, name_or_path, weight fingerprint, dtype) and the entries of `IDENTITY_ORDER`.
        given: the arguments as given to `Prompt2PromptPipeline.source`, resolved (what a call's
            None takes: `fill_defaults`).
        cross_steps: ``(first, stop)`` step indices whose cross-attention queries are kept.
        self_steps: ``(first, stop)`` step indices whose self-attention queries and keys are kept.
        self_max_res: the largest map side whose self-attention is kept (0: none).
        noise: ``(1, C, h, w)`` the initial noise before the scheduler's ``init_noise_sigma``.
        latents: ``(steps + 1, C, h, w)``: the initial latents, then the latents after each step.
        text_states: ``(1, tokens, channels)`` the source's conditional text states.
        self_queries: ``"<step>/<layer>"`` -> ``(heads, pixels, dim)``.
        self_keys: likewise.
        cross_queries: ``"<step>/<layer>"`` -> ``(heads, pixels, dim)``.
        cross_maps: side -> ``(steps, h, w, tokens)`` float32: after each step, the head-averaged
            maps summed over the side's layers and the steps so far.
        self_maps: side -> ``(pixels, pixels)`` float32 sum of the head-averaged self-attention.
        self_calls: side -> the number of (layer, step) maps in that sum.
        step_generator: the state (uint8) of the generator that drew a stochastic sampler's step
            noise when the loop began, or None (a deterministic sampler).
        generator_device: that generator's device type (``"cpu"``, ``"cuda"``), or None.
    """

    identity: dict
    given: dict
    cross_steps: tuple[int, int]
    self_steps: tuple[int, int]
    self_max_res: int
    noise: torch.Tensor
    latents: torch.Tensor
    text_states: torch.Tensor
    self_queries: dict[str, torch.Tensor] = field(default_factory=dict)
    self_keys: dict[str, torch.Tensor] = field(default_factory=dict)
    cross_queries: dict[str, torch.Tensor] = field(default_factory=dict)
    cross_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    self_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    self_calls: dict[int, int] = field(default_factory=dict)
    step_generator: torch.Tensor | None = None
    generator_device: str | None = None

    # ------------------------------------------------------------- what it holds

    @property
    def prompt(self) -> str:
        """The source prompt."""
        return self.identity["prompt"]

    @property
    def num_inference_steps(self) -> int:
        """The denoising steps of the pass."""
        return self.identity["num_inference_steps"]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the pass by its name in the saved file.

        Returns:
            ``{name: tensor}``: ``noise``, ``latents``, ``text_states``, ``self_q/<step>/<layer>``,
            ``self_k/...``, ``cross_q/...``, ``cross_maps/<side>``, ``self_maps/<side>`` and
            ``step_generator`` when there is one.
        """
        out = {"noise": self.noise, "latents": self.latents, "text_states": self.text_states}
        for prefix, table in (("self_q", self.self_queries), ("self_k", self.self_keys), ("cross_q", self.cross_queries)):
            out.update({f"{prefix}/{k}": v for k, v in table.items()})
        out.update({f"cross_maps/{s}": v for s, v in self.cross_maps.items()})
        out.update({f"self_maps/{s}": v for s, v in self.self_maps.items()})
        if self.step_generator is not None:
            out["step_generator"] = self.step_generator
        return out

    @property
    def nbytes(self) -> int:
        """The bytes of all the pass's tensors (`tensors`)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def __repr__(self) -> str:
        model = self.identity.get("model", {})
        return (f"SourcePass(prompt={self.prompt!r}, steps={self.num_inference_steps}, model={model.get('name_or_path')!r} "
                f"({model.get('family')}, {model.get('dtype')}), cross_steps={self.cross_steps}, self_steps={self.self_steps}, "
                f"self_max_res={self.self_max_res}, nbytes={self.nbytes:,}, device={self.latents.device})")

    def to(self, device) -> "SourcePass":
        """A copy of the pass with its tensors on ``device`` (the generator's state stays on the CPU).

        Args:
            device: where the copy's tensors go (``"cpu"``, ``"cuda"``).

        Returns:
            A new `SourcePass`; this one is unchanged.
        """
        def move(table: dict) -> dict:
            return {k: v.to(device) for k, v in table.items()}

        return dataclasses.replace(
            self, identity=dict(self.identity), given=dict(self.given), noise=self.noise.to(device), latents=self.latents.to(device),
            text_states=self.text_states.to(device), self_queries=move(self.self_queries), self_keys=move(self.self_keys),
            cross_queries=move(self.cross_queries), cross_maps=move(self.cross_maps), self_maps=move(self.self_maps),
            self_calls=dict(self.self_calls),
        )

    def row(self, what: str, layer: str | None, step: int, device) -> torch.Tensor | None:
        """One kept source row ``(1, ...)`` on ``device``, or None where it was not kept.

        Args:
            what: ``"self_q"``, ``"self_k"``, ``"cross_q"`` (one layer at one step) or ``"text"``.
            layer: the processor key (ignored for ``"text"``).
            step: the denoising step (ignored for ``"text"``).
            device: where the row is wanted.

        Returns:
            ``(1, heads, pixels, dim)`` for the attention rows, ``(1, tokens, channels)`` for the text.
        """
        if what == "text":
            return self.text_states.to(device, non_blocking=True)
        table = {"self_q": self.self_queries, "self_k": self.self_keys, "cross_q": self.cross_queries}[what]
        kept = table.get(_key(step, layer))
        return None if kept is None else kept.to(device, non_blocking=True)[None]  # (1, heads, pixels, dim)

    def keeps_self(self, step: int, side: int) -> bool:
        """Whether self-attention at ``step`` and map ``side`` is within the pass's budget."""
        return self.self_steps[0] <= step < self.self_steps[1] and side <= self.self_max_res

    def keeps_cross(self, step: int) -> bool:
        """Whether cross-attention at ``step`` is within the pass's budget."""
        return self.cross_steps[0] <= step < self.cross_steps[1]

    # ------------------------------------------------------------- save and load

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tensors to ``path`` (safetensors; ``.safetensors`` appended if missing) and the
        rest to its JSON sidecar ``<path minus .safetensors>.json`` with the tensor file's SHA-256;
        each through a temporary name and a rename. Nothing is pickled.

        Args:
            path: the file to write; missing parent folders are created.

        Returns:
            The path of the ``.safetensors`` file written.
        """
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.tensors().items()}  # clone: no shared memory
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "identity": self.identity, "given": self.given,
                "cross_steps": list(self.cross_steps), "self_steps": list(self.self_steps), "self_max_res": self.self_max_res,
                "self_calls": {str(k): v for k, v in self.self_calls.items()}, "generator_device": self.generator_device}
        return save_tensor_file(path, tensors, meta, FORMAT, checksum="sha256")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SourcePass":
        """Read a pass written by `save`, its tensors on the CPU (safetensors; nothing is unpickled).

        The model is not checked here but when the pass is used (`check_same_pass`).

        Args:
            path: the ``.safetensors`` file (the suffix is appended if missing); its ``.json``
                sidecar must lie beside it.

        Returns:
            The `SourcePass`.

        Raises:
            ValueError: a file is missing, unreadable, truncated or altered (its SHA-256 differs from
                the sidecar's), or is not this format.
        """
        from safetensors.torch import load_file

        path, sidecar = tensor_file_paths(path)
        again = "make the pass again with pipe.source(...) and save it"
        for p in (path, sidecar):
            if not p.is_file():
                raise ValueError(f"{str(p)!r} does not exist; a source pass is a .safetensors file with a .json beside it (SourcePass.save)")
        try:
            meta = json_value(sidecar.read_text())
        except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"{str(sidecar)!r} is not a readable source-pass sidecar ({err}); {again}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{str(sidecar)!r} is not a version-{FORMAT_VERSION} {FORMAT} file; {again}")
        if meta.get("sha256") != file_sha256(path):
            raise ValueError(f"{str(path)!r} is truncated or altered (its SHA-256 is not the one saved beside it); {again}")
        check_safetensors(path, again)  # sizes against the file's, before reading
        try:
            tensors = load_file(str(path))
            return cls._from_saved(meta, tensors)
        except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
            raise ValueError(f"{str(path)!r} is not a readable source pass ({err}); {again}") from None

    @classmethod
    def _from_saved(cls, meta: Mapping, tensors: Mapping[str, torch.Tensor]) -> "SourcePass":
        """The pass of a sidecar's fields and the tensors by their saved names (`tensors`).

        Raises:
            ValueError: a field of the sidecar has the wrong type or range (`_check_saved_fields`).
        """
        _check_saved_fields(meta)

        def table(prefix: str) -> dict:
            return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}

        return cls(
            identity=dict(meta["identity"]), given=dict(meta["given"]), cross_steps=tuple(meta["cross_steps"]),
            self_steps=tuple(meta["self_steps"]), self_max_res=int(meta["self_max_res"]), noise=tensors["noise"],
            latents=tensors["latents"], text_states=tensors["text_states"], self_queries=table("self_q"), self_keys=table("self_k"),
            cross_queries=table("cross_q"), cross_maps={int(k): v for k, v in table("cross_maps").items()},
            self_maps={int(k): v for k, v in table("self_maps").items()},
            self_calls={int(k): int(v) for k, v in meta["self_calls"].items()},
            step_generator=tensors.get("step_generator"), generator_device=meta.get("generator_device"),
        )


def _is_index(value) -> bool:
    """Whether ``value`` is a non-negative int (not a bool), as a step index or map side is stored."""
    return type(value) is int and value >= 0


def _check_saved_fields(meta: Mapping) -> None:
    """Raise `ValueError` naming the first sidecar field of a saved pass that has the wrong type or
    range (a damaged or forged file: the tensors' SHA-256 does not cover the sidecar's fields)."""
    for name in ("identity", "given", "self_calls"):
        if not isinstance(meta.get(name), dict):
            raise ValueError(f"its {name} is not a JSON object")
    for name in ("cross_steps", "self_steps"):
        steps = meta.get(name)
        if not (isinstance(steps, list) and len(steps) == 2 and all(map(_is_index, steps)) and steps[0] <= steps[1]):
            raise ValueError(f"its {name} is {steps!r}, not a [first, stop] pair of step indices")
    model = meta["identity"].get("model")
    if not (isinstance(model, dict) and all(isinstance(model.get(k), str) for k in ("family", "name_or_path", "fingerprint", "dtype"))):
        raise ValueError("its identity names no model (family, name_or_path, fingerprint and dtype as text)")
    if not isinstance(meta["identity"].get("prompt"), str) or not _is_index(meta["identity"].get("num_inference_steps")):
        raise ValueError("its identity has no prompt (text) or no num_inference_steps (a whole number)")
    if not _is_index(meta.get("self_max_res")):
        raise ValueError(f"its self_max_res is {meta.get('self_max_res')!r}, not a map side")
    if not all(k.isdigit() and _is_index(v) for k, v in meta["self_calls"].items()):
        raise ValueError("its self_calls are not counts by map side")
    if not isinstance(meta.get("generator_device"), (str, type(None))):
        raise ValueError("its generator_device is not a device name")


# ----------------------------------------------------------------- identities


def tensor_digest(tensors: Iterable[torch.Tensor | None], head: int | None = None) -> str:
    """A short SHA-256 of tensors' shapes, dtypes and values (float32 bytes on the CPU).

    Args:
        tensors: the tensors (None entries are skipped, but counted).
        head: hash only the first ``head`` elements of each (a cheap fingerprint of large weights).

    Returns:
        16 hex digits.
    """
    digest = hashlib.sha256()
    for t in tensors:
        if t is None:
            digest.update(b"none")
            continue
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        flat = t.detach().reshape(-1)  # (elements,)
        flat = flat if head is None else flat[:head]
        digest.update(flat.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(family: str, name_or_path: str, modules: Iterable, dtype: torch.dtype) -> dict:
    """What identifies a model for a `SourcePass`: its family, name, a cheap weight fingerprint
    (the first 4096 values of each module's first and last parameter) and its dtype.

    Args:
        family: the pipeline's ``model_family``.
        name_or_path: the pipeline's ``name_or_path`` (for messages; not compared).
        modules: the modules whose weights make the fingerprint (None entries are skipped).
        dtype: the UNet's dtype.

    Returns:
        ``{"family", "name_or_path", "fingerprint", "dtype"}``.
    """
    ends = []
    for module in modules:
        if module is None:
            continue
        params = list(module.parameters())
        ends += [params[0], params[-1]] if params else []
    return {"family": family, "name_or_path": name_or_path, "fingerprint": tensor_digest(ends, head=4096), "dtype": str(dtype)}


def scheduler_identity(scheduler) -> dict:
    """A scheduler's class and config as JSON values (what makes its timesteps and steps)."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, sort_keys=True, default=str))}


def jsonable(value):
    """``value`` as JSON has it (tuples as lists), so that a loaded pass compares equal to a new call's."""
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------- checks (pure)


def check_is_pass(source) -> "SourcePass":
    """``source`` when it is a `SourcePass`.

    Raises:
        ArgumentError: of ``source``, naming what it is instead.
    """
    if not isinstance(source, SourcePass):
        raise ArgumentError("source", f"source must be a SourcePass (from pipe.source(...) or SourcePass.load), got {type(source).__name__}")
    return source


def fill_defaults(source: SourcePass, **given) -> dict:
    """The call's arguments with each None replaced by what the pass was made with.

    Args:
        source: the pass.
        **given: the call's values of arguments that default to None (steps, guidance, sizes, ...).

    Returns:
        ``given`` with its None values filled from ``source.given`` (left None where the pass has none).
    """
    return {k: (source.given.get(k) if v is None else v) for k, v in given.items()}


def source_row_values(**given) -> dict:
    """The source row's value of each argument given one per prompt (a list of strings, source first:
    its first) or once for all rows (itself): what `SourcePass.given` records of a call.

    Args:
        **given: the call's values (``negative_prompt``, ``prompt_2``, ...).

    Returns:
        ``{name: the source's value}``.
    """
    return {k: (v[0] if isinstance(v, (list, tuple)) and v and isinstance(v[0], str) else v) for k, v in given.items()}


def check_same_pass(source: SourcePass, identity: Mapping, given: Mapping | None = None) -> None:
    """Refuse a call whose own source pass would differ from ``source``'s.

    Args:
        source: the pass given as ``source=``.
        identity: the call's identity, made as `Prompt2PromptPipeline.source` makes the pass's.
        given: the call's arguments as given, shown in messages instead of the identity's form
            (token ids) where the pass's ``given`` has the argument too.

    Raises:
        ArgumentError: of ``source`` for another model, family or dtype, or a changed scheduler;
            else of the first argument in `IDENTITY_ORDER` whose value differs.
    """
    ours, theirs = source.identity["model"], identity["model"]
    if (ours["family"], ours["fingerprint"], ours["dtype"]) != (theirs["family"], theirs["fingerprint"], theirs["dtype"]):
        raise ArgumentError("source", f"this SourcePass was made by the {ours['family'].upper()} model {ours['name_or_path']!r} "
                            f"({ours['dtype']}, weights {ours['fingerprint']}), but this pipeline runs {theirs['name_or_path']!r} "
                            f"({theirs['family'].upper()}, {theirs['dtype']}, weights {theirs['fingerprint']}); make a new one with "
                            "pipe.source(...)")
    for name in IDENTITY_ORDER:
        if name not in source.identity and name not in identity:
            continue
        mine, yours = source.identity.get(name), jsonable(identity.get(name))
        if mine == yours:
            continue
        if name in _NOT_ARGUMENTS:
            raise ArgumentError("source", f"the pipeline's {name} is {yours} but this SourcePass ran {mine}; restore it, or make a "
                                "new pass with pipe.source(...)")
        if given and name in given and name in source.given:
            yours, mine = given[name], source.given[name]
        if name == "prompt":
            raise ArgumentError(name, f"prompt={_shown(yours)} but this SourcePass is of the prompt {_shown(mine)}; pass that prompt "
                                "(edit through edit_prompts), or make a pass of this one with pipe.source(prompt, ...)")
        if name == "inversion":
            if mine is None:
                what = "this SourcePass was made without an inversion; drop inversion="
            elif yours is None:
                what = "this SourcePass was made from an inversion; pass that inversion (inversion=inv) to the call too"
            else:
                what = "the call's inversion is not the one this SourcePass was made from; pass that one"
            raise ArgumentError(name, f"{what}, or make a new pass with pipe.source(prompt, inversion=...)")
        fix = "leave it out (None takes the pass's)" if name in FILLED else f"pass {name}={_shown(mine)}"
        raise ArgumentError(name, f"{name}={_shown(yours)} but this SourcePass was made with {name}={_shown(mine)}; {fix} "
                            f"or make a new pass with pipe.source(..., {name}=...)")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_initial_latents(source: SourcePass, latents: torch.Tensor, argument: str) -> None:
    """Refuse initial latents whose source row differs from the pass's.

    Args:
        source: the pass.
        latents: ``(prompts, C, h, w)`` the call's initial latents (source row first), scaled by the scheduler.
        argument: the argument that gave them (``generator``, ``latents`` or ``inversion``).

    Raises:
        ArgumentError: of ``argument``.
    """
    kept = source.latents[0]  # (C, h, w)
    row = latents[0].to(kept.device, kept.dtype)  # (C, h, w)
    if not torch.equal(row, kept):
        raise ArgumentError(argument, f"the {argument} gives other initial latents than the SourcePass's; pass the same {argument} "
                            "as to pipe.source(...), or leave generator and latents out (the pass's noise is used)")


def _steps_text(first: int, stop: int, total: int) -> str:
    return f"steps {first} to {stop - 1} of {total}" if stop > first else "no steps"


def covering_fraction(step: int, total: int) -> float:
    """The shortest decimal fraction ``f`` with ``int(f * total) == step`` (how windows round).

    Args:
        step: a step index, ``0 <= step <= total``.
        total: the number of steps.

    Returns:
        ``f`` in [0, 1].
    """
    for digits in range(1, 12):
        f = round(step / total, digits)
        if int(f * total) == step:
            return f
    return step / total


def check_budget(source: SourcePass, cross_needed: list[int], self_steps: tuple[int, int], self_max_res: int) -> None:
    """Refuse an edit that injects more of the source than the pass kept.

    Args:
        source: the pass.
        cross_needed: the step indices at which the edit takes the source's cross-attention.
        self_steps: ``(first, stop)`` the steps at which it injects self-attention (with windows
            per target, the widest of them: `edits.EditPlan.self_steps`).
        self_max_res: the largest side it injects self-attention at (0: none).

    Raises:
        ArgumentError: of ``cross_replace_steps``, ``self_replace_steps`` or ``self_replace_max_res``,
            saying what the pass lacks and the `Prompt2PromptPipeline.source` call that covers it.
    """
    total = source.num_inference_steps
    kept_c, kept_s = source.cross_steps, source.self_steps
    if cross_needed and not all(kept_c[0] <= i < kept_c[1] for i in cross_needed):
        first, stop = min(min(cross_needed), kept_c[0]), max(max(cross_needed) + 1, kept_c[1])
        window = (covering_fraction(first, total), covering_fraction(stop, total))
        raise ArgumentError("cross_replace_steps",
                            f"the edit injects cross-attention at {_steps_text(min(cross_needed), max(cross_needed) + 1, total)}, but this "
                            f"SourcePass kept the source's cross-attention for {_steps_text(*kept_c, total)} only; make one that covers it "
                            f"with pipe.source(..., cross_replace_steps={window})")
    injects_self = self_max_res > 0 and self_steps[1] > self_steps[0]
    if not injects_self:
        return
    side = max(self_max_res, source.self_max_res)
    first, stop = min(self_steps[0], kept_s[0]), max(self_steps[1], kept_s[1])
    window = (covering_fraction(first, total), covering_fraction(stop, total))
    fix = f"make one that covers it with pipe.source(..., self_replace_max_res={side}, self_replace_steps={window})"
    if self_max_res > source.self_max_res:
        raise ArgumentError("self_replace_max_res", f"the edit injects self-attention at map sides up to {self_max_res}, but this "
                            f"SourcePass kept sides up to {source.self_max_res} only; {fix}")
    if not (kept_s[0] <= self_steps[0] and self_steps[1] <= kept_s[1]):
        raise ArgumentError("self_replace_steps", f"the edit injects self-attention at {_steps_text(*self_steps, total)}, but this "
                            f"SourcePass kept the source's self-attention for {_steps_text(*kept_s, total)} only; {fix}")


# ----------------------------------------------------------------- size from shapes


def _attention_layers(unet, latent_hw: tuple[int, int]) -> Iterable[tuple[bool, int, int, int]]:
    """``(is_cross, side, pixels, inner_dim)`` of every attention layer of ``unet`` at latent size
    ``latent_hw``, from the layer's name (its level, as `attention.attention_sides` reads it) and
    its query projection's width; no weight is read (a UNet on the ``meta`` device will do)."""
    from .attention import place_of  # the processors' naming of places; attention does not import this module

    deepest = len(unet.config.down_block_types) - 1
    for name, module in unet.named_modules():
        if not (hasattr(module, "to_q") and hasattr(module, "is_cross_attention")):
            continue
        parts = name.split(".")
        level = {"down": lambda: int(parts[1]), "mid": lambda: deepest, "up": lambda: deepest - int(parts[1])}[place_of(name)]()
        h, w = latent_hw
        for _ in range(level):
            h, w = -(-h // 2), -(-w // 2)
        yield bool(module.is_cross_attention), max(h, w), h * w, module.to_q.out_features


def source_pass_bytes(unet, latent_hw: tuple[int, int], num_steps: int, cross_steps: tuple[int, int], self_steps: tuple[int, int],
                      self_max_res: int, dtype: torch.dtype, tokens: int, text_width: int, generator_bytes: int = 0) -> int:
    """The `SourcePass.nbytes` of a pass, computed from the UNet's shapes alone (no weights, no run).

    Args:
        unet: a diffusers `UNet2DConditionModel` (its weights may be on the ``meta`` device).
        latent_hw: the latent ``(height, width)``.
        num_steps: denoising steps.
        cross_steps: ``(first, stop)`` steps whose cross-attention queries are kept.
        self_steps: ``(first, stop)`` steps whose self-attention queries and keys are kept.
        self_max_res: the largest side whose self-attention is kept.
        dtype: the run's dtype (queries, keys, latents, text states); the maps are float32.
        tokens: the text's token count (77 for CLIP).
        text_width: the text states' width (``cross_attention_dim``).
        generator_bytes: the size of a step-noise generator's state (0: a deterministic sampler).

    Returns:
        The bytes.
    """
    item = torch.empty(0, dtype=dtype).element_size()
    channels = unet.config.in_channels
    h, w = latent_hw
    total = (num_steps + 2) * channels * h * w * item + tokens * text_width * item + generator_bytes  # latents, noise, text
    cross_sides, self_sides = {}, {}
    for is_cross, side, pixels, inner in _attention_layers(unet, latent_hw):
        if is_cross:
            total += (cross_steps[1] - cross_steps[0]) * pixels * inner * item  # queries
            cross_sides[side] = pixels
        else:
            if side <= self_max_res:
                total += (self_steps[1] - self_steps[0]) * 2 * pixels * inner * item  # queries and keys
            self_sides[side] = pixels
    total += sum(num_steps * pixels * tokens * 4 for pixels in cross_sides.values())  # summed maps per step
    total += sum(pixels * pixels * 4 for pixels in self_sides.values())  # self-attention sums
    return total


# ----------------------------------------------------------------- which pass an edit needs, and what made one
#
# Small and free of model work, so that the command line and the web page stay thin layers: the
# injection budget a set of edits needs (`covering_window`, `budget_of`), and the record of what made
# a pass (`pass_record`, `record_mismatch`), which the tools compare before they hand a kept pass to
# the pipeline. The pipeline itself refuses a pass whose source-side arguments or budget do not fit
# an edit (`check_same_pass`, `check_budget`); these only decide which pass to try.

#: The options of an edit that fix its source's pass (the command line's names). The budget (the
#: injection windows) is checked by the pipeline; the photo by its SHA-256.
SOURCE_KEYS = ("model", "dtype", "prompt", "seed", "steps", "guidance", "image", "invert")


def _bounds(window) -> tuple[float, float]:
    """``f`` -> (0, f); ``(start, end)`` or ``[start, end]`` -> itself."""
    if isinstance(window, (list, tuple)):
        start, end = window
        return float(start), float(end)
    return 0.0, float(window)


def covering_window(windows: Iterable) -> float | tuple[float, float]:
    """The smallest window that holds every one of ``windows`` (fractions ``f`` meaning ``(0, f)``,
    ``(start, end)`` pairs, or dicts of them per word as ``cross_replace_steps`` takes, whose values
    all count): the earliest start to the latest end. A plain fraction when it starts at 0.

    Raises:
        ValueError: no window given.
    """
    bounds = []
    for window in windows:
        if isinstance(window, Mapping):
            bounds.extend(_bounds(w) for w in window.values())
        else:
            bounds.append(_bounds(window))
    if not bounds:
        raise ValueError("covering_window needs at least one window")
    start, end = min(b[0] for b in bounds), max(b[1] for b in bounds)
    return end if start == 0 else (start, end)


def budget_of(cross_windows: Iterable, self_windows: Iterable) -> dict[str, Any]:
    """``pipe.source``'s budget arguments (``cross_replace_steps``, ``self_replace_steps``) that
    cover every given cross-attention window (per-word dicts included) and self-attention window."""
    return {"cross_replace_steps": covering_window(cross_windows), "self_replace_steps": covering_window(self_windows)}


def pass_record(options: Mapping, photo_sha256: str | None = None) -> dict[str, Any]:
    """What made a pass, from an edit's canonical options (`options.EDIT_KEYS`): the model, dtype,
    source prompt, seed (or the photo's SHA-256 and inversion method), steps and guidance."""
    record = {key: options.get(key) for key in SOURCE_KEYS}
    if options.get("image"):
        record["seed"] = None  # an inversion fixes the noise, not the seed
        record["image"] = photo_sha256
    else:
        record["invert"] = None
    return record


#: How a note names each key of a record.
_KEY_NAMES = {"model": "model", "dtype": "dtype", "prompt": "source prompt", "seed": "seed", "steps": "steps",
              "guidance": "guidance", "image": "photo", "invert": "inversion method"}


def record_mismatch(kept: Mapping, wanted: Mapping) -> str | None:
    """None when the record of a kept pass equals the wanted one, else the first difference in a few
    words (``"this edit's seed is 3, the pass's 2"``)."""
    for key in SOURCE_KEYS:
        if kept.get(key) != wanted.get(key):
            if key == "image":
                return "this edit's photo is not the pass's (their SHA-256 differ)"
            show = repr if key in ("prompt", "model") else str
            return f"this edit's {_KEY_NAMES[key]} is {show(wanted.get(key))}, the pass's {show(kept.get(key))}"
    return None
