"""The worker's command line, as ``ds-hexamoe train`` passes it through DeepSpeed's launcher
(docs/design.md, "Recipes, tasks, worker and CLI")."""
from __future__ import annotations

import argparse
import base64
import json
from typing import Any

import torch.distributed as dist

from ..distributed import dist_on
from ..recipes import load_recipe
from .lifeline import arm as arm_lifeline
from .loop import run


def encode_overrides(overrides: dict[str, Any]) -> str:
    """Overrides as a shell-safe token (the launcher may pass arguments through ssh/pdsh)."""
    return base64.urlsafe_b64encode(json.dumps(overrides).encode()).decode()


def decode_overrides(token: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(token.encode()).decode()) if token else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ds-hexamoe training worker (started by `ds-hexamoe train`)")
    p.add_argument("--recipe", default=None, help="recipe JSON (default: the embedded mixtral-tiny-finetune)")
    p.add_argument("--overrides", default="", help="base64 JSON of dotted-key overrides")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--reshape-schedule", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    arm_lifeline()  # end with the job: parent death signal and a watchdog on the ds-hexamoe process
    recipe = load_recipe(args.recipe, overrides=decode_overrides(args.overrides))
    run(recipe, resume=args.resume, reshape_schedule=args.reshape_schedule)
    if dist_on():
        dist.barrier()
        dist.destroy_process_group()
    return 0
