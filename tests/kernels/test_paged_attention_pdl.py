"""Programmatic dependent launch (PDL) of the paged decode kernels (GPU only).

With PDL the decode kernel may start while the store kernel before it still runs; it must
wait (``gdc_wait``) before it reads the cache. These tests make a missing or misplaced wait
visible: each step stores a new token whose key dominates the softmax, then decodes at once,
so an output computed before the store landed would miss the new value by far more than the
tolerance. Both eager launches and a captured CUDA graph (store + decode replayed with new
inputs copied in place) are checked against the float64 reference on the same cache, with
PDL on and off.
"""

from __future__ import annotations

import pytest
import torch

from rarefy.kernels.paged_attention import paged_decode_attention_ref, store_kv
from rarefy.kv.quant import storage_dtype

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("PDL needs a GPU", allow_module_level=True)

HQ, HKV, D, BS = 32, 8, 128, 16


def _cache(num_blocks, kv_dtype, g):
    sd = storage_dtype(kv_dtype)
    shape = (num_blocks, HKV, BS, D)
    if sd == torch.int8:
        kc = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        vc = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    else:
        kc = torch.randn(shape, generator=g).to(sd)
        vc = torch.randn(shape, generator=g).to(sd)
    kc, vc = kc.cuda(), vc.cuda()
    if sd.itemsize == 1:  # 8-bit V is stored dim-major, as the paged cache keeps it
        vc = vc.transpose(2, 3).contiguous().transpose(2, 3)
    if kv_dtype in ("bf16", "fp16", "fp32"):
        return kc, vc, None, None
    ks = (torch.rand((num_blocks, HKV, BS), generator=g) * 0.02 + 0.01).half().cuda()
    vs = (torch.rand((num_blocks, HKV, BS), generator=g) * 0.02 + 0.01).half().cuda()
    return kc, vc, ks, vs


def _step_inputs(q, g, batch):
    """A new K that points along each group's mean query (so it dominates the softmax) and a V
    far from the cache's."""
    qg = q.float().view(batch, HKV, HQ // HKV, D).mean(2)
    k = 40.0 * qg / qg.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    v = torch.randn((batch, HKV, D), generator=g).cuda() * 3.0 + 5.0
    return k.to(q.dtype), v.to(q.dtype)


def _check(y, q, kc, vc, ks, vs, bt, sl, kv_dtype, tol):
    ref = paged_decode_attention_ref(q.cpu(), kc.cpu(), vc.cpu(), None if ks is None else ks.cpu(),
                                     None if vs is None else vs.cpu(), bt.cpu(), sl.cpu(), kv_dtype)
    assert torch.isfinite(y).all()
    err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("pdl", [True, False])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("prefetch", [0, 4])
def test_decode_sees_the_token_stored_just_before(kv_dtype, pdl, graph, prefetch):
    # prefetch: the first pages asked of L2 before the wait, while the store may still write them
    from rarefy.kernels.paged_attention.triton_decode import make_plan, paged_decode_attention_triton, v_is_dim_major
    g = torch.Generator().manual_seed(5)
    batch, start_len, steps = 3, 3000, 6
    per_seq = (start_len + steps) // BS + 1
    num_blocks = batch * per_seq + 2
    kc, vc, ks, vs = _cache(num_blocks, kv_dtype, g)
    bt = torch.randperm(num_blocks, generator=g)[:batch * per_seq].view(batch, per_seq).int().cuda()
    sl = torch.full((batch,), start_len, dtype=torch.int32, device="cuda")
    q = torch.randn((batch, HQ, D), generator=g).bfloat16().cuda()
    k_new = torch.empty((batch, HKV, D), dtype=q.dtype, device="cuda")
    v_new = torch.empty_like(k_new)
    slots = torch.empty((batch,), dtype=torch.int64, device="cuda")
    cap = per_seq * BS
    plan = make_plan(q, kc, bt, kv_dtype, max_seq_len=cap, v_dim_major=v_is_dim_major(vc), prefetch_pages=prefetch)

    def step():
        store_kv(k_new, v_new, slots, kc, vc, ks, vs, kv_dtype)
        return paged_decode_attention_triton(q, kc, vc, ks, vs, bt, sl, kv_dtype, D ** -0.5, plan=plan, pdl=pdl)

    def load(t):
        k, v = _step_inputs(q, g, batch)
        k_new.copy_(k)
        v_new.copy_(v)
        pos = start_len + t
        slots.copy_((bt[:, pos // BS].long() * BS + pos % BS))
        sl.fill_(pos + 1)

    load(0)
    out = step()  # compiles; also step 0
    torch.cuda.synchronize()
    _check(out, q, kc, vc, ks, vs, bt, sl, kv_dtype, 2e-2)
    if graph:
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            out = step()
    for t in range(1, steps):
        load(t)
        if graph:
            gr.replay()
        else:
            out = step()
        torch.cuda.synchronize()
        _check(out, q, kc, vc, ks, vs, bt, sl, kv_dtype, 2e-2)
