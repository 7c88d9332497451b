"""float64 reference of the input-sparse product (what every backend must match)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def input_sparse_matmul_ref(x: torch.Tensor, wt: torch.Tensor, threshold: float,
                            bias: torch.Tensor | None = None, *, glu: bool = False) -> torch.Tensor:
    """``(x * (|x| >= threshold)) @ wt + bias`` in float64; with ``glu`` the output is
    ``silu(g) * u`` for the two column halves ``[g | u]`` of that product."""
    xd = x.double()
    xd = torch.where(xd.abs() >= threshold, xd, torch.zeros_like(xd))
    y = xd @ wt.double()
    if glu:
        g, u = y.chunk(2, dim=-1)
        y = F.silu(g) * u
    if bias is not None:
        y = y + bias.double()
    return y
