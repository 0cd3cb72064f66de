"""``p2p dataset``'s executors without a cluster: worker defaults, devices and threads, the
throughput record, the Ray scheduler's resubmission (on a stand-in for Ray) and ``--ray`` when
Ray is not installed."""

from __future__ import annotations

import sys
import types

import pytest

from prompt2prompt import dataset, dataset_ray
from prompt2prompt.cli import main


def test_default_workers_and_devices():
    assert dataset.default_workers("cuda", 4) == 4 and dataset.default_workers("cpu", 4) == 1
    assert dataset.default_workers("cuda:1", 4) == 1 and dataset.default_workers("cuda", 0) == 1
    assert [dataset.worker_device("cuda", k, 2) for k in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert dataset.worker_device("cuda:1", 3, 2) == "cuda:1" and dataset.worker_device("cpu", 1, 0) == "cpu"


def test_worker_threads(monkeypatch):
    assert dataset.worker_threads(2, 8, None) == 4 and dataset.worker_threads(3, 2, None) == 1
    assert dataset.worker_threads(2, 8, 3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert dataset.requested_threads() == 2
    for text in ("", "0", "x"):
        monkeypatch.setenv("OMP_NUM_THREADS", text)
        assert dataset.requested_threads() is None


def test_throughput_rates_and_line():
    rates = dataset.Throughput(wall_seconds=10.0)
    rates.add(0, 2.0, 4, 0.1)
    rates.add(0, 2.0, 4, 0.3)
    rates.add(1, 5.0, 4, 0.2)
    record = rates.record()
    assert record["workers"]["0"]["pairs_per_s"] == pytest.approx(0.5) and record["workers"]["1"]["pairs_per_s"] == pytest.approx(0.2)
    assert record["pairs_per_s"] == pytest.approx(0.7) and record["candidates_per_s"] == pytest.approx(2.8)
    assert record["wall_pairs_per_s"] == pytest.approx(0.3) and record["write_seconds_median"] == pytest.approx(0.2)
    assert rates.line().startswith("2 workers: 0.70 pairs/s in total (2.80 candidates/s); worker 0: 0.50, worker 1: 0.20;")


@pytest.mark.parametrize("resources, workers, device, expected", [
    ({"CPU": 16, "GPU": 4}, None, None, (4, {"num_gpus": 1}, "cuda")),
    ({"CPU": 16, "GPU": 4}, 2, "cuda:1", (2, {"num_gpus": 1}, "cuda")),
    ({"CPU": 16, "GPU": 4}, None, "cpu", (dataset_ray.RAY_CPU_WORKERS, {"num_cpus": 1}, "cpu")),
    ({"CPU": 2}, None, None, (2, {"num_cpus": 1}, "cpu")),
    ({"CPU": 2}, 1, "cpu", (1, {"num_cpus": 1}, "cpu")),
])
def test_actor_plan(resources, workers, device, expected):
    assert dataset_ray.actor_plan(resources, workers, device) == expected


@pytest.mark.parametrize("resources, workers, device, message", [
    ({"CPU": 16, "GPU": 2}, 3, None, "--workers 3 needs 3 GPUs; the Ray cluster has 2"),
    ({"CPU": 2}, 3, None, "--workers 3 needs 3 CPUs"),
    ({"CPU": 2}, None, "cuda", "the Ray cluster has no GPUs"),
])
def test_actor_plan_refuses_what_the_cluster_cannot_hold(resources, workers, device, message):
    with pytest.raises(dataset.DatasetError, match=message):
        dataset_ray.actor_plan(resources, workers, device)


class _Died(Exception):
    pass


class _FakeRay:
    """Enough of Ray for `dataset_ray.schedule`: calls finish at once; ``dead`` actors raise RayActorError."""

    exceptions = types.SimpleNamespace(RayActorError=_Died, RayError=Exception)

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref()


class _FakeActor:
    def __init__(self, index, dead=False):
        self.index, self.dead, self.calls = index, dead, []
        self.run = types.SimpleNamespace(remote=self._remote)

    def _remote(self, pair):
        self.calls.append(pair.line)

        def result():
            if self.dead:
                raise _Died(f"actor {self.index} died\ntraceback...")
            return {"line": pair.line, "worker": self.index}
        return result


def test_schedule_gives_a_dead_actors_pair_to_another():
    pairs = [dataset.Pair(n, "a", "b") for n in range(5)]
    alive, dead = _FakeActor(0), _FakeActor(1, dead=True)
    results = list(dataset_ray.schedule(_FakeRay(), [alive, dead], pairs))
    assert sorted(r["line"] for r in results) == list(range(5)) and all("error" not in r for r in results)
    assert dead.calls == [1] and sorted(alive.calls) == list(range(5))  # the dead one's pair ran once more, on the live one


def test_schedule_reports_pairs_when_every_actor_died():
    pairs = [dataset.Pair(n, "a", "b") for n in range(3)]
    results = list(dataset_ray.schedule(_FakeRay(), [_FakeActor(0, dead=True), _FakeActor(1, dead=True)], pairs))
    assert sorted(r["line"] for r in results) == [0, 1, 2]
    assert all(r["error"].startswith("worker failed") for r in results)
    assert any("every Ray actor died" in r["error"] for r in results)


def test_ray_flag_without_ray_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"input": "a red circle", "output": "a red square"}\n', encoding="utf-8")
    for extra in ([], ["127.0.0.1:6379"]):
        code = main(["dataset", str(pairs), "-o", str(tmp_path / "out"), "--ray", *extra])
        _, err = capsys.readouterr()
        assert code == 2 and err.strip() == f"p2p dataset: error: {dataset_ray.RAY_EXTRA}"
    assert not (tmp_path / "out").exists()


def test_bad_ray_address_and_device(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"input": "a red circle", "output": "a red square"}\n', encoding="utf-8")
    with pytest.raises(dataset.DatasetError, match="--ray's address"):
        dataset_ray.RayCluster(" auto")
    code = main(["dataset", str(pairs), "-o", str(tmp_path / "out"), "--ray", "auto", "--device", "gpu"])
    _, err = capsys.readouterr()
    assert code == 2 and "--device must be cpu, cuda, cuda:N or mps, got 'gpu'" in err


def test_unreachable_ray_address_refused_before_any_work(tmp_path, capsys):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
    import socket

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"input": "a red circle", "output": "a red square"}\n', encoding="utf-8")
    code = main(["dataset", str(pairs), "-o", str(tmp_path / "out"), "--ray", f"127.0.0.1:{port}"])
    _, err = capsys.readouterr()
    assert code == 2 and f"nothing answers at 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    dataset_ray.check_reachable("auto")  # not an address to probe
    dataset_ray.check_reachable(None)
