"""``p2p dataset`` with candidates batched by seed (``--candidates-per-seed M``, ``--batch-rows R``)
and its progress bar (issue 31).

The correctness proof of batching: a seed group's rows, one pipeline call, equal the same
candidates run one call each (same seed, same windows) to float tolerance, and so do the group
split into calls of ``R`` rows.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
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

PAIR = dataset.Pair(1, "a red circle and a blue square", "a red circle and a blue circle")
PAIRS = [
    {"input": "a red circle on a blue background", "output": "a red square on a blue background"},
    {"input": "a green star on a yellow background", "output": "a blue star on a yellow background"},
]
STEPS = 5
#: Three candidates of one seed group whose windows differ (cross and self), as `candidate_plan` makes them.
GROUP = [dataset.Candidate(k, 1234, s, c, 7.5, 0) for k, (s, c) in enumerate([(0.2, 0.0), (0.6, 0.4), (0.9, 1.0)])]


def settings(**kw) -> dataset.DatasetSettings:
    return dataset.DatasetSettings(**{"samples_per_pair": 3, "keep": 1, "steps": STEPS, **kw})


class CountingPipe:
    """A pipeline wrapper that records the number of target rows of each call."""

    def __init__(self, pipe):
        self.pipe, self.rows = pipe, []

    def __call__(self, prompt, targets, **kw):
        self.rows.append(len(targets))
        return self.pipe(prompt, targets, **kw)


# ============================================================================ the plan


def test_one_candidate_a_seed_is_todays_plan():
    """M=1: each candidate's seed is the hash of its index and its draws are self, cross, guidance in turn."""
    s = dataset.DatasetSettings(samples_per_pair=5, self_steps=dataset.Range(0.1, 0.9), guidance=dataset.Range(5, 9))
    plan = dataset.candidate_plan(s, PAIR)
    for k, c in enumerate(plan):
        seed = dataset.candidate_seed(s.seed, PAIR, k)
        rng = np.random.default_rng(seed)
        expected = [s.self_steps.sample(rng), s.cross_steps.sample(rng), s.guidance.sample(rng)]
        assert (c.index, c.seed, c.group) == (k, seed, k)
        assert [c.self_steps, c.cross_steps, c.guidance] == expected


def test_groups_share_seed_and_guidance_and_draw_their_own_windows():
    s = dataset.DatasetSettings(samples_per_pair=8, candidates_per_seed=3, self_steps=dataset.Range(0.1, 0.9),
                                cross_steps=dataset.Range(0.5, 1.0), guidance=dataset.Range(5, 9))
    plan = dataset.candidate_plan(s, PAIR)
    assert [c.index for c in plan] == list(range(8)) and [c.group for c in plan] == [0, 0, 0, 1, 1, 1, 2, 2]
    groups = dataset.seed_groups(plan)
    assert [len(g) for g in groups] == [3, 3, 2]
    for g, members in enumerate(groups):
        assert {c.seed for c in members} == {dataset.candidate_seed(s.seed, PAIR, g)}
        assert len({c.guidance for c in members}) == 1
        assert len({c.self_steps for c in members}) == len(members) and len({c.cross_steps for c in members}) == len(members)
    # independent of the line number (so of workers and restarts), and the same when planned again
    assert plan == dataset.candidate_plan(s, dataset.Pair(77, PAIR.input, PAIR.output))
    # a group's first member draws what the candidate of the group's index draws with M=1
    one = dataset.candidate_plan(dataclasses.replace(s, candidates_per_seed=1), PAIR)
    for g, members in enumerate(groups):
        first = members[0]
        assert (first.seed, first.self_steps, first.cross_steps, first.guidance) == (
            one[g].seed, one[g].self_steps, one[g].cross_steps, one[g].guidance)


def test_row_chunks_and_settings_checks():
    assert [[c.index for c in chunk] for chunk in dataset.row_chunks(GROUP, 2)] == [[0, 1], [2]]
    assert dataset.row_chunks(GROUP, None) == [GROUP]
    with pytest.raises(dataset.DatasetError, match="candidates_per_seed"):
        dataset.DatasetSettings(samples_per_pair=2, keep=1, candidates_per_seed=3)
    for bad in (0, 1.5, True):
        with pytest.raises(dataset.DatasetError, match="batch_rows"):
            dataset.DatasetSettings(batch_rows=bad)
    assert "batch_rows" not in dataset.DatasetSettings(batch_rows=2).record()  # not a setting of the data
    assert dataset.DatasetSettings(candidates_per_seed=4).record()["candidates_per_seed"] == 4


# ============================================================================ batched = one call each


@pytest.fixture(scope="module")
def singles(pipe):
    """Each candidate of `GROUP` in a call of its own: [(source, edited)] float arrays."""
    return [dataset.run_candidate(pipe, settings(), PAIR, c, output_type="np") for c in GROUP]


@pytest.mark.parametrize("batch_rows", [None, 2, 1])
def test_a_batched_group_equals_one_call_per_candidate(pipe, singles, batch_rows):
    counting = CountingPipe(pipe)
    made = dataset.generate(counting, settings(batch_rows=batch_rows), PAIR, GROUP, output_type="np")
    assert counting.rows == {None: [3], 2: [2, 1], 1: [1, 1, 1]}[batch_rows]
    assert len(made) == len(GROUP)
    for (source, edited), (one_source, one_edited) in zip(made, singles):
        np.testing.assert_allclose(source, one_source, atol=1e-5, rtol=0)
        np.testing.assert_allclose(edited, one_edited, atol=1e-4, rtol=0)
    # the windows matter: each row is much closer to its own candidate's single call than to another's
    for k, (_, edited) in enumerate(made):
        own = np.abs(edited - singles[k][1]).max()
        other = min(np.abs(edited - singles[j][1]).max() for j in range(len(GROUP)) if j != k)
        assert other > 10 * max(own, 1e-7)


def test_a_call_that_runs_out_of_memory_is_halved():
    class SmallDevice:
        """Refuses calls of more than two targets; an edited "image" is its self fraction."""

        def __init__(self):
            self.rows = []

        def __call__(self, prompt, targets, self_replace_steps, **kw):
            self.rows.append(len(targets))
            if len(targets) > 2:
                raise torch.cuda.OutOfMemoryError("out of memory")
            fractions = self_replace_steps if isinstance(self_replace_steps, list) else [self_replace_steps]
            return type("Out", (), {"images": ["source", *fractions]})

    group = [dataset.Candidate(k, 9, k / 10, 0.8, 7.5, 0) for k in range(5)]
    device = SmallDevice()
    made = dataset.generate(device, settings(samples_per_pair=5), PAIR, group)
    assert device.rows == [5, 2, 3, 1, 2]
    assert made == [("source", k / 10) for k in range(5)]
    def no_memory(*args, **kw):
        raise torch.cuda.OutOfMemoryError("out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):  # a single row that does not fit is the pair's failure
        dataset.generate(no_memory, settings(), PAIR, group[:1])


def test_run_group_refuses_candidates_of_two_groups(pipe):
    with pytest.raises(ValueError, match="one seed group"):
        dataset.run_group(pipe, settings(), PAIR, [GROUP[0], dataset.Candidate(1, 99, 0.5, 0.8, 7.5, 1)])


# ============================================================================ the command


def _pairs_file(path: Path) -> Path:
    path.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n", encoding="utf-8")
    return path


def _rows(root: Path) -> list[dict]:
    return sorted(pq.read_table(root / dataset.DATA_DIR).to_pylist(), key=lambda r: (r["line"], r["candidate"]))


def _pixels(row: dict, key: str) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(row[key]["bytes"])) as image:
        return np.asarray(image, dtype=np.int16)


FLAGS = ["--samples-per-pair", "4", "--keep", "2", "--steps", "2", "--min-score", "0", "--seed", "3"]


def test_cli_candidates_per_seed_and_batch_rows(tmp_path, capsys):
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    assert main(["dataset", str(pairs), "-o", str(tmp_path / "m2"), *FLAGS, "--candidates-per-seed", "2", "--quiet"]) == 0
    assert main(["dataset", str(pairs), "-o", str(tmp_path / "r1"), *FLAGS, "--candidates-per-seed", "2", "--batch-rows", "1",
                 "--quiet"]) == 0
    capsys.readouterr()
    run = json.loads((tmp_path / "m2" / dataset.RUN_FILE).read_text())
    assert run["settings"]["candidates_per_seed"] == 2 and "batch_rows" not in run["settings"]
    assert "--candidates-per-seed 2" in (tmp_path / "m2" / dataset.CARD).read_text()
    manifest = [json.loads(line) for line in (tmp_path / "m2" / dataset.MANIFEST).read_text().splitlines()]
    for entry in manifest:  # the seed shows the group: candidates 0, 1 share one, 2, 3 another
        seeds = entry["seeds"]
        assert seeds[0] == seeds[1] != seeds[2] == seeds[3]
    batched, split = _rows(tmp_path / "m2"), _rows(tmp_path / "r1")
    assert len(batched) == 4
    assert [(r["line"], r["candidate"], r["seed"], r["self_steps"], r["guidance"]) for r in batched] == [
        (r["line"], r["candidate"], r["seed"], r["self_steps"], r["guidance"]) for r in split]
    for a, b in zip(batched, split):  # the same images up to rounding to 8 bits
        for key in ("input_image", "edited_image"):
            assert np.abs(_pixels(a, key) - _pixels(b, key)).max() <= 1
    # a resumed run may change --batch-rows (how, not what); --candidates-per-seed is a setting of the data
    code = main(["dataset", str(pairs), "-o", str(tmp_path / "m2"), *FLAGS, "--candidates-per-seed", "2", "--batch-rows", "1", "--quiet"])
    assert code == 0 and "0 pairs done (2 finished earlier)" in capsys.readouterr().out
    assert main(["dataset", str(pairs), "-o", str(tmp_path / "m2"), *FLAGS, "--quiet"]) == 2
    assert "another run's data" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--candidates-per-seed", "0"], "--candidates-per-seed must be a positive integer"),
    (["--candidates-per-seed", "5"], "--candidates-per-seed (5) must be at most --samples-per-pair (4)"),
    (["--batch-rows", "0"], "--batch-rows must be a positive integer"),
])
def test_usage_errors(tmp_path, capsys, flags, message):
    code = main(["dataset", str(_pairs_file(tmp_path / "p.jsonl")), "-o", str(tmp_path / "out"), "--samples-per-pair", "4", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ============================================================================ the progress bar


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


BAR_FLAGS = ["--samples-per-pair", "1", "--keep", "1", "--steps", "1", "--min-score", "0"]


def test_progress_bar_on_a_terminal_shows_rate_and_eta(tmp_path, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["dataset", str(_pairs_file(tmp_path / "p.jsonl")), "-o", str(tmp_path / "out"), *BAR_FLAGS]) == 0
    text = terminal.getvalue()
    assert "pairs: " in text and "2/2 pairs" in text and "pairs/s" in text and "ETA" in text and "\r" in text
    rate = [float(x) for x in re.findall(r"([0-9.]+)pairs/s", text)]
    assert rate and rate[-1] > 0


def test_no_bar_when_not_a_terminal_or_quiet(tmp_path, capsys, monkeypatch):
    pairs = _pairs_file(tmp_path / "p.jsonl")
    assert main(["dataset", str(pairs), "-o", str(tmp_path / "out"), *BAR_FLAGS]) == 0
    err = capsys.readouterr().err
    assert "pairs/s" not in err and "ETA" not in err and "\r" not in err
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["dataset", str(pairs), "-o", str(tmp_path / "quiet"), *BAR_FLAGS, "--quiet"]) == 0
    assert "pairs/s" not in terminal.getvalue() and "\r" not in terminal.getvalue()
