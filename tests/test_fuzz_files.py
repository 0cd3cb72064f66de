"""Fuzzing the readers of untrusted files (issue 32): PNG metadata (``p2p info``, ``p2p edit --from``),
batch JSONL, saved inversions and source passes, and model folders.

Each damaged or hostile file must give a one-line error (the command line: exit 1 or 2, no
traceback; the library: a `ValueError`), allocate no unbounded memory (a file claiming terabytes
is refused by its size, not read: `tracemalloc`'s peak stays small), and run nothing (no process
is started; a stored ``$(touch ...)`` leaves no file). The mutations come from hypothesis, so the
number of files tried follows the profile (tests/conftest.py) and `_generated.TRIED` counts them.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import struct
import subprocess
import tracemalloc
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _generated import AWKWARD, any_float, examples, junk, prompts, record_counts, time_limit, tried  # noqa: F401
from prompt2prompt import imageio
from prompt2prompt.inversion import Inversion
from prompt2prompt.source_pass import SourcePass

FIXTURES = [HealthCheck.function_scoped_fixture]
SRC = "a cat riding a bicycle"
TGT = "a dog riding a bicycle"
#: Peak of Python allocations (tracemalloc) allowed while one hostile file is read.
MEMORY_LIMIT = 32 * 2**20


class StopBeforeModel(Exception):
    """Raised where ``p2p`` would load or run the model: the command got past every check of its files."""


def _stop(*args, **kwargs):
    raise StopBeforeModel("the checks passed; the test stops before the model runs")


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder in which nothing may start a process, and ``p2p`` stops before any model work."""
    from prompt2prompt import cli

    def no_process(*args, **kwargs):
        raise AssertionError(f"a hostile file started a process: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(os, "system", no_process)
    monkeypatch.setattr(os, "posix_spawn", no_process, raising=False)
    monkeypatch.setattr(cli, "load_pipeline", _stop)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(argv: list[str]) -> tuple[int, str, str, int]:
    """``p2p`` in this process: ``(exit status, stdout, stderr, peak bytes of Python allocations)``."""
    from prompt2prompt import cli

    out, err = io.StringIO(), io.StringIO()
    tracemalloc.start()
    try:
        with redirect_stdout(out), redirect_stderr(err), time_limit():
            code = cli.main(argv)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return code, out.getvalue(), err.getvalue(), peak


def assert_clean_failure(code: int, out: str, err: str, peak: int, allowed=(1, 2), limit: int = MEMORY_LIMIT) -> None:
    """A refused file: the exit status, one line on stderr, no traceback, no unexpected exception, bounded memory."""
    assert code in allowed, (code, out, err)
    assert "Traceback" not in out + err
    assert err.strip() and "\n" not in err.strip(), f"not one line: {err!r}"
    assert "--debug shows the traceback" not in err, f"an unexpected exception: {err!r}"
    assert peak < limit, f"reading the file allocated {peak / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------ PNG metadata


def chunk(kind: bytes, data: bytes, length: int | None = None) -> bytes:
    """One PNG chunk: length, type, data, CRC (``length`` overrides the stored length: a lying chunk)."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data) if length is None else length) + kind + data + struct.pack(">I", crc)


def png_with_chunks(*extra: bytes) -> bytes:
    """A valid 4x4 PNG with ``extra`` chunks inserted before its image data."""
    data = imageio.png_bytes(PIL.Image.new("RGB", (4, 4)))
    at = data.index(b"IDAT") - 4
    return data[:at] + b"".join(extra) + data[at:]


def itxt(key: str, text: bytes, compressed: bool = False) -> bytes:
    """An iTXt chunk's data: keyword, compression flag and method, empty language and translated keyword, text."""
    return key.encode() + b"\0" + (b"\1\0" if compressed else b"\0\0") + b"\0\0" + text


def stored_png(folder: Path, meta) -> Path:
    """A PNG carrying ``meta`` as its ``prompt2prompt`` JSON (any JSON value, as a hostile writer might store)."""
    path = folder / "stored.png"
    data = png_with_chunks(chunk(b"iTXt", itxt(imageio.METADATA_KEY, json.dumps(meta, allow_nan=True).encode())))
    path.write_bytes(data)
    return path


GOOD_META = {"software": "prompt2prompt 0.1.0", "command": "edit", "options": {"prompt": SRC, "to": [TGT], "seed": 3, "steps": 2},
             "model": "bundled shapes model", "image": {"role": "source", "index": 0, "count": 3, "file": "source.png", "prompt": SRC}}

json_values = st.recursive(st.one_of(junk, any_float, prompts), lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)


@st.composite
def hostile_metadata(draw):
    """`GOOD_META` with some fields (top level, ``options`` or ``image``) replaced by random JSON values, or any JSON value."""
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)
    meta = json.loads(json.dumps(GOOD_META))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "options", "image"]))
        table = meta if where == "top" else meta.get(where)
        if not isinstance(table, dict):
            continue
        key = draw(st.sampled_from(sorted(table) + ["mode", "cross_steps", "reweight", "blend", "image", "sweep", "model_family"]))
        table[key] = draw(st.one_of(json_values, prompts, st.sampled_from(AWKWARD)))
    return meta


@settings(suppress_health_check=FIXTURES)
@given(meta=hostile_metadata(), command=st.sampled_from(["info", "info --json", "from"]))
@example(meta={**GOOD_META, "image": {"index": "0"}}, command="info")  # was TypeError in p2p info
@example(meta={**GOOD_META, "model_family": []}, command="from")  # was AttributeError ('list' object has no attribute 'upper'), full run
@example(meta={**GOOD_META, "options": {"prompt": SRC, "to": [TGT], "cross_steps": "x"}}, command="info")
def test_stored_parameters_of_wrong_types(sandbox, meta, command):
    path = stored_png(sandbox, meta)
    argv = ["edit", "--from", str(path)] if command == "from" else [*command.split(), str(path)]
    code, out, err, peak = run_cli(argv)
    tried("PNG metadata: stored JSON", code == 0 or "StopBeforeModel" in err)
    if code == 0 or "StopBeforeModel" in err:
        assert "Traceback" not in out + err
        return
    assert_clean_failure(code, out, err, peak)


@settings(suppress_health_check=FIXTURES)
@given(prompt=st.one_of(st.sampled_from(["$(touch pwned)", "`touch pwned`", "a; touch pwned", "a' ; touch pwned; '", 'a" && touch pwned "',
                                         "a | tee pwned", "a\ntouch pwned", "$HOME ${IFS} * ? ~ !"]),
                        st.lists(st.sampled_from(AWKWARD + ["a", "cat"]), min_size=1, max_size=5).map("".join)),
       target=st.sampled_from(["a dog", "$(touch pwned)", "'; touch pwned #"]))
def test_rerun_line_is_shell_quoted(sandbox, prompt, target):
    """The rerun line that ``p2p info`` prints splits back (``shlex.split``) into exactly the stored prompts, so
    pasting it into a shell runs ``p2p`` with them and nothing else; reading the file runs nothing."""
    meta = {**GOOD_META, "options": {**GOOD_META["options"], "prompt": prompt, "to": [target]}}
    code, out, err, _ = run_cli(["info", str(stored_png(sandbox, meta))])
    tried("PNG metadata: rerun line", code == 0)
    assert code == 0, err
    rerun = [line for line in out.splitlines() if line.startswith("rerun: ")]
    if "\n" in prompt or "\r" in prompt or any(c in prompt for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
        rerun = [out[out.index("rerun: "):].rstrip("\n")]  # a prompt with a line break spans lines (inside quotes)
    assert len(rerun) == 1
    argv = shlex.split(rerun[0][len("rerun: "):])
    assert argv[:3] == ["p2p", "edit", prompt] and argv[argv.index("--to") + 1] == target
    assert not (sandbox / "pwned").exists()


@settings(examples(0.5), suppress_health_check=FIXTURES)
@given(kind=st.sampled_from(["flip", "truncate", "insert"]), seed=st.integers(0, 2**32 - 1), count=st.integers(1, 8))
def test_damaged_png(sandbox, kind, seed, count):
    good = imageio.png_bytes(PIL.Image.new("RGB", (8, 8), (200, 10, 10)), GOOD_META, "text")
    rng = np.random.default_rng(seed)
    data = bytearray(good)
    if kind == "flip":
        for at in rng.integers(0, len(data), count):
            data[at] ^= 1 << int(rng.integers(0, 8))
    elif kind == "truncate":
        data = data[: int(rng.integers(0, len(data)))]
    else:
        at = int(rng.integers(0, len(data)))
        data[at:at] = rng.integers(0, 256, count * 8, dtype=np.uint8).tobytes()
    path = sandbox / "damaged.png"
    path.write_bytes(bytes(data))
    for argv in (["info", str(path)], ["edit", "--from", str(path)]):
        code, out, err, peak = run_cli(argv)
        accepted = code == 0 or "StopBeforeModel" in err
        tried("PNG metadata: damaged bytes", accepted)
        if not accepted:
            assert_clean_failure(code, out, err, peak)


HUGE = 100 * 2**20


@pytest.mark.parametrize("name,chunks", [
    ("iTXt claiming 100 MB", [chunk(b"iTXt", itxt(imageio.METADATA_KEY, b"{}"), length=HUGE)]),
    ("tEXt claiming 4 GB", [chunk(b"tEXt", b"prompt2prompt\0{}", length=2**32 - 1)]),
    ("zTXt zlib bomb", [chunk(b"zTXt", imageio.METADATA_KEY.encode() + b"\0\0" + zlib.compress(b" " * HUGE, 9))]),
    ("iTXt zlib bomb", [chunk(b"iTXt", itxt(imageio.METADATA_KEY, zlib.compress(b"[" * HUGE, 9), compressed=True))]),
    ("many 1 MB chunks", [chunk(b"tEXt", b"k%d\0" % i + b"x" * 2**20) for i in range(80)]),
    ("JSON nested 1e5 deep", [chunk(b"iTXt", itxt(imageio.METADATA_KEY, b"[" * 100_000 + b"]" * 100_000))]),
    ("not UTF-8", [chunk(b"iTXt", itxt(imageio.METADATA_KEY, b"\xff\xfe{}"))]),
])
def test_huge_or_hostile_text_chunks(sandbox, name, chunks):
    path = sandbox / "hostile.png"
    path.write_bytes(png_with_chunks(*chunks))
    for argv in (["info", str(path)], ["edit", "--from", str(path)]):
        code, out, err, peak = run_cli(argv)
        tried("PNG metadata: huge chunks", False)
        assert_clean_failure(code, out, err, peak)
        assert str(path) in err


# ------------------------------------------------------------------------------ batch JSONL


@settings(examples(0.5), suppress_health_check=FIXTURES)
@given(content=st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(st.text(max_size=40), st.just('{"prompt": "a cat", "to": ["a dog"]}')), max_size=6).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
    st.integers(1, 200_000).map(lambda n: (b"[" * n + b"]" * n)),
    st.integers(1, 50).map(lambda n: b'{"prompt": "' + b"cat " * (n * 20_000) + b'", "to": ["a dog"]}'),
))
@example(content=b"\xff\xfe\x00")
@example(content=b'{"prompt": "a cat", "to": ["a dog"], "steps": 1e999}')
def test_batch_file_of_random_bytes(sandbox, content):
    path = sandbox / "lines.jsonl"
    path.write_bytes(content)
    code, out, err, peak = run_cli(["batch", str(path), "-o", str(sandbox / "out")])
    stopped = "StopBeforeModel" in err
    tried("batch JSONL file", stopped or code == 0)
    assert code in (0, 1, 2) and "Traceback" not in out + err
    assert "--debug shows the traceback" not in err or stopped, err
    for line in err.strip().splitlines():  # one line per refused line, each naming it
        assert line.startswith("p2p batch: ") or not line.strip(), line
    assert peak < MEMORY_LIMIT + 4 * len(content)


# ------------------------------------------------------------------------------ saved inversions and source passes


class Files(dict):
    """Saved files by name, shown by their names only (hypothesis prints a failing example's arguments)."""

    def __repr__(self) -> str:
        return f"Files({', '.join(self)})"


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    """An inversion and a source pass written by the library, as bytes: ``{name: (tensors, sidecar)}``."""
    folder = tmp_path_factory.mktemp("saved")
    inversion = pipe.invert(np.full((32, 32, 3), 120, np.uint8), SRC, method="direct", num_inference_steps=2)
    inversion.save(folder / "inversion")
    source = pipe.source(SRC, num_inference_steps=2, generator=torch.Generator().manual_seed(0), cross_replace_steps=1.0, self_replace_steps=1.0)
    source.save(folder / "source")
    out = Files()
    for name in ("inversion", "source"):
        tensors, sidecar = imageio.tensor_file_paths(folder / name)
        out[name] = (tensors.read_bytes(), sidecar.read_bytes())
    return out


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file of ``header`` (any JSON) and ``data``."""
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def mutations(draw):
    """A change to a saved file: ``(what, function of (tensors bytes, sidecar dict) -> (tensors bytes, sidecar dict))``."""
    kind = draw(st.sampled_from(["flip", "truncate", "terabyte header", "terabyte offsets", "dtype", "shape", "sidecar field", "sidecar json"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    value = draw(json_values)

    def apply(data: bytes, meta: dict) -> tuple[bytes, object]:
        header, body = split_safetensors(data)
        names = sorted(k for k in header if k != "__metadata__")
        name = names[int(rng.integers(0, len(names)))]
        if kind == "flip":
            data = bytearray(data)
            for at in rng.integers(0, len(data), 4):
                data[at] ^= 0xFF
            return bytes(data), meta
        if kind == "truncate":
            return data[: int(rng.integers(0, len(data)))], meta
        if kind == "terabyte header":
            return struct.pack("<Q", 2**40) + data[8:], meta
        if kind == "terabyte offsets":
            header[name]["data_offsets"] = [0, 2**42]
            header[name]["shape"] = [2**40]
            return safetensors_bytes(header, body), meta
        if kind == "dtype":
            header[name]["dtype"] = str(rng.choice(["I8", "F64", "BOOL", "U8", "F16", "XX"]))
            return safetensors_bytes(header, body), meta
        if kind == "shape":
            header[name]["shape"] = [int(s) for s in rng.integers(0, 5, int(rng.integers(0, 4)))]
            return safetensors_bytes(header, body), meta
        if kind == "sidecar field":
            key = sorted(meta)[int(rng.integers(0, len(meta)))]
            return data, {**meta, key: value}
        return data, value

    return kind, apply


def load_mutated(saved, name: str, folder: Path, apply, rehash: bool):
    """Write the mutated files; with ``rehash``, a source pass's sidecar gets the new file's SHA-256 (a
    deliberate forgery, which passes the checksum and must be caught by the checks of the content)."""
    data, sidecar = saved[name]
    data, meta = apply(data, json.loads(sidecar))
    tensors, sidecar_path = imageio.tensor_file_paths(folder / name)
    tensors.write_bytes(data)
    if rehash and isinstance(meta, dict) and name == "source":
        meta = {**meta, "sha256": imageio.file_sha256(tensors)}
    sidecar_path.write_text(json.dumps(meta, allow_nan=True))
    return tensors


def _load_and_use(pipe, name: str, path: Path):
    """Load a saved file and edit with it, as ``p2p edit --from`` does."""
    if name == "inversion":
        inversion = Inversion.load(path)
        return pipe(SRC, [TGT], inversion=inversion, output_type="np", return_attention=False, cross_replace_steps=1.0)
    source = SourcePass.load(path)
    return pipe(SRC, [TGT], source=source, num_inference_steps=2, output_type="np", return_attention=False,
                generator=torch.Generator().manual_seed(0), cross_replace_steps=1.0, self_replace_steps=1.0)


@settings(examples(0.5), suppress_health_check=FIXTURES)
@given(name=st.sampled_from(["inversion", "source"]), mutation=mutations(), rehash=st.booleans())
def test_damaged_saved_files(pipe, saved, tmp_path_factory, name, mutation, rehash):
    kind, apply = mutation
    path = load_mutated(saved, name, tmp_path_factory.mktemp("mutated"), apply, rehash)
    tracemalloc.start()
    try:
        with time_limit():
            out = _load_and_use(pipe, name, path)
        accepted = True
    except ValueError as err:
        accepted = False
        assert str(err).strip()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    tried(f"saved {name}", accepted)
    if accepted:
        assert np.isfinite(out.images).all()
    assert peak < MEMORY_LIMIT, f"{kind}: {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("name,change", [
    ("inversion", lambda meta: []),  # was AttributeError ('list' object has no attribute 'get')
    ("inversion", lambda meta: {**meta, "num_inference_steps": "two"}),
    ("source", lambda meta: {**meta, "cross_steps": "ab"}),  # was TypeError in check_budget, at edit time
    ("source", lambda meta: {**meta, "self_calls": {"8": "x"}}),
    ("source", lambda meta: {**meta, "identity": {}}),  # was KeyError('model') at edit time (found by the last full run)
])
def test_found_sidecar_regressions(pipe, saved, tmp_path, name, change):
    """Sidecars that the fuzzing above found crashing (their SHA-256 still matches: only the JSON changed)."""
    path = load_mutated(saved, name, tmp_path, lambda data, meta: (data, change(meta)), rehash=False)
    with pytest.raises(ValueError, match="again"):
        _load_and_use(pipe, name, path)


# ------------------------------------------------------------------------------ model folders


@pytest.fixture(scope="module")
def model_folder(pipe, tmp_path_factory):
    """The tiny SD 1.x model saved with ``save_pretrained`` (safetensors)."""
    folder = tmp_path_factory.mktemp("model") / "tiny"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.safetensors"))


@st.composite
def folder_damage(draw):
    """A change to one file of a model folder: ``(what, function of the folder copy)``."""
    kind = draw(st.sampled_from(["truncate", "terabyte header", "terabyte offsets", "dtype", "bad offsets", "config garbage",
                                 "config wrong types", "index garbage", "pickle only"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    value = draw(json_values)

    def apply(folder: Path) -> None:
        weights = _weight_files(folder)
        path = weights[int(rng.integers(0, len(weights)))]
        data = path.read_bytes()
        if kind == "truncate":
            path.write_bytes(data[: int(rng.integers(0, len(data)))])
        elif kind == "terabyte header":
            path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
        elif kind in ("terabyte offsets", "dtype", "bad offsets"):
            header, body = split_safetensors(data)
            name = sorted(k for k in header if k != "__metadata__")[0]
            if kind == "terabyte offsets":
                header[name]["data_offsets"] = [0, 2**42]
            elif kind == "dtype":
                header[name]["dtype"] = str(rng.choice(["I8", "F64", "BOOL", "XX"]))
            else:
                header[name]["data_offsets"] = value
            path.write_bytes(safetensors_bytes(header, body))
        elif kind == "config garbage":
            (path.parent / "config.json").write_bytes(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
        elif kind == "config wrong types":
            config = json.loads((path.parent / "config.json").read_text())
            config[sorted(config)[int(rng.integers(0, len(config)))]] = value
            (path.parent / "config.json").write_text(json.dumps(config, allow_nan=True))
        elif kind == "index garbage":
            (folder / "model_index.json").write_text(json.dumps(value, allow_nan=True))
        else:
            path.rename(path.with_suffix(".bin"))

    return kind, apply


@settings(examples(0.25), suppress_health_check=FIXTURES)
@given(damage=folder_damage())
@example(damage=("terabyte header", lambda folder: _weight_files(folder)[0].write_bytes(struct.pack("<Q", 2**40) + b"{}")))
def test_damaged_model_folder(model_folder, tmp_path_factory, monkeypatch, damage):
    import shutil

    from prompt2prompt import cli

    kind, apply = damage
    folder = tmp_path_factory.mktemp("damaged") / "model"
    shutil.copytree(model_folder, folder)
    apply(folder)
    monkeypatch.setattr(cli, "run_generate", _stop)  # the model loads for real; the run stops before denoising
    monkeypatch.chdir(folder.parent)
    code, out, err, peak = run_cli(["generate", "a cat", "--model", str(folder), "--steps", "1", "--device", "cpu"])
    loaded = "StopBeforeModel" in err
    tried("model folder", loaded)
    if not loaded:
        # a damage found only by loading comes after the tokenizer's vocabulary (tens of MiB) has loaded
        limit = MEMORY_LIMIT if kind in ("truncate", "terabyte header", "terabyte offsets") else 8 * MEMORY_LIMIT
        assert_clean_failure(code, out, err, peak, allowed=(1,), limit=limit)
        assert "could not load the model" in err or str(folder) in err, err
