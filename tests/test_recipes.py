"""Recipe schema, validation errors, data building and data order (in-process, no launcher)."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

import ds_hexamoe  # noqa: F401  registers the "hexamoe" experts implementation
from ds_hexamoe.config import ConfigError
from ds_hexamoe.recipes import DEFAULT_RECIPE, load_recipe, lr_lambda, resolve_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "ds_hexamoe", "data", "corpus")


def tiny_recipe(tmp_path, **sections) -> dict:
    """A small, valid recipe dict whose data lives in ``tmp_path`` (relative paths)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    for name in ("Artistic.txt", "LGPL-3.txt"):
        shutil.copy(os.path.join(CORPUS, name), data_dir / name)
    recipe = {
        "name": "tiny",
        "model": {"config": {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                             "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64}},
        "tokenizer": {"build": {"vocab_size": 300}},
        "data": {"train_files": ["data/*.txt"], "seq_len": 32},
        "training": {"steps": 4, "micro_batch_size": 2, "output_dir": str(tmp_path / "out")},
        "deepspeed": {"zero_optimization": {"stage": 2}},
        "hexamoe": {"enabled": True},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    return recipe


def write_recipe(tmp_path, recipe: dict, name: str = "recipe.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(recipe))
    return str(path)


def error_of(path_or_dict, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_recipe(path_or_dict, **kw)
    return str(e.value)


# -- schema and validation -------------------------------------------------------------------------


def test_valid_recipe_resolves_paths_relative_to_recipe_folder(tmp_path, monkeypatch):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    monkeypatch.chdir("/")  # the recipe's folder, not the cwd, anchors its paths
    r = load_recipe(path)
    assert r.data.train_files == [str(tmp_path / "data" / "*.txt")]
    assert r.source == path and r.base_dir == str(tmp_path)
    assert r.hexamoe_config is not None and r.hexamoe_config.enabled
    ds = r.ds_config(world_size=2, accelerator="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 4
    assert ds["hexamoe"] == {"enabled": True}
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in ds  # the worker's client schedule, see lr_lambda


def test_embedded_default_and_shipped_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(None)
    assert r.name == "mixtral-tiny-finetune" and r.launcher.nproc == 2
    assert r.source == resolve_path(DEFAULT_RECIPE, None)
    assert len(__import__("glob").glob(r.data.train_files[0])) >= 8
    assert r.output_dir == str(tmp_path / "outputs" / "mixtral-tiny-finetune")  # under the cwd, not the package
    assert r.ds_config(2)["zero_optimization"]["stage"] == 2
    # the default fine-tunes the shipped checkpoint with FSSDP on a declared pair, one rank slower
    assert r.model.path.endswith(os.path.join("ds_hexamoe", "data", "checkpoints", "mixtral-tiny"))
    cfg = r.hexamoe_config
    assert cfg.sharding == "fssdp" and [d.slowdown for d in cfg.devices] == [1.0, 2.0]
    for name in ("mixtral-tiny-finetune", "mixtral-tiny"):  # embedded copies equal the ones in recipes/
        with open(os.path.join(REPO, "ds_hexamoe", "data", "recipes", f"{name}.json")) as a, \
                open(os.path.join(REPO, "recipes", f"{name}.json")) as b:
            assert json.load(a) == json.load(b), f"recipes/{name}.json must equal the embedded copy"
    size = sum(os.path.getsize(os.path.join(CORPUS, f)) for f in os.listdir(CORPUS) if f.endswith(".txt"))
    assert 180_000 < size < 260_000


@pytest.mark.parametrize("name,placeholder", [("mixtral-8x7b.json", "/path/to/Mixtral-8x7B-v0.1"),
                                              ("qwen3-moe.json", "/path/to/Qwen3-30B-A3B")])
def test_cluster_recipes_demand_a_real_checkpoint(name, placeholder):
    path = os.path.join(REPO, "recipes", name)
    msg = error_of(path)
    assert msg.startswith("model.path:") and placeholder in msg and "placeholder" in msg and "fill in" in msg
    r = load_recipe(path, check_files=False)  # everything but the paths is valid
    assert r.training.dtype == "bf16" and r.hexamoe_config.sharding == "fssdp"
    ds = r.ds_config(8)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2
    assert "torch_adam" not in ds["optimizer"]["params"]  # GPUs use DeepSpeed's fused Adam


def test_bad_recipes_name_the_key_and_the_fix(tmp_path):
    base = tiny_recipe(tmp_path)

    def err(**changes) -> str:
        rec = json.loads(json.dumps(base))
        for dotted, value in changes.items():
            node = rec
            parts = dotted.split("__")
            for p in parts[:-1]:
                node = node[p]
            if value is KeyError:
                del node[parts[-1]]
            else:
                node[parts[-1]] = value
        return error_of(write_recipe(tmp_path, rec, "bad.json"))

    # unknown keys, top level and nested, with a suggestion
    m = err(trainng={})
    assert m.startswith("trainng: unknown recipe key") and "'training'" in m
    m = err(training__micro_batch=4)
    assert m.startswith("training.micro_batch: unknown key") and "micro_batch_size" in m
    # bad values
    assert err(training__micro_batch_size=0).startswith("training.micro_batch_size: got 0; expected a positive integer")
    assert err(training__micro_batch_size=2.5).startswith("training.micro_batch_size: got 2.5; expected an integer")
    assert err(training__micro_batch_size="8").startswith("training.micro_batch_size: got '8'; expected an integer")
    m = err(training__dtype="fp8")
    assert m.startswith("training.dtype: got 'fp8'") and "['fp32', 'bf16', 'fp16']" in m
    assert err(training__warmup_steps=-1).startswith("training.warmup_steps: got -1; expected an integer >= 0")
    assert err(training__lr=0).startswith("training.lr: got 0.0; expected a number > 0")
    assert err(data__seq_len=1).startswith("data.seq_len")
    assert err(data__seq_len=65).startswith("data.seq_len: 65 exceeds max_position_embeddings = 64 of model.config")
    assert err(data__validation_fraction=1.5).startswith("data.validation_fraction")
    m = err(task="translation")
    assert m.startswith("task: got 'translation'") and "causal-lm" in m
    # model: neither path nor config; config without model_type; missing checkpoint folder
    assert "model_type" in err(model={"config": {"hidden_size": 8}})
    m = err(model={"path": "no/such/checkpoint"})
    assert m.startswith("model.path: folder") and str(tmp_path / "no" / "such" / "checkpoint") in m
    m = err(model={})
    assert m.startswith("model:") and "path" in m and "config" in m
    # tokenizer needed for a model built from a config
    m = err(tokenizer=KeyError)
    assert m.startswith("tokenizer:") and "tokenizer.build" in m
    assert err(tokenizer={"path": "nope"}).startswith("tokenizer.path: folder")
    assert err(tokenizer={"build": {"vocab_size": 100}}).startswith("tokenizer.build.vocab_size: got 100")
    # data files
    m = err(data__train_files=["data/*.jsonl"])
    assert m.startswith("data.train_files[0]: pattern matches no files") and "data/*.jsonl" in m
    m = err(data__train_files=["data/Artistic.txt", "missing.txt"])
    assert m.startswith("data.train_files[1]: file does not exist")
    m = err(data__validation_files=["val/*.txt"])
    assert m.startswith("data.validation_files[0]: pattern matches no files")
    # DeepSpeed config
    m = err(deepspeed="configs/ds_zero2.json")
    assert m.startswith("deepspeed: file") and "ds_zero2.json" in m and "inline JSON object" in m
    m = err(deepspeed={"train_micro_batch_size_per_gpu": 16})
    assert m.startswith("deepspeed.train_micro_batch_size_per_gpu: 16 conflicts with training.micro_batch_size")
    m = err(deepspeed={"bf16": {"enabled": True}})
    assert m.startswith("deepspeed.bf16.enabled: true conflicts with training.dtype")
    assert err(deepspeed=[1, 2]).startswith("deepspeed: got [1, 2]")
    # the "hexamoe" section is validated by HexaMoEConfig
    m = err(hexamoe={"sharding": "zero3"})
    assert m.startswith("hexamoe.sharding: got 'zero3'; allowed values are ['none', 'fssdp']")
    assert err(hexamoe={"shardng": "fssdp"}).startswith("hexamoe.shardng: unknown key (did you mean 'sharding'?)")
    m = err(hexamoe={"mode": "expert_parallel"})
    assert m.startswith("hexamoe.sharding: got 'none'") and "fssdp" in m
    # launcher
    assert err(launcher={"hostfile": "hosts"}).startswith("launcher.hostfile: file")
    assert err(launcher={"nproc": 0}).startswith("launcher.nproc: got 0")
    # a JSON error names the file
    bad = tmp_path / "broken.json"
    bad.write_text('{"name": "x",}')
    assert "invalid JSON" in error_of(str(bad))
    assert error_of(str(tmp_path / "absent.json")).startswith("recipe: file")


def test_deepspeed_config_file_and_overrides(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "hexamoe": {"kernels": "torch"}}))
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, deepspeed="ds.json", hexamoe=None))
    r = load_recipe(path)
    ds = r.ds_config(2)
    assert ds["zero_optimization"]["stage"] == 1 and ds["hexamoe"] == {"kernels": "torch"}
    (tmp_path / "ds.json").write_text(json.dumps({"hexamoe": {"kernels": "cuda"}}))
    assert error_of(path).startswith("deepspeed.hexamoe.kernels: got 'cuda'")
    (tmp_path / "ds.json").write_text("[1]")
    assert error_of(path).startswith("deepspeed: ") and "expected a JSON object" in error_of(path)
    # overrides go through the same validation
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    assert load_recipe(path, overrides={"training.steps": 9}).training.steps == 9
    assert error_of(path, overrides={"training.steps": -1}).startswith("training.steps: got -1")
    assert error_of(path, overrides={"training.stepz": 1}).startswith("training.stepz: unknown key")


def test_lr_schedule():
    from ds_hexamoe.recipes import TrainingSpec

    t = TrainingSpec(steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(t)
    assert [f(0), f(1)] == [0.5, 1.0]  # the first step already learns
    assert f(2) == 1.0 and math.isclose(f(9), 0.1) and f(5) < f(4)
    lin = lr_lambda(TrainingSpec(steps=5, schedule="linear"))
    assert [round(lin(s), 6) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda(TrainingSpec(steps=5, schedule="constant"))(4) == 1.0


# -- data ------------------------------------------------------------------------------------------


def test_tokenizer_and_packing(tmp_path):
    from ds_hexamoe.tasks.causal_lm import build_dataset, build_tokenizer, load_documents

    r = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path, data={"cache_dir": str(tmp_path / "cache")})))
    save = str(tmp_path / "tok")
    tok = build_tokenizer(r, save_dir=save)
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    again = build_tokenizer(r)  # trained afresh: byte-level BPE training is deterministic
    assert again.get_vocab() == tok.get_vocab()
    assert os.path.isfile(os.path.join(save, "tokenizer.json"))
    text = "Everyone is permitted to copy and distribute verbatim copies"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless

    data = build_dataset(r, tok)
    docs = load_documents(r)
    assert len(docs) == 2  # one sample per file
    stream = []
    for t in docs["text"]:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 32
    assert len(data.train) == n and data.validation is None
    blocks = torch.stack([data.train[i]["input_ids"] for i in range(n)])
    assert torch.equal(blocks.reshape(-1), torch.tensor(stream[: n * 32]))
    batch = data.collate([data.train[0], data.train[1]])
    assert set(batch) == {"input_ids", "labels"} and torch.equal(batch["labels"], batch["input_ids"])

    # a validation fraction splits whole blocks off, deterministically
    r2 = load_recipe(r.source, overrides={"data.validation_fraction": 0.1})
    d2 = build_dataset(r2, tok)
    assert len(d2.validation) == round(n * 0.1) and len(d2.train) + len(d2.validation) == n
    d3 = build_dataset(r2, tok)
    assert torch.equal(d2.validation[:]["input_ids"], d3.validation[:]["input_ids"])


def test_jsonl_text_field_and_unpacked_batches(tmp_path):
    from ds_hexamoe.tasks.causal_lm import build_dataset, build_tokenizer

    rows = [{"body": "short one", "id": 1}, {"body": "a somewhat longer second document " * 3, "id": 2},
            {"body": "third", "id": 3}]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    rec = tiny_recipe(tmp_path, data={"train_files": ["data/*.jsonl"], "seq_len": 8, "packing": False})
    path = write_recipe(tmp_path, rec)
    m = error_of(path)  # the default text field "text" is not in these records
    assert m.startswith("data.text_field: 'text' is not a field") and "['body', 'id']" in m
    r = load_recipe(path, overrides={"data.text_field": "body", "tokenizer.build.min_frequency": 1})
    tok = build_tokenizer(r)
    data = build_dataset(r, tok)
    assert len(data.train) == 3
    batch = data.collate([data.train[i] for i in range(3)])
    assert batch["input_ids"].shape[1] == 8  # the long document is truncated to seq_len
    short = len(tok("short one", add_special_tokens=False)["input_ids"]) + 1
    assert batch["attention_mask"][0].sum() == short
    assert (batch["labels"][0, short:] == -100).all() and (batch["labels"][1] != -100).all()
    # mixed formats are refused
    (tmp_path / "data" / "b.txt").write_text("x")
    m = error_of(path, overrides={"data.train_files": ["data/*"]})
    assert m.startswith("data.train_files: files of several formats")


def test_build_model_follows_tokenizer(tmp_path):
    from ds_hexamoe.tasks.causal_lm import build_model, build_tokenizer

    r = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path)))
    tok = build_tokenizer(r)
    model = build_model(r, tok)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert model.config._experts_implementation == "hexamoe"
    ids = torch.randint(0, len(tok), (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    r2 = load_recipe(r.source, overrides={"model.config.vocab_size": 100})
    with pytest.raises(ConfigError, match=r"model.config.vocab_size: 100 is smaller"):
        build_model(r2, tok)


def test_batch_plan_is_a_deterministic_disjoint_split():
    from ds_hexamoe.worker import BatchPlan

    data = list(range(50))
    plans = [BatchPlan(data, 4, rank, 2, seed=7) for rank in range(2)]
    assert plans[0].per_epoch == 6  # 25 samples per rank -> 6 micro-batches of 4
    for epoch in range(2):
        seen = []
        for p in plans:
            for i in range(epoch * 6, epoch * 6 + 6):
                seen += p.indices(i)
        assert len(seen) == len(set(seen)) == 48  # disjoint across ranks within an epoch
    e0 = [plans[0].indices(i) for i in range(6)]
    e1 = [plans[0].indices(i) for i in range(6, 12)]
    assert e0 != e1  # reshuffled every epoch
    # a fresh plan (a resumed run) addresses the same batches by position
    fresh = BatchPlan(data, 4, 0, 2, seed=7)
    assert fresh.indices(8) == plans[0].indices(8) and fresh.indices(2) == e0[2]
    with pytest.raises(ConfigError, match="training.micro_batch_size: 40 x 2 ranks"):
        BatchPlan(data, 40, 0, 2, seed=7)


def test_expert_load_tracker_counts_every_routed_pair(tmp_path):
    from ds_hexamoe.tasks.causal_lm import build_model, build_tokenizer
    from ds_hexamoe.worker import ExpertLoadTracker

    r = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path)))
    model = build_model(r, build_tokenizer(r))
    tracker = ExpertLoadTracker(model, torch.device("cpu"))
    model(input_ids=torch.randint(0, 300, (2, 16)))
    (name, counts), = tracker.counts.items()  # one MoE layer
    assert name.endswith("mlp.experts") and int(counts.sum()) == 2 * 16 * 2  # tokens x top-2
    expected = float(counts.max()) / float(counts.float().mean())
    assert math.isclose(tracker.balance(), expected) and tracker.counts == {}
    assert tracker.balance() is None


def test_recipe_from_a_local_checkpoint(tmp_path):
    from ds_hexamoe.tasks.causal_lm import build_model, build_tokenizer

    r = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path)))
    tok = build_tokenizer(r)
    ckpt = tmp_path / "ckpt"
    build_model(r, tok).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    rec = tiny_recipe(tmp_path, model={"path": "ckpt", "config": {"output_router_logits": True}})
    del rec["tokenizer"]  # the checkpoint's own tokenizer
    path = write_recipe(tmp_path, rec, "from_ckpt.json")
    r2 = load_recipe(path)
    assert r2.model.path == str(ckpt) and r2.tokenizer_spec.path == str(ckpt)
    tok2 = build_tokenizer(r2)
    assert tok2.get_vocab() == tok.get_vocab()
    model = build_model(r2, tok2)
    assert model.config.output_router_logits and model.config._experts_implementation == "hexamoe"
    ids = torch.randint(0, 300, (1, 8))
    assert torch.isfinite(model(input_ids=ids, labels=ids).aux_loss)
    m = error_of(path, overrides={"data.seq_len": 128})
    assert m.startswith("data.seq_len: 128 exceeds max_position_embeddings = 64 of") and "config.json" in m
    os.remove(ckpt / "config.json")
    assert error_of(path).startswith("model.path:") and "has no config.json" in error_of(path)


def test_shipped_checkpoint_is_a_small_hugging_face_moe():
    """The default job's checkpoint loads with ``from_pretrained`` like a downloaded one and stays small."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(REPO, "ds_hexamoe", "data", "checkpoints", "mixtral-tiny")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 3_000_000, size
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="hexamoe")
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 4
    ids = tok("This License applies to any program", return_tensors="pt").input_ids
    loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss < 5.0, loss  # trained: a fresh model of this vocabulary starts near ln(512) = 6.2
