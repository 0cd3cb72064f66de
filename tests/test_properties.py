"""Property tests over the public API with generated, often hostile, input (issue 32).

Each target takes generated values and must either work or raise `ValueError` (the library's
`ArgumentError` and the options' `OptionError` are subclasses): never another exception type,
never a hang (`_generated.time_limit`), and what it accepts must give finite numbers. The number of
examples comes from the hypothesis profile (tests/conftest.py: "ci" by default, "full" with
``--slow``); `_generated.TRIED` counts them per target (docs/reliability.md has the full run's counts).
"""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _generated import AWKWARD, WORDS, any_float, any_junk, examples, fractions, junk, mostly, prompts, record_counts, time_limit, tried, windows  # noqa: F401
from prompt2prompt import LocalBlend
from prompt2prompt.alignment import (
    positions_in_each,
    refinement_mapper,
    replacement_mapper,
    split_words,
    tokenize_words,
)
from prompt2prompt.arguments import MODES
from prompt2prompt.edits import EditMode

SRC = "a cat riding a bicycle"
TGT = "a dog riding a bicycle"
FIXTURES = [HealthCheck.function_scoped_fixture]


def _finite(images) -> bool:
    """Whether a pipeline output's images (numpy, ``output_type="np"``) are all finite."""
    return bool(np.isfinite(np.asarray(images)).all())


def call_or_value_error(target: str, function, *args, **kwargs):
    """``function(*args, **kwargs)`` under the time limit: its result, or None when it raised a
    `ValueError`; any other exception fails the test (hypothesis shrinks it and reports it)."""
    try:
        with time_limit():
            result = function(*args, **kwargs)
    except ValueError as err:
        assert str(err).strip(), f"{target}: a ValueError without a message"
        tried(target, False)
        return None
    tried(target, True)
    return result


def run_pipe(target: str, pipe, *args, finite: bool = True, **kwargs):
    """One pipeline call (1 or 2 steps, numpy output); with ``finite``, an accepted call's images must be
    finite: settings whose arithmetic overflows (guidance 1e300) must raise `NonFiniteError`, a `ValueError`."""
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("return_attention", False)
    out = call_or_value_error(target, pipe, *args, **kwargs)
    if out is not None and finite:
        assert _finite(out.images), f"{target}: non-finite pixels from an accepted call"
    return out


# ------------------------------------------------------------------------------ the pipeline


@settings(examples(0.5), suppress_health_check=FIXTURES)
@given(prompt=prompts, targets=st.lists(prompts, min_size=0, max_size=2), mode=st.one_of(st.sampled_from(MODES), any_junk),
       truncate=st.booleans(), steps=st.integers(1, 2))
@example(prompt="\x00", targets=["\x00"], mode="auto", truncate=False, steps=1)
@example(prompt=" ".join(["cat"] * 90), targets=["dog " * 90], mode="refine", truncate=True, steps=1)
def test_pipeline_prompts(pipe, prompt, targets, mode, truncate, steps):
    run_pipe("pipeline: prompts", pipe, prompt, targets or None, edit=mode, truncate_prompts=truncate, num_inference_steps=steps)


per_word = st.dictionaries(st.one_of(st.sampled_from(["default_", *WORDS]), st.text(max_size=6)), windows, max_size=3)
equalizers = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(WORDS), st.text(max_size=6), st.integers(-3, 8)),
                    st.one_of(any_float, st.lists(any_float, max_size=3), any_junk), max_size=3),
    junk,
)
word_lists = mostly(st.one_of(st.sampled_from(WORDS), st.lists(st.sampled_from(WORDS), min_size=1, max_size=3)),
                    st.one_of(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=5)), max_size=3), any_junk))


@st.composite
def local_blends(draw):
    """A `LocalBlend` of generated settings, the error its constructor raised, or junk."""
    kind = draw(st.sampled_from(["blend", "blend", "junk"]))
    if kind == "junk":
        return draw(any_junk)
    try:
        return LocalBlend(draw(mostly(st.sampled_from(["bicycle", "cat"]), word_lists)), draw(mostly(st.sampled_from(["dog", "bicycle"]), word_lists)),
                          threshold=draw(mostly(st.floats(0, 1), st.one_of(fractions, st.tuples(fractions, fractions), any_junk))),
                          start=draw(mostly(st.floats(0, 1), fractions)), subtract_words=draw(st.one_of(st.none(), word_lists)),
                          resolution=draw(mostly(st.sampled_from([None, 8, 16]), st.one_of(st.integers(-2, 40), any_junk))))
    except ValueError:
        return None


@settings(examples(0.5), suppress_health_check=FIXTURES)
@given(targets=st.lists(st.sampled_from([TGT, "a dog riding a red bicycle", "a cat riding", SRC]), min_size=1, max_size=2),
       mode=st.sampled_from(MODES), cross=mostly(st.floats(0, 1), st.one_of(windows, per_word)), self_=mostly(st.floats(0, 1), windows),
       equalizer=st.one_of(st.none(), st.dictionaries(st.sampled_from(["dog", "bicycle", "riding"]), st.floats(-10, 10), min_size=1), equalizers),
       blend=st.one_of(st.none(), local_blends()), self_max_res=mostly(st.sampled_from([None, 0, 8, 16]), st.one_of(st.integers(-1, 20), any_junk)),
       guidance=mostly(st.floats(-20, 20), any_float), eta=mostly(st.floats(0, 2), any_float), steps=st.integers(1, 2))
@example(targets=[TGT], mode="replace", cross={"dog": (0.0, 1.0)}, self_=[0.2], equalizer={"dog": 1e308}, blend=None, self_max_res=None,
         guidance=7.5, eta=0.0, steps=1)  # was a RuntimeError (the factor overflowed float32); now a ValueError
@example(targets=[TGT], mode="replace", cross=1.0, self_=0.5, equalizer=None, blend=None, self_max_res=None, guidance=1e308, eta=0.0, steps=1)
def test_pipeline_edit_settings(pipe, targets, mode, cross, self_, equalizer, blend, self_max_res, guidance, eta, steps):
    run_pipe("pipeline: edit settings", pipe, SRC, targets, edit=mode, cross_replace_steps=cross, self_replace_steps=self_,
             equalizer=equalizer, local_blend=blend, self_replace_max_res=self_max_res, guidance_scale=guidance, eta=eta,
             num_inference_steps=steps)


DTYPES = [np.uint8, np.uint16, np.int64, np.float16, np.float32, np.float64, np.bool_]


@st.composite
def image_arrays(draw):
    """A numpy array or tensor of a generated dtype, shape (0 to 4 dimensions, sides 0 to 40) and
    values (from an image's range, far outside it, or NaN)."""
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=4)))
    if draw(st.integers(0, 3)):  # an image's layouts, more often than chance would give them
        h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
        shape = draw(st.sampled_from([(h, w), (h, w, 1), (h, w, 3), (h, w, 4), (3, h, w), (1, 3, h, w), (h, w, 2)]))
    dtype = draw(mostly(st.sampled_from([np.uint8, np.float32]), st.sampled_from(DTYPES)))
    values = draw(mostly(st.just("image"), st.sampled_from(["unit", "wild", "nan"])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if values == "image":
        array = rng.integers(0, 256, shape) if np.issubdtype(dtype, np.integer) else rng.random(shape)
    elif values == "unit":
        array = rng.random(shape)
    else:
        array = rng.normal(0, 1e6, shape)
        if values == "nan" and array.size:
            array.flat[rng.integers(0, array.size)] = np.nan
    with np.errstate(invalid="ignore", over="ignore"):
        array = np.asarray(array).astype(dtype)
    return torch.from_numpy(array.astype(np.float32)) if draw(st.booleans()) and dtype != np.bool_ else array


@settings(examples(0.5), suppress_health_check=FIXTURES)
@given(image=image_arrays(), size=mostly(st.sampled_from([None, 16, 32, 48]), st.one_of(st.integers(-4, 48), any_junk)),
       method=mostly(st.sampled_from(["ddim", "direct", "null-text"]), st.sampled_from(["junk", "DDIM", ""])),
       steps=st.integers(1, 2))
@example(image=np.zeros((0, 5, 3), np.float32), size=None, method="ddim", steps=1)
@example(image=np.zeros((7, 1), np.uint8), size=2, method="ddim", steps=1)
def test_pipeline_image_inputs(pipe, image, size, method, steps):
    inversion = call_or_value_error("pipeline: inversion input", pipe.invert, image, SRC, method=method, num_inference_steps=steps,
                                    height=size, width=size, num_inner_steps=1)
    if inversion is None:
        return
    assert torch.isfinite(inversion.latent).all(), "an accepted inversion has a non-finite latent"
    run_pipe("pipeline: inversion input", pipe, SRC, [TGT], inversion=inversion, cross_replace_steps=1.0)


# ------------------------------------------------------------------------------ edit settings and alignment


@given(source=word_lists, target=word_lists,
       threshold=mostly(st.one_of(st.floats(0, 1), st.tuples(st.floats(0, 1), st.floats(0, 1))),
                        st.one_of(fractions, st.tuples(fractions, fractions), st.lists(fractions, max_size=3), any_junk)),
       start=mostly(st.floats(0, 1), st.one_of(fractions, any_junk)), subtract=st.one_of(st.none(), word_lists),
       resolution=mostly(st.one_of(st.none(), st.integers(1, 100)), st.one_of(st.integers(-3, 0), any_junk)))
@example(source="cat", target="dog", threshold=(math.nan, 0.1), start=0.2, subtract=None, resolution=None)
def test_local_blend_constructor(source, target, threshold, start, subtract, resolution):
    blend = call_or_value_error("LocalBlend(...)", LocalBlend, source, target, threshold=threshold, start=start,
                                subtract_words=subtract, resolution=resolution)
    if blend is not None:  # what it keeps is what the plan relies on
        assert all(0 <= t <= 1 for t in blend.threshold) and len(blend.threshold) == 2
        assert 0 <= blend.start <= 1
        assert blend.source_words and all(isinstance(w, str) and w.strip() for w in blend.source_words)
        assert blend.resolution is None or blend.resolution >= 1


@given(value=st.one_of(st.sampled_from(MODES), st.sampled_from([m.upper() for m in MODES]), any_junk, st.sampled_from(list(EditMode))))
def test_edit_mode_parse(value):
    mode = call_or_value_error("EditMode.parse", EditMode.parse, value)
    assert mode is None or isinstance(mode, EditMode)


@settings(suppress_health_check=FIXTURES)
@given(source=prompts, target=prompts, word=st.one_of(st.sampled_from(WORDS), st.sampled_from(AWKWARD), st.text(max_size=8),
                                                     st.integers(-100, 100)), truncate=st.booleans())
@example(source="a cat", target="a cat", word="", truncate=False)
@example(source="a cat", target="a cat", word=True, truncate=False)
def test_alignment_functions(clip_tokenizer, source, target, word, truncate):
    assert all(isinstance(w, str) and w and not w.isspace() for w in split_words(source))
    tokens = call_or_value_error("alignment: tokenize_words", tokenize_words, source, clip_tokenizer, truncate)
    other = call_or_value_error("alignment: tokenize_words", tokenize_words, target, clip_tokenizer, truncate)
    for t in (tokens, other):
        if t is not None:
            assert len(t.ids) <= t.max_length and all(0 <= p < t.max_length for ps in t.word_positions for p in ps)
    if tokens is None or other is None:
        return
    positions = call_or_value_error("alignment: positions", tokens.positions, word)
    assert positions is None or all(0 <= p < tokens.max_length for p in positions)
    found = call_or_value_error("alignment: positions_in_each", positions_in_each, [tokens, other], word, "equalizer")
    assert found is None or len(found) == 2
    mapper = call_or_value_error("alignment: replacement_mapper", replacement_mapper, tokens, other)
    if mapper is not None:
        assert mapper.shape == (tokens.max_length, tokens.max_length) and torch.isfinite(mapper).all()
    refined = call_or_value_error("alignment: refinement_mapper", refinement_mapper, tokens, other)
    if refined is not None:
        index, alphas = refined
        assert index.shape == alphas.shape == (tokens.max_length,)
        assert bool(((index >= 0) & (index < tokens.max_length)).all())


# ------------------------------------------------------------------------------ the command line and the line parsers


class StopBeforeModel(Exception):
    """Raised where the command would load the model: the random command line passed every check."""


#: Each command's flags; a flag's value comes from `flag_values`.
CLI_FLAGS = {
    "generate": ["--seed", "--steps", "--guidance", "-o", "--model", "--device", "--dtype", "--quiet"],
    "edit": ["--to", "--mode", "--cross-steps", "--cross-steps-word", "--self-steps", "--blend", "--blend-threshold", "--blend-res",
             "--reweight", "--seed", "--steps", "--guidance", "--image", "--invert", "--from", "--no-reuse", "--source-limit", "-o", "--dtype"],
    "attention": ["--top-k", "--res", "--seed", "--steps", "--model", "--dtype"],
    "sweep": ["--to", "--cross-steps", "--self-steps", "--seed", "--steps", "--mode"],
    "batch": ["--workers", "--seed", "--steps", "--guidance", "-o", "--model", "--device", "--dtype"],
    "dataset": ["-o", "--samples-per-pair", "--keep", "--seed", "--steps", "--self-steps", "--cross-steps", "--guidance", "--min-score", "--workers"],
    "serve": ["--host", "--port", "--output-dir", "--source-limit", "--model", "--device", "--dtype"],
    "info": ["--json"],
    "bogus": ["--nope"],
}
flag_values = st.one_of(prompts, st.sampled_from(["0", "1", "-1", "0.5", "1.5", "nan", "inf", "-inf", "1e400", "2:1", "0.2:0.8", ":", "cat=2",
                                                  "cat=0.1:0.9", "=", "cat=", "float16", "cuda", "cuda:9", "mps", "cpu", "null-text",
                                                  "9" * 30, "-", "--", "./nowhere", "127.0.0.1", "::1", "99999", "LINES", "PAIRS", "PNG"]),
                        st.text(max_size=10))


@st.composite
def argvs(draw):
    """A random ``p2p`` command line: a command (or none), a positional, and flags with random values."""
    command = draw(st.sampled_from([*CLI_FLAGS, None]))
    argv = [] if command is None else [command]
    if draw(st.booleans()):
        argv.append(draw(flag_values))
    for _ in range(draw(st.integers(0, 5))):
        flag = draw(st.sampled_from(CLI_FLAGS.get(command) or ["--version", "--steps"]))
        argv.append(flag)
        argv.extend(draw(flag_values) for _ in range(draw(st.integers(0, 2))))
    return argv


def _stop(*args, **kwargs):
    raise StopBeforeModel("the checks passed; the test stops where the model would load")


@pytest.fixture
def cli_sandbox(tmp_path, monkeypatch, clip_tokenizer):
    """A working folder with a batch file, a pairs file and a PNG, and every model load (and server,
    worker pool and dataset run) replaced by `StopBeforeModel`: the random command lines run every
    check of their arguments but nothing heavy. Returns the names that `flag_values` may give."""
    import PIL.Image

    from prompt2prompt import cli, dataset, imageio, web

    monkeypatch.chdir(tmp_path)
    for module, name in ((cli, "load_pipeline"), (cli, "_run_parallel"), (web, "serve"), (dataset, "make_dataset")):
        monkeypatch.setattr(module, name, _stop)
    (tmp_path / "LINES").write_text('{"prompt": "a cat", "to": ["a dog"]}\n{"prompt": ""}\nnot json\n')
    (tmp_path / "PAIRS").write_text('{"input": "a cat", "output": "a dog"}\n[1]\n')
    meta = {"command": "edit", "options": {"prompt": "a cat $(touch pwned)", "to": ["a dog; touch pwned"]}}
    imageio.save_png(tmp_path / "PNG", PIL.Image.new("RGB", (4, 4)), meta, "a cat")
    return tmp_path


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``p2p`` in this process: ``(exit status, stdout, stderr)``."""
    from prompt2prompt import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), time_limit():
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@settings(suppress_health_check=FIXTURES)
@given(argv=argvs())
@example(argv=["edit", "a cat", "--to", "a dog", "--from", "PNG"])
@example(argv=["info", "PNG"])
@example(argv=["edit", "--from", "a" * 300])  # was OSError (file name too long), exit 1 with "--debug shows the traceback"
@example(argv=["info", "a\x00b"])  # was ValueError (embedded null byte)
@example(argv=["batch", "~nosuchuser/lines.jsonl"])  # was RuntimeError (no home folder for ~nosuchuser)
def test_cli_random_argv(cli_sandbox, argv):
    code, out, err = run_cli(argv)
    stopped = "StopBeforeModel" in err
    tried("cli: argv", code == 0 or stopped)
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in out + err
    if code == 2:
        assert err.strip() and "\n" not in err.strip(), f"a usage error must be one line: {err!r}"
    if code == 1 and not stopped:  # a runtime failure is one line too, and never an unexpected exception type
        assert "--debug shows the traceback" not in err, f"an unexpected exception: {err!r}"
        assert err.strip().count("\n") == 0 or argv[:1] in (["batch"], ["dataset"]), err
    assert not (cli_sandbox / "pwned").exists()


@settings(suppress_health_check=FIXTURES)
@given(lines=st.lists(mostly(
    st.fixed_dictionaries({"prompt": st.sampled_from([SRC, "a red circle"]), "to": st.sampled_from([[TGT], [TGT, "a red square"], TGT])},
                          optional={k: v for k, v in {"cross_steps": windows, "self_steps": windows, "reweight": st.dictionaries(st.sampled_from(WORDS), any_float, max_size=2),
                                                      "seed": st.one_of(st.integers(-1, 2**64), any_float, junk), "steps": st.one_of(st.integers(-1, 100), any_float, junk),
                                                      "blend": st.lists(st.text(max_size=8), max_size=3), "mode": st.one_of(st.sampled_from(MODES), junk)}.items()}),
    st.one_of(st.dictionaries(st.sampled_from(["prompt", "to", "mode", "cross_steps", "cross_steps_word", "self_steps", "reweight", "blend",
                                     "blend_threshold", "blend_res", "seed", "steps", "guidance", "image", "invert", "model", "x"]),
                    st.one_of(prompts, st.lists(prompts, max_size=2), windows, junk, any_float,
                              st.dictionaries(st.sampled_from(WORDS), st.one_of(any_float, windows), max_size=2)), max_size=6),
    st.recursive(junk, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)), max_leaves=8),
)), min_size=1, max_size=4), raw=st.lists(st.text(max_size=30), max_size=2))
@example(lines=[{"prompt": "a cat", "to": ["a dog"], "seed": 1e400}], raw=[])
def test_batch_line_parser(tmp_path_factory, lines, raw):
    from prompt2prompt.cli import parse_batch_file
    from prompt2prompt.options import DEFAULTS

    path = tmp_path_factory.mktemp("batch") / "lines.jsonl"
    text = [json.dumps(line, allow_nan=True) for line in lines] + [r.replace("\n", " ").replace("\r", " ") for r in raw]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    with time_limit():
        jobs, bad = parse_batch_file(path, {"seed": None, "steps": None, "guidance": None})
    for number, options in jobs:
        tried("batch line", True)
        assert set(options) >= {"prompt", "to"} and isinstance(options["prompt"], str) and options["prompt"].strip()
        json.dumps(options, allow_nan=False)  # what result.json stores must be strict JSON
    for number, reason in bad:
        tried("batch line", False)
        assert reason.strip() and "\n" not in reason
    data_lines = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip() and not t.lstrip().startswith("#")]
    assert len(jobs) + len(bad) == len(data_lines)
    assert set(DEFAULTS) >= {"seed", "steps"}


@given(text=mostly(
    st.fixed_dictionaries({"input": prompts, "output": prompts}, optional={"edit": st.one_of(prompts, junk)}).map(json.dumps),
    st.one_of(
    st.dictionaries(st.sampled_from(["input", "output", "edit", "x"]), st.one_of(prompts, junk, any_float), max_size=4).map(lambda d: json.dumps(d, allow_nan=True)),
    st.text(max_size=60),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
)))
@example(text="[" * 100000)
def test_dataset_line_parser(text):
    from prompt2prompt.dataset import parse_line

    pair = call_or_value_error("dataset line", parse_line, 1, text)
    if pair is not None:
        assert pair.input.strip() and pair.output.strip() and (pair.edit is None or isinstance(pair.edit, str))
