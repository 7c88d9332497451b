"""The CPU (torch) paged decode attention reads only the blocks it attends to: its cost does
not grow with the size of the cache (a transposed index_select once copied the whole cache
per layer per step, which made a 32k-token server cache ~5x slower to decode from)."""

from __future__ import annotations

import time

import pytest
import torch

from rarefy.kernels.paged_attention.torch_decode import paged_decode_attention_torch
from rarefy.kv.quant import quantize, storage_dtype


def _case(num_blocks: int, kv_dtype: str, seed: int = 0):
    hkv, bs, d, heads, batch, nblk = 2, 16, 64, 4, 3, 3
    g = torch.Generator().manual_seed(seed)
    store = storage_dtype(kv_dtype)
    k = torch.zeros(num_blocks, hkv, bs, d, dtype=store)
    v = torch.zeros(num_blocks, hkv, bs, d, dtype=store)
    ks = vs = None
    if store not in (torch.float32, torch.bfloat16, torch.float16):
        ks = torch.ones(num_blocks, hkv, bs)
        vs = torch.ones(num_blocks, hkv, bs)
    used = torch.arange(batch * nblk).reshape(batch, nblk) * 7 % num_blocks  # scattered blocks
    for b in used.reshape(-1).tolist():
        for cache, scale in ((k, ks), (v, vs)):
            x = torch.randn(hkv * bs, d, generator=g)
            qx, sx = quantize(x, kv_dtype)
            cache[b] = qx.reshape(hkv, bs, d)
            if scale is not None:
                scale[b] = sx.reshape(hkv, bs)
    q = torch.randn(batch, heads, d, generator=g)
    lens = torch.tensor([nblk * bs, nblk * bs - 5, bs + 1], dtype=torch.int32)
    return q, k, v, ks, vs, used.to(torch.int32), lens


def _time(args, kv_dtype, reps=5):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        paged_decode_attention_torch(*args, kv_dtype, 0.125)
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.parametrize("kv_dtype", ["fp32", "int8"])
def test_decode_cost_does_not_grow_with_the_cache(kv_dtype):
    small = _case(64, kv_dtype)
    big = _case(16384, kv_dtype)  # 256x the blocks; the same ones in use
    out_small = paged_decode_attention_torch(*small, kv_dtype, 0.125)
    out_big = paged_decode_attention_torch(*big, kv_dtype, 0.125)
    torch.testing.assert_close(out_small, out_big, rtol=0, atol=0)
    # copying the whole big cache (2 x 128 MiB) per call costs >50x the small call; one
    # thread, best of several: two threads on a busy 2-core machine time nothing reliably
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_small, t_big = _time(small, kv_dtype, 7), _time(big, kv_dtype, 7)
    finally:
        torch.set_num_threads(threads)
    assert t_big < 10 * t_small + 3e-3, (t_big, t_small)
