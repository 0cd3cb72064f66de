"""The web page under load, through its real HTTP API (Gradio's queue protocol), on a real server
(``p2p serve``) on a loopback port with the bundled model.

- Load: visitors at once, each making edits one after another: every request gets its own result
  (the PNG's metadata names its prompts and seed), none is lost or mixed up, and the queue is FIFO.
- A full queue turns a further visitor away at once with a clear message, and the page still loads.
- A visitor who leaves mid-edit does not block the next one; nothing is half-written.
- Hostile uploads to the photo field are field errors, and nothing is written outside the output folder.
- A soak of edits in a row: the server's resident memory stays flat, the output folder holds
  exactly the results.

CI runs the reduced form (8 visitors x 2 edits, a 30-edit soak); ``pytest --slow`` the full one
(8 x 5, 200 edits). The figures go to docs/reliability.md ("Load").
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import pytest

from test_web import _free_port, start_server, stop_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("gradio")

from prompt2prompt.imageio import TEMP_PREFIX, file_sha256, read_png_metadata  # noqa: E402
from prompt2prompt.web import BUSY_MESSAGE, FIELDS  # noqa: E402

#: Requests that may wait in the test server's queue (``p2p serve --queue-size``): the 8 visitors,
#: each with one request in flight, never fill it; `test_full_queue_turns_a_visitor_away` does.
QUEUE = 8
VISITORS = 8
STEPS = 2
#: A request's whole round trip, waiting included, may take at most this long before the test calls it a hang.
HANG_S = 300
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "heart")


def rss_kib(pid: int) -> int:
    """The resident memory of process ``pid`` in KiB (``VmRSS`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@dataclass
class Server:
    url: str
    out: Path
    pid: int
    fn_index: int

    @property
    def api(self) -> str:
        return f"{self.url}/gradio_api"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``p2p serve`` with a small queue, on a free loopback port; the output folder sits alone in its own
    parent folder, so that a test can see that nothing is written beside it."""
    out, port = tmp_path_factory.mktemp("load") / "out", _free_port()
    log = tmp_path_factory.mktemp("load-log") / "server.log"  # not beside the output folder, which must stay as it is
    proc = start_server(["-m", "prompt2prompt.cli", "serve", "--port", str(port), "--output-dir", str(out),
                         "--queue-size", str(QUEUE)], port, log=log)
    url = f"http://127.0.0.1:{port}"
    config = httpx.get(f"{url}/config", timeout=30).json()
    (fn,) = [d["id"] for d in config["dependencies"] if d.get("api_name") == "on_run"]
    yield Server(url, out, proc.pid, fn)
    stop_server(proc)


def values(prompt: str, target: str, seed: int, steps: int = STEPS, image=None) -> list:
    """The page's inputs in the order of its form (`web._form`), then its two states (history, kept pass)."""
    reweight = {"headers": ["word", "factor"], "data": [["", ""]]}
    return [prompt, target, "auto", 0.8, 0.4, "", "", 0.3, reweight, seed, steps, 7.5, image, "null-text", 0, None, None]


@dataclass
class Call:
    """One request through Gradio's queue protocol, with the times (this process's monotonic clock)
    at which its join was sent and answered and its result arrived."""

    prompt: str
    target: str
    seed: int
    sent: float = 0.0
    joined: float = 0.0
    done: float = 0.0
    event_id: str = ""
    output: list | None = None
    error: str | None = None
    messages: list = field(default_factory=list)


def join(server: Server, session: str, data: list, client=httpx) -> httpx.Response:
    """POST /queue/join: the request enters the queue before the answer comes."""
    return client.post(f"{server.api}/queue/join", timeout=30,
                       json={"data": data, "fn_index": server.fn_index, "session_hash": session, "event_data": None, "trigger_id": None})


def events(server: Server, session: str, client, timeout: float = HANG_S):
    """The session's server-sent events (GET /queue/data), as dicts, until the stream closes."""
    with client.stream("GET", f"{server.api}/queue/data", params={"session_hash": session},
                       timeout=httpx.Timeout(timeout, connect=30)) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                yield json.loads(line[5:])


def submit(server: Server, session: str, call: Call, client, steps: int = STEPS, image=None) -> Call:
    """Send ``call`` as the visitor ``session`` and wait for its result (`Call.output`, or `Call.error`)."""
    call.sent = time.monotonic()
    answer = join(server, session, values(call.prompt, call.target, call.seed, steps, image), client)
    call.joined = time.monotonic()
    assert answer.status_code == 200, answer.text
    call.event_id = answer.json()["event_id"]
    for message in events(server, session, client):
        if message.get("event_id") not in (None, call.event_id):
            continue
        call.messages.append(message.get("msg"))
        if message.get("msg") == "process_completed":
            call.done = time.monotonic()
            output = message.get("output") or {}
            if message.get("success"):
                call.output = output.get("data")
            else:
                call.error = output.get("error") or json.dumps(output)
            return call
    raise AssertionError(f"the stream closed before {call.prompt!r} completed: {call.messages}")


def download(server: Server, item: dict, client) -> bytes:
    """The bytes of an output file, fetched from the server as the browser does."""
    url = item.get("url") or f"{server.api}/file={item['path']}"
    answer = client.get(url, timeout=30)
    assert answer.status_code == 200, (url, answer.status_code)
    return answer.content


def check_result(server: Server, call: Call, client) -> None:
    """The call's result is its own: the source and edit PNGs it got name its prompts and seed."""
    assert call.error is None and call.output is not None, (call.prompt, call.error)
    gallery = call.output[0]
    assert [item["caption"] for item in gallery] == ["source", call.target]
    for k, item in enumerate(gallery):
        meta = read_png_metadata(io.BytesIO(download(server, item["image"], client)))
        options = meta["options"]
        assert (options["prompt"], options["to"], options["seed"], options["steps"]) == (call.prompt, [call.target], call.seed, STEPS)
        assert meta["image"]["prompt"] == (call.prompt if k == 0 else call.target)


def result_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name != ".gradio")


def stray_files(out: Path) -> list[Path]:
    """Files or folders with `imageio.TEMP_PREFIX` (an atomic write's, or `OutputSet`'s, temporary name)."""
    return [p for p in out.rglob(f"{TEMP_PREFIX}*")]


def cache_files(out: Path) -> list[Path]:
    """The files in Gradio's cache (``GRADIO_TEMP_DIR``, which `web.serve` puts in the output folder)."""
    return [p for p in (out / ".gradio").rglob("*") if p.is_file()]


def complete(folder: Path) -> bool:
    """A result folder holds the source, its edit and their heat maps, each a PNG with its parameters."""
    names = sorted(p.name for p in folder.iterdir())
    if "source.png" not in names or "edit-1.png" not in names or not any(n.startswith("attention-") for n in names):
        return False
    return all(read_png_metadata(folder / n)["options"]["prompt"] for n in names)


# --------------------------------------------------------------------------- load


def test_visitors_at_once_get_their_own_results_in_queue_order(server, slow_mode):
    """8 visitors, each making edits one after another (a visitor waits for their result, as on the
    page). Every request comes back, with its own result; and the queue is FIFO: for two requests A
    and B where A's join was answered before B's was sent (so A entered the queue first), A's
    result arrives first. With one edit at a time (``concurrency_limit=1``) B cannot start before A
    ends, and B takes a whole edit, so this holds unless the queue reorders (LIFO, by visitor, or
    more than one at a time letting a later request overtake)."""
    per_visitor = 5 if slow_mode else 2
    before = len(result_folders(server.out))
    calls = {v: [Call(f"a {COLOURS[v]} {SHAPES[r]} on a blue background", f"a {COLOURS[v]} {SHAPES[(r + 1) % 5]} on a blue background",
                      seed=1000 * v + r) for r in range(per_visitor)] for v in range(VISITORS)}
    failures = []

    def visitor(v: int) -> None:
        session = uuid.uuid4().hex
        with httpx.Client() as client:
            try:
                for call in calls[v]:
                    submit(server, session, call, client)
            except Exception as err:  # noqa: BLE001 - reported by the main thread
                failures.append(f"visitor {v}: {err!r}")

    threads = [threading.Thread(target=visitor, args=(v,)) for v in range(VISITORS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    seconds = time.monotonic() - start
    assert not failures and not any(t.is_alive() for t in threads), failures
    every = [c for v in calls for c in calls[v]]
    with httpx.Client() as client:
        for call in every:  # none lost, none mixed up
            check_result(server, call, client)
    assert len(result_folders(server.out)) - before == len(every)
    ordered = [(a, b) for a in every for b in every if a.joined < b.sent]
    overtaken = [(a.prompt, b.prompt) for a, b in ordered if not a.done < b.done]
    assert not overtaken, overtaken
    assert sum(a.seed // 1000 != b.seed // 1000 for a, b in ordered) > 0  # pairs of different visitors were compared
    print(f"\nload: {VISITORS} visitors x {per_visitor} edits ({STEPS} steps): {len(every)} results, 0 lost, 0 mixed, "
          f"{len(ordered)} ordered pairs kept their order, {seconds:.1f} s")


def test_full_queue_turns_a_visitor_away(server):
    """One long edit runs and `QUEUE` requests wait: the next visitor is told at once that the page is
    busy (HTTP 503 and `web.BUSY_MESSAGE`; Gradio's own client says "Queue is full! Please try
    again."), the page itself still loads, and the waiting requests then all complete."""
    from gradio_client import Client
    from gradio_client.utils import QueueError

    session = uuid.uuid4().hex
    with httpx.Client() as client:
        long = join(server, session, values("a red circle on a blue background", "a red square on a blue background", 7, steps=12), client)
        assert long.status_code == 200
        accepted, refused = [long], None
        for _ in range(QUEUE + 6):  # quick requests (no target: a field error) fill the queue behind it
            start = time.monotonic()
            answer = join(server, session, values("a red circle", "", 0), client)
            seconds = time.monotonic() - start
            if answer.status_code != 200:
                refused = answer
                break
            accepted.append(answer)
        assert refused is not None, f"{len(accepted)} requests were accepted into a queue of {QUEUE}"
        assert refused.status_code == 503 and refused.json()["detail"] == BUSY_MESSAGE.format(waiting=QUEUE)
        assert len(accepted) >= QUEUE  # it was full: QUEUE waiting (and one or more ran meanwhile)
        assert client.get(server.url, timeout=30).status_code == 200  # a new visitor still gets the page
        with pytest.raises(QueueError, match="try again"):
            Client(server.url, verbose=False).predict(*values("a red circle", "a red square", 0)[:15], api_name="/on_run")
        print(f"\nqueue full: refused in {seconds * 1000:.0f} ms with {refused.json()['detail']!r}")
        ids = {a.json()["event_id"] for a in accepted}
        done = {}
        for message in events(server, session, client):
            if message.get("msg") == "process_completed":
                done[message["event_id"]] = message
            if set(done) == ids:
                break
    assert set(done) == ids and done[long.json()["event_id"]]["success"]


def test_a_visitor_who_leaves_mid_edit_does_not_block_the_next(server):
    """Visitor A starts an edit and closes the page (its event stream) mid-edit; visitor C, waiting
    behind A, cancels (what Gradio's client does on ``job.cancel()``); visitor B's request then
    completes with its own result. C's edit never runs, and every result folder is whole (A's edit,
    which runs on to its end, wrote all its files or none)."""
    a_session, b_session, c_session = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    with httpx.Client() as a_client:
        answer = join(server, a_session, values("a white star on a black background", "a white heart on a black background", 5, steps=12), a_client)
        assert answer.status_code == 200
        for message in events(server, a_session, a_client):
            if message.get("msg") in ("process_starts", "progress"):
                break  # the edit runs: A leaves (the stream's connection closes with the client)
        waiting = join(server, c_session, values("a purple heart on a white background", "a purple star on a white background", 9), a_client)
        cancel = a_client.post(f"{server.api}/cancel", timeout=30,
                               json={"session_hash": c_session, "fn_index": server.fn_index, "event_id": waiting.json()["event_id"]})
        assert cancel.status_code == 200, cancel.text
    b = Call("a black heart on a blue background", "a black star on a blue background", 6)
    with httpx.Client() as b_client:
        submit(server, b_session, b, b_client)
        check_result(server, b, b_client)
    left = [f.name for f in result_folders(server.out) if "white-star-on-a-black" in f.name]
    print(f"\nafter a visitor left mid-edit the next one's edit came back {b.done - b.sent:.1f} s after it was sent; "
          f"the leaver's result folders: {left}")
    assert not [f for f in result_folders(server.out) if "purple-heart-on-a-white" in f.name]  # the cancelled request never ran
    assert all(complete(f) for f in result_folders(server.out)) and not stray_files(server.out)


# --------------------------------------------------------------------------- hostile uploads


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int) -> bytes:
    """A small PNG that declares ``side`` x ``side`` grey pixels (most of which its data lacks)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\0" * (side + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64" fill="red"/></svg>'
#: (file name, content): each must be a field error beside the photo field.
HOSTILE = [
    ("bomb.png", bomb_png(50_000)),  # PIL refuses to open it (over twice its pixel limit)
    ("bomb-10k.png", bomb_png(10_000)),  # PIL opens it with a warning: the page refuses it before decoding
    ("empty.png", b""),
    ("truncated.jpg", truncated_jpeg()),
    ("drawing.svg", SVG),
    ("../../evil.png", truncated_jpeg()),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` but the output folder, with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file() and "out" not in p.relative_to(folder).parts}


@pytest.mark.parametrize("name, content", HOSTILE, ids=[n for n, _ in HOSTILE])
def test_hostile_photo_is_a_field_error(tmp_path, name, content):
    """Through the page's own checks (`parse_request` and the `Editor`): a field error under the photo,
    and nothing written."""
    from test_web import NoWork

    from prompt2prompt.web import Editor, FieldError, parse_request

    photo = tmp_path / "uploads" / "x" / "y" / Path(name).name
    photo.parent.mkdir(parents=True)
    photo.write_bytes(content)
    given = str(photo.parent / name) if name.startswith("..") else str(photo)
    if name.startswith(".."):
        (photo.parent.parent.parent / Path(name).name).write_bytes(content)  # what ../../evil.png names exists
    with pytest.raises(FieldError) as info:
        request = parse_request("a red circle", "a red square", "auto", 0.8, 0.4, "", "", 0.3, [], 0, 2, 7.5, given, "null-text")
        Editor(NoWork(), tmp_path / "out").run(request)
    assert info.value.field == "image" and Path(name).name in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_hostile_uploads_through_http(server):
    """Each hostile file, uploaded as the browser does (POST /upload) and sent as the photo, gives an
    error beside the photo field; the upload is stored inside the output folder (a ``../`` name
    included) and nothing beside the output folder changes."""
    parent = server.out.parent
    before, above = snapshot(parent), sorted(p.name for p in parent.parent.iterdir())
    session = uuid.uuid4().hex
    with httpx.Client() as client:
        for name, content in HOSTILE:
            answer = client.post(f"{server.api}/upload", files=[("files", (name, content, "application/octet-stream"))], timeout=30)
            assert answer.status_code == 200, (name, answer.text)
            (stored,) = answer.json()
            assert Path(stored).resolve().is_relative_to(server.out) and ".." not in Path(stored).parts, stored
            photo = {"path": stored, "orig_name": name, "meta": {"_type": "gradio.FileData"}}
            call = submit(server, session, Call("a red circle", "a red square", 0), client, image=photo)
            assert call.error is None and call.output is not None, (name, call.error)
            slots = call.output[-len(FIELDS):]
            shown = {f: s["value"] for f, s in zip(FIELDS, slots) if isinstance(s, dict) and s.get("visible")}
            assert list(shown) == ["image"], (name, shown)
            print(f"\n{name}: {shown['image']}")
    assert snapshot(parent) == before and sorted(p.name for p in parent.parent.iterdir()) == above
    assert not [p for p in parent.rglob("evil.png") if not p.resolve().is_relative_to(server.out)]


@pytest.mark.parametrize("where", ["climbing", "outside"])
def test_a_photo_path_outside_the_uploads_is_refused(server, where):
    """A photo sent through the API as a server path (no upload) that climbs out of the output folder
    (``out/.gradio/../../photo.png``) or lies outside it is refused, by Gradio (a path it did not
    store) or by the page (a field error): no edit runs."""
    photo = server.out.parent / f"{where}.png"
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(photo)
    path = f"{server.out}/.gradio/../../{photo.name}" if where == "climbing" else str(photo)
    before = result_folders(server.out)
    with httpx.Client() as client:
        call = submit(server, uuid.uuid4().hex, Call("a red circle", "a red square", 0), client,
                      image={"path": path, "orig_name": photo.name, "meta": {"_type": "gradio.FileData"}})
    if call.error is None:
        slots = call.output[-len(FIELDS):]
        assert [f for f, s in zip(FIELDS, slots) if isinstance(s, dict) and s.get("visible")] == ["image"]
    print(f"\nphoto path {where}: {call.error or 'a field error'}")
    assert result_folders(server.out) == before


# --------------------------------------------------------------------------- soak


def test_soak_memory_stays_flat_and_the_folder_holds_the_results(server, slow_mode):
    """Edits in a row from one visitor: the server's resident memory at the end is within 10% of its
    value after the first 20, and the output folder holds one whole result folder per edit and
    nothing else (no temporary files)."""
    edits = 200 if slow_mode else 30
    before = set(result_folders(server.out))
    cached = set(cache_files(server.out))
    session = uuid.uuid4().hex
    rss = []
    with httpx.Client() as client:
        for n in range(edits):
            colour, shape = COLOURS[n % 8], SHAPES[n % 5]
            call = submit(server, session, Call(f"a {colour} {shape} on a blue background", f"a {colour} {shape} on a green background",
                                                seed=50_000 + n), client)
            assert call.error is None, call.error
            if n + 1 == 20 or n + 1 == edits:
                rss.append(rss_kib(server.pid))
        check_result(server, call, client)  # the last one is its own too
    new = set(result_folders(server.out)) - before
    assert len(new) == edits and all(complete(f) for f in new)
    assert not stray_files(server.out)
    results = {file_sha256(p) for f in new for p in f.iterdir()}
    copies = set(cache_files(server.out)) - cached
    assert copies and {file_sha256(p) for p in copies} <= results  # Gradio's cache holds copies of the results it served, nothing else
    growth = rss[-1] / rss[0] - 1
    print(f"\nsoak: {edits} edits; server RSS after 20: {rss[0] / 1024:.0f} MiB, at the end: {rss[-1] / 1024:.0f} MiB ({growth:+.1%})")
    assert growth <= 0.10, rss


@pytest.mark.parametrize("size", [0, -1, 2.5, "many"])
def test_serve_checks_the_queue_size_before_loading(tmp_path, size):
    from prompt2prompt.web import serve

    with pytest.raises(ValueError, match="queue_size"):
        serve(output_dir=tmp_path / "out", queue_size=size, block=False)
    assert not (tmp_path / "out").exists()
