"""A tiny causal-LM recipe and ``ds-hexamoe train`` runner for the checkpoint, resume and fault tests
(2 gloo CPU ranks through DeepSpeed's real launcher)."""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "ds_hexamoe", "data", "corpus")


def exe() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "ds-hexamoe")
    return local if os.path.exists(local) else shutil.which("ds-hexamoe")


def tiny_recipe(root, steps: int = 4, save_every: int = 2, sharding: str = "none", nproc: int = 2,
                micro_batch_size: int = 4, hexamoe: dict | None = None, name: str = "recipe.json",
                task: str | None = None, training: dict | None = None) -> str:
    """A recipe file under ``root`` (data copied beside it); ``sharding="fssdp"`` shards the experts;
    ``training`` overrides keys of the recipe's ``"training"`` section."""
    data = os.path.join(root, "data")
    if not os.path.isdir(data):
        os.makedirs(data)
        for f in ("Artistic.txt", "LGPL-3.txt", "Apache-2.0.txt"):
            shutil.copy(os.path.join(CORPUS, f), os.path.join(data, f))
    hx = {"enabled": True, **({"sharding": sharding} if sharding != "none" else {}), **(hexamoe or {})}
    recipe = {
        "name": "ckpt-tiny",
        "model": {"config": {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64,
                             "output_router_logits": True}},
        "tokenizer": {"build": {"vocab_size": 300}},
        "data": {"train_files": ["data/*.txt"], "seq_len": 32, "validation_fraction": 0.1, "cache_dir": "hf-cache"},
        "training": {"steps": steps, "micro_batch_size": micro_batch_size, "lr": 0.003, "warmup_steps": 1,
                     "dtype": "fp32", "log_every": 1, "save_every": save_every, "keep_checkpoints": 0,
                     "eval_every": 0, "seed": 11, "output_dir": os.path.join(root, "run"), "num_threads": 1,
                     "export_hf": False, **(training or {})},
        "deepspeed": {"zero_optimization": {"stage": 2}},
        "hexamoe": hx,
        "launcher": {"nproc": nproc},
    }
    if task is not None:
        recipe.update(task=task, trust_task_import=True)
    path = os.path.join(root, name)
    with open(path, "w") as fh:
        json.dump(recipe, fh, indent=2)
    return path


@functools.lru_cache(maxsize=1)
def _path_entry() -> str | None:
    """A folder that makes ``import ds_hexamoe`` find this checkout from anywhere, or None when the installed
    package already is this checkout. The worker drops the repository root from ``sys.path`` (its
    ``kernels/`` would shadow Hugging Face's), so the entry is a folder holding a link to the package."""
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('ds_hexamoe'); "
                            "print(s.origin if s and s.origin else '')"], cwd=tempfile.gettempdir(),
                           capture_output=True, text=True, timeout=120)
    origin = probe.stdout.strip()
    if origin and os.path.exists(origin) and os.path.samefile(os.path.dirname(origin), os.path.join(REPO, "ds_hexamoe")):
        return None
    folder = tempfile.mkdtemp(prefix="hexamoe-path-")
    os.symlink(os.path.join(REPO, "ds_hexamoe"), os.path.join(folder, "ds_hexamoe"))
    return folder


def env(extra: dict | None = None) -> dict:
    """The environment for a ``ds-hexamoe`` child, importing this checkout's package (and, for test tasks,
    the tests folder)."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (_path_entry(), os.path.join(REPO, "tests"),
                                                    out.get("PYTHONPATH")) if p)
    out.update(extra or {})
    return out


def train(args: list[str], cwd, check: bool = True, timeout: float = 300,
          extra_env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([exe(), "train", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env(extra_env))
    if check and proc.returncode != 0:
        raise AssertionError(f"ds-hexamoe train failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def crashed_copy(run, dest: str, tag: str, remove: tuple[str, ...]) -> str:
    """A copy of the finished ``run`` at ``dest`` as a run that crashed after checkpoint ``tag``: ``latest``
    names it, the later outputs ``remove`` (paths under the run) and ``summary.json`` are gone."""
    shutil.copytree(run, dest)
    with open(os.path.join(dest, "checkpoints", "latest"), "w") as fh:
        fh.write(tag)
    for name in remove:
        shutil.rmtree(os.path.join(dest, name))
    os.remove(os.path.join(dest, "summary.json"))
    return dest


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}
