"""float64 PyTorch reference for ``gemv_f16``."""

from __future__ import annotations

import torch


def gemv_f16_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` in float64 on the exact fp16 weight values.

    x: [..., K] (any float dtype), w: [N, K] (fp16, or anything), bias: [N] or None.
    Returns float64 [..., N].
    """
    y = x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    return y
