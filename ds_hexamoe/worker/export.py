"""The final exports of a run, each written atomically by rank 0 while the other ranks wait: the Hugging Face
checkpoint ``hf/`` (``from_pretrained`` loads it), and for a LoRA run (``"peft"``) the adapter folder
``adapter/`` (``PeftModel.from_pretrained(base, path)`` loads it) and, with ``peft.export_merged``, ``hf/``
holding the base with the adapters merged (docs/recipes.md, "LoRA: the peft section")."""
from __future__ import annotations

import os

from ..atomic import atomic_save_dir
from ..distributed import failures_everywhere
from .checkpoints import read_latest
from .checkpoints.store import disk_of

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the names PeftModel.save_pretrained writes
HF_DIR, ADAPTER_DIR = "hf", "adapter"


def export_run(r) -> dict:
    """Every export the recipe asks for (collective); ``{"hf_export": path or None, "adapter_export": ...}``."""
    t, peft = r.recipe.training, r.recipe.peft
    out = {"hf_export": None}
    if not t.export_hf:
        return out
    if peft is None:
        out["hf_export"] = export_hf(r, os.path.join(t.output_dir, HF_DIR))
        return out
    out["adapter_export"] = export_adapter(r, os.path.join(t.output_dir, ADAPTER_DIR))
    if peft.export_merged:  # last: merging folds the adapters into the module's base weights in place
        merged = _merged_model(r)  # collective with experts sharded
        out["hf_export"] = _write_on_main(r, os.path.join(t.output_dir, HF_DIR), "Hugging Face export (merged)",
                                          lambda tmp: _save_hf(r, tmp, merged(), None))
    return out


def _merged_model(r):
    """A function giving the base with the adapters merged (PEFT's ``merge_and_unload``), for rank 0.

    With experts sharded by FSSDP no rank holds a whole expert, so the state is gathered first (collective)
    and rank 0 merges an unsharded copy of the PEFT model that holds it."""
    module = r.strategy.module
    if getattr(getattr(r.strategy, "runtime", None), "fssdp", None) is None:
        return module.merge_and_unload
    state = r.strategy.export_state()  # experts and their adapters gathered, in PEFT's keys

    def merge():
        import copy

        from peft import get_peft_model

        base = module.get_base_model()
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        fresh = get_peft_model(type(base)._from_config(base.config, torch_dtype=dtype),
                               copy.deepcopy(module.peft_config[module.active_adapter]))
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"merged export: the gathered state does not fit an unsharded copy of the model "
                               f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
        return fresh.merge_and_unload()

    return merge


def export_hf(r, out: str) -> str:
    """``save_pretrained`` of model + processor into a temp folder, renamed onto ``out`` (all ranks call).
    A failed write (a full disk) leaves no part of it and ends every rank naming ``out`` and the intact
    checkpoint it can be exported from again."""
    state = r.strategy.export_state()  # collective: FSSDP gathers experts, zebra gathers from the hosts
    return _write_on_main(r, out, "Hugging Face export", lambda tmp: _save_hf(r, tmp, r.strategy.module, state))


def export_adapter(r, out: str) -> str:
    """The adapters in PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json`` (all ranks call)."""
    from safetensors.torch import save_file

    from ..tasks.peft import adapter_state

    module = r.strategy.module
    state = adapter_state(module)  # collective with experts sharded

    def write(tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(tmp, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        module.peft_config[module.active_adapter].save_pretrained(tmp)

    return _write_on_main(r, out, "LoRA adapter export", write)


def _save_hf(r, tmp: str, model, state) -> None:
    model.save_pretrained(tmp, state_dict=model.state_dict() if state is None else state)
    processor = r.parts.processor
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(tmp)


def _write_on_main(r, out: str, what: str, write) -> str:
    """``write(tmp)`` on rank 0 into a folder renamed onto ``out``; every rank returns or raises together."""
    err = None
    if r.ctx.is_main:
        try:
            atomic_save_dir(write, out)
        except OSError as e:
            err = _export_failed_message(r, out, e, what)
    failed = failures_everywhere(err)  # also the barrier: no rank ends before the export is written
    if failed:
        raise RuntimeError(failed[0][1])
    return out


def _export_failed_message(r, out: str, e: OSError, what: str) -> str:
    ckpt_dir = r.recipe.checkpoint_dir
    latest = read_latest(ckpt_dir) if r.strategy.keeps_checkpoints else None
    checkpoint = os.path.join(ckpt_dir, latest) if latest else None
    kept = "an earlier export there is unchanged" if os.path.isdir(out) else "nothing of it was left behind"
    then = (f"the checkpoint {checkpoint!r} is intact and holds the trained weights: free space there, then "
            f"`ds-hexamoe train {os.path.join(r.recipe.training.output_dir, 'recipe.json')} --resume` writes the "
            "export from it (nothing is left to train)" if checkpoint else
            "this run kept no checkpoint, so the trained weights are lost; free space there and train again")
    return (f"writing the {what} into {out!r} failed ({type(e).__name__}: {e}"[:400] + f"); {kept}. "
            f"{disk_of(out, e)}; {then}")
