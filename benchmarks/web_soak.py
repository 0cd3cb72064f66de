"""A long soak of the web page: ``p2p serve`` on a free loopback port, edits in a row through
Gradio's HTTP API (the helpers of tests/test_web_load.py), the server's resident memory every 20.

    PYTHONPATH=src:tests python benchmarks/web_soak.py [--edits 320] [--steps 2] [--new-sessions] DIR

``DIR`` gets the server's output folder and log. One visitor (one Gradio session) makes every edit,
unless ``--new-sessions`` gives each edit a session of its own (as separate API callers do: each keeps
its source pass for `web.SOURCE_TTL_S`). Prints ``edits RSS-MiB seconds`` lines; docs/reliability.md
("A leak found and fixed") quotes its runs.
"""

import argparse
import time
import uuid
from pathlib import Path

import httpx
from test_web import _free_port, start_server, stop_server
from test_web_load import COLOURS, SHAPES, Call, Server, rss_kib, submit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--edits", type=int, default=320)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--new-sessions", action="store_true")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    out, port = args.folder / "out", _free_port()
    proc = start_server(["-m", "prompt2prompt.cli", "serve", "--port", str(port), "--output-dir", str(out)], port,
                        log=args.folder / "server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        config = httpx.get(f"{url}/config", timeout=30).json()
        (fn,) = [d["id"] for d in config["dependencies"] if d.get("api_name") == "on_run"]
        server, session, start = Server(url, out, proc.pid, fn), uuid.uuid4().hex, time.monotonic()
        with httpx.Client() as client:
            for n in range(args.edits):
                colour, shape = COLOURS[n % len(COLOURS)], SHAPES[n % len(SHAPES)]
                call = Call(f"a {colour} {shape} on a blue background", f"a {colour} {shape} on a green background", seed=50_000 + n)
                submit(server, uuid.uuid4().hex if args.new_sessions else session, call, client, steps=args.steps)
                if call.error is not None:
                    raise SystemExit(f"edit {n + 1} failed: {call.error}")
                if (n + 1) % 20 == 0:
                    print(n + 1, rss_kib(proc.pid) // 1024, f"{time.monotonic() - start:.0f}", flush=True)
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
