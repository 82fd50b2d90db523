"""scripts/bench_papers.py runs end to end on one sequence length (structure, never timing)."""
from __future__ import annotations

import importlib
import json
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_papers_table_rows(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bench = importlib.import_module("bench_papers")
    out = tmp_path / "p.json"
    assert bench.main(["--seqs", "8192", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if "skipped" not in r]
    assert len(rows) == 3 * 4 and "uptime" in data
    for r in rows:
        # the event-driven step is never shorter than the max-of-sums bound, nor the ideal
        assert r["step_s"] >= r["sum_bound_s"] * (1 - 1e-9) and r["step_s"] >= r["ideal_s"]
        assert sum(r["shares"]) == r["global_batch"] == 8
    assert "tokens/s" in capsys.readouterr().out
