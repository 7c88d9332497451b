"""PyTorch paged decode attention and KV store (the CPU path; also works on CUDA tensors).

Decode: sequences are taken longest first and batched while they fit a memory budget and
are at least half as long as the chunk's longest (so padding wastes at most half the
work); each chunk gathers its blocks, converts them to float32 and attends with batched
float32 matmuls over all query heads of a KV head at once.
"""

from __future__ import annotations

import math

import torch

from rarefy.kv.quant import is_quantized, quantize

#: float32 elements of gathered K (or V) per chunk of sequences.
CHUNK_ELEMS = 1 << 24


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of x; fp8 on a CPU goes through exact integer bit moves into float16,
    several times faster than torch's element-wise fp8 conversion there."""
    if x.device.type == "cpu" and x.dtype == torch.float8_e5m2:
        return (x.view(torch.uint8).to(torch.int16) << 8).view(torch.float16).float()  # e5m2 = fp16's top byte
    if x.device.type == "cpu" and x.dtype == torch.float8_e4m3fn:
        b = x.view(torch.uint8).to(torch.int16)
        h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)  # sign; exponent and mantissa (bias 7) into fp16's fields
        return h.view(torch.float16).float() * 256.0  # 2**(15 - 7) fixes the bias (subnormals included)
    return x.float()


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, table: torch.Tensor, length: int) -> torch.Tensor:
    """[n, Hkv, length, D] float32 (dequantized) for the table rows `table` [n, nblk]."""
    n, nblk = table.shape
    _, hkv, bs, d = cache.shape
    x = _to_float(cache[table])  # [n, nblk, Hkv, BS, D]
    if scale is not None:
        x = x * scale[table].float()[..., None]
    return x.permute(0, 2, 1, 3, 4).reshape(n, hkv, nblk * bs, d)[:, :, :length]


def paged_decode_attention_torch(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype,
                                 sm_scale) -> torch.Tensor:
    """Same contract as ``paged_decode_attention`` (inputs already validated).

    Per chunk: K and V are gathered head-major (``[Hkv, n, blocks * BS, D]``, a view of one
    gather, no permute copy) and converted to float32; the per-token scales of int8/fp8
    caches are applied to the scores and probabilities (``(q . k) * s_k``, ``(p * s_v) @ v``)
    instead of to every value.
    """
    batch, num_heads, head_dim = q.shape
    num_blocks, hkv, bs, _ = k_cache.shape
    group = num_heads // hkv
    quant = is_quantized(kv_dtype)
    lens = [int(x) for x in seq_lens.tolist()]
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    qf = q.float().reshape(batch, hkv, group, head_dim).transpose(0, 1)  # [Hkv, B, G, D]
    kt, vt = k_cache.transpose(0, 1), v_cache.transpose(0, 1)            # [Hkv, NB, BS, D] views
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
        n, nblk = len(idx), math.ceil(top / bs)
        length = nblk * bs
        sel = torch.tensor(idx, device=q.device)
        table = block_tables[sel, :nblk].long().clamp(0, num_blocks - 1).reshape(-1)
        # kt[:, table], not kt.index_select(1, table): on this transposed view index_select
        # copies the whole cache first, so every layer's decode cost grew with the cache size
        k = _to_float(kt[:, table]).reshape(hkv, n, length, head_dim)
        v = _to_float(vt[:, table]).reshape(hkv, n, length, head_dim)
        s = torch.matmul(qf[:, sel], k.transpose(-1, -2))                # [Hkv, n, G, L]
        if quant:
            ks = k_scale.transpose(0, 1)[:, table].reshape(hkv, n, 1, length).float()
            s = s * ks
        s = s * sm_scale
        lens_t = torch.tensor([lens[b] for b in idx], device=q.device)
        pad = torch.arange(length, device=q.device)[None, :] >= lens_t[:, None]  # [n, L]
        s = s.masked_fill(pad[None, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1)
        if quant:
            vs = v_scale.transpose(0, 1)[:, table].reshape(hkv, n, 1, length).float()
            p = p * vs.masked_fill(pad[None, :, None, :], 0.0)
        lo = (min(lens[b] for b in idx) // bs) * bs  # before lo every position is a cached token
        if lo < length:  # the rest may be never-written memory (NaN): 0 * NaN must not reach the sum
            v[:, :, lo:] = v[:, :, lo:].masked_fill(pad[None, :, lo:, None], 0.0)
        o = torch.matmul(p, v)                                            # [Hkv, n, G, D]
        out[sel] = o.transpose(0, 1).reshape(n, num_heads, head_dim)
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
