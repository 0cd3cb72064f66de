"""The ``p2p`` command-line tool, end to end on the bundled shapes model (3 steps: fast on CPU).

Most runs call `prompt2prompt.cli.main` in-process (one import of torch for the whole file); a few
run ``python -m prompt2prompt.cli`` in a subprocess where the process boundary is the point: one
line on stderr with no traceback, and a batch killed with SIGKILL then resumed.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from prompt2prompt import Prompt2PromptPipeline, __version__, cli, imageio
from prompt2prompt.cli import main

SRC = "a red circle on a blue background"
TGT = "a red square on a blue background"
FAST = ["--steps", "3"]
REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def subprocess_env() -> dict:
    env = dict(os.environ)
    # transformers prints a one-time notice when `prompt2prompt.pipeline` imports CLIPImageProcessor
    # without torchvision installed; it is not the CLI's output, so keep it out of stderr here.
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def cli_command(*argv) -> list[str]:
    return [sys.executable, "-m", "prompt2prompt.cli", *map(str, argv)]


@pytest.fixture
def no_model(monkeypatch):
    """Fail any test that loads the model: usage errors must be found before any model work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the usage error was found")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


# ============================================================================ help and packaging


def test_help_lists_commands_and_each_command_has_examples(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and err == ""
    for command in ("generate", "edit", "attention", "sweep", "batch", "info", "serve"):
        assert command in out
        code, out_c, _ = run(capsys, command, "--help")
        assert code == 0
        assert "examples:" in out_c or "example" in out_c, command
    code, out, _ = run(capsys, "--version")
    assert code == 0 and __version__ in out


def test_pyproject_declares_the_p2p_script():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["p2p"] == "prompt2prompt.cli:main"


# ============================================================================ usage errors


USAGE_ERRORS = [
    (["edit", SRC, "--to", TGT, "--mode", "sideways"], "--mode"),
    (["edit", SRC, "--to", TGT, "--cross-steps", "1.5"], "--cross-steps"),
    (["edit", SRC, "--to", TGT, "--cross-steps", "0.8:0.2"], "--cross-steps"),
    (["edit", SRC, "--to", TGT, "--cross-steps", "0.2:0.5:0.8"], "--cross-steps"),
    (["edit", SRC, "--to", TGT, "--self-steps", "abc"], "--self-steps"),
    (["edit", SRC, "--to", TGT, "--reweight", "square"], "--reweight"),
    (["edit", SRC, "--to", TGT, "--reweight", "square=x"], "--reweight"),
    (["edit", SRC, "--to", TGT, "--reweight", "banana=2"], "--reweight"),
    (["edit", SRC, "--to", TGT, "--cross-steps-word", "banana=0:0.4"], "--cross-steps-word"),
    (["edit", SRC, "--to", TGT, "--blend", "circle"], "--blend"),
    (["edit", SRC, "--to", TGT, "--blend", "banana", "square"], "--blend"),
    (["edit", SRC, "--to", TGT, "--blend", "circle", "banana"], "--blend"),
    (["edit", SRC, "--to", TGT, "--blend-threshold", "0.5"], "--blend"),
    (["edit", SRC, "--to", TGT, "--blend-res", "8"], "--blend-res needs --blend"),
    (["edit", SRC, "--to", TGT, "--blend", "circle", "square", "--blend-res", "0"], "--blend-res"),
    (["edit", SRC, "--to", TGT, "--blend", "circle", "square", "--blend-res", "eight"], "--blend-res"),
    # two targets, a blend word for only one of them: the other would silently copy the source
    (["edit", SRC, "--to", TGT, "--to", "a red star on a blue background", "--blend", "circle", "square"], "no word of the target prompt 'a red star"),
    (["edit", SRC], "--to"),
    (["edit", SRC, "--to", ""], "--to"),
    (["edit", "--to", TGT], "prompt"),
    (["edit", SRC, "--to", "a red square", "--mode", "replace"], "--mode"),
    (["edit", SRC, "--to", TGT, "--steps", "0"], "--steps"),
    (["edit", SRC, "--to", TGT, "--seed", "-1"], "--seed"),
    (["edit", SRC, "--to", TGT, "--guidance", "nan"], "--guidance"),
    (["edit", SRC, "--to", TGT, "--dtype", "float8"], "--dtype"),
    (["edit", SRC, "--to", TGT, "--device", "tpu"], "--device"),
    (["edit", "--from", "missing.png", "--to", TGT], "--from"),
    (["edit", "--from", "{not_p2p_png}", "--to", TGT], "--from"),
    (["edit", SRC, "--to", TGT, "--invert", "ddim"], "--image"),
    (["edit", SRC, "--to", TGT, "--image", "missing.jpg"], "--image"),
    (["edit", SRC, "--to", TGT, "--image", "{not_p2p_png}", "--invert", "sideways"], "--invert"),
    (["edit", SRC, "--to", TGT, "--unknown-flag"], "--unknown-flag"),
    (["generate"], "prompt"),
    (["generate", SRC, "--steps", "many"], "--steps"),
    (["attention", SRC, "--top-k", "0"], "--top-k"),
    (["sweep", SRC, "--to", TGT, "--to", TGT], "--to"),
    (["sweep", SRC, "--to", TGT, "--cross-steps", "0,2"], "--cross-steps"),
    (["batch", "missing.jsonl", "-o", "out"], "missing.jsonl"),
    (["batch", "{jsonl}"], "-o"),
    (["batch", "{jsonl}", "-o", "out", "--workers", "0"], "--workers"),
    (["generate", SRC, "-o", "{not_p2p_png}/sub"], "is a file, not a folder"),
    (["batch", "{jsonl}", "-o", "{not_p2p_png}/sub"], "is a file, not a folder"),
    (["info", "missing.png"], "missing.png"),
    (["info", "{not_p2p_png}"], "no prompt2prompt parameters"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--dtype", "float8"], "--dtype"),
    (["serve", "--queue-size", "0"], "--queue-size"),
    (["serve", "--queue-size", "many"], "--queue-size"),
    (["frobnicate"], "frobnicate"),
    ([], "COMMAND"),
]


@pytest.mark.parametrize("argv, names", USAGE_ERRORS, ids=[" ".join(a)[:60] for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_with_one_line_before_any_model_work(argv, names, capsys, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "edits.jsonl").write_text(json.dumps({"prompt": SRC, "to": TGT}) + "\n")
    argv = [a.replace("{not_p2p_png}", str(tmp_path / "plain.png")).replace("{jsonl}", str(tmp_path / "edits.jsonl")) for a in argv]
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("p2p") and "error:" in lines[0]
    assert names in lines[0]
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "out").exists()


def test_usage_error_in_a_subprocess_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(cli_command("edit", SRC, "--to", TGT, "--cross-steps", "1.5"), cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("p2p edit: error: --cross-steps 1.5 is outside [0, 1]")


def bundled_map_sides() -> list[int]:
    """The bundled model's cross-attention map sides at its own size."""
    from diffusers import UNet2DConditionModel

    from prompt2prompt.attention import attention_sides
    from prompt2prompt.shapes import MODEL_DIR

    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet")
    side = unet.config.sample_size
    return attention_sides(unet, (side, side))


def test_pipeline_value_errors_are_usage_errors(capsys, tmp_path):
    """Errors only the loaded model can find (a map side it lacks) still exit 2 with one line."""
    code, out, err = run(capsys, "attention", SRC, *FAST, "--res", "5", "-o", tmp_path / "a")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--res: attention_res 5" in err
    assert not (tmp_path / "a").exists()
    code, out, err = run(capsys, "edit", SRC, "--to", TGT, *FAST, "--blend", "circle", "square", "--blend-res", "5", "-o", tmp_path / "b")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--blend-res: LocalBlend resolution 5" in err
    assert f"use one of {bundled_map_sides()}" in err  # the bundled model's map sides, read from its UNet
    assert not (tmp_path / "b").exists()


def test_serve_checks_host_and_port_before_loading(capsys, no_model, monkeypatch):
    import socket

    monkeypatch.setattr(cli, "check_model", lambda *a: (_ for _ in ()).throw(AssertionError("checked the model first")))

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, err = run(capsys, "serve", "--port", str(port))
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"--port {port}: cannot listen" in err
    code, out, err = run(capsys, "serve", "--host", "999.1.1.1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--host 999.1.1.1" in err and out == ""


def test_batch_workers_report_a_bad_model_in_one_line(capsys, tmp_path):
    """The model folder is checked once before the pool starts: no traceback per worker."""
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": SRC, "to": TGT}) for _ in range(2)) + "\n")
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "batch", jsonl, "-o", tmp_path / "b", "--workers", "2", "--model", tmp_path / "empty")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "model_index.json" in err and "Traceback" not in err


def test_runtime_failures_exit_1_with_one_line_and_debug_shows_the_traceback(capsys, tmp_path):
    code, out, err = run(capsys, "generate", SRC, "--model", tmp_path / "no-such-model", "-o", tmp_path / "g")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--model" in err and "no such folder" in err
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "generate", SRC, "--model", tmp_path / "empty", "-o", tmp_path / "g")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "model_index.json" in err
    code, out, err = run(capsys, "generate", SRC, "--model", tmp_path / "empty", "-o", tmp_path / "g", "--debug")
    assert code == 1 and "Traceback" in err
    assert not (tmp_path / "g").exists()


# ============================================================================ the commands


def test_generate_writes_a_png_with_its_parameters(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder is outputs/<stamp>-<slug> under the working directory
    code, out, err = run(capsys, "generate", SRC, *FAST, "--seed", "5")
    assert code == 0, err
    folder = Path(out.strip().splitlines()[-1])
    assert folder.parent == Path("outputs") and folder.name.endswith("-a-red-circle-on-a-blue-background")
    assert sorted(p.name for p in folder.iterdir()) == ["image.png", "result.json"]
    meta = imageio.read_png_metadata(folder / "image.png")
    assert meta["version"] == __version__ and meta["command"] == "generate"
    assert meta["options"] == {"prompt": SRC, "seed": 5, "steps": 3, "guidance": 7.5, "model": None, "dtype": "float32"}
    assert meta["image"]["role"] == "image" and meta["model"] == "bundled shapes model"
    text = imageio.read_png_parameters(folder / "image.png")
    assert f"prompt: {SRC}" in text and "seed: 5" in text
    assert pixels(folder / "image.png").shape == (64, 64, 3)
    assert json.loads((folder / "result.json").read_text())["options"]["seed"] == 5


def test_edit_info_and_from_round_trip(capsys, tmp_path):
    first = tmp_path / "first"
    code, out, err = run(capsys, "edit", SRC, "--to", TGT, *FAST, "--seed", "2", "--cross-steps", "0.2:0.8",
                         "--reweight", "square=2", "--blend", "circle", "square", "--blend-res", "8", "-o", first)
    assert code == 0, err
    assert "edit mode: replace (chosen by auto)" in out
    assert f"aligned words ({TGT}): circle -> square" in out
    assert out.strip().splitlines()[-1] == str(first)
    assert sorted(p.name for p in first.iterdir() if not p.name.startswith("source.") or p.suffix == ".png") == [
        "edit-1.png", "grid.png", "result.json", "source.png"]  # and the source pass (tests/test_cli_reuse.py)
    result = json.loads((first / "result.json").read_text())
    assert result["edit_mode"] == "replace"
    assert result["alignment"][0]["changed_target_words"] == ["square"]
    assert result["options"]["cross_steps"] == [0.2, 0.8] and result["options"]["blend"] == [["circle"], ["square"]]
    assert result["options"]["blend_res"] == 8  # and --from / the rerun line below make the same pixels with it
    grid = PIL.Image.open(first / "grid.png")
    assert grid.width > 2 * 64
    for name, role in (("source.png", "source"), ("edit-1.png", "target"), ("grid.png", "grid")):
        meta = imageio.read_png_metadata(first / name)
        assert meta["image"]["role"] == role and meta["edit_mode"] == "replace"
        assert meta["options"]["reweight"] == {"square": 2.0} and meta["options"]["seed"] == 2

    code, out, err = run(capsys, "info", first / "edit-1.png")
    assert code == 0, err
    assert f"prompt: {SRC}" in out and f"to: {TGT}" in out and "seed: 2" in out and "edit mode: replace" in out
    rerun = next(line for line in out.splitlines() if line.startswith("rerun: "))[len("rerun: "):]
    assert "--blend-res 8" in rerun and "blend res: 8" in out
    code, out_json, _ = run(capsys, "info", first / "edit-1.png", "--json")
    assert json.loads(out_json)["options"]["prompt"] == SRC

    # --from: the stored settings are the defaults -> the same pixels
    again = tmp_path / "again"
    code, out, err = run(capsys, "edit", "--from", first / "edit-1.png", "-o", again, "--quiet")
    assert code == 0, err
    assert out.strip() == str(again)  # --quiet prints only the folder
    for name in ("source.png", "edit-1.png"):
        assert np.array_equal(pixels(first / name), pixels(again / name))
    assert (first / "edit-1.png").read_bytes() == (again / "edit-1.png").read_bytes()

    # the command line that info prints does the same
    argv = shlex.split(rerun)
    assert argv[:2] == ["p2p", "edit"]
    code, _, err = run(capsys, *argv[1:], "-o", tmp_path / "rerun", "--quiet")
    assert code == 0, err
    assert np.array_equal(pixels(first / "edit-1.png"), pixels(tmp_path / "rerun" / "edit-1.png"))

    # explicit flags override the stored ones
    code, _, err = run(capsys, "edit", "--from", first / "grid.png", "--seed", "3", "-o", tmp_path / "seed3", "--quiet")
    assert code == 0, err
    assert imageio.read_png_metadata(tmp_path / "seed3" / "edit-1.png")["options"]["seed"] == 3
    assert not np.array_equal(pixels(first / "source.png"), pixels(tmp_path / "seed3" / "source.png"))


def test_edit_refine_with_two_targets(capsys, tmp_path):
    styled = f"{SRC} in pixel art style"
    code, out, err = run(capsys, "edit", SRC, "--to", styled, "--to", f"{SRC} in pencil sketch style", *FAST,
                         "--mode", "refine", "-o", tmp_path)
    assert code == 0, err
    assert "edit mode: refine\n" in out
    assert f"aligned words ({styled}): +in, +pixel, +art, +style" in out
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("source.") or p.suffix == ".png") == [
        "edit-1.png", "edit-2.png", "grid.png", "result.json", "source.png"]
    assert imageio.read_png_metadata(tmp_path / "edit-2.png")["image"] == {
        "role": "target", "index": 2, "count": 4, "file": "edit-2.png", "prompt": f"{SRC} in pencil sketch style"}


def test_attention_writes_heat_maps_and_self_attention_components(capsys, tmp_path):
    code, out, err = run(capsys, "attention", SRC, *FAST, "--top-k", "4", "-o", tmp_path)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cross-attention.png", "image.png", "result.json", "self-attention.png"]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["words"] == SRC.split()
    values = result["singular_values"]
    assert len(values) == 4 and values == sorted(values, reverse=True)
    image = PIL.Image.open(tmp_path / "image.png")
    cross = PIL.Image.open(tmp_path / "cross-attention.png")
    cells = len(SRC.split()) + 1  # the image, then one map per word, in one row (at most 8 per row)
    assert cross.width >= cells * image.width
    assert imageio.read_png_metadata(tmp_path / "self-attention.png")["image"]["role"] == "self-attention"
    assert f"words: {', '.join(SRC.split())}" in out


def test_sweep_grid_and_each_image_reruns_with_from(capsys, tmp_path):
    folder = tmp_path / "sweep"
    code, out, err = run(capsys, "sweep", SRC, "--to", TGT, *FAST, "--cross-steps", "0,0.2:1", "-o", folder)
    assert code == 0, err
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["cross-0.2-1.png", "cross-0.png", "grid.png", "none.png", "result.json", "source.png"]
    result = json.loads((folder / "result.json").read_text())
    assert [i["file"] for i in result["images"]] == ["source.png", "cross-0.png", "cross-0.2-1.png", "none.png"]
    assert [i.get("edit_mode") for i in result["images"][1:]] == ["replace", "replace", "none"]
    assert imageio.read_png_metadata(folder / "none.png")["options"]["mode"] == "none"
    grid = PIL.Image.open(folder / "grid.png")
    assert grid.width >= 4 * 64
    # each image's stored parameters make it again: to float tolerance, the sweep's targets ran from the
    # source's pass, the edit's in one batch with its source (a few 8-bit levels where a rounding flips)
    code, _, err = run(capsys, "edit", "--from", folder / "cross-0.2-1.png", "-o", tmp_path / "one", "--quiet")
    assert code == 0, err
    for a, b in ((folder / "cross-0.2-1.png", tmp_path / "one" / "edit-1.png"), (folder / "source.png", tmp_path / "one" / "source.png")):
        assert np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max() <= 2, (a, b)


def test_info_shows_other_writers_metadata_but_from_refuses_it(capsys, tmp_path):
    web_png = imageio.save_png(tmp_path / "web.png", PIL.Image.new("RGB", (8, 8)), {"prompt": SRC, "source": "p2p serve"}, "x")
    code, out, err = run(capsys, "info", web_png)
    assert code == 0 and f"prompt: {SRC}" in out and "source: p2p serve" in out
    code, out, err = run(capsys, "edit", "--from", web_png, "--to", TGT)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot be rerun" in err


def test_serve_starts_the_web_page_with_the_options_given(capsys, monkeypatch):
    pytest.importorskip("gradio")
    from prompt2prompt import web

    calls = []
    monkeypatch.setattr(web, "serve", lambda **kwargs: calls.append(kwargs))
    code, out, err = run(capsys, "serve", "--port", "7861", "--device", "cpu", "--dtype", "float32", "--output-dir", "web-out")
    assert code == 0, err
    assert calls == [{"host": "127.0.0.1", "port": 7861, "model": None, "device": "cpu", "dtype": "float32", "output_dir": "web-out",
                      "allow_pickle": False, "source_limit_mib": 256, "queue_size": 32}]
    assert "http://127.0.0.1:7861" in out
    assert run(capsys, "serve", "--allow-pickle")[0] == 0 and calls[-1]["allow_pickle"] is True
    assert run(capsys, "serve", "--source-limit", "64")[0] == 0 and calls[-1]["source_limit_mib"] == 64
    assert run(capsys, "serve", "--source-limit", "-1")[0] == 2 and len(calls) == 3
    assert run(capsys, "serve", "--queue-size", "3")[0] == 0 and calls[-1]["queue_size"] == 3


# ============================================================================ batch


def _line(prompt=SRC, to=TGT, **options) -> str:
    return json.dumps({"prompt": prompt, "to": [to], **options})


def _check_line_folder(folder: Path) -> dict:
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("source.") or p.suffix == ".png")  # less the source pass
    assert names == ["edit-1.png", "grid.png", "result.json", "source.png"], folder
    assert (folder / "source.safetensors").is_file()
    for png in folder.glob("*.png"):
        with PIL.Image.open(png) as image:
            image.load()  # a complete, readable PNG
    return json.loads((folder / "result.json").read_text())


def test_batch_reports_bad_lines_and_runs_the_others(capsys, tmp_path):
    jsonl = tmp_path / "edits.jsonl"
    jsonl.write_text("\n".join([
        _line(seed=1, steps=3),
        "not json",
        _line(steps=3, blend=["banana", "square"]),
        _line(steps=3, colour="red"),
        "",
        _line(to="a green circle on a blue background", steps=3, cross_steps="0.2:0.8", reweight=["green=2"]),
    ]) + "\n")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "batch", jsonl, "-o", out_dir)
    assert code == 1
    assert "line 2: not valid JSON" in err and "line 3: blend SOURCE_WORDS" in err and "line 4: unknown key 'colour'" in err
    assert "batch: 2 done, 0 skipped (finished earlier), 3 failed" in out
    folders = sorted(p.name for p in out_dir.iterdir())
    assert folders == ["line-1-a-red-square-on-a-blue-background", "line-6-a-green-circle-on-a-blue-background"]
    result = _check_line_folder(out_dir / folders[1])
    assert result["options"]["reweight"] == {"green": 2.0} and result["options"]["cross_steps"] == [0.2, 0.8]
    # a rerun skips the finished lines
    code, out, err = run(capsys, "batch", jsonl, "-o", out_dir, "--quiet")
    assert code == 1 and "batch: 0 done, 2 skipped (finished earlier), 3 failed" in out


def test_batch_killed_with_sigkill_resumes_without_lost_or_half_written_files(capsys, tmp_path):
    jsonl = tmp_path / "edits.jsonl"
    targets = ["a red square on a blue background", "a green circle on a blue background",
               "a red star on a blue background", "a red heart on a blue background", "a red ring on a blue background"]
    jsonl.write_text("".join(_line(to=t, seed=k, steps=4) + "\n" for k, t in enumerate(targets)))
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(cli_command("batch", jsonl, "-o", out_dir, "--quiet"), cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out_dir.glob("line-*/result.json")):
            assert proc.poll() is None, "the batch ended before its first line finished"
            assert time.monotonic() < deadline, "no line finished in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    finished = {p.parent.name for p in out_dir.glob("line-*/result.json")}
    assert 1 <= len(finished) < len(targets)
    # what a kill in the middle of writing leaves: a temporary file and a stale, broken image
    unfinished = out_dir / "line-5-a-red-ring-on-a-blue-background"
    unfinished.mkdir(exist_ok=True)
    (unfinished / f"{imageio.TEMP_PREFIX}source.png.abc123").write_bytes(b"\x89PNG half")
    (unfinished / "source.png").write_bytes(b"\x89PNG half")

    code, out, err = run(capsys, "batch", jsonl, "-o", out_dir, "--quiet")
    assert code == 0, err
    assert f"batch: {len(targets) - len(finished)} done, {len(finished)} skipped (finished earlier), 0 failed" in out
    folders = sorted(p for p in out_dir.iterdir())
    assert len(folders) == len(targets)  # every line exactly once
    for k, folder in enumerate(sorted(folders, key=lambda p: int(p.name.split("-")[1]))):
        result = _check_line_folder(folder)
        assert result["options"]["to"] == [targets[k]] and result["options"]["seed"] == k
    code, out, _ = run(capsys, "batch", jsonl, "-o", out_dir, "--quiet")
    assert code == 0 and f"0 done, {len(targets)} skipped" in out


def test_batch_with_two_workers_matches_one_process(capsys, tmp_path):
    jsonl = tmp_path / "edits.jsonl"
    jsonl.write_text(_line(seed=1) + "\n" + _line(to="a green circle on a blue background", seed=2) + "\n")
    code, out, err = run(capsys, "batch", jsonl, "-o", tmp_path / "two", "--workers", "2", "--steps", "3", "--quiet")
    assert code == 0, err
    assert "batch: 2 done, 0 skipped (finished earlier), 0 failed" in out
    code, out, err = run(capsys, "batch", jsonl, "-o", tmp_path / "one", "--steps", "3", "--quiet")
    assert code == 0, err
    for folder in (tmp_path / "two").iterdir():
        assert _check_line_folder(folder)["options"]["steps"] == 3
        for name in ("source.png", "edit-1.png"):
            assert np.array_equal(pixels(folder / name), pixels(tmp_path / "one" / folder.name / name))


# ============================================================================ interruption and atomic files


def test_ctrl_c_during_denoising_exits_130_and_writes_nothing(capsys, tmp_path, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Prompt2PromptPipeline, "__call__", interrupted)
    code, out, err = run(capsys, "edit", SRC, "--to", TGT, *FAST, "-o", tmp_path / "out")
    assert code == 130 and err.strip() == "p2p edit: interrupted"
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_writing_leaves_no_partial_files(capsys, tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(imageio.os, "replace", replace_then_interrupt)
    code, out, err = run(capsys, "edit", SRC, "--to", TGT, *FAST, "-o", tmp_path / "out")
    assert code == 130 and len(calls) == 2
    assert not (tmp_path / "out").exists()


def test_png_metadata_round_trip_and_atomic_writes(tmp_path):
    image = PIL.Image.new("RGB", (4, 4), (1, 2, 3))
    meta = {"options": {"prompt": "un cercle rouge — ünïcödé"}, "n": 1}
    path = imageio.save_png(tmp_path / "x.png", image, meta, "prompt: ünïcödé")
    assert imageio.read_png_metadata(path) == meta
    assert imageio.read_png_parameters(path) == "prompt: ünïcödé"
    image.save(tmp_path / "plain.png")
    assert imageio.read_png_metadata(tmp_path / "plain.png") is None
    imageio.atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.png", "r.json", "x.png"]  # no temporary files left
    (tmp_path / f"{imageio.TEMP_PREFIX}stale").write_text("x")
    assert [p.name for p in imageio.remove_stale_temps(tmp_path)] == [f"{imageio.TEMP_PREFIX}stale"]


def test_output_set_failure_removes_everything_it_wrote(tmp_path, monkeypatch):
    files = imageio.OutputSet(tmp_path / "new")
    files.add("a.txt", b"a")
    files.add("b.txt", b"b")
    with pytest.raises(ValueError, match="already"):
        files.add("a.txt", b"again")

    real_replace = os.replace

    def fail_second(src, dst):
        if str(dst).endswith("b.txt"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(imageio.os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"):
        files.commit()
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(imageio.os, "replace", real_replace)
    assert [p.name for p in files.commit()] == ["a.txt", "b.txt"]
    assert (tmp_path / "new" / "b.txt").read_bytes() == b"b"


def test_output_set_replaces_an_earlier_result_and_nothing_else(tmp_path, monkeypatch):
    """A one-target result committed over a two-target one leaves no edit-2.png behind; files the
    earlier result did not name as its own (a photo in its options, a user's notes) stay."""
    folder = tmp_path / "out"
    first = imageio.OutputSet(folder)
    for name in ("source.png", "edit-1.png", "edit-2.png"):
        first.add(name, b"old")
    first.add_json("result.json", {"options": {"image": "photo.png"}, "grid": "edit-2.png",
                                   "images": [{"file": n} for n in ("source.png", "edit-1.png", "edit-2.png")]})
    first.commit()
    (folder / "photo.png").write_bytes(b"user's")
    (folder / "notes.txt").write_text("mine")
    second = imageio.OutputSet(folder)
    second.add("source.png", b"new")
    second.add("edit-1.png", b"new")
    second.add_json("result.json", {"images": [{"file": "source.png"}, {"file": "edit-1.png"}]})
    second.commit()
    assert sorted(p.name for p in folder.iterdir()) == ["edit-1.png", "notes.txt", "photo.png", "result.json", "source.png"]
    assert (folder / "edit-1.png").read_bytes() == b"new"
    # interrupted while replacing: the earlier marker is gone first, so the folder never looks finished
    real_replace = os.replace
    monkeypatch.setattr(imageio.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    third = imageio.OutputSet(folder)
    third.add("source.png", b"third")
    third.add_json("result.json", {"images": [{"file": "source.png"}]})
    with pytest.raises(OSError):
        third.commit()
    monkeypatch.setattr(imageio.os, "replace", real_replace)
    assert not (folder / "result.json").exists()


def test_written_files_get_ordinary_permissions(tmp_path):
    """mkstemp makes files owner-only (0600); results are ordinary files (0666 less the umask)."""
    old = os.umask(0o022)
    try:
        path = imageio.atomic_write_bytes(tmp_path / "x.bin", b"x")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


# ============================================================================ real images (inversion)


def test_edit_a_real_image_through_inversion(capsys, tmp_path):
    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (64, 64), (40, 80, 220)).save(photo)
    code, out, err = run(capsys, "edit", SRC, "--to", TGT, "--image", photo, "--invert", "ddim", *FAST, "-o", tmp_path / "out")
    assert code == 0, err
    meta = imageio.read_png_metadata(tmp_path / "out" / "edit-1.png")
    assert meta["options"]["image"] == str(photo.resolve()) and meta["options"]["invert"] == "ddim"
    assert meta["photo_sha256"] == imageio.file_sha256(photo)
    # a rerun from the PNG says so when the photo has changed since
    code, out, err = run(capsys, "edit", "--from", tmp_path / "out" / "edit-1.png", "-o", tmp_path / "same")
    assert code == 0 and "warning" not in err
    PIL.Image.new("RGB", (64, 64), (220, 40, 40)).save(photo)
    code, out, err = run(capsys, "edit", "--from", tmp_path / "out" / "edit-1.png", "-o", tmp_path / "changed")
    assert code == 0 and "the photo" in err and "has changed since that image was made" in err
