"""The pipeline-shared expert cache (HEXA-MoE): flat full-layer buffers reused layer after layer.

Slot 0 receives every layer's forward gather; with prefetch a second slot lets the backward
re-materialization of layer ``l-1`` run while layer ``l`` computes. A slot remembers which layer call
(:class:`CallRecord`) its contents belong to, so a record can tell whether its weights are still there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .collectives import Pending, Transfer
from .layer import ExpertLayer


@dataclass(eq=False)
class CallRecord:
    """One forward call of one experts module whose weights backward re-gathers (rematerialize on)."""

    layer: ExpertLayer
    transfer: Transfer
    seq: int
    slot: Slot | None = None
    done: bool = False  # its gradients were reduce-scattered


@dataclass(eq=False)
class Slot:
    buf: torch.Tensor  # flat [max full-layer numel]
    owner: CallRecord | None = None
    pending: Pending | None = None

    def claim(self, record: CallRecord | None) -> None:
        """Finish whatever is in flight into this slot and hand it to ``record``."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        if self.owner is not None and self.owner is not record and self.owner.slot is self:
            self.owner.slot = None
        self.owner = record
        if record is not None:
            record.slot = self


@dataclass
class PipelineCache:
    numel: int  # one layer's experts, the largest layer
    num_slots: int
    _slots: dict[tuple[torch.dtype, torch.device], list[Slot]] = field(default_factory=dict)

    def slot(self, i: int, dtype: torch.dtype, device: torch.device) -> Slot:
        key = (dtype, torch.device(device))
        if key not in self._slots:
            # zeros: experts a layer does not use keep finite (stale or zero) values
            self._slots[key] = [Slot(torch.zeros(self.numel, dtype=dtype, device=device)) for _ in range(self.num_slots)]
        return self._slots[key][i % self.num_slots]

    def index_of(self, slot: Slot) -> int:
        """The position of ``slot`` among its (dtype, device)'s slots; 0 for a slot not in this cache."""
        for slots in self._slots.values():
            if slot in slots:
                return slots.index(slot)
        return 0

    def nbytes(self) -> int:
        return sum(s.buf.numel() * s.buf.element_size() for slots in self._slots.values() for s in slots)
