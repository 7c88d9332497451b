"""Float64 reference for paged decode attention: naive, one sequence and head at a time.

Reads the paged cache token by token through the block table (docs/kv-cache.md) and
dequantizes with :func:`rarefy.kv.quant.dequantize`, so it shares no code with the kernels
beyond the quantization rules.
"""

from __future__ import annotations

import math

import torch

from rarefy.kv.quant import dequantize, is_quantized


def gather_sequence(cache: torch.Tensor, scale: torch.Tensor | None, block_table: torch.Tensor, seq_len: int,
                    kv_dtype: str) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence: [num_kv_heads, seq_len, head_dim] float64."""
    blocks = block_table.tolist()
    bs = cache.shape[2]
    rows = []
    for j in range(seq_len):
        blk, off = blocks[j // bs], j % bs
        s = scale[blk, :, off] if is_quantized(kv_dtype) else None
        rows.append(dequantize(cache[blk, :, off, :], s, torch.float64))
    if not rows:
        return torch.zeros(cache.shape[1], 0, cache.shape[3], dtype=torch.float64)
    return torch.stack(rows, dim=1)


def paged_decode_attention_ref(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype,
                               sm_scale=None) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v over each sequence's cached tokens, in float64.

    q: [B, num_heads, D]; returns [B, num_heads, D] float64 on the CPU (zeros for a
    sequence of length 0).
    """
    q = q.detach().cpu().double()
    k_cache, v_cache = k_cache.detach().cpu(), v_cache.detach().cpu()
    k_scale = None if k_scale is None else k_scale.detach().cpu()
    v_scale = None if v_scale is None else v_scale.detach().cpu()
    block_tables, seq_lens = block_tables.cpu(), seq_lens.cpu()
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        k = gather_sequence(k_cache, k_scale, block_tables[b], n, kv_dtype)
        v = gather_sequence(v_cache, v_scale, block_tables[b], n, kv_dtype)
        for h in range(num_heads):
            kh = h // group
            w = torch.softmax((k[kh] @ q[b, h]) * sm_scale, dim=0)
            out[b, h] = w @ v[kh]
    return out
