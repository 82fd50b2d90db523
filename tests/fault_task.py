"""A test task: the causal-LM task, plus a rank that SIGKILLs itself at a chosen point when
``HEXAMOE_TEST_KILL="<rank>:<step>:<where>"`` is set (``where``: ``forward``, the first forward of that
optimizer step; ``migrate``, inside FSSDP's shard migration after that step). It writes the moment of the
kill to ``HEXAMOE_TEST_KILL_FILE`` first, so a test can time how long the job takes to end. With
``HEXAMOE_TEST_FULL="<path>"``, rank 0 links that file (inside the run's output folder) to ``/dev/full`` when
the task is built, so writing it fails as on a full disk."""
from __future__ import annotations

import os
import signal
import time


def _die(marker: str | None) -> None:
    time.sleep(1.0)  # let rank 0 finish writing the previous step's metrics row
    if marker:
        with open(marker, "w") as fh:
            fh.write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def build(recipe, ctx):
    from ds_hexamoe.tasks.causal_lm import causal_lm_task

    parts = causal_lm_task(recipe, ctx)
    full = os.environ.get("HEXAMOE_TEST_FULL")
    if full and ctx.rank == 0:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        os.symlink("/dev/full", full)
    spec = os.environ.get("HEXAMOE_TEST_KILL")
    if not spec:
        return parts
    rank, step, where = spec.split(":")
    if int(rank) != ctx.rank:
        return parts
    step, marker = int(step), os.environ.get("HEXAMOE_TEST_KILL_FILE")
    ga = recipe.training.grad_accum
    if where == "forward":
        calls = [0]

        def pre_hook(module, args, kwargs):
            calls[0] += 1
            if module.training and calls[0] == (step - 1) * ga + 1:
                _die(marker)

        parts.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    elif where == "migrate":
        from ds_hexamoe.fssdp import migrate

        inner, seen = migrate.migrate_to, [0]

        def migrate_to(mgr, new_owns):
            seen[0] += 1
            if seen[0] == step:  # fssdp.reshard_every = 1: one migration after every optimizer step
                _die(marker)
            return inner(mgr, new_owns)

        migrate.migrate_to = migrate_to
    else:
        raise ValueError(f"HEXAMOE_TEST_KILL: unknown point {where!r}")
    return parts
