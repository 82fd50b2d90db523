"""Training tasks: a task turns a recipe into the model, the datasets and how to batch and count them
(docs/design.md, "Recipes, tasks, worker and CLI"). The shipped ones are :mod:`.causal_lm` and
:mod:`.image_classification`; :func:`task_builder` finds the one a recipe names."""
from .base import EvalMetric, TaskParts, WorkerContext, task_builder
from .causal_lm import TextData, build_dataset, build_model, build_tokenizer, causal_lm_task, load_documents

__all__ = ["EvalMetric", "TaskParts", "TextData", "WorkerContext", "build_dataset",
           "build_model", "build_tokenizer", "causal_lm_task", "load_documents", "task_builder"]
