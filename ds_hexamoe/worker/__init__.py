"""The per-rank training worker that ``ds-hexamoe train`` starts through DeepSpeed's launcher
(docs/design.md, "Recipes, tasks, worker and CLI").

Per rank: seed, the recipe's task (for causal LM: tokenizer trained on rank 0 and shared through the
output folder, packed data, the model with ``experts_implementation="hexamoe"``), one training loop
(:mod:`.loop`) around a step strategy (:mod:`.strategy`: :mod:`.colocated`, the DeepSpeed engine from
``ds_hexamoe.initialize``, or :mod:`.zebra`, the attention/expert pipeline), one resumable data order
(:mod:`.batches`), ``metrics.jsonl`` (:mod:`.metrics`; tqdm on rank 0: loss, throughput, expert-load
balance, comm bytes, validation figures), checkpoints that resume exactly and are verified before use
(:mod:`.checkpoints`), and an atomic Hugging Face export at the end.
"""
from .batches import BatchPlan
from .checkpoints import load_checkpoint, read_latest, save_checkpoint
from .entry import decode_overrides, encode_overrides, main
from .loop import run
from .metrics import METRICS_FILE, ExpertLoadTracker
from .summary import SUMMARY_FILE

__all__ = ["BatchPlan", "ExpertLoadTracker", "METRICS_FILE", "SUMMARY_FILE", "decode_overrides",
           "encode_overrides", "load_checkpoint", "main", "read_latest", "run", "save_checkpoint"]
