"""``p2p dataset --ray``: the pairs run on Ray actors, the driver writes the data.

One actor per worker, each a `dataset.PairWorker` holding one pipeline (loaded once, in the
actor's constructor); an actor reserves one GPU when the cluster has GPUs, else one CPU. The
driver hands each idle actor the next pair, one pair in flight per actor, and writes each result
as `dataset.make_dataset` does for the local run: the writer, the manifest and resume stay in one
process, so the output is the same as on one machine.

Fault tolerance: an actor that dies is restarted by Ray (``max_restarts``) and its in-flight pair
run again on it (``max_task_retries``); an actor past its restarts is dropped and its pair given to
another actor. A pair's result is written once, when its one successful call returns.

Ray is imported only here, and only when ``--ray`` is given (`import_ray`).
"""

from __future__ import annotations

import collections
import logging
import re
import socket
from dataclasses import dataclass

from .dataset import DatasetError, DatasetSettings, Pair, PairWorker, requested_threads

#: What to install when Ray is missing.
RAY_EXTRA = "install the ray extra: pip install -e '.[ray]'"
#: Seconds to wait for a TCP answer from ``--ray HOST:PORT`` (Ray itself retries for minutes).
CONNECT_TIMEOUT_S = 5
#: Restarts of a dead actor, and retries of its in-flight call on the restarted actor.
RAY_RESTARTS = 3
#: Runs of a pair on other actors after its actor is gone for good.
RAY_PAIR_ATTEMPTS = 3
#: ``--workers``' default on a cluster without GPUs: one single-threaded actor per CPU, at most this
#: many (each holds a copy of the model; ``--workers`` goes past it).
RAY_CPU_WORKERS = 8


@dataclass(frozen=True)
class RayCluster:
    """Where ``--ray`` runs the pairs: ``address`` None starts or joins a local Ray (``ray.init()``),
    else ``ray.init(address=...)`` (``auto``, ``HOST:6379``, ``ray://HOST:10001``). Pass it as
    `dataset.make_dataset`'s ``ray``."""

    address: str | None = None

    def __post_init__(self):
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip() or self.address != self.address.strip()):
            raise DatasetError(f"--ray's address must be auto, HOST:PORT or ray://HOST:PORT, got {self.address!r}")

    def pair_results(self, pairs: list[Pair], settings: DatasetSettings, device: str | None, workers: int | None,
                     allow_pickle: bool, hook=None):
        """`ray_pair_results` on this cluster (``device`` None or ``auto``: the cluster's GPUs if any, else cpu)."""
        return ray_pair_results(pairs, settings, None if device in (None, "auto") else device, workers, allow_pickle, self, hook)


def import_ray():
    """The ``ray`` module, or `DatasetError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DatasetError(RAY_EXTRA) from None
    return ray


def check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """`DatasetError` unless something answers at ``[ray://]HOST:PORT`` (None, ``auto``, ``local``: not checked)."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d+)", address or "")
    if match is None:
        return
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise DatasetError(f"nothing answers at {address} ({err.strerror or type(err).__name__}); start the cluster's head "
                           "with `ray start --head` and give its address, or --ray auto on a machine of the cluster") from None


def connect(ray, cluster: RayCluster) -> bool:
    """Start or join Ray unless this process already has (`RayCluster`); True when this call did
    (the caller shuts it down after). `DatasetError` when the cluster cannot be reached."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, ImportError) as err:  # ImportError: ray:// without ray[client]
        where = "a local Ray" if cluster.address is None else f"Ray at {cluster.address}"
        raise DatasetError(f"could not start or reach {where}: {' '.join(str(err).split())}; "
                           "start one with `ray start --head` and pass --ray auto, or check the address") from None
    return True


def actor_plan(resources: dict, workers: int | None, device: str | None) -> tuple[int, dict, str]:
    """``(actors, each actor's resource request, its device)`` for a cluster's ``ray.cluster_resources()``.

    With GPUs (and ``device`` None or cuda): one GPU an actor, ``workers`` defaulting to the GPU
    count; an actor sees its GPU as ``cuda``. Else one CPU an actor, ``workers`` defaulting to the
    CPU count capped at `RAY_CPU_WORKERS`. More actors than the cluster can hold is a `DatasetError`.
    """
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus > 0 and (device is None or device.startswith("cuda")):
        count = gpus if workers is None else workers
        if count > gpus:
            raise DatasetError(f"--workers {count} needs {count} GPUs; the Ray cluster has {gpus}: use --workers {gpus} or fewer")
        return count, {"num_gpus": 1}, "cuda"
    if device is not None and device.startswith("cuda"):
        raise DatasetError(f"--device {device}: the Ray cluster has no GPUs; leave --device out or use --device cpu")
    if device == "mps":
        raise DatasetError("--device mps is not supported on Ray; leave --device out or use --device cpu")
    count = max(1, min(cpus, RAY_CPU_WORKERS)) if workers is None else workers
    if count > cpus:
        raise DatasetError(f"--workers {count} needs {count} CPUs; the Ray cluster has {cpus}: use --workers {max(cpus, 1)} or fewer")
    return count, {"num_cpus": 1}, "cpu"


def ray_pair_results(pairs: list[Pair], settings: DatasetSettings, device: str | None, workers: int | None,
                     allow_pickle: bool, cluster: RayCluster, hook=None):
    """Yield each pair's result (`PairWorker.run`) from Ray actors, as they finish (`schedule`)."""
    ray = import_ray()
    if not pairs:
        return
    started = connect(ray, cluster)
    actors = []
    try:
        count, request, device = actor_plan(ray.cluster_resources(), workers, device)
        actor = ray.remote(PairWorker).options(max_restarts=RAY_RESTARTS, max_task_retries=RAY_RESTARTS, **request)
        threads = requested_threads()  # else Ray's own: OMP_NUM_THREADS = the actor's CPUs
        actors = [actor.remote(settings, device, index, threads, allow_pickle, None, hook) for index in range(min(count, len(pairs)))]
        yield from schedule(ray, actors, pairs)
    finally:
        for handle in actors:
            ray.kill(handle, no_restart=True)  # free their GPUs/CPUs for the cluster's next job
        if started:
            ray.shutdown()


def schedule(ray, actors: list, pairs: list[Pair], attempts: int = RAY_PAIR_ATTEMPTS):
    """Yield each pair's result, one pair in flight per actor. An actor that Ray gives up on
    (`ray.exceptions.RayActorError` past its restarts) is dropped and its pair queued again, up to
    ``attempts`` times; then, or when no actor is left, the pair is reported failed (a rerun
    resumes it)."""
    queue = collections.deque(pairs)
    idle = list(actors)
    running = {}  # object ref -> (actor, pair)
    tries = collections.Counter()
    while queue or running:
        while queue and idle:
            handle, pair = idle.pop(0), queue.popleft()
            running[handle.run.remote(pair)] = (handle, pair)
        if not running:  # every actor is gone
            for pair in queue:
                yield {"line": pair.line, "error": "worker failed: every Ray actor died; run the command again to resume"}
            return
        (ref,), _ = ray.wait(list(running), num_returns=1)
        handle, pair = running.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            tries[pair.line] += 1
            if tries[pair.line] < attempts:
                queue.appendleft(pair)
            else:
                yield {"line": pair.line, "error": f"worker failed: {type(err).__name__}: {_first_line(err)}"}
            continue  # the actor is not used again
        except ray.exceptions.RayError as err:  # the call raised (a hook, a pickling error): the actor lives on
            result = {"line": pair.line, "error": f"worker failed: {type(err).__name__}: {_first_line(err)}"}
        idle.append(handle)
        yield result


def _first_line(err: Exception) -> str:
    """An exception's first non-empty line (Ray's carry tracebacks)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
