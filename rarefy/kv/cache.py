"""A preallocated KV cache with static shapes (CUDA-graph friendly).

Each sequence b owns row b. A token at position p is written to slot p, so a
sequence's positions are its slot indices and no left padding is needed:
prompts of different lengths are right-padded, and the padding slots are
overwritten by decoded tokens before any query can attend to them (a query at
position p only sees slots <= p, and slot p is written in the same step).

On a GPU (bf16 / fp16, slots a multiple of 16) the cache is stored as pages,
``[batch, slots / 16, kv_heads, 16, head_dim]``: row b's pages are blocks
``b * slots/16 + j`` of a paged cache, so a decode step (one query per row) runs
rarefy's paged decode kernel over exactly the row's ``p + 1`` keys. Torch's SDPA
over the whole slot bucket with a mask took twice as long on the H100 (11.5
against 5.5 µs a layer at 256 slots, docs/results/gpu-decode-h100.md). Prefill
(several queries) reads a contiguous copy of the first ``kv_len`` slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


PAGE = 16  # tokens per page of the paged layout (the paged decode kernel's block)


class StaticKVCache:
    # False: always the [batch, heads, slots, dim] layout and SDPA (A/B runs, benchmarks/gpu_lowbit_decode.py)
    PAGED_DECODE = True

    def __init__(self, num_layers: int, batch: int, max_seq: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str, paged: bool | None = None):
        if paged is None:
            paged = (self.PAGED_DECODE and torch.device(device).type == "cuda" and max_seq % PAGE == 0
                     and dtype in (torch.bfloat16, torch.float16))
        self.paged = bool(paged)
        if self.paged:
            if max_seq % PAGE:
                raise ValueError(f"a paged static cache needs slots in multiples of {PAGE}, got {max_seq}")
            shape = (batch, max_seq // PAGE, num_kv_heads, PAGE, head_dim)
            pages = max_seq // PAGE
            self.block_tables = (torch.arange(batch, device=device, dtype=torch.int32)[:, None] * pages
                                 + torch.arange(pages, device=device, dtype=torch.int32)[None, :])
        else:
            shape = (batch, num_kv_heads, max_seq, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch, self.max_seq, self.num_kv_heads, self.head_dim = batch, max_seq, num_kv_heads, head_dim
        self._rows = torch.arange(batch, device=device)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               kv_len: int):
        """Write k, v ([B, Hkv, T, D]) at `positions` ([B, T]); return the first `kv_len`
        slots as ([B, Hkv, kv_len, D], same): views, or copies from the paged layout."""
        if self.paged:
            self._store_pages(layer, k, v, positions)
            return self._slots(self.k[layer], kv_len), self._slots(self.v[layer], kv_len)
        rows = self._rows.expand_as(positions)
        self.k[layer][rows, :, positions] = k.transpose(1, 2)
        self.v[layer][rows, :, positions] = v.transpose(1, 2)
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]

    def _slots(self, pages: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[B, P, Hkv, PAGE, D] pages -> [B, Hkv, kv_len, D] (a copy)."""
        n = -(-kv_len // PAGE)
        b, _, h, _, d = pages.shape
        return pages[:, :n].permute(0, 2, 1, 3, 4).reshape(b, h, n * PAGE, d)[:, :, :kv_len]

    def make_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[B, 1, T, kv_len] bool: a query at position p sees slots <= p."""
        slots = torch.arange(kv_len, device=positions.device)
        return (slots[None, None, :] <= positions[:, :, None]).unsqueeze(1)

    def attend(self, layer: int, q, k, v, positions, kv_len: int, mask):
        """Store k, v and attend over the first kv_len slots (the interface PagedKVCache shares).
        Paged layout, one query per row: the paged decode kernel over the row's p + 1 keys."""
        if self.paged and q.shape[2] == 1:
            self._store_pages(layer, k, v, positions)
            from rarefy.kernels.paged_attention import paged_decode_attention

            n = self.k[layer].shape[0] * self.k[layer].shape[1]
            kc = self.k[layer].view(n, self.num_kv_heads, PAGE, self.head_dim)
            vc = self.v[layer].view(n, self.num_kv_heads, PAGE, self.head_dim)
            seq_lens = (positions[:, 0] + 1).to(torch.int32)
            kv_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[kc.dtype]
            out = paged_decode_attention(q[:, :, 0], kc, vc, None, None, self.block_tables, seq_lens, kv_dtype,
                                         max_seq_len=kv_len)
            return out.unsqueeze(2)
        k, v = self.update(layer, k, v, positions, kv_len)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def _store_pages(self, layer: int, k, v, positions) -> None:
        # advanced indices split by a slice: the indexed dims come first, [B, T, Hkv, D]
        rows = self._rows.expand_as(positions)
        page, off = positions // PAGE, positions % PAGE
        self.k[layer][rows, page, :, off] = k.transpose(1, 2)
        self.v[layer][rows, page, :, off] = v.transpose(1, 2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
