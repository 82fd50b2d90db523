"""Router control for Hugging Face MoE checkpoints (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3-style): the
``hexamoe.router`` options applied to a transformers model's own routers, and per-layer router figures
(docs/design.md, "Router balance for checkpoints"; docs/recipes.md, "Routers of a checkpoint").

* ``aux_loss_coef``: sets the model's ``router_aux_loss_coef``; 0 also stops requesting router logits
  (``output_router_logits``), so the loss is the plain LM loss. null keeps the checkpoint's.
* ``z_loss_coef``: ``beta * mean(logsumexp(logits)^2)`` over every router row of the global batch (layers
  pooled, padding left out), weighted over ranks like the auxiliary loss (:mod:`ds_hexamoe.layers.balance`).
* ``bias_update_rate``: DeepSeek-V3's auxiliary-loss-free balance on routers with an
  ``e_score_correction_bias`` (used by transformers for top-k selection only): after each optimizer step
  ``b_i += gamma * sign(mean_load - load_i)``, loads summed over all ranks and the accumulation window.
* ``freeze``: router parameters get no gradient, hence no optimizer state.

Routers are the modules a model's ``_can_record_outputs["router_logits"]`` names (what transformers itself
records as router logits), so every family built on its output recorder is covered.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, RouterConfig
from ..distributed import host_all_reduce

BIAS = "e_score_correction_bias"
_WHERE = "hexamoe.router"


def router_modules(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, logits_index)`` of every router of a transformers MoE model, in model order."""
    recorders = []
    for m in model.modules():
        spec = getattr(type(m), "_can_record_outputs", None)
        rec = spec.get("router_logits") if isinstance(spec, dict) else None
        if rec is not None:
            recorders.append(rec)

    def index_of(mod: nn.Module) -> int | None:
        for rec in recorders:
            cls, name = getattr(rec, "target_class", rec), getattr(rec, "class_name", None)
            if (isinstance(cls, type) and isinstance(mod, cls)) or (name and type(mod).__name__.endswith(name)):
                return int(getattr(rec, "index", 0) or 0)
        return None

    found = [(n, m, index_of(m)) for n, m in model.named_modules()]
    return [(n, m, i) for n, m, i in found if i is not None]


def check_router_options(model: nn.Module, cfg: RouterConfig, where: str = _WHERE) -> list:
    """The model's routers, after checking that it supports every option ``cfg`` asks for (else a
    :class:`ConfigError` naming the key, the model type and the fix)."""
    mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    routers = router_modules(model)
    asked = [k for k, on in (("z_loss_coef", cfg.z_loss_coef > 0), ("bias_update_rate", cfg.bias_update_rate > 0),
                             ("freeze", cfg.freeze), ("aux_loss_coef", cfg.aux_loss_coef is not None)) if on]
    if asked and not routers:
        raise ConfigError(f"{where}.{asked[0]}: model type {mt!r} has no Hugging Face router (nothing recorded as "
                          "router_logits); leave the key out (blocks ds-hexamoe builds, e.g. Swin-MoE, take their "
                          "router settings from model.config.router)")
    if cfg.bias_update_rate > 0:
        lacking = [n for n, m, _ in routers if not torch.is_tensor(getattr(m, BIAS, None))]
        if lacking:
            raise ConfigError(f"{where}.bias_update_rate: got {cfg.bias_update_rate}; model type {mt!r} has no {BIAS} "
                              f"in its router {lacking[0]!r} (aux-loss-free balancing needs a DeepSeek-V3-style "
                              "correction bias): set it to 0, or balance with aux_loss_coef")
    if cfg.aux_loss_coef and getattr(model.config, "router_aux_loss_coef", None) is None:
        raise ConfigError(f"{where}.aux_loss_coef: got {cfg.aux_loss_coef}; model type {mt!r} has no router "
                          "auxiliary loss in transformers (no router_aux_loss_coef in its config): set it to 0 or "
                          "null" + (", or use bias_update_rate (its routers have a correction bias)"
                                    if routers and all(hasattr(m, BIAS) for _, m, _ in routers) else ""))
    return routers


def set_aux_coef(model: nn.Module, coef: float | None) -> None:
    """The model's auxiliary-loss coefficient (null: unchanged); 0 turns router logits off too."""
    if coef is None or getattr(model.config, "router_aux_loss_coef", None) is None:
        return
    model.config.router_aux_loss_coef = coef
    model.config.output_router_logits = coef > 0
    for m in model.modules():  # the ForCausalLM copies it at construction (under a wrapper too, e.g. PEFT's)
        if "router_aux_loss_coef" in vars(m):
            m.router_aux_loss_coef = coef


def _indices(out) -> torch.Tensor | None:
    """The top-k expert indices in a router's output tuple (the integer tensor)."""
    for t in reversed(out if isinstance(out, (tuple, list)) else ()):
        if torch.is_tensor(t) and not t.is_floating_point():
            return t
    return None


class RouterControl:
    """The ``hexamoe.router`` options on a transformers model's routers, and their per-layer figures.

    Hooks: a forward pre-hook on the model opens a forward; each router's forward hook counts its first call
    in a training forward only (a recompute in backward is the same forward), keeping the logits for the
    z-loss. Call :meth:`add_z_loss` after each forward, :meth:`after_step` after each optimizer step and
    :meth:`figures` at each metrics row (the last two are collective)."""

    def __init__(self, model: nn.Module, cfg: RouterConfig | None = None, where: str = _WHERE):
        self.cfg = cfg or RouterConfig()
        routers = check_router_options(model, self.cfg, where)
        set_aux_coef(model, self.cfg.aux_loss_coef)
        self.names = [n.rsplit(".", 1)[0] if "." in n else n for n, _, _ in routers]
        self.routers = [m for _, m, _ in routers]
        self.experts = [int(getattr(m, "num_experts", None) or m.weight.shape[0]) for m in self.routers]
        if self.cfg.freeze:
            for m in self.routers:
                m.requires_grad_(False)
        self._logits: list[torch.Tensor] = []
        self._seen: set[int] = set()
        self._step = [torch.zeros(e, dtype=torch.float64) for e in self.experts]
        self._window = [torch.zeros(2 * e + 3, dtype=torch.float64) for e in self.experts]
        self._handles = [model.register_forward_pre_hook(self._open_forward)]
        self._handles += [m.register_forward_hook(self._hook(i, idx)) for i, (_, m, idx) in enumerate(routers)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _open_forward(self, _module, _args) -> None:
        self._seen.clear()
        self._logits.clear()

    def _hook(self, i: int, logits_index: int):
        def hook(module, _args, out):
            if not module.training or i in self._seen:
                return
            self._seen.add(i)
            logits = (out[logits_index] if isinstance(out, (tuple, list)) else out).reshape(-1, self.experts[i])
            if self.cfg.z_loss_coef > 0 and logits.requires_grad:
                self._logits.append(logits)
            self._count(i, logits.detach(), _indices(out))

        return hook

    @torch.no_grad()
    def _count(self, i: int, logits: torch.Tensor, idx: torch.Tensor | None) -> None:
        """Adds this call's figures to the step's and the window's sums, on the logits' device (no host sync)."""
        e, f = self.experts[i], logits.float()
        if self._step[i].device != f.device:
            self._step = [s.to(f.device) for s in self._step]
            self._window = [w.to(f.device) for w in self._window]
        counts = (torch.bincount(idx.reshape(-1), minlength=e).to(self._step[i]) if idx is not None
                  else torch.zeros_like(self._step[i]))
        logp = torch.log_softmax(f, dim=-1)
        lse = torch.logsumexp(f, dim=-1)
        tail = torch.stack([-(logp.exp() * logp).sum(), lse.pow(2).sum(), lse.new_tensor(float(f.size(0)))])
        self._window[i] += torch.cat([counts, logp.exp().sum(0).double(), tail.double()])
        self._step[i] += counts

    def add_z_loss(self, loss: torch.Tensor, batch: dict, share: float | None = None):
        """``(loss + z, z)``: the z-loss of this forward's routers (None without ``z_loss_coef``). ``share``: the
        weight the caller gives this rank's loss (its units over all ranks'), as in
        :func:`ds_hexamoe.layers.balance.balance_loss`; the weighted sum over ranks is one process's z-loss.
        Collective when ``share`` is given."""
        if self.cfg.z_loss_coef <= 0:
            return loss, None
        mask = batch.get("attention_mask")
        total = loss.new_zeros((), dtype=torch.float32)
        rows = loss.new_zeros((), dtype=torch.float64)
        for logits in self._logits:
            lse2 = torch.logsumexp(logits.float(), dim=-1).pow(2)
            if mask is not None and mask.numel() == lse2.numel():
                w = mask.reshape(-1).to(lse2)
                total, rows = total + (lse2 * w).sum(), rows + w.sum().double()
            else:
                total, rows = total + lse2.sum(), rows + lse2.numel()
        self._logits.clear()
        per_rows = rows if share is None else host_all_reduce(rows.reshape(1).clone())[0] * share
        z = self.cfg.z_loss_coef * total / per_rows.clamp_min(1e-30).to(total)
        return loss + z.to(loss.dtype), z

    @torch.no_grad()
    def after_step(self) -> None:
        """The aux-loss-free bias update from this step's loads over all ranks (collective when it runs)."""
        if self.cfg.bias_update_rate > 0 and self.routers:
            loads = host_all_reduce(torch.cat(self._step))
            for m, load in zip(self.routers, torch.split(loads, self.experts)):
                bias = getattr(m, BIAS)
                load = load.to(device=bias.device, dtype=torch.float32)
                bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load).to(bias.dtype)
        self._step = [torch.zeros_like(s) for s in self._step]

    def figures(self) -> dict:
        """Per layer since the last call, summed over all ranks (collective): ``tokens`` per expert (top-k
        assignments), ``imbalance`` (busiest expert over the mean; 1.0 is perfect), ``entropy`` (mean entropy of
        the softmax of the logits, nats), ``aux_loss`` (``E * sum_e f_e P_e`` of the layer alone, unscaled: top-k
        when balanced) and ``z_loss`` (``z_loss_coef * mean(logsumexp^2)``); ``z_loss`` over all layers pooled."""
        if not self.routers:
            return {}
        total = host_all_reduce(torch.cat(self._window)).cpu()
        self._window = [torch.zeros_like(w) for w in self._window]
        layers, lse2, rows = {}, 0.0, 0.0
        for name, e, w in zip(self.names, self.experts, torch.split(total, [2 * e + 3 for e in self.experts])):
            counts, prob, (ent, z2, n) = w[:e], w[e : 2 * e], w[2 * e :].tolist()
            if n <= 0:
                continue
            mean = float(counts.mean())
            layers[name] = {"tokens": counts.tolist(), "imbalance": float(counts.max()) / mean if mean else None,
                            "entropy": ent / n, "aux_loss": e * float((counts / n * prob / n).sum()),
                            "z_loss": self.cfg.z_loss_coef * z2 / n}
            lse2, rows = lse2 + z2, rows + n
        return {"layers": layers, "z_loss": self.cfg.z_loss_coef * lse2 / rows} if layers else {}


def router_control(model: nn.Module, cfg: RouterConfig | None, where: str = _WHERE) -> RouterControl | None:
    """A :class:`RouterControl` over ``model``'s routers, or None when it has none (and ``cfg`` asks nothing of
    them); raises :class:`ConfigError` for an option the model cannot take."""
    rc = RouterControl(model, cfg, where)
    if rc.routers:
        return rc
    rc.close()
    return None
