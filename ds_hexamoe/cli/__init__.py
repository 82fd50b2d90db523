"""``ds-hexamoe``: train from a recipe, validate one, plan placements, profile routing.

    ds-hexamoe train [RECIPE.json] [--nproc N] [--hostfile H] [--resume | --overwrite] [--steps S]
                     [--output-dir D] [--master-port P] [--set KEY=VALUE ...] [--dry-run]
    ds-hexamoe validate [RECIPE.json] [--set KEY=VALUE ...] [--print]
    ds-hexamoe plan ...                      (ds_hexamoe.cli.plan)
    ds-hexamoe profile-routing RECIPE.json ... (ds_hexamoe.cli.profile_routing)
    ds-hexamoe build-ops                     (build DeepSpeed's C++ ops once; scripts/setup.sh runs it)

``train`` validates the whole recipe (every path included) before it starts anything, then runs
``ds_hexamoe/train.py`` on every rank through DeepSpeed's launcher (``deepspeed --num_gpus N`` or
``--hostfile``). Without a recipe it trains the embedded default: it fine-tunes the small Hugging Face Mixtral checkpoint
shipped with the package, on 2 CPU ranks with FSSDP and a declared heterogeneous pair.
"""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..recipes import load_recipe
from . import train, validate
from .train import WORKER, launch_command

__all__ = ["WORKER", "build_parser", "launch_command", "load_recipe", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-hexamoe", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    train.register(sub)
    validate.register(sub)
    # these two parse their own arguments (see main)
    sub.add_parser("plan", help="plan expert placement (see `ds-hexamoe plan --help`)", add_help=False)
    sub.add_parser("profile-routing", help="record routing statistics of a recipe's model", add_help=False)
    b = sub.add_parser("build-ops", help="build DeepSpeed's C++ ops ahead, once per machine (scripts/setup.sh runs it)")
    b.set_defaults(fn=_build_ops)
    return p


def _build_ops(args) -> int:
    import time

    from ..integrations.ds_ops import prebuild

    t0 = time.perf_counter()
    print("building DeepSpeed's ops ahead (once per machine; a few minutes the first time) ...", flush=True)
    ops = prebuild()
    print(f"DeepSpeed ops ready: {', '.join(ops) or 'none needed'} ({time.perf_counter() - t0:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # imported on use: the planner needs scipy and the profiler torch, which train and validate do not
    if argv and argv[0] == "plan":
        from .plan import plan_main

        return int(plan_main(argv[1:]) or 0)
    if argv and argv[0] == "profile-routing":
        from .profile_routing import profile_main

        return int(profile_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        for problem in getattr(e, "problems", [str(e)]):  # validation reports every error it found
            print(f"ds-hexamoe {args.command}: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
