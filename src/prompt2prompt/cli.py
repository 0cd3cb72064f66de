"""``p2p``: Prompt-to-Prompt from the command line.

A thin layer over `Prompt2PromptPipeline`: it parses arguments, checks them with
`prompt2prompt.options` (shared with the web page), calls the pipeline and writes files.
Commands: ``generate``, ``edit``, ``attention``, ``sweep``, ``batch``, ``info`` and ``serve``
(the web page of `prompt2prompt.web`); ``p2p COMMAND --help`` shows each one's options and examples.

Every PNG it writes carries its parameters (see `prompt2prompt.imageio`); ``p2p info`` prints
them and ``p2p edit --from IMAGE.png`` runs them again. Exit status: 0 success, 1 runtime
failure (one line; ``--debug`` adds the traceback), 2 usage error (one line naming the option
and the fix), 130 interrupted (no partial files are left).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path

from . import __version__
from .alignment import split_words, tokenize_words
from .arguments import ARGUMENTS, DTYPES, INVERT_METHODS, MODES, argument_of, option_default
from .edits import EditMode
from .finite import NonFiniteError
from .imageio import OutputSet, WriteError, file_sha256, remove_stale_temps, writing_into
from .model_folder import FAMILIES, model_family, prompt_token_limit
from .source_pass import budget_of, pass_record, record_mismatch
from .web import QUEUE_SIZE as web_queue_size
from .web import SOURCE_LIMIT_MIB as web_source_limit_mib
from .options import (
    ATTENTION_KEYS,
    BATCH_LINE_KEYS,
    DEFAULTS,
    EDIT_KEYS,
    FLAGS,
    GENERATE_KEYS,
    NORMALISERS,
    PROG,
    RESULT,
    SWEEP_KEYS,
    OptionError,
    check_edit_words,
    choice_of,
    edit_kwargs,
    image_metadata,
    integer_option,
    json_lines,
    json_object,
    model_label,
    model_option,
    normalise_options,
    one_line,
    parameters_text,
    read_stored_metadata,
    read_stored_options,
    slugify,
    stored_parameters_text,
    user_path,
)
from .visualisation import (
    align_words,
    gray_image,
    labelled_grid,
    self_attention_components,
    token_heatmaps,
)

#: Bad command-line input: exit status 2, one line (the options' `OptionError`, a ``ValueError``).
UsageError = OptionError
#: Images per row of the attention pictures' grids.
GRID_COLUMNS = 8
#: ``p2p batch --workers``: one process, one model in memory.
BATCH_WORKERS = 1
#: ``p2p serve``: this machine only, on Gradio's usual port.
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 7860
MAX_PORT = 65535
SERVE_OUTPUT_DIR = "outputs/web"
#: ``p2p edit`` saves its source pass beside its result when it is at most this many MiB
#: (``--source-limit``; 0 never saves one). The bundled model's pass at 50 steps is far below it;
#: SD 1.5's at 512 px is over it (1.22 GB in fp16: keep it with ``--source-limit 1300``).
SOURCE_LIMIT_MIB = 256
MIB = 2**20
#: The file ``p2p edit`` saves its source pass to, in the run folder (``SourcePass.save`` writes
#: its ``.json`` sidecar beside it).
SOURCE_FILE = "source.safetensors"
#: For a photo, the inversion the pass was made from (``Inversion.save``), which an edit from the pass takes too.
INVERSION_FILE = "inversion.safetensors"
#: ``p2p serve --source-limit``'s default (the web module imports Gradio only when it serves).
SERVE_SOURCE_LIMIT_MIB = web_source_limit_mib
#: ``p2p serve --queue-size``'s default: requests waiting before a visitor is told the page is busy.
SERVE_QUEUE_SIZE = web_queue_size


class RuntimeFailure(Exception):
    """The command could not be carried out: exit status 1, one line."""


#: What a `WriteError` tells the command line's user to choose instead of a full, read-only or removed folder.
OTHER_OUTPUT = "another -o folder"


def write_failure(err: WriteError) -> RuntimeFailure:
    """A `WriteError` as the command line reports it (exit status 1): the folder, and ``-o`` as the other way out."""
    return RuntimeFailure(str(err.choose(OTHER_OUTPUT)))


# ============================================================================ output folders


def _check_writable(folder: Path, label: str) -> None:
    """Raise `UsageError` unless ``folder`` can be made and written: its nearest existing ancestor
    must be a folder this process can write in (checked before any model work)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{label}: {existing} is a file, not a folder; name a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{label}: cannot write in {existing}; name a folder you can write to")


def output_folder(given: str | None, slug: str) -> Path:
    """``-o DIR``, or a new ``outputs/<YYYYmmdd-HHMMSS>-<slug>``; checked to be writable."""
    if given is not None:
        folder = user_path(given, "-o")
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"-o {given}: exists and is not a folder; name a folder")
        _check_writable(folder, f"-o {given}")
        return folder
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("outputs") / f"{stamp}-{slug}"
    folder, n = base, 2
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    _check_writable(folder, f"the output folder {folder} (choose another with -o)")
    return folder


# ============================================================================ the model


def device_name(value: str) -> str:
    """``--device``'s form (cpu, cuda, cuda:N or mps), not whether this machine has it; `UsageError` if malformed."""
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps, got {value!r}")
    return value


def check_device(value: str | None) -> str:
    """``--device`` -> a torch device string (None/auto: cuda, else mps, else cpu).

    Raises:
        UsageError: a malformed device; RuntimeFailure: one this machine lacks.
    """
    import torch

    if value is None or value == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    device_name(value)
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeFailure(f"--device {value}: CUDA is not available on this machine; use --device cpu")
    if value == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeFailure("--device mps: MPS is not available on this machine; use --device cpu")
    return value


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.endswith(("/", os.sep)) or model.count("/") > 1 or os.sep != "/" and os.sep in model


@contextlib.contextmanager
def library_output(debug: bool):
    """Silence diffusers' and transformers' loading bars and info logs (unless ``--debug``)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    if not debug:
        for module in (dlog, tlog):
            module.set_verbosity_error()
            module.disable_progress_bar()
    try:
        yield
    finally:
        for module, level, bars in saved:
            module.set_verbosity(level)
            (module.enable_progress_bar if bars else module.disable_progress_bar)()


def check_model(model: str | None, allow_pickle: bool = False) -> None:
    """Raise `RuntimeFailure` for a model folder that is missing, is not a diffusers folder, or has a
    missing or damaged file (`check_model_folder`)."""
    if model is None:
        return
    from .model_folder import check_model_folder

    path = Path(model).expanduser()
    if path.exists():
        try:
            check_model_folder(path, allow_pickle)  # a missing or damaged file, named before torch and diffusers load
        except ValueError as err:
            raise RuntimeFailure(f"--model {model}: {one_line(err)}") from err
    elif _looks_like_path(model):
        raise RuntimeFailure(f"--model {model}: no such folder; name a diffusers model folder or a hub id")


def load_pipeline(model: str | None, dtype: str, device: str, progress: bool, allow_pickle: bool = False):
    """Load the pipeline the model's folder needs (`loading.load_pipeline`: SDXL or Stable
    Diffusion) onto ``device`` (pickle weights only with ``allow_pickle``).

    Raises:
        RuntimeFailure: a missing model folder, a folder that is not a diffusers model, any load error.
    """
    import torch

    from . import loading

    check_model(model, allow_pickle)
    try:
        pipe = loading.load_pipeline(model, torch_dtype=getattr(torch, dtype), allow_pickle=allow_pickle)
        pipe = pipe.to(device)
    except Exception as err:  # noqa: BLE001 - every load failure is a runtime failure
        reason = one_line(err).replace(" Please check out the root cause in the stacktrace above.", "")
        if model is not None and not Path(model).expanduser().exists():  # a hub id: no folder of that name here
            reason += (f" ({model!r} is not a folder here, so it was looked up as a Hugging Face hub id; name a local "
                       "diffusers folder, or run where the hub can be reached)")
        raise RuntimeFailure(f"could not load the model {model_label(model)}: {reason}") from err
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def library_flag(error: BaseException) -> str | None:
    """The flag of the option that sets the argument a library error carries (its ``.argument``
    looked up in `arguments.ARGUMENTS`, never its message).

    None for an error without an argument (a plain ``ValueError``), for an argument no flag sets,
    and for the positional prompt (the library's messages about it start with ``prompt``).
    """
    row = argument_of(error)
    flag = row.flag if row is not None else None
    return flag if flag is not None and flag.startswith("-") else None


def _call(function, *args, **kwargs):
    """Run a library call; its argument errors (ValueError, raised before any work) are usage errors,
    prefixed with the flag of the argument they carry (``--res: attention_res 7 ...``). NaN or
    infinity met while running (`finite.NonFiniteError`) is a failure of the run (exit status 1)."""
    try:
        return function(*args, **kwargs)
    except NonFiniteError as err:
        raise RuntimeFailure(one_line(err)) from err
    except ValueError as err:
        message = one_line(err)
        flag = library_flag(err)
        raise UsageError(f"{flag}: {message}" if flag else message, getattr(err, "argument", None)) from err


def _bar(pipe, show: bool, desc: str | None = None) -> None:
    config = {"disable": not show}
    if desc:
        config["desc"] = desc
    pipe.set_progress_bar_config(**config)


class Console:
    """Where the command reports: info lines on stdout unless quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = not quiet and sys.stderr.isatty()

    def info(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)


# ============================================================================ commands


def run_generate(pipe, options: dict, folder: Path, env: Mapping, console: Console) -> dict:
    _bar(pipe, console.progress)
    out = _call(
        pipe, options["prompt"], num_inference_steps=options["steps"], guidance_scale=options["guidance"],
        generator=_generator(options["seed"]), return_attention=False,
    )
    files = OutputSet(folder)
    meta = image_metadata("generate", options, env, "image", 0, 1, "image.png", options["prompt"])
    files.add_png("image.png", out.images[0], meta, parameters_text(meta))
    result = {"command": "generate", "version": __version__, "options": options, "device": env["device"], "model_family": env.get("family"),
              "images": [{"file": "image.png", "role": "image", "prompt": options["prompt"]}]}
    files.add_json(RESULT, result)
    files.commit()
    return result


def _invert(pipe, options: dict):
    # the library reads the file (EXIF rotation, transparency, crop and resize: inversion.load_image)
    return _call(pipe.invert, options["image"], options["prompt"], method=options["invert"], num_inference_steps=options["steps"],
                 guidance_scale=options["guidance"])


def _window_arg(window):
    return tuple(window) if isinstance(window, list) else window


def source_budget(options: Mapping, cross_windows=None) -> dict:
    """``pipe.source``'s injection budget for canonical edit options: the widest of ``cross_windows``
    (default: the options' own ``cross_steps``) and the per-word windows, and the self window."""
    cross = [options["cross_steps"]] if cross_windows is None else list(cross_windows)
    cross += list((options.get("cross_steps_word") or {}).values())
    return budget_of([_window_arg(w) for w in cross], [_window_arg(options["self_steps"])])


def make_source(pipe, options: Mapping, budget: Mapping) -> tuple:
    """The source's pass for canonical edit options (from the seed's noise, or the photo's
    inversion) -> ``(pass, the inversion or None)``."""
    kwargs = dict(num_inference_steps=options["steps"], guidance_scale=options["guidance"], **budget)
    if options.get("image"):
        inversion = _invert(pipe, options)
        return _call(pipe.source, options["prompt"], inversion=inversion, **kwargs), inversion
    return _call(pipe.source, options["prompt"], generator=_generator(options["seed"]), **kwargs), None


def sweep_from_source(pipe, options: Mapping, windows, source) -> tuple:
    """A sweep's images in one call from ``source`` (a `SourcePass`): the target once per value of
    ``windows`` (cross-attention windows), each with its own window (`cross_replace_steps` as a
    list, one per target), then, without LocalBlend, the no-injection image as one more target
    with empty windows (the same image as ``mode none``: no step takes the source's attention).

    Returns:
        ``(output, 1 when the no-injection image is the batch's last target else 0)``.
    """
    kwargs = edit_kwargs({**options, "cross_steps": windows[0]})
    cross = [edit_kwargs({**options, "cross_steps": w})["cross_replace_steps"] for w in windows]
    self_steps = [kwargs["self_replace_steps"]] * len(windows)
    with_none = not options.get("blend") and EditMode.parse(options["mode"]) is not EditMode.NONE
    if with_none:
        cross.append(0.0)
        self_steps.append(0.0)
    kwargs.update(cross_replace_steps=cross, self_replace_steps=self_steps)
    targets = [options["to"][0]] * len(cross)
    return _call(pipe, options["prompt"], targets, source=source, return_attention=False, **kwargs), int(with_none)


def edit_from_source(pipe, options: Mapping, source, inversion=None):
    """The targets of canonical edit options, edited from ``source`` (a `SourcePass`; ``inversion``:
    the photo's inversion it was made from, which the pipeline takes beside it)."""
    extra = {"inversion": inversion} if inversion is not None else {}
    return _call(pipe, options["prompt"], list(options["to"]), source=source, return_attention=False, **extra, **edit_kwargs(options))


class KeptPass:
    """A source pass saved beside an earlier result, found by ``p2p edit --from``: ``path`` (its
    file), ``source`` (the loaded `SourcePass`) and, for a photo, the `Inversion` it was made from."""

    def __init__(self, path: Path, source, inversion=None):
        self.path, self.source, self.inversion = path, source, inversion


def run_edit_images(pipe, options: dict, console: Console, desc: str | None = None, kept: KeptPass | None = None):
    """One edit for canonical edit options -> ``(output, source pass, inversion or None, path the
    pass was reused from or None)``.

    With ``kept``, the targets are edited from that pass when the pipeline takes it; when it does
    not (another budget, another source-side argument: the pipeline's `ArgumentError`, raised before
    any work), a one-line note says why and the edit runs in full. In full, the source and all the
    targets run in one batch (after the photo's inversion, if any), which keeps the source's pass
    as it runs (`full_edit_keeping_source`).
    """
    _bar(pipe, console.progress, desc)
    if kept is not None:
        extra = {"inversion": kept.inversion} if kept.inversion is not None else {}
        try:
            out = pipe(options["prompt"], list(options["to"]), source=kept.source, return_attention=False, **extra, **edit_kwargs(options))
        except ValueError as err:
            console.info(f"source pass {kept.path} not reused: {one_line(err)}; running the full edit")
        else:
            console.info(f"source reused from {kept.path}")
            return out, kept.source, kept.inversion, str(kept.path)
    out, inversion = full_edit_keeping_source(pipe, options)
    return out, out.source_pass, inversion, None


def full_edit_keeping_source(pipe, options: Mapping) -> tuple:
    """The full edit of canonical edit options (from the seed's noise, or the photo's inversion),
    its source's pass kept in the same batch (``keep_source``: its budget is the edit's own windows)
    -> ``(output with .source_pass, the inversion or None)``."""
    inversion = _invert(pipe, options) if options.get("image") else None
    start = {"inversion": inversion} if inversion is not None else {"generator": _generator(options["seed"])}
    out = _call(pipe, options["prompt"], list(options["to"]), keep_source=True, return_attention=False, **start, **edit_kwargs(options))
    return out, inversion


def word_alignments(pipe, options: Mapping, mode) -> list:
    """`align_words` of each target against the source, with the pipeline's tokenizer."""
    source = tokenize_words(options["prompt"], pipe.tokenizer, truncate=True)
    return [align_words(source, tokenize_words(t, pipe.tokenizer, truncate=True), mode) for t in options["to"]]


def _photo_sha256(options: Mapping) -> str | None:
    return file_sha256(options["image"]) if options.get("image") else None


def _saved_files(save, name: str) -> list[tuple[str, bytes]]:
    """``save(path)`` into a temporary folder -> ``[(file name, bytes)]``, ``name`` first (then its sidecars)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="p2p-source-") as tmp:
        save(Path(tmp) / name)
        written = sorted(p for p in Path(tmp).iterdir() if p.is_file())
        if name not in [p.name for p in written]:
            raise RuntimeFailure(f"saving {name} wrote {[p.name for p in written]}")
        return [(p.name, p.read_bytes()) for p in sorted(written, key=lambda p: p.name != name)]


def add_source_pass(files: OutputSet, source, inversion, options: Mapping, limit_bytes: int, reused_from: str | None,
                    console: Console) -> dict:
    """Add ``source`` (``SourcePass.save``'s files, and for a photo ``Inversion.save``'s) to
    ``files`` when they are at most ``limit_bytes`` together; returns what ``result.json`` records
    of them (their files, size, what made the pass, where it came from)."""
    record = {"bytes": int(source.nbytes), "made_with": pass_record(options, _photo_sha256(options)), "limit_bytes": int(limit_bytes)}
    if reused_from is not None:
        record["reused_from"] = reused_from
    saved = []
    if limit_bytes > 0 and source.nbytes <= limit_bytes:
        saved = _saved_files(source.save, SOURCE_FILE)
        if inversion is not None:
            saved += _saved_files(inversion.save, INVERSION_FILE)
    total = sum(len(data) for _, data in saved) if saved else int(source.nbytes)
    record["bytes"] = total
    if not saved or total > limit_bytes:
        record["saved"] = False
        if limit_bytes > 0:
            console.info(f"source pass not saved: {total / MIB:.1f} MiB is over --source-limit {limit_bytes / MIB:g} MiB")
        return record
    for name, data in saved:
        files.add(name, data)
    names = [n for n, _ in saved]
    record.update(saved=True, file=SOURCE_FILE, sidecars=[{"file": n} for n in names if n not in (SOURCE_FILE, INVERSION_FILE)])
    if inversion is not None:
        record["inversion"] = {"file": INVERSION_FILE}
    return record


def run_edit(pipe, options: dict, folder: Path, env: Mapping, console: Console, command: str = "edit",
             source_limit: int = SOURCE_LIMIT_MIB * MIB, kept: KeptPass | None = None, root: Path | None = None) -> dict:
    """Run one edit and write its images, grid, source pass (when at most ``source_limit`` bytes) and
    result.json (last) into ``folder``; ``kept``: a saved pass to edit from (`run_edit_images`);
    ``root``: the run's output folder above ``folder``, which must still be there (`imageio.OutputSet`)."""
    out, source, inversion, reused_from = run_edit_images(pipe, options, console, kept=kept)
    mode = out.edit_mode
    alignments = word_alignments(pipe, options, mode)
    chosen = " (chosen by auto)" if options["mode"] == "auto" else ""
    console.info(f"edit mode: {mode.value}{chosen}")
    for target, alignment in zip(options["to"], alignments):
        summary = alignment.describe() if mode is not EditMode.NONE else f"{alignment.describe()} (mode none: no attention injected)"
        console.info(f"aligned words ({target}): {summary}")
    prompts = [options["prompt"], *options["to"]]
    names = ["source.png"] + [f"edit-{k}.png" for k in range(1, len(prompts))]
    roles = ["source"] + ["target"] * (len(prompts) - 1)
    files = OutputSet(folder, root)
    count = len(prompts) + 1
    for index, (name, role, prompt, image) in enumerate(zip(names, roles, prompts, out.images)):
        meta = image_metadata(command, options, env, role, index, count, name, prompt, edit_mode=mode.value)
        files.add_png(name, image, meta, parameters_text(meta))
    source_marks = set().union(*(a.changed_source for a in alignments))
    grid = labelled_grid(list(out.images), prompts, [source_marks, *[a.changed_target for a in alignments]])
    meta = image_metadata(command, options, env, "grid", len(prompts), count, "grid.png", None, edit_mode=mode.value)
    files.add_png("grid.png", grid, meta, parameters_text(meta))
    source_pass = add_source_pass(files, source, inversion, options, source_limit, reused_from, console)
    result = {
        "command": command,
        "version": __version__,
        "options": options,
        "device": env["device"],
        "model_family": env.get("family"),
        "edit_mode": mode.value,
        "alignment": [
            {
                "target": t,
                "summary": a.describe(),
                "pairs": [[a.source.words[s] if s is not None else None, a.target.words[k]] for s, k in a.pairs],
                "changed_target_words": [a.target.words[k] for k in sorted(a.changed_target)],
                "changed_source_words": [a.source.words[k] for k in sorted(a.changed_source)],
            }
            for t, a in zip(options["to"], alignments)
        ],
        "images": [{"file": n, "role": r, "prompt": p} for n, r, p in zip(names, roles, prompts)],
        "grid": "grid.png",
        "source_pass": source_pass,
    }
    files.add_json(RESULT, result)
    files.commit()
    return result


def find_kept_pass(from_image: str, options: Mapping, console: Console) -> KeptPass | None:
    """The source pass saved beside ``from_image`` (``p2p edit --from``) when its record matches
    ``options`` (model, dtype, source prompt, seed or photo, steps, guidance) and it loads; else None,
    with a one-line note when there is one that does not match or cannot be read."""
    from .source_pass import SourcePass

    folder = Path(from_image).expanduser().parent
    try:
        record = json.loads((folder / RESULT).read_text(encoding="utf-8")).get("source_pass") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(record, dict) or not record.get("saved") or not isinstance(record.get("file"), str):
        return None
    path = folder / record["file"]
    if not path.is_file():
        console.info(f"source pass {path} not reused: the file is missing; running the full edit")
        return None
    mismatch = record_mismatch(record.get("made_with") or {}, pass_record(options, _photo_sha256(options)))
    if mismatch:
        console.info(f"source pass {path} not reused: {mismatch}; running the full edit")
        return None
    inversion_file = (record.get("inversion") or {}).get("file") if isinstance(record.get("inversion"), dict) else None
    try:
        source = SourcePass.load(path)
        inversion = None
        if options.get("image"):
            from .inversion import Inversion

            if not isinstance(inversion_file, str):
                raise ValueError("the photo's inversion was not saved beside it")
            inversion = Inversion.load(folder / inversion_file)
    except (OSError, ValueError) as err:
        console.info(f"source pass {path} not reused: it cannot be read ({one_line(err)}); running the full edit")
        return None
    return KeptPass(path, source, inversion)


def run_attention(pipe, options: dict, folder: Path, env: Mapping, console: Console) -> dict:
    _bar(pipe, console.progress)
    out = _call(
        pipe, options["prompt"], num_inference_steps=options["steps"], guidance_scale=options["guidance"],
        generator=_generator(options["seed"]), return_attention=True, return_self_attention=True, attention_res=options["res"],
    )
    image = out.images[0]
    heat = token_heatmaps(image, out.attention, 0)
    cross = labelled_grid([image, *[im for _, im in heat]], [options["prompt"], *[w for w, _ in heat]], columns=min(GRID_COLUMNS, len(heat) + 1))
    components = None
    if out.self_attention is not None:
        components = self_attention_components(out.self_attention, out.self_attention_res, options["top_k"])
    files = OutputSet(folder)
    count = 3 if components is not None else 2
    meta = image_metadata("attention", options, env, "image", 0, count, "image.png", options["prompt"])
    files.add_png("image.png", image, meta, parameters_text(meta))
    meta = image_metadata("attention", options, env, "cross-attention", 1, count, "cross-attention.png", options["prompt"],
                          attention_resolution=out.attention.resolution)
    files.add_png("cross-attention.png", cross, meta, parameters_text(meta))
    result = {"command": "attention", "version": __version__, "options": options, "device": env["device"], "model_family": env.get("family"),
              "words": [w for w, _ in heat], "cross_attention_resolution": out.attention.resolution,
              "images": [{"file": "image.png", "role": "image", "prompt": options["prompt"]},
                         {"file": "cross-attention.png", "role": "cross-attention"}]}
    if components is not None:
        pictures = [gray_image(c, image.size) for c in components.images]
        labels = [f"component {k + 1}\nsingular value {s:.3g}" for k, s in enumerate(components.singular_values)]
        self_grid = labelled_grid([image, *pictures], [options["prompt"], *labels], columns=min(GRID_COLUMNS, len(pictures) + 1))
        meta = image_metadata("attention", options, env, "self-attention", 2, count, "self-attention.png", options["prompt"],
                              self_attention_resolution=out.self_attention_res)
        files.add_png("self-attention.png", self_grid, meta, parameters_text(meta))
        result["self_attention_resolution"] = out.self_attention_res
        result["singular_values"] = [float(s) for s in components.singular_values]
        result["images"].append({"file": "self-attention.png", "role": "self-attention"})
    files.add_json(RESULT, result)
    files.commit()
    console.info(f"words: {', '.join(w for w, _ in heat)} (cross-attention at {out.attention.resolution}x{out.attention.resolution})")
    return result


def _window_label(window) -> str:
    return ":".join(f"{v:g}" for v in window) if isinstance(window, list) else f"{window:g}"


def run_sweep(pipe, options: dict, folder: Path, env: Mapping, console: Console) -> dict:
    base = {k: v for k, v in options.items() if k != "sweep"}
    base.update(image=None, invert=None)
    runs = [({**base, "cross_steps": w}, f"cross-{_window_label(w).replace(':', '-')}.png", f"cross-steps {_window_label(w)}") for w in options["sweep"]]
    unset = ("cross_steps", "cross_steps_word", "reweight", "blend", "blend_threshold", "blend_res")
    baseline = {**base, "mode": "none", **{k: copy.deepcopy(DEFAULTS[k]) for k in unset}}
    runs.append((baseline, "none.png", "no injection (mode none)"))
    # the source runs once, with a budget that covers every swept window; then every value is a
    # target of one batch edited from it, with its own window (and the no-injection image too)
    _bar(pipe, console.progress, "source")
    source_pass, _ = make_source(pipe, base, source_budget(base, options["sweep"]))
    _bar(pipe, console.progress, f"{len(runs)} targets")
    out, batched = sweep_from_source(pipe, base, options["sweep"], source_pass)
    source = out.images[0]
    images = list(out.images[1:])
    modes = [out.edit_mode.value] * len(options["sweep"]) + ["none"] * batched
    if not batched:  # LocalBlend applies to every target of a call: the no-injection image is its own call
        _bar(pipe, console.progress, runs[-1][2])
        none = edit_from_source(pipe, baseline, source_pass)
        images.append(none.images[1])
        modes.append(none.edit_mode.value)
    alignment = word_alignments(pipe, base, modes[0])[0]
    target = options["to"][0]
    files = OutputSet(folder)
    count = len(runs) + 2
    meta = image_metadata("sweep", {**base, "cross_steps": runs[0][0]["cross_steps"]}, env, "source", 0, count, "source.png", options["prompt"], edit_mode=modes[0])
    files.add_png("source.png", source, meta, parameters_text(meta))
    entries = [{"file": "source.png", "role": "source", "prompt": options["prompt"]}]
    for index, ((run_options, name, label), image, mode) in enumerate(zip(runs, images, modes), start=1):
        meta = image_metadata("sweep", run_options, env, "target", index, count, name, target, edit_mode=mode)
        files.add_png(name, image, meta, parameters_text(meta))
        entries.append({"file": name, "role": "target", "label": label, "prompt": target, "edit_mode": mode,
                        "cross_steps": run_options["cross_steps"]})
    labels = [f"source\n{options['prompt']}"] + [f"{label}\n{target}" for _, _, label in runs]
    offsets = [len(split_words(label.split("\n")[0] + "\n")) for label in labels]
    marks = [{k + offsets[0] for k in alignment.changed_source}] + [{k + off for k in alignment.changed_target} for off in offsets[1:]]
    grid = labelled_grid([source, *images], labels, marks)
    meta = image_metadata("sweep", options, env, "grid", count - 1, count, "grid.png", None)
    files.add_png("grid.png", grid, meta, parameters_text(meta))
    result = {"command": "sweep", "version": __version__, "options": options, "device": env["device"], "model_family": env.get("family"),
              "edit_mode": modes[0], "alignment": alignment.describe(), "images": entries, "grid": "grid.png"}
    files.add_json(RESULT, result)
    files.commit()
    console.info(f"edit mode: {modes[0]}" + (" (chosen by auto)" if options["mode"] == "auto" else ""))
    console.info(f"aligned words ({target}): {alignment.describe()}")
    return result


# ============================================================================ batch


def parse_batch_file(path: Path, defaults: Mapping) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """Parse and check every line of a ``.jsonl`` file: ``([(line, options)], [(line, reason)])``."""
    jobs, bad = [], []
    for number, line in json_lines(path, "batch"):
        try:
            raw = json_object(line, '{"prompt": "...", "to": ["..."]}')
            unknown = sorted(set(raw) - set(BATCH_LINE_KEYS))
            if unknown:
                hint = " (set model, dtype and device for the whole batch with --model, --dtype, --device)" if set(unknown) & {"model", "dtype", "device"} else ""
                raise UsageError(f"unknown key {', '.join(map(repr, unknown))}; use the long names of p2p edit's options with underscores: {', '.join(BATCH_LINE_KEYS)}{hint}")
            merged = {**{k: v for k, v in defaults.items() if v is not None}, **raw}
            options = normalise_options(merged, EDIT_KEYS, names=lambda k: k, required=("prompt", "to"))
            check_edit_words(options, names=lambda k: k, token_limit=prompt_token_limit(options["model"]))
        except UsageError as err:
            bad.append((number, str(err)))
            continue
        jobs.append((number, options))
    return jobs, bad


def line_folder(root: Path, number: int, options: Mapping) -> Path:
    return root / f"line-{number}-{slugify(options['to'][0])}"


def _finished(folder: Path, options: Mapping) -> tuple[bool, bool]:
    """(finished, with the same options) for a line's folder."""
    result = folder / RESULT
    if not result.is_file():
        return False, False
    try:
        stored = json.loads(result.read_text(encoding="utf-8")).get("options")
    except (OSError, ValueError, AttributeError):
        return True, False
    return True, stored == json.loads(json.dumps(options))


def run_batch_line(pipe, options: dict, folder: Path, env: Mapping, console: Console) -> None:
    """One line of ``p2p batch`` into ``folder``, inside the batch's output folder (which must still be there)."""
    remove_stale_temps(folder)
    run_edit(pipe, options, folder, env, console, root=folder.parent)


_WORKER: dict = {}


def _worker_init(env: dict) -> None:
    # torch keeps its default thread count: fewer threads would change float reductions, and so
    # pixels, making results depend on --workers.
    warnings.simplefilter("ignore")
    _WORKER["env"] = env
    try:
        with library_output(False):
            _WORKER["pipe"] = load_pipeline(env["model"], env["dtype"], env["device"], progress=False, allow_pickle=env["allow_pickle"])
            env["family"] = _WORKER["pipe"].model_family
    except RuntimeFailure as err:  # reported once per line as a failure, not as the pool's traceback
        _WORKER["load_error"] = str(err)


def _worker_line(options: dict, folder: str) -> tuple[str, str]:
    if "load_error" in _WORKER:
        return "failed", _WORKER["load_error"]
    try:
        run_batch_line(_WORKER["pipe"], options, Path(folder), _WORKER["env"], Console(quiet=True))
        return "done", folder
    except WriteError as err:  # the output folder is full, read-only or gone: the batch stops
        return "stop", str(write_failure(err))
    except (UsageError, RuntimeFailure) as err:
        return "failed", str(err)
    except Exception as err:  # noqa: BLE001 - reported per line
        return "failed", f"{type(err).__name__}: {one_line(err)}"


def _run_parallel(todo: list[tuple[int, dict, Path]], workers: int, env: dict, console: Console, done: list, failed: list) -> str | None:
    """Run ``todo`` in ``workers`` processes, filling ``done`` and ``failed``; returns the message of a
    write error that stopped the batch (the lines not started are cancelled), or None."""
    import concurrent.futures as futures
    import multiprocessing

    stop = None
    pool = futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(env,))
    try:
        pending = {pool.submit(_worker_line, options, str(folder)): (number, folder) for number, options, folder in todo}
        for future in futures.as_completed(pending):
            if future.cancelled():  # not started: a write error stopped the batch
                continue
            number, folder = pending[future]
            try:
                status, message = future.result()
            except Exception as err:  # noqa: BLE001 - a worker that died or could not start
                status, message = "failed", f"worker failed: {type(err).__name__}: {one_line(err)}"
            if status == "done":
                done.append(number)
                console.info(f"line {number}: done -> {folder}")
            elif status == "stop":
                stop = stop or message
                for other in pending:
                    other.cancel()
            else:
                failed.append((number, message))
                console.info(f"line {number}: failed: {message}")
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return stop


def cmd_batch(args, console: Console) -> int:
    path = user_path(args.jsonl, "batch")
    if not path.is_file():
        raise UsageError(f"batch: {args.jsonl}: no such file; give the path of a .jsonl file with one edit per line")
    workers = integer_option(args.workers if args.workers is not None else BATCH_WORKERS, "--workers", 1, "a positive integer")
    root = output_folder(args.output, "batch")
    defaults = {"seed": args.seed, "steps": args.steps, "guidance": args.guidance}
    for key, value in defaults.items():
        if value is not None:
            NORMALISERS[key](value, FLAGS[key])
    model = model_option(args.model, "--model") if args.model is not None else None
    dtype = choice_of(DTYPES)(args.dtype, "--dtype") if args.dtype is not None else DEFAULTS["dtype"]
    jobs, bad = parse_batch_file(path, {**defaults, "model": model})  # the model's token limit bounds the prompts
    for number, reason in bad:
        print(f"{PROG} batch: line {number}: {reason}", file=sys.stderr)
    done, skipped, failed = [], [], list(bad)
    todo = []
    for number, options in jobs:
        options.update(model=model, dtype=dtype)
        folder = line_folder(root, number, options)
        finished, same = _finished(folder, options)
        if finished:
            skipped.append(number)
            note = "" if same else " (with other settings; delete its folder to redo it)"
            console.info(f"line {number}: already finished{note}, skipped")
        else:
            todo.append((number, options, folder))
    stop = None
    if todo:
        device = check_device(args.device)
        env = {"device": device, "model": model, "dtype": dtype, "allow_pickle": args.allow_pickle}
        check_model(model, args.allow_pickle)  # here, once: a bad folder is one line, not one traceback per worker
        with writing_into(root):  # made here: a folder removed mid-run stops the batch (`imageio.OutputSet`)
            root.mkdir(parents=True, exist_ok=True)
        if workers > 1 and len(todo) > 1:
            stop = _run_parallel(todo, min(workers, len(todo)), env, console, done, failed)
        else:
            pipe = load_pipeline(model, dtype, device, progress=console.progress, allow_pickle=args.allow_pickle)
            env["family"] = pipe.model_family
            for number, options, folder in todo:
                try:
                    run_batch_line(pipe, options, folder, env, console)
                except WriteError as err:  # full, read-only or gone: every later line would fail alike
                    stop = str(write_failure(err))
                    break
                except (UsageError, RuntimeFailure) as err:
                    failed.append((number, str(err)))
                    console.info(f"line {number}: failed: {err}")
                    continue
                except Exception as err:  # noqa: BLE001 - one line's failure must not stop the others
                    failed.append((number, f"{type(err).__name__}: {one_line(err)}"))
                    console.info(f"line {number}: failed: {type(err).__name__}: {one_line(err)}")
                    continue
                done.append(number)
                console.info(f"line {number}: done -> {folder}")
    stopped = f", {len(todo) - len(done) - len(failed) + len(bad)} not finished" if stop else ""
    print(f"batch: {len(done)} done, {len(skipped)} skipped (finished earlier), {len(failed)} failed{stopped}; outputs in {root}")
    for number, reason in sorted(failed):
        print(f"  line {number} failed: {reason}")
    if stop:
        raise RuntimeFailure(f"stopped: {stop}")
    return 1 if failed else 0


# ============================================================================ dataset


#: ``p2p dataset``'s flags for each `dataset.DatasetSettings` field (in the command line the card records).
DATASET_FLAGS = {"samples_per_pair": "--samples-per-pair", "keep": "--keep", "seed": "--seed", "steps": "--steps",
                 "self_steps": "--self-steps", "cross_steps": "--cross-steps", "guidance": "--guidance",
                 "min_score": "--min-score", "min_directional": "--min-directional",
                 "min_image_similarity": "--min-image-similarity", "min_caption_similarity": "--min-caption-similarity",
                 "candidates_per_seed": "--candidates-per-seed"}


def dataset_settings(args):
    """``p2p dataset``'s flags -> `dataset.DatasetSettings` (usage errors name the flag)."""
    from . import dataset

    given = {key: getattr(args, key) for key in DATASET_FLAGS if getattr(args, key) is not None}
    values = {}
    for key, text in given.items():
        flag = DATASET_FLAGS[key]
        if key in ("samples_per_pair", "keep", "seed", "steps", "candidates_per_seed"):
            values[key] = integer_option(text, flag, 0 if key == "seed" else 1, "a non-negative integer" if key == "seed" else "a positive integer")
        elif key.startswith("min_"):
            span = "[0, 1]" if key == "min_score" else "[-1, 1]"
            try:
                values[key] = float(text)
            except ValueError:
                raise UsageError(f"{flag} must be a number in {span}, got {text!r}") from None
        else:
            values[key] = dataset.Range.parse(text, flag)
    check_filter_flags(args.clip, given)
    values["clip"] = args.clip
    values["model"] = model_option(args.model, "--model") if args.model is not None else None
    values["dtype"] = choice_of(DTYPES)(args.dtype, "--dtype") if args.dtype is not None else DEFAULTS["dtype"]
    if args.batch_rows is not None:
        values["batch_rows"] = integer_option(args.batch_rows, "--batch-rows", 1, "a positive integer")
    try:
        return dataset.DatasetSettings(**values)
    except dataset.DatasetError as err:
        message = str(err)
        for key, flag in DATASET_FLAGS.items():
            message = re.sub(rf"\b{key}\b", flag, message)
        raise UsageError(message) from None


def check_filter_flags(clip: str | None, given: dict) -> None:
    """`UsageError` for a threshold of the filter not in use: ``--min-score`` is the detector's, the
    ``--min-*-similarity`` and ``--min-directional`` flags are the CLIP filter's (``--clip``)."""
    from . import dataset

    if clip is not None and "min_score" in given:
        raise UsageError("--min-score is the shapes detector's threshold, unused with --clip; "
                         "set the CLIP thresholds (--min-directional, --min-image-similarity, --min-caption-similarity)")
    if clip is None:
        for key in dataset.CLIP_THRESHOLDS:
            if key in given:
                raise UsageError(f"{DATASET_FLAGS[key]} is a CLIP filter threshold; give --clip PATH (a CLIP model folder), or drop it")
    if clip is not None and not clip.strip():
        raise UsageError("--clip: empty path; name a local CLIP model folder")


def check_clip(clip: str | None, allow_pickle: bool) -> None:
    """`UsageError` naming the ``--clip`` folder if it is missing or not a loadable CLIP folder (`clip_filter.check_clip_folder`)."""
    if clip is None:
        return
    from .clip_filter import ClipError, check_clip_folder

    try:
        check_clip_folder(clip, allow_pickle)
    except ClipError as err:
        raise UsageError(f"--clip {clip}: {one_line(err)}") from None


def dataset_command(path: Path, root: Path, settings) -> str:
    """The command line that makes this data (every setting spelled out), for the card."""
    import shlex

    record = settings.record()
    words = [PROG, "dataset", str(path), "-o", str(root)]
    if settings.clip is not None:
        words += ["--clip", settings.clip]
    for key, flag in DATASET_FLAGS.items():
        if key in record:  # the filter's own thresholds only
            words += [flag, _default_number(record[key])]
    if settings.model is not None:
        words += ["--model", settings.model]
    return shlex.join(words + ["--dtype", settings.dtype])


def dataset_executor(args):
    """``--ray``/``--workers``/``--device`` -> ``(workers or None for the default, RayCluster or None, device)``.

    On Ray the device is the cluster's (None: its GPUs if any), checked by `dataset_ray.actor_plan`;
    Ray must be importable before any work starts."""
    workers = integer_option(args.workers, "--workers", 1, "a positive integer") if args.workers is not None else None
    if args.ray is None:
        return workers, None, None
    from .dataset_ray import RayCluster, check_reachable, import_ray

    cluster = RayCluster(None if args.ray is True else args.ray)
    device = None if args.device in (None, "auto") else device_name(args.device)
    import_ray()
    check_reachable(cluster.address)
    return workers, cluster, device


#: The dataset bar: pairs done/total, the rate always as pairs/s (tqdm turns a slow rate into s/pair) and the ETA.
DATASET_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} pairs [{elapsed}, {rate_noinv_fmt}, ETA {remaining}]"


def dataset_bar(total: int, done: int, show: bool):
    """``p2p dataset``'s progress bar on stderr: ``done`` of ``total`` pairs finished earlier (not in
    the rate); nothing at all unless ``show`` (a terminal, not ``--quiet``: `Console.progress`)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="pairs", desc="pairs", bar_format=DATASET_BAR, disable=not show,
                file=sys.stderr, dynamic_ncols=True)


def cmd_dataset(args, console: Console) -> int:
    from . import dataset

    path = user_path(args.jsonl, "dataset")
    if not path.is_file():
        raise UsageError(f"dataset: {args.jsonl}: no such file; give the path of a .jsonl file with one pair per line")
    workers, cluster, device = dataset_executor(args)
    settings = dataset_settings(args)
    check_clip(settings.clip, args.allow_pickle)  # before any model loads: a bad folder is one line, exit 2
    root = output_folder(args.output, "dataset")
    pairs, bad = dataset.read_pairs(path)
    writer = dataset.DatasetWriter(root, dataset.run_record(settings, file_sha256(path)))
    writer.open(args.overwrite)
    for number, reason in bad:
        print(f"{PROG} dataset: line {number}: {reason}", file=sys.stderr)
    todo = dataset.unfinished(pairs, writer)
    pipe = None
    if todo:
        check_model(settings.model, args.allow_pickle)
        if cluster is None:
            device = check_device(args.device)
            if workers is None:
                import torch

                workers = dataset.default_workers(device, torch.cuda.device_count() if device == "cuda" else 0)
            if workers == 1:
                pipe = load_pipeline(settings.model, settings.dtype, device, progress=False, allow_pickle=args.allow_pickle)
    started = time.monotonic()
    with dataset_bar(len(pairs), len(pairs) - len(todo), console.progress) as bar:
        summary = dataset.make_dataset(pairs, settings, writer, device, workers, pipe, bar.update, args.allow_pickle, cluster)
    seconds = time.monotonic() - started
    failed = list(bad) + summary.failed
    counts = writer.write_card(dataset_command(path, root, settings), len(failed))
    print(f"dataset: {summary.done} pairs done ({summary.skipped} finished earlier), {summary.kept} rows kept, "
          f"{summary.filtered_out} candidates filtered out, {len(failed)} failed in {seconds:.1f} s "
          f"({summary.done / max(seconds, 1e-9):.2f} pairs/s); {counts['rows']} rows in {root}")
    if summary.done:
        print(f"throughput: {summary.throughput.line()} (in {root / dataset.THROUGHPUT})")
    for number, reason in sorted(failed):
        print(f"  line {number} failed: {reason}")
    return 1 if failed else 0


# ============================================================================ command entry points


def _raw(args, keys) -> dict:
    return {k: getattr(args, k, None) for k in keys}


def _env(device: str, pipe) -> dict:
    """What the images' metadata records of the run beyond the options: the device and the model family."""
    return {"device": device, "family": getattr(pipe, "model_family", None)}


def _run_in_folder(args, options: dict, slug: str, runner, console: Console) -> int:
    """The tail every model command shares: output folder, device, model, ``runner``, the folder printed last."""
    folder = output_folder(args.output, slug)
    device = check_device(args.device)
    pipe = load_pipeline(options["model"], options["dtype"], device, console.progress, args.allow_pickle)
    runner(pipe, options, folder, _env(device, pipe), console)
    print(folder)
    return 0


def cmd_generate(args, console: Console) -> int:
    options = normalise_options(_raw(args, GENERATE_KEYS), GENERATE_KEYS)
    return _run_in_folder(args, options, slugify(options["prompt"]), run_generate, console)


def cmd_edit(args, console: Console) -> int:
    raw = _raw(args, EDIT_KEYS)
    photo_sha256 = stored_family = None
    if args.from_image is not None:
        stored = read_stored_options(args.from_image, "--from")
        stored_meta = read_stored_metadata(args.from_image, "--from")
        photo_sha256, stored_family = stored_meta.get("photo_sha256"), stored_meta.get("model_family")
        photo_sha256 = photo_sha256 if isinstance(photo_sha256, str) else None  # a damaged or hostile file may hold anything
        stored_family = stored_family if stored_family in FAMILIES else None
        stored = {k: v for k, v in stored.items() if k in EDIT_KEYS and v != DEFAULTS.get(k)}  # defaults stay defaults
        if raw.get("image") is not None:  # a new photo: the stored one's hash says nothing about it
            photo_sha256 = None
        raw = {**stored, **{k: v for k, v in raw.items() if v is not None}}
    if raw.get("prompt") is None:
        raise UsageError(f"the source prompt is missing; give it as the first argument (or --from IMAGE.png), e.g. {PROG} edit \"a red circle on a blue background\" --to \"a red square on a blue background\"")
    if raw.get("to") is None:
        raise UsageError("--to is required: give the target prompt, e.g. --to \"a red square on a blue background\"")
    options = normalise_options(raw, EDIT_KEYS, required=("prompt", "to"))
    check_edit_words(options, token_limit=prompt_token_limit(options["model"]))
    family = model_family(options["model"])
    if stored_family is not None and stored_family != family:
        warnings.warn(f"--from {args.from_image}: that image was made with an {stored_family.upper()} model, but "
                      f"{model_label(options['model'])} is {family.upper()}, so the result will differ from it", UserWarning, stacklevel=1)
    if photo_sha256 and options["image"] and file_sha256(options["image"]) != photo_sha256:
        warnings.warn(f"--from {args.from_image}: the photo {options['image']} has changed since that image was made "
                      "(its SHA-256 differs), so the result will differ from it", UserWarning, stacklevel=1)
    limit = _source_limit(args)
    kept = None
    if args.from_image is not None and not args.no_reuse:
        kept = find_kept_pass(args.from_image, options, console)
    runner = functools.partial(run_edit, source_limit=limit, kept=kept)
    return _run_in_folder(args, options, slugify(options["to"][0]), runner, console)


def _source_limit(args, default: int = SOURCE_LIMIT_MIB) -> int:
    """``--source-limit MIB`` in bytes (a usage error unless a whole number >= 0)."""
    value = args.source_limit if args.source_limit is not None else default
    return integer_option(value, "--source-limit", 0, "a whole number of MiB, 0 or more") * MIB


def cmd_attention(args, console: Console) -> int:
    options = normalise_options(_raw(args, ATTENTION_KEYS), ATTENTION_KEYS)
    return _run_in_folder(args, options, slugify(options["prompt"]), run_attention, console)


def cmd_sweep(args, console: Console) -> int:
    raw = _raw(args, SWEEP_KEYS)
    raw["sweep"] = args.cross_steps
    options = normalise_options(raw, SWEEP_KEYS, required=("prompt", "to"))
    check_edit_words({**options, "cross_steps": DEFAULTS["cross_steps"]}, token_limit=prompt_token_limit(options["model"]))
    return _run_in_folder(args, options, slugify(options["to"][0]), run_sweep, console)


def cmd_info(args, console: Console) -> int:
    meta = read_stored_metadata(args.image, "info")
    if args.json:
        print(json.dumps(meta, indent=2, ensure_ascii=False))
    elif isinstance(meta.get("options"), dict):
        text = stored_parameters_text(meta, args.image, "info")
        print(f"file: {args.image}")
        print(text)
    else:  # JSON without command-line options (another writer): its fields as they are
        print(f"file: {args.image}")
        for key, value in meta.items():
            print(f"{key.replace('_', ' ')}: {json.dumps(value) if isinstance(value, (list, dict)) else value}")
    return 0


def check_listen(host: str, port: int) -> None:
    """Raise `UsageError` unless this process can listen on ``host:port`` (checked before the model loads)."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(f"--host {host}: not a name or address this machine can resolve ({err}); "
                         "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closed port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"--host {host}: not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
            raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None


def cmd_serve(args, console: Console) -> int:
    import importlib.util

    port = integer_option(args.port if args.port is not None else SERVE_PORT, "--port", 1, "a port number from 1 to 65535")
    if port > MAX_PORT:
        raise UsageError(f"--port must be a port number from 1 to 65535, got {args.port!r}")
    host = args.host or SERVE_HOST
    source_limit = _source_limit(args, SERVE_SOURCE_LIMIT_MIB)
    queue_size = integer_option(args.queue_size if args.queue_size is not None else SERVE_QUEUE_SIZE, "--queue-size", 1,
                                "a whole number of waiting requests, 1 or more")
    check_listen(host, port)
    model = model_option(args.model, "--model")
    dtype = choice_of(DTYPES)(args.dtype, "--dtype") if args.dtype is not None else None
    device = check_device(args.device)
    check_model(model, args.allow_pickle)
    if importlib.util.find_spec("gradio") is None:
        raise RuntimeFailure("the web page needs Gradio: pip install 'prompt2prompt[web]'")
    from . import web

    console.info(f"serving {model_label(model)} on http://{host}:{port} (Ctrl-C stops)")
    web.serve(host=host, port=port, model=model, device=device, dtype=dtype, output_dir=args.output_dir or SERVE_OUTPUT_DIR,
              allow_pickle=args.allow_pickle, source_limit_mib=source_limit // MIB, queue_size=queue_size)
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "edit": cmd_edit,
    "attention": cmd_attention,
    "sweep": cmd_sweep,
    "batch": cmd_batch,
    "info": cmd_info,
    "serve": cmd_serve,
    "dataset": cmd_dataset,
}


# ============================================================================ argument parser


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as a `UsageError` (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{one_line(message)}; see '{self.prog} --help'")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


def _default(key: str) -> str:
    """The default of the option ``key`` as the help shows it (from `arguments.ARGUMENTS`)."""
    value = option_default(key)
    if isinstance(value, list):
        return ",".join(_default_number(v) for v in value)
    return _default_number(value)


def _default_number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _one_of(choices) -> str:
    """``a, b or c``."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


def _add_common(parser, batch: bool = False):
    group = parser.add_argument_group("generation" if not batch else "generation (defaults for lines that do not set them)")
    group.add_argument("--seed", help=f"seed of the initial noise (default {_default('seed')}); the same seed gives the same pixels")
    group.add_argument("--steps", help=f"denoising steps (default {_default('steps')})")
    group.add_argument("--guidance", help=f"classifier-free guidance scale (default {_default('guidance')}; <= 1 turns guidance off)")
    group = parser.add_argument_group("model and output")
    group.add_argument("-o", "--output", metavar="DIR", help="output folder (default outputs/<YYYYmmdd-HHMMSS>-<slug>/)")
    _add_model_flags(group, quiet_help="no progress bar or messages; print only the output folder")


def _add_model_flags(group, quiet_help: str) -> None:
    """The flags that choose and load the model, and --quiet/--debug (every command that loads one)."""
    group.add_argument("--model", metavar="PATH_OR_ID", help="diffusers Stable Diffusion or SDXL folder (its model_index.json picks the pipeline), "
                                                             "or a Stable Diffusion hub id (default: the bundled shapes model)")
    group.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:N or mps (default: cuda if available, else mps, else cpu)")
    group.add_argument("--dtype", metavar="DTYPE", help=f"{_one_of(DTYPES)} (default {_default('dtype')})")
    group.add_argument("--allow-pickle", action="store_true", help="load a model whose weights are pickle files (.bin, .ckpt): unpickling can run code, so only for files you trust")
    group.add_argument("--quiet", action="store_true", help=quiet_help)
    group.add_argument("--debug", action="store_true", help="show tracebacks and library logs")


def _add_edit_settings(parser, cross_steps_help: str):
    group = parser.add_argument_group("edit")
    group.add_argument("--mode", help=f"{_one_of(MODES)} (default {_default('mode')}: replace when the word counts match, else refine)")
    group.add_argument("--cross-steps", metavar="F|START:END", help=cross_steps_help)
    group.add_argument("--cross-steps-word", metavar="WORD=F|WORD=START:END", nargs="+", action="extend",
                       help="a word's own cross-attention window, e.g. square=0:0.4 (repeatable)")
    group.add_argument("--self-steps", metavar="F|START:END", help=f"self-attention injection window (default {_default('self_steps')})")
    group.add_argument("--blend", nargs=2, metavar=("SOURCE_WORDS", "TARGET_WORDS"),
                       help="local blending: change only the region of these words (comma-separated), e.g. --blend circle square; "
                            "with several --to, a target word applies to the targets that contain it (--blend circle square,star)")
    group.add_argument("--blend-threshold", metavar="F", help=f"local blending's mask threshold in [0, 1] (default {_default('blend_threshold')})")
    group.add_argument("--blend-res", metavar="SIDE",
                       help="side of the cross-attention maps local blending's mask comes from (default: the latent side // 4, "
                            "as the paper's 16 for SD at 512 px; the bundled model's maps are 16, 8 and 4)")
    group.add_argument("--reweight", metavar="WORD=FACTOR", nargs="+", action="extend",
                       help="scale a target word's attention, e.g. red=2 (0, negative and > 1 allowed; repeatable)")


EPILOGS = {
    "generate": """examples:
  p2p generate "a red circle on a blue background" --seed 3
  p2p generate "a cat riding a bicycle" --model ./stable-diffusion-v1-5 --device cuda --dtype float16 -o cat/
""",
    "edit": """examples:
  p2p edit "a red circle on a blue background" --to "a red square on a blue background"
  p2p edit "a red circle on a blue background" --to "a red circle on a blue background in pixel art style" --mode refine
  p2p edit "a red circle on a blue background" --to "a red square on a blue background" --blend circle square --cross-steps 0.2:0.8
  p2p edit "a red circle on a blue background" --to "a red circle on a blue background" --reweight red=3
  p2p edit --from outputs/20261126-101500-a-red-square/edit-1.png --seed 7       # rerun a result, changing the seed
  p2p edit --from outputs/20261126-101500-a-red-square/edit-1.png --to "a red star on a blue background"   # only the target runs
  p2p edit "a photo of a cat" --to "a photo of a dog" --image cat.jpg --invert null-text --model ./sd15

Writes source.png, edit-1.png (one per --to), grid.png (prompts under the images, changed words
marked in red and brackets), source.safetensors (the source's pass, when at most --source-limit MiB)
and result.json, and prints the edit mode and the aligned words. --from reuses the source pass saved
beside IMAGE.png when its model, prompt, seed, steps, guidance and windows fit ("source reused from ...").
""",
    "attention": """examples:
  p2p attention "a red circle next to a blue square on grass" --steps 30
  p2p attention "a red circle on a blue background" --res 16 --top-k 8

Writes image.png, cross-attention.png (the image, then each word's cross-attention map over it,
the word under it), self-attention.png (the top-k SVD components of the source's self-attention)
and result.json.
""",
    "sweep": """examples:
  p2p sweep "a red circle on a blue background" --to "a red square on a blue background"
  p2p sweep "a red circle on a blue background" --to "a red square on a blue background" --cross-steps 0,0.5,1 --self-steps 0.2

Writes source.png, one image per --cross-steps value (cross-<value>.png), none.png (the target
from the same noise with no attention injected), grid.png and result.json. The source runs once;
then every value is a target of one batch edited from its pass, each with its own window (with
--blend, none.png is one more call).
""",
    "batch": """example edits.jsonl (one edit per line; any p2p edit option by its long name with underscores):
  {"prompt": "a red circle on a blue background", "to": ["a red square on a blue background"], "seed": 1, "steps": 50}
  {"prompt": "a red circle on grass", "to": "a blue circle on grass", "cross_steps": "0.2:0.8", "blend": ["circle", "circle"]}
  {"prompt": "a red circle on grass", "to": "a red circle on grass", "reweight": {"red": 3}}

examples:
  p2p batch edits.jsonl -o runs/
  p2p batch edits.jsonl -o runs/ --workers 2 --steps 30     # --seed/--steps/--guidance: defaults for lines without them

Each line writes DIR/line-<n>-<slug>/ (its images, grid.png and, last, result.json). A line whose
result.json exists is finished and skipped, so running the same command again resumes a stopped
batch. Bad lines are reported and the others run; exit status 1 if any line failed.
""",
    "dataset": """example pairs.jsonl:
  {"input": "a red circle on a blue background", "output": "a red square on a blue background", "edit": "make it a square"}

examples:
  p2p dataset pairs.jsonl -o data/ --samples-per-pair 8 --keep 2
  p2p dataset pairs.jsonl -o data/ --workers 2 --self-steps 0.2:0.6
  p2p dataset pairs.jsonl -o data/ --model ./sd15 --clip ./clip-vit-large-patch14 --min-image-similarity 0.7

Each pair gets N candidates; the shapes detector (or, with --clip, InstructPix2Pix's CLIP filter)
scores each edited image; the best K that pass are written to DIR/data/pair-<line>.parquet. Running the same command
again finishes the rest; a folder holding another run's data is refused unless --overwrite.
""",
    "serve": """examples:
  p2p serve                                   # http://127.0.0.1:7860, the bundled model
  p2p serve --model ./stable-diffusion-v1-5 --device cuda --dtype float16 --port 7861

Needs the web extra: pip install "prompt2prompt[web]". Binds to 127.0.0.1 unless --host says otherwise.
""",
    "info": """examples:
  p2p info outputs/20261126-101500-a-red-square/edit-1.png
  p2p info edit-1.png --json
""",
}


def _add_generate(p) -> None:
    p.add_argument("prompt", help="the prompt")
    _add_common(p)


def _add_edit(p) -> None:
    p.add_argument("prompt", nargs="?", help="the source prompt (optional with --from)")
    p.add_argument("--to", action="append", metavar="PROMPT", help="a target prompt (repeat for several targets)")
    _add_edit_settings(p, f"cross-attention injection window: a fraction of the steps or START:END (default {_default('cross_steps')})")
    group = p.add_argument_group("real image")
    group.add_argument("--image", metavar="PHOTO", help="edit this photo instead of a generated image (needs inversion)")
    group.add_argument("--invert", metavar="METHOD",
                       help=f"how to invert --image: {', '.join(INVERT_METHODS)} (default {ARGUMENTS['method'].default})")
    group = p.add_argument_group("rerun")
    group.add_argument("--from", dest="from_image", metavar="IMAGE.png",
                       help="take the prompts and settings stored in a PNG written by p2p as defaults; flags given override them. "
                            "The source pass saved beside it is reused when it matches (only the targets run)")
    group.add_argument("--no-reuse", action="store_true", help="with --from: run the source again instead of reusing its saved pass")
    group.add_argument("--source-limit", metavar="MIB",
                       help=f"save the source pass (source.safetensors, for a later --from) when it is at most MIB MiB "
                            f"(default {SOURCE_LIMIT_MIB}; 0: never)")
    _add_common(p)


def _add_attention(p) -> None:
    p.add_argument("prompt", help="the prompt")
    p.add_argument("--top-k", metavar="K", help=f"self-attention components to show (default {_default('top_k')})")
    p.add_argument("--res", metavar="SIDE", help="side of the attention maps to record (default: the latent side // 4)")
    _add_common(p)


def _add_sweep(p) -> None:
    p.add_argument("prompt", help="the source prompt")
    p.add_argument("--to", action="append", metavar="PROMPT", help="the target prompt")
    _add_edit_settings(p, f"comma-separated windows to try (default {_default('sweep')}; each F or START:END)")
    _add_common(p)


def _add_batch(p) -> None:
    p.add_argument("jsonl", help="a file with one JSON edit per line")
    p.add_argument("--workers", metavar="N", help=f"processes running lines at once, each loading the model (default {BATCH_WORKERS})")
    _add_common(p, batch=True)
    for action in p._actions:
        if action.dest == "output":
            action.required = True
            action.help = "output folder; each line writes DIR/line-<n>-<slug>/"


def _add_dataset(p) -> None:
    from .dataset import DatasetSettings

    _DATASET = DatasetSettings()  # noqa: N806 - the defaults the help shows
    p.add_argument("jsonl", metavar="PAIRS.jsonl", help='caption pairs, one JSON object a line: {"input": ..., "output": ..., "edit": ... (optional)}')
    p.add_argument("-o", "--output", metavar="DIR", required=True, help="output folder (Parquet shards in DIR/data/, the card DIR/README.md, the manifest in DIR/.p2p/)")
    group = p.add_argument_group("candidates (F or a range LOW:HIGH, drawn per candidate)")
    group.add_argument("--samples-per-pair", metavar="N", help=f"candidates per pair, each with its own seed and settings (default {_DATASET.samples_per_pair})")
    group.add_argument("--keep", metavar="K", help=f"keep the best K candidates that pass the filter (default {_DATASET.keep}; at most N)")
    group.add_argument("--seed", help=f"the run's seed; each candidate's seed is a hash of it, the line's content and the candidate (default {_DATASET.seed})")
    group.add_argument("--steps", help=f"denoising steps (dataset default {_DATASET.steps})")
    group.add_argument("--self-steps", metavar="F|LOW:HIGH", help=f"self-attention injection fraction (dataset default {_DATASET.self_steps}, as InstructPix2Pix)")
    group.add_argument("--cross-steps", metavar="F|LOW:HIGH", help=f"cross-attention injection fraction (dataset default {_DATASET.cross_steps})")
    group.add_argument("--guidance", metavar="F|LOW:HIGH", help=f"classifier-free guidance scale (dataset default {_DATASET.guidance})")
    group.add_argument("--candidates-per-seed", metavar="M",
                       help=f"draw candidates in groups of M sharing one seed (so one input image), each with its own injection "
                            f"fractions, the group's guidance one draw; a group is one batched pipeline call (default "
                            f"{_DATASET.candidates_per_seed}: a seed per candidate, as InstructPix2Pix)")
    group = p.add_argument_group("filter (the shapes detector, or InstructPix2Pix's CLIP filter with --clip)")
    group.add_argument("--min-score", metavar="F", help=f"a candidate passes when the shapes detector finds at least this share of "
                                                        f"the output caption's colours, shapes and background, in [0, 1] (default {_DATASET.min_score:g})")
    group.add_argument("--clip", metavar="PATH", help="score with a local transformers CLIP model folder (model, tokenizer and image processor; "
                                                      "safetensors unless --allow-pickle): a candidate passes when its three CLIP similarities "
                                                      "reach their thresholds; the kept are the best by directional similarity")
    group.add_argument("--min-directional", metavar="F", help="with --clip: least cos(image change, caption change) in CLIP space, in [-1, 1] "
                                                              f"(default {_DATASET.min_directional:g}, as InstructPix2Pix)")
    group.add_argument("--min-image-similarity", metavar="F", help="with --clip: least cos(input image, edited image), in [-1, 1] "
                                                                   f"(default {_DATASET.min_image_similarity:g}, as InstructPix2Pix)")
    group.add_argument("--min-caption-similarity", metavar="F", help="with --clip: least cos(edited image, output caption), in [-1, 1] "
                                                                     f"(default {_DATASET.min_caption_similarity:g}, as InstructPix2Pix)")
    group = p.add_argument_group("run")
    group.add_argument("--workers", metavar="N", help="workers, each holding one pipeline (default: one per GPU with --device cuda, else 1; "
                                                      "on Ray one per GPU of the cluster, else one per CPU up to 8); the data does not depend on it")
    group.add_argument("--ray", metavar="ADDRESS", nargs="?", const=True,
                       help="run the pairs on Ray actors: alone, start or join a local Ray; with ADDRESS (auto, HOST:6379, ray://HOST:10001) "
                            "join that cluster (needs the ray extra: pip install -e '.[ray]')")
    group.add_argument("--batch-rows", metavar="R", help="at most R candidates (target rows) in one pipeline call; a larger group is "
                                                         "split into calls, with equal results (default: the whole group; "
                                                         "a call that runs out of GPU memory is halved)")
    group.add_argument("--overwrite", action="store_true", help="delete the folder's earlier dataset and start over")
    _add_model_flags(group, quiet_help="no progress bar")


def _add_serve(p) -> None:
    p.add_argument("--host", help=f"address to bind (default {SERVE_HOST}: this machine only)")
    p.add_argument("--port", help=f"port (default {SERVE_PORT})")
    p.add_argument("--output-dir", metavar="DIR", help=f"where results are written (default {SERVE_OUTPUT_DIR})")
    p.add_argument("--source-limit", metavar="MIB",
                   help=f"keep each visitor's last source pass in memory, to re-edit from it, when it is at most MIB MiB "
                        f"(default {SERVE_SOURCE_LIMIT_MIB}; 0: never)")
    p.add_argument("--queue-size", metavar="N",
                   help=f"requests that may wait while one runs; a further visitor is told the page is busy (default {SERVE_QUEUE_SIZE})")
    _add_model_flags(p, quiet_help="no messages")


def _add_info(p) -> None:
    p.add_argument("image", metavar="IMAGE.png", help="a PNG written by p2p")
    p.add_argument("--json", action="store_true", help="print the stored JSON")


#: The commands in the order ``p2p --help`` lists them: (name, help, adds its arguments).
SUBCOMMANDS = (
    ("generate", "generate an image from a prompt", _add_generate),
    ("edit", "edit an image by editing its prompt", _add_edit),
    ("attention", "show a prompt's cross-attention per word and its self-attention components", _add_attention),
    ("sweep", "edit with a range of cross-attention injection windows, side by side", _add_sweep),
    ("batch", "run many edits from a .jsonl file, resumably", _add_batch),
    ("dataset", "make a paired edit dataset (Parquet) from caption pairs, resumably", _add_dataset),
    ("serve", "serve the web page (Gradio) for editing in a browser", _add_serve),
    ("info", "print the parameters stored in a PNG written by p2p", _add_info),
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, allow_abbrev=False, formatter_class=_Formatter,
        description="Prompt-to-Prompt image editing (Hertz et al., 2022) from the command line.",
        epilog="Run 'p2p COMMAND --help' for a command's options and examples. Without --model, the bundled "
               "shapes-world model runs (64x64 images of coloured shapes; no download).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s (prompt2prompt) {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True
    for name, help_text, add_arguments in SUBCOMMANDS:
        add_arguments(commands.add_parser(name, help=help_text, description=help_text, epilog=EPILOGS[name],
                                          formatter_class=_Formatter, allow_abbrev=False))
    return parser


# ============================================================================ main


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run ``p2p`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    command = argv[0] if argv and argv[0] in COMMANDS else None
    prefix = f"{PROG} {command}" if command else PROG
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    console = Console(quiet=getattr(args, "quiet", False))
    handler = None
    if debug:
        handler = logging.StreamHandler(sys.stderr)
        logging.getLogger("prompt2prompt").addHandler(handler)
        logging.getLogger("prompt2prompt").setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(), library_output(debug):
            if not debug:
                warnings.simplefilter("ignore")
                if not console.quiet:
                    warnings.simplefilter("default", UserWarning)
                warnings.showwarning = _show_warning
            return COMMANDS[args.command](args, console)
    except UsageError as err:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except (RuntimeFailure, WriteError) as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, WriteError):
            err = write_failure(err)
        print(f"{prefix}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every other failure: one line, traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {type(err).__name__}: {one_line(err)}" + ("" if debug else " (--debug shows the traceback)"), file=sys.stderr)
        return 1
    finally:
        if handler is not None:
            logging.getLogger("prompt2prompt").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
