"""``ds-hexamoe train`` runs HeterMoE's per-layer Asym-EA placement on the zebra path (docs/modes.md, "Zebra"):
the planner's per-layer ``expert_owner`` becomes the layout, a recipe's explicit per-layer owners train (the
attention rank hosting an expert in one layer) with one process's losses and export, as the flat split does
(same math, another placement), the checkpoint's split records them and a resume under other owners is refused, and bad
per-layer owners are named as ``hexamoe.zebra.expert_owner`` before any training."""
from __future__ import annotations

import json

import pytest

import cli_tiny
from ds_hexamoe.config import ConfigError, HexaMoEConfig
from test_zebra_train import MBS, STEPS, ZEBRA, _recipe, check_run_equals_one_process

ASYM = {**ZEBRA, "expert_owner": [[0, 1, 1, 1], [1, 1, 1, 1]]}  # rank 0 attends and hosts expert 0 in layer 0
# rank 1 attends 8x slower and computes experts 2.5x slower: Asym-EA moves experts onto rank 0
SLOW_EXPERTS = [{"name": "cpu", "attn_tflops": 0.1, "expert_tflops": 0.1, "memory_gb": 16, "bandwidth_gbps": 5},
                {"name": "cpu", "attn_tflops": 0.1, "expert_tflops": 0.1, "memory_gb": 16, "bandwidth_gbps": 5,
                 "slowdown": 8, "expert_slowdown": 2.5}]


def _model(recipe):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = {k: v for k, v in recipe.model.config.items() if k != "model_type"}
    return MixtralForCausalLM(MixtralConfig(**cfg, vocab_size=300))


DS = {"train_micro_batch_size_per_gpu": MBS, "gradient_accumulation_steps": 1}


def _planned(rank, world, path):
    from ds_hexamoe.hetero import PlanState
    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.worker.zebra import zebra_layout

    recipe = load_recipe(path)
    model = _model(recipe)
    advice = PlanState.from_config(model, recipe.hexamoe_config, DS).plan.meta["zebra"]
    layout, _, _ = zebra_layout(recipe, model, DS, world)
    return advice, [layout.owners(layer) for layer in range(2)]


def test_the_planners_per_layer_owners_are_the_layout(tmp_path):
    from ds_hexamoe.testing import run_distributed

    path = cli_tiny.tiny_recipe(tmp_path, micro_batch_size=MBS, hexamoe={
        "zebra": {"enabled": True}, "profile": "declared", "devices": SLOW_EXPERTS})
    for advice, owners in run_distributed(_planned, 2, path, timeout=120):
        assert advice["asym_ea_moves"] > 0  # the expert fractions alone would give rank 1 every expert
        assert owners == [tuple(row) for row in advice["expert_owner"]]
        assert any(0 in row for row in owners)


def test_owners_alike_in_every_layer_are_the_flat_layout(tmp_path):
    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.worker.zebra import zebra_layout

    recipe = load_recipe(_recipe(tmp_path, zebra={**ASYM, "expert_owner": [[0, 1, 1, 1]] * 2}))
    assert zebra_layout(recipe, _model(recipe), DS, 2)[0].expert_owner == (0, 1, 1, 1)


def test_bad_per_layer_owners_are_named(tmp_path):
    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.worker.zebra import zebra_layout

    with pytest.raises(ConfigError, match=r"hexamoe\.zebra\.expert_owner: .*not both mixed"):
        HexaMoEConfig.from_dict({"zebra": {**ZEBRA, "expert_owner": [1, [1, 1, 1, 1]]}})
    with pytest.raises(ConfigError, match=r"hexamoe\.zebra\.expert_owner\[1\]\[2\]: got 'x'"):
        HexaMoEConfig.from_dict({"zebra": {**ZEBRA, "expert_owner": [[1, 1, 1, 1], [1, 1, "x", 1]]}})
    for owner, why in (([[0, 1, 1, 1]] * 3, "3 per-layer rows; expected one per layer \\(2\\)"),
                       ([[0, 1, 1, 1], [1, 1, 1]], "one rank in \\[0, 2\\) per expert"),
                       ([[0, 1, 1, 1], [0, 0, 0, 0]], None)):  # rank 1 hosts in layer 0: it is not idle
        recipe = load_recipe(_recipe(tmp_path, zebra={**ASYM, "expert_owner": owner}))
        if why is None:
            assert zebra_layout(recipe, _model(recipe), DS, 2)[0].per_layer
            continue
        with pytest.raises(ConfigError, match=r"hexamoe\.zebra\.expert_owner: .*" + why):
            zebra_layout(recipe, _model(recipe), DS, 2)


def test_bad_owners_are_named_before_launch(tmp_path, capsys):
    # the model's layer and expert counts come from its config on the meta device: nothing is launched
    from ds_hexamoe import cli
    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.worker.zebra import check_zebra_model

    for owner, why in (([[0, 1, 1, 1]] * 3, "3 per-layer rows; expected one per layer \\(2\\)"),
                       ([[0, 1, 1, 1], [1, 1, 1]], "one rank in \\[0, 2\\) per expert \\(4\\)")):
        path = _recipe(tmp_path, zebra={**ASYM, "expert_owner": owner})
        for world in (None, 2):
            with pytest.raises(ConfigError, match=r"hexamoe\.zebra\.expert_owner: .*" + why):
                check_zebra_model(load_recipe(path), world)
        for args in (["train", path, "--dry-run"], ["validate", path]):
            assert cli.main(args) == 2 and "hexamoe.zebra.expert_owner" in capsys.readouterr().err, args
    path = _recipe(tmp_path, zebra={**ZEBRA, "attention_ranks": [0], "expert_owner": [2, 2, 2, 2]})
    with pytest.raises(ConfigError, match=r"ranks \[1\] neither attend nor host"):
        check_zebra_model(load_recipe(path), None)
    with pytest.raises(ConfigError, match=r"zebra\.expert_owner: got \[2, 2, 2, 2\]; expected one rank in \[0, 2\)"):
        check_zebra_model(load_recipe(path), 2)
    check_zebra_model(load_recipe(_recipe(tmp_path, zebra=ASYM)), 2)  # a good split passes


def test_per_layer_owners_train_as_one_process_and_resume_only_under_them(tmp_path):
    # one process is the flat split's reference too (test_zebra_train): the same math under another placement

    from ds_hexamoe.parallel.zebra_hf import HFZebraStack
    from ds_hexamoe.recipes import load_recipe

    path = _recipe(tmp_path, zebra=ASYM, training={"save_every": 2})
    proc = cli_tiny.train([path], cwd=tmp_path, timeout=400)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())["zebra"]
    assert summary["expert_owner"] == ASYM["expert_owner"] and "expert owners [[0, 1, 1, 1], [1, 1, 1, 1]]" in proc.stdout
    rows = cli_tiny.metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    check_run_equals_one_process(path, run, rows)
    # rank 0 holds the dense part and expert 0 of layer 0 (1 of the 8 layer-experts' rows), rank 1 the other 7
    stack = HFZebraStack(_model(load_recipe(path)))
    dense, routed = (sum(p.numel() * 4 for p in ps) for ps in (stack.dense_parameters(), stack.expert_parameters()))
    assert [m["param_bytes"] for m in summary["memory_per_rank"]] == [dense + routed // 8, routed * 7 // 8]
    # the checkpoint's split holds the per-layer owners: a resume under the flat owners is refused
    other = _recipe(tmp_path, zebra=ZEBRA, training={"save_every": 2})
    proc = cli_tiny.train([other, "--resume"], cwd=tmp_path, check=False, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "the checkpoint was trained under the split" in out
    assert "[[0, 1, 1, 1], [1, 1, 1, 1]]" in out
