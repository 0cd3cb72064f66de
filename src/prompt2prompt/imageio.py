"""Files the command-line tool writes: PNGs that carry their parameters, written atomically.

Every PNG holds its parameters twice: as JSON in the iTXt chunk ``prompt2prompt`` (what
`read_png_metadata` and ``p2p info`` read back) and as text in the ``parameters`` chunk (for
people and other tools). Every file is written to a temporary file in its own folder and then
renamed over the final name (`os.replace`), so a reader or an interrupted run never sees half a file.

A write that fails because of its folder (disk full, read-only, removed) raises `WriteError`,
one line naming the folder and the fix; the temporary files are removed first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import PIL.Image
from PIL.PngImagePlugin import PngInfo

#: PNG text chunk holding the parameters as JSON.
METADATA_KEY = "prompt2prompt"
#: PNG text chunk holding the parameters as readable text.
PARAMETERS_KEY = "parameters"
#: Temporary files start with this (and are hidden); `remove_stale_temps` deletes leftovers.
TEMP_PREFIX = ".p2p-tmp-"
#: ``errno`` -> (what went wrong, what to do first), for `WriteError`; other errors read ``os.strerror``.
WRITE_PROBLEMS = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EROFS: ("read-only file system", "make it writable"),
    errno.EACCES: ("permission denied", "make it writable"),
    errno.EPERM: ("permission denied", "make it writable"),
    errno.ENOENT: ("the folder vanished (removed or unmounted while running)", "restore it"),
}
#: What `WriteError` tells a library caller to choose instead (the command line and the web page name their flag).
OTHER_FOLDER = "another output folder"


class WriteError(ValueError):
    """Files could not be written into ``folder`` because of the folder itself (disk full,
    read-only, removed): ``"no space left on device writing into DIR: free space or choose another
    output folder"``. The ``OSError`` is the ``__cause__``; ``errno`` is its number.

    Nothing is left under a final name by the failed write (its temporary files are removed).
    """

    def __init__(self, folder: str | os.PathLike, problem: str, remedy: str, errno_: int | None = None,
                 other: str = OTHER_FOLDER):
        self.folder, self.problem, self.remedy, self.errno = Path(folder), problem, remedy, errno_
        super().__init__(f"{problem} writing into {self.folder}: {remedy} or choose {other}")

    def choose(self, other: str) -> WriteError:
        """The same error, advising to choose ``other`` (e.g. ``"another -o folder"``) instead."""
        return WriteError(self.folder, self.problem, self.remedy, self.errno, other)


def write_error(err: OSError, folder: str | os.PathLike) -> WriteError:
    """The `WriteError` of an ``OSError`` (with an ``errno``) met writing into ``folder``."""
    problem, remedy = WRITE_PROBLEMS.get(err.errno, (os.strerror(err.errno), "check it"))
    return WriteError(folder, problem.lower(), remedy, err.errno)


@contextlib.contextmanager
def writing_into(folder: str | os.PathLike):
    """Turn an ``OSError`` that the system raised in the block (writing into ``folder``; one with an
    ``errno``) into `WriteError`; others pass through."""
    try:
        yield
    except OSError as err:
        if err.errno is None:
            raise
        raise write_error(err, folder) from err


def as_os_error(err: Exception) -> Exception:
    """``err`` as an ``OSError`` when its message carries an OS error number (Rust's ``"(os error
    28)"``, as safetensors reports a full disk), else ``err`` itself."""
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found is None or isinstance(err, OSError):
        return err
    number = int(found.group(1))
    return OSError(number, os.strerror(number))


def discard(path: str | os.PathLike | None) -> None:
    """Remove a temporary file if it is there; a failure (a read-only folder) is ignored, since the
    error being reported is the one that matters."""
    if path is None:
        return
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def png_bytes(image: PIL.Image.Image, metadata: Mapping | None = None, parameters: str | None = None) -> bytes:
    """Encode ``image`` as PNG with ``metadata`` as JSON (chunk ``prompt2prompt``) and the
    readable ``parameters`` text (chunk ``parameters``)."""
    info = PngInfo()
    if metadata is not None:
        info.add_itxt(METADATA_KEY, json.dumps(metadata, ensure_ascii=False))
    if parameters is not None:
        info.add_itxt(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: The largest text chunk `read_png_text` reads (or inflates to): a run's parameters take a few KiB.
MAX_TEXT_BYTES = 4 * 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _inflate(data: bytes, what: str) -> bytes:
    """zlib-decompressed ``data``, refusing more than `MAX_TEXT_BYTES` (a zlib bomb stops there)."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_TEXT_BYTES)
    except zlib.error as err:
        raise ValueError(f"its {what} chunk is damaged ({err})") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"its {what} chunk inflates to more than {MAX_TEXT_BYTES // 2**20} MiB")
    return text


def _text_of_chunk(kind: bytes, data: bytes, key: str) -> str:
    """The text of one tEXt, zTXt or iTXt chunk whose keyword is ``key`` (PNG spec 11.3.4)."""
    body = data[len(key) + 1:]
    if kind == b"tEXt":
        return body.decode("latin-1")
    if kind == b"zTXt":
        return _inflate(body[1:], key).decode("latin-1")
    compressed = body[:1] == b"\1"
    rest = body[2:].split(b"\0", 2)  # language tag, translated keyword, text
    if len(rest) != 3:
        raise ValueError(f"its {key} chunk is damaged (an iTXt chunk without its fields)")
    text = _inflate(rest[2], key) if compressed else rest[2]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"its {key} chunk is not UTF-8 text") from None


def _open_binary(source):
    """``(handle, size)`` of a path (opened here) or of a seekable binary file object (read from its start)."""
    if hasattr(source, "read"):
        source.seek(0, os.SEEK_END)
        size = source.tell()
        source.seek(0)
        return contextlib.nullcontext(source), size
    handle = open(source, "rb")
    return handle, os.fstat(handle.fileno()).st_size


def read_png_text(path: str | os.PathLike | BinaryIO, key: str) -> str | None:
    """The text chunk ``key`` of a PNG (a path, or a seekable binary file object such as
    ``io.BytesIO``), read chunk by chunk without decoding the image.

    Only the first bytes of other chunks' keywords are read (the rest is skipped), and a chunk is
    read only when it fits in the file and in `MAX_TEXT_BYTES`, so a file claiming gigabytes, a zlib
    bomb or many large chunks allocate nothing of their size.

    Raises:
        OSError: the file cannot be read, or is not a PNG (signature, lengths, CRC).
        ValueError: the chunk is too large, damaged or not text.
    """
    wanted = key.encode("latin-1") + b"\0"
    opened, size = _open_binary(path)
    with opened as handle:
        if handle.read(8) != PNG_SIGNATURE:
            raise OSError("not a PNG file")
        while True:
            head = handle.read(8)
            if len(head) < 8:
                raise OSError("truncated PNG file (no IEND chunk)")
            length, kind = struct.unpack(">I", head[:4])[0], head[4:]
            start = handle.tell()
            if start + length + 4 > size:
                raise OSError(f"truncated or damaged PNG file (a {kind!r} chunk claims {length} bytes, past the end of the file)")
            if kind == b"IEND":
                return None
            if kind in _TEXT_CHUNKS and handle.read(len(wanted)) == wanted:
                if length > MAX_TEXT_BYTES:
                    raise ValueError(f"its {key} chunk is {length} bytes, more than the {MAX_TEXT_BYTES // 2**20} MiB a parameters chunk may have")
                handle.seek(start)
                data = handle.read(length)
                (crc,) = struct.unpack(">I", handle.read(4))
                if zlib.crc32(kind + data) & 0xFFFFFFFF != crc:
                    raise OSError(f"damaged PNG file (the CRC of its {key} chunk does not match)")
                return _text_of_chunk(kind, data, key)
            handle.seek(start + length + 4)


def json_value(text: str):
    """``json.loads(text)``, with every way it can fail on untrusted text as a `ValueError`.

    Raises:
        ValueError: ``"not valid JSON (<reason> at column <n>)"`` or ``"nested too deeply to read
            (...)"`` (Python's parser recurses, so deep nesting would be a `RecursionError`).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise ValueError("nested too deeply to read (arrays or objects inside each other)") from None


def read_png_metadata(path: str | os.PathLike | BinaryIO) -> dict | None:
    """The JSON parameters stored in a PNG by `png_bytes`, or None when it has none.

    Reads the chunk with `read_png_text` (bounded, the image is not decoded).

    Raises:
        OSError: the file cannot be read or is not a PNG.
        ValueError: the chunk is there but is too large, damaged, or not a JSON object.
    """
    raw = read_png_text(path, METADATA_KEY)
    if raw is None:
        return None
    try:
        value = json_value(raw)
    except ValueError as err:
        raise ValueError(f"the {METADATA_KEY!r} chunk of {path} is {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"the {METADATA_KEY!r} chunk of {path} is not a JSON object")
    return value


def read_png_parameters(path: str | os.PathLike) -> str | None:
    """The readable ``parameters`` text of a PNG, or None (read as `read_png_text` does)."""
    return read_png_text(path, PARAMETERS_KEY)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give: ``0o666`` less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_temp(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (flushed to disk) and return its path.

    The file gets the permissions of an ordinary new file (``mkstemp`` alone makes it owner-only).
    The temporary file is removed again if writing fails or is interrupted.
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), _file_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        discard(temp)
        raise
    return Path(temp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then `os.replace`.

    Raises:
        WriteError: the folder is full, read-only or gone (nothing written under ``path``).
    """
    path = Path(path)
    with writing_into(path.parent):
        temp = write_temp(path, data)
        try:
            os.replace(temp, path)
        except BaseException:
            discard(temp)
            raise
    _fsync_dir(path.parent)
    return path


def append_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Append ``data`` to ``path`` (made if missing) whole or not at all, flushed to disk: a write
    that fails part way (disk full) is cut off again, so the file ends where it ended before.

    Raises:
        WriteError: the folder is full, read-only or gone.
    """
    path = Path(path)
    with writing_into(path.parent):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, _file_mode())
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:  # os.write may write part of it and return the count
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, size)  # frees what the torn part took; needs no space
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)


def json_bytes(value) -> bytes:
    """``value`` as indented UTF-8 JSON with a final newline."""
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, value) -> Path:
    """Write ``value`` as JSON to ``path`` atomically."""
    return atomic_write_bytes(path, json_bytes(value))


def tensor_file_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(tensors, sidecar)``: ``path`` with ``.safetensors`` appended if missing, and the JSON
    sidecar beside it (the same name with ``.json``), as `save_tensor_file` writes them."""
    path = Path(path)
    tensors = path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")
    return tensors, tensors.with_suffix(".json")


def save_tensor_file(path: str | os.PathLike, tensors: Mapping, meta: dict, file_format: str, checksum: str | None = None) -> Path:
    """Write ``tensors`` (safetensors, nothing pickled) and ``meta`` (its JSON sidecar), each through
    a temporary name and a rename; the tensor file first, so a sidecar never names a missing file.

    Args:
        path: the tensor file (see `tensor_file_paths`); missing parent folders are created.
        tensors: name -> CPU tensor, none sharing memory.
        meta: the sidecar's content (a JSON-able dict; not modified).
        file_format: stored in the safetensors header's metadata as ``format``.
        checksum: when given, the sidecar also gets the tensor file's SHA-256 under this key.

    Returns:
        The path of the ``.safetensors`` file written.
    """
    from safetensors.torch import save_file

    path, sidecar = tensor_file_paths(path)
    with writing_into(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
        os.close(fd)
        tmp, tmp_json = Path(tmp), None
        try:
            try:
                save_file(dict(tensors), str(tmp), metadata={"format": file_format})
            except Exception as err:  # safetensors reports an I/O error as its own SafetensorError
                converted = as_os_error(err)
                if converted is err:
                    raise
                raise converted from err
            if checksum is not None:
                meta = {**meta, checksum: file_sha256(tmp)}
            tmp_json = write_temp(sidecar, json.dumps(meta, indent=1).encode("utf-8"))
            os.replace(tmp, path)
            os.replace(tmp_json, sidecar)
        except BaseException:
            discard(tmp)
            discard(tmp_json)
            raise
    return path


def save_png(path: str | os.PathLike, image: PIL.Image.Image, metadata: Mapping | None = None, parameters: str | None = None) -> Path:
    """Save ``image`` as a PNG carrying ``metadata`` and ``parameters``, atomically."""
    return atomic_write_bytes(path, png_bytes(image, metadata, parameters))


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files left in ``folder`` by a killed writer; returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


#: Keys under which a result's JSON names its own files (``{"file": "edit-1.png"}``, ``"grid": "grid.png"``).
FILE_KEYS = ("file", "grid")


def _files_named_by(marker: Path) -> set[str]:
    """The files beside ``marker`` that its JSON names as its own (under `FILE_KEYS`, at any depth).

    Only those keys count, so a user's photo named in the options (``"image": "cat.png"``) is never
    taken for an output.
    """
    try:
        value = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    names: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, entry in item.items():
                if key in FILE_KEYS and isinstance(entry, str) and entry and Path(entry).name == entry:
                    names.add(entry)
                else:
                    stack.append(entry)
    return {n for n in names if (marker.parent / n).is_file()}


class OutputSet:
    """Files of one result, committed together.

    `add` encodes files in memory; `commit` writes each to a temporary file, then renames them
    all into place in the order added (so the last one, e.g. ``result.json``, appears last and
    marks the result complete). If anything fails or is interrupted (Ctrl-C) before `commit`
    returns, the temporary files and the files this commit already renamed are removed, and the
    folder too when this commit created it and it is left empty: an interrupted run leaves no
    partial result.

    Committing into a folder that holds an earlier result replaces it: the earlier marker file is
    removed before any file is renamed (so an interruption leaves an unfinished result, never a
    finished-looking mix), and afterwards the files the earlier marker named that this set does
    not rewrite are deleted, so ``edit-2.png`` of a two-target run does not survive a one-target
    run. Other files in the folder are left alone.

    ``root``: the run's output folder (``folder`` or a folder above it), made before the run; when
    it is gone at commit (removed or unmounted), the commit stops with `WriteError` rather than make
    it again, and errors name it rather than ``folder``.
    """

    def __init__(self, folder: str | os.PathLike, root: str | os.PathLike | None = None):
        self.folder = Path(folder)
        self.root = Path(root) if root is not None else None
        self._files: list[tuple[str, bytes]] = []

    def add(self, name: str, data: bytes) -> None:
        if any(n == name for n, _ in self._files):
            raise ValueError(f"{name} is already in this output set")
        self._files.append((name, data))

    def add_png(self, name: str, image: PIL.Image.Image, metadata: Mapping | None = None, parameters: str | None = None) -> None:
        self.add(name, png_bytes(image, metadata, parameters))

    def add_json(self, name: str, value) -> None:
        self.add(name, json_bytes(value))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self._files]

    def commit(self) -> list[Path]:
        """Write the files into the folder (see the class); returns their paths in order.

        Raises:
            WriteError: the folder is full, read-only or gone; nothing of this set is left.
        """
        if self.root is not None and not self.root.is_dir():
            raise write_error(OSError(errno.ENOENT, os.strerror(errno.ENOENT)), self.root)
        with writing_into(self.root or self.folder):
            return self._commit()

    def _commit(self) -> list[Path]:
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / self._files[-1][0] if self._files else None
        previous = [] if created or marker is None else sorted(_files_named_by(marker) - set(self.names))
        temps: list[tuple[Path, Path]] = []
        done: list[Path] = []
        try:
            for name, data in self._files:
                temps.append((write_temp(self.folder / name, data), self.folder / name))
            if temps:  # the earlier result is no longer complete from here on
                temps[-1][1].unlink(missing_ok=True)
            for temp, final in temps:
                os.replace(temp, final)
                done.append(final)
            _fsync_dir(self.folder)
        except BaseException:
            for temp, _ in temps:
                discard(temp)
            for final in done:
                discard(final)
            if created:
                try:
                    self.folder.rmdir()
                except OSError:
                    pass
            raise
        for stale in previous:
            (self.folder / stale).unlink(missing_ok=True)
        return done
