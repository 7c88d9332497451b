"""Sparse matmul for decode: ``y = x @ W.T + bias`` with W in a pruned format.

``sparse_matmul(x, w, bias=None, config=None)``
    x: [..., K] activations; w: TiledBitmap | NMSparse | BlockSparse | DeltaSparse of shape [N, K]
    (rarefy.formats.sparse_weight); bias: [N] or None. Returns [..., N] in x.dtype.

    CUDA: the Triton kernels (triton_nm24 for 2:4 bf16/fp16 with at most 8 rows, triton_bitmap
    for TiledBitmap and other NMSparse, triton_bsr for
    BlockSparse with b in 16/32/64, triton_delta for DeltaSparse, triton_bitmap_int8 for
    Int8TiledBitmap), x and the values of one dtype (Int8TiledBitmap: int8 values, any float x). `config` is a
    BitmapConfig / BsrConfig (the compiler's autotuned choice); None picks a default.
    CPU: rarefy's C++ kernel (rarefy.kernels.sparse_cpu) for the bitmap formats when it
    builds, fp32 math; otherwise (and for BlockSparse, DeltaSparse) densify-and-matmul in torch.

``sparse_matmul_ref(x, w, bias)``: float64 reference for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rarefy.formats.sparse_weight import BlockSparse, DeltaSparse, Int8TiledBitmap, NMSparse, SparseWeight, TiledBitmap

from .ref import sparse_matmul_ref

__all__ = ["sparse_matmul", "sparse_matmul_ref", "triton_supports"]

TRITON_BLOCKS = (16, 32, 64)


def triton_supports(w: SparseWeight) -> bool:
    """Whether a Triton kernel handles this format (BSR needs a power-of-two block >= 16)."""
    return not isinstance(w, BlockSparse) or w.block in TRITON_BLOCKS


def _cuda(x2: torch.Tensor, w: SparseWeight, bias, config) -> torch.Tensor:
    if isinstance(w, Int8TiledBitmap):
        from .triton_bitmap_int8 import bitmap_int8_matmul_triton
        return bitmap_int8_matmul_triton(x2, w.bitmask, w.values, w.tile_offsets, w.scale, w.shape[0],
                                         bias=bias, config=config)
    if isinstance(w, TiledBitmap):
        from .triton_bitmap import bitmap_matmul_triton
        return bitmap_matmul_triton(x2, w.bitmask, w.values, w.shape[0], tile_offsets=w.tile_offsets,
                                    word_offsets=w.word_offsets, bias=bias, config=config)
    if isinstance(w, NMSparse):
        from .triton_nm24 import MAX_M, Nm24Config, nm24_matmul_triton
        if ((w.n, w.m) == (2, 4) and x2.shape[0] <= MAX_M and w.values.dtype in (torch.bfloat16, torch.float16)
                and x2.dtype == w.values.dtype and (config is None or isinstance(config, Nm24Config))):
            return nm24_matmul_triton(x2, w.bitmask, w.values, w.shape[0], bias=bias, config=config)
        from .triton_bitmap import bitmap_matmul_triton
        return bitmap_matmul_triton(x2, w.bitmask, w.values, w.shape[0], nm=(w.n, w.m), bias=bias,
                                    config=config if not isinstance(config, Nm24Config) else None)
    if isinstance(w, DeltaSparse):
        from .triton_delta import delta_matmul_triton
        return delta_matmul_triton(x2, w.row_ptr, w.values, w.gaps, w.shape[0], bias=bias, config=config)
    from .triton_bsr import bsr_matmul_triton
    return bsr_matmul_triton(x2, w.row_ptr, w.col_idx, w.blocks, w.shape[0], bias=bias, order=w.order,
                             config=config)


def _cpu(x2: torch.Tensor, w: SparseWeight, bias) -> torch.Tensor:
    if isinstance(w, Int8TiledBitmap):
        from rarefy.kernels import sparse_cpu
        if sparse_cpu.available():
            y = sparse_cpu.bitmap_matmul_int8(x2.float(), w.bitmask, w.values, w.tile_offsets[:, 0].contiguous(),
                                              w.scale, w.shape[1], bias=None if bias is None else bias.float())
            return y.to(x2.dtype)
        return F.linear(x2, w.to_dense(x2.dtype), bias)
    if isinstance(w, (TiledBitmap, NMSparse)):
        from rarefy.kernels import sparse_cpu
        if sparse_cpu.available():
            if isinstance(w, TiledBitmap):
                row_start = w.tile_offsets[:, 0].contiguous()
                k = w.shape[1]
            else:
                per_row = w.values.shape[-1]
                row_start = torch.arange(w.shape[0], dtype=torch.int32) * per_row
                # n:m keeps exactly n stored slots per group, so groups in the padding past K
                # hold explicit zeros there: give the kernel a zero-padded x to match
                k = w.bitmask.shape[1] * 32
                x2 = F.pad(x2, (0, k - x2.shape[1]))
            y = sparse_cpu.bitmap_matmul(x2.float(), w.bitmask, w.values.reshape(-1), row_start, k,
                                         bias=None if bias is None else bias.float())
            return y.to(x2.dtype)
    return F.linear(x2, w.to_dense().to(x2.dtype), bias)


def sparse_matmul(x: torch.Tensor, w: SparseWeight, bias: torch.Tensor | None = None, config=None) -> torch.Tensor:
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {w.shape[1]}")
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda and triton_supports(w):
        y = _cuda(x2, w, bias, config)
    elif x.is_cuda:
        y = F.linear(x2, w.to_dense().to(x2.dtype), bias)
    else:
        y = _cpu(x2, w, bias)
    return y.view(*x.shape[:-1], w.shape[0])
