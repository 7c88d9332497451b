"""fp32 activations with fp16-stored weights, for CPU decode.

Batch-1 decode on a CPU streams every weight from DRAM once per token; storing
weights in fp16 halves those bytes, and rarefy's C++ kernel widens them to fp32
in registers, so decode runs up to ~2x faster than fp32 weights. The rounding
(relative 2^-11) is far below that of the 4-bit GGUF weights it usually holds;
its perplexity cost is measured in docs/results/cpu-decode.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rarefy.kernels.gemv_cpu import gemv_f16
from rarefy.layers.linear import DenseLinear, replace_linears

# The GEMV re-reads the weight once per tile of a few rows, yet up to ~64 rows
# it still beats widening the whole weight to fp32 for torch's GEMM (measured
# on the embedded model: 37 vs 129 ms at 10 rows, 140 vs 161 ms at 64).
MAX_GEMV_ROWS = 64


class HalfWeightLinear(nn.Module):
    """y = x @ W^T + b with W stored fp16 [out, in]; x, b and y are fp32."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float16),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_dense(cls, dense: DenseLinear) -> "HalfWeightLinear":
        m = cls(dense.in_features, dense.out_features, dense.bias is not None)
        m.weight = nn.Parameter(dense.weight.detach().to(torch.float16).contiguous(),
                                requires_grad=False)
        if dense.bias is not None:
            m.bias = nn.Parameter(dense.bias.detach().float(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] fp32
        rows = x.numel() // self.in_features
        if rows <= MAX_GEMV_ROWS:
            return gemv_f16(x, self.weight, self.bias)
        return F.linear(x, self.weight.float(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, weight=fp16"


def is_projection_weight(name: str) -> bool:
    """HF names of the weights that HalfWeightLinear stores in fp16."""
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def use_half_weights(model: nn.Module) -> int:
    """Swap every dense projection (lm_head included) for a HalfWeightLinear; returns the count."""
    return replace_linears(model, lambda name, m: HalfWeightLinear.from_dense(m))
