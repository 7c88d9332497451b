"""float64 PyTorch reference for ``input_sparse_matmul_cpu``."""

from __future__ import annotations

import torch


def input_sparse_matmul_cpu_ref(x: torch.Tensor, wt: torch.Tensor, threshold: float,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x * (|x| >= threshold)) @ wt (+ bias)`` in float64 on the exact stored weight values.

    x: [M, K] (any float dtype), wt: [K, N] (any float dtype), bias: [N] or None.
    The mask is a ``where``, not a product: NaN never passes (``|NaN| >= t`` is false), so a
    NaN input contributes nothing, as in the kernel. Returns float64 [M, N].
    """
    xd = x.double()
    xd = torch.where(xd.abs() >= threshold, xd, torch.zeros((), dtype=torch.float64))
    y = xd @ wt.double()
    if bias is not None:
        y = y + bias.double()
    return y


def active_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [K]: input channels active for at least one token (the rows of wt the kernel reads)."""
    return (x.double().abs() >= threshold).any(dim=0)
