"""The per-rank training worker that ``ds-hexamoe train`` starts through DeepSpeed's launcher.

Run by file path (``deepspeed ... ds_hexamoe/train.py --recipe R``), never with ``-m``: a launcher that
puts the repository root on ``sys.path`` would let its ``kernels/`` folder shadow Hugging Face's
``kernels`` package, so the worker drops such entries before importing anything else.

Per rank: seed, tokenizer (trained on rank 0, shared through the output folder), model
(``experts_implementation="hexamoe"``), packed data split by a seeded ``DistributedSampler``,
``ds_hexamoe.initialize``, the training loop (tqdm on rank 0: loss, tokens/s, expert-load balance,
comm bytes), ``metrics.jsonl``, DeepSpeed checkpoints that resume exactly, and an atomic Hugging Face
export at the end.
"""
from __future__ import annotations

import os
import sys


def _sanitize_sys_path() -> None:
    """Drop this file's folder and the repository root from ``sys.path`` (see the module docstring)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    bad = {here}
    if os.path.isdir(os.path.join(root, "kernels")) and os.path.isfile(os.path.join(root, "setup.py")):
        bad.add(root)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) not in bad]


if __name__ == "__main__":
    _sanitize_sys_path()

import argparse  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ds_hexamoe.config import ConfigError  # noqa: E402
from ds_hexamoe.recipes import Recipe, load_recipe, lr_lambda, recipe_json, task_builder  # noqa: E402

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_KEY = "hexamoe_train"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------
# Builders (also used by the routing profiler and the tests)


def build_model(recipe: Recipe, tokenizer=None) -> torch.nn.Module:
    """The recipe's causal LM: ``from_pretrained(model.path)`` or ``from_config(model.config)``, with
    the recipe's experts implementation, in the training dtype. A fresh model's vocabulary and special
    token ids follow ``tokenizer``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import ds_hexamoe  # noqa: F401  registers the "hexamoe" experts implementation

    m = recipe.model
    dtype = _DTYPES[recipe.training.dtype]
    kwargs = dict(experts_implementation=m.experts_implementation, trust_remote_code=m.trust_remote_code)
    if m.path is not None:
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=dtype, **(m.config or {}), **kwargs)
        return _finish_model(model, recipe)
    cfg_dict = dict(m.config)
    model_type = cfg_dict.pop("model_type")
    if tokenizer is not None:
        n = len(tokenizer)
        vocab = cfg_dict.setdefault("vocab_size", n)
        if vocab < n:
            raise ConfigError(f"model.config.vocab_size: {vocab} is smaller than the tokenizer's {n} tokens; raise it "
                              "or leave it out (it then follows the tokenizer)")
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            tid = getattr(tokenizer, name, None)
            cfg_dict.setdefault(name, tid)
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"model.config.model_type: {model_type!r} is not a transformers model type ({e})") from None
    model = AutoModelForCausalLM.from_config(config, **kwargs).to(dtype)
    return _finish_model(model, recipe)


def _finish_model(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # a KV cache is useless in training and conflicts with recompute
    return model


# ---------------------------------------------------------------------------------------------------
# Tasks: a task turns a recipe into the model, the datasets and how to batch and count them.


@dataclass
class WorkerContext:
    """What a task builder needs to know about the process it runs in."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    output_dir: str = "."
    resume: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (filling caches, writing shared files), then the other ranks."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


@dataclass
class TaskParts:
    """A task's pieces. ``collate`` builds the keyword arguments of ``model(**batch)``, whose output
    has a ``.loss``; ``count`` says how many units (tokens, images) a batch holds for throughput;
    ``processor`` (a tokenizer, an image processor) is saved with the Hugging Face export."""

    model: torch.nn.Module
    train: Any
    validation: Any | None
    collate: Callable[[list], dict]
    processor: Any = None
    unit: str = "tok"
    count: Callable[[dict], int] = field(default=lambda b: int(b["input_ids"].numel()))


def causal_lm_task(recipe: Recipe, ctx: WorkerContext) -> TaskParts:
    """Causal language modeling on packed text blocks."""
    from ds_hexamoe.data import build_dataset, build_tokenizer

    save = os.path.join(ctx.output_dir, "tokenizer") if recipe.tokenizer_spec.build is not None else None
    with ctx.main_first():
        if save is None or ctx.is_main:
            tokenizer = build_tokenizer(recipe, save_dir=save)
        else:
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(save)  # exactly the one rank 0 trained
    with ctx.main_first():
        data = build_dataset(recipe, tokenizer)
    _seed_all(recipe.training.seed)  # the same initial weights on every rank, whatever ran before
    model = build_model(recipe, tokenizer)

    def count(batch):
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    return TaskParts(model=model, train=data.train, validation=data.validation, collate=data.collate,
                     processor=tokenizer, unit="tok", count=count)


# ---------------------------------------------------------------------------------------------------
# Data order: a seeded DistributedSampler per epoch, addressed by the number of micro-batches consumed.


def _micro_batches_per_epoch(samples: int, per_batch: int, micro_batch_size: int, world_size: int,
                             dataset_len: int) -> int:
    n = samples // per_batch
    if n == 0:
        raise ConfigError(f"training.micro_batch_size: {micro_batch_size} x {world_size} ranks needs at least "
                          f"{micro_batch_size * world_size} training blocks but the data has {dataset_len}; "
                          "lower micro_batch_size or data.seq_len, or add data")
    return n


class BatchPlan:
    """Micro-batch ``i`` of this rank, for any ``i``: epoch ``i // per_epoch`` of a ``DistributedSampler``
    with a fixed seed, so a resumed run reads exactly the batches the uninterrupted run would have."""

    def __init__(self, dataset, micro_batch_size: int, rank: int, world_size: int, seed: int):
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.mbs = micro_batch_size
        self.per_epoch = _micro_batches_per_epoch(len(self.sampler), micro_batch_size, micro_batch_size, world_size,
                                                  len(dataset))
        self._epoch, self._order = None, None

    def indices(self, i: int) -> list[int]:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(iter(self.sampler))
        return self._order[j * self.mbs : (j + 1) * self.mbs]

    def batches(self, dataset, collate, start: int) -> Iterator[dict]:
        i = start
        while True:
            idx = self.indices(i)
            yield collate([dataset[k] for k in idx])
            i += 1


class SharedBatchPlan(BatchPlan):
    """Heterogeneous placement: every rank reads the same global micro-batch ``i`` (``micro_batch_size x
    world`` samples of a seeded permutation) and keeps its plan share, read at every batch so a re-plan
    applies from the next one. Loss scaling in the loop keeps the result equal to one process."""

    def __init__(self, dataset, micro_batch_size: int, rank: int, world_size: int, seed: int, hetero):
        self.rank, self.hetero, self.seed, self.n = rank, hetero, seed, len(dataset)
        self.global_size = micro_batch_size * world_size
        self.mbs = micro_batch_size
        self.per_epoch = _micro_batches_per_epoch(self.n, self.global_size, micro_batch_size, world_size, self.n)
        self._epoch, self._order = None, None

    def indices(self, i: int) -> list[int]:
        from ds_hexamoe.hetero import share_bounds

        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=g).tolist()
        shares = list(self.hetero.batch_shares)
        if sum(shares) != self.global_size:  # the plan's global batch is micro_batch_size x world
            raise RuntimeError(f"plan batch shares {shares} do not sum to the global micro-batch {self.global_size}")
        lo, hi = share_bounds(shares, self.rank)
        base = j * self.global_size
        return self._order[base + lo : base + hi]


# ---------------------------------------------------------------------------------------------------
# Checkpoints: DeepSpeed's files, plus per-rank RNG states, then an atomic "latest".


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: str, data: bytes | str) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_torch_save(obj: Any, path: str) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write(path, buf.getvalue())


def _rank_state_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"hexamoe_rank{rank:05d}.pt")


def read_latest(ckpt_dir: str) -> str | None:
    """The tag of the last complete checkpoint, or None."""
    try:
        with open(os.path.join(ckpt_dir, "latest")) as fh:
            tag = fh.read().strip()
    except OSError:
        return None
    return tag or None


def save_checkpoint(engine, ckpt_dir: str, step: int, state: dict, ctx: WorkerContext, keep: int) -> str:
    """Save DeepSpeed's checkpoint ``global_step{step}`` and this rank's RNG, then publish ``latest``.

    ``latest`` is written (atomically, by rank 0) only after every rank has finished writing, so a
    save interrupted at any point leaves the previous checkpoint as the one a resume uses.
    """
    tag = f"global_step{step}"
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={STATE_KEY: state}, save_latest=False)
    _atomic_torch_save({"step": step, "rng": _rng_state()}, _rank_state_path(ckpt_dir, tag, ctx.rank))
    ctx.barrier()
    if ctx.is_main:
        _atomic_write(os.path.join(ckpt_dir, "latest"), tag)
        if keep > 0:
            _prune_checkpoints(ckpt_dir, keep, tag)
    ctx.barrier()
    return tag


def _prune_checkpoints(ckpt_dir: str, keep: int, current: str) -> None:
    tags = []
    for name in os.listdir(ckpt_dir):
        if name.startswith("global_step") and name[len("global_step"):].isdigit():
            tags.append((int(name[len("global_step"):]), name))
    cur = int(current[len("global_step"):])
    # only completed, older checkpoints; an unpublished newer folder is a crashed save and is overwritten later
    done = sorted(t for t in tags if t[0] <= cur)
    for _, name in done[:-keep]:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def _remove_unpublished(ckpt_dir: str, step: int) -> None:
    """Delete checkpoint folders newer than the resumed one: saves that never completed."""
    for name in os.listdir(ckpt_dir):
        num = name[len("global_step"):]
        if name.startswith("global_step") and num.isdigit() and int(num) > step:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: str, ctx: WorkerContext) -> dict:
    tag = read_latest(ckpt_dir)
    if tag is None:
        raise ConfigError(f"--resume: no complete checkpoint in {ckpt_dir!r} (no 'latest' file); run without --resume")
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"--resume: DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir!r}")
    state = (client or {}).get(STATE_KEY)
    if state is None:
        raise RuntimeError(f"--resume: checkpoint {tag!r} in {ckpt_dir!r} was not written by ds-hexamoe train")
    rank_file = _rank_state_path(ckpt_dir, tag, ctx.rank)
    if os.path.exists(rank_file):
        _set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    return state


# ---------------------------------------------------------------------------------------------------
# Metrics


class ExpertLoadTracker:
    """Tokens per expert of every experts module, counted from the routing the module receives.

    Used for the balance figure when the engine's runtime reports none."""

    def __init__(self, model: torch.nn.Module, device):
        from ds_hexamoe.integrations.transformers import experts_modules

        self.device = device
        self.counts: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, m in experts_modules(model):
            n = getattr(m, "num_experts", None)
            if n is None:
                continue
            self.handles.append(m.register_forward_hook(self._hook(name, int(n))))

    def _hook(self, name: str, n: int):
        def hook(module, args, output):
            if len(args) >= 2 and torch.is_tensor(args[1]):
                idx = args[1].detach().reshape(-1)
                # counted on the device: no host sync until balance() is read
                c = torch.bincount(idx[idx < n].to(torch.long), minlength=n)
                self.counts[name] = self.counts.get(name, 0) + c

        return hook

    def balance(self) -> float | None:
        """Mean over layers of max/mean tokens per expert across all ranks since the last call."""
        if not self.counts:
            return None
        names = sorted(self.counts)
        stacked = torch.stack([self.counts[n].to(self.device, torch.float64) for n in names])
        if dist.is_initialized():
            dist.all_reduce(stacked)
        self.counts.clear()
        mean = stacked.mean(dim=1).clamp_min(1e-12)
        return float((stacked.max(dim=1).values / mean).mean())


def _runtime_metrics(engine) -> dict:
    rt = getattr(engine, "hexamoe", None)
    fn = getattr(rt, "metrics", None)
    if not callable(fn):
        return {}
    try:
        return dict(fn())
    except Exception as e:  # metrics must never stop training
        logging.getLogger(__name__).warning("engine.hexamoe.metrics() failed: %s", e)
        return {}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _all_mean(values: list[float | torch.Tensor], device) -> list[float]:
    """Means over ranks (one collective; on the engine's device, as NCCL needs)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# The run


def _initialize_fn():
    try:
        from ds_hexamoe.integrations.deepspeed import initialize
    except ModuleNotFoundError as e:
        if e.name != "ds_hexamoe.integrations.deepspeed":
            raise
        import deepspeed

        return deepspeed.initialize
    return initialize


def _export_hf(engine, parts: TaskParts, out: str, ctx: WorkerContext) -> str | None:
    """``save_pretrained`` of model + processor into a temp folder, renamed onto ``out`` (all ranks call)."""
    from ds_hexamoe.data import atomic_save_dir

    rt = getattr(engine, "hexamoe", None)
    export = getattr(rt, "export_state_dict", None)
    state = export() if callable(export) else None  # may be collective (FSSDP gathers experts)
    if ctx.is_main:
        module = engine.module
        if state is None:
            state = module.state_dict()

        def write(tmp):
            module.save_pretrained(tmp, state_dict=state)
            if parts.processor is not None and hasattr(parts.processor, "save_pretrained"):
                parts.processor.save_pretrained(tmp)

        atomic_save_dir(write, out)
    ctx.barrier()
    return out


def _evaluate(engine, parts: TaskParts, ctx: WorkerContext, mbs: int) -> float | None:
    """Token-weighted mean validation loss over the whole validation split (sharded over ranks)."""
    if parts.validation is None:
        return None
    n = len(parts.validation)
    mine = list(range(ctx.rank, n, ctx.world_size))
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(mine), mbs):
            batch = parts.collate([parts.validation[k] for k in mine[i : i + mbs]])
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            units = parts.count(batch)
            loss = engine(**batch).loss.detach().to(torch.float64)
            total[0] += loss * units
            total[1] += units
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else None


def run(recipe: Recipe, resume: bool = False) -> dict:
    """Train ``recipe`` on this process's rank (DeepSpeed initializes the process group)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from tqdm.auto import tqdm

    t = recipe.training
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    accel = get_accelerator().device_name()
    if accel == "cpu":
        threads = t.num_threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)
    ctx = WorkerContext(rank=rank, world_size=world, local_rank=local_rank, output_dir=t.output_dir, resume=resume)
    _quiet_libraries(ctx.is_main)
    ckpt_dir = recipe.checkpoint_dir
    if ctx.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        _atomic_write(os.path.join(t.output_dir, "recipe.json"), recipe_json(recipe))
    ctx.barrier()
    if resume and read_latest(ckpt_dir) is None:
        raise ConfigError(f"--resume: no complete checkpoint in {ckpt_dir!r} (no 'latest' file); run without --resume")

    t0 = time.perf_counter()
    _seed_all(t.seed)
    parts = task_builder(recipe)(recipe, ctx)
    ds_config = recipe.ds_config(world, accel)
    scheduler = None if "scheduler" in ds_config else (
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t)))
    engine, _, _, _ = _initialize_fn()(model=parts.model, config=ds_config, lr_scheduler=scheduler)
    # the engine's runtime reports balance itself; count routing here only when it cannot
    rt_metrics = getattr(getattr(engine, "hexamoe", None), "metrics", None)
    tracker = None if callable(rt_metrics) else ExpertLoadTracker(engine.module, engine.device)

    step = 0
    if resume:
        state = load_checkpoint(engine, ckpt_dir, ctx)
        _check_resume_compatible(state, recipe, world, len(parts.train))
        step = int(state["step"])
    else:
        _seed_all(t.seed + rank)  # per-rank streams for anything stochastic in training (dropout)
    start_step = step
    hetero = getattr(getattr(engine, "hexamoe", None), "hetero", None)
    if hetero is not None:
        plan = SharedBatchPlan(parts.train, t.micro_batch_size, rank, world, t.seed, hetero)
    else:
        plan = BatchPlan(parts.train, t.micro_batch_size, rank, world, t.seed)
    batches = plan.batches(parts.train, parts.collate, start=step * t.grad_accum)

    metrics_path = os.path.join(t.output_dir, METRICS_FILE)
    if ctx.is_main:
        _truncate_metrics(metrics_path, step)
        if resume:
            _remove_unpublished(ckpt_dir, step)
    setup_s = time.perf_counter() - t0
    bar = tqdm(total=t.steps, initial=step, desc=recipe.name, disable=not ctx.is_main, dynamic_ncols=True,
               unit="step", file=sys.stdout)
    first_loss, last_loss, losses = None, None, []
    window_units, window_t0 = 0, time.perf_counter()
    train_t0 = time.perf_counter()
    device = engine.device
    engine.train()
    while step < t.steps:
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        step_aux = torch.zeros((), dtype=torch.float64, device=device)
        units = 0
        lrs = engine.get_lr()
        lr = float(lrs[0]) if lrs else None  # the rate this step applies (the scheduler moves after it)
        for _ in range(t.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            n_local = parts.count(batch)
            units += n_local
            out = engine(**batch)
            loss_for_grad = out.loss
            if hetero is not None:
                # uneven shares: weight each rank's mean loss by its share of the micro-batch's units, so
                # DeepSpeed's equal averaging over ranks gives the mean over the union
                from ds_hexamoe.hetero import global_token_count, loss_scale

                loss_for_grad = out.loss * loss_scale(n_local, global_token_count(n_local), world)
            engine.backward(loss_for_grad)
            engine.step()
            step_loss += out.loss.detach().to(torch.float64) / t.grad_accum
            aux = getattr(out, "aux_loss", None)  # the router's balancing loss, already inside out.loss
            step_aux += aux.detach().to(torch.float64) / t.grad_accum if torch.is_tensor(aux) else math.nan
        step += 1
        rt = getattr(engine, "hexamoe", None)
        if callable(getattr(rt, "after_step", None)):
            rt.after_step(step)
        loss, aux_loss, total_units = _all_mean([step_loss, step_aux, float(units)], device)
        total_units *= world
        losses.append(loss)
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        window_units += total_units
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss}; lower training.lr or check the data")
        eval_now = bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)
        log_now = step % t.log_every == 0 or step == t.steps or step == 1 or eval_now
        if log_now:
            elapsed = time.perf_counter() - window_t0
            rtm = _runtime_metrics(engine)
            balance = rtm.get("balance") if tracker is None else tracker.balance()
            rec = {"step": step, "loss": loss, "loss_mean": sum(losses) / len(losses),
                   "lr": lr,
                   f"{parts.unit}_per_s": window_units / max(elapsed, 1e-9), "balance": balance,
                   "comm_bytes": rtm.get("comm_bytes"), "elapsed_s": time.perf_counter() - train_t0}
            if math.isfinite(aux_loss):
                rec["aux_loss"] = aux_loss
            for key in ("dropped_tokens",):
                if key in rtm:
                    rec[key] = rtm[key]
            losses, window_units, window_t0 = [], 0, time.perf_counter()
            if eval_now:
                rec["val_loss"] = _evaluate(engine, parts, ctx, t.micro_batch_size)
            if ctx.is_main:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                post = {"loss": f"{loss:.4f}", parts.unit + "/s": f"{rec[parts.unit + '_per_s']:.0f}"}
                post["bal"] = "n/a" if balance is None else f"{balance:.2f}"
                post["comm"] = "n/a" if rec["comm_bytes"] is None else _fmt_bytes(rec["comm_bytes"])
                if rec.get("val_loss") is not None:
                    post["val"] = f"{rec['val_loss']:.4f}"
                bar.set_postfix(post, refresh=False)
        bar.update(1)
        if (t.save_every and step % t.save_every == 0) or step == t.steps:
            state = {"step": step, "micro_batches": step * t.grad_accum, "world_size": world, "seed": t.seed,
                     "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum,
                     "train_blocks": len(parts.train)}
            save_checkpoint(engine, ckpt_dir, step, state, ctx, t.keep_checkpoints)
    bar.close()
    train_s = time.perf_counter() - train_t0

    hf_dir = None
    if t.export_hf:
        hf_dir = _export_hf(engine, parts, os.path.join(t.output_dir, "hf"), ctx)
    summary = {"name": recipe.name, "steps": t.steps, "start_step": start_step, "world_size": world, "first_loss": first_loss,
               "last_loss": last_loss, "setup_s": setup_s, "train_s": train_s,
               "checkpoint": os.path.join(ckpt_dir, read_latest(ckpt_dir) or ""), "hf_export": hf_dir,
               "resumed": resume}
    if ctx.is_main:
        _atomic_write(os.path.join(t.output_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
        if first_loss is None:
            losses_msg = f"nothing left to train (checkpoint at step {start_step})"
        else:
            losses_msg = (f"first loss {first_loss:.4f} (step {start_step + 1}), last loss {last_loss:.4f} "
                          f"(step {t.steps})")
        print(f"[ds-hexamoe] {recipe.name}: {losses_msg}; {world} ranks, train {train_s:.1f}s, setup {setup_s:.1f}s",
              flush=True)
        print(f"[ds-hexamoe] checkpoint: {summary['checkpoint']}", flush=True)
        if hf_dir:
            print(f"[ds-hexamoe] Hugging Face export: {hf_dir}", flush=True)
    return summary


def _check_resume_compatible(state: dict, recipe: Recipe, world: int, train_blocks: int) -> None:
    t = recipe.training
    want = {"world_size": world, "seed": t.seed, "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum,
            "train_blocks": train_blocks}
    for key, value in want.items():
        if key in state and state[key] != value:
            raise ConfigError(f"--resume: the checkpoint was written with {key}={state[key]!r} but this run has "
                              f"{value!r}; the data order would differ. Use the same setting or start a new output_dir")
    if state["step"] > t.steps:
        raise ConfigError(f"--resume: the checkpoint is at step {state['step']}, past training.steps={t.steps}")


def _truncate_metrics(path: str, step: int) -> None:
    """Keep only records up to ``step``: later ones belong to the run that is being redone."""
    if not os.path.exists(path):
        return
    if step == 0:
        os.remove(path)
        return
    with open(path) as fh:
        keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
    _atomic_write(path, "".join(keep))


def _quiet_libraries(is_main: bool) -> None:
    import datasets
    import transformers

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    if not is_main:
        datasets.disable_progress_bars()


def encode_overrides(overrides: dict[str, Any]) -> str:
    """Overrides as a shell-safe token (the launcher may pass arguments through ssh/pdsh)."""
    return base64.urlsafe_b64encode(json.dumps(overrides).encode()).decode()


def decode_overrides(token: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(token.encode()).decode()) if token else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ds-hexamoe training worker (started by `ds-hexamoe train`)")
    p.add_argument("--recipe", default=None, help="recipe JSON (default: the embedded mixtral-tiny)")
    p.add_argument("--overrides", default="", help="base64 JSON of dotted-key overrides")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe, overrides=decode_overrides(args.overrides))
    run(recipe, resume=args.resume)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
