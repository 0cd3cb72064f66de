"""``p2p dataset`` (`prompt2prompt.dataset`) end to end on the bundled shapes model, 2 steps.

One reference run (1 worker) is shared by the tests; a 2-worker run, an interrupted run and runs
killed with SIGKILL must give exactly its rows.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from prompt2prompt import dataset  # noqa: E402
from prompt2prompt.cli import main  # noqa: E402

from _util import run_killed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAIRS = [
    {"input": "a red circle on a blue background", "output": "a red square on a blue background", "edit": "make it a square"},
    {"input": "a green star on a yellow background", "output": "a blue star on a yellow background"},
    {"input": "a big red circle on a white background", "output": "a big red triangle on a white background", "edit": "triangle"},
]
#: N=2, K=1, every candidate passes (min-score 0), so each pair keeps exactly one row.
FLAGS = ["--samples-per-pair", "2", "--keep", "1", "--steps", "2", "--min-score", "0", "--seed", "5", "--quiet"]


def write_pairs(path: Path, extra: list[str] = ()) -> Path:
    lines = ["# caption pairs", ""] + [json.dumps(p) for p in PAIRS] + list(extra)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rows(root: Path) -> list[dict]:
    """Every row of a dataset folder, sorted by (line, candidate)."""
    table = pq.read_table(root / dataset.DATA_DIR)
    return sorted(table.to_pylist(), key=lambda r: (r["line"], r["candidate"]))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 1-worker run: (pairs file, output folder)."""
    base = tmp_path_factory.mktemp("dataset")
    pairs = write_pairs(base / "pairs.jsonl")
    out = base / "ref"
    assert main(["dataset", str(pairs), "-o", str(out), *FLAGS, "--workers", "1"]) == 0
    return pairs, out


def test_end_to_end_rows_images_and_card(reference):
    pairs, out = reference
    got = rows(out)
    # pairs are lines 3, 4 and 5 (a comment and a blank line first); K=1 of N=2 each
    assert [r["line"] for r in got] == [3, 4, 5]
    plan = {p["input"]: dataset.candidate_plan(dataset.DatasetSettings(samples_per_pair=2, keep=1, steps=2, min_score=0.0, seed=5),
                                               dataset.Pair(0, p["input"], p["output"], p.get("edit"))) for p in PAIRS}
    for row, pair in zip(got, PAIRS):
        assert (row["input_caption"], row["output_caption"], row["edit"]) == (pair["input"], pair["output"], pair.get("edit"))
        candidate = plan[pair["input"]][row["candidate"]]
        assert row["seed"] == candidate.seed and row["self_steps"] == candidate.self_steps
        assert 0.1 <= row["self_steps"] <= 0.9 and row["cross_steps"] == 0.8 and row["guidance"] == 7.5 and row["steps"] == 2
        for key in ("input_image", "edited_image"):
            with PIL.Image.open(io.BytesIO(row[key]["bytes"])) as image:
                assert image.format == "PNG" and image.size == (64, 64)
        assert 0.0 <= row["score"] <= 1.0 and row["score_checks"] == 2  # background and one coloured shape
    # the kept candidate is the better-scored one
    manifest = [json.loads(line) for line in (out / dataset.MANIFEST).read_text().splitlines()]
    assert sorted(e["line"] for e in manifest) == [3, 4, 5]
    for entry, row in zip(sorted(manifest, key=lambda e: e["line"]), got):
        assert entry["kept"] == [row["candidate"]] and entry["scores"][row["candidate"]] == max(entry["scores"])
    card = (out / dataset.CARD).read_text()
    assert "rows kept: 3" in card and "--samples-per-pair 2 --keep 1 --seed 5 --steps 2" in card
    import pandas

    assert len(pandas.read_parquet(out / dataset.DATA_DIR)) == 3


def test_loads_with_datasets(reference):
    datasets = pytest.importorskip("datasets")
    _, out = reference
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train",
                                   cache_dir=str(out.parent / "hf-cache"))
    assert loaded.num_rows == 3 and sorted(loaded["line"]) == [3, 4, 5]
    assert set(loaded.column_names) >= {"input_image", "edited_image", "input_caption", "output_caption", "edit", "seed", "score"}
    assert isinstance(loaded[0]["edited_image"], PIL.Image.Image) and loaded[0]["edited_image"].size == (64, 64)
    assert loaded.features["seed"].dtype == "int64"


def test_two_workers_give_identical_rows(reference, tmp_path, monkeypatch):
    pairs, out = reference
    # the workers' thread count is the reference's (unset, each would take cores / 2; CPU sums may round apart)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    assert main(["dataset", str(pairs), "-o", str(tmp_path / "two"), *FLAGS, "--workers", "2"]) == 0
    assert rows(tmp_path / "two") == rows(out)
    record = json.loads((tmp_path / "two" / dataset.THROUGHPUT).read_text())
    # worker indices 0 and 1 (the faster to load may run every pair)
    assert set(record["workers"]) <= {"0", "1"} and sum(w["pairs"] for w in record["workers"].values()) == 3


def test_resume_after_interruption(reference, tmp_path, capsys):
    pairs, out = reference
    settings = dataset.DatasetSettings(samples_per_pair=2, keep=1, steps=2, min_score=0.0, seed=5)
    writer = dataset.DatasetWriter(tmp_path / "part", dataset.run_record(settings, dataset_sha(pairs)))
    writer.open(False)
    listed, _ = dataset.read_pairs(pairs)

    def stop_after_first(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dataset.make_dataset(listed, settings, writer, progress=stop_after_first)
    assert len(list((tmp_path / "part" / dataset.DATA_DIR).glob("*.parquet"))) == 1
    code, stdout, _ = run_cli(capsys, "dataset", pairs, "-o", tmp_path / "part", *FLAGS)
    assert code == 0 and "2 pairs done (1 finished earlier)" in stdout
    assert rows(tmp_path / "part") == rows(out)


def dataset_sha(path: Path) -> str:
    from prompt2prompt.imageio import file_sha256

    return file_sha256(path)


def _manifest_lines(out: Path) -> int:
    path = out / dataset.MANIFEST
    return len(path.read_bytes().splitlines()) if path.is_file() else 0


def _killed_run(pairs: Path, out: Path, delay: float) -> int:
    """Start the command in a subprocess; SIGKILL it ``delay`` s after it finishes one more pair
    (or when it ends first). Returns the manifest's lines after the kill."""
    # the reference rows were made in this process: the same thread count, or float sums may round apart
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "prompt2prompt.cli", "dataset", str(pairs), "-o", str(out), *FLAGS]
    run_killed(command, env, lambda: _manifest_lines(out), delay)
    return _manifest_lines(out)


#: Kills of `test_sigkill_at_random_points_then_rerun`: (kills, pairs) in the reduced form and with ``--slow``
#: (each killed run finishes one pair or more, so the slow form has a pair more than kills).
KILLS = {False: (2, len(PAIRS)), True: (20, 21)}


def many_pairs(count: int) -> list[dict]:
    """``count`` distinct caption pairs (``PAIRS`` first), for the long kill test."""
    shapes, colours = ["circle", "square", "triangle", "star"], ["red", "green", "blue", "yellow"]
    made = list(PAIRS)
    for shape in shapes:
        for colour in colours:
            for other in shapes:
                if len(made) < count and other != shape:
                    made.append({"input": f"a {colour} {shape} on a white background", "output": f"a {colour} {other} on a white background"})
    assert len(made) >= count
    return made[:count]


def test_sigkill_at_random_points_then_rerun(reference, tmp_path, capsys, slow_mode):
    """Killed at random moments (a random delay after a pair is done) and rerun each time; the
    reduced form kills twice, ``--slow`` 20 times over 21 pairs."""
    kills, count = KILLS[slow_mode]
    pairs, out = reference
    if count > len(PAIRS):  # the long form's own reference, made in this process
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(p) + "\n" for p in many_pairs(count)), encoding="utf-8")
        out = tmp_path / "reference"
        assert main(["dataset", str(pairs), "-o", str(out), *FLAGS]) == 0
    target = tmp_path / "killed"
    rng = random.Random(31)
    done = []
    for _ in range(kills):
        done.append(_killed_run(pairs, target, rng.uniform(0.0, 0.4)))
        for shard in (target / dataset.DATA_DIR).glob("*.parquet"):  # every shard in place is whole
            pq.read_table(shard)
    assert done[0] >= 1  # killed after its first pair at the earliest
    code, stdout, _ = run_cli(capsys, "dataset", pairs, "-o", target, *FLAGS)
    assert code == 0
    got = rows(target)
    assert len({(r["line"], r["candidate"]) for r in got}) == len(got) == count
    assert got == rows(out)
    assert not [p for p in target.rglob(".p2p-tmp-*")]


def test_bad_lines_reported_and_the_rest_go_on(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl", ["not json", '{"input": "a red circle on a blue background"}',
                                                   '{"input": "a", "output": "b", "colour": "red"}', "[1, 2]"])
    listed, bad = dataset.read_pairs(pairs)
    assert [p.line for p in listed] == [3, 4, 5]
    assert [n for n, _ in bad] == [6, 7, 8, 9]
    assert "not valid JSON" in bad[0][1] and 'missing "output"' in bad[1][1] and "'colour'" in bad[2][1] and "JSON object" in bad[3][1]
    code, stdout, err = run_cli(capsys, "dataset", pairs, "-o", tmp_path / "out", *FLAGS[:-1], "--steps", "1")
    assert code == 1 and "line 6: not valid JSON" in err and 'line 7: missing "output"' in err
    assert "3 pairs done" in stdout and "4 failed" in stdout
    assert len(rows(tmp_path / "out")) == 3


@pytest.mark.parametrize("flags, message", [
    (["--samples-per-pair", "2", "--keep", "3"], "--keep (3) must be at most --samples-per-pair (2)"),
    (["--min-score", "1.5"], "--min-score must be in [0, 1]"),
    (["--self-steps", "0.2:1.2"], "--self-steps must lie in [0, 1]"),
    (["--cross-steps", "0.9:0.1"], "above its end"),
    (["--guidance", "x"], "--guidance must be a number F or a range LOW:HIGH"),
    (["--samples-per-pair", "0"], "--samples-per-pair"),
    (["--workers", "0"], "--workers"),
])
def test_usage_errors_before_any_work(tmp_path, capsys, flags, message):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    code, _, err = run_cli(capsys, "dataset", pairs, "-o", tmp_path / "out", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_file_and_missing_output(tmp_path, capsys):
    code, _, err = run_cli(capsys, "dataset", tmp_path / "nope.jsonl", "-o", tmp_path / "out")
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(capsys, "dataset", write_pairs(tmp_path / "p.jsonl"))
    assert code == 2 and "-o" in err


def test_other_runs_data_refused_unless_overwrite(reference, tmp_path, capsys):
    pairs, out = reference
    target = tmp_path / "copy"
    import shutil

    shutil.copytree(out, target)
    code, _, err = run_cli(capsys, "dataset", pairs, "-o", target, *FLAGS, "--seed", "6")
    assert code == 2 and "another run's data" in err and "--overwrite" in err
    assert rows(target) == rows(out)  # untouched
    (target.parent / "other").mkdir()
    (target.parent / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "dataset", pairs, "-o", target.parent / "other", *FLAGS)
    assert code == 2 and "not empty" in err
    code, stdout, _ = run_cli(capsys, "dataset", pairs, "-o", target, *FLAGS, "--seed", "6", "--overwrite")
    assert code == 0 and "3 pairs done (0 finished earlier)" in stdout
    assert [r["seed"] for r in rows(target)] != [r["seed"] for r in rows(out)]


def test_candidate_plan_depends_on_content_and_run_seed_only():
    settings = dataset.DatasetSettings(samples_per_pair=4, self_steps=dataset.Range(0.2, 0.4), guidance=dataset.Range(5, 9))
    a = dataset.candidate_plan(settings, dataset.Pair(1, "a red circle", "a red square"))
    assert a == dataset.candidate_plan(settings, dataset.Pair(99, "a red circle", "a red square"))
    assert len({c.seed for c in a}) == 4
    assert all(0.2 <= c.self_steps <= 0.4 and 5 <= c.guidance <= 9 and c.cross_steps == 0.8 for c in a)
    assert a != dataset.candidate_plan(settings, dataset.Pair(1, "a red circle", "a red square", "edit"))
    other = dataset.DatasetSettings(samples_per_pair=4, seed=1, self_steps=dataset.Range(0.2, 0.4), guidance=dataset.Range(5, 9))
    assert [c.seed for c in dataset.candidate_plan(other, dataset.Pair(1, "a red circle", "a red square"))] != [c.seed for c in a]


def test_settings_and_ranges_validated():
    assert dataset.Range.parse("0.1:0.9", "--x") == dataset.Range(0.1, 0.9)
    assert dataset.Range.parse("0.8", "--x") == dataset.Range(0.8, 0.8)
    for text in ("a", "1:2:3", "0.9:0.1", "nan"):
        with pytest.raises(dataset.DatasetError):
            dataset.Range.parse(text, "--x")
    with pytest.raises(dataset.DatasetError, match="keep"):
        dataset.DatasetSettings(samples_per_pair=2, keep=3)
    with pytest.raises(dataset.DatasetError, match="min_score"):
        dataset.DatasetSettings(min_score=-0.1)


def test_choose_kept_takes_the_best_that_pass():
    assert dataset.choose_kept([0.5, 1.0, 0.2, 1.0], keep=2, min_score=0.5) == [1, 3]
    assert dataset.choose_kept([0.5, 1.0, 0.2, 1.0], keep=3, min_score=0.6) == [1, 3]
    assert dataset.choose_kept([0.1, 0.2], keep=2, min_score=0.5) == []


def test_detector_score_of_a_rendered_scene():
    from prompt2prompt.shapes import world

    scene = world.render(world.make_spec([{"shape": "square", "colour": "red", "size": "big"}], "blue"))
    assert dataset.detector_score(scene.image, "a big red square on a blue background")["score"] == 1.0
    assert dataset.detector_score(scene.image, "a big red circle on a blue background")["score"] == 0.5
    assert dataset.detector_score(scene.image, "a big green circle on a yellow background")["score"] == 0.0


def test_shard_without_its_manifest_line_is_redone_once(reference, tmp_path, capsys):
    """A kill between a shard's rename and its manifest line: the pair runs again, its shard replaced."""
    import shutil

    pairs, out = reference
    target = tmp_path / "torn"
    shutil.copytree(out, target)
    lines = (target / dataset.MANIFEST).read_bytes().splitlines(keepends=True)
    (target / dataset.MANIFEST).write_bytes(b"".join(lines[:-1]) + lines[-1][:10])  # the last line torn
    code, stdout, _ = run_cli(capsys, "dataset", pairs, "-o", target, *FLAGS)
    assert code == 0 and "1 pairs done (2 finished earlier)" in stdout
    assert rows(target) == rows(out)
    assert len(dataset.DatasetWriter(target, {}).read_manifest()) == 3
