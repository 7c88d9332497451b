"""Linear layers. Every projection in the model is one of these modules, so the
sparse and low-bit issues swap in their own class without touching model code.

A replacement must accept x: [..., in_features] and return [..., out_features],
and keep `in_features` / `out_features` attributes.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rarefy.kernels.gemv import gemv


# "rarefy": decode-sized CUDA matmuls go to rarefy's GEMV kernel; "torch": always
# torch's matmul (cuBLAS). Benchmarks flip it to compare the two in one run.
GEMV_BACKEND = os.environ.get("RAREFY_GEMV", "rarefy")


class DenseLinear(nn.Module):
    """y = x @ W^T + b, W: [out_features, in_features] (HF layout).

    On CUDA, small-batch (decode) calls go to rarefy's GEMV kernel when it is
    available; everything else uses torch's matmul.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and GEMV_BACKEND == "rarefy":
            return gemv(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(
                *x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def fuse_dense(layers: list[DenseLinear]) -> DenseLinear:
    """One DenseLinear whose output is the concatenation of `layers`' outputs.

    Decode is memory-bound: one launch over the stacked weights streams the
    same bytes as three but with one launch's overhead and a fuller grid.
    """
    fused = DenseLinear(layers[0].in_features, sum(l.out_features for l in layers),
                        bias=layers[0].bias is not None)
    fused.weight = nn.Parameter(torch.cat([l.weight for l in layers]), requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([l.bias for l in layers]), requires_grad=False)
    return fused


def replace_linears(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Swap linear modules: `make(qualified_name, module)` returns the replacement or None.

    Returns how many modules were replaced.
    """
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, DenseLinear):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                new = make(name, child)
                if new is not None:
                    setattr(parent, child_name, new)
                    count += 1
    return count
