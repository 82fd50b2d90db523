"""Router control of Hugging Face checkpoints (``hexamoe.router`` on transformers routers): z-loss, aux-loss
coefficient, DeepSeek-V3's aux-loss-free bias update, a frozen router, the per-layer figures, and the errors
raised before any work; every value against a hand computation from the routers' own logits."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import cli_tiny
from ds_hexamoe.config import ConfigError, RouterConfig
from ds_hexamoe.integrations.router_control import RouterControl, router_control
from ds_hexamoe.testing import run_distributed

VOCAB, E, K = 64, 4, 2


def _mixtral(aux_coef: float = 0.5):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=E, num_experts_per_tok=K,
                        max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=aux_coef,
                        initializer_range=0.2, tie_word_embeddings=False)
    return MixtralForCausalLM(cfg).float().train()


def _deepseek():
    """A tiny DeepSeek-V3 (sigmoid router with e_score_correction_bias, one shared expert)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=E,
                           num_experts_per_tok=K, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=0,
                           kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                           max_position_embeddings=64, tie_word_embeddings=False, use_cache=False, initializer_range=0.2,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = DeepseekV3ForCausalLM(cfg).float().train()
    with torch.no_grad():  # transformers initializes DeepSeek routers to zero: all ties; give them a direction
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    return model


def _batch(seed: int = 1, rows: int = 3, seq: int = 10, pad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if pad:
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0
        batch.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    return batch


def _router_logits(model, batch) -> list[torch.Tensor]:
    out = model(**batch, output_router_logits=True)
    return [l.detach().float() for l in out.router_logits]


def test_z_loss_and_figures_equal_hand_computation():
    model = _mixtral()
    batch = _batch(pad=True)
    with torch.no_grad():
        logits = _router_logits(model, batch)
    rc = RouterControl(model, RouterConfig(z_loss_coef=0.03))
    out = model(**batch)
    loss, z = rc.add_z_loss(out.loss, batch)
    keep = batch["attention_mask"].reshape(-1).bool()
    lse2 = [torch.logsumexp(l, -1).pow(2) for l in logits]
    z_ref = 0.03 * torch.cat([v[keep] for v in lse2]).mean()  # layers pooled, padding out
    assert z.item() == pytest.approx(z_ref.item(), rel=1e-6) and z.item() > 0
    assert (loss - out.loss).item() == pytest.approx(z_ref.item(), abs=1e-6)  # fp32 sum of ~4 and ~0.08
    # the gradient reaches the routers through the z-loss alone
    z.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    figs = rc.figures()
    for i, l in enumerate(logits):
        p = torch.softmax(l, -1)
        counts = torch.bincount(torch.topk(p, K, -1).indices.reshape(-1), minlength=E).double()
        got = figs["layers"][f"model.layers.{i}.mlp"]
        assert got["tokens"] == counts.tolist()
        assert got["imbalance"] == pytest.approx(float(counts.max() / counts.mean()))
        assert got["entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
        n = l.size(0)
        assert got["aux_loss"] == pytest.approx(float(E * (counts / n * p.mean(0).double()).sum()), rel=1e-5)
        assert got["z_loss"] == pytest.approx(float(0.03 * lse2[i].mean()), rel=1e-5)
    assert rc.figures() == {}  # the window was reset


def _z_rank(rank: int, world: int) -> dict:
    """Rank ``rank``'s rows of one padded global batch (3 + 5 rows on 2 ranks): its z-loss weighted by its share of
    the units, summed over ranks, and the router gradients of that sum."""
    import torch.distributed as dist

    shares = {1: [8], 2: [3, 5]}[world]
    lo, n = sum(shares[:rank]), shares[rank]
    g = _batch(seed=7, rows=8, pad=True)
    g["attention_mask"][3:, 6:] = 0  # ragged rows: the ranks' shares of tokens differ from their shares of rows
    batch = {k: v[lo:lo + n] for k, v in g.items()}
    model = _mixtral()
    rc = RouterControl(model, RouterConfig(z_loss_coef=0.05))
    from ds_hexamoe.hetero import count_tokens

    # the worker's units: label tokens after the shift (not the router rows: the weighting must still be exact)
    units = torch.tensor([float(count_tokens(batch["labels"]))], dtype=torch.float64)
    total = units.clone()
    dist.all_reduce(total)
    share = float(units / total)
    out = model(**batch)
    _, z = rc.add_z_loss(out.loss, batch, share)
    (z * share).backward()
    _, own = RouterControl(model, RouterConfig(z_loss_coef=0.05)).add_z_loss(model(**batch).loss, batch)
    value = torch.tensor([float(z) * share, float(own) * share], dtype=torch.float64)  # own: this rank's mean
    dist.all_reduce(value)
    grads = [l.mlp.gate.weight.grad.clone() for l in model.model.layers]
    for gr in grads:
        dist.all_reduce(gr)
    return {"z": value[0].item(), "own": value[1].item(), "grads": grads}


def test_z_loss_over_uneven_shares_is_one_process_value_and_gradient():
    one = run_distributed(_z_rank, 1)[0]
    for r in run_distributed(_z_rank, 2):
        assert abs(r["own"] - one["z"]) > 1e-4 * one["z"]  # per-rank means, share-weighted, are not the global z
        assert r["z"] == pytest.approx(one["z"], rel=1e-6)
        for a, b in zip(r["grads"], one["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_aux_loss_is_transformers_formula_and_coef_zero_gives_plain_lm_loss():
    from ds_hexamoe.integrations.transformers import global_balance

    batch = _batch()
    model = _mixtral(aux_coef=0.5)
    with torch.no_grad():
        logits = _router_logits(model, batch)
        out = model(**batch)
    p = torch.softmax(torch.cat(logits), -1)
    counts = torch.bincount(torch.topk(p, K, -1).indices.reshape(-1), minlength=E).float()
    aux_ref = E * (counts / p.size(0) * p.mean(0)).sum()
    loss, aux = global_balance(model, out, batch)
    assert float(aux) == pytest.approx(float(aux_ref), rel=1e-5)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))
    assert float(loss) == pytest.approx(float(lm + 0.5 * aux_ref), rel=1e-5)
    # coefficient 0 from hexamoe.router overrides the checkpoint's 0.5 and stops requesting router logits
    router_control(model, RouterConfig(aux_loss_coef=0.0))
    assert model.config.output_router_logits is False and model.router_aux_loss_coef == 0.0
    with torch.no_grad():
        out0 = model(**batch)
    assert out0.aux_loss is None and out0.router_logits is None
    assert float(out0.loss) == pytest.approx(float(lm), rel=1e-6)
    assert global_balance(model, out0, batch) == (out0.loss, None)
    router_control(model, RouterConfig(aux_loss_coef=0.2))  # and a new coefficient is the one applied
    with torch.no_grad():
        out2 = model(**batch)
    assert float(out2.loss) == pytest.approx(float(lm + 0.2 * aux_ref), rel=1e-5)


def test_frozen_router_gets_no_grad_and_no_optimizer_state():
    from ds_hexamoe.integrations.deepspeed import build_param_groups

    model = _mixtral()
    gates = [l.mlp.gate.weight for l in model.model.layers]
    router_control(model, RouterConfig(freeze=True))
    groups = build_param_groups(model, {})
    grouped = {id(p) for g in groups for p in g["params"]}
    assert not any(id(w) in grouped for w in gates) and len(grouped) > 0
    opt = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2)
    before = [w.clone() for w in gates]
    model(**_batch()).loss.backward()
    opt.step()
    assert all(w.grad is None for w in gates)
    assert all(id(p) not in {id(w) for w in gates} for p in opt.state) and len(opt.state) == len(grouped)
    assert all(torch.equal(a, w) for a, w in zip(before, gates))
    assert model.model.embed_tokens.weight.grad is not None  # the rest trains


def test_bias_is_used_for_selection_only():
    """DeepSeek-V3's router picks top-k on ``sigmoid + bias`` and weights by the unbiased sigmoid."""
    model = _deepseek()
    gate = model.model.layers[0].mlp.gate
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
        logits, weights, idx = gate(x)
    assert (idx == 3).any(-1).all()  # the bias forces expert 3 into every token's top-k
    s = torch.sigmoid(logits)
    ref = s.gather(1, idx)
    ref = ref / ref.sum(-1, keepdim=True) * gate.routed_scaling_factor
    torch.testing.assert_close(weights, ref)  # ... but never enters the weights


def _bias_rank(rank: int, world: int, recipe_path: str) -> dict:
    from ds_hexamoe.recipes import load_recipe
    from ds_hexamoe.tasks.base import TaskParts, WorkerContext
    from ds_hexamoe.worker.colocated import ColocatedStep

    recipe = load_recipe(recipe_path)
    parts = TaskParts(model=_deepseek(), train=None, validation=None, collate=None,
                      count=lambda b: int((b["labels"][:, 1:] != -100).sum()))
    step = ColocatedStep(recipe, WorkerContext(rank=rank, world_size=world), "cpu", parts)
    micro = iter(_batch(seed=10 + 2 * i + rank) for i in range(4))
    step.step(micro, 1)
    after1 = [l.mlp.gate.e_score_correction_bias.clone() for l in step.module.model.layers]
    step.step(micro, 2)
    after2 = [l.mlp.gate.e_score_correction_bias.clone() for l in step.module.model.layers]
    _, _, extra = step.row_metrics()
    step.close()
    return {"after1": after1, "after2": after2, "figures": extra["router"]}


def test_bias_update_on_two_ranks_equals_the_formula(tmp_path):
    """Two ranks, two micro-batches per step: after step 1 ``b = gamma * sign(mean - load)`` with the loads of
    all four micro-batches (both ranks, both micro-steps), routed with bias 0 by the initial weights."""
    gamma = 0.01
    path = cli_tiny.tiny_recipe(str(tmp_path), training={"grad_accum": 2, "lr": 1e-3},
                                hexamoe={"router": {"bias_update_rate": gamma}})
    ranks = run_distributed(_bias_rank, 2, path, fresh=True)
    model = _deepseek().eval()
    loads = torch.zeros(2, E)
    # the routing of each micro-batch, read with hooks on the reference model's routers
    seen: list[list[torch.Tensor]] = [[], []]
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o, l=l: seen[l].append(o[2]))
             for l, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for rank in range(2):
            for i in range(2):
                model(**_batch(seed=10 + 2 * i + rank))
    for h in hooks:
        h.remove()
    for l in range(2):
        loads[l] = torch.bincount(torch.cat(seen[l]).reshape(-1), minlength=E).float()
        expect = gamma * torch.sign(loads[l].mean() - loads[l])
        assert expect.abs().sum() > 0  # the loads are uneven: the check can fail
        for r in ranks:
            torch.testing.assert_close(r["after1"][l], expect)
            assert not torch.equal(r["after2"][l], r["after1"][l]) or loads[l].std() == 0
    assert torch.equal(ranks[0]["after2"][0], ranks[1]["after2"][0])  # every rank keeps the same bias
    figs = ranks[0]["figures"]["layers"]["model.layers.0.mlp"]
    assert sum(figs["tokens"]) == 2 * 2 * 2 * 3 * 10 * K  # 2 steps x 2 micro x 2 ranks x 3 rows x 10 tokens x k


def test_unsupported_options_are_named_before_any_work():
    with pytest.raises(ConfigError, match=r"hexamoe\.router\.bias_update_rate: .*'mixtral'.*e_score_correction_bias"):
        router_control(_mixtral(), RouterConfig(bias_update_rate=0.001))
    with pytest.raises(ConfigError, match=r"hexamoe\.router\.aux_loss_coef: .*'deepseek_v3'.*bias_update_rate"):
        router_control(_deepseek(), RouterConfig(aux_loss_coef=0.01))
    assert router_control(_deepseek(), RouterConfig(aux_loss_coef=0.0)) is not None
    assert router_control(torch.nn.Linear(2, 2), RouterConfig()) is None
    with pytest.raises(ConfigError, match=r"hexamoe\.router\.freeze: .*no Hugging Face router"):
        router_control(torch.nn.Linear(2, 2), RouterConfig(freeze=True))


def test_recipe_check_names_router_keys_a_checkpoint_ignores(tmp_path):
    from ds_hexamoe.recipes import load_recipe

    path = cli_tiny.tiny_recipe(str(tmp_path), hexamoe={"router": {"top_k": 1}})
    with pytest.raises(ConfigError, match=r"hexamoe\.router\.top_k: .*model\.config\.num_experts_per_tok"):
        load_recipe(path)
    data = json.load(open(path))
    data["hexamoe"]["router"] = {"bias_update_rate": -1.0}
    with pytest.raises(ConfigError, match=r"hexamoe\.router\.bias_update_rate"):
        load_recipe(data)


def test_cli_refuses_a_bias_update_for_a_model_without_correction_bias(tmp_path, capsys):
    """``ds-hexamoe train`` and ``validate`` build the model on the meta device and name the key and model type
    before launching; a DeepSeek-V3 model passes the same check."""
    from ds_hexamoe.cli import main

    path = cli_tiny.tiny_recipe(str(tmp_path), hexamoe={"router": {"bias_update_rate": 0.001}})
    assert main(["train", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "hexamoe.router.bias_update_rate: got 0.001; model type 'mixtral' has no e_score_correction_bias" in err
    assert main(["validate", path]) == 2
    ds = {"model_type": "deepseek_v3", "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 4,
          "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "kv_lora_rank": 16,
          "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
          "max_position_embeddings": 64}
    data = json.load(open(path))
    data["model"]["config"] = ds
    json.dump(data, open(path, "w"))
    assert main(["validate", path]) == 0, capsys.readouterr().err
