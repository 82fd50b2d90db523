"""The zebra rank's optimizer (``worker/zebra_optim.py``) on 2 gloo ranks, each owning one tensor: bf16
parameters step through fp32 masters exactly as fp32 AdamW on the masters does; in fp16 an inf gradient on
one rank skips the step on both (parameters, moments and schedule unchanged) and halves the scale, and
``loss_scale_window`` clean steps double it; the global norm clips over both ranks' tensors. A checkpoint
resumes under its own split and rank count only."""
from __future__ import annotations

import torch

from ds_hexamoe.recipes.schema import TrainingSpec
from ds_hexamoe.testing import run_distributed

T = TrainingSpec(lr=0.1, adam_betas=(0.9, 0.99), weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0, steps=10,
                 schedule="constant")


def _rank(rank, world):
    from ds_hexamoe.worker.zebra_optim import ZebraOptimizer

    out = {}
    g = torch.Generator().manual_seed(rank)
    start = torch.randn(8, generator=g)
    grad = torch.randn(8, generator=g) * 3
    # bf16 with fp32 masters against fp32 AdamW run on the same fp32 values, clipped by the two ranks' norm
    p = torch.nn.Parameter(start.to(torch.bfloat16))
    opt = ZebraOptimizer([("w", p)], T)
    ref = torch.nn.Parameter(p.detach().float().clone())
    ref_opt = torch.optim.AdamW([ref], lr=T.lr, betas=T.adam_betas, eps=T.adam_eps, weight_decay=0.0)
    p.grad = grad.to(torch.bfloat16)
    norm = opt.step(1, counted=True)
    ref.grad = grad.to(torch.bfloat16).float() * min(1.0, T.max_grad_norm / (norm + 1e-6))
    ref_opt.step()
    out["bf16"] = (p.detach().float(), ref.detach().to(torch.bfloat16).float(), opt.masters[0].detach(), ref.detach(), norm)
    # fp16: rank 1 overflows at the first step; both ranks skip it
    q = torch.nn.Parameter(start.half())
    opt16 = ZebraOptimizer([("w", q)], T, {"initial_scale_power": 4, "loss_scale_window": 2})
    before = q.detach().clone()
    q.grad = torch.full_like(q, float("inf") if rank == 1 else 1.0)
    opt16.step(1, counted=True)
    out["skip"] = (torch.equal(q.detach(), before), opt16.loss_scale, opt16.skipped, opt16.lr(), len(opt16.opt.state))
    for _ in range(2):
        q.grad = torch.full_like(q, opt16.loss_scale)  # a unit gradient, scaled as the loss was
        opt16.step(1, counted=True)
    out["grow"] = (torch.equal(q.detach(), before), opt16.loss_scale, opt16.skipped)
    return out


def test_masters_loss_scale_and_global_clipping():
    for r in run_distributed(_rank, 2, timeout=120):
        got, want, master, ref_master, norm = r["bf16"]
        assert norm > T.max_grad_norm  # clipping was active, over both ranks' gradients
        torch.testing.assert_close(master, ref_master, rtol=1e-6, atol=1e-7)
        assert torch.equal(got, want)  # the bf16 parameter is its fp32 master rounded
        same, scale, skipped, lr, moments = r["skip"]
        assert same and scale == 8.0 and skipped == 1 and lr == T.lr and moments == 0
        same, scale, skipped = r["grow"]
        assert not same and scale == 16.0 and skipped == 1


def test_a_checkpoint_resumes_under_its_own_split_only(tmp_path):
    import pytest

    from ds_hexamoe.config import ConfigError
    from ds_hexamoe.worker.checkpoints.manifest import write_manifest
    from ds_hexamoe.worker.zebra_ckpt import ZebraFiles, check_same_world
    from ds_hexamoe.worker.zebra_optim import ZebraOptimizer

    split = {"attention_ranks": [0], "shares": [8], "expert_owner": [1, 1], "micro_batches": 2}
    p = torch.nn.Parameter(torch.arange(4.0))
    ZebraFiles(ZebraOptimizer([("w", p)], T), 0, split).save_checkpoint(str(tmp_path), "global_step1", {"k": 1})
    q = torch.nn.Parameter(torch.zeros(4))
    path, client = ZebraFiles(ZebraOptimizer([("w", q)], T), 0, split).load_checkpoint(str(tmp_path), "global_step1")
    assert client == {"k": 1} and torch.equal(q.detach(), torch.arange(4.0))
    other = dict(split, expert_owner=[1, 2])
    with pytest.raises(ConfigError, match=r"hexamoe\.zebra: the checkpoint was trained under the split"):
        ZebraFiles(ZebraOptimizer([("w", q)], T), 0, other).load_checkpoint(str(tmp_path), "global_step1")
    write_manifest(str(tmp_path / "global_step1"), {}, {"tag": "global_step1", "step": 1, "world_size": 3})
    (tmp_path / "latest").write_text("global_step1")
    with pytest.raises(ConfigError, match=r"written by 3 ranks, this run has 2"):
        check_same_world(str(tmp_path), 2)


def test_a_zebra_file_that_does_not_load_is_refused_before_launch(tmp_path):
    import os

    import pytest

    from ds_hexamoe.worker.checkpoints import CheckpointCorrupt, check_before_resume
    from ds_hexamoe.worker.checkpoints.manifest import checkpoint_files, file_digest, write_manifest

    tag_dir = tmp_path / "global_step2"
    tag_dir.mkdir()
    (tag_dir / "zebra_rank00000.pt").write_bytes(b"garbage")
    write_manifest(str(tag_dir), {n: file_digest(os.path.join(tag_dir, n)) for n in checkpoint_files(str(tag_dir))},
                   {"tag": "global_step2", "step": 2, "world_size": 1})
    (tmp_path / "latest").write_text("global_step2")
    with pytest.raises(CheckpointCorrupt, match=r"refusing to load .*zebra_rank00000\.pt', the zebra parameters"):
        check_before_resume(str(tmp_path))
