"""``ds-hexamoe plan RECIPE.json`` prints the plan training makes: its batch shares and shard weights equal
what a real 2-rank ``ds-hexamoe train`` of the same recipe records in ``summary.json``; ``--set`` works as
in ``train``; bad recipes and what one process cannot plan are refused, saying why."""
from __future__ import annotations

import json
import os
import re

import pytest

import cli_tiny
from ds_hexamoe.cli.plan import plan_main

# declared numbers: the plan is deterministic (rank 1 declared 3x slower)
DEVICES = [{"name": "cpu-a", "tflops": 1.0, "memory_gb": 8, "bandwidth_gbps": 10},
           {"name": "cpu-b", "tflops": 1.0, "memory_gb": 8, "bandwidth_gbps": 10, "slowdown": 3.0}]
HEXAMOE = {"profile": "declared", "devices": DEVICES}


def _planned(capsys, argv: list[str]) -> dict:
    rc = plan_main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    shares = re.search(r"^batch shares: (\[.*\])$", out, re.M)
    weights = re.search(r"^shard weights: (\[.*\])$", out, re.M)
    return {"batch_shares": json.loads(shares.group(1)), "shard_weights": json.loads(weights.group(1)), "out": out}


@pytest.mark.slow
def test_plan_equals_what_training_records(tmp_path, capsys):
    recipe = cli_tiny.tiny_recipe(tmp_path, steps=2, save_every=0, sharding="fssdp", hexamoe=HEXAMOE)
    planned = _planned(capsys, [recipe])
    assert sum(planned["batch_shares"]) == 2 * 4 and planned["batch_shares"][0] > planned["batch_shares"][1]
    assert "initial plan" in planned["out"] and "'shard_by': 'speed'" in planned["out"]
    cli_tiny.train([recipe], cwd=tmp_path, timeout=600)
    with open(os.path.join(tmp_path, "run", "summary.json")) as fh:
        report = json.load(fh)["report"]
    assert report["batch_shares"] == planned["batch_shares"]
    assert report["shard_weights"] == planned["shard_weights"]


def test_set_overrides_like_train(tmp_path, capsys):
    recipe = cli_tiny.tiny_recipe(tmp_path, sharding="fssdp", hexamoe=HEXAMOE)
    four = _planned(capsys, [recipe, "--set", "model.config.vocab_size=320"])
    assert sum(four["batch_shares"]) == 8
    two = _planned(capsys, [recipe, "--set", "training.micro_batch_size=2", "--set", "model.config.vocab_size=320"])
    assert sum(two["batch_shares"]) == 4 and "global micro-batch 4 (2 per rank x 2)" in two["out"]
    out = tmp_path / "plan.json"
    _planned(capsys, [recipe, "--set", "model.config.vocab_size=320", "--out", str(out)])
    assert json.loads(out.read_text())["meta"]["options"]["schedule"] == "hecate"  # the config's, as in training


def test_bad_recipes_and_measure_are_refused(tmp_path, capsys):
    assert plan_main([str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    recipe = cli_tiny.tiny_recipe(tmp_path, sharding="fssdp", hexamoe=HEXAMOE)
    assert plan_main([recipe, "--set", "hexamoe.shard_weight=[1,1]"]) == 2
    assert "hexamoe.shard_weight: unknown key (did you mean 'shard_weights'?)" in capsys.readouterr().err
    assert plan_main([recipe, "--set", 'hexamoe.profile="measure"']) == 2
    err = capsys.readouterr().err
    assert "\"measure\" times every rank's own device" in err and "--set 'hexamoe.profile=\"declared\"'" in err
    assert plan_main([recipe, "--set", "launcher.nproc=3"]) == 2  # two declared devices for three ranks
    assert "hexamoe.devices: 2 device profiles for 3 ranks" in capsys.readouterr().err
    assert plan_main([recipe, "--solver", "ilp"]) == 2
    assert "--solver: with a recipe" in capsys.readouterr().err


def test_embedded_default_plans_with_declared_profiles(capsys):
    """The README's acceptance command: the shipped recipe's ``"cpu"`` devices resolve from the built-in table
    (rank 1's declared 2x slowdown kept), so declared planning needs no numbers in the recipe."""
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "mixtral-tiny-finetune.json")
    planned = _planned(capsys, [recipe, "--set", 'hexamoe.profile="declared"'])
    assert sum(planned["batch_shares"]) == 16 and planned["batch_shares"][0] > planned["batch_shares"][1]
    assert abs(sum(planned["shard_weights"]) - 1) < 1e-3 and planned["shard_weights"][0] > planned["shard_weights"][1]


def test_embedded_default_plans_1024_ranks(capsys):
    """A cluster-sizing run: the shipped recipe on 1024 declared ranks completes (its small corpus, which
    could not fill 1024 ranks' micro-batches, is not read by ``plan``), and the printed plan names the zebra
    split search's approximation (a refined grid above 256 ranks)."""
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "mixtral-tiny-finetune.json")
    devices = '[{"name": "cpu", "count": 512}, {"name": "cpu-2x-slower", "slowdown": 2.0, "count": 512}]'
    planned = _planned(capsys, [recipe, "--set", 'hexamoe.profile="declared"', "--nproc", "1024",
                                "--set", f"hexamoe.devices={devices}"])
    shares = planned["batch_shares"]
    assert len(shares) == 1024 and sum(shares) == 8 * 1024 and shares[0] > shares[-1]
    zebra = re.search(r"^zebra \(attention and expert ranks apart\): .* split search: (.*)$", planned["out"], re.M)
    assert zebra and re.fullmatch(r"\d+ of 1023 splits: a grid of 64 refined around its best point \(above 256 ranks\)",
                                  zebra.group(1)), planned["out"][-600:]
