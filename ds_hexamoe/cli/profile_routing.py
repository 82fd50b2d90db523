"""``ds-hexamoe profile-routing``: run a recipe's model on a few batches of its data and write the routing
statistics (with the model shape) as JSON, and with ``--trace`` the per-forward routing trace
(:mod:`ds_hexamoe.experts.trace`). Returns a process exit code."""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..experts.trace import RoutingTrace
from ..hetero.routing import profile_routing, trace_recorder
from ..recipes import load_recipe
from ..tasks.causal_lm import build_dataset, build_model, build_tokenizer


def _recipe_model_and_batches(recipe, n: int):
    """The recipe's model and its first ``n`` training micro-batches, built exactly as ``ds-hexamoe train``
    builds them (tokenizer loaded or trained, packed blocks, the recipe's experts implementation)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hexamoe-profile-") as tmp:
        tok = build_tokenizer(recipe, save_dir=tmp)
    model = build_model(recipe, tok)
    data = build_dataset(recipe, tok)
    mb = recipe.training.micro_batch_size
    count = min(n, len(data.train) // mb)
    if count < 1:
        raise ConfigError(f"data.train_files: {len(data.train)} blocks, fewer than one batch of {mb}; add data or "
                          "reduce training.micro_batch_size / data.seq_len")
    return model, [data.collate([data.train[j] for j in range(i * mb, (i + 1) * mb)]) for i in range(count)]


def profile_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ds-hexamoe profile-routing",
                                 description="Collect routing statistics of a recipe's model on its data.")
    ap.add_argument("recipe", help="recipe JSON")
    ap.add_argument("--batches", type=int, default=8, help="micro-batches to run (default 8)")
    ap.add_argument("--out", default="routing.json", help="statistics JSON to write (default routing.json)")
    ap.add_argument("--trace", help="also write the routing trace (one row per forward, summed over ranks) as JSON")
    args = ap.parse_args(argv)
    try:
        if args.batches < 1:
            raise ConfigError(f"--batches: got {args.batches}; expected an integer >= 1")
        recipe = load_recipe(args.recipe)
        model, batches = _recipe_model_and_batches(recipe, args.batches)
        rows: list = []
        stats = profile_routing(model, batches, args.batches, after_forward=trace_recorder(rows) if args.trace else None)
        if stats.model is not None:
            stats.model["seq_len"] = recipe.data.seq_len
    except ConfigError as e:
        print(f"ds-hexamoe profile-routing: error: {e}", file=sys.stderr)
        return 2
    stats.save_json(args.out)
    b = stats.balance()
    print(f"recorded {len(stats.layers)} MoE layers over {stats.forwards} batches; load max/mean {b['overall']:.2f}; "
          f"wrote {args.out}")
    if args.trace:
        trace = RoutingTrace.like(stats, recipe=recipe.name, micro_batch_size=recipe.training.micro_batch_size,
                                  seq_len=recipe.data.seq_len)
        for row in rows:
            trace.append(row)
        trace.save_json(args.trace)
        print(f"wrote the routing trace {args.trace}: {len(rows)} rows (one per forward)")
    return 0

