"""scripts/bench_train.py's "hecate" contender runs on 4 gloo ranks with drifting routing (bookkeeping, never
timing). It once died there: under re-materialization a rank's backward re-gathered copies at a point
that autograd's order (different on ranks whose dispatch differs) put against another rank's collective."""
from __future__ import annotations

import importlib
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    # imported by name from scripts/ so the spawned gloo ranks can unpickle its worker functions
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return importlib.import_module("bench_train")


def test_hecate_contender_with_drifting_routing_on_four_ranks(bench, tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--preset", "hecate", "--routing", "drift", "--world", "4", "--modes", "hecate",
                       "--steps", "1", "--warmup", "2", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["contenders"]["hecate"]
    assert row["error"] is None, row["error"]
    assert row["tokens_per_s"] > 0 and row["bytes_per_step"] > 0
    assert row["expert_state_bytes_per_rank"] > 0
