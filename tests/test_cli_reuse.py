"""Issue 30 on the command line: ``p2p sweep`` runs the source once, ``p2p edit`` saves its source
pass beside its result and ``p2p edit --from IMAGE.png`` edits from it when it matches (the
bundled shapes model, 3 steps). UNet rows are counted with a forward pre-hook."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from prompt2prompt import cli
from prompt2prompt.source_pass import budget_of, covering_window, pass_record, record_mismatch
from test_cli import run

SRC = "a red circle on a blue background"
TGT = "a red square on a blue background"
NEW = "a red star on a blue background"
STEPS = 3
FAST = ["--steps", str(STEPS)]
#: Rows of one prompt per step: its conditional and unconditional halves (guidance 7.5).
ROWS = 2


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def assert_same_image(a, b, tolerance: int = 2):
    """Equal to float tolerance: a few 8-bit levels where the rounding of a float difference flips."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= tolerance, f"{a} and {b} differ by up to {diff.max()} levels"


@pytest.fixture
def rows(monkeypatch):
    """A list that grows by each UNet call's batch rows, for every pipeline the command line loads."""
    counted: list[int] = []
    load = cli.load_pipeline

    def counting_load(*args, **kwargs):
        pipe = load(*args, **kwargs)

        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            counted.append(int(sample.shape[0]))

        pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", counting_load)
    return counted


def _taken(counted: list[int]) -> int:
    total = sum(counted)
    counted.clear()
    return total


# ============================================================================ the helpers


def test_covering_window_is_the_earliest_start_to_the_latest_end():
    assert covering_window([0.0, 0.2, 1.0]) == 1.0
    assert covering_window([0.4, (0.2, 0.6)]) == 0.6
    assert covering_window([(0.2, 0.6), (0.3, 0.9)]) == (0.2, 0.9)
    assert covering_window([{"default_": (0.1, 0.5), "square": (0.0, 0.3)}]) == 0.5
    assert budget_of([0.8, (0.2, 0.9)], [0.4]) == {"cross_replace_steps": 0.9, "self_replace_steps": 0.4}
    with pytest.raises(ValueError):
        covering_window([])


def test_pass_record_names_the_first_difference():
    options = {"model": None, "dtype": "float32", "prompt": SRC, "seed": 2, "steps": 3, "guidance": 7.5, "image": None, "invert": None}
    record = pass_record(options)
    assert record_mismatch(record, pass_record(options)) is None
    assert record_mismatch(record, pass_record({**options, "seed": 3})) == "this edit's seed is 3, the pass's 2"
    assert "source prompt" in record_mismatch(record, pass_record({**options, "prompt": TGT}))
    photo = {**options, "image": "/x.png", "invert": "null-text"}
    assert pass_record(photo, "abc")["seed"] is None and pass_record(photo, "abc")["image"] == "abc"
    assert "photo" in record_mismatch(pass_record(photo, "abc"), pass_record(photo, "abd"))


# ============================================================================ sweep


def test_sweep_runs_the_source_once(capsys, tmp_path, rows):
    values = ["0", "0.4", "0.2:1"]
    code, out, err = run(capsys, "sweep", SRC, "--to", TGT, *FAST, "--cross-steps", ",".join(values), "-o", tmp_path / "sweep")
    assert code == 0, err
    # the source once, then one denoising loop whose batch is every value and the no-injection image
    assert rows == [ROWS] * STEPS + [ROWS * (len(values) + 1)] * STEPS
    rows.clear()
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert names == ["cross-0.2-1.png", "cross-0.4.png", "cross-0.png", "grid.png", "none.png", "result.json", "source.png"]
    # each image is what an edit with its own window gives, and the source is the edit's source
    code, _, err = run(capsys, "edit", SRC, "--to", TGT, *FAST, "--cross-steps", "0.4", "-o", tmp_path / "one", "--quiet")
    assert code == 0, err
    assert_same_image(tmp_path / "sweep" / "cross-0.4.png", tmp_path / "one" / "edit-1.png")
    assert_same_image(tmp_path / "sweep" / "source.png", tmp_path / "one" / "source.png")
    result = json.loads((tmp_path / "sweep" / "result.json").read_text())
    assert [i["file"] for i in result["images"]] == ["source.png", "cross-0.png", "cross-0.4.png", "cross-0.2-1.png", "none.png"]
    assert [i["edit_mode"] for i in result["images"][1:]] == ["replace"] * 3 + ["none"]
    # the no-injection target of the batch is the image of mode none
    code, _, err = run(capsys, "edit", SRC, "--to", TGT, *FAST, "--mode", "none", "-o", tmp_path / "none", "--quiet")
    assert code == 0, err
    assert_same_image(tmp_path / "sweep" / "none.png", tmp_path / "none" / "edit-1.png")
    code, _, err = run(capsys, "edit", SRC, "--to", TGT, *FAST, "--cross-steps", "0.2:1", "-o", tmp_path / "late", "--quiet")
    assert code == 0, err
    assert_same_image(tmp_path / "sweep" / "cross-0.2-1.png", tmp_path / "late" / "edit-1.png")


def test_a_sweep_with_local_blend_makes_the_no_injection_image_in_a_second_loop(capsys, tmp_path, rows):
    """LocalBlend acts on every target of a call, and the no-injection image has none: it is its own loop."""
    values = ["0.2", "1"]
    code, out, err = run(capsys, "sweep", SRC, "--to", TGT, *FAST, "--cross-steps", ",".join(values), "--blend", "circle", "square",
                         "-o", tmp_path / "sweep")
    assert code == 0, err
    assert rows == [ROWS] * STEPS + [ROWS * len(values)] * STEPS + [ROWS] * STEPS
    rows.clear()
    code, _, err = run(capsys, "edit", SRC, "--to", TGT, *FAST, "--cross-steps", "1", "--blend", "circle", "square",
                       "-o", tmp_path / "one", "--quiet")
    assert code == 0, err
    assert_same_image(tmp_path / "sweep" / "cross-1.png", tmp_path / "one" / "edit-1.png")


# ============================================================================ edit: save and reuse


def _edit(capsys, folder, *extra):
    code, out, err = run(capsys, "edit", SRC, "--to", TGT, *FAST, "--seed", "2", "-o", folder, *extra)
    assert code == 0, err
    return out


def test_edit_saves_its_source_pass_and_from_reuses_it(capsys, tmp_path, rows):
    first = tmp_path / "first"
    _edit(capsys, first)
    calls, full_rows = len(rows), _taken(rows)
    assert calls == STEPS and full_rows == STEPS * ROWS * 2  # one batch: the source and the target, its pass kept as it runs
    files = sorted(p.name for p in first.iterdir())
    assert "source.safetensors" in files and {"edit-1.png", "grid.png", "result.json", "source.png"} <= set(files)
    record = json.loads((first / "result.json").read_text())["source_pass"]
    assert record["saved"] and record["file"] == "source.safetensors" and record["bytes"] > 0
    assert record["made_with"]["prompt"] == SRC and record["made_with"]["seed"] == 2
    sidecars = [s["file"] for s in record["sidecars"]]
    assert sidecars and all((first / name).is_file() for name in sidecars) and any(n.endswith(".json") for n in sidecars)

    # a new target from the earlier result: only the target runs, from the saved pass
    code, out, err = run(capsys, "edit", "--from", first / "edit-1.png", "--to", NEW, "-o", tmp_path / "reused")
    assert code == 0, err
    assert f"source reused from {first / 'source.safetensors'}" in out
    assert len(rows) == STEPS and _taken(rows) * 2 == full_rows
    assert json.loads((tmp_path / "reused" / "result.json").read_text())["source_pass"]["reused_from"] == str(first / "source.safetensors")
    # the same images as the full edit
    code, out, err = run(capsys, "edit", "--from", first / "edit-1.png", "--to", NEW, "--no-reuse", "-o", tmp_path / "full")
    assert code == 0, err
    assert "reused" not in out and len(rows) == STEPS and _taken(rows) == full_rows
    for name in ("source.png", "edit-1.png"):
        assert_same_image(tmp_path / "reused" / name, tmp_path / "full" / name)
    assert_same_image(tmp_path / "reused" / "source.png", first / "source.png")


@pytest.mark.parametrize("change, note", [
    (["--seed", "5"], "this edit's seed is 5, the pass's 2"),
    (["--steps", "4"], "this edit's steps is 4, the pass's 3"),
    (["--cross-steps", "1"], "cross"),  # beyond the pass's budget (0.8): the pipeline says which window
])
def test_a_pass_that_does_not_match_is_noted_and_the_edit_runs_in_full(capsys, tmp_path, rows, change, note):
    first = tmp_path / "first"
    _edit(capsys, first)
    _taken(rows)
    code, out, err = run(capsys, "edit", "--from", first / "edit-1.png", "--to", NEW, *change, "-o", tmp_path / "again")
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "not reused" in line]
    assert line.startswith(f"source pass {first / 'source.safetensors'} not reused: ") and note in line
    assert line.endswith("running the full edit") and "source reused" not in out
    steps = 4 if "--steps" in change else STEPS
    assert len(rows) == steps and _taken(rows) == steps * ROWS * 2  # the full edit: one batch
    assert (tmp_path / "again" / "edit-1.png").is_file()


def test_a_corrupted_or_missing_pass_falls_back(capsys, tmp_path, rows):
    first = tmp_path / "first"
    _edit(capsys, first)
    (first / "source.safetensors").write_bytes(b"not a safetensors file")
    _taken(rows)
    code, out, err = run(capsys, "edit", "--from", first / "edit-1.png", "--to", NEW, "-o", tmp_path / "again")
    assert code == 0, err
    assert "not reused: it cannot be read" in out and _taken(rows) == STEPS * ROWS * 2
    (first / "source.safetensors").unlink()
    code, out, err = run(capsys, "edit", "--from", first / "edit-1.png", "--to", NEW, "-o", tmp_path / "again")
    assert code == 0, err
    assert "the file is missing" in out and _taken(rows) == STEPS * ROWS * 2


def test_source_limit(capsys, tmp_path):
    folder = tmp_path / "none"
    out = _edit(capsys, folder, "--source-limit", "0")
    assert not (folder / "source.safetensors").exists() and "not saved" not in out
    record = json.loads((folder / "result.json").read_text())["source_pass"]
    assert record["saved"] is False and record["bytes"] > 0
    code, _, err = run(capsys, "edit", SRC, "--to", TGT, "--source-limit", "-1", "-o", tmp_path / "x")
    assert code == 2 and "--source-limit" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "edit", SRC, "--to", TGT, "--source-limit", "lots", "-o", tmp_path / "x")
    assert code == 2 and "--source-limit" in err


def test_rerunning_into_the_folder_of_a_saved_pass_replaces_it(capsys, tmp_path):
    """A result without a pass, written over one with a pass, leaves no stale pass behind."""
    folder = tmp_path / "run"
    _edit(capsys, folder)
    assert (folder / "source.safetensors").is_file()
    _edit(capsys, folder, "--source-limit", "0")
    assert not (folder / "source.safetensors").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith("source.") and p.suffix == ".json"]


def test_help_tells_about_reuse(capsys):
    code, out, _ = run(capsys, "edit", "--help")
    assert code == 0 and "--no-reuse" in out and "--source-limit" in out


def test_a_photos_pass_is_reused_without_inverting_again(capsys, tmp_path, rows):
    photo = tmp_path / "photo.png"
    PIL.Image.new("RGB", (64, 64), (40, 80, 220)).save(photo)
    code, out, err = run(capsys, "edit", SRC, "--to", TGT, "--image", photo, "--invert", "ddim", *FAST, "-o", tmp_path / "first")
    assert code == 0, err
    inverted = _taken(rows)
    assert inverted > STEPS * ROWS * 2  # the inversion's own UNet calls, the source's pass, the target
    code, out, err = run(capsys, "edit", "--from", tmp_path / "first" / "edit-1.png", "--to", NEW, "-o", tmp_path / "reused")
    assert code == 0, err
    assert "source reused from" in out and _taken(rows) == STEPS * ROWS  # no inversion, no source
    assert (tmp_path / "first" / "inversion.safetensors").is_file()
    code, _, err = run(capsys, "edit", "--from", tmp_path / "first" / "edit-1.png", "--to", NEW, "--no-reuse", "-o", tmp_path / "full")
    assert code == 0, err
    for name in ("source.png", "edit-1.png"):  # the full edit's images
        assert_same_image(tmp_path / "reused" / name, tmp_path / "full" / name)
    _taken(rows)
    # another photo under the same name: not reused, the inversion runs again
    PIL.Image.new("RGB", (64, 64), (220, 40, 40)).save(photo)
    code, out, err = run(capsys, "edit", "--from", tmp_path / "first" / "edit-1.png", "--to", NEW, "-o", tmp_path / "changed")
    assert code == 0, err
    assert "not reused: this edit's photo is not the pass's" in out and _taken(rows) == inverted
