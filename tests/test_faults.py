"""Faults during writes and non-finite numbers (issue 32), on the bundled shapes model at 2 steps.

Each write fault is tried two ways: for real, on a small tmpfs this test mounts (filled up, or
remounted read-only, between two results), which needs root and is skipped with its reason
elsewhere; and simulated everywhere, by making `imageio.write_temp` raise the same ``OSError``. A
removed output folder needs no mount. What must hold: a one-line error naming the folder, exit
status 1 (the web page: `imageio.WriteError` under the form), no file under its final name that does
not open whole, no temporary file left, the earlier results intact, and a rerun that finishes the
rest without redoing them.

Kill at random points: ``p2p batch`` SIGKILLed at random moments and rerun each time (3 kills, or
20 with ``--slow``); ``p2p dataset``'s kill test is in test_dataset.py.

Non-finite numbers: a forward hook that writes infinity into the UNet's output (an fp16 overflow)
or NaN into the VAE decoder's, registered here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prompt2prompt import NonFiniteError, cli, imageio
from prompt2prompt.cli import main
from prompt2prompt.finite import FLOAT16_ADVICE, FiniteWatch

from _util import run_killed

REPO = Path(__file__).resolve().parents[1]
SRC = "a red circle on a blue background"
TARGETS = ["a red square on a blue background", "a green circle on a blue background", "a red star on a blue background"]
STEPS = ["--steps", "2"]


# ============================================================================ helpers


@pytest.fixture(scope="module")
def shapes_pipe():
    """The bundled model, loaded once for the module (the commands below get it instead of loading)."""
    return cli.load_pipeline(None, "float32", "cpu", progress=False)


@pytest.fixture
def loaded(monkeypatch, shapes_pipe):
    """``p2p`` commands run in this process use ``shapes_pipe``."""
    monkeypatch.setattr(cli, "load_pipeline", lambda *args, **kwargs: shapes_pipe)
    return shapes_pipe


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted at a new folder (unmounted after the test); skipped, with the reason,
    where this process may not mount (the simulated tests cover the same code everywhere)."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder))
    except (OSError, subprocess.CalledProcessError) as err:
        reason = getattr(err, "stderr", None) or err
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission: {str(reason).strip()}); "
                    "the simulated form of this fault runs instead")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def fill(folder: Path) -> Path:
    """Write a ballast file into ``folder`` until its file system is full; returns the ballast's path."""
    ballast = folder / "ballast"
    chunk = b"\0" * 65536
    with open(ballast, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    for size in (4096, 1):  # what the last chunk left
        try:
            with open(ballast, "ab", buffering=0) as handle:
                while True:
                    handle.write(b"\0" * size)
        except OSError:
            pass
    return ballast


def read_only(folder: Path) -> None:
    _mount("-o", "remount,ro", str(folder))


@contextlib.contextmanager
def failing_writes(monkeypatch, code: int, allowed: int = 1):
    """From entering the block, `imageio.write_temp` writes ``allowed`` more files, then raises
    ``OSError(code)`` (a commit that fails part way: earlier temporary files of it exist)."""
    real = imageio.write_temp
    left = [allowed]

    def write_temp(path, data):
        if left[0] <= 0:
            raise OSError(code, os.strerror(code), str(path))
        left[0] -= 1
        return real(path, data)

    monkeypatch.setattr(imageio, "write_temp", write_temp)
    yield
    monkeypatch.setattr(imageio, "write_temp", real)


def check_files(root: Path, temporaries: bool = False) -> list[Path]:
    """Every file below ``root`` is whole: each PNG opens and carries its metadata, each JSON
    parses, each Parquet shard reads; no temporary file (unless ``temporaries``: a killed run's).
    Returns the PNGs."""
    assert temporaries or not list(root.rglob(f"{imageio.TEMP_PREFIX}*")), "a temporary file was left"
    pngs = sorted(root.rglob("*.png"))
    for png in pngs:
        meta = imageio.read_png_metadata(png)
        assert meta is not None and meta["image"]["file"] == png.name, png
    for path in root.rglob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))
    for path in root.rglob("*.parquet"):
        import pyarrow.parquet as pq

        pq.read_table(path)
    return pngs


def one_error_line(err: str, prefix: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def write_batch(path: Path, targets=TARGETS) -> Path:
    path.write_text("".join(json.dumps({"prompt": SRC, "to": [t], "seed": k}) + "\n" for k, t in enumerate(targets)))
    return path


def between_lines(monkeypatch, fault) -> list[Path]:
    """Run ``fault()`` after the first line of a batch, before the second; returns the folders run."""
    real = cli.run_batch_line
    started: list[Path] = []

    def run_line(pipe, options, folder, env, console):
        if len(started) == 1:
            fault()
        started.append(folder)
        return real(pipe, options, folder, env, console)

    monkeypatch.setattr(cli, "run_batch_line", run_line)
    return started


# ============================================================================ the library's write helpers


@pytest.mark.parametrize("code, problem, remedy", [
    (errno.ENOSPC, "no space left on device", "free space"),
    (errno.EROFS, "read-only file system", "make it writable"),
    (errno.ENOENT, "the folder vanished", "restore it"),
    (errno.EIO, os.strerror(errno.EIO).lower(), "check it"),
])
def test_write_error_names_the_folder_and_the_fix(tmp_path, code, problem, remedy):
    err = imageio.write_error(OSError(code, os.strerror(code)), tmp_path)
    assert isinstance(err, ValueError) and err.errno == code and err.folder == tmp_path
    assert str(err).startswith(f"{problem}") and f"writing into {tmp_path}: {remedy} or choose another output folder" in str(err)
    assert str(err.choose("another -o folder")).endswith(f"{remedy} or choose another -o folder")


def test_a_failed_write_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    imageio.atomic_write_json(target, {"n": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imageio.os, "fsync", full)  # inside write_temp, after the data went to the file
    with pytest.raises(imageio.WriteError, match=f"no space left on device writing into {tmp_path}"):
        imageio.atomic_write_json(target, {"n": 2})
    assert json.loads(target.read_text()) == {"n": 1}  # the earlier file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_safetensors_io_error_becomes_a_write_error(tmp_path, monkeypatch):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(imageio.WriteError, match="no space left on device"):
        imageio.save_tensor_file(tmp_path / "x", {"a": torch.zeros(2)}, {}, "test")
    assert list(tmp_path.iterdir()) == []


def test_append_is_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "manifest.jsonl"
    imageio.append_bytes(path, b'{"line": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a short write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imageio.os, "write", half_then_full)
    with pytest.raises(imageio.WriteError, match="no space left"):
        imageio.append_bytes(path, b'{"line": 2, "more": "text"}\n')
    monkeypatch.undo()
    assert path.read_bytes() == b'{"line": 1}\n'


def test_output_set_does_not_make_a_removed_root_again(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    files = imageio.OutputSet(root / "one", root)
    files.add_json("result.json", {})
    shutil.rmtree(root)
    with pytest.raises(imageio.WriteError, match=f"the folder vanished .* writing into {root}: restore it"):
        files.commit()
    assert not root.exists()


# ============================================================================ p2p batch


FAULTS = {  # name -> (needs the tmpfs, the expected problem and fix)
    "disk full": (True, "no space left on device writing into {}: free space"),
    "read-only": (True, "read-only file system writing into {}: make it writable"),
    "removed": (False, "the folder vanished (removed or unmounted while running) writing into {}: restore it"),
    "disk full, simulated": (False, "no space left on device writing into {}: free space"),
    "read-only, simulated": (False, "read-only file system writing into {}: make it writable"),
}


def _fault(name: str, root: Path, monkeypatch, stack: contextlib.ExitStack):
    """The fault ``name`` applied to ``root`` now."""
    if name == "disk full":
        fill(root)
    elif name == "read-only":
        read_only(root)
    elif name == "removed":
        shutil.rmtree(root)
    else:
        stack.enter_context(failing_writes(monkeypatch, errno.ENOSPC if "disk" in name else errno.EROFS))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_batch_stops_at_a_write_fault_and_keeps_what_it_wrote(fault, loaded, capsys, tmp_path, monkeypatch, request):
    mounted, problem = FAULTS[fault]
    base = request.getfixturevalue("tmpfs") if mounted else tmp_path
    root = base / "out"
    jsonl = write_batch(tmp_path / "edits.jsonl")
    with contextlib.ExitStack() as stack:
        started = between_lines(monkeypatch, lambda: _fault(fault, base if mounted else root, monkeypatch, stack))
        code, out, err = run(capsys, "batch", jsonl, "-o", root, *STEPS, "--quiet")
    assert code == 1 and len(started) == 2  # stopped at the second line: the third never started
    line = one_error_line(err, "p2p batch: error: stopped: ")
    assert line == f"p2p batch: error: stopped: {problem.format(root)} or choose another -o folder"
    assert "batch: 1 done, 0 skipped (finished earlier), 0 failed, 2 not finished" in out
    if fault == "removed":
        assert not root.exists()  # not made again
        return
    assert [p.name for p in root.iterdir()] == [started[0].name]  # the second line left nothing
    pngs = check_files(root)
    assert sorted(p.name for p in pngs) == ["edit-1.png", "grid.png", "source.png"]
    if fault == "read-only":
        return
    if fault == "disk full":
        (base / "ballast").unlink()
    monkeypatch.undo()  # the rerun: no fault, every line in its place
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: loaded)
    first = (started[0] / "result.json").stat()
    code, out, err = run(capsys, "batch", jsonl, "-o", root, *STEPS, "--quiet")
    assert code == 0 and "batch: 2 done, 1 skipped (finished earlier), 0 failed" in out, err
    assert (started[0] / "result.json").stat().st_ino == first.st_ino  # the first line was not redone
    assert len(check_files(root)) == 9


def test_batch_with_workers_stops_when_its_folder_is_removed(capsys, tmp_path, monkeypatch, slow_mode):
    """``--workers 2`` (each worker loads the model: --slow only): the folder removed after the
    first line is done; the lines not started are cancelled, and the error is the same one line."""
    if not slow_mode:
        pytest.skip("two worker processes each load the model; runs with --slow")
    root = tmp_path / "out"
    jsonl = write_batch(tmp_path / "edits.jsonl", TARGETS + ["a red heart on a blue background", "a red ring on a blue background"])
    real = cli.Console.info

    def info(console, text):
        real(console, text)
        if "done ->" in text and root.exists():
            shutil.rmtree(root)

    monkeypatch.setattr(cli.Console, "info", info)
    code, out, err = run(capsys, "batch", jsonl, "-o", root, *STEPS, "--workers", "2")
    line = one_error_line(err, "p2p batch: error: stopped: ")
    assert code == 1 and line.endswith(f"the folder vanished (removed or unmounted while running) writing into {root}: "
                                       "restore it or choose another -o folder")
    assert "0 failed" in out and "not finished" in out and not root.exists()


# ============================================================================ p2p edit and p2p dataset


@pytest.mark.parametrize("mounted", [True, False], ids=["tmpfs", "simulated"])
def test_edit_on_a_full_disk_fails_in_one_line_and_leaves_the_earlier_result(mounted, loaded, capsys, tmp_path, monkeypatch, request):
    base = request.getfixturevalue("tmpfs") if mounted else tmp_path
    code, _, _ = run(capsys, "edit", SRC, "--to", TARGETS[0], "-o", base / "first", *STEPS, "--quiet")
    assert code == 0
    before = {p: p.read_bytes() for p in (base / "first").iterdir()}
    with contextlib.ExitStack() as stack:
        if mounted:
            fill(base)
        else:
            stack.enter_context(failing_writes(monkeypatch, errno.ENOSPC, allowed=2))
        code, out, err = run(capsys, "edit", SRC, "--to", TARGETS[1], "-o", base / "second", *STEPS, "--quiet")
    assert code == 1 and out == ""
    line = one_error_line(err, "p2p edit: error: ")
    assert line == f"p2p edit: error: no space left on device writing into {base / 'second'}: free space or choose another -o folder"
    assert not (base / "second").exists()
    assert {p: p.read_bytes() for p in (base / "first").iterdir()} == before
    assert len(check_files(base / "first")) == 3


def _dataset_pairs(path: Path) -> Path:
    path.write_text("".join(json.dumps({"input": SRC, "output": t}) + "\n" for t in TARGETS), encoding="utf-8")
    return path


DATASET_FLAGS = ["--samples-per-pair", "1", "--keep", "1", "--steps", "2", "--min-score", "0", "--seed", "5", "--quiet"]


@pytest.mark.parametrize("mounted", [True, False], ids=["tmpfs", "simulated"])
def test_dataset_on_a_full_disk_fails_in_one_line_and_resumes(mounted, loaded, capsys, tmp_path, monkeypatch, request):
    pytest.importorskip("pyarrow")
    from prompt2prompt import dataset

    base = request.getfixturevalue("tmpfs") if mounted else tmp_path
    root = base / "data"
    pairs = _dataset_pairs(tmp_path / "pairs.jsonl")
    real_add = dataset.DatasetWriter.add
    with contextlib.ExitStack() as stack:
        def add_then_fill(writer, result):
            real_add(writer, result)
            if len(writer.done) == 1:  # the disk fills up after the first pair
                if mounted:
                    fill(base)
                else:
                    stack.enter_context(failing_writes(monkeypatch, errno.ENOSPC, allowed=0))

        monkeypatch.setattr(dataset.DatasetWriter, "add", add_then_fill)
        code, out, err = run(capsys, "dataset", pairs, "-o", root, *DATASET_FLAGS)
    assert code == 1 and out == ""
    line = one_error_line(err, "p2p dataset: error: ")
    assert line == f"p2p dataset: error: no space left on device writing into {root / dataset.DATA_DIR}: free space or choose another -o folder"
    check_files(root)
    assert [p.name for p in (root / dataset.DATA_DIR).iterdir()] == [dataset.shard_name(1)]
    assert len((root / dataset.MANIFEST).read_text().splitlines()) == 1
    if mounted:
        (base / "ballast").unlink()
    monkeypatch.setattr(dataset.DatasetWriter, "add", real_add)
    code, out, err = run(capsys, "dataset", pairs, "-o", root, *DATASET_FLAGS)
    assert code == 0 and "2 pairs done (1 finished earlier)" in out, err
    assert sorted(p.name for p in (root / dataset.DATA_DIR).iterdir()) == [dataset.shard_name(n) for n in (1, 2, 3)]
    check_files(root)


# ============================================================================ the web page's Editor


def _request(target: str):
    from prompt2prompt.web import parse_request

    return parse_request(SRC, target, "auto", 0.8, 0.4, "", "", 0.3, [["", ""]], 0, 2, 7.5, None, "null-text")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_web_editor_reports_a_write_fault_and_keeps_the_earlier_result(fault, shapes_pipe, tmp_path, monkeypatch, request):
    from prompt2prompt.web import Editor, field_of

    mounted, problem = FAULTS[fault]
    base = request.getfixturevalue("tmpfs") if mounted else tmp_path
    out = base / "web"
    editor = Editor(shapes_pipe, out)
    first = editor.edit(_request(TARGETS[0]))
    folder = Path(first.files[0]).parent
    before = {p: p.read_bytes() for p in folder.iterdir()}
    with contextlib.ExitStack() as stack:
        _fault(fault, base if mounted else out, monkeypatch, stack)
        with pytest.raises(imageio.WriteError) as info:
            editor.edit(_request(TARGETS[1]))
    assert str(info.value) == f"{problem.format(out)} or choose another --output-dir"
    assert field_of(info.value) == "general"  # the page shows it under the form
    if fault == "removed":
        assert not out.exists()
        return
    assert [p.name for p in out.iterdir()] == [folder.name]
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    assert len(check_files(out)) == len(before)


def test_page_shows_a_full_disk_under_the_form(shapes_pipe, tmp_path, monkeypatch):
    """The Edit button's handler (what a click runs): the error in the general slot, no gallery."""
    from test_web import click, page, shown

    from prompt2prompt.web import Editor

    _, handler = page(Editor(shapes_pipe, tmp_path / "web"))
    with failing_writes(monkeypatch, errno.ENOSPC):
        outputs = click(handler)
    assert shown(outputs) == {"general": f"⚠ no space left on device writing into {tmp_path / 'web'}: "
                                         "free space or choose another --output-dir"}
    assert list((tmp_path / "web").iterdir()) == []


# ============================================================================ kill at random points


#: (kills, lines) of the batch killed at random points: the reduced form, and with ``--slow``
#: (a killed run finishes a line or two, so there are lines enough for every kill to find work).
BATCH_KILLS = {False: (3, 12), True: (20, 80)}


def _stats(root: Path) -> dict[str, int]:
    """Line folder -> inode of its result.json (a line redone would rename a new one into place)."""
    return {p.parent.name: p.stat().st_ino for p in root.glob("line-*/result.json")}


def test_batch_killed_at_random_points_does_every_line_once(tmp_path, capsys, loaded, slow_mode):
    """``p2p batch`` SIGKILLed a random delay (0 to 1.5 s) after it announces a line's edit (its
    images made, its files about to be written), rerun each time, then run to the end."""
    kills, count = BATCH_KILLS[slow_mode]
    words = ["square", "star", "heart", "ring", "triangle", "cross"]
    colours = ["red", "green", "yellow", "white"]
    targets = [f"a {colours[k // len(words) % len(colours)]} {words[k % len(words)]} on a blue background" for k in range(count)]
    jsonl = write_batch(tmp_path / "edits.jsonl", targets)
    root = tmp_path / "out"
    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "prompt2prompt.cli", "batch", str(jsonl), "-o", str(root), *STEPS]
    rng = random.Random(32)
    finished: dict[str, int] = {}
    for kill in range(1, kills + 1):
        with open(log, "w") as handle:
            running = run_killed(command, env, lambda: log.read_text().count("edit mode:"), rng.uniform(0.0, 1.5), stdout=handle)
        assert running, "the batch ended before the kill"
        now = _stats(root)
        assert {k: now[k] for k in finished} == finished  # nothing finished was redone (or lost)
        finished = now
        check_files(root, temporaries=True)  # whatever is under a final name is whole
        if slow_mode:
            with capsys.disabled():  # the long form's log of each kill
                print(f"batch kill {kill}: {len(finished)} of {count} lines finished, "
                      f"{len(list(root.rglob(imageio.TEMP_PREFIX + '*')))} temporary files left by the kill", flush=True)
    assert len(finished) < count
    code, out, err = run(capsys, "batch", jsonl, "-o", root, *STEPS, "--quiet")
    assert code == 0 and f"{count - len(finished)} done, {len(finished)} skipped (finished earlier), 0 failed" in out, err
    now = _stats(root)
    assert {k: now[k] for k in finished} == finished and len(now) == count == len(list(root.iterdir()))
    check_files(root)
    for folder in root.iterdir():
        number = int(folder.name.split("-")[1])
        result = json.loads((folder / "result.json").read_text())
        assert result["options"]["to"] == [targets[number - 1]] and result["options"]["seed"] == number - 1
        meta = imageio.read_png_metadata(folder / "edit-1.png")
        assert meta["image"]["prompt"] == targets[number - 1] and meta["options"]["seed"] == number - 1


# ============================================================================ non-finite numbers


@contextlib.contextmanager
def overflow(module: torch.nn.Module, at_calls, value=float("inf")):
    """A forward hook on ``module`` writing ``value`` into part of its output at the given 1-based
    calls (an fp16 overflow); removed on leaving."""
    calls = [0]

    def hook(_module, _args, output):
        calls[0] += 1
        if calls[0] in at_calls:
            output = output.clone()
            output[..., :2, :2] = value  # a corner of every channel
            return output
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_nonfinite_latents_name_their_step(pipe):
    with overflow(pipe.unet.conv_out, {3}), pytest.raises(NonFiniteError) as info:
        pipe(SRC, [TARGETS[0]], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    assert str(info.value).startswith("non-finite latents at step 3 of 5 (in float32)")
    assert info.value.step == 3 and info.value.steps == 5 and isinstance(info.value, ValueError)


def test_nonfinite_pixels_are_refused(pipe):
    with overflow(pipe.vae.decoder, {1}, float("nan")), pytest.raises(NonFiniteError, match="non-finite pixels from the VAE decoder"):
        pipe(SRC, [TARGETS[0]], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")


def test_deferred_watch_names_the_first_bad_step():
    """Off the CPU the flags stay on the device until the loop ends; the step named is the first."""
    watch = FiniteWatch(4, "cpu", eager=False)
    good = torch.zeros(1, 4, 2, 2)
    watch.step(0, good)
    watch.step(1, good.clone().fill_(float("inf")))
    watch.step(2, good.clone().fill_(float("nan")))
    watch.step(3, good)
    with pytest.raises(NonFiniteError, match="non-finite latents at step 2 of 4"):
        watch.finish()
    clean = FiniteWatch(2, "cpu", eager=False)
    clean.step(0, good)
    clean.step(1, good)
    clean.finish()


def test_float16_message_advises_another_dtype():
    err = NonFiniteError("latents", torch.float16, 7, 50)
    assert str(err) == f"non-finite latents at step 7 of 50 (float16 overflow?): {FLOAT16_ADVICE}"


def test_cli_edit_and_batch_write_no_image_from_nonfinite_latents(loaded, capsys, tmp_path, monkeypatch):
    with overflow(loaded.unet.conv_out, {2}):
        code, out, err = run(capsys, "edit", SRC, "--to", TARGETS[0], "-o", tmp_path / "edit", *STEPS, "--quiet")
    assert code == 1 and out == ""
    assert one_error_line(err, "p2p edit: error: ").startswith("p2p edit: error: non-finite latents at step 2 of 2")
    assert not (tmp_path / "edit").exists()

    jsonl = write_batch(tmp_path / "edits.jsonl", TARGETS[:2])
    real = cli.run_batch_line

    def second_overflows(pipe, options, folder, env, console):
        if "green" not in options["to"][0]:
            return real(pipe, options, folder, env, console)
        with overflow(pipe.unet.conv_out, {1}):
            return real(pipe, options, folder, env, console)

    monkeypatch.setattr(cli, "run_batch_line", second_overflows)
    code, out, err = run(capsys, "batch", jsonl, "-o", tmp_path / "batch", *STEPS, "--quiet")
    assert code == 1 and "batch: 1 done, 0 skipped (finished earlier), 1 failed" in out
    assert "line 2 failed: non-finite latents at step 1 of 2" in out
    assert [p.name for p in (tmp_path / "batch").iterdir()] == ["line-1-a-red-square-on-a-blue-background"]
    check_files(tmp_path / "batch")


def test_web_editor_writes_no_image_from_nonfinite_pixels(shapes_pipe, tmp_path):
    from prompt2prompt.web import Editor, field_of

    editor = Editor(shapes_pipe, tmp_path / "web")
    with overflow(shapes_pipe.vae.decoder, {1}, float("nan")), pytest.raises(NonFiniteError) as info:
        editor.edit(_request(TARGETS[0]))
    assert field_of(info.value) == "general" and "non-finite pixels" in str(info.value)
    assert list((tmp_path / "web").iterdir()) == []
