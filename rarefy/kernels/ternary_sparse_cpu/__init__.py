"""Input-sparse ternary GEMV for CPU: ternary weights with activation sparsity (C++, built on first use).

``y = s * (x * (|x| >= threshold)) @ Q.T + bias`` with Q in {-1, 0, +1} stored in the
transposed ternary layout (layout T1, docs/lowbit-formats.md): ``wt`` uint8 [K, ceil(N/4)],
four output rows of one input column per byte, so an inactive input skips one contiguous run
of N/4 bytes. The mask is computed inside the kernel (union over the batch's tokens, each token
keeping its own masked values); only the active rows of ``wt`` are read. AVX-512 and portable
paths, picked at run time; rows of y split over torch's threads. Design: ternary_input_sparse.cpp.

    from rarefy.kernels.ternary_sparse_cpu import available, ternary_input_sparse_gemv
    from rarefy.lowbit.composed import pack_ternary_t
    wt = pack_ternary_t(codes)                       # codes int [N, K] in {-1, 0, 1}
    y = ternary_input_sparse_gemv(x, wt, scale, n, threshold, bias)   # x fp32 [M, K] -> [M, N]

Registered as ``torch.ops.rarefy_ternary_sparse.ternary_input_sparse``.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from rarefy.errors import RarefyError
from rarefy.kernels.cpp_op import CppOp

__all__ = ["available", "ternary_input_sparse_gemv", "ternary_input_sparse_ref", "warm_up", "best_isa", "ISA_NAMES"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ternary_input_sparse.cpp")
ISA_NAMES = {0: "scalar", 1: "avx512", 2: "avx512+vnni"}


def _fake(x, wt, scale, n, threshold, bias=None, isa=-1, ksplit=-1):
    return x.new_empty(*x.shape[:-1], n)


_ext = CppOp("rarefy_ternary_sparse", _SRC, "rarefy_ternary_sparse", "ternary_input_sparse",
             "rarefy.kernels.ternary_sparse_cpu", fakes={"ternary_input_sparse": _fake})
_state = _ext.state
available = warm_up = _ext.available
best_isa = _ext.best_isa


def _threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise RarefyError(f"threshold must be a number >= 0, got {threshold!r}")
    t = float(threshold)
    if math.isnan(t) or math.isinf(t) or t < 0:
        raise RarefyError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return t


def ternary_input_sparse_gemv(x: torch.Tensor, wt: torch.Tensor, scale: torch.Tensor, n: int, threshold: float,
                              bias: torch.Tensor | None = None, *, isa: int = -1, ksplit: int = -1) -> torch.Tensor:
    """``y = s * xm @ Q.T (+ bias)``, xm = x where ``|x| >= threshold`` else 0, reading only the
    active input rows of the transposed ternary weight.

    Args:
        x: float32 ``[M, K]`` or ``[..., K]`` on CPU (made for M = 1..16; copied if not contiguous).
        wt: uint8 ``[K, ceil(n/4)]``, contiguous, layout T1 (``rarefy.lowbit.composed.pack_ternary_t``).
        scale: the per-tensor scale, one float32/float16 value (e.g. TernaryLinear's [1, 1]).
        n: the number of outputs N.
        threshold: finite number >= 0; 0 keeps every non-NaN input.
        bias: optional float32 ``[n]``.
        ksplit: -1 picks the work split (the active inputs cut over threads for layers of
            fewer than 2 x threads 64-byte blocks of outputs at M <= 4, else output stripes);
            0 forces output stripes, 1 the input split (tests, benchmarks).
        isa: -1 best; 0 forces the portable path, 1 AVX-512 without VNNI, 2 AVX-512 VNNI (tests).

    Returns float32 ``[..., n]``. Raises RarefyError on bad input (one message naming the
    argument), RuntimeError if the extension is unavailable.
    """
    t = _threshold(threshold)
    op = _ext.require()
    try:
        return op(x if x.is_contiguous() else x.contiguous(), wt, scale, int(n), t, bias, int(isa), int(ksplit))
    except (TypeError, ValueError, RuntimeError) as e:
        raise RarefyError(str(e).split("\n")[0]) from e


def ternary_input_sparse_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, threshold: float,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 reference: ``s * (x * (|x| >= t)) @ Q.T (+ bias)``, Q = `codes` int [N, K] in {-1, 0, 1}."""
    xd = x.double()
    xm = torch.where(xd.abs() >= threshold, xd, torch.zeros((), dtype=torch.float64))
    y = xm @ codes.double().t() * float(scale.reshape(-1)[0])
    return y if bias is None else y + bias.double()
