"""Checks of a recipe's contents that would otherwise fail only after launch, seconds or minutes into a run:
the model's expert count against its top-k, ``hexamoe.shard_weights`` and device profiles against the
rank count, the task import and its trust, the data's encoding and size, the output directory
(docs/reliability.md). Every error names the dotted key (or the file and line) and the fix. No torch.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os

from ..config import ConfigError
from .schema import CAUSAL_LM, TASKS, Recipe

# the transformers config keys that hold the number of routed experts and the top-k, across MoE families
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")
_HEAD_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads")
_UTF8_CHECK_BYTES = 64 << 20  # per file; the rest of a huge file is left to the tokenizer


def model_config(r: Recipe) -> tuple[dict, str | None]:
    """The model's transformers config (the checkpoint's ``config.json`` under ``model.config``
    overrides) and that ``config.json`` (None when the model is built from ``model.config`` alone)."""
    cfg: dict = {}
    file = None
    if r.model.path is not None and os.path.isfile(os.path.join(r.model.path, "config.json")):
        file = os.path.join(r.model.path, "config.json")
        with open(file) as fh:
            cfg = json.load(fh)
    return {**cfg, **(r.model.config or {})}, file


def check_experts_topk(r: Recipe) -> None:
    cfg, file = model_config(r)
    own = r.model.config or {}

    def key(k: str) -> str:  # the recipe key when the recipe sets it, else the checkpoint's file
        return f"model.config.{k}" if k in own or file is None else f"model.path ({file}) {k}"

    for k in _EXPERT_KEYS + _TOPK_KEYS + _HEAD_KEYS:
        v = cfg.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"{key(k)}: got {v!r}; expected an integer")
    ek = next((k for k in _EXPERT_KEYS if cfg.get(k) is not None), None)
    tk = next((k for k in _TOPK_KEYS if cfg.get(k) is not None), None)
    if tk is not None and cfg[tk] < 1:
        raise ConfigError(f"{key(tk)}: got {cfg[tk]!r}; expected an integer >= 1 (experts each token is routed to)")
    if ek is not None and cfg[ek] < 1:
        raise ConfigError(f"{key(ek)}: got {cfg[ek]!r}; expected an integer >= 1")
    if ek is not None and tk is not None and cfg[ek] < cfg[tk]:
        raise ConfigError(f"{key(tk)}: got {cfg[tk]!r}, more than {ek} = {cfg[ek]}; a token cannot be routed to "
                          f"more experts than exist: lower {tk} or raise {ek} (model.config overrides the checkpoint)")
    _check_heads(cfg, key)


def _check_heads(cfg: dict, key) -> None:
    hidden, heads, kv = cfg.get("hidden_size"), cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    for k, v in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if v is not None and v < 1:
            raise ConfigError(f"{key(k)}: got {v!r}; expected an integer >= 1")
    # without head_dim, transformers gives each head hidden_size // heads features: 0 when there are more heads
    # than features (a crash at the first step), else an attention narrower than hidden_size (silently)
    if hidden is not None and heads is not None and cfg.get("head_dim") is None and hidden % heads:
        raise ConfigError(f"{key('num_attention_heads')}: got {heads}, which does not divide hidden_size = {hidden}; "
                          "choose a divisor of hidden_size (each head gets hidden_size / num_attention_heads features), "
                          "or set model.config.head_dim to the features per head you mean")
    if heads is not None and kv is not None and heads % kv:
        raise ConfigError(f"{key('num_key_value_heads')}: got {kv}, which does not divide num_attention_heads = "
                          f"{heads}; choose a divisor of num_attention_heads (query heads share each key/value head)")


def check_weights(r: Recipe) -> None:
    """Each ``*.safetensors`` file of ``model.path`` is whole, told from its header alone (no tensor is read):
    a copy cut short or left empty fails only when the ranks load it, minutes after launch."""
    for name in sorted(os.listdir(r.model.path)):
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(r.model.path, name))
            if problem:
                raise ConfigError(f"model.path: {os.path.join(r.model.path, name)!r} {problem}; copy or download "
                                  "the checkpoint again")
    index = os.path.join(r.model.path, "model.safetensors.index.json")
    if os.path.isfile(index):
        from ..jsonfile import read_json

        shards = set((read_json(index, "model.path", "give a whole checkpoint").get("weight_map") or {}).values())
        missing = sorted(s for s in shards if not os.path.isfile(os.path.join(r.model.path, s)))
        if missing:
            raise ConfigError(f"model.path: {index!r} names weight files that are missing: {missing}; copy or "
                              "download the checkpoint again")


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    if size < 8:
        return f"is {'empty' if size == 0 else 'truncated'} ({size} bytes)"
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if 8 + n > size:
            return f"is truncated: its header claims {n} bytes, the file holds {size}"
        try:
            header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "has no valid safetensors header"
    if 8 + n + end > size:
        return f"is truncated: its tensors need {8 + n + end} bytes, the file holds {size}"
    return None


def world_size(r: Recipe) -> int | None:
    """Ranks the launcher will start, when the recipe fixes it (``launcher.nproc``, times the hostfile's
    hosts); None when the launcher decides (every accelerator)."""
    n = r.launcher.nproc
    if n is None:
        return None
    if r.launcher.hostfile is None:
        return n
    if not os.path.isfile(r.launcher.hostfile):
        return None  # reported as a missing hostfile by the file checks
    total = 0
    with open(r.launcher.hostfile) as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            slots = [p.split("=", 1)[1] for p in line.split()[1:] if p.startswith("slots=")]
            total += min(n, int(slots[0])) if slots and slots[0].isdigit() else n
    return total or None


def check_against_world(r: Recipe) -> None:
    """``hexamoe.shard_weights`` and declared device profiles against the number of ranks."""
    cfg = r.hexamoe_config
    if cfg is None:
        return
    world = world_size(r)
    sw = cfg.shard_weights
    if sw is not None:
        bad = [w for w in sw if not math.isfinite(w)]
        if bad:
            raise ConfigError(f"hexamoe.shard_weights: got {sw!r}; expected finite numbers >= 0 (one per rank)")
        if world is not None and len(sw) != world:
            raise ConfigError(f"hexamoe.shard_weights: got {len(sw)} weights for {world} ranks (launcher.nproc); give "
                              "one weight per rank, or null for even shards")
    n = None if cfg.devices is None else len(cfg.devices)  # [] too is refused by the ranks
    if cfg.profile == "measure" and world is not None and n not in (None, 1, world):
        raise ConfigError(f'hexamoe.devices: {n} entries for {world} ranks (launcher.nproc) with "profile": "measure"; '
                          "give one entry per rank, one for every rank, or none: e.g. --set "
                          '\'hexamoe.devices=[{"name": "cpu"}]\' or --set hexamoe.devices=null')
    if cfg.profile == "declared" or cfg.devices_file is not None:
        _check_devices(cfg, world)


def _check_devices(cfg, world: int | None) -> None:
    from ..placement.profiles import load_profiles  # torch-free, like this module

    if cfg.devices_file is not None:
        src, where = cfg.devices_file, f"hexamoe.devices_file ({cfg.devices_file})"
    elif cfg.devices is not None:
        src, where = list(cfg.devices), "hexamoe.devices"
    else:
        return
    try:
        profiles = load_profiles(src)
        for i, p in enumerate(profiles):
            p.resolve(f"devices[{i}]")
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(f"hexamoe.{msg}" if where == "hexamoe.devices" and msg.startswith("devices")
                          else f"{where}: {msg}") from None
    if cfg.profile == "measure":
        raise ConfigError(f'{where}: not read with "profile": "measure" (each rank times itself; only "devices" entries '
                          'override measured numbers); move its entries to "devices", or use "profile": "declared"')
    if cfg.profile == "declared" and world is not None and len(profiles) != world:
        raise ConfigError(f"{where}: {len(profiles)} device profiles for {world} ranks (launcher.nproc); give one "
                          'entry per rank, or entries with "count" adding up to the number of ranks')


def check_zebra(r: Recipe, auto: bool = False) -> None:
    """What the zebra path cannot do, named before launch when ``hexamoe.zebra.enabled`` is true (with ``auto``
    also when it is "auto": the worker then trains colocated instead)."""
    cfg, t = r.hexamoe_config, r.training
    if cfg is None or not cfg.enabled or cfg.zebra.enabled not in ((True, "auto") if auto else (True,)):
        return
    if t.gradient_checkpointing:
        # the pipeline calls attention, norms and routers itself, not the decoder layers that recompute
        raise ConfigError("training.gradient_checkpointing: hexamoe.zebra runs segments, not whole decoder layers, "
                          "so nothing would be recomputed: set it to false")


# hexamoe.router keys that shape only the blocks ds-hexamoe builds; a checkpoint's config decides them itself
_BUILT_ROUTER_KEYS = {"top_k": "num_experts_per_tok", "score_func": "scoring_func", "norm_topk_prob": "norm_topk_prob",
                      "jitter": "router_jitter_noise"}


def check_router_section(r: Recipe) -> None:
    """A causal-LM recipe (a Hugging Face model) may not set ``hexamoe.router`` keys its routers never read."""
    router = (r.hexamoe or {}).get("router") if r.task == "causal-lm" else None
    for key in sorted(set(router or {}) & set(_BUILT_ROUTER_KEYS)):
        raise ConfigError(f"hexamoe.router.{key}: got {router[key]!r}; a Hugging Face checkpoint's routers take it "
                          f"from the model's own config: set model.config.{_BUILT_ROUTER_KEYS[key]} instead "
                          "(hexamoe.router controls aux_loss_coef, z_loss_coef, bias_update_rate and freeze there)")
def check_peft(r: Recipe) -> None:
    """What a ``"peft"`` section needs from the rest of the recipe (its targets are checked against the model by
    :func:`ds_hexamoe.tasks.peft.check_peft_model`, which builds it on the meta device)."""
    p, cfg = r.peft, r.hexamoe_config
    if p is None:
        return
    if r.task != CAUSAL_LM:
        raise ConfigError(f'peft: LoRA recipes run the "{CAUSAL_LM}" task (got task {r.task!r}); remove the "peft" '
                          "section or use a causal-lm recipe")
    if p.export_merged and not r.training.export_hf:
        raise ConfigError("peft.export_merged: true needs training.export_hf: true (the final exports write adapter/ "
                          "and the merged hf/); set training.export_hf to true or peft.export_merged to false")
    if cfg is not None and cfg.enabled and cfg.zebra.enabled in (True, "auto"):
        raise ConfigError(f"hexamoe.zebra.enabled: got {cfg.zebra.enabled!r} with a \"peft\" section; LoRA runs on the "
                          "colocated DeepSpeed step: set hexamoe.zebra.enabled to false")


def check_task(r: Recipe) -> None:
    """A registered task name, or an import the recipe trusts (``trust_task_import``) and that resolves."""
    if r.task in TASKS:
        return
    if not r.trust_task_import:
        raise ConfigError(f"task: {r.task!r} is not a registered task {sorted(TASKS)}; importing and calling "
                          "arbitrary code from a recipe is off by default. If you wrote this recipe and trust "
                          f'{r.task!r}, set "trust_task_import": true in it')
    module, _, attr = r.task.partition(":")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        spec, err = None, e
    else:
        err = None
    if spec is None:
        raise ConfigError(f"task: module {module!r} of {r.task!r} cannot be imported ({err or 'not found'}); give "
                          "an importable 'package.module:function'")
    if not attr:
        raise ConfigError(f"task: {r.task!r} names no function; give 'package.module:function'")


def _read_head(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_UTF8_CHECK_BYTES)


def check_text_data(r: Recipe, files: list[str], key: str, fmt: str) -> None:
    """Text-like data decodes as UTF-8 (else the file and line are named), is not empty, and is not so short
    that it cannot fill one micro-batch on every rank. Each file is read once, up to 64 MiB."""
    if fmt not in ("text", "json", "csv"):
        return
    size = lines = 0
    empty = []
    for f in files:
        if f.endswith((".gz", ".bz2", ".xz", ".zst", ".lz4")):
            return  # sizes say nothing about compressed files; the worker checks the blocks
        raw = _read_head(f)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            # a multi-byte character cut by the 64 MiB read limit is not an error
            if not (e.reason == "unexpected end of data" and len(raw) == _UTF8_CHECK_BYTES):
                line = raw[: e.start].count(b"\n") + 1
                raise ConfigError(f"{key}: {f!r} line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                                  f"{e.start}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        size += os.path.getsize(f)
        lines += raw.count(b"\n") + 1
        if not raw.strip():
            empty.append(f)
    if len(empty) == len(files):
        what = f"{files[0]!r} is empty" if len(files) == 1 else f"every file is empty ({files})"
        raise ConfigError(f"{key}: {what}; give files with training text")
    if fmt == "text" and key == "data.train_files":
        _check_enough_text(r, files, size, lines, key)


def _check_enough_text(r: Recipe, files: list[str], size: int, lines: int, key: str) -> None:
    # an upper bound on tokens: a BPE token spans at least one byte; allow 2 extra tokens per line
    max_tokens = size + 2 * lines
    world = world_size(r) or 1
    t, d = r.training, r.data
    need_blocks = t.micro_batch_size * world
    if d.validation_fraction > 0:
        need_blocks = math.ceil(need_blocks / (1 - d.validation_fraction)) + 1
    if d.packing and max_tokens < need_blocks * d.seq_len:
        raise ConfigError(f"{key}: {len(files)} file(s) of {size} bytes hold at most {max_tokens} tokens, fewer than "
                          f"the {need_blocks * d.seq_len} that one micro-batch of training.micro_batch_size = "
                          f"{t.micro_batch_size} blocks of data.seq_len = {d.seq_len} on {world} rank(s) needs; add "
                          "data, or lower data.seq_len or training.micro_batch_size")


def check_output_dir(r: Recipe) -> None:
    """``training.output_dir`` is a folder (or can become one) this user can write."""
    out = r.training.output_dir
    try:
        out.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates U+DC80..U+DCFF
        code = ord(out[e.start])
        what = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise ConfigError(f"training.output_dir: {out!r} is not UTF-8 ({what} at position {e.start}); the run's "
                          "logs, metrics and export name it in UTF-8: give a UTF-8 folder name (--output-dir)") from None
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"training.output_dir: {out!r} is a file, not a folder; give a folder path (--output-dir)")
    probe = out
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"training.output_dir: {probe!r} (a parent of {out!r}) is a file, so the folder cannot be "
                          "created; give another folder path (--output-dir)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"training.output_dir: {probe!r} is not writable by this user, so {out!r} cannot be "
                          "written; give a folder you can write (--output-dir) or fix its permissions")

