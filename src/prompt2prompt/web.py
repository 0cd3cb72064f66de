"""A Gradio page for Prompt-to-Prompt: edit in the browser (``p2p serve``).

A thin layer over the library: it turns the page's fields into `Prompt2PromptPipeline` arguments,
shows the pipeline's own validation messages beside the field they are about, and writes each
result as PNGs that carry their parameters (`prompt2prompt.imageio`), inside the output folder
only. One request runs at a time per device (Gradio's queue shows waiting visitors their place).

Needs the optional extra: ``pip install "prompt2prompt[web]"``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Largest upload accepted.
MAX_UPLOAD_MB = 20
#: Error slots on the page, one beside each group of fields.
FIELDS = ("prompt", "edit_prompts", "mode", "cross", "self", "blend", "reweight", "sampling", "image", "general")
_FIELD_PATTERNS = (  # (how a library message starts: the argument it names, field), first match wins
    (r"equalizer\b", "reweight"),
    (r"(LocalBlend|local_blend)\b", "blend"),
    (r"cross_replace_steps\b", "cross"),
    (r"self_replace_(steps|max_res)\b", "self"),
    (r"edit_prompts\b", "edit_prompts"),
    (r"(edit\b|word swap\b)", "mode"),
    (r"(num_inference_steps|guidance_scale|seed|generator|eta)\b", "sampling"),
    (r"(image\b|an image\b|a non-uint8 image\b|the image was inverted\b|inversion\b|the inversion's\b)", "image"),
    (r"prompt\b", "prompt"),
)
#: The page's name of each command-line option (it leads `options.normalise_options`' messages) and its field.
_OPTION_LABELS = {
    "prompt": ("Source prompt", "prompt"), "to": ("Target prompt", "edit_prompts"), "mode": ("Edit mode", "mode"),
    "cross_steps": ("Cross-attention replace steps", "cross"), "self_steps": ("Self-attention replace steps", "self"),
    "blend": ("Local blend words", "blend"), "blend_threshold": ("Local blend threshold", "blend"),
    "blend_res": ("Local blend map side", "blend"),
    "reweight": ("Re-weighting", "reweight"), "seed": ("Seed", "sampling"), "steps": ("Steps", "sampling"),
    "guidance": ("Guidance", "sampling"), "image": ("Photo", "image"), "invert": ("Inversion", "image"),
}
#: Seeds are 64-bit signed integers (``torch.Generator.manual_seed``, the command line's ``--seed``).
MAX_SEED = 2**63 - 1


def field_of(message: str) -> str:
    """The page field a library validation message is about, read from the argument name the message
    starts with (never from the rest, which quotes the user's prompts); ``general`` when none matches."""
    for pattern, name in _FIELD_PATTERNS:
        if re.match(pattern, message):
            return name
    return "general"


def _option_label(key: str) -> str:
    from .options import cli_names

    return _OPTION_LABELS[key][0] if key in _OPTION_LABELS else cli_names(key)


def _option_field(message: str) -> str:
    """The field of a `options.OptionError` raised with `_option_label` names: the longest label it starts with."""
    for label, name in sorted(_OPTION_LABELS.values(), key=lambda pair: -len(pair[0])):
        if message.startswith(label):
            return name
    return "general"


class FieldError(ValueError):
    """A ValueError that knows which field of the page it belongs to."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass
class EditRequest:
    """The page's fields, parsed and checked (everything else is checked by the pipeline)."""

    prompt: str
    edit_prompts: list[str]
    mode: str = "auto"
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.4
    blend_source: list[str] = field(default_factory=list)
    blend_target: list[str] = field(default_factory=list)
    blend_threshold: float = 0.3
    blend_res: int | None = None  # None: the library's default side
    equalizer: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    image: str | None = None
    inversion_method: str = "null-text"

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
            raise FieldError(_option_field(str(err)), str(err)) from None
        return options


def _words(text, field_name: str) -> list[str]:
    """Comma-separated words; each may be a phrase (``"pencil sketch, red"``), as the library and ``--blend`` take them."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise FieldError(field_name, f"Local blend words must be text: words separated by commas, got {text!r}.")
    return [w.strip() for w in text.split(",") if w.strip()]


def _text(value, field_name: str, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FieldError(field_name, f"The {what} must be text, got {value!r}.")
    return value


def _number(value, field_name: str, label: str, example: str) -> float:
    """A finite number; None or a non-number (possible through the API) is a `FieldError`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise FieldError(field_name, f"{label} must be a number such as {example}, got {value!r}.") from None
    if not math.isfinite(number):
        raise FieldError(field_name, f"{label} must be a finite number such as {example}, got {value!r}.")
    return number


def _whole(value, field_name: str, label: str, minimum: int, maximum: int) -> int:
    """A whole number in [minimum, maximum]; 7.0 counts, 7.5 and None do not."""
    try:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError
        number = int(value) if isinstance(value, (int, float)) else int(str(value).strip())
    except (TypeError, ValueError, OverflowError):
        raise FieldError(field_name, f"{label} must be a whole number, got {value!r}.") from None
    if not minimum <= number <= maximum:
        raise FieldError(field_name, f"{label} must be from {minimum} to {maximum}, got {number}.")
    return number


def _photo_path(image) -> str | None:
    """The photo's path, checked to exist (the library checks that it is a picture)."""
    if image is None or isinstance(image, str) and not image.strip():
        return None
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
    prompt = _text(prompt, "prompt", "source prompt").strip()
    if not prompt:
        raise FieldError("prompt", "Write a source prompt, e.g. 'a big red circle on a blue background'.")
    edit_prompts = [t.strip() for t in _text(targets, "edit_prompts", "target prompts").splitlines() if t.strip()]
    if not edit_prompts:
        raise FieldError("edit_prompts", "Write at least one target prompt (one per line), e.g. the source with one word changed.")
    src, tgt = _words(blend_source, "blend"), _words(blend_target, "blend")
    if bool(src) != bool(tgt):
        raise FieldError("blend", "Local blend needs words on both sides: the source words and the target words (or neither).")
    equalizer: dict[str, float] = {}
    try:
        rows = _rows(reweight_rows)
    except TypeError:
        raise FieldError("reweight", f"Re-weighting takes rows of (word, factor), got {reweight_rows!r}.") from None
    for row in rows:
        word, factor = (str(row[0]).strip() if len(row) > 0 and row[0] is not None else ""), (row[1] if len(row) > 1 else "")
        if not word and (factor in ("", None)):
            continue
        if not word:
            raise FieldError("reweight", f"A re-weighting row has the factor {factor!r} but no word; fill in the word or clear the row.")
        equalizer[word] = _number(factor, "reweight", f"The factor for {word!r}", "2 or -1")
    return EditRequest(
        prompt=prompt, edit_prompts=edit_prompts, mode=mode or "auto",
        cross_replace_steps=_number(cross, "cross", "Cross-attention replace steps", "0.8"),
        self_replace_steps=_number(self_steps, "self", "Self-attention replace steps", "0.4"),
        blend_source=src, blend_target=tgt, blend_threshold=_number(blend_threshold, "blend", "Local blend threshold", "0.3"),
        equalizer=equalizer, seed=_whole(seed, "sampling", "Seed", 0, MAX_SEED),
        num_inference_steps=_whole(steps, "sampling", "Steps", 1, MAX_SEED),
        guidance_scale=_number(guidance, "sampling", "Guidance", "7.5"),
        image=_photo_path(image), inversion_method=inversion_method or "null-text",
        blend_res=_blend_side(blend_res),
    )


def _blend_side(value) -> int | None:
    """The page's local blend map side: empty or 0 is None (the library's default side)."""
    if value is None or isinstance(value, str) and not value.strip():
        return None
    return _whole(value, "blend", "Local blend map side (0: the default)", 0, MAX_SEED) or None


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
        pipe: a `Prompt2PromptPipeline`.
        output_dir: every file of the app goes below this folder.
        model: the ``--model`` the pipeline was loaded from (None: the bundled model), for the metadata.
        dtype: its ``--dtype`` name (None: float32).
        device: the device it runs on.
    """

    def __init__(self, pipe, output_dir: str | os.PathLike, model: str | None = None, dtype: str | None = None, device: str = "cpu"):
        self.pipe = pipe
        self.output_dir = Path(output_dir).resolve()
        self.model, self.dtype, self.device = model, dtype, device
        self._inversions: OrderedDict[tuple, Any] = OrderedDict()

    def _inversion(self, req: EditRequest):
        from .imageio import file_sha256

        key = (file_sha256(req.image), req.prompt, req.inversion_method, req.num_inference_steps, req.guidance_scale)
        if key not in self._inversions:
            self._inversions[key] = self.pipe.invert(req.image, req.prompt, method=req.inversion_method,
                                                     num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale)
            while len(self._inversions) > 4:
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
        """Run the edit and write its PNGs, each carrying the parameters.

        Returns ``(files, heat)``: the paths of ``source.png`` and ``edit-K.png``, and ``(path, caption)``
        of each word's cross-attention heat map PNG. The options are checked before any work (a bad one
        raises `FieldError`, and nothing is written); library ValueErrors pass through. The files appear
        together or not at all (`imageio.OutputSet`).
        """
        import torch

        from .options import image_metadata, parameters_text, slugify
        from .imageio import OutputSet
        from .visualisation import token_heatmaps

        options = req.options(self.model, self.dtype)  # the command line's checks, before the model runs
        kwargs = req.pipeline_kwargs()
        if req.image:
            kwargs["inversion"] = self._inversion(req)
        else:
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(req.seed)
        out = self.pipe(req.prompt, req.edit_prompts, **kwargs)
        folder = self._new_folder(req)
        mode = out.edit_mode.value if out.edit_mode is not None else None
        prompts = [req.prompt, *req.edit_prompts]

        def meta(role: str, k: int, name: str, **extra) -> tuple[dict, str]:
            m = image_metadata("edit", options, {"device": self.device}, role, k, len(prompts), name, prompts[k],
                               edit_mode=mode, source="p2p serve", **extra)
            return m, parameters_text(m)

        output = OutputSet(folder)
        files, heat = [], []
        for k, image in enumerate(out.images):
            stem = "source" if k == 0 else f"edit-{k}"
            output.add_png(f"{stem}.png", image, *meta("source" if k == 0 else "target", k, f"{stem}.png"))
            files.append(str(folder / f"{stem}.png"))
            for i, (word, im) in enumerate(token_heatmaps(image, out.attention, k), start=1):
                name = f"attention-{stem}-{i:02d}-{slugify(word, 20)}.png"
                output.add_png(name, im, *meta("cross-attention", k, name, word=word, attention_resolution=out.attention.resolution))
                heat.append((str(folder / name), f"{'source' if k == 0 else f'target {k}'}: {word}"))
        output.commit()
        return files, heat


def _tolerant(photo):
    """Make a `gradio.Image` upload (``type="filepath"``) hand on a file PIL cannot open instead of
    failing in Gradio's own decoding, so that the image check (`EditRequest.options`) reports it beside
    the photo field. Returns ``photo``. (Wrapped on the instance: a `gradio.Image` subclass would make
    Gradio write a ``.pyi`` file beside this module.)"""
    decode = photo.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except Exception:  # noqa: BLE001 - any decoder error: the image check names it
            if payload is None or not getattr(payload, "path", None):
                raise
            return str(payload.path)

    photo.preprocess = preprocess
    return photo


def build_app(editor: Editor, default_prompt: str = "a big red circle on a blue background",
              default_target: str = "a big red square on a blue background"):
    """The page (a `gradio.Blocks`) for ``editor``."""
    import gradio as gr

    from .inversion import InversionMethod

    def slot():
        return gr.Markdown(visible=False, elem_classes=["field-error"])

    with gr.Blocks(title="prompt2prompt") as demo:
        gr.Markdown("## prompt2prompt — edit an image by editing its prompt\n"
                    "Write a source prompt and one or more targets; the source's attention is injected "
                    "into each target so that the layout survives while the words change.")
        history = gr.State([])
        errors: dict[str, Any] = {}
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Source prompt", value=default_prompt, elem_id="prompt")
                errors["prompt"] = slot()
                targets = gr.Textbox(label="Target prompts (one per line)", value=default_target, lines=3, elem_id="targets")
                errors["edit_prompts"] = slot()
                mode = gr.Radio(["auto", "replace", "refine"], value="auto", label="Edit mode", elem_id="mode")
                errors["mode"] = slot()
                cross = gr.Slider(0, 1, value=0.8, step=0.05, label="Cross-attention replace steps (fraction)", elem_id="cross")
                errors["cross"] = slot()
                self_steps = gr.Slider(0, 1, value=0.4, step=0.05, label="Self-attention replace steps (fraction)", elem_id="self")
                errors["self"] = slot()
                with gr.Row():
                    blend_src = gr.Textbox(label="Local blend: source words", placeholder="circle", elem_id="blend-source",
                                           info="Separated by commas; each may be a phrase, e.g. pencil sketch")
                    blend_tgt = gr.Textbox(label="Local blend: target words", placeholder="square", elem_id="blend-target",
                                           info="Separated by commas; each may be a phrase, e.g. oil painting")
                with gr.Row():
                    blend_thr = gr.Slider(0, 1, value=0.3, step=0.05, label="Local blend threshold", elem_id="blend-threshold")
                    blend_res = gr.Number(value=0, precision=0, minimum=0, label="Local blend map side", elem_id="blend-res",
                                          info="0: a quarter of the latent side (16 for SD at 512 px)")
                errors["blend"] = slot()
                reweight = gr.Dataframe(headers=["word", "factor"], datatype=["str", "str"], row_count=2, column_count=2,
                                        label="Re-weighting (word, factor)", elem_id="reweight", value=[["", ""], ["", ""]])
                errors["reweight"] = slot()
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    steps = gr.Slider(1, 100, value=50, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, 15, value=7.5, step=0.5, label="Guidance", elem_id="guidance")
                errors["sampling"] = slot()
                with gr.Accordion("Edit a real photo (optional)", open=False, elem_id="photo-accordion"):
                    image = _tolerant(gr.Image(type="filepath", label="Photo", sources=["upload"], elem_id="photo"))
                    method = gr.Dropdown([m.value for m in InversionMethod], value="null-text", label="Inversion", elem_id="inversion")
                errors["image"] = slot()
                run = gr.Button("Edit", variant="primary", elem_id="run")
                errors["general"] = slot()
            with gr.Column(scale=2):
                results = gr.Gallery(label="Source and edits", columns=4, height="auto", elem_id="results")
                with gr.Accordion("Cross-attention per word", open=False, elem_id="attention-accordion"):
                    attention = gr.Gallery(label="Attention", columns=6, height="auto", elem_id="attention")
                files = gr.File(label="Download (PNGs with their parameters)", file_count="multiple", elem_id="files")
                past = gr.Gallery(label="History (this browser session)", columns=8, height=220, object_fit="contain", elem_id="history")

        slots = [errors[name] for name in FIELDS]
        inputs = [prompt, targets, mode, cross, self_steps, blend_src, blend_tgt, blend_thr, reweight, seed, steps, guidance, image, method,
                  blend_res, history]

        def on_run(*values, progress=gr.Progress(track_tqdm=True)):
            *raw, hist = values
            hidden = [gr.update(visible=False, value="") for _ in FIELDS]
            try:
                req = parse_request(*raw)
                paths, heat = editor.run(req)
            except ValueError as err:  # FieldError (the page's and the command line's checks) or the library's
                name = err.field if isinstance(err, FieldError) else field_of(str(err))
                hidden[FIELDS.index(name)] = gr.update(visible=True, value=f"⚠ {err}")
                return (gr.skip(), gr.skip(), gr.skip(), gr.skip(), hist, *hidden)
            # the galleries show the saved PNGs themselves, so their download buttons give the parameters too
            labelled = [(p, "source" if k == 0 else req.edit_prompts[k - 1]) for k, p in enumerate(paths)]
            hist = (hist + [(p, f"{req.prompt} → {req.edit_prompts[k - 1]}") for k, p in enumerate(paths) if k > 0])[-24:]
            return (labelled, heat, paths, hist, hist, *hidden)

        run.click(on_run, inputs=inputs, outputs=[results, attention, files, past, history, *slots],
                  concurrency_limit=1, concurrency_id="device")
    return demo


_CSS = ".field-error p { color: #b00020; font-weight: 600; margin: 0; }"


def serve(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, device: str | None = None, dtype: str | None = None,
          output_dir: str | os.PathLike = "outputs/web", block: bool = True, allow_pickle: bool = False):
    """Load the model and serve the page on ``host:port`` (loopback unless told otherwise); pickle
    weights load only with ``allow_pickle``.

    Gradio's own temporary files (uploads, images sent to the page) also go below ``output_dir``.
    Returns the running `gradio.Blocks` when ``block`` is False.
    """
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(out / ".gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch

    from .pipeline import Prompt2PromptPipeline

    kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    pipe = Prompt2PromptPipeline.from_pretrained(model, allow_pickle=allow_pickle, **kwargs)
    if device:
        pipe.to(device)
    editor = Editor(pipe, out, model, dtype, str(pipe.device))
    demo = build_app(editor)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=host, server_port=port, max_file_size=f"{MAX_UPLOAD_MB}mb", css=_CSS,
                allowed_paths=[str(out)], prevent_thread_lock=not block, show_error=False, quiet=not block)
    return demo
