"""PyTorch paged decode attention and KV store (the CPU path; also works on CUDA tensors).

Decode: sequences are taken longest first and batched while they fit a memory budget and
are at least half as long as the chunk's longest (so padding wastes at most half the
work); each chunk gathers its blocks (``k_cache[block_tables]``), dequantizes in float32,
and attends with batched float32 matmuls over all query heads of a KV head at once.
"""

from __future__ import annotations

import math

import torch

from rarefy.kv.quant import is_quantized, quantize

#: float32 elements of gathered K (or V) per chunk of sequences.
CHUNK_ELEMS = 1 << 24


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, table: torch.Tensor, length: int) -> torch.Tensor:
    """[n, Hkv, length, D] float32 for the table rows `table` [n, nblk]."""
    n, nblk = table.shape
    _, hkv, bs, d = cache.shape
    x = cache[table].float()  # [n, nblk, Hkv, BS, D]
    if scale is not None:
        x = x * scale[table].float()[..., None]
    return x.permute(0, 2, 1, 3, 4).reshape(n, hkv, nblk * bs, d)[:, :, :length]


def paged_decode_attention_torch(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype,
                                 sm_scale) -> torch.Tensor:
    """Same contract as ``paged_decode_attention`` (inputs already validated)."""
    batch, num_heads, head_dim = q.shape
    num_blocks, hkv, bs, _ = k_cache.shape
    group = num_heads // hkv
    quant = is_quantized(kv_dtype)
    ks, vs = (k_scale, v_scale) if quant else (None, None)
    lens = [int(x) for x in seq_lens.tolist()]
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    qf = q.float().reshape(batch, hkv, group, head_dim)
    order = sorted((b for b in range(batch) if lens[b] > 0), key=lambda b: -lens[b])
    i = 0
    while i < len(order):
        top = lens[order[i]]
        per_seq = hkv * top * head_dim
        j = i + 1
        while j < len(order) and (j - i + 1) * per_seq <= CHUNK_ELEMS and 2 * lens[order[j]] >= top:
            j += 1
        idx = order[i:j]
        i = j
        nblk = math.ceil(top / bs)
        sel = torch.tensor(idx, device=q.device)
        table = block_tables[sel, :nblk].long().clamp(0, num_blocks - 1)
        k = _gather(k_cache, ks, table, top)                        # [n, Hkv, L, D]
        v = _gather(v_cache, vs, table, top)
        s = torch.matmul(qf[sel], k.transpose(-1, -2)) * sm_scale    # [n, Hkv, G, L]
        lens_t = torch.tensor([lens[b] for b in idx], device=q.device)
        pad = torch.arange(top, device=q.device)[None, :] >= lens_t[:, None]
        s = s.masked_fill(pad[:, None, None, :], float("-inf"))
        v = v.masked_fill(pad[:, None, :, None], 0.0)  # the tail of the last block is never-written memory
        o = torch.matmul(torch.softmax(s, dim=-1), v)                # [n, Hkv, G, D]
        out[sel] = o.reshape(len(idx), num_heads, head_dim)
    return out.to(q.dtype)


def store_kv_torch(k, v, slot_mapping, k_cache, v_cache, k_scale, v_scale, kv_dtype: str) -> None:
    """Quantize with rarefy.kv.quant.quantize and scatter to the slots (negative slots skipped)."""
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        k, v, slots = k[keep], v[keep], slots[keep]
    if slots.numel() == 0:
        return
    bs = k_cache.shape[2]
    blk, off = slots // bs, slots % bs
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        qx, sx = quantize(x, kv_dtype)
        cache[blk, :, off] = qx
        if sx is not None:
            scale[blk, :, off] = sx
