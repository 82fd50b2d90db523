"""Cross-polytope LSH for compressing the expert-parallel dispatch (LSH-MoE; docs/design.md,
"LSH-compressed all-to-all").

Hash: ``h(x) = argmax([R x, -R x])`` over ``2 * m`` buckets, ``R`` a pseudo-random rotation built as
in FALCONN from ``num_rotations`` Hadamard-times-random-signs factors (one factor is a structured
rotation; two or three behave like a uniformly random one). ``num_hashes`` independent functions are
combined by concatenation: a bucket is the tuple of all codes, so more hashes make finer buckets
(less compression, less error).

Compression: the pairs bound for one (destination rank, expert) are grouped by bucket and each
group is sent as its centroid (mean). Pairs bound for this rank's own experts are not compressed (they
never cross a link). Back home, a pair's output is the centroid's expert output plus the residual
``x - c`` (LSH-MoE's compensation) when ``residual`` is on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import LSHConfig


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.size(0) < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


class CrossPolytopeLSH:
    """``num_hashes`` cross-polytope hash functions on ``dim``-vectors, each with ``2 * hash_dim`` buckets.

    ``hash_dim`` (default: ``dim`` rounded up to a power of two) keeps the first coordinates of the
    rotation: fewer buckets, coarser hashing.
    """

    def __init__(self, dim: int, num_hashes: int = 2, num_rotations: int = 1, seed: int = 0, hash_dim: int | None = None):
        if dim < 1:
            raise ValueError(f"CrossPolytopeLSH.dim: got {dim}; expected an integer >= 1")
        if num_hashes < 1 or num_rotations < 1:
            raise ValueError(f"lsh.num_hashes / lsh.num_rotations: got {num_hashes} / {num_rotations}; expected integers >= 1")
        self.dim, self.num_hashes, self.num_rotations = dim, num_hashes, num_rotations
        self.padded = 1 << (dim - 1).bit_length()
        self.hash_dim = self.padded if hash_dim is None else hash_dim
        if not 1 <= self.hash_dim <= self.padded:
            raise ValueError(f"CrossPolytopeLSH.hash_dim: got {hash_dim}; expected an integer in [1, {self.padded}]")
        g = torch.Generator().manual_seed(seed)
        h = _hadamard(self.padded)
        mats = []
        for _ in range(num_hashes):
            r = torch.eye(self.padded, dtype=torch.float64)
            for _ in range(num_rotations):
                signs = torch.randint(0, 2, (self.padded,), generator=g, dtype=torch.float64) * 2 - 1
                r = h @ (signs.unsqueeze(1) * r)  # R <- H D R
            mats.append(r[: self.hash_dim, :dim].t())  # [dim, hash_dim]: zero padding folded in
        self.proj = torch.cat(mats, 1)  # [dim, num_hashes * hash_dim]
        self._cast: dict = {}

    @property
    def buckets_per_hash(self) -> int:
        return 2 * self.hash_dim

    def rotations(self) -> torch.Tensor:
        """``[num_hashes, dim, hash_dim]`` float64 (for tests: orthogonality, determinism)."""
        return self.proj.view(self.dim, self.num_hashes, self.hash_dim).permute(1, 0, 2)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Bucket code per hash function, ``[T, num_hashes]`` int64 in ``[0, 2 * hash_dim)``."""
        if x.dim() != 2 or x.size(1) != self.dim:
            raise ValueError(f"CrossPolytopeLSH.codes: x has shape {list(x.shape)}; expected [T, {self.dim}]")
        dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        ck = (dt, x.device)
        if ck not in self._cast:
            self._cast[ck] = self.proj.to(dtype=dt, device=x.device)
        z = (x.detach().to(dt) @ self._cast[ck]).view(x.size(0), self.num_hashes, self.hash_dim)
        return torch.cat((z, -z), -1).argmax(-1)


@dataclass
class Buckets:
    """Result of grouping pairs into buckets (centroid rows), ordered by destination rank."""

    of_pair: torch.Tensor  # [P] bucket of each pair
    counts: torch.Tensor  # [B] pairs per bucket
    dest: torch.Tensor  # [B] destination rank (ascending)
    slot: torch.Tensor  # [B] expert slot on the destination
    remote_pairs: int
    remote_buckets: int

    @property
    def compression(self) -> float:
        """Rows sent / pairs bound to other ranks (1.0 when nothing is compressible)."""
        return self.remote_buckets / self.remote_pairs if self.remote_pairs else 1.0


def bucket_pairs(dest: torch.Tensor, slot: torch.Tensor, codes: torch.Tensor | None, rank: int) -> Buckets:
    """Group pairs by ``(dest, slot, codes)``; pairs bound for ``rank`` (or all, when ``codes`` is None) stay singletons."""
    p = dest.numel()
    remote = dest != rank
    if codes is None:
        remote = torch.zeros_like(remote)
        codes = dest.new_zeros(p, 1)
    own = torch.where(remote, torch.full_like(dest, -1), torch.arange(p, device=dest.device))
    codes = torch.where(remote.unsqueeze(1), codes, torch.zeros_like(codes))
    key = torch.cat((dest.unsqueeze(1), slot.unsqueeze(1), own.unsqueeze(1), codes), 1)
    uniq, of_pair, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)  # sorted: dest-major
    n_remote_pairs = int(remote.sum())
    n_remote_buckets = int((uniq[:, 0] != rank).sum())
    return Buckets(of_pair, counts, uniq[:, 0].contiguous(), uniq[:, 1].contiguous(), n_remote_pairs, n_remote_buckets)


def centroids(x_pairs: torch.Tensor, buckets: Buckets) -> torch.Tensor:
    """Mean of each bucket's rows (differentiable; fp32 accumulation for half types)."""
    acc = torch.float32 if x_pairs.dtype in (torch.float16, torch.bfloat16) else x_pairs.dtype
    sums = x_pairs.new_zeros(buckets.counts.numel(), x_pairs.size(1), dtype=acc).index_add(0, buckets.of_pair, x_pairs.to(acc))
    return (sums / buckets.counts.unsqueeze(1).to(acc)).to(x_pairs.dtype)


class LSHCompressor:
    """The ``"lsh"`` config section made executable: hashers per model dim, shared across layers."""

    def __init__(self, config: LSHConfig, hash_dim: int | None = None):
        config.validate("hexamoe.lsh")
        self.config = config
        self.hash_dim = hash_dim
        self._hashers: dict[int, CrossPolytopeLSH] = {}

    def hasher(self, dim: int) -> CrossPolytopeLSH:
        if dim not in self._hashers:
            c = self.config
            self._hashers[dim] = CrossPolytopeLSH(dim, c.num_hashes, c.num_rotations, c.seed, self.hash_dim)
        return self._hashers[dim]
