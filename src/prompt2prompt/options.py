"""The options of a run: their canonical form, their checks, and the parameters every image carries.

The command line (`prompt2prompt.cli`) and the web page (`prompt2prompt.web`) share this module,
so that both are thin layers over the library. Every option has one normaliser that accepts the
command-line string, the JSON of a batch line and its own canonical output (so stored options
parse again), and raises `OptionError` naming the option as the user spelled it and carrying the
library name of the argument it sets. The options' defaults, flags, kinds and ranges are the rows
of `prompt2prompt.arguments.ARGUMENTS`. `image_metadata` and `parameters_text` are what every
saved PNG carries; `options_to_argv` and `rerun_command` turn stored options back into the command
that makes the image again.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import unicodedata
from collections.abc import Callable, Mapping
from pathlib import Path

from . import __version__
from .alignment import PromptTokens, count_words, normalize_word, positions_in_each, split_words
from .arguments import MAX_INT64, OPTIONS, ArgumentError, choice, fraction, integer, number, option_default, window
from .edits import LocalBlend, build_edit_plan
from .imageio import file_sha256, json_value, read_png_metadata

PROG = "p2p"
RESULT = "result.json"

#: Option defaults (the canonical, JSON-ready form of every option), from `arguments.ARGUMENTS`.
DEFAULTS: dict = {key: option_default(key) for key in OPTIONS}

#: The command-line spelling of each option.
FLAGS: dict[str, str] = {key: row.flag for key, row in OPTIONS.items() if row.flag is not None}

#: Options that set how ``blend`` acts, and so need it.
BLEND_SETTINGS = ("blend_threshold", "blend_res")
COMMON_KEYS = ("seed", "steps", "guidance", "model", "dtype")
GENERATE_KEYS = ("prompt", *COMMON_KEYS)
ATTENTION_KEYS = ("prompt", "top_k", "res", *COMMON_KEYS)
EDIT_SETTING_KEYS = ("mode", "cross_steps", "cross_steps_word", "self_steps", "blend", "blend_threshold", "blend_res", "reweight")
EDIT_KEYS = ("prompt", "to", *EDIT_SETTING_KEYS, *COMMON_KEYS, "image", "invert")
SWEEP_KEYS = ("prompt", "to", "sweep", *[k for k in EDIT_SETTING_KEYS if k != "cross_steps"], *COMMON_KEYS)
#: Keys a line of a ``p2p batch`` file may hold (model, dtype and device are set for the whole batch).
BATCH_LINE_KEYS = tuple(k for k in EDIT_KEYS if k not in ("model", "dtype"))


class OptionError(ArgumentError):
    """A bad option value: the message names the option as the user spelled it and the fix.

    The command line exits with status 2 on it (one line); the web page shows it beside the field
    of its ``.argument``.

    Args:
        message: what is wrong and how to fix it.
        argument: the library name of the argument the option sets (a key of
            `arguments.ARGUMENTS`); None for a usage error about no argument (a file, the device).
    """

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(argument, message)


def json_lines(path: str | Path, command: str) -> list[tuple[int, str]]:
    """A ``.jsonl`` file's lines that hold data, ``(number from 1, text)``: blank and ``#`` lines skipped.

    Raises:
        OptionError: the file cannot be read as UTF-8 text (``"<command>: cannot read ..."``).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise OptionError(f"{command}: cannot read {path}: {one_line(err)}") from None
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]


def json_object(text: str, example: str) -> dict:
    """One ``.jsonl`` line as a JSON object; `OptionError` saying why not (``example`` shows one)."""
    try:
        raw = json_value(text)
    except ValueError as err:
        raise OptionError(f"{err}; write a JSON object like {example}") from None
    if not isinstance(raw, dict):
        raise OptionError(f"must be a JSON object like {example}")
    return raw


def one_line(message) -> str:
    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


# ============================================================================ option parsing
#
# Every option has one normaliser (value, name) -> canonical value; ``name`` is the option as the
# user spells it. The checks below raise with no argument: `_option` gives their error the
# argument of the option it normalises.

Names = Callable[[str], str]


def cli_names(key: str) -> str:
    return FLAGS.get(key, key)


def _window(value, name: str):
    """A fraction ``f`` (canonical: the float) or ``START:END`` (canonical: ``[start, end]``)."""
    start, end = window(value, None, name)
    single = not isinstance(value, (list, tuple)) and not (isinstance(value, str) and ":" in value)
    return end if single else [start, end]


def integer_option(value, name: str, minimum: int, what: str) -> int:
    """A whole number from ``minimum`` (`arguments.integer`), for options that set no argument (``--workers``)."""
    try:
        return integer(value, None, name, what, minimum)
    except ArgumentError as err:
        raise OptionError(str(err)) from None


def _text(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"{name} must be a non-empty prompt, got {value!r}")
    return value


def _prompts(value, name: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise OptionError(f"{name} must give at least one target prompt, got {value!r}")
    return [_text(v, name) for v in values]


def choice_of(choices: tuple[str, ...]):
    """The normaliser of an option that names one of ``choices`` (any case)."""

    def parse(value, name: str) -> str:
        try:
            return choice(value, None, name, choices)
        except ArgumentError as err:
            raise OptionError(str(err)) from None

    return parse


def _pairs(value, name: str, example: str) -> list[tuple[str, object]]:
    """``WORD=VALUE`` strings (a list or one string) or a JSON object -> [(word, raw value)]."""
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, (list, tuple)):
            raise OptionError(f"{name} must be WORD=VALUE, e.g. {example}, got {value!r}")
        items = []
        for text in texts:
            if not isinstance(text, str) or "=" not in text:
                raise OptionError(f"{name} must be WORD=VALUE, e.g. {example}, got {text!r}")
            word, _, raw = text.rpartition("=")
            items.append((word, raw))
    out = []
    for word, raw in items:
        if not isinstance(word, str) or not word.strip():
            raise OptionError(f"{name} must name a word before '=', e.g. {example}, got {word!r}")
        out.append((word.strip(), raw))
    return out


def _reweight(value, name: str) -> dict[str, float]:
    what = "a number (the attention factor; 0, negative and > 1 allowed), e.g. car=2"
    return {w: number(raw, None, f"{name} {w}", what) for w, raw in _pairs(value, name, "car=2")}


def _word_windows(value, name: str) -> dict:
    return {w: _window(raw, f"{name} {w}") for w, raw in _pairs(value, name, "car=0:0.4")}


def _words(value, name: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(w, str) for w in items):
        raise OptionError(f"{name} takes words separated by commas, got {value!r}")
    words = [w.strip() for w in items if w.strip()]
    if not words:
        raise OptionError(f"{name} takes words separated by commas, got {value!r}")
    return words


def _blend(value, name: str) -> list[list[str]]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise OptionError(f"{name} takes two arguments, SOURCE_WORDS TARGET_WORDS (e.g. {name} circle square), got {value!r}")
    return [_words(value[0], f"{name} SOURCE_WORDS"), _words(value[1], f"{name} TARGET_WORDS")]


def _sweep(value, name: str) -> list:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise OptionError(f"{name} takes comma-separated values, e.g. 0,0.2,0.4,0.6,0.8,1.0, got {value!r}")
    if isinstance(items, (list, tuple)) and any(isinstance(i, str) and not i.strip() for i in items):
        raise OptionError(f"{name} has an empty value in {value!r}; give e.g. 0,0.2,0.4")
    return [_window(i.strip() if isinstance(i, str) else i, name) for i in items]


def user_path(value: str, name: str) -> Path:
    """A path as the user gave it, ``~`` expanded, checked to be a name this system can look up.

    Raises:
        OptionError: ``~user`` of no such user, a NUL character, or a name the system refuses
            (e.g. longer than it allows); the message names the option.
    """
    shown = value if len(value) <= 60 else value[:57] + "..."
    try:
        path = Path(value).expanduser()
        path.exists()
    except RuntimeError as err:  # ~user of a user this system does not have
        raise OptionError(f"{name} {shown!r}: {err}; give a path without ~user, or of a user that exists") from None
    except ValueError as err:  # an embedded NUL
        raise OptionError(f"{name} {shown!r}: not a usable path ({err}); remove the NUL character") from None
    except OSError as err:  # e.g. ENAMETOOLONG
        raise OptionError(f"{name} {shown!r}: not a usable path ({err.strerror or err}); give a shorter or valid path") from None
    return path


def _image_path(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"{name} must be the path of an image file, got {value!r}")
    path = user_path(value, name)
    if not path.is_file():
        raise OptionError(f"{name} {value}: no such file; give the path of an image file")
    import warnings

    import PIL.Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # refused below, by its size
            with PIL.Image.open(path) as image:
                if over_pixel_limit(image):
                    raise OptionError(f"{name} {value}: {image.width}x{image.height} pixels is over the limit of "
                                      f"{PIL.Image.MAX_IMAGE_PIXELS} pixels (a guard against decompression bombs); give a smaller picture")
                image.verify()  # the file's structure (a PNG's checksums)
            with PIL.Image.open(path) as image:
                image.load()  # decoded in full: a truncated file is refused here, before any model work
    except OptionError:
        raise
    except PIL.Image.DecompressionBombError as err:
        raise OptionError(f"{name} {value}: too large to decode ({one_line(err)}); give a smaller picture") from None
    except Exception as err:  # noqa: BLE001 - any decoder error means "not an image"
        raise OptionError(f"{name} {value}: not an image PIL can read ({one_line(err)})") from None
    return str(path.resolve())


def over_pixel_limit(image) -> bool:
    """Whether an opened (not yet decoded) PIL image declares more pixels than PIL's decompression
    bomb limit, `PIL.Image.MAX_IMAGE_PIXELS` (PIL itself refuses only twice that, and warns between)."""
    import PIL.Image

    limit = PIL.Image.MAX_IMAGE_PIXELS
    return limit is not None and image.width * image.height > limit


def model_option(value, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"{name} must be a model folder or hub id, got {value!r}", "model")
    path = user_path(value, name)
    return str(path.resolve()) if path.exists() else value


def _by_kind(key: str) -> Callable:
    """The normaliser of an option whose row in `arguments.ARGUMENTS` gives its kind and range."""
    row = OPTIONS[key]
    if row.kind == "integer":
        maximum = MAX_INT64 if row.maximum is None else int(row.maximum)
        return lambda v, n: integer(v, None, n, row.what, int(row.minimum), maximum)
    if row.kind == "number":
        return lambda v, n: number(v, None, n, row.what)
    if row.kind == "fraction":
        return lambda v, n: fraction(v, None, n)
    if row.kind == "window":
        return _window
    if row.kind == "choice":
        return lambda v, n: choice(v, None, n, row.choices)
    raise ValueError(f"option {key!r} has no kind in arguments.ARGUMENTS; give it a normaliser")


def _option(key: str, parse: Callable) -> Callable:
    """``parse`` raising `OptionError`s that carry the argument the option ``key`` sets."""
    argument = OPTIONS[key].name

    def normalise(value, name: str):
        try:
            return parse(value, name)
        except ArgumentError as err:
            raise OptionError(str(err), argument) from None

    return normalise


_OWN_NORMALISERS: dict[str, Callable] = {
    "prompt": _text,
    "to": _prompts,
    "cross_steps_word": _word_windows,
    "blend": _blend,
    "reweight": _reweight,
    "image": _image_path,
    "model": model_option,
    "sweep": _sweep,
}
#: Each option's normaliser: (value, name as the user spells the option) -> canonical value.
NORMALISERS: dict[str, Callable] = {key: _option(key, _OWN_NORMALISERS.get(key) or _by_kind(key)) for key in OPTIONS}


def _missing(key: str, names: Names) -> OptionError:
    argument = OPTIONS[key].name
    if key == "prompt":
        return OptionError(f"the prompt is missing; give it as the first argument, e.g. {PROG} generate \"a red circle on a blue background\"", argument)
    return OptionError(f"{names(key)} is required; e.g. {names(key)} \"a red square on a blue background\"", argument)


def normalise_options(raw: Mapping, keys: tuple[str, ...], names: Names = cli_names, required: tuple[str, ...] = ("prompt",)) -> dict:
    """Check and canonicalise the given options (``raw``: key -> value, None = not given) and fill defaults.

    Raises:
        OptionError: a bad value, a missing required option, or options that need each other.
    """
    given = {k: v for k, v in raw.items() if v is not None}
    for key in required:
        if key not in given:
            raise _missing(key, names)
    options = {}
    for key in keys:
        if key in given:
            options[key] = NORMALISERS[key](given[key], names(key))
        else:
            options[key] = copy.deepcopy(DEFAULTS.get(key))
    for key in BLEND_SETTINGS:
        if key in keys and key in given and options.get("blend") is None:
            raise OptionError(f"{names(key)} needs {names('blend')}; add e.g. {names('blend')} circle square, or drop {names(key)}",
                              OPTIONS[key].name)
    if "invert" in keys:
        if options["invert"] is not None and options["image"] is None:
            raise OptionError(f"{names('invert')} needs {names('image')} PHOTO: the photo to invert and edit", "image")
        if options["image"] is not None and options["invert"] is None:
            options["invert"] = OPTIONS["invert"].default
    if "to" in options and isinstance(options["to"], list) and "sweep" in keys and len(options["to"]) != 1:
        raise OptionError(f"sweep takes exactly one {names('to')} target prompt, got {len(options['to'])}", "edit_prompts")
    return options


def _word_level_tokens(prompts: list[str]) -> list[PromptTokens]:
    """Word-level stand-ins for tokenized prompts (one token per word), so that the library's own
    checks of words, windows and modes run before any model loads."""
    start, end = 0, 1  # the stand-in start and end tokens, as CLIP's frame each prompt; words take ids from 2
    ids: dict[str, int] = {}
    split = [split_words(p) for p in prompts]
    length = max(len(w) for w in split) + 2  # the longest prompt with its start and end tokens
    out = []
    for prompt, words in zip(prompts, split):
        word_ids = [ids.setdefault(normalize_word(w), len(ids) + 2) for w in words]
        positions = tuple((k + 1,) for k in range(len(words)))  # after the start token
        out.append(PromptTokens(prompt, tuple(words), positions, (start, *word_ids, end), length))
    return out


#: The word-level check builds its edit plan with at most this many steps: the plan's size grows
#: with the steps (and the scheduler, once the model loads, refuses more steps than it was trained with).
PLAN_CHECK_STEPS = 1000
#: Without a readable token limit (a hub id), prompts of more words than this are refused: the
#: word-level plan grows with the square of the words, and no Stable Diffusion text encoder takes that many.
UNKNOWN_LIMIT_WORDS = 1000


def _check_prompt_lengths(options: Mapping, names: Names, token_limit: int | None) -> None:
    """Refuse a prompt with more words than ``token_limit`` (each word is at least one token), or
    than `UNKNOWN_LIMIT_WORDS` without one, so that the word-level check never builds a plan of a
    hostile size.

    Raises:
        OptionError: naming the prompt's option, its word count, the limit and the fix.
    """
    for key, prompt in [("prompt", options["prompt"]), *(("to", t) for t in options["to"])]:
        count = count_words(prompt)
        if count > (token_limit if token_limit is not None else UNKNOWN_LIMIT_WORDS):
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            if token_limit is None:
                raise OptionError(f"{names(key)} {shown!r} has {count} words; no text encoder takes that many, so shorten it", OPTIONS[key].name)
            raise OptionError(f"{names(key)} {shown!r} has {count} words, but the text encoder of {model_label(options.get('model'))} takes "
                              f"at most {token_limit} tokens (each word is at least one); shorten it", OPTIONS[key].name)


def check_edit_words(options: Mapping, names: Names = cli_names, token_limit: int | None = None) -> None:
    """Check every word and the mode against the prompts, before any model work.

    Args:
        options: the normalised options.
        names: how the messages name an option.
        token_limit: the model's limit of tokens per prompt when known before it loads
            (`model_folder.prompt_token_limit`); a prompt of more words is refused here.

    Raises:
        OptionError: naming the option, with the library's message (its words, the fix), and
            carrying the argument the option sets.
    """
    _check_prompt_lengths(options, names, token_limit)
    source, *targets = _word_level_tokens([options["prompt"], *options["to"]])
    if options["mode"] == "replace":
        for target in targets:
            if len(target.words) != len(source.words):
                raise OptionError(
                    f"{names('mode')} replace needs the same number of words in the source and each target, but "
                    f"{source.prompt!r} has {len(source.words)} and {target.prompt!r} has {len(target.words)}; "
                    f"use {names('mode')} refine (or auto) to add or remove words",
                    OPTIONS["mode"].name,
                )
    for key in ("cross_steps_word", "reweight"):
        for word in options.get(key) or {}:
            try:
                positions_in_each(targets, word, names(key))
            except ValueError as err:
                raise OptionError(str(err), OPTIONS[key].name) from None
    if options.get("blend"):
        _check_blend_words(options["blend"], source, targets, names)
    try:  # everything else the library checks (same code as the real run, on word-level tokens)
        kwargs = edit_kwargs(options)
        build_edit_plan(  # no map sides here (no model): 0 stands in for them, the settings are what is checked
            source, targets, kwargs["edit"], min(options["steps"], PLAN_CHECK_STEPS), kwargs["cross_replace_steps"], kwargs["self_replace_steps"],
            self_max_res=0, equalizer=kwargs["equalizer"], local_blend=kwargs["local_blend"], blend_resolution=0,
        )
    except ValueError as err:
        raise OptionError(f"invalid edit settings: {err}", getattr(err, "argument", None)) from None


def _check_blend_words(blend: list[list[str]], source: PromptTokens, targets: list[PromptTokens], names: Names) -> None:
    argument = OPTIONS["blend"].name
    source_words, target_words = blend
    for word in source_words:
        try:
            source.positions(word)
        except ValueError as err:
            raise OptionError(f"{names('blend')} SOURCE_WORDS: {err}", argument) from None
    for word in target_words:  # each word in the targets that have it; the library checks every target gets one
        try:
            positions_in_each(targets, word, f"{names('blend')} TARGET_WORDS")
        except ValueError as err:
            raise OptionError(str(err), argument) from None


def _window_arg(window):
    return tuple(window) if isinstance(window, list) else window


def edit_kwargs(options: Mapping) -> dict:
    """The pipeline's edit arguments from canonical options."""
    cross = _window_arg(options["cross_steps"])
    if options.get("cross_steps_word"):
        cross = {"default_": cross, **{w: _window_arg(v) for w, v in options["cross_steps_word"].items()}}
    blend = None
    if options.get("blend"):
        blend = LocalBlend(list(options["blend"][0]), list(options["blend"][1]), threshold=options["blend_threshold"],
                           resolution=options.get("blend_res"))
    return dict(
        edit=options["mode"],
        cross_replace_steps=cross,
        self_replace_steps=_window_arg(options["self_steps"]),
        equalizer=dict(options["reweight"]) or None,
        local_blend=blend,
        num_inference_steps=options["steps"],
        guidance_scale=options["guidance"],
    )


def options_to_argv(command: str, options: Mapping) -> list[str]:
    """A ``p2p`` command line that runs ``options`` again (non-default options only)."""
    argv = [PROG, command, options["prompt"]]
    for target in options.get("to") or []:
        argv += ["--to", target]

    def window(w) -> str:
        return ":".join(f"{v:g}" for v in w) if isinstance(w, list) else f"{w:g}"

    for key, value in options.items():
        if key in ("prompt", "to") or value is None or value == DEFAULTS.get(key) or key not in FLAGS:
            continue
        if key in BLEND_SETTINGS and not options.get("blend"):
            continue
        flag = FLAGS[key]
        if key in ("cross_steps", "self_steps"):
            argv += [flag, window(value)]
        elif key == "sweep":
            argv += [flag, ",".join(window(v) for v in value)]
        elif key == "cross_steps_word":
            argv += [flag, *[f"{w}={window(v)}" for w, v in value.items()]]
        elif key == "reweight":
            argv += [flag, *[f"{w}={v:g}" for w, v in value.items()]]
        elif key == "blend":
            argv += [flag, ",".join(value[0]), ",".join(value[1])]
        elif key == "invert" and options.get("image") is None:
            continue
        else:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return argv


# ============================================================================ metadata


def model_label(model: str | None) -> str:
    return "bundled shapes model" if model is None else model


def image_metadata(command: str, options: Mapping, env: Mapping, role: str, index: int, count: int, file: str, prompt: str | None, **extra) -> dict:
    """The JSON stored in each PNG: everything needed to make it again (with a photo, its SHA-256).

    ``env`` holds what the options do not: ``device`` and ``family`` (the model family, ``"sd"`` or
    ``"sdxl"``, stored as ``model_family``)."""
    meta = {
        "software": f"prompt2prompt {__version__}",
        "version": __version__,
        "command": command,
        "options": dict(options),
        "model": model_label(options.get("model")),
        "model_family": env.get("family"),
        "device": env.get("device"),
        "dtype": options.get("dtype"),
        "image": {"role": role, "index": index, "count": count, "file": file, "prompt": prompt},
    }
    photo = options.get("image")
    if photo and Path(photo).is_file():  # so that a rerun can tell when the photo has changed since
        meta["photo_sha256"] = file_sha256(photo)
    meta.update(extra)
    return meta


def rerun_command(meta: Mapping) -> str:
    options = meta.get("options") or {}
    command = meta.get("command", "edit")
    if command == "sweep" and "sweep" not in options:
        command = "edit"
    if command == "edit" and not options.get("to"):
        command = "generate"
    return shlex.join(options_to_argv(command, options))


def parameters_text(meta: Mapping) -> str:
    """The human-readable parameters of an image (PNG chunk ``parameters`` and ``p2p info``)."""
    options = meta.get("options") or {}
    lines = []
    image = meta.get("image") or {}
    if image:
        lines.append(f"image: {image.get('role')} ({image.get('index', 0) + 1} of {image.get('count')}), {image.get('file')}")
        if image.get("prompt"):
            lines.append(f"its prompt: {image['prompt']}")
    lines.append(f"command: {PROG} {meta.get('command')}")
    lines.append(f"prompt: {options.get('prompt')}")
    for target in options.get("to") or []:
        lines.append(f"to: {target}")
    if meta.get("edit_mode"):
        lines.append(f"edit mode: {meta['edit_mode']}" + (" (chosen by auto)" if options.get("mode") == "auto" else ""))
    order = [k for k in (*EDIT_KEYS, "sweep", "top_k", "res") if k in options] + [k for k in options if k not in FLAGS]
    for key in order:
        value = options[key]
        if key in ("prompt", "to", "model", "dtype") or value is None or value == {} or key in BLEND_SETTINGS and not options.get("blend"):
            continue
        label = {"image": "photo"}.get(key, key.replace("_", " "))
        lines.append(f"{label}: {json.dumps(value) if isinstance(value, (list, dict)) else value}")
    family = f" ({meta['model_family']})" if meta.get("model_family") else ""  # images made before it was recorded have none
    lines.append(f"model: {meta.get('model')}{family}, {meta.get('dtype')} on {meta.get('device')}")
    lines.append(f"made by: {meta.get('software')}")
    lines.append(f"rerun: {rerun_command(meta)}")
    return "\n".join(lines)


def stored_parameters_text(meta: Mapping, path: str, name: str) -> str:
    """`parameters_text` of metadata read from a file, which may hold anything: values of the wrong
    type (a hostile or damaged file) give an `OptionError` naming the file, not a crash.

    Raises:
        OptionError: the stored parameters cannot be shown as text.
    """
    try:
        return parameters_text(meta)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as err:
        raise OptionError(f"{name} {path}: its stored parameters are damaged or were not written by {PROG} ({one_line(err)}); "
                          f"{PROG} info --json {shlex.quote(str(path))} prints them as they are stored") from None


def read_stored_options(path: str, name: str) -> dict:
    """The options stored in a PNG written by ``p2p`` (for ``--from``)."""
    meta = read_stored_metadata(path, name)
    if not isinstance(meta.get("options"), dict):
        raise OptionError(f"{name} {path}: its parameters were not written by the p2p command line ({meta.get('source', 'unknown writer')}), "
                         f"so they cannot be rerun; give a PNG written by {PROG} edit, sweep or batch")
    return meta["options"]


def read_stored_metadata(path: str, name: str) -> dict:
    file = user_path(path, name)
    if not file.is_file():
        raise OptionError(f"{name} {path}: no such file; give a PNG written by {PROG}")
    try:
        meta = read_png_metadata(file)
    except (OSError, ValueError) as err:
        raise OptionError(f"{name} {path}: cannot read it as a PNG written by {PROG} ({one_line(err)})") from None
    if meta is None:
        raise OptionError(f"{name} {path}: this image carries no prompt2prompt parameters; give a PNG written by {PROG}")
    return meta


# ============================================================================ file names


def slugify(text: str, length: int = 40) -> str:
    """A short ASCII file-name form of a prompt: ``"a Red circle!"`` -> ``"a-red-circle"``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > length:
        cut = slug[: length + 1]
        slug = cut[: cut.rfind("-")] if "-" in cut else slug[:length]  # at a word boundary when there is one
    return slug.strip("-") or "p2p"

