"""One source of truth for the arguments (`prompt2prompt.arguments`).

(a) Every default the pipeline, the command line, batch files and the web page use is the table's.
(b) Every argument error of the library carries its argument, which the command line maps to a flag
    and the web page to a field through the table, never through the message's text.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
from pathlib import Path

import pytest
from test_bad_input import CASES, SRC

from prompt2prompt import LocalBlend, Prompt2PromptPipeline, cli, options, web
from prompt2prompt.arguments import ARGUMENTS, OPTIONS, ArgumentError, default, fraction, integer, number, option_default, window
from prompt2prompt.edits import EditMode, build_edit_plan
from prompt2prompt.inversion import InversionMethod
from prompt2prompt.visualisation import self_attention_components

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prompt2prompt"
#: The names the library's errors carry (the pipeline's, `invert`'s and LocalBlend's arguments).
LIBRARY_NAMES = (
    "prompt", "edit_prompts", "edit", "cross_replace_steps", "self_replace_steps", "self_replace_max_res", "equalizer",
    "local_blend", "local_blend.resolution", "local_blend.threshold", "num_inference_steps", "guidance_scale", "height",
    "width", "negative_prompt", "latents", "eta", "output_type", "attention_res", "inversion", "image", "method",
    "num_inner_steps", "early_stop_epsilon", "generator", "return_self_attention", "truncate_prompts", "top_k",
)
#: Library arguments no flag of the command line sets: their errors are printed without a flag.
NO_FLAG = {
    "self_replace_max_res", "local_blend.start", "height", "width", "negative_prompt", "latents", "eta", "output_type",
    "return_dict", "return_attention", "cross_attention_kwargs", "return_self_attention", "truncate_prompts",
    "num_inner_steps", "early_stop_epsilon", "cuda_graph",
    "prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size", "guidance_rescale",
    "source", "keep_source", "source_device",
}
#: Arguments the web page does not set: their errors go to its ``general`` slot.
NO_FIELD = {
    "height", "width", "negative_prompt", "latents", "output_type", "return_dict", "return_attention",
    "cross_attention_kwargs", "return_self_attention", "truncate_prompts", "attention_res", "top_k", "cuda_graph",
    "sweep", "model", "dtype",
    "prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size", "guidance_rescale",
    "source", "keep_source", "source_device",
}


# --------------------------------------------------------------------------- the table


def test_the_table_names_every_argument_the_library_reports():
    assert set(LIBRARY_NAMES) <= set(ARGUMENTS)
    assert all(row.library for name, row in ARGUMENTS.items() if name in LIBRARY_NAMES)


def test_the_table_is_consistent_with_the_command_line_and_the_page():
    flags = {"PROMPT"} | {s for p in _subparsers().values() for a in p._actions for s in a.option_strings}
    for name, row in ARGUMENTS.items():
        assert row.field is None or row.field in web.FIELDS, name
        assert row.flag is None or row.flag in flags, name
        assert (row.flag is None) == (name in NO_FLAG), name
        assert (row.field is None) == (name in NO_FIELD), name
        assert row.kind in (None, "integer", "number", "fraction", "window", "choice"), name
        assert (row.kind == "choice") == bool(row.choices), name
        if row.kind == "integer":
            assert row.what and row.minimum is not None, name
        if row.slider is not None:
            low, high, step = row.slider
            assert low <= row.default <= high and step > 0, name
            assert row.minimum is None or row.minimum <= low, name
    assert set(OPTIONS) == set(options.NORMALISERS) == set(options.DEFAULTS) == set(options.FLAGS)
    assert ARGUMENTS["edit"].choices == tuple(m.value for m in EditMode)
    assert set(ARGUMENTS["method"].choices) == {m.value for m in InversionMethod}


def test_default_returns_a_fresh_copy():
    sweep = default("sweep")
    sweep.append(2.0)
    assert default("sweep") == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    option_default("reweight")["x"] = 1.0
    assert options.DEFAULTS["reweight"] == {} and option_default("reweight") == {}


# --------------------------------------------------------------------------- (a) the defaults


#: Signature defaults of None that the call resolves from the table (or from an inversion).
RESOLVED_FROM_TABLE = {"num_inference_steps", "guidance_scale"}


@pytest.mark.parametrize("method", ["__call__", "invert"])
def test_pipeline_signature_defaults_are_the_tables(method):
    parameters = list(inspect.signature(getattr(Prompt2PromptPipeline, method)).parameters.values())[1:]  # less self
    for parameter in parameters:
        assert parameter.name in ARGUMENTS, f"{method}({parameter.name}) has no row in arguments.ARGUMENTS"
        row = ARGUMENTS[parameter.name]
        if parameter.default is inspect.Parameter.empty:  # required: no default anywhere
            assert row.default is None, parameter.name
        elif parameter.default is None and parameter.name in RESOLVED_FROM_TABLE:
            continue
        else:
            assert parameter.default == row.default, parameter.name


def test_library_defaults_are_the_tables():
    blend = {f.name: f.default for f in dataclasses.fields(LocalBlend)}
    assert blend["threshold"] == default("local_blend.threshold") and blend["start"] == default("local_blend.start")
    assert blend["resolution"] == default("local_blend.resolution")
    plan = inspect.signature(build_edit_plan).parameters
    assert plan["cross_replace_steps"].default == default("cross_replace_steps")
    assert plan["self_replace_steps"].default == default("self_replace_steps")
    assert inspect.signature(self_attention_components).parameters["k"].default == default("top_k")


def _subparsers() -> dict:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    return dict(commands.choices)


@pytest.mark.parametrize("argv, keys", [
    (["generate", SRC], options.GENERATE_KEYS),
    (["edit", SRC, "--to", SRC], options.EDIT_KEYS),
    (["attention", SRC], options.ATTENTION_KEYS),
    (["sweep", SRC, "--to", SRC], options.SWEEP_KEYS),
])
def test_command_line_defaults_are_the_tables(argv, keys):
    """The parser sets nothing (None: not given, so --from and batch defaults can tell), and the
    options it leads to carry the table's defaults."""
    args = cli.build_parser().parse_args(argv)
    raw = cli._raw(args, keys)
    if argv[0] == "sweep":
        raw["sweep"] = args.cross_steps
    assert all(raw[k] is None for k in keys if k not in ("prompt", "to"))
    got = options.normalise_options(raw, keys, required=("prompt", "to") if "to" in keys else ("prompt",))
    assert {k: v for k, v in got.items() if k not in ("prompt", "to")} == {k: option_default(k) for k in keys if k not in ("prompt", "to")}


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_command_line_help_shows_the_tables_defaults():
    checked = set()
    for command, parser in _subparsers().items():
        for action in parser._actions:
            key = "sweep" if command == "sweep" and action.dest == "cross_steps" else action.dest
            said = re.search(r"\(default ([^;:)]+)", action.help or "")
            if key not in OPTIONS or not said:
                continue
            expected = ARGUMENTS["method"].default if key == "invert" else option_default(key)  # --invert: with --image
            assert said.group(1) == _shown(expected), (command, action.dest, action.help)
            checked.add(key)
    assert checked == {"seed", "steps", "guidance", "dtype", "mode", "cross_steps", "self_steps", "blend_threshold", "invert",
                       "top_k", "sweep"}


def test_batch_lines_get_the_tables_defaults(tmp_path):
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text('{"prompt": "a red circle", "to": "a red square"}\n')
    ((_, got),), bad = cli.parse_batch_file(jsonl, {"seed": None, "steps": None, "guidance": None})
    assert bad == [] and all(got[k] == option_default(k) for k in options.EDIT_KEYS if k not in ("prompt", "to"))


def test_web_request_defaults_are_the_tables():
    defaults = {f.name: f.default for f in dataclasses.fields(web.EditRequest) if f.default is not dataclasses.MISSING}
    assert defaults == {
        "mode": default("edit"), "cross_replace_steps": default("cross_replace_steps"),
        "self_replace_steps": default("self_replace_steps"), "blend_threshold": default("local_blend.threshold"),
        "blend_res": default("local_blend.resolution"), "seed": option_default("seed"),
        "num_inference_steps": default("num_inference_steps"), "guidance_scale": default("guidance_scale"),
        "image": default("image"), "inversion_method": default("method"),
    }


def test_web_page_fields_show_the_tables_defaults_and_ranges():
    pytest.importorskip("gradio")
    demo = web.build_app(web.Editor(object(), "unused"))
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    for elem_id, name in (("cross", "cross_replace_steps"), ("self", "self_replace_steps"), ("blend-threshold", "local_blend.threshold"),
                          ("steps", "num_inference_steps"), ("guidance", "guidance_scale")):
        slider, row = blocks[elem_id], ARGUMENTS[name]
        assert (slider.minimum, slider.maximum, slider.step) == row.slider and slider.value == row.default, elem_id
        assert slider.label.startswith(row.label), elem_id
    assert blocks["seed"].value == option_default("seed")
    assert blocks["mode"].value == default("edit")
    assert blocks["inversion"].value == default("method")
    assert [c[1] for c in blocks["inversion"].choices] == list(ARGUMENTS["method"].choices)
    assert blocks["blend-res"].value == web.DEFAULT_SIDE


def test_no_default_is_written_outside_the_table():
    """Function and dataclass defaults in the modules that read the table are never a literal copy
    of one of its numeric defaults (0, 1, None, True and False are too common to tell)."""
    table = {row.default for row in ARGUMENTS.values() if isinstance(row.default, (int, float)) and not isinstance(row.default, bool)}
    table -= {0, 1}
    found = []
    for module in ("options", "cli", "web", "edits", "schedules", "alignment", "visualisation"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for node in ast.walk(tree):
            values = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                values = [*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None]]
            elif isinstance(node, ast.ClassDef):
                values = [s.value for s in node.body if isinstance(s, ast.AnnAssign) and s.value is not None]
            for value in values:
                if isinstance(value, ast.Constant) and not isinstance(value.value, bool) and value.value in table:
                    found.append(f"{module}.py:{value.lineno}: {value.value!r}")
    assert found == []


# --------------------------------------------------------------------------- the shared checks


def test_the_shared_checks_carry_their_argument():
    cases = [
        (lambda: number("x", "guidance_scale", "--guidance"), "--guidance must be a finite number, got 'x'"),
        (lambda: number(math.inf, "guidance_scale", "guidance_scale", text=False), "guidance_scale must be a finite number, got inf"),
        (lambda: number("2", "equalizer", "equalizer['a']", text=False), "equalizer['a'] must be a finite number, got '2'"),
        (lambda: fraction("1.5", "local_blend.threshold", "--blend-threshold"), "--blend-threshold must be a number in [0, 1], got 1.5"),
        (lambda: integer(1.5, "generator", "Seed", "a non-negative integer"), "Seed must be a non-negative integer, got 1.5"),
        (lambda: integer(2**63, "generator", "Seed", "a non-negative integer"),
         "Seed must be a non-negative integer up to 9223372036854775807, got 9223372036854775808"),
        (lambda: integer(8.0, "local_blend.resolution", "LocalBlend resolution", "a positive integer", 1, text=False),
         "LocalBlend resolution must be a positive integer, got 8.0"),
        (lambda: window("0.8:0.2", "cross_replace_steps", "--cross-steps"),
         "--cross-steps has start 0.8 after end 0.2; give START:END with START <= END, e.g. 0.2:0.8"),
        (lambda: window((0.8, 0.2), "self_replace_steps", "self_replace_steps", text=False),
         "self_replace_steps has start 0.8 after end 0.2; give (start, end) with start <= end, e.g. (0.2, 0.8)"),
        (lambda: window("0.5", "self_replace_steps", "self_replace_steps", text=False),
         "self_replace_steps must be a fraction of the steps like 0.8, or a (start, end) pair like (0.2, 0.8), got '0.5'"),
    ]
    for check, message in cases:
        with pytest.raises(ArgumentError) as info:
            check()
        assert str(info.value) == message
        assert info.value.argument in ARGUMENTS
    assert window("0.2:0.8", "x", "x") == (0.2, 0.8) and window(0.8, "x", "x", text=False) == (0.0, 0.8)
    assert integer(" 7 ", "x", "x", "n") == 7 and integer(7.0, "x", "x", "n") == 7 and number(" 2.5 ", "x", "x") == 2.5


# --------------------------------------------------------------------------- (b) errors carry their argument


@pytest.mark.parametrize("name", sorted(ARGUMENTS))
def test_every_argument_maps_to_its_flag_and_field(name):
    row = ARGUMENTS[name]
    error = ArgumentError(name, "a message that names other things: --seed, equalizer, prompt, blend")
    expected_flag = row.flag if row.flag is not None and row.flag.startswith("-") else None
    assert cli.library_flag(error) == expected_flag
    assert web.field_of(error) == (row.field or "general")


def test_a_plain_value_error_has_no_flag_and_goes_to_general():
    error = ValueError("equalizer names 'dog', which is in none of the prompts")
    assert cli.library_flag(error) is None and web.field_of(error) == "general"
    with pytest.raises(cli.UsageError, match="^equalizer names 'dog'"):
        cli._call(lambda: (_ for _ in ()).throw(error))


@pytest.mark.parametrize("kwargs", [c[0] for c in CASES], ids=[c[1][:40] for c in CASES])
def test_bad_input_errors_carry_an_argument_with_a_flag_and_a_field(pipe, kwargs):
    """Each of `test_bad_input`'s cases, through the command line's library call: the usage error
    leads with the flag of the argument the library's error carries, and the page knows its field."""
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", SRC)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "latent")
    with pytest.raises(cli.UsageError) as info:
        cli._call(pipe, prompt, **kwargs)
    error = info.value.__cause__
    assert isinstance(error, ArgumentError), f"{type(error).__name__} without an argument: {error}"
    row = ARGUMENTS.get(error.argument)
    assert row is not None and row.library, error.argument
    flag = cli.library_flag(error)
    assert flag is not None or error.argument in NO_FLAG | {"prompt"}, error.argument
    assert str(info.value).startswith(f"{flag}: ") if flag else not str(info.value).startswith("-")
    assert web.field_of(error) == (row.field or "general") and web.field_of(error) in web.FIELDS


# --------------------------------------------------------------------------- the mapping end to end


def test_command_line_prefixes_a_library_error_with_its_flag(capsys, tmp_path, monkeypatch):
    def lacks_the_side(self, *args, **kwargs):
        raise ArgumentError("local_blend.resolution", "LocalBlend resolution 5 is not a cross-attention map side; use one of [4, 8, 16]")

    monkeypatch.setattr(Prompt2PromptPipeline, "__call__", lacks_the_side)
    code = cli.main(["edit", "a red circle on a blue background", "--to", "a red square on a blue background", "--steps", "3",
                     "--blend", "circle", "square", "--blend-res", "5", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "p2p edit: error: --blend-res: LocalBlend resolution 5 is not a cross-attention map side; use one of [4, 8, 16]"]
    assert not (tmp_path / "out").exists()


def test_web_page_shows_a_library_error_beside_its_argument(tmp_path):
    pytest.importorskip("gradio")

    class Refuses:
        device = "cpu"

        def __call__(self, *args, **kwargs):
            # quotes the user's prompt, which names other fields' words: only the argument counts
            raise ArgumentError("prompt", "prompt: the prompt 'a seed of a blend' is 82 tokens long but the text encoder takes at most 77")

        source = __call__  # were the page to run the source's pass alone, it would check the prompt the same way

    demo = web.build_app(web.Editor(Refuses(), tmp_path / "out"))
    (handler,) = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_run"]
    outputs = handler("a seed of a blend", "a seed of a circle", "auto", 0.8, 0.4, "", "", 0.3, [["", ""]], 0, 2, 7.5, None,
                      "null-text", 0, [], None)  # the history, and no kept source pass
    slots = dict(zip(web.FIELDS, outputs[-len(web.FIELDS):]))
    shown = {name: u["value"] for name, u in slots.items() if isinstance(u, dict) and u.get("visible")}
    assert list(shown) == ["prompt"] and "82 tokens long" in shown["prompt"]
