"""``benchmarks/speed.py``'s re-edit variants run (tiny budget): ``reedit`` (an edit from a
`SourcePass` against the full edit) and ``sweep6`` (one pass and six edits against six full
edits). Their timings belong in benchmarks/README.md, not here."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_speed_reedit_and_sweep6(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_speed_reedit", BENCH / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    out = tmp_path / "speed.json"
    speed.main(["--model", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--variants", "reedit,sweep6",
                "--threads", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["results"]}
    assert set(rows) == {"reedit", "sweep6"} and all(r["time_ratio"] > 0 for r in rows.values())
    assert rows["sweep6"]["baseline"] == "six full edits"
    reedit = data["meta"]["reedit"]
    assert reedit["reedit_source_pass_bytes"] > 0 and reedit["sweep6_source_pass_bytes"] >= reedit["reedit_source_pass_bytes"]
    assert reedit["max_pixel_diff_vs_full"] < 1e-3  # the pass gives the full edit's images
    assert reedit["sweep6_max_pixel_diff_vs_full"] < 1e-3  # and the sweep's one batch each value's full edit
    printed = capsys.readouterr().out
    assert "SourcePass (reedit)" in printed and "largest pixel difference" in printed and "sweep6's batch" in printed
