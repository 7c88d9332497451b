"""SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

import torch.nn.functional as F
from torch import nn

from rarefy.config import ModelConfig
from rarefy.layers.linear import DenseLinear, fuse_dense


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.intermediate_size = f
        self.gate_proj = DenseLinear(d, f)
        self.up_proj = DenseLinear(d, f)
        self.down_proj = DenseLinear(f, d)
        self.gate_up_proj: nn.Module | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        if self.gate_up_proj is not None:
            return
        parts = [self.gate_proj, self.up_proj]
        if all(isinstance(m, DenseLinear) for m in parts):
            self.gate_up_proj = fuse_dense(parts)
        else:
            from rarefy.layers.lowbit_linear import fuse_lowbit
            self.gate_up_proj = fuse_lowbit(parts)
        if self.gate_up_proj is not None:
            del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
