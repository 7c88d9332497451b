"""float64 PyTorch references for the weight-cache ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_mlp_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense SwiGLU MLP in float64 with the inactive neurons' outputs zeroed.

    x: [..., H]; gate, up: [I, H]; down: [H, I] (``nn.Linear`` layouts, any float dtype: the
    exact stored values are used); mask: bool [I] (None: all active). Returns float64 [..., H]:
    ``down @ (mask * silu(gate @ x) * (up @ x))``.
    """
    x = x.double()
    h = F.silu(x @ gate.double().t()) * (x @ up.double().t())
    if mask is not None:
        h = h * mask.to(torch.float64)
    return h @ down.double().t()


def sparse_mlp_rows_ref(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor, n: int) -> torch.Tensor:
    """What ``sparse_mlp`` computes, in float64: the first n rows of g, u, d (d = rows of down^T)."""
    x = x.double()
    g, u, d = g[:n].double(), u[:n].double(), d[:n].double()
    return (F.silu(x @ g.t()) * (x @ u.t())) @ d
