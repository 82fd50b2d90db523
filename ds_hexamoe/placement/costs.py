"""The cost model shared by the planner and the simulator: FLOPs per rank, bytes per link, memory.

Per step (forward + backward) and per rank ``r`` with batch share ``B_r`` samples of ``seq`` tokens:

- dense part (attention, routers, dense MLPs, LM head): ``B_r * seq`` tokens, the attention kernel's
  FLOPs (``score_flops_per_token``, quadratic in ``seq``) at ``sdpa_flops_r`` and the rest at ``attn_flops_r``;
- a data-centric MoE layer: the rank's own pairs ``B_r * seq * k`` at ``pair_flops / expert_flops_r``,
  plus SparseAllGather of the experts its tokens activate that it does not own, exposed in forward (what
  to gather is known only after the router), and in backward the re-materializing gather and the
  SparseReduceScatter of their gradients, hidden under the layer's backward compute and the dense
  compute when prefetching;
- a model-centric layer: every pair of the step on the rank's hidden slice ``f_r / f``, plus the token
  all-gather and output reduce-scatter (twice: forward and backward);
- expert-parallel layers: see :mod:`.problem` (compute of the placed load, replica materialization,
  token hops between home ranks and consecutive experts).

Every step also pays, on all ranks alike, its collectives' fixed cost (the slowest link's latency per
collective: the dense-gradient sync and the per-layer exchanges of each layer's mode) and DeepSpeed's
dense-gradient sync (ZeRO-2: reduce-scatter of gradients, all-gather of updated parameters, on the
slowest link); see :meth:`CostModel.sync_time`. The ideal bound leaves both out.

Memory per rank: dense weights and gradients (the dense optimizer state ZeRO-sharded), the rank's FSSDP
shard of expert weights, gradients and optimizer state, activations of its batch share, and the expert
cache (one layer, double-buffered when prefetching): every activated expert (data-centric), a hidden
slice of every expert (model-centric) or the hosted replicas (expert-parallel).
"""
from __future__ import annotations

import numpy as np

from ..apportion import largest_remainder
from ..config import ConfigError
from ..devices import DeviceProfile
from ..experts.stats import RoutingStats
from .options import SHARD_BY, PlanOptions
from .problem import PlacementProblem
from .profiles import check_world_size
from .shapes import ModelShape

# collectives per step: DeepSpeed's dense-gradient sync (gradient reduce, global norm, overflow check,
# parameter all-gather), and per MoE layer by mode: FSSDP data-centric: active-mask exchange, gather, its
# re-materialization, gradient reduce-scatter; expert parallel: dispatch and combine, forward and backward,
# plus replica materialization and gradient return; model-centric: token all-gather and output
# reduce-scatter, forward and backward
DENSE_COLLECTIVES = 4
# "hecate": expert parallel's six plus the load exchange its placement is computed from
LAYER_COLLECTIVES = {"data_centric": 3, "expert_parallel": 6, "model_centric": 4, "hecate": 7}


def integer_shares(weights, total: int, caps=None, what: str = "global_batch") -> list[int]:
    """Integers proportional to ``weights`` summing to ``total``, each at most ``caps[r]``: the exact
    quotas water-filled under the caps, then rounded by :func:`~ds_hexamoe.apportion.largest_remainder`."""
    w = np.asarray(weights, dtype=float)
    R = len(w)
    caps = np.full(R, np.inf) if caps is None else np.asarray(caps, dtype=float)
    if total == 0:
        return [0] * R
    x = np.zeros(R)
    free = np.ones(R, dtype=bool)
    left = float(total)
    for _ in range(R + 1):  # water-fill: cap, then share the rest among uncapped ranks
        if left <= 1e-12 or not free.any():
            break
        ww = np.where(free, w, 0.0)
        if ww.sum() <= 0:
            ww = free.astype(float)
        x_new = x + left * ww / ww.sum()
        over = free & (x_new > caps)
        if not over.any():
            x = x_new
            break
        x[over] = caps[over]
        free &= ~over
        left = total - x.sum()
    try:
        return largest_remainder(int(total), [float(v) for v in x], caps=[float(c) for c in caps], what=what)
    except ValueError as e:
        if caps.sum() < total:
            raise ConfigError(f"{what}: got {total}; the ranks' memory holds at most {int(caps.sum())} (per rank "
                              f"{[int(c) for c in caps[:8]]}{' ...' if R > 8 else ''}); reduce {what} or add memory") from None
        raise ConfigError(str(e)) from None


def water_fill(weights, caps) -> np.ndarray:
    """Fractions proportional to ``weights`` summing to 1 with ``x[r] <= caps[r]`` (``sum(caps) >= 1``)."""
    w = np.asarray(weights, dtype=float)
    caps = np.asarray(caps, dtype=float)
    x = np.zeros(len(w))
    free = np.ones(len(w), dtype=bool)
    for _ in range(len(w) + 1):
        left = 1.0 - x[~free].sum()
        ww = np.where(free, w, 0.0)
        if left <= 1e-15 or ww.sum() <= 0:
            break
        trial = left * ww / ww.sum()
        over = free & (trial > caps)
        if not over.any():
            x[free] = trial[free]
            break
        x[over] = caps[over]
        free &= ~over
    return x / x.sum()


class CostModel:
    """Everything per rank the planner and simulator need, from profiles, statistics and model shape."""

    def __init__(self, profiles: list[DeviceProfile], stats: RoutingStats, model: ModelShape, global_batch: int,
                 options: PlanOptions | None = None):
        self.options = options or PlanOptions()
        if not profiles:
            raise ConfigError("devices: got an empty list; expected one profile per rank")
        R = len(profiles)
        check_world_size(R)
        self.options.validate(R)
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
            raise ConfigError(f"global_batch: got {global_batch!r}; expected an integer >= 1 (samples per step)")
        if len(stats.layers) != model.num_moe_layers:
            raise ConfigError(f"stats.layers: {len(stats.layers)} MoE layers, but model.num_moe_layers is "
                              f"{model.num_moe_layers}; profile the same model or pass a matching model shape")
        for l in stats.layers:
            if stats.num_experts(l) != model.num_experts:
                raise ConfigError(f"stats.per_layer[{l!r}].counts: {stats.num_experts(l)} experts, but "
                                  f"model.num_experts is {model.num_experts}")
        self.profiles, self.stats, self.model, self.G = profiles, stats, model, global_batch
        self.R, self.L, self.E, self.seq = R, len(stats.layers), model.num_experts, model.seq_len
        self.sa = np.array([p.attn_flops for p in profiles])
        self.ss = np.array([p.sdpa_flops for p in profiles])  # the attention kernel (quadratic in seq_len)
        self.se = np.array([p.expert_flops for p in profiles])
        self.bw = np.array([p.bandwidth for p in profiles])
        self.fixed = np.array([getattr(p, "step_overhead", 0.0) for p in profiles])  # seconds per step, per rank
        self.latency = max(getattr(p, "latency", 0.0) for p in profiles)  # a collective waits for its slowest link
        self.mbw = np.array([getattr(p, "memory_bandwidth", 0.0) for p in profiles])  # bytes/s, 0: not modelled
        if self.options.memory_limits_gb is not None:
            self.mem = np.array(self.options.memory_limits_gb, dtype=float) * 1e9
        else:
            self.mem = np.array([p.memory_bytes for p in profiles], dtype=float) * self.options.memory_fraction
        tokens = self.G * self.seq
        self.k = np.array([stats.top_k[l] for l in stats.layers], dtype=float)
        p = np.array([stats.counts[l] for l in stats.layers], dtype=float)
        tot = p.sum(axis=1, keepdims=True)
        self.p = np.where(tot > 0, p / np.maximum(tot, 1), 1.0 / self.E)  # [L, E] routing probabilities
        self.loads = self.p * tokens * self.k[:, None]  # pairs per step
        self.hops_indep, self.hops_true = [], []
        for l in range(self.L - 1):
            indep = np.outer(self.p[l], self.loads[l + 1])
            a, b = stats.layers[l], stats.layers[l + 1]
            raw = stats.affinity.get((a, b))
            if raw is None or stats.tokens[a] == 0:
                true = indep
            else:
                m = np.array(raw, dtype=float)
                true = m / max(m.sum(), 1.0) * self.loads[l + 1].sum() if m.sum() > 0 else indep
            self.hops_indep.append(indep)
            self.hops_true.append(true)
        linear = model.dense_flops_per_token - model.score_flops_per_token
        self.dense_per_sample = self.seq * (linear / self.sa + model.score_flops_per_token / self.ss)  # seconds
        self.pair_cost = model.pair_flops / self.se
        self.hop_cost = 2.0 * model.token_bytes / self.bw
        self.cache_unit = float(model.expert_bytes + model.expert_grad_bytes)  # a materialized expert + its grad
        self.buffers = 2 if self.options.prefetch else 1
        self.act_per_sample = self.seq * model.activation_bytes()
        self.window_p: np.ndarray | None = None  # [L, E]: the load window's routing, if not the scored one

    # -- memory -------------------------------------------------------------------------------------
    def dense_state(self) -> np.ndarray:
        m = self.model
        per = m.dense_params * (m.param_bytes + m.grad_bytes) + m.dense_params * m.optimizer_bytes / self.R
        return np.full(self.R, float(per))

    def expert_state_total(self) -> float:
        m = self.model
        return float(self.L * self.E * m.expert_params * (m.param_bytes + m.grad_bytes + m.optimizer_bytes))

    def shard_weights(self, by: str = "memory") -> np.ndarray:
        """FSSDP shard weights (heterogeneous sharding), summing to 1.

        ``by="memory"``: in proportion to the memory left after the dense state. ``by="speed"``: in
        proportion to expert speed (an owner steps its experts' optimizer and packs them for every
        SparseAllGather, so a slow rank owning as much as a fast one makes everyone wait), each rank capped
        at the share its free memory holds (water-filled: what a capped rank cannot hold goes to the others
        by speed)."""
        if by not in SHARD_BY:
            raise ConfigError(f"shard_by: got {by!r}; expected 'memory' or 'speed'")
        free = self.mem - self.dense_state()
        bad = np.flatnonzero(free <= 0)
        if len(bad):
            r = int(bad[0])
            raise ConfigError(f"devices[{r}] ({self.profiles[r].name}): the dense model state needs "
                              f"{self.dense_state()[r] / 1e9:.1f} GB, more than its usable {self.mem[r] / 1e9:.1f} GB")
        total = self.expert_state_total()
        if total > free.sum():
            raise ConfigError(f"devices: total memory is too small: expert shards need {total / 1e9:.1f} GB and the ranks "
                              f"have {free.sum() / 1e9:.1f} GB left after the dense state; add devices or memory")
        if by == "memory":
            return free / free.sum()
        return water_fill(self.se, free / total)

    def fixed_bytes(self, sw: np.ndarray) -> np.ndarray:
        return self.dense_state() + sw * self.expert_state_total()

    def check_expert_fits(self, sw: np.ndarray) -> None:
        room = self.mem - self.fixed_bytes(sw)
        need = self.cache_unit * self.buffers
        if need > room.max():
            r = int(np.argmax(room))
            raise ConfigError(f"model: one expert with its gradient needs {need / 1e9:.2f} GB of cache "
                              f"({'double-buffered' if self.buffers == 2 else 'single'}), more than any device has free "
                              f"(best: devices[{r}] {self.profiles[r].name} with {max(room[r], 0) / 1e9:.2f} GB); "
                              "use devices with more memory or a smaller expert")

    def cache_bytes(self, mode: str, hosted: np.ndarray | None = None, slices: np.ndarray | None = None) -> np.ndarray:
        """Expert cache bytes per rank for a layer in ``mode``."""
        unit = self.cache_unit * self.buffers
        if mode == "data_centric":
            return np.full(self.R, self.E * unit)
        if mode == "model_centric":
            return self.E * unit * slices / self.model.expert_ffn
        return hosted * unit  # expert parallel and "hecate": the hosted experts

    def batch_caps(self, sw: np.ndarray, reserve: np.ndarray) -> np.ndarray:
        room = self.mem - self.fixed_bytes(sw) - reserve
        return np.maximum(0, np.floor(room / self.act_per_sample))

    def slots(self, sw: np.ndarray, shares) -> np.ndarray:
        room = self.mem - self.fixed_bytes(sw) - np.asarray(shares) * self.act_per_sample
        return np.clip(np.floor(room / (self.cache_unit * self.buffers)), 0, self.E).astype(int)

    def memory_used(self, sw, shares, cache: np.ndarray) -> np.ndarray:
        return self.fixed_bytes(sw) + np.asarray(shares, dtype=float) * self.act_per_sample + cache

    # -- time per rank ------------------------------------------------------------------------------
    def dense_time(self, shares) -> np.ndarray:
        return np.asarray(shares, dtype=float) * self.dense_per_sample

    def overlap(self, shares) -> np.ndarray:
        """Dense seconds per MoE layer, under which weight movement of the next layer can hide."""
        return self.dense_time(shares) / self.L if self.options.prefetch else np.zeros(self.R)

    def ahead_window(self, shares, l: int = 1) -> np.ndarray:
        """Seconds a gather issued ahead of layer ``l`` hides under (the ``"hecate"`` mode issues it when the
        previous layer's experts run, layer 0's at the forward's start): layer ``l``'s forward dense work
        and, for ``l > 0``, the previous layer's expert forward (an even share of the pairs at this rank)."""
        shares = np.asarray(shares, dtype=float)
        window = (self.dense_time(shares) + self.fixed) / self.L / 3.0
        if l > 0:
            window = window + shares * self.seq * self.k[l - 1] * self.pair_cost / 3.0
        return window

    def dc_parts(self, l: int, shares, sw) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A data-centric layer per rank: (compute, forward gather, backward traffic left exposed, backward
        traffic hidden under compute). The gathers are collectives: every rank waits for the slowest."""
        n = np.asarray(shares, dtype=float) * self.seq * self.k[l]
        compute = n * self.pair_cost
        active = (1.0 - np.exp(-np.outer(n, self.p[l]))).sum(axis=1)  # expected distinct experts used
        m = self.model
        gathered = active * (1.0 - sw) / self.bw  # seconds per byte of an expert, over the experts it fetches
        forward, _ = self.dc_forward(l, shares, sw, compute)
        backward = gathered * (int(self.options.rematerialize) * m.expert_bytes + m.expert_grad_bytes)
        if self.options.prefetch:  # issued ahead, under the layer's backward (2/3 of its FLOPs) and dense compute
            exposed = np.maximum(0.0, backward - compute * 2.0 / 3.0 - self.overlap(shares))
        else:
            exposed = backward
        return compute, forward, exposed, backward - exposed

    def dc_forward(self, l: int, shares, sw, compute) -> tuple[np.ndarray, np.ndarray]:
        """A data-centric layer's forward gather per rank: (exposed, hidden) seconds. ``"sync"``: all
        exposed (the router decides what to gather). ``"hecate"``: the experts used in the last ``history``
        calls are gathered ahead, under the dense compute and the previous layer's experts (approximated by
        this layer's); what the router then picks beyond them is a calibration gather, exposed. Calls are
        taken as independent draws of the layer's routing distribution: the scored one, or the window's
        (:attr:`window_p`) where the caller separates the two (the honest protocol, :mod:`.protocol`)."""
        n = np.asarray(shares, dtype=float) * self.seq * self.k[l]
        per_expert = (1.0 - sw) * self.model.expert_bytes / self.bw  # seconds to fetch one expert
        used = 1.0 - np.exp(-np.outer(n, self.p[l]))
        if self.options.schedule == "sync":
            return used.sum(axis=1) * per_expert, np.zeros(self.R)
        p_window = self.p[l] if self.window_p is None else self.window_p[l]
        window = 1.0 - np.exp(-self.options.history * np.outer(n, p_window))
        ahead = window.sum(axis=1) * per_expert
        calibrate = (used * (1.0 - window)).sum(axis=1) * per_expert
        room = self.overlap(shares) + (compute / 3.0 if l > 0 else 0.0)
        late = np.maximum(0.0, ahead - room)
        return late + calibrate, ahead - late

    def dc_layer(self, l: int, shares, sw) -> np.ndarray:
        compute, forward, exposed, _ = self.dc_parts(l, shares, sw)
        return compute + forward + exposed

    def mc_parts(self, l: int, shares, slices) -> tuple[np.ndarray, np.ndarray]:
        """A model-centric layer per rank: (compute on its hidden slice, token all-gather + reduce-scatter)."""
        pairs = self.loads[l].sum()
        compute = pairs * (np.asarray(slices) / self.model.expert_ffn) * self.pair_cost
        own = np.asarray(shares, dtype=float) * self.seq
        comm = 4.0 * (self.G * self.seq - own) * self.model.token_bytes / self.bw
        return compute, comm

    def mc_layer(self, l: int, shares, slices) -> np.ndarray:
        compute, comm = self.mc_parts(l, shares, slices)
        return compute + comm

    def update_time(self, sw) -> np.ndarray:
        """Seconds per step of the optimizer step over each rank's FSSDP shard (memory-bound: the shard's
        share of :attr:`ModelShape.expert_update_bytes` at the rank's memory bandwidth; 0 where that is
        not declared)."""
        speed = np.where(self.mbw > 0, self.mbw, np.inf)  # not modelled: no time
        return np.asarray(sw, dtype=float) * float(self.model.expert_update_bytes) / speed

    def collectives(self, modes) -> int:
        """Collectives per step with the MoE layers in ``modes``."""
        layer = dict(LAYER_COLLECTIVES, data_centric=LAYER_COLLECTIVES["data_centric"] + int(self.options.rematerialize))
        return DENSE_COLLECTIVES + sum(layer[m] for m in modes)

    def sync_time(self, modes) -> float:
        """Seconds of collective time every rank pays per step, beyond its own compute: the slowest link's
        latency per collective, and the ZeRO-2 dense-gradient sync (reduce-scatter of gradients, all-gather
        of parameters; ``2 (R-1)/R`` of the dense bytes each) on the slowest link."""
        if self.R == 1:
            return 0.0
        m = self.model
        dense = 2.0 * (self.R - 1) / self.R * m.dense_params * max(m.grad_bytes, m.param_bytes) / float(self.bw.min())
        return self.latency * self.collectives(modes) + dense

    def host_cost(self, sw) -> np.ndarray:
        m = self.model
        return (1.0 - sw) * ((1 + int(self.options.rematerialize)) * m.expert_bytes + m.expert_grad_bytes) / self.bw

    def ep_problem(self, shares, sw, layers: range | None = None, true_affinity: bool = False,
                   base: np.ndarray | None = None) -> PlacementProblem:
        """The placement problem of a run of expert-parallel layers (all by default)."""
        layers = layers if layers is not None else range(self.L)
        a, b = layers.start, layers.stop
        hops = self.hops_true if (true_affinity or self.options.use_affinity) else self.hops_indep
        shares = np.asarray(shares, dtype=float)
        return PlacementProblem(
            loads=self.loads[a:b], hops=hops[a:b - 1], home=shares / shares.sum(), pair_cost=self.pair_cost,
            hop_cost=self.hop_cost, host_cost=self.host_cost(sw), overlap=self.overlap(shares),
            base=self.dense_time(shares) if base is None else base, slots=self.slots(sw, shares),
            replicas=self.options.replicas, time_limit=self.options.time_limit)

    def hidden_slices(self) -> list[int]:
        """Model-centric hidden slice sizes ``f_r`` in proportion to expert speed (HEXA-MoE)."""
        return integer_shares(self.se, self.model.expert_ffn, what="model.expert_ffn")

    def ideal_step_time(self) -> float:
        """Total work over total speed: ``min tau`` such that the step's dense FLOPs, expert FLOPs and the
        expert optimizer step (where memory bandwidths are declared) can be split over ranks with every
        rank, its fixed per-step overhead included, done by ``tau`` (an LP; no communication, no memory
        limits)."""
        from scipy.optimize import linprog
        from scipy.sparse import coo_matrix

        R = self.R
        m = self.model
        works = [(self.G * self.seq * (m.dense_flops_per_token - m.score_flops_per_token), self.sa),
                 (self.G * self.seq * m.score_flops_per_token, self.ss),
                 (float(self.loads.sum()) * m.pair_flops, self.se)]
        if (self.mbw > 0).any():
            works.append((float(self.model.expert_update_bytes), self.mbw))
        works = [(w, s) for w, s in works if w > 0]
        t0 = sum(w / s.sum() for w, s in works) + float(self.fixed.max())  # the LP's scale
        K = len(works)
        # variables (in units of t0): y[k, r] seconds rank r spends on work k, then tau
        n = K * R + 1
        c = np.zeros(n)
        c[-1] = 1.0
        # sparse: a dense [R, K R] matrix is gigabytes at thousands of ranks
        ranks = np.arange(R)
        A_ub = coo_matrix((np.concatenate([np.ones(K * R), -np.ones(R)]),
                           (np.concatenate([np.tile(ranks, K), ranks]),
                            np.concatenate([np.arange(K * R), np.full(R, n - 1)]))), shape=(R, n)).tocsr()
        A_eq = coo_matrix((np.concatenate([speed * t0 / w for w, speed in works]),
                           (np.repeat(np.arange(K), R), np.arange(K * R))), shape=(K, n)).tocsr()
        res = linprog(c, A_ub=A_ub, b_ub=-self.fixed / t0, A_eq=A_eq, b_eq=np.ones(K), bounds=[(0, None)] * n,
                      method="highs")
        if res.status != 0:  # cannot happen for positive speeds; the closed form is then the estimate
            return t0
        return float(res.x[-1]) * t0
