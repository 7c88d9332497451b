"""float64 PyTorch reference for ``bitmap_matmul``, and the bitmap argument builders."""

from __future__ import annotations

import torch

from rarefy.formats.sparse_weight import NMSparse, TiledBitmap

WORD = 32


def unpack_bitmask(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, Kw] -> bool [N, k]; bit j (LSB first) of word w <-> column 32*w + j."""
    shifts = torch.arange(WORD, dtype=torch.int64, device=bitmask.device)
    bits = (bitmask.to(torch.int64)[..., None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :k].bool()


def densify(bitmask: torch.Tensor, values: torch.Tensor, row_start: torch.Tensor, k: int) -> torch.Tensor:
    """The dense weight [N, k] (values' dtype) the bitmap arguments describe.

    Row n's values are ``values.flatten()[row_start[n] : row_start[n] + popcount(row n)]``,
    in column order; rows need not be stored in order.
    """
    mask = unpack_bitmask(bitmask, k)
    flat = values.reshape(-1)
    pos = torch.cumsum(mask.to(torch.int64), dim=1) - 1 + row_start.to(torch.int64)[:, None]
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense[mask] = flat[pos[mask]]
    return dense


def bitmap_matmul_ref(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_start: torch.Tensor,
                      k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in float64 on the exact stored values. x [..., k] -> float64 [..., N]."""
    w = densify(bitmask, values, row_start, k).double()
    y = x.double() @ w.t()
    if bias is not None:
        y = y + bias.double()
    return y


def bitmap_args(w: TiledBitmap | NMSparse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(bitmask, values, row_start, k)`` for ``bitmap_matmul`` from a sparse weight format.

    Build once at load time (NMSparse allocates row_start), then call the kernel per token:
    ``bitmap_matmul(x, *bitmap_args(w), bias)``. Tensors are shared with `w`, not copied.
    """
    n, k = w.shape
    if isinstance(w, TiledBitmap):
        row_start = w.tile_offsets[:, 0].contiguous()
        return w.bitmask, w.values, row_start, k
    if isinstance(w, NMSparse):
        per_row = w.values.shape[1]
        row_start = torch.arange(n, dtype=torch.int64).mul_(per_row).to(torch.int32)
        return w.bitmask, w.values.reshape(-1), row_start, k
    raise TypeError(f"bitmap_args takes a TiledBitmap or NMSparse, got {type(w).__name__}")
