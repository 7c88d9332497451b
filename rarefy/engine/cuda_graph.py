"""The one-token decode step captured as a CUDA graph.

At batch 1 a decode step is hundreds of small kernels; replaying them as one
graph removes the per-launch CPU overhead that otherwise dominates.
"""

from __future__ import annotations

import torch


class GraphedDecodeStep:
    """compile=True first runs the step through torch.compile, so that the many
    small element-wise kernels of a layer (norms, rope, SiLU, residuals) are
    fused; what is left is captured as one graph either way."""

    def __init__(self, model, cache, batch: int, warmup_iters: int = 3, compile: bool = False):
        dev = model.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        # Warm-up and capture write keys/values at slot 0 only; callers capture
        # before prefill, which overwrites that slot.
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.model, self.cache = model, cache
        step = model
        if compile:
            step = torch.compile(model, fullgraph=True, dynamic=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile/autotune kernels outside the capture
            for _ in range(warmup_iters):
                step(self.ids, self.positions, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.ids, self.positions, cache)[:, -1]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions: [B, 1] -> logits [B, vocab] (a buffer reused by the next call)."""
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits
