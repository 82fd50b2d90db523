"""scripts/bench_train.py's "hecate" contender runs on 4 gloo ranks with drifting routing (bookkeeping, never
timing). It once died there: under re-materialization a rank's backward re-gathered copies at a point
that autograd's order (different on ranks whose dispatch differs) put against another rank's collective."""
from __future__ import annotations

import importlib
import json
import pathlib
import subprocess
import sys

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
    assert row["straggler"] >= 1.0  # the slowest rank's MoE time over the mean


def _purelib(py) -> pathlib.Path:
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return pathlib.Path(out.stdout.strip())


def test_autoep_side_env_sees_the_running_venvs_packages(bench, tmp_path):
    """The bench run from a virtual environment (its packages in that venv only, here a marker module) builds
    a side environment that imports them and torch. Offline: no pip runs (``pip=False``)."""
    running = tmp_path / "running"
    subprocess.run([importlib.import_module("side_env").base_python(), "-m", "venv", "--without-pip", str(running)], check=True)
    py = running / "bin" / "python"
    site = _purelib(py)
    (site / "hexamoe_venv_marker.py").write_text("WHERE = 'the running venv'\n")
    # stands in for the venv's own installs: the test interpreter's packages (torch) through a .pth file
    (site / "stand_in.pth").write_text("".join(p + "\n" for p in sys.path if p.endswith("-packages")))
    side = tmp_path / "side"
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'scripts')!r}); import bench_train; "
            f"assert sys.prefix != sys.base_prefix; print(bench_train.side_env({str(side)!r}, pip=False))")
    got = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-2000:]
    side_py = got.stdout.strip().splitlines()[-1]
    probe = subprocess.run([side_py, "-c", "import hexamoe_venv_marker, torch; print(hexamoe_venv_marker.WHERE)"],
                           capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == "the running venv", probe.stderr[-2000:]
    # the side environment's own packages come first (its transformers is the one AutoEP gets)
    order = subprocess.run([side_py, "-c", "import sys; print(sys.path)"], capture_output=True, text=True).stdout
    assert order.index(str(_purelib(side_py))) < order.index(str(site))
