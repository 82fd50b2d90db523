"""Issue 24, checkpoints and outputs: files written with the umask's permissions, one export line, a plain
run that never overwrites an earlier run, --resume-fallback past a damaged 'latest', a failed shard load that
ends every rank naming the file, a full disk during the export, and a schedule kept on an extended resume."""
from __future__ import annotations

import json
import os
import stat

import pytest

from ds_hexamoe.atomic import atomic_save_dir, atomic_write


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_atomic_writes_get_the_permissions_the_umask_gives(tmp_path, umask_027):
    f = str(tmp_path / "a.json")
    atomic_write(f, "{}")
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640

    def write(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            fh.write("{}")

    d = str(tmp_path / "hf")
    atomic_save_dir(write, d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(os.path.join(d, "config.json")).st_mode) == 0o640


def test_the_export_is_printed_once(capsys):
    from types import SimpleNamespace

    from ds_hexamoe.worker import loop

    report = {"batch_shares": [3, 1], "shard_weights": [0.75, 0.25], "slowdowns": [1.0, 2.0],
              "predicted_step_s": 0.1, "predicted_uniform_step_s": 0.2, "measured_step_s": 0.11,
              "measured_steps": [3, 8], "calibration": None, "expert_bytes_per_step": 1000.0,
              "replicated_expert_bytes_per_step": 2000.0, "hf_export": "/out/hf"}
    run = SimpleNamespace(recipe=SimpleNamespace(name="t", training=SimpleNamespace(steps=8)), last_eval={},
                          strategy=SimpleNamespace(header_lines=lambda: []))
    summary = {"first_loss": 5.0, "last_loss": 4.0, "world_size": 2, "checkpoint": "/out/checkpoints/global_step8",
               "hf_export": "/out/hf", "report": report}
    loop._print_outcome(run, summary, 0, {"train_s": 1.0, "setup_s": 1.0})
    said = capsys.readouterr().out
    assert said.count("/out/hf") == 1 and "export (from_pretrained loads it): /out/hf" in said, said
    assert "plan: batch shares [3, 1]" in said


# -- 1: a plain run never overwrites an earlier run ------------------------------------------------------


def _earlier_run(out: str, rows: int = 6) -> dict[str, bytes]:
    """What the issue's repro leaves: a complete global_step2, a newer global_step4, no 'latest' (deleted, or
    a crash before it was written), 6 metrics rows. Returns every file's bytes."""
    for tag in ("global_step2", "global_step4"):
        os.makedirs(os.path.join(out, "checkpoints", tag))
        with open(os.path.join(out, "checkpoints", tag, "mp_rank_00_model_states.pt"), "wb") as fh:
            fh.write(tag.encode())
    with open(os.path.join(out, "checkpoints", "global_step2", "hexamoe_manifest.json"), "w") as fh:
        fh.write("{}")
    with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
        fh.write("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, rows + 1)))
    return _snapshot(out)


def _snapshot(out: str) -> dict[str, bytes]:
    found = {}
    for root, _, files in os.walk(out):
        for name in files:
            if name != ".ds-hexamoe.lock":
                found[os.path.relpath(os.path.join(root, name), out)] = open(os.path.join(root, name), "rb").read()
    return found


def test_plain_run_into_an_earlier_runs_outputs_is_refused(tmp_path, capsys):
    import cli_tiny
    from ds_hexamoe import cli

    recipe = cli_tiny.tiny_recipe(str(tmp_path))
    out = str(tmp_path / "run")
    before = _earlier_run(out)
    assert cli.main(["train", recipe]) == 2
    err = capsys.readouterr().err
    assert "training.output_dir" in err and "already holds an earlier run's outputs" in err, err
    assert "global_step2, global_step4" in err and "metrics.jsonl with 6 row(s)" in err
    assert "--resume-fallback" in err and "--overwrite" in err and "--output-dir" in err
    assert _snapshot(out) == before
    # --resume without 'latest' names the fallback instead of "run without --resume"
    assert cli.main(["train", recipe, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no 'latest' file" in err and "--resume-fallback" in err and "run without --resume" not in err, err
    assert _snapshot(out) == before


def test_worker_never_saves_over_a_published_checkpoint(tmp_path):
    from ds_hexamoe.tasks.base import WorkerContext
    from ds_hexamoe.worker.checkpoints import save_checkpoint

    ckpt = str(tmp_path / "checkpoints")
    os.makedirs(os.path.join(ckpt, "global_step2"))
    manifest = os.path.join(ckpt, "global_step2", "hexamoe_manifest.json")
    with open(manifest, "w") as fh:
        fh.write('{"files": {}}')
    calls = []

    class Engine:
        def save_checkpoint(self, *a, **k):
            calls.append(a)

    with pytest.raises(RuntimeError, match="already holds a published checkpoint"):
        save_checkpoint(Engine(), ckpt, 2, {"step": 2}, WorkerContext(rank=0, world_size=1), keep=0)
    assert calls == [] and open(manifest).read() == '{"files": {}}'


# -- 7: --resume-fallback past a damaged 'latest'; advice that is not the command that failed ---------------


def _checkpoint(ckpt: str, step: int, manifest: bool = True) -> str:
    from ds_hexamoe.worker.checkpoints.manifest import file_digest, write_manifest

    tag_dir = os.path.join(ckpt, f"global_step{step}")
    os.makedirs(tag_dir)
    with open(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(b"weights %d" % step)
    if manifest:
        write_manifest(tag_dir, {"mp_rank_00_model_states.pt": file_digest(os.path.join(tag_dir,
                                                                                        "mp_rank_00_model_states.pt"))},
                       {"tag": f"global_step{step}", "step": step, "world_size": 1})
    return tag_dir


def test_fallback_with_a_damaged_latest_resumes_from_the_newest_verified(tmp_path):
    from ds_hexamoe.worker.checkpoints import check_before_resume

    ckpt = str(tmp_path / "checkpoints")
    _checkpoint(ckpt, 2)
    with open(os.path.join(_checkpoint(ckpt, 4), "mp_rank_00_model_states.pt"), "ab") as fh:
        fh.write(b"!")  # changed after the save
    _checkpoint(ckpt, 6, manifest=False)  # a save that never completed
    with open(os.path.join(ckpt, "latest"), "w") as fh:
        fh.write("glocal_step4")
    said = []
    assert check_before_resume(ckpt, fallback=True, log=said.append) == "global_step2"
    assert open(os.path.join(ckpt, "latest")).read() == "global_step2"
    assert sorted(os.listdir(ckpt)) == ["global_step2", "global_step4.corrupt", "global_step6.corrupt", "latest"]
    assert "'glocal_step4', which is no checkpoint folder" in said[0], said
    # with 'latest' missing altogether, the same
    os.remove(os.path.join(ckpt, "latest"))
    assert check_before_resume(ckpt, fallback=True, log=said.append) == "global_step2"


def test_advice_after_a_failed_resume_is_not_the_same_resume(tmp_path):
    from ds_hexamoe.worker.checkpoints import after_failure

    ckpt = str(tmp_path / "checkpoints")
    _checkpoint(ckpt, 2)
    with open(os.path.join(ckpt, "latest"), "w") as fh:
        fh.write("global_step2")
    failed = after_failure(str(tmp_path), ckpt, 1, resumed_from="global_step2")
    assert "--resume`" not in failed and "--resume-fallback" in failed and "completed no newer checkpoint" in failed
    assert "--resume`" in after_failure(str(tmp_path), ckpt, 1)  # a fresh run that failed: resume it
    _checkpoint(ckpt, 4)
    with open(os.path.join(ckpt, "latest"), "w") as fh:
        fh.write("global_step4")  # the resumed run got further: resuming again is the advice
    assert "global_step4: continue with" in after_failure(str(tmp_path), ckpt, 1, resumed_from="global_step2")


# -- 2: one rank that cannot load its FSSDP shard file ends every rank within seconds -------------------

SHARD_CASE = dict(world=2, experts=4, top_k=2, micro=1, gas=1, global_rows=2, lr=3e-3, clip=0.0, steps=1,
                  remat=False, prefetch=False)


def _save_then_load_a_crafted_shard(rank: int, world: int, ckpt: str) -> str:
    import time

    import deepspeed
    import torch

    from test_fssdp import build_engine, quiet
    from ds_hexamoe.tasks.base import WorkerContext
    from ds_hexamoe.worker.checkpoints import load_checkpoint, save_checkpoint
    from ds_hexamoe.worker.checkpoints.manifest import MANIFEST, file_digest

    quiet()
    deepspeed.init_distributed("gloo")
    ctx = WorkerContext(rank=rank, world_size=world)
    engine, _ = build_engine(SHARD_CASE)
    save_checkpoint(engine, ckpt, 1, {"step": 1, "seed": 0}, ctx, keep=0)
    tag_dir = os.path.join(ckpt, "global_step1")
    if rank == 1:  # a file this rank alone reads: not loadable, its manifest entry rewritten to match
        victim = os.path.join(tag_dir, "fssdp_rank00001.pt")
        with open(victim, "wb") as fh:
            fh.write(b"PK\x03\x04 not a torch file")
        manifest = json.load(open(os.path.join(tag_dir, MANIFEST)))
        manifest["files"]["fssdp_rank00001.pt"] = file_digest(victim)
        with open(os.path.join(tag_dir, MANIFEST), "w") as fh:
            json.dump(manifest, fh)
    torch.distributed.barrier()
    t0 = time.monotonic()
    try:
        load_checkpoint(engine, ckpt, ctx)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{time.monotonic() - t0:.1f}s: {e}"
    return "loaded"


def test_a_shard_file_one_rank_cannot_load_ends_every_rank_naming_it(tmp_path):
    from ds_hexamoe.testing import run_distributed

    ckpt = str(tmp_path / "checkpoints")
    out = run_distributed(_save_then_load_a_crafted_shard, 2, ckpt, timeout=60)  # not 600 s in an all_reduce
    victim = os.path.join(ckpt, "global_step1", "fssdp_rank00001.pt")
    for said in out:
        assert f"rank 1 (RuntimeError: cannot load {victim!r}" in said and "nothing was loaded" in said, out


def _one_rank_fails(rank: int, world: int) -> str:
    from ds_hexamoe.worker.checkpoints.store import _agreed

    def fn():
        if rank == 1:
            raise ValueError("rank 1's file is bad")
        return "ok"

    try:
        _agreed(fn, "/ckpt")
    except Exception as e:  # noqa: BLE001
        return str(e)
    return "went on"


def test_the_ranks_that_loaded_name_the_rank_that_did_not():
    from ds_hexamoe.testing import run_distributed

    said = run_distributed(_one_rank_fails, 2)
    assert said[1] == "rank 1's file is bad"
    assert "another rank failed" in said[0] and "rank 1: rank 1's file is bad" in said[0], said


def test_the_cli_refuses_a_shard_file_that_does_not_load_before_launch(tmp_path):
    from ds_hexamoe.worker.checkpoints import CheckpointCorrupt, check_before_resume

    ckpt = str(tmp_path / "checkpoints")
    tag_dir = _checkpoint(ckpt, 2)
    import torch

    torch.save({"layers": {}}, os.path.join(tag_dir, "fssdp_rank00000.pt"))
    with open(os.path.join(tag_dir, "fssdp_rank00001.pt"), "wb") as fh:
        fh.write(b"garbage")
    _checkpoint_manifest(tag_dir)
    with open(os.path.join(ckpt, "latest"), "w") as fh:
        fh.write("global_step2")
    with pytest.raises(CheckpointCorrupt, match=r"refusing to load .*fssdp_rank00001\.pt"):
        check_before_resume(ckpt)


def _checkpoint_manifest(tag_dir: str) -> None:
    from ds_hexamoe.worker.checkpoints.manifest import checkpoint_files, file_digest, write_manifest

    write_manifest(tag_dir, {n: file_digest(os.path.join(tag_dir, n)) for n in checkpoint_files(tag_dir)},
                   {"tag": os.path.basename(tag_dir), "step": 2, "world_size": 2})


# -- 8c: a full disk during the Hugging Face export -----------------------------------------------------


def test_disk_full_during_the_export_names_it_and_the_intact_checkpoint(tmp_path):
    import errno
    from types import SimpleNamespace

    from ds_hexamoe.tasks.base import WorkerContext
    from ds_hexamoe.worker import export

    class Module:
        def state_dict(self):
            return {}

        def save_pretrained(self, folder, state_dict):
            with open(os.path.join(folder, "model.safetensors"), "wb") as fh:
                fh.write(b"half of the weights")
            raise OSError(errno.ENOSPC, "No space left on device")

    out_dir = str(tmp_path / "run")
    ckpt = os.path.join(out_dir, "checkpoints")
    checkpoint = _checkpoint(ckpt, 4)
    with open(os.path.join(ckpt, "latest"), "w") as fh:
        fh.write("global_step4")
    run = SimpleNamespace(ctx=WorkerContext(rank=0, world_size=1), parts=SimpleNamespace(processor=None),
                          recipe=SimpleNamespace(training=SimpleNamespace(output_dir=out_dir), checkpoint_dir=ckpt),
                          strategy=SimpleNamespace(export_state=lambda: None, module=Module(), keeps_checkpoints=True))
    hf = os.path.join(out_dir, "hf")
    with pytest.raises(RuntimeError) as got:
        export.export_hf(run, hf)
    said = str(got.value)
    assert f"writing the Hugging Face export into {hf!r} failed" in said and "The disk is full" in said, said
    assert f"the checkpoint {checkpoint!r} is intact" in said and "--resume` writes the export" in said
    assert "nothing of it was left behind" in said and os.listdir(out_dir) == ["checkpoints"]  # no half-written folder


# -- 10a: extending a finished run keeps its learning-rate schedule unless asked --------------------------


def _resumed_lrs(reshape: bool) -> tuple[list[float], str, object]:
    """A 4-step schedule loaded at step 4, then run to training.steps=8: the rates of steps 5-8."""
    from types import SimpleNamespace

    import torch

    from ds_hexamoe.recipes import lr_lambda
    from ds_hexamoe.recipes.schema import TrainingSpec
    from ds_hexamoe.worker import loop

    t4 = TrainingSpec(steps=4, lr=0.01, warmup_steps=1, min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t4.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t4))
    for _ in range(4):  # the run that wrote the checkpoint at step 4
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    # the resumed run builds its scheduler from its own recipe (steps=8), then DeepSpeed restores both states
    t8 = TrainingSpec(steps=8, lr=0.01, warmup_steps=1, min_lr_ratio=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t8))
    sched.load_state_dict(saved_sched)
    opt.load_state_dict(saved_opt)
    r = SimpleNamespace(recipe=SimpleNamespace(training=t8), schedule_steps=None,
                        strategy=SimpleNamespace(engine=SimpleNamespace(lr_scheduler=sched)))
    line = loop._resumed_schedule(r, {"step": 4, "schedule_steps": 4}, reshape)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, line, r


def test_extending_a_finished_run_keeps_its_schedule_unless_asked():
    kept, line, r = _resumed_lrs(reshape=False)
    assert kept == pytest.approx([0.001] * 4)  # the schedule's final rate, not a climb back up
    assert "schedule (4 steps) is kept: steps 5-8 train at its final rate 0.001" in line and "--reshape-schedule" in line
    assert r.schedule_steps == 4  # what the next checkpoint records, so a further resume keeps it too
    stretched, line, r = _resumed_lrs(reshape=True)
    assert stretched[0] == pytest.approx(0.001) and max(stretched) > 0.003, stretched  # climbs back up
    assert line.startswith("--reshape-schedule: the learning-rate schedule is stretched from the checkpoint's 4 steps")
    assert r.schedule_steps is None


def test_reshape_schedule_flag(tmp_path, capsys):
    import cli_tiny
    from ds_hexamoe import cli
    from ds_hexamoe.worker.checkpoints import loop_state

    recipe = cli_tiny.tiny_recipe(str(tmp_path))
    assert cli.main(["train", recipe, "--reshape-schedule"]) == 2
    assert "--reshape-schedule: " in capsys.readouterr().err and not os.path.exists(tmp_path / "run")
    assert cli.main(["train", recipe, "--resume", "--reshape-schedule", "--dry-run"]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["--resume", "--reshape-schedule"]
    from ds_hexamoe.recipes import load_recipe

    assert loop_state(load_recipe(recipe), 2, 2, 10)["schedule_steps"] == 4
    assert loop_state(load_recipe(recipe), 2, 2, 10, schedule_steps=3)["schedule_steps"] == 3


def test_resume_with_more_steps_keeps_the_schedule_end_to_end(tmp_path):
    """2 gloo ranks through the launcher: a finished 4-step run resumed with --steps 6 trains steps 5-6 at
    the schedule's final rate and says so (it climbed back to 8.2e-4 in the issue)."""
    import cli_tiny

    root = str(tmp_path)
    recipe = cli_tiny.tiny_recipe(root, steps=4, save_every=4, training={"min_lr_ratio": 0.1})
    cli_tiny.train([recipe], cwd=root)
    proc = cli_tiny.train([os.path.join(root, "run", "recipe.json"), "--resume", "--steps", "6"], cwd=root)
    assert "learning-rate schedule (4 steps) is kept: steps 5-6 train at its final rate 0.0003" in proc.stdout
    rows = cli_tiny.metrics(os.path.join(root, "run"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows[3:]] == pytest.approx([0.0003] * 3), rows
