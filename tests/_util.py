"""Test helpers."""

import signal
import subprocess
import time
from collections.abc import Callable, Sequence

import torch


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to floating-point precision relative to the data's scale (random tiny models give
    latents up to ~10, where fp32 batch-layout differences reach ~1e-5)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(1.0, b.abs().max().item())
    diff = (a - b).abs().max().item()
    assert diff <= rel * scale, f"max difference {diff:.3g} exceeds {rel:g} x scale {scale:.3g}"


def run_killed(command: Sequence[str], env: dict, progress: Callable[[], int], delay: float, timeout: float = 120.0,
               **popen) -> bool:
    """Start ``command``; once ``progress()`` grows past its value at the start (or the process
    ends, or ``timeout`` s pass), wait ``delay`` s and SIGKILL it. Returns whether the kill found
    it still running. ``popen``: more `subprocess.Popen` keywords (stdout and stderr default to
    DEVNULL)."""
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    before = progress()
    process = subprocess.Popen(list(command), env=env, **popen)
    deadline = time.monotonic() + timeout
    while process.poll() is None and progress() == before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return running
