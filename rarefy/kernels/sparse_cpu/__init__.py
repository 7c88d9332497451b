"""Sparse x dense matmul over the bitmap layout for CPU decode (C++ extension, built on first use).

Batch-1 decode is memory bound: a 50%-sparse fp16 weight is 1.125 B/weight (values + a mask
bit) against 2 B for dense fp16 and 4 B for fp32. This kernel streams the bitmap once per call,
rebuilds 32 weights per mask word in registers (AVX-512 VBMI2 ``vpexpandw`` on 16-bit values,
or masked load + ``vexpandps`` without VBMI2, scalar elsewhere; picked at run time), widens to
fp32 and accumulates in fp32, reusing each decoded word for up to 8 rows of x (M > 8: rows of W
are decoded to an L1 buffer and run through a dense register tile). Software prefetch keeps the
weight streams at DRAM bandwidth. Rows of W are spread over torch's thread pool.

It pays off where weights stream from DRAM (decode of a model larger than the caches): the
decode costs about twice dense fp16's compute per weight position whatever the density, so
with the weight already in L2 the dense kernels are faster (docs/results/sparse-cpu-gemv.md).

Layout (``TiledBitmap`` and ``NMSparse`` both map onto it, see ``bitmap_args``):
    bitmask    int32 [N, Kw], Kw = ceil(K/32); bit j (LSB first) of word w <-> column 32w + j
    values     float16 / bfloat16 / float32, contiguous (used flat): set bits' values, row n's
               consecutive from values[row_start[n]] in column order
    row_start  int32 [N]

    from rarefy.kernels.sparse_cpu import available, bitmap_matmul
    if available():
        y = bitmap_matmul(x, bitmask, values, row_start, k, bias)   # x fp32 [M, K] -> fp32 [M, N]

int8 values with a per-output-row fp32 scale (``Int8TiledBitmap``, sparse + int8):

        y = bitmap_matmul_int8(x, bitmask, values_int8, row_start, scale, k, bias)

Compiled once with ``torch.utils.cpp_extension.load`` and cached in torch's extensions directory;
registered as ``torch.ops.rarefy_sparse.bitmap_matmul``.
"""

from __future__ import annotations

import os

import torch

from rarefy.kernels.cpp_op import CppOp

from .ref import bitmap_args, bitmap_matmul_ref, densify, unpack_bitmask

__all__ = ["available", "bitmap_matmul", "bitmap_matmul_int8", "bitmap_matmul_ref", "bitmap_args", "densify", "unpack_bitmask",
           "warm_up", "build_seconds", "best_isa", "ISA_NAMES"]


_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bitmap_matmul.cpp")
_NAME = "rarefy_sparse_bitmap"
ISA_NAMES = {0: "scalar", 1: "avx512", 2: "avx512+vbmi2"}

def _rows_of_bitmask(x, bitmask, *rest):  # shape-only, for torch.compile: x's dtype, [..., N]
    return x.new_empty(tuple(x.shape[:-1]) + (bitmask.shape[0],))


_ext = CppOp(_NAME, _SRC, "rarefy_sparse", "bitmap_matmul", "rarefy.kernels.sparse_cpu",
             fakes={"bitmap_matmul": _rows_of_bitmask, "bitmap_matmul_int8": _rows_of_bitmask})
_state = _ext.state  # tried / op / error / seconds


# available(): builds/loads on this machine (never raises; logs why not, once);
# warm_up(): the same, now rather than on the first call; build_seconds(): how long the
# first load took; best_isa(): Fastest code path on this CPU: 2 = AVX-512 + VBMI2, 1 = AVX-512 (F/BW/VL/DQ), 0 = scalar.
_load = _ext.load
available = warm_up = _ext.available
build_seconds = _ext.build_seconds
best_isa = _ext.best_isa


def bitmap_matmul(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_start: torch.Tensor, k: int,
                  bias: torch.Tensor | None = None, *, isa: int = -1) -> torch.Tensor:
    """``y = x @ W.T (+ bias)``, W [N, k] given as a bitmap, fp32 math.

    Args:
        x: float32 ``[M, k]`` (or ``[..., k]``), CPU; copied to contiguous if it is not.
        bitmask: int32 ``[N, ceil(k/32)]``, contiguous; bit j of word w <-> column 32w + j.
        values: float16, bfloat16 or float32, contiguous (read flat), the stored values.
        row_start: int32 ``[N]``, index into ``values`` of row n's first value.
        k: K, the number of columns of W (``x.shape[-1]`` must equal it).
        bias: optional float32 ``[N]``, contiguous.
        isa: code path; -1 picks the best (``best_isa``); 0 forces scalar, 1 AVX-512 without
            VBMI2 (for tests).

    Returns:
        float32 ``[M, N]`` (``[..., N]``), newly allocated.

    Weights are not copied or converted (that would defeat the point). Every row's value
    range is checked against ``values.numel()`` before it is read. Bits at columns >= k
    (NMSparse's padding) consume their values, which are ignored. Nan/inf in x at columns
    where W is zero propagate on the vector paths (0 * inf), not on the scalar one. Raises RuntimeError if the
    extension is unavailable; TypeError / ValueError on bad dtypes, shapes, layouts or
    metadata. Inference only (no autograd).
    """
    op = _ext.require()
    return op(x if x.is_contiguous() else x.contiguous(), bitmask, values, row_start, k, bias, isa)


def bitmap_matmul_int8(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_start: torch.Tensor,
                       scale: torch.Tensor, k: int, bias: torch.Tensor | None = None, *,
                       isa: int = -1) -> torch.Tensor:
    """``y = x @ (scale[:, None] * Q).T (+ bias)``, Q [N, k] a bitmap with int8 values, fp32 math.

    As ``bitmap_matmul``, but ``values`` is int8 and ``scale`` float32 ``[N]`` (contiguous):
    row n's dot product is multiplied by ``scale[n]`` once. Same checks, same code paths
    (VBMI2 byte expand, AVX-512 masked byte loads + fp32 expand, scalar).
    """
    _ext.require()
    op = torch.ops.rarefy_sparse.bitmap_matmul_int8.default
    return op(x if x.is_contiguous() else x.contiguous(), bitmask, values, row_start, scale, k, bias, isa)
