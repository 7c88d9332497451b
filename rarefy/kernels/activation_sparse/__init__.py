"""Input-sparse matmul for activation sparsity: ``(x * (|x| >= t)) @ wt + bias``.

``wt`` is the weight transposed (``[in, out]``), so an inactive input channel is one
contiguous row that is never read. CUDA runs the Triton kernel (triton.py); the CPU
runs rarefy's C++ kernel (rarefy/kernels/activation_cpu) when it builds and the weight is
fp16/fp32, else a plain torch fallback. ``glu=True`` takes ``wt = [gate^T | up^T]`` and
returns ``silu(gate) * up``: the MLP's first half in one call.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from rarefy.kernels.activation_sparse.ref import input_sparse_matmul_ref

__all__ = ["input_sparse_matmul", "input_sparse_matmul_ref"]


def _cpu_kernel():
    try:
        from rarefy.kernels import activation_cpu
    except ImportError:
        return None
    return activation_cpu if activation_cpu.available() else None


def _torch_fallback(x, wt, threshold, bias):
    xm = torch.where(x.abs() >= threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = xm @ wt.to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


GATHER_MIN_K = 8192  # batch-1 calls this deep go to the compacting kernel


@functools.lru_cache(maxsize=None)
def _triton_impl():
    from rarefy.kernels.activation_sparse.triton import input_sparse_matmul_triton
    return input_sparse_matmul_triton


# A custom op, so torch.compile treats the launcher (config cache, split-K workspace) as
# one opaque call instead of tracing into it.
@torch.library.custom_op("rarefy::input_sparse_matmul", mutates_args=())
def _triton_op(x2: torch.Tensor, wt: torch.Tensor, threshold: float, bias: Optional[torch.Tensor],
               glu: bool) -> torch.Tensor:
    if x2.shape[0] == 1 and (glu or wt.shape[0] >= GATHER_MIN_K):
        # One token through the MLP's gate/up or a deep matrix (down): the compacting kernel
        # measured faster than the predicated one at every sparsity (H100, ninth session,
        # docs/results/activation-gpu.md); at K = 4096 without GLU the two are even or the
        # predicated one is ahead.
        from rarefy.kernels.activation_sparse.triton_gather import input_sparse_gemv_gather
        return input_sparse_gemv_gather(x2, wt, threshold, bias, glu=glu)
    return _triton_impl()(x2, wt, threshold, bias, glu=glu)


@_triton_op.register_fake
def _fake(x2, wt, threshold, bias, glu):
    return x2.new_empty(x2.shape[0], wt.shape[1] // 2 if glu else wt.shape[1])


def input_sparse_matmul(x: torch.Tensor, wt: torch.Tensor, threshold: float,
                        bias: torch.Tensor | None = None, *, glu: bool = False) -> torch.Tensor:
    """x: ``[..., K]``; wt: ``[K, N]``; returns ``[..., N]`` (``[..., N/2]`` with glu)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        y = _triton_op(x2, wt, float(threshold), bias, glu)
    else:
        cpu = _cpu_kernel() if wt.dtype in (torch.float16, torch.float32) and x.dtype == torch.float32 else None
        if cpu is not None:
            y = cpu.input_sparse_matmul_cpu(x2.contiguous(), wt, float(threshold), None if glu else bias)
        else:
            y = _torch_fallback(x2, wt, threshold, None if glu else bias).to(x.dtype)
        if glu:
            g, u = y.chunk(2, dim=-1)
            y = F.silu(g) * u
    return y.reshape(*lead, y.shape[-1])
