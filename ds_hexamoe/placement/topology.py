"""Two bandwidth tiers (a fast link inside a node, a shared NIC between nodes) folded into the one link
bandwidth per rank the cost model takes.

The cost model (:mod:`.costs`) charges a rank's traffic at one ``bandwidth_gbps``. On a cluster of
nodes, traffic spread evenly over the other ranks (an all-to-all, or gathers from owners spread over
the cluster) goes partly over NVLink/NVSwitch to the ``g - 1`` peers of the node and partly over the
node's NIC, which the node's ``g`` GPUs share, to the ``R - g`` others. Both links run at once, so a
rank's traffic takes the longer of its two parts; :meth:`TwoTierNetwork.effective_gbytes_per_s` is the
one bandwidth that gives the same time. What it cannot express: topology-aware dispatch that keeps
tokens inside a node, and hierarchical collectives (both move the intra/inter split).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class TwoTierNetwork:
    """Nodes of ``gpus_per_node`` GPUs: ``intra_gbytes_per_s`` GB/s per GPU and direction inside a node,
    ``nic_gbits_per_s`` Gbit/s per node and direction between nodes (shared by the node's GPUs)."""

    gpus_per_node: int
    intra_gbytes_per_s: float
    nic_gbits_per_s: float

    def __post_init__(self):
        g = self.gpus_per_node
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ConfigError(f"network.gpus_per_node: got {g!r}; expected an integer >= 1")
        for f in ("intra_gbytes_per_s", "nic_gbits_per_s"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"network.{f}: got {v!r}; expected a number > 0")

    @property
    def inter_gbytes_per_s(self) -> float:
        """A GPU's share of its node's NIC, GB/s (8 bits a byte)."""
        return self.nic_gbits_per_s / 8.0 / self.gpus_per_node

    def split(self, ranks: int) -> tuple[float, float]:
        """(intra-node, inter-node) shares of a rank's traffic spread evenly over the other ``ranks - 1``."""
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise ConfigError(f"ranks: got {ranks!r}; expected an integer >= 1")
        if ranks == 1:
            return 1.0, 0.0
        g = min(self.gpus_per_node, ranks)
        if ranks % g:
            raise ConfigError(f"ranks: got {ranks}; expected a multiple of network.gpus_per_node ({g}): whole nodes")
        intra = (g - 1) / (ranks - 1)
        return intra, 1.0 - intra

    def effective_gbytes_per_s(self, ranks: int) -> float:
        """The single per-rank bandwidth (GB/s) that moves evenly spread traffic in the time the two tiers
        take in parallel: ``1 / max(intra share / intra bw, inter share / NIC share)``."""
        intra, inter = self.split(ranks)
        per_byte = max(intra / self.intra_gbytes_per_s, inter / self.inter_gbytes_per_s)
        return 1.0 / per_byte

    def to_dict(self) -> dict:
        return {"gpus_per_node": self.gpus_per_node, "intra_gbytes_per_s": self.intra_gbytes_per_s,
                "nic_gbits_per_s": self.nic_gbits_per_s}


__all__ = ["TwoTierNetwork"]
