"""Swin-MoE from a Hugging Face Swin: chosen MLP blocks become dropless MoE blocks by sparse upcycling.

Every expert of an upcycled block starts as a copy of the dense MLP (``fc1``/``fc2``, biases included) and
the router starts small, so with ``norm_topk_prob=True`` the converted model computes the dense model's
function at initialization. The MoE block replaces only ``SwinLayer.mlp``: the layer's own layer norm,
dropout and residual stay as they are. Default layout (Swin-MoE, Hwang et al. / Tutel): every second block
of the last two stages.

``SwinMoEForImageClassification`` is a ``SwinForImageClassification`` whose config (``SwinMoEConfig``,
``model_type="swin_moe"``) records the MoE layout, so ``save_pretrained`` / ``from_pretrained`` round-trip
(and ``AutoModelForImageClassification`` loads it after ``import ds_hexamoe.models``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, SwinConfig, SwinForImageClassification
from transformers.models.swin.modeling_swin import SwinImageClassifierOutput

from ..config import ConfigError, RouterConfig, _build
from ..layers import MoEBlock, moe_aux_loss


class SwinMoEConfig(SwinConfig):
    """``SwinConfig`` plus the MoE layout.

    Args:
        num_experts: experts per MoE block.
        moe_layers: ``[[stage, block], ...]`` to make MoE; ``None``: every second block (odd indices) of
            the last two stages.
        router: a :class:`~ds_hexamoe.config.RouterConfig` as a dict (``top_k``, ``norm_topk_prob``,
            ``aux_loss_coef``, ...).
        router_init_std: std of the router's initial weights (small, so routing starts near uniform).
        add_aux_loss: add the routers' auxiliary losses to ``loss`` when labels are given.
    """

    model_type = "swin_moe"

    def __init__(self, num_experts: int = 8, moe_layers: list | None = None, router: dict | None = None,
                 router_init_std: float = 0.02, add_aux_loss: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.moe_layers = None if moe_layers is None else [list(p) for p in moe_layers]
        self.router = dict(router or {})
        self.router_init_std = router_init_std
        self.add_aux_loss = add_aux_loss

    def router_config(self) -> RouterConfig:
        return _build(RouterConfig, self.router, "swin_moe.router")

    def resolved_moe_layers(self) -> list[list[int]]:
        return default_moe_layers(self.depths) if self.moe_layers is None else [list(p) for p in self.moe_layers]

    def validate_moe(self) -> None:
        """Raise :class:`ConfigError` naming the field for any bad MoE setting (before building anything)."""
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 1:
            raise ConfigError(f"swin_moe.num_experts: got {self.num_experts!r}; expected an integer >= 1")
        rc = self.router_config()
        if rc.top_k > self.num_experts:
            raise ConfigError(f"swin_moe.router.top_k: got {rc.top_k}; expected <= num_experts ({self.num_experts})")
        if self.router_init_std < 0:
            raise ConfigError(f"swin_moe.router_init_std: got {self.router_init_std!r}; expected a number >= 0")
        layers = self.resolved_moe_layers()
        if not layers:
            raise ConfigError("swin_moe.moe_layers: no block selected; give [[stage, block], ...] or null for the default")
        for i, p in enumerate(layers):
            ok = (len(p) == 2 and all(isinstance(v, int) for v in p) and 0 <= p[0] < len(self.depths)
                  and 0 <= p[1] < self.depths[p[0]])
            if not ok:
                raise ConfigError(f"swin_moe.moe_layers[{i}]: got {p!r}; expected [stage, block] with stage < "
                                  f"{len(self.depths)} and block < depths[stage] (depths={list(self.depths)})")
        if len({tuple(p) for p in layers}) != len(layers):
            raise ConfigError(f"swin_moe.moe_layers: got {layers!r}; each [stage, block] at most once")


def default_moe_layers(depths) -> list[list[int]]:
    """Every second block (odd indices) of the last two stages, as Swin-MoE places its MoE layers."""
    first = max(0, len(depths) - 2)
    return [[s, b] for s in range(first, len(depths)) for b in range(1, depths[s], 2)]


@dataclass
class SwinMoEImageClassifierOutput(SwinImageClassifierOutput):
    """``SwinImageClassifierOutput`` plus ``aux_loss`` (the routers' summed auxiliary losses)."""

    aux_loss: torch.FloatTensor | None = None


def _mlp_linears(layer: nn.Module) -> tuple[nn.Linear, nn.Linear, str]:
    """The dense MLP's two linears of a ``SwinLayer`` (transformers 5: ``mlp.fc1/fc2``; 4.x:
    ``intermediate.dense`` / ``output.dense``) and the attribute that holds the MLP."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and hasattr(mlp, "fc1"):
        return mlp.fc1, mlp.fc2, "mlp"
    if hasattr(layer, "intermediate") and hasattr(layer, "output"):
        return layer.intermediate.dense, layer.output.dense, "intermediate"
    raise TypeError(f"{type(layer).__name__}: not a Swin layer with a dense MLP (mlp.fc1/fc2)")


def _swin_layer(model: nn.Module, stage: int, block: int) -> nn.Module:
    return model.swin.encoder.layers[stage].blocks[block]


def _make_block(config: SwinMoEConfig, dim: int, ffn: int) -> MoEBlock:
    block = MoEBlock(dim, ffn, config.num_experts, router=config.router_config(), act=config.hidden_act,
                     gated=False, bias=True)
    nn.init.normal_(block.router.weight, std=config.router_init_std)
    return block


class SwinMoEForImageClassification(SwinForImageClassification):
    """Swin image classifier whose chosen MLPs are :class:`~ds_hexamoe.layers.MoEBlock` s (plain-MLP experts)."""

    config_class = SwinMoEConfig

    def __init__(self, config: SwinMoEConfig):
        config.validate_moe()
        super().__init__(config)
        for stage, b in config.resolved_moe_layers():
            layer = _swin_layer(self, stage, b)
            fc1, fc2, attr = _mlp_linears(layer)
            if attr != "mlp":
                raise TypeError("SwinMoEForImageClassification needs transformers >= 5 (SwinLayer.mlp)")
            layer.mlp = _make_block(config, fc1.in_features, fc1.out_features)
        self.post_init()

    def moe_blocks(self) -> list[tuple[str, MoEBlock]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, MoEBlock)]

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding: bool = False, **kwargs):
        out = super().forward(pixel_values=pixel_values, labels=labels,
                              interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        aux = moe_aux_loss(self)
        loss = out.loss
        if loss is not None and aux is not None and self.config.add_aux_loss:
            loss = loss + aux.to(loss.dtype)
        return SwinMoEImageClassifierOutput(loss=loss, logits=out.logits, hidden_states=out.hidden_states,
                                            attentions=out.attentions, reshaped_hidden_states=out.reshaped_hidden_states,
                                            aux_loss=aux)

    @classmethod
    def from_dense(cls, dense: SwinForImageClassification, *, num_experts: int = 8, moe_layers: list | None = None,
                   router: dict | RouterConfig | None = None, router_init_std: float = 0.02,
                   add_aux_loss: bool = True) -> "SwinMoEForImageClassification":
        """Sparse upcycling: a Swin-MoE whose experts are copies of ``dense``'s MLPs (``dense`` is untouched)."""
        if isinstance(router, RouterConfig):
            router = dataclasses.asdict(router)
        cfg_dict = dense.config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            cfg_dict.pop(key, None)
        config = SwinMoEConfig(num_experts=num_experts, moe_layers=moe_layers, router=router,
                               router_init_std=router_init_std, add_aux_loss=add_aux_loss, **cfg_dict)
        config.validate_moe()
        model = cls(config)
        missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
        moe_names = {n for n, _ in model.moe_blocks()}
        bad_missing = [k for k in missing if not any(k.startswith(n + ".") for n in moe_names)]
        if bad_missing:
            raise RuntimeError(f"from_dense: weights {bad_missing[:3]} were not copied from the dense model")
        with torch.no_grad():
            for stage, b in config.resolved_moe_layers():
                fc1, fc2, _ = _mlp_linears(_swin_layer(dense, stage, b))
                ex = _swin_layer(model, stage, b).mlp.experts
                ex.up_proj.copy_(fc1.weight.unsqueeze(0).expand_as(ex.up_proj))
                ex.up_proj_bias.copy_(fc1.bias.unsqueeze(0).expand_as(ex.up_proj_bias))
                ex.down_proj.copy_(fc2.weight.unsqueeze(0).expand_as(ex.down_proj))
                ex.down_proj_bias.copy_(fc2.bias.unsqueeze(0).expand_as(ex.down_proj_bias))
        return model.train(dense.training)


def build_swin_moe(
    swin: str | dict | SwinConfig | SwinForImageClassification | None = None,
    *,
    num_labels: int | None = None,
    num_experts: int = 8,
    moe_layers: list | None = None,
    router: dict | RouterConfig | None = None,
    router_init_std: float = 0.02,
    add_aux_loss: bool = True,
    seed: int | None = None,
) -> SwinMoEForImageClassification:
    """A Swin-MoE classifier upcycled from ``swin``: a local checkpoint folder (a Swin, or a saved Swin-MoE,
    which is loaded as is), a ``SwinConfig`` (or its dict) for a fresh random Swin, or a Swin model.

    ``num_labels`` replaces the classifier head when it differs from the checkpoint's.
    """
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(swin, str):
        import os

        if not os.path.isdir(swin):
            raise ConfigError(f"model.path: {swin!r} is not a local folder; pass a Swin checkpoint directory "
                              "(downloads from a hub are not done here)")
        cfg = AutoConfig.from_pretrained(swin)
        kw = {} if num_labels is None or num_labels == cfg.num_labels else {"num_labels": num_labels,
                                                                            "ignore_mismatched_sizes": True}
        if cfg.model_type == "swin_moe":
            return SwinMoEForImageClassification.from_pretrained(swin, **kw)
        if cfg.model_type != "swin":
            raise ConfigError(f"model.path: {swin!r} holds a {cfg.model_type!r} model; expected a Swin checkpoint")
        dense = SwinForImageClassification.from_pretrained(swin, **kw)
    elif isinstance(swin, SwinForImageClassification):
        dense = swin
    else:
        if swin is None:
            swin = SwinConfig()
        if isinstance(swin, dict):
            swin = dict(swin)
            swin.pop("model_type", None)
            swin = SwinConfig(**swin)
        if num_labels is not None:
            swin.num_labels = num_labels
        dense = SwinForImageClassification(swin)
    return SwinMoEForImageClassification.from_dense(
        dense, num_experts=num_experts, moe_layers=moe_layers, router=router, router_init_std=router_init_std,
        add_aux_loss=add_aux_loss,
    )


def register_auto_classes() -> None:
    """``AutoConfig`` / ``AutoModelForImageClassification`` know ``"swin_moe"`` (idempotent)."""
    try:
        AutoConfig.register("swin_moe", SwinMoEConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForImageClassification.register(SwinMoEConfig, SwinMoEForImageClassification)
    except ValueError:
        pass


register_auto_classes()
