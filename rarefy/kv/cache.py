"""A preallocated KV cache with static shapes (CUDA-graph friendly).

Each sequence b owns row b. A token at position p is written to slot p, so a
sequence's positions are its slot indices and no left padding is needed:
prompts of different lengths are right-padded, and the padding slots are
overwritten by decoded tokens before any query can attend to them (a query at
position p only sees slots <= p, and slot p is written in the same step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class StaticKVCache:
    def __init__(self, num_layers: int, batch: int, max_seq: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, max_seq, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch, self.max_seq = batch, max_seq
        self._rows = torch.arange(batch, device=device)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               kv_len: int):
        """Write k, v ([B, Hkv, T, D]) at `positions` ([B, T]); return views of the
        first `kv_len` slots: ([B, Hkv, kv_len, D], same)."""
        rows = self._rows.expand_as(positions)
        self.k[layer][rows, :, positions] = k.transpose(1, 2)
        self.v[layer][rows, :, positions] = v.transpose(1, 2)
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]

    def make_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[B, 1, T, kv_len] bool: a query at position p sees slots <= p."""
        slots = torch.arange(kv_len, device=positions.device)
        return (slots[None, None, :] <= positions[:, :, None]).unsqueeze(1)

    def attend(self, layer: int, q, k, v, positions, kv_len: int, mask):
        """Store k, v and attend over the first kv_len slots (the interface PagedKVCache shares)."""
        k, v = self.update(layer, k, v, positions, kv_len)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
