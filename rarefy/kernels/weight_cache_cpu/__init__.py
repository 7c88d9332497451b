"""C++ ops behind the CPU differential weight cache (built on first use).

Two ops, registered as ``torch.ops.rarefy_wcache.*`` (compiled once with
``torch.utils.cpp_extension.load`` and cached in torch's extensions directory):

    update(mask, scores, src_g, src_u, src_d, pool_g, pool_u, pool_d, maps, prev) -> n
        the per-token bookkeeping and copies of rarefy.sparsity.weight_cache.DifferentialWeightCache
        (use that class; the op trusts the state tensors it builds).
    sparse_mlp(x, g, u, d, n, isa=-1) -> y
        y = sum_{j<n} silu(g_j . x) * (u_j . x) * d_j over the first n rows of g, u, d
        (fp16 or fp32 weights, rows contiguous, any row stride; x fp32 [..., H]).

Design and measurements: docs/weight-cache.md, docs/results/weight-cache-cpu.md.
"""

from __future__ import annotations

import os

import torch

from rarefy.kernels.cpp_op import CppOp

from .ref import sparse_mlp_ref, sparse_mlp_rows_ref

__all__ = ["available", "warm_up", "build_seconds", "best_isa", "ISA_NAMES", "sparse_mlp", "update_op",
           "sparse_mlp_ref", "sparse_mlp_rows_ref"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weight_cache.cpp")
_NAME = "rarefy_weight_cache"
ISA_NAMES = {0: "scalar", 1: "avx512"}

_ext = CppOp(_NAME, _SRC, "rarefy_wcache", "update", "rarefy.kernels.weight_cache_cpu")
_state = _ext.state  # tried / op / error / seconds

# available(): builds/loads on this machine (never raises; logs why not, once);
# warm_up(): the same, now rather than on the first call; build_seconds(): how long the
# first load took; best_isa(): Fastest code path on this CPU: 1 = AVX-512 (F/BW/VL + F16C), 0 = scalar.
_load = _ext.load
available = warm_up = _ext.available
build_seconds = _ext.build_seconds
best_isa = _ext.best_isa


def update_op():
    """The raw ``update`` op (RuntimeError if the extension is unavailable)."""
    return _ext.require()


def sparse_mlp(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor, n: int | None = None, *,
               isa: int = -1) -> torch.Tensor:
    """``y = sum_{j<n} silu(g[j] @ x) * (u[j] @ x) * d[j]`` (fp32 math, fp16 or fp32 weights).

    Args:
        x: float32 ``[..., H]``, CPU (copied to contiguous if it is not).
        g, u, d: ``[R, H]`` with R >= n, all float16 or all float32, each row contiguous (any
            row stride, e.g. gate and up rows interleaved in one buffer); d holds rows of
            down^T (columns of down).
        n: rows used (default: all of d's rows).
        isa: -1 best, 0 scalar, 1 AVX-512.

    Returns float32 of x's shape. Each thread accumulates its rows' share of y and the shares
    are summed, so the rounding (not the value) depends on the thread count.
    """
    _ext.require()
    return torch.ops.rarefy_wcache.sparse_mlp(x if x.is_contiguous() else x.contiguous(), g, u, d,
                                              d.shape[0] if n is None else n, isa)
