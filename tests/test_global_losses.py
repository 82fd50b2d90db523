"""Losses that do not depend on how the global batch is split: the router's balancing loss from globally reduced
expert fractions, and each rank's loss weighted by its share of the units, give one process's loss, aux loss,
gradients and parameters on 2 gloo ranks with uneven shares (a transformers Mixtral with
``output_router_logits``, and the package's own router)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import cli_tiny
from ds_hexamoe.testing import run_distributed

ROWS, SEQ, VOCAB = 8, 12, 96
SHARES = {1: [ROWS], 2: [3, 5]}  # uneven on purpose


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.5,
                        initializer_range=0.2, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg).float()


def _global_batch(micro: int, pad: bool) -> dict:
    g = torch.Generator().manual_seed(100 + micro)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if pad:  # ragged rows: the shares then differ in tokens, not only in rows
        lengths = torch.randint(SEQ // 2, SEQ + 1, (ROWS,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return batch


def _rows(batch: dict, world: int, rank: int) -> dict:
    lo = sum(SHARES[world][:rank])
    return {k: v[lo:lo + SHARES[world][rank]] for k, v in batch.items()}


def _units(batch: dict) -> int:
    """The tokens the causal-LM loss averages over (the aux loss needs no particular count)."""
    from ds_hexamoe.hetero import count_tokens

    return count_tokens(batch["labels"])


def _grads_rank(rank: int, world: int, pad: bool) -> dict:
    """One micro-step as the colocated step weights it, gradients averaged over ranks as DeepSpeed does."""
    import torch.distributed as dist

    from ds_hexamoe.hetero import global_token_count, loss_scale
    from ds_hexamoe.integrations.transformers import global_balance

    model = _mixtral().train()
    batch = _rows(_global_batch(0, pad), world, rank)
    n = _units(batch)
    n_all = global_token_count(n)
    out = model(**batch)
    loss, aux = global_balance(model, out, batch, n / n_all)
    (loss * loss_scale(n, n_all, world)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    value = torch.tensor([float(loss) * n / n_all, float(aux) * n / n_all], dtype=torch.float64)
    dist.all_reduce(value)
    return {"loss": value[0].item(), "aux": value[1].item(), "grads": grads, "local_aux": float(out.aux_loss)}


@pytest.mark.parametrize("pad", [False, True], ids=["packed", "padded"])
def test_uneven_shares_give_one_process_loss_aux_and_gradients(pad):
    one = run_distributed(_grads_rank, 1, pad)[0]
    two = run_distributed(_grads_rank, 2, pad)
    # the rank's own-token balancing loss differs from the global one: the check below can fail
    assert abs(two[0]["local_aux"] - one["aux"]) > 1e-3 * one["aux"]
    for r in two:
        assert r["aux"] == pytest.approx(one["aux"], rel=1e-6)
        assert r["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert set(r["grads"]) == set(one["grads"])
        for k, g in one["grads"].items():
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-5, atol=1e-7, msg=k)


def _steps_rank(rank: int, world: int, recipe_path: str, steps: int) -> dict:
    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.tasks.base import TaskParts, WorkerContext
    from ds_hexamoe.worker.colocated import ColocatedStep

    recipe = load_recipe(recipe_path, {"training.micro_batch_size": SHARES[world][rank]})
    parts = TaskParts(model=_mixtral(), train=None, validation=None, collate=None, count=_units)
    step = ColocatedStep(recipe, WorkerContext(rank=rank, world_size=world), "cpu", parts)
    ga = recipe.training.grad_accum
    micro = iter(_rows(_global_batch(i, False), world, rank) for i in range(steps * ga))
    results = [step.step(micro, s) for s in range(1, steps + 1)]
    params = {k: p.detach().clone() for k, p in step.module.named_parameters()}
    return {"losses": [r.loss for r in results], "aux": [r.aux_loss for r in results],
            "units": [r.units for r in results], "params": params}


def test_colocated_steps_with_uneven_shares_equal_one_process(tmp_path):
    """Three optimizer steps of two micro-steps each through the worker's colocated step (DeepSpeed ZeRO-2, SGD):
    logged losses, aux losses, units and parameters of 3 + 5 rows per micro-step equal one rank's 8."""
    path = cli_tiny.tiny_recipe(str(tmp_path), training={"grad_accum": 2, "max_grad_norm": 0.0})
    with open(path) as fh:
        data = json.load(fh)
    data["deepspeed"].update(optimizer={"type": "SGD", "params": {"lr": 0.5}}, zero_allow_untested_optimizer=True)
    with open(path, "w") as fh:
        json.dump(data, fh)
    one = run_distributed(_steps_rank, 1, path, 3, fresh=True)[0]
    two = run_distributed(_steps_rank, 2, path, 3, fresh=True)
    for r in two:
        assert r["units"] == one["units"]
        assert r["losses"] == pytest.approx(one["losses"], rel=1e-6)
        assert r["aux"] == pytest.approx(one["aux"], rel=1e-6)
        for k, p in one["params"].items():
            torch.testing.assert_close(r["params"][k], p, rtol=1e-5, atol=1e-6, msg=k)
    assert one["losses"][0] != pytest.approx(one["losses"][-1], rel=1e-3)  # the steps did train


def _router_rank(rank: int, world: int) -> dict:
    """The package's router (Swin-MoE's): its aux loss on uneven shares, weighted by rows, is one process's."""
    import torch.distributed as dist

    from ds_hexamoe.config import RouterConfig
    from ds_hexamoe.layers import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(16, 4, RouterConfig(top_k=2, aux_loss_coef=0.5)).train()
    with torch.no_grad():
        router.weight.normal_(std=0.5)
    x = torch.randn(ROWS * 4, 16, generator=torch.Generator().manual_seed(5))
    lo, n = sum(SHARES[world][:rank]) * 4, SHARES[world][rank] * 4
    aux = router(x[lo:lo + n]).aux_loss
    (aux * world * n / x.size(0)).backward()
    t = torch.cat([(aux.detach() * n / x.size(0)).reshape(1), router.weight.grad.reshape(-1) / world])
    dist.all_reduce(t)
    return {"aux": t[0].item(), "grad": t[1:]}


def test_own_router_aux_loss_is_global():
    one = run_distributed(_router_rank, 1)[0]
    for r in run_distributed(_router_rank, 2):
        assert r["aux"] == pytest.approx(one["aux"], rel=1e-6)
        torch.testing.assert_close(r["grad"], one["grad"], rtol=1e-5, atol=1e-8)


def _cli_run(root: str, hexamoe: dict):
    os.makedirs(root)
    path = cli_tiny.tiny_recipe(root, steps=4, save_every=2, sharding="fssdp", micro_batch_size=6, hexamoe=hexamoe)
    return cli_tiny.train([path], cwd=root).stdout


def test_runs_with_different_batch_shares_log_the_same_losses(tmp_path):
    """``ds-hexamoe train`` with the router's aux loss on (Mixtral, FSSDP): even shares, a declared 3x slower rank 1
    (shares 9 + 3) and a 1-rank resume of that run at step 2 log the same losses and aux losses step for step."""
    even_root, uneven_root = str(tmp_path / "even"), str(tmp_path / "uneven")
    _cli_run(even_root, {})
    slow = [{"name": "cpu"}, {"name": "cpu", "slowdown": 3.0}]
    stdout = _cli_run(uneven_root, {"profile": "declared", "devices": slow})
    assert "plan: batch shares [9, 3]" in stdout
    out = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(uneven_root, "run"), out)
    with open(os.path.join(out, "checkpoints", "latest"), "w") as fh:
        fh.write("global_step2")
    shutil.rmtree(os.path.join(out, "checkpoints", "global_step4"))
    cli_tiny.train([os.path.join(out, "recipe.json"), "--resume", "--nproc", "1", "--output-dir", out,
                    "--set", "training.micro_batch_size=12", "--set", 'hexamoe.devices=[{"name": "cpu"}]'],
                   cwd=uneven_root)
    even, uneven = cli_tiny.metrics(os.path.join(even_root, "run")), cli_tiny.metrics(os.path.join(uneven_root, "run"))
    resumed = {r["step"]: r for r in cli_tiny.metrics(out)}
    assert [r["step"] for r in even] == [r["step"] for r in uneven] == [1, 2, 3, 4] == sorted(resumed)
    for a, b in zip(even, uneven):
        for key in ("loss", "aux_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (key, even, uneven)
            if b["step"] > 2:
                assert resumed[b["step"]][key] == pytest.approx(b[key], rel=1e-6), (key, uneven, resumed)
