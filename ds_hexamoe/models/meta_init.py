"""A fresh Hugging Face model initialized from the meta device, module by module, whole or in part.

``from_config`` draws every weight from one random stream, so a tensor's values depend on everything drawn
before it: a rank that wants only its part would still have to build the whole model. :func:`materialize`
instead runs the model's own ``_init_weights`` (the distributions of ``from_config``: normal with the
config's ``initializer_range``, ones for norms, rotary frequencies, zero router biases) on one module at a
time, in transformers' own order, with that module's draws seeded by ``(seed, module name)``. A tensor's values
then depend only on the seed and its name: a zebra rank initializes the tensors it keeps (a layer's experts
tensor whole, then only its rows), the colocated run and a one-process reference the whole model, and all
agree. The weights differ from ``torch.manual_seed(seed); from_config(...)``'s (docs/recipes.md, "model").
"""
from __future__ import annotations

import hashlib
import inspect
from collections import Counter
from collections.abc import Callable, Sequence

import torch

# what a caller keeps of a parameter: None (stays on the meta device), its full shape (the whole tensor),
# or its full shape and the rows of dimension 0 to keep (a compact tensor of those rows, in that order)
Want = Callable[[str, torch.nn.Parameter], "tuple[torch.Size, Sequence[int] | None] | None"]


def module_seed(seed: int, name: str) -> int:
    """The seed of module ``name``'s draws (stable across processes and Python runs)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _alloc(shape) -> torch.nn.Parameter:
    """A float32 tensor for one module's parameter while its ``_init_weights`` runs (the only full-size
    allocation here)."""
    return torch.nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)


def _whole(name: str, p: torch.nn.Parameter):
    return p.shape, None


def materialize(model: torch.nn.Module, seed: int, want: Want | None = None) -> None:
    """Initialize the meta-device Hugging Face ``model`` in place (``want``: what to keep of each parameter, by
    its name; None: everything). Parameters nobody wants stay on the meta device; buffers are always built.
    Each kept tensor is initialized in float32 at its full shape, then cast to its meta dtype (as
    ``from_config(...).to(dtype)`` casts), so host memory peaks at one module's tensors beside what is kept.
    The global random state is left as it was."""
    _Walk(model, seed, want or _whole).run()


class _Walk:
    """One :func:`materialize`: transformers' own traversal (children first, sub-models with their own
    ``_initialize_weights``), one module's tensors built at a time."""

    def __init__(self, model: torch.nn.Module, seed: int, want: Want):
        self.model, self.seed, self.want = model, seed, want
        self.names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        held = [p for m in model.modules() for p in m._parameters.values() if p is not None]
        self.slots = Counter(id(p) for p in held)  # modules holding each parameter (tied ones: several)
        self.meta = {id(p): p for p in held}
        self.done: dict[int, torch.nn.Parameter | None] = {}  # id(meta parameter) -> replacement (None: meta)
        self.live: dict[int, list] = {}  # id(meta parameter) -> [float32 tensor, what to keep, holders left]
        self.temp: dict[int, int] = {}  # id(float32 tensor) -> id(its meta parameter)
        self.custom = model.is_custom_code() if hasattr(model, "is_custom_code") else False

    def run(self) -> None:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            self._visit(self.model, "", self.model._initialize_weights)
        for pid in list(self.live):  # defensive: a tensor whose holders did not all run
            self._finish(pid)
        for mod in self.model.modules():  # every slot, a tied tensor's too, holds its replacement (or meta)
            for k, p in list(mod._parameters.items()):
                if p is not None:
                    pid = self.temp.get(id(p), id(p))
                    got = self.done.get(pid)
                    mod._parameters[k] = got if got is not None else self.meta[pid]

    def _call(self, fn, mod) -> None:
        # transformers >= 5.x passes whether the model is remote code; earlier 5.x take the module alone
        if "is_custom_code" in inspect.signature(fn).parameters:
            fn(mod, self.custom)
        else:
            fn(mod)

    def _finish(self, pid: int) -> None:
        full, how, _ = self.live.pop(pid)
        p = self.meta[pid]
        value = None if how is None or full is None else (full if how[1] is None else full[list(how[1])])
        self.done[pid] = None if value is None else torch.nn.Parameter(value.detach().to(p.dtype).contiguous(),
                                                                        requires_grad=p.requires_grad)

    def _ran(self, own: list) -> None:
        """One holder of each of ``own`` has run (or was skipped); the last one finishes the tensor."""
        for _, pid in own:
            if pid in self.live:
                self.live[pid][2] -= 1
                if self.live[pid][2] == 0:
                    self._finish(pid)

    def _visit(self, mod: torch.nn.Module, prefix: str, fn) -> None:
        from transformers import PreTrainedModel

        for cname, child in mod.named_children():
            sub = child._initialize_weights if isinstance(child, PreTrainedModel) else fn
            self._visit(child, f"{prefix}{cname}.", sub)
        own = [(k, self.temp.get(id(p), id(p))) for k, p in mod._parameters.items() if p is not None]
        for _, pid in own:
            if pid not in self.done and pid not in self.live:
                self.live[pid] = [None, self.want(self.names[pid], self.meta[pid]), self.slots[pid]]
        bufs = [k for k, b in mod._buffers.items() if b is not None and b.device.type == "meta"]
        if not bufs and all(pid in self.done or self.live[pid][1] is None for _, pid in own):
            self._ran(own)  # nothing of this module is kept here: its draws are its own, so skipping it
            return  # changes no other tensor
        for k, pid in own:  # every own tensor of a module kept at all: its draws come in one order
            if pid in self.done:
                continue  # a tied tensor already finished
            entry = self.live[pid]
            if entry[0] is None:
                entry[0] = _alloc(entry[1][0] if entry[1] is not None else self.meta[pid].shape)
                self.temp[id(entry[0])] = pid
            mod._parameters[k] = entry[0]
        dtypes = {k: mod._buffers[k].dtype for k in bufs}
        for k in bufs:
            mod._buffers[k] = torch.zeros(mod._buffers[k].shape, dtype=torch.float32)
        torch.random.default_generator.manual_seed(module_seed(self.seed, prefix.rstrip(".")))  # CPU only
        self._call(fn, mod)
        for k in bufs:
            mod._buffers[k] = mod._buffers[k].to(dtypes[k])
        self._ran(own)
