"""The ``torch.library`` registrations, as seen from the kernels package.

The ops themselves (``hexamoe::esmm``, ``hexamoe::estmm``, ``hexamoe::ess``, ``hexamoe::expert_mlp``,
``hexamoe::expert_linear`` and their backward ops) are registered in :mod:`ds_hexamoe.ops.library`, so the
torch path and the Triton kernels go through the same ops: each runs the backend
:func:`ds_hexamoe.ops.get_backend` chose for the tensors' device (Triton on CUDA by default; on CPU only
when forced with ``set_backend("triton")`` under ``TRITON_INTERPRET=1``). This module keeps the names
the kernels' tests and benchmark use.
"""
import torch

from ds_hexamoe.ops.checks import check_expert_mlp
from ds_hexamoe.ops.library import esmm, ess, estmm, expert_linear, expert_mlp, expert_mlp_op

from . import triton_ops


def backend_for(device: torch.device) -> str:
    """``"triton"`` where the kernels can run (GPU, or CPU under the interpreter), ``"torch"`` otherwise."""
    return "triton" if (device.type == "cpu") == triton_ops.INTERPRETED else "torch"


__all__ = ["esmm", "estmm", "ess", "expert_mlp", "expert_mlp_op", "expert_linear", "backend_for", "check_expert_mlp"]
