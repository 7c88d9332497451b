"""Plain PyTorch reference for sparse matmul: densify, upcast, multiply."""

from __future__ import annotations

import torch

from rarefy.formats.sparse_weight import SparseWeight


def sparse_matmul_ref(x: torch.Tensor, w: SparseWeight, bias: torch.Tensor | None = None,
                      acc_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x @ W.T + bias`` in `acc_dtype`, W rebuilt densely from `w`.

    x: [..., K]; returns [..., N] in `acc_dtype` (compare kernels against this, then cast).
    """
    dense = w.to_dense().to(acc_dtype)
    y = x.to(acc_dtype) @ dense.T
    if bias is not None:
        y = y + bias.to(acc_dtype)
    return y
