"""Swin-MoE by sparse upcycling: function preservation, gradients, save/reload, the image task, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForImageClassification, SwinConfig, SwinForImageClassification

from ds_hexamoe.config import ConfigError
from ds_hexamoe.layers import MoEBlock
from ds_hexamoe.models import SwinMoEForImageClassification, build_swin_moe, default_moe_layers

TINY = dict(image_size=32, patch_size=4, num_channels=1, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
            mlp_ratio=2.0, num_labels=10)


def _dense(seed=0) -> SwinForImageClassification:
    torch.manual_seed(seed)
    model = SwinForImageClassification(SwinConfig(**TINY)).eval()
    with torch.no_grad():  # non-zero MLP biases, so copying them into the experts is checked too
        for layer in model.swin.encoder.layers:
            for blk in layer.blocks:
                blk.mlp.fc1.bias.normal_(std=0.1)
                blk.mlp.fc2.bias.normal_(std=0.1)
    return model


def test_default_layout_is_every_second_block_of_last_two_stages():
    assert default_moe_layers([2, 2, 6, 2]) == [[2, 1], [2, 3], [2, 5], [3, 1]]
    assert default_moe_layers([2, 2]) == [[0, 1], [1, 1]]
    moe = build_swin_moe(_dense(), num_experts=4)
    assert [n for n, _ in moe.moe_blocks()] == ["swin.encoder.layers.0.blocks.1.mlp", "swin.encoder.layers.1.blocks.1.mlp"]


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_model_gives_dense_logits_at_init(top_k):
    dense = _dense()
    moe = build_swin_moe(copy.deepcopy(dense), num_experts=4, moe_layers=[[0, 0], [0, 1], [1, 1]],
                         router={"top_k": top_k, "norm_topk_prob": True}).eval()
    blk = moe.swin.encoder.layers[0].blocks[1].mlp
    assert isinstance(blk, MoEBlock) and blk.experts.has_bias and not blk.experts.has_gate
    assert torch.equal(blk.experts.up_proj[3], dense.swin.encoder.layers[0].blocks[1].mlp.fc1.weight)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ref, out = dense(x).logits, moe(x).logits
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the routing really spreads over experts (a single-expert route would make the check trivial)
    assert int((blk.counts > 0).sum()) >= 2
    # without renormalization top-1 weights are < 1 and the function changes: the test above can fail
    if top_k == 1:
        raw = build_swin_moe(copy.deepcopy(dense), num_experts=4, router={"top_k": 1, "norm_topk_prob": False}).eval()
        with torch.no_grad():
            assert (raw(x).logits - ref).abs().max() > 1e-3


def test_gradients_reach_experts_and_router_and_aux_loss_is_added():
    moe = build_swin_moe(_dense(), num_experts=4, router={"top_k": 2, "aux_loss_coef": 0.05}).train()
    x, y = torch.randn(6, 1, 32, 32), torch.randint(0, 10, (6,))
    out = moe(pixel_values=x, labels=y)
    ce = torch.nn.functional.cross_entropy(out.logits, y)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    out.loss.backward()
    for name, blk in moe.moe_blocks():
        for pname in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"):
            g = getattr(blk.experts, pname).grad
            assert g is not None and g.abs().sum() > 0, f"{name}.experts.{pname}"
        assert blk.router.weight.grad is not None and blk.router.weight.grad.abs().sum() > 0, name
    # the expert gradients match plain PyTorch on the same routing: recompute one block densely
    blk = moe.swin.encoder.layers[1].blocks[1].mlp
    h = torch.randn(5, blk.experts.up_proj.size(2), requires_grad=True)
    r = blk.router(h)
    ex = blk.experts
    ref = torch.zeros_like(h)
    for j in range(r.top_k_index.size(1)):
        e = r.top_k_index[:, j]
        a = torch.nn.functional.gelu(torch.einsum("td,tfd->tf", h, ex.up_proj[e]) + ex.up_proj_bias[e])
        ref = ref + r.top_k_weights[:, j:j + 1] * (torch.einsum("tf,tdf->td", a, ex.down_proj[e]) + ex.down_proj_bias[e])
    torch.testing.assert_close(blk(h), ref, rtol=1e-5, atol=1e-6)


def test_save_and_reload_round_trip(tmp_path):
    import ds_hexamoe.models  # noqa: F401  (registers swin_moe with the Auto classes)

    moe = build_swin_moe(_dense(), num_experts=3, moe_layers=[[1, 0], [1, 1]], router={"top_k": 2}).eval()
    with torch.no_grad():  # move off the upcycled point so a reload that re-upcycles would be caught
        for _, blk in moe.moe_blocks():
            blk.experts.down_proj.add_(torch.randn_like(blk.experts.down_proj) * 0.1)
    moe.save_pretrained(tmp_path)
    x = torch.randn(2, 1, 32, 32)
    for loader in (SwinMoEForImageClassification, AutoModelForImageClassification):
        back = loader.from_pretrained(tmp_path).eval()
        assert isinstance(back, SwinMoEForImageClassification)
        assert back.config.moe_layers == [[1, 0], [1, 1]] and back.config.num_experts == 3
        assert back.config.router["top_k"] == 2
        with torch.no_grad():
            torch.testing.assert_close(back(x).logits, moe(x).logits, rtol=0, atol=0)
    # build_swin_moe on a saved Swin-MoE folder loads it as is
    again = build_swin_moe(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, moe(x).logits, rtol=0, atol=0)


def test_bad_input_is_named():
    dense = _dense()
    with pytest.raises(ConfigError, match=r"moe_layers\[0\]"):
        build_swin_moe(dense, num_experts=4, moe_layers=[[2, 0]])
    with pytest.raises(ConfigError, match="router.top_k"):
        build_swin_moe(dense, num_experts=2, router={"top_k": 3})
    with pytest.raises(ConfigError, match="router.top_kk"):
        build_swin_moe(dense, num_experts=2, router={"top_kk": 1})
    with pytest.raises(ConfigError, match="num_experts"):
        build_swin_moe(dense, num_experts=0)
    with pytest.raises(ConfigError, match="model.path"):
        build_swin_moe("/nonexistent/swin")


def test_image_task_from_tiny_recipe():
    import json
    import os

    from ds_hexamoe.tasks.image_classification import build_image_task

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "recipes", "swin-moe-tiny.json")) as fh:
        recipe = json.load(fh)
    task = build_image_task(recipe, seed=0)
    assert len(task.train) + len(task.validation) == 1797 and task.num_labels == 10
    batch = task.collate([task.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 32, 32) and batch["labels"].dtype == torch.long
    out = task.model(**batch)
    assert out.logits.shape == (4, 10) and torch.isfinite(out.loss)
    assert len(task.model.moe_blocks()) == 2
    bad = dict(recipe, task_options={"dataset": "cifar"})
    with pytest.raises(ConfigError, match="task_options.dataset"):
        build_image_task(bad)
    bad = dict(recipe, task_options={"dataset": "imagefolder"})
    with pytest.raises(ConfigError, match="task_options.train_dir"):
        build_image_task(bad)
    bad = dict(recipe, model={"path": "/nonexistent", "config": {"embed_dim": 8}})
    with pytest.raises(ConfigError, match="model.config.embed_dim"):
        build_image_task(bad)
