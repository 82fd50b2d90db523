"""Expert-specific operators and the autograd functions built on them (docs/design.md, "Expert-specific
operators").

Contract shared by the torch path (:mod:`.torch_ops`) and the Triton kernels (``ds_hexamoe.kernels``):

* ``esmm(x, w, idx, offs, *, gather_div=None, scatter=False, bias=None, row_scale=None) -> [P, N]``
* ``estmm(x, dy, idx, offs, *, x_div=None, dy_div=None, dy_scale=None) -> [E, K, N]``
* ``ess(dy, idx, offs, *, dy_div=None, dy_scale=None) -> [E, N]``

``w`` is ``[E, K, N]`` with any strides; ``idx``/``offs`` come from :func:`build_expert_index`.
All of them, and the differentiable :func:`expert_mlp` / :func:`expert_linear`, are ``torch.library`` ops
(:mod:`.library`) running the backend chosen once per device type.
"""
from .dispatch import backend_name, get_backend, set_backend
from .library import esmm, ess, estmm, expert_linear, expert_mlp
from .routing import ExpertIndex, build_expert_index


__all__ = [
    "ExpertIndex", "build_expert_index", "esmm", "estmm", "ess", "expert_linear", "expert_mlp",
    "get_backend", "set_backend", "backend_name",
]
