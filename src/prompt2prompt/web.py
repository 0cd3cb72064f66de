"""A Gradio page for Prompt-to-Prompt: edit in the browser (``p2p serve``).

A thin layer over the library: it turns the page's fields into `Prompt2PromptPipeline` arguments,
shows the pipeline's own validation messages beside the field they are about, and writes each
result as PNGs that carry their parameters (`prompt2prompt.imageio`), inside the output folder
only. One request runs at a time per device (Gradio's queue shows waiting visitors their place).

Needs the optional extra: ``pip install "prompt2prompt[web]"``.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arguments import ARGUMENTS, MAX_INT64, OPTIONS, ArgumentError, argument_of, default, integer, number, option_default

#: Largest upload accepted.
MAX_UPLOAD_MB = 20
#: Error slots on the page, one beside each group of fields (`arguments.Argument.field`).
FIELDS = ("prompt", "edit_prompts", "mode", "cross", "self", "blend", "reweight", "sampling", "image", "general")
#: The page's local blend map side that means "the library's default side".
DEFAULT_SIDE = 0
#: Inversions kept in memory (a null-text one holds an embedding per step), so that editing the
#: same photo again with other settings skips the slow inversion.
KEPT_INVERSIONS = 4
#: Past edits the history gallery shows.
HISTORY_LENGTH = 24
#: Visitors waiting in Gradio's queue before the page turns more away (``p2p serve --queue-size``).
QUEUE_SIZE = 32
#: What a visitor turned away by a full queue is told (the browser shows Gradio's own "This
#: application is currently busy. Please try again."; an HTTP API caller gets this).
BUSY_MESSAGE = "The page is busy: {waiting} edits are waiting, the most it queues. Try again in a minute."
#: The page keeps each visitor's last source pass (in a ``gr.State``) when it is at most this many
#: MiB, and edits from it while only the target-side settings change (targets, windows within the
#: pass's budget, re-weighting, local blend). The bundled model's pass at the page's settings fits
#: with room to spare; SD 1.5's at 512 px does not (``p2p serve --source-limit 1300`` keeps it).
SOURCE_LIMIT_MIB = 256
MIB = 2**20
#: Seconds a visitor's kept pass lives after their last edit (the memory is freed after it).
SOURCE_TTL_S = 1800
#: What a `imageio.WriteError` shown on the page tells the server's owner to choose instead.
OTHER_OUTPUT_DIR = "another --output-dir"
#: All visitors' kept passes together take at most this many MiB (`Editor(kept_total_bytes=...)`);
#: the least recently used are let go first (that visitor's next edit runs in full). Without it every
#: API caller, each a session of its own, left a pass behind for `SOURCE_TTL_S`: the server grew by
#: 1.2 MiB an edit at 2 steps on the bundled model (benchmarks/web_soak.py --new-sessions).
KEPT_TOTAL_MIB = 1024
#: Gradio keeps a copy of every file it serves (each result PNG) and every upload in its cache
#: (``--output-dir``/.gradio); copies older than this many seconds are deleted, checked as often,
#: so that a long-running server's cache does not grow without end.
CACHE_AGE_S = 86400


def field_of(error: BaseException) -> str:
    """The page field an error belongs beside: the `arguments.ARGUMENTS` field of its ``.argument``
    (never read from its message, which quotes the user's prompts); ``general`` for an error with no
    argument or an argument the page does not set."""
    row = argument_of(error)
    return row.field if row is not None and row.field is not None else "general"


def _option_label(key: str) -> str:
    """The page's name of an option (`arguments.Argument.label`), which leads `options.OptionError`'s messages."""
    from .options import cli_names

    row = OPTIONS.get(key)
    return row.label if row is not None and row.label is not None else cli_names(key)


class FieldError(ArgumentError):
    """A bad value of the page: an `ArgumentError` whose argument gives the field it is shown beside.

    Args:
        argument: the library name of the argument the value sets (a key of `arguments.ARGUMENTS`).
        message: what is wrong and how to fix it.
    """

    @property
    def field(self) -> str:
        """The error slot it is shown in (one of `FIELDS`)."""
        return field_of(self)


@dataclass
class EditRequest:
    """The page's fields, parsed and checked (everything else is checked by the pipeline)."""

    prompt: str
    edit_prompts: list[str]
    mode: str = default("edit")
    cross_replace_steps: float = default("cross_replace_steps")
    self_replace_steps: float = default("self_replace_steps")
    blend_source: list[str] = field(default_factory=list)
    blend_target: list[str] = field(default_factory=list)
    blend_threshold: float = default("local_blend.threshold")
    blend_res: int | None = default("local_blend.resolution")  # None: the library's default side
    equalizer: dict[str, float] = field(default_factory=dict)
    seed: int = option_default("seed")
    num_inference_steps: int = default("num_inference_steps")
    guidance_scale: float = default("guidance_scale")
    image: str | None = default("image")
    inversion_method: str = default("method")

    def pipeline_kwargs(self) -> dict[str, Any]:
        from .edits import LocalBlend

        kwargs: dict[str, Any] = dict(
            edit=self.mode, cross_replace_steps=self.cross_replace_steps, self_replace_steps=self.self_replace_steps,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
        )
        if self.equalizer:
            kwargs["equalizer"] = dict(self.equalizer)
        if self.blend_source or self.blend_target:
            kwargs["local_blend"] = LocalBlend(self.blend_source, self.blend_target, threshold=self.blend_threshold,
                                               resolution=self.blend_res)
        return kwargs

    def options(self, model: str | None, dtype: str | None = None) -> dict[str, Any]:
        """The request as the command line's canonical edit options (what ``p2p info`` reads and
        ``p2p edit --from`` reruns), checked by the command line's own rules.

        Raises:
            FieldError: a value the command line rejects, or a word (blend, re-weighting, per-word window)
                that is not in the prompts, beside its field (its message names the page's field).
        """
        from .options import EDIT_KEYS, OptionError, check_edit_words, normalise_options

        raw = {
            "prompt": self.prompt, "to": list(self.edit_prompts), "mode": self.mode,
            "cross_steps": self.cross_replace_steps, "self_steps": self.self_replace_steps,
            "blend": [self.blend_source, self.blend_target] if self.blend_source else None,
            "blend_threshold": self.blend_threshold if self.blend_source else None,
            "blend_res": self.blend_res if self.blend_source else None,
            "reweight": dict(self.equalizer) or None, "seed": self.seed, "steps": self.num_inference_steps,
            "guidance": self.guidance_scale, "model": model, "dtype": dtype,
            "image": self.image, "invert": self.inversion_method if self.image else None,
        }
        try:
            options = normalise_options(raw, EDIT_KEYS, names=_option_label, required=("prompt", "to"))
            check_edit_words(options, _option_label)  # every named word, before an inversion or the model runs
        except OptionError as err:
            raise FieldError(err.argument, str(err)) from None
        return options


@dataclass
class KeptSource:
    """A visitor's last source pass (`SourcePass`) and the record of the request that made it
    (`source_pass.pass_record`): a later request with the same record edits from it."""

    record: dict
    source: Any  # None once let go (`Editor.kept_total_bytes`)
    inversion: Any = None  # a photo's `Inversion`, which edits from the pass take beside it

    @property
    def nbytes(self) -> int:
        return int(self.source.nbytes) if self.source is not None else 0

    def release(self) -> None:
        """Let the pass go (its visitor's next edit runs in full)."""
        self.source = self.inversion = None


@dataclass
class EditResult:
    """What `Editor.edit` gives the page: the PNGs written, the heat maps, the pass to keep for the
    visitor's next edit (None: none), and the status line (reused or not, and the time)."""

    files: list[str]
    heat: list[tuple[str, str]]
    kept: KeptSource | None
    status: str
    reused: bool
    seconds: float


def _words(text) -> list[str]:
    """Comma-separated words; each may be a phrase (``"pencil sketch, red"``), as the library and ``--blend`` take them."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise FieldError("local_blend", f"Local blend words must be text: words separated by commas, got {text!r}.")
    return [w.strip() for w in text.split(",") if w.strip()]


def _text(value, argument: str, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FieldError(argument, f"The {what} must be text, got {value!r}.")
    return value


def _number(value, argument: str) -> float:
    """A finite number for the page's field of ``argument``; None or a non-number (possible through the API) is not."""
    row = ARGUMENTS[argument]
    return number(value, argument, row.label, f"a finite number such as {row.default:g}")


def _whole(value, argument: str) -> int:
    """A whole number in the range of ``argument``'s row; 7.0 counts, 7.5 and None do not."""
    row = ARGUMENTS[argument]
    return integer(value, argument, row.label, row.what, int(row.minimum), MAX_INT64 if row.maximum is None else int(row.maximum))


def _photo_path(image) -> str | None:
    """The photo's path, checked to exist (the library checks that it is a picture). A path that
    climbs out of its folder (a ``..`` part, e.g. an upload named ``../../evil.png`` sent through the
    API) is refused: Gradio gives the page the paths of its own stored uploads, which have none."""
    if image is None or isinstance(image, str) and not image.strip():
        return None
    if isinstance(image, (str, os.PathLike)) and ".." in Path(image).parts:
        raise FieldError("image", f"The photo {str(image)!r} names a parent folder ('..'); upload the picture itself.")
    try:
        found = isinstance(image, (str, os.PathLike)) and Path(image).is_file()
    except (OSError, ValueError):  # e.g. a NUL byte in the name
        found = False
    if not found:
        raise FieldError("image", f"The photo {image!r} is not a file; upload a PNG, JPEG or WebP picture.")
    return str(image)


def parse_request(prompt, targets, mode, cross, self_steps, blend_source, blend_target, blend_threshold, reweight_rows,
                  seed, steps, guidance, image, inversion_method, blend_res=None) -> EditRequest:
    """Turn the page's raw values into an `EditRequest`; a bad value raises `FieldError`.
    ``blend_res`` (the local blend's map side): empty or 0 is the library's default.

    The values come from the page or from Gradio's API, so any of them may be None or of the wrong type.
    """
    try:
        prompt = _text(prompt, "prompt", "source prompt").strip()
        if not prompt:
            raise FieldError("prompt", "Write a source prompt, e.g. 'a big red circle on a blue background'.")
        edit_prompts = [t.strip() for t in _text(targets, "edit_prompts", "target prompts").splitlines() if t.strip()]
        if not edit_prompts:
            raise FieldError("edit_prompts", "Write at least one target prompt (one per line), e.g. the source with one word changed.")
        src, tgt = _words(blend_source), _words(blend_target)
        if bool(src) != bool(tgt):
            raise FieldError("local_blend", "Local blend needs words on both sides: the source words and the target words (or neither).")
        equalizer = _equalizer(reweight_rows)
        return EditRequest(
            prompt=prompt, edit_prompts=edit_prompts, mode=mode or default("edit"),
            cross_replace_steps=_number(cross, "cross_replace_steps"),
            self_replace_steps=_number(self_steps, "self_replace_steps"),
            blend_source=src, blend_target=tgt, blend_threshold=_number(blend_threshold, "local_blend.threshold"),
            equalizer=equalizer, seed=_whole(seed, "generator"),
            num_inference_steps=_whole(steps, "num_inference_steps"),
            guidance_scale=_number(guidance, "guidance_scale"),
            image=_photo_path(image), inversion_method=inversion_method or default("method"),
            blend_res=_blend_side(blend_res),
        )
    except FieldError:
        raise
    except ArgumentError as err:  # the shared checks of `arguments`
        raise FieldError(err.argument, str(err)) from None


def _equalizer(reweight_rows) -> dict[str, float]:
    """The re-weighting table's rows -> {word: factor}; empty rows are skipped."""
    equalizer: dict[str, float] = {}
    try:
        rows = _rows(reweight_rows)
    except TypeError:
        raise FieldError("equalizer", f"Re-weighting takes rows of (word, factor), got {reweight_rows!r}.") from None
    for row in rows:
        word, factor = (str(row[0]).strip() if len(row) > 0 and row[0] is not None else ""), (row[1] if len(row) > 1 else "")
        if not word and (factor in ("", None)):
            continue
        if not word:
            raise FieldError("equalizer", f"A re-weighting row has the factor {factor!r} but no word; fill in the word or clear the row.")
        equalizer[word] = number(factor, "equalizer", f"The factor for {word!r}", "a finite number such as 2 or -1")
    return equalizer


def _blend_side(value) -> int | None:
    """The page's local blend map side: empty or `DEFAULT_SIDE` is None (the library's default side)."""
    if value is None or isinstance(value, str) and not value.strip():
        return None
    row = ARGUMENTS["local_blend.resolution"]
    side = integer(value, row.name, row.label, f"{DEFAULT_SIDE} (the default) or {row.what}", DEFAULT_SIDE)
    return None if side == DEFAULT_SIDE else side


def _rows(value) -> list[list]:
    if value is None:
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):  # a pandas DataFrame
        return [list(r) for r in value.values.tolist()]
    if isinstance(value, dict) and "data" in value:
        return [list(r) for r in value["data"]]
    return [list(r) for r in value]


class Editor:
    """Runs requests on one pipeline and writes their PNGs under ``output_dir``.

    Args:
        pipe: a `Prompt2PromptPipeline` or `Prompt2PromptXLPipeline` (both invert photos).
        output_dir: every file of the app goes below this folder.
        model: the ``--model`` the pipeline was loaded from (None: the bundled model), for the metadata.
        dtype: its ``--dtype`` name (None: float32).
        device: the device it runs on.
        source_limit_bytes: a visitor's pass is kept when it is at most this size.
        kept_total_bytes: all visitors' kept passes together are at most this size (`KEPT_TOTAL_MIB`).
    """

    def __init__(self, pipe, output_dir: str | os.PathLike, model: str | None = None, dtype: str | None = None, device: str = "cpu",
                 source_limit_bytes: int = SOURCE_LIMIT_MIB * MIB, kept_total_bytes: int = KEPT_TOTAL_MIB * MIB):
        self.pipe = pipe
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)  # made now: removed later, edits stop with a `WriteError`
        self.model, self.dtype, self.device = model, dtype, device
        self.source_limit_bytes, self.kept_total_bytes = source_limit_bytes, kept_total_bytes
        self._inversions: OrderedDict[tuple, Any] = OrderedDict()
        self._kept: OrderedDict[int, weakref.ref] = OrderedDict()  # id -> the visitors' passes, least recently used first

    def _remember(self, kept: KeptSource) -> None:
        """Count ``kept`` as the most recently used pass, and let the least recently used go while all
        together are over `kept_total_bytes` (a pass its visitor's session dropped is already gone)."""
        self._kept.pop(id(kept), None)
        self._kept[id(kept)] = weakref.ref(kept)
        alive = [(key, k) for key, ref in self._kept.items() if (k := ref()) is not None and k.source is not None]
        total = sum(k.nbytes for _, k in alive)
        for _, k in alive:  # least recently used first
            if total <= self.kept_total_bytes or k is kept:
                break
            total -= k.nbytes
            k.release()
        self._kept = OrderedDict((key, weakref.ref(k)) for key, k in alive if k.source is not None)

    def _inversion(self, req: EditRequest):
        from .imageio import file_sha256

        key = (file_sha256(req.image), req.prompt, req.inversion_method, req.num_inference_steps, req.guidance_scale)
        if key not in self._inversions:
            self._inversions[key] = self.pipe.invert(req.image, req.prompt, method=req.inversion_method,
                                                     num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale)
            while len(self._inversions) > KEPT_INVERSIONS:
                self._inversions.popitem(last=False)
        return self._inversions[key]

    def _new_folder(self, req: EditRequest) -> Path:
        """A result folder name not taken yet (created by the commit of its files, not here)."""
        from .options import slugify

        folder = self.output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{slugify(req.prompt)}"
        n = 1
        while folder.exists():
            n += 1
            folder = folder.with_name(folder.name.split("~")[0] + f"~{n}")
        return folder

    def run(self, req: EditRequest):
        """Run the edit in full (no kept pass) and write its PNGs; returns ``(files, heat)`` (see `edit`)."""
        result = self.edit(req)
        return result.files, result.heat

    def edit(self, req: EditRequest, kept: KeptSource | None = None) -> EditResult:
        """Run the edit and write its PNGs, each carrying the parameters.

        With ``kept`` (the visitor's last pass) made by the same source-side settings (model, prompt,
        seed or photo, steps, guidance), only the targets run, from it; when the pipeline refuses it
        (a window beyond its budget), or the settings differ, the full edit runs (the source and the
        targets in one batch) and keeps its source's pass (``keep_source``) when it is at most
        ``source_limit_bytes``.

        The result's ``files`` are the paths of ``source.png`` and ``edit-K.png``, ``heat`` the
        ``(path, caption)`` of each word's cross-attention heat map PNG. The options are checked before
        any work (a bad one raises `FieldError`, and nothing is written); library ValueErrors pass
        through. The files appear together or not at all (`imageio.OutputSet`): when the output folder
        is full, read-only or gone, `imageio.WriteError` names it and ``--output-dir``, and the page
        shows it under the form.
        """
        import torch

        from .imageio import OutputSet, WriteError, file_sha256
        from .options import image_metadata, parameters_text, slugify
        from .source_pass import pass_record
        from .visualisation import token_heatmaps

        options = req.options(self.model, self.dtype)  # the command line's checks, before the model runs
        kwargs = req.pipeline_kwargs()
        record = pass_record(options, file_sha256(req.image) if req.image else None)
        start = time.perf_counter()
        out, reused, note = None, False, ""
        if kept is not None and kept.source is not None and kept.record == record:
            try:
                extra = {"inversion": kept.inversion} if kept.inversion is not None else {}
                out = self.pipe(req.prompt, req.edit_prompts, source=kept.source, **extra, **kwargs)
                reused = True
            except ValueError as err:  # beyond the pass's budget: the full edit below (which reports a real error)
                note = f" (the kept source pass did not fit: {err})"
        if out is None:  # the source and the targets in one batch, which keeps the source's pass as it runs
            inversion = self._inversion(req) if req.image else None  # an edit from the pass takes the photo's inversion beside it
            noise = {"inversion": inversion} if inversion else {"generator": torch.Generator(device="cpu").manual_seed(req.seed)}
            # kept in the machine's memory, not the GPU's: one pass per visitor must not crowd out the model
            out = self.pipe(req.prompt, req.edit_prompts, keep_source=True, source_device="cpu", **noise, **kwargs)
            source = out.source_pass
            kept = KeptSource(record, source, inversion) if source.nbytes <= self.source_limit_bytes else None
            size = f"{source.nbytes / MIB:.1f} MiB"
            keeping = (f"source pass kept for the next edit ({size})" if kept is not None
                       else f"source pass not kept: {size} is over the {self.source_limit_bytes / MIB:g} MiB limit")
        if kept is not None:
            self._remember(kept)
        seconds = time.perf_counter() - start
        if reused:
            status = f"source reused: only the targets ran, in {seconds:.2f} s"
        else:
            status = f"full edit in {seconds:.2f} s; {keeping}{note}"
        folder = self._new_folder(req)
        mode = out.edit_mode.value if out.edit_mode is not None else None
        prompts = [req.prompt, *req.edit_prompts]

        def meta(role: str, k: int, name: str, **extra) -> tuple[dict, str]:
            env = {"device": self.device, "family": getattr(self.pipe, "model_family", None)}
            m = image_metadata("edit", options, env, role, k, len(prompts), name, prompts[k],
                               edit_mode=mode, source="p2p serve", **extra)
            return m, parameters_text(m)

        output = OutputSet(folder, self.output_dir)
        files, heat = [], []
        for k, image in enumerate(out.images):
            stem = "source" if k == 0 else f"edit-{k}"
            output.add_png(f"{stem}.png", image, *meta("source" if k == 0 else "target", k, f"{stem}.png"))
            files.append(str(folder / f"{stem}.png"))
            for i, (word, im) in enumerate(token_heatmaps(image, out.attention, k), start=1):
                name = f"attention-{stem}-{i:02d}-{slugify(word, 20)}.png"
                output.add_png(name, im, *meta("cross-attention", k, name, word=word, attention_resolution=out.attention.resolution))
                heat.append((str(folder / name), f"{'source' if k == 0 else f'target {k}'}: {word}"))
        try:
            output.commit()
        except WriteError as err:
            raise err.choose(OTHER_OUTPUT_DIR) from err.__cause__
        return EditResult(files, heat, kept, status, reused, seconds)


def _tolerant(photo):
    """Make a `gradio.Image` upload (``type="filepath"``) hand on a file PIL cannot open instead of
    failing in Gradio's own decoding, so that the image check (`EditRequest.options`) reports it beside
    the photo field; a decompression bomb (`_undecodable`) is handed on undecoded. Returns ``photo``.
    (Wrapped on the instance: a `gradio.Image` subclass would make Gradio write a ``.pyi`` file beside
    this module.)"""
    decode = photo.preprocess

    def preprocess(payload):
        if _undecodable(getattr(payload, "path", None)):  # a decompression bomb: the image check refuses it, undecoded
            return str(payload.path)
        try:
            return decode(payload)
        except Exception:  # noqa: BLE001 - any decoder error: the image check names it
            if payload is None or not getattr(payload, "path", None):
                raise
            return str(payload.path)

    photo.preprocess = preprocess
    return photo


def _undecodable(path) -> bool:
    """Whether the upload at ``path`` declares more pixels than PIL's decompression bomb limit
    (`options.over_pixel_limit`), or more than twice it (PIL refuses to open it): Gradio must not
    decode it (its RGB conversion would allocate the whole picture)."""
    import warnings

    import PIL.Image

    from .options import over_pixel_limit

    if not path:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                return over_pixel_limit(image)
    except PIL.Image.DecompressionBombError:
        return True
    except Exception:  # noqa: BLE001 - not a picture: Gradio's decoder fails and `_tolerant` hands the path on
        return False


def _slider(gr, name: str, label_suffix: str = "", **kwargs):
    """A slider of the argument ``name``: its range, step, default and label from `arguments.ARGUMENTS`."""
    row = ARGUMENTS[name]
    low, high, step = row.slider
    return gr.Slider(low, high, value=row.default, step=step, label=f"{row.label}{label_suffix}", **kwargs)


def _slot(gr):
    """An error slot: hidden until `on_run` shows a message in it."""
    return gr.Markdown(visible=False, elem_classes=["field-error"])


def _form(gr, default_prompt: str, default_target: str) -> tuple[list, dict[str, Any]]:
    """The page's fields, in the order `parse_request` takes them, and the error slot of each
    `FIELDS` name but ``general``."""
    slot = lambda: _slot(gr)  # noqa: E731
    label = {name: row.label for name, row in ARGUMENTS.items()}
    errors: dict[str, Any] = {}
    prompt = gr.Textbox(label=label["prompt"], value=default_prompt, elem_id="prompt")
    errors["prompt"] = slot()
    targets = gr.Textbox(label="Target prompts (one per line)", value=default_target, lines=3, elem_id="targets")
    errors["edit_prompts"] = slot()
    # "none" (the same noise, no injection) is left to the command line: the page shows edits
    modes = [m for m in ARGUMENTS["edit"].choices if m != "none"]
    mode = gr.Radio(modes, value=default("edit"), label=label["edit"], elem_id="mode")
    errors["mode"] = slot()
    cross = _slider(gr, "cross_replace_steps", " (fraction)", elem_id="cross")
    errors["cross"] = slot()
    self_steps = _slider(gr, "self_replace_steps", " (fraction)", elem_id="self")
    errors["self"] = slot()
    with gr.Row():
        blend_src = gr.Textbox(label="Local blend: source words", placeholder="circle", elem_id="blend-source",
                               info="Separated by commas; each may be a phrase, e.g. pencil sketch")
        blend_tgt = gr.Textbox(label="Local blend: target words", placeholder="square", elem_id="blend-target",
                               info="Separated by commas; each may be a phrase, e.g. oil painting")
    with gr.Row():
        blend_thr = _slider(gr, "local_blend.threshold", elem_id="blend-threshold")
        blend_res = gr.Number(value=DEFAULT_SIDE, precision=0, minimum=DEFAULT_SIDE, label=label["local_blend.resolution"],
                              elem_id="blend-res", info=f"{DEFAULT_SIDE}: a quarter of the latent side (16 for SD at 512 px)")
    errors["blend"] = slot()
    reweight = gr.Dataframe(headers=["word", "factor"], datatype=["str", "str"], row_count=2, column_count=2,
                            label=f"{label['equalizer']} (word, factor)", elem_id="reweight", value=[["", ""], ["", ""]])
    errors["reweight"] = slot()
    with gr.Row():
        seed = gr.Number(value=option_default("seed"), precision=0, label=label["generator"], elem_id="seed")
        steps = _slider(gr, "num_inference_steps", elem_id="steps")
        guidance = _slider(gr, "guidance_scale", elem_id="guidance")
    errors["sampling"] = slot()
    with gr.Accordion("Edit a real photo (optional)", open=False, elem_id="photo-accordion"):
        image = _tolerant(gr.Image(type="filepath", label=label["image"], sources=["upload"], elem_id="photo"))
        method = gr.Dropdown(list(ARGUMENTS["method"].choices), value=default("method"), label=label["method"], elem_id="inversion")
    errors["image"] = slot()
    inputs = [prompt, targets, mode, cross, self_steps, blend_src, blend_tgt, blend_thr, reweight, seed, steps, guidance, image, method,
              blend_res]
    return inputs, errors


def _results(gr) -> tuple:
    """The page's outputs: the images, the attention maps, the downloads and the history."""
    results = gr.Gallery(label="Source and edits", columns=4, height="auto", elem_id="results")
    with gr.Accordion("Cross-attention per word", open=False, elem_id="attention-accordion"):
        attention = gr.Gallery(label="Attention", columns=6, height="auto", elem_id="attention")
    files = gr.File(label="Download (PNGs with their parameters)", file_count="multiple", elem_id="files")
    past = gr.Gallery(label="History (this browser session)", columns=8, height=220, object_fit="contain", elem_id="history")
    return results, attention, files, past


def _device_thread():
    """A function that runs ``fn(*args)`` in one thread kept for the purpose, with the caller's
    context (Gradio's progress tracking), and returns its result.

    Gradio runs each request in whichever thread of its pool is free, and glibc's allocator gives
    each thread its own memory arena: the model's buffers, allocated in one thread after another,
    spread over the arenas and the server's resident memory grew by 10% in 300 edits (the bundled
    model; `tests/test_web_load.py`'s soak). Edits run one at a time anyway, so one thread runs them all."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2p-device")

    def run(fn, *args):
        return pool.submit(contextvars.copy_context().run, fn, *args).result()

    return run


def _handler(gr, editor: Editor):
    """The Edit button's handler: parse, run (from the visitor's kept source pass when it fits, in
    the app's device thread, `_device_thread`), and show each error beside the field of its
    argument, and the status line (reused or not, the time)."""
    on_device = _device_thread()

    def on_run(*values, progress=gr.Progress(track_tqdm=True)):
        *raw, hist, kept = values
        hidden = [gr.update(visible=False, value="") for _ in FIELDS]
        try:
            req = parse_request(*raw)
            result = on_device(editor.edit, req, kept if isinstance(kept, KeptSource) else None)
        except ValueError as err:  # the page's and the command line's checks, or the library's
            hidden[FIELDS.index(field_of(err))] = gr.update(visible=True, value=f"⚠ {err}")
            return (gr.skip(), gr.skip(), gr.skip(), gr.skip(), hist, gr.skip(), kept, *hidden)
        paths, heat = result.files, result.heat
        # the galleries show the saved PNGs themselves, so their download buttons give the parameters too
        labelled = [(p, "source" if k == 0 else req.edit_prompts[k - 1]) for k, p in enumerate(paths)]
        hist = (hist + [(p, f"{req.prompt} → {req.edit_prompts[k - 1]}") for k, p in enumerate(paths) if k > 0])[-HISTORY_LENGTH:]
        return (labelled, heat, paths, hist, hist, result.status, result.kept, *hidden)

    return on_run


def build_app(editor: Editor, default_prompt: str = "a big red circle on a blue background",
              default_target: str = "a big red square on a blue background"):
    """The page (a `gradio.Blocks`) for ``editor``."""
    import gradio as gr

    with gr.Blocks(title="prompt2prompt", delete_cache=(CACHE_AGE_S, CACHE_AGE_S)) as demo:
        gr.Markdown("## prompt2prompt — edit an image by editing its prompt\n"
                    "Write a source prompt and one or more targets; the source's attention is injected "
                    "into each target so that the layout survives while the words change.")
        history = gr.State([])
        # the visitor's last source pass: freed SOURCE_TTL_S after their last edit, or when they leave
        kept = gr.State(None, time_to_live=SOURCE_TTL_S)
        with gr.Row():
            with gr.Column(scale=1):
                inputs, errors = _form(gr, default_prompt, default_target)
                run = gr.Button("Edit", variant="primary", elem_id="run")
                errors["general"] = _slot(gr)
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                results, attention, files, past = _results(gr)
        slots = [errors[name] for name in FIELDS]
        run.click(_handler(gr, editor), inputs=[*inputs, history, kept], outputs=[results, attention, files, past, history, status, kept, *slots],
                  concurrency_limit=1, concurrency_id="device")
    return demo


_CSS = ".field-error p { color: #b00020; font-weight: 600; margin: 0; }"


def _busy_message(queue):
    """Make Gradio's ``queue`` turn a visitor away, when full, with `BUSY_MESSAGE` instead of its
    "Queue is full. Max size is N and size is N." (the status, HTTP 503, is unchanged). Returns ``queue``.
    (Wrapped on the instance, as `_tolerant` does.)"""
    push = queue.push

    async def busy_push(*args, **kwargs):
        success, detail, state = await push(*args, **kwargs)
        if state == "queue_full":
            detail = BUSY_MESSAGE.format(waiting=queue.max_size)
        return success, detail, state

    queue.push = busy_push
    return queue


def serve(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, device: str | None = None, dtype: str | None = None,
          output_dir: str | os.PathLike = "outputs/web", block: bool = True, allow_pickle: bool = False,
          source_limit_mib: int = SOURCE_LIMIT_MIB, queue_size: int = QUEUE_SIZE):
    """Load the model (with the pipeline its folder needs, `loading.load_pipeline`) and serve the
    page on ``host:port`` (loopback unless told otherwise); pickle weights load only with ``allow_pickle``.
    Each visitor's last source pass is kept when it is at most ``source_limit_mib`` MiB (0: never).
    At most ``queue_size`` requests wait (one runs at a time); a further visitor is told the page is
    busy (`BUSY_MESSAGE`) at once.

    Gradio's own temporary files (uploads, images sent to the page) also go below ``output_dir``.
    Returns the running `gradio.Blocks` when ``block`` is False.
    """
    queue_size = integer(queue_size, None, "queue_size", "a whole number of waiting requests, 1 or more", 1)
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(out / ".gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch

    from .loading import load_pipeline

    kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    pipe = load_pipeline(model, allow_pickle=allow_pickle, **kwargs)  # SDXL or Stable Diffusion, as the folder says
    if device:
        pipe.to(device)
    editor = Editor(pipe, out, model, dtype, str(pipe.device), source_limit_bytes=source_limit_mib * MIB)
    demo = build_app(editor)
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    _busy_message(demo._queue)
    demo.launch(server_name=host, server_port=port, max_file_size=f"{MAX_UPLOAD_MB}mb", css=_CSS,
                allowed_paths=[str(out)], prevent_thread_lock=not block, show_error=False, quiet=not block)
    return demo
