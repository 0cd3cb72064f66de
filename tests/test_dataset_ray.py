"""``p2p dataset --ray`` on a real local Ray started by this module (2 CPUs, one ``ray.init``):
2 actors, one of them killed (SIGKILL) in the middle of a pair, give exactly the rows of the
1-worker run (`test_dataset.reference`): nothing lost, nothing twice."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
pytest.importorskip("pyarrow")

from prompt2prompt import dataset  # noqa: E402
from test_dataset import FLAGS, reference, rows, run_cli  # noqa: E402, F401 - reference is a fixture

#: The line whose pair the killing hook interrupts (the second pair of `test_dataset.PAIRS`).
KILLED_LINE = 4


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module: 2 CPUs, no dashboard; shut down at the end."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    # the test's hook is pickled by value: Ray's workers cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def same_threads(monkeypatch):
    """The actors run with the reference's torch thread count (CPU sums may round apart with another)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))


def kill_once(marker: Path, line: int, pair, index) -> None:
    """A `PairWorker` hook: SIGKILL this worker's process at ``line``'s pair, the first time only."""
    if pair.line == line and not marker.exists():
        marker.write_text(str(os.getpid()), encoding="utf-8")
        os.kill(os.getpid(), signal.SIGKILL)


def test_two_actors_one_killed_mid_pair_give_the_rows_of_one_worker(reference, tmp_path, capsys, monkeypatch):
    """``--ray --workers 2`` with one actor killed in the middle of line 4's pair (one Ray run for
    both checks: each actor start imports torch and loads the model, the test's main cost)."""
    pairs, out = reference
    marker = tmp_path / "killed.pid"
    monkeypatch.setattr(dataset, "make_dataset", functools.partial(dataset.make_dataset, hook=functools.partial(kill_once, marker, KILLED_LINE)))
    code, stdout, _ = run_cli(capsys, "dataset", pairs, "-o", tmp_path / "ray", *FLAGS, "--ray", "--workers", "2")
    assert marker.is_file()  # an actor died in the middle of line 4's pair
    assert code == 0 and "3 pairs done (0 finished earlier)" in stdout and "0 failed" in stdout
    assert "throughput: 2 workers:" in stdout
    got = rows(tmp_path / "ray")
    assert len({(r["line"], r["candidate"]) for r in got}) == len(got) == 3
    assert got == rows(out)
    manifest = [json.loads(line) for line in (tmp_path / "ray" / dataset.MANIFEST).read_text().splitlines()]
    assert sorted(e["line"] for e in manifest) == [3, 4, 5]
    record = json.loads((tmp_path / "ray" / dataset.THROUGHPUT).read_text())
    assert sorted(record["workers"]) == ["0", "1"] and record["pairs"] == 3 and record["pairs_per_s"] > 0
    assert ray.is_initialized()
    # the run's actors are gone: Ray reports their freed CPUs a moment after they are killed
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == 2
