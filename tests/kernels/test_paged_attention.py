"""Paged KV-cache kernels: the Triton decode/store kernels (under the interpreter on a CPU),
the torch path, the float64 reference, dense SDPA, the dispatcher's errors, and the
`rarefy bench attention` command on the CPU.

Interpreter limits (these cases run on a GPU instead, marked `gpu`):
- ``tl.dot`` in bf16 is computed wrongly by the Triton 3.6 interpreter, so the bf16 dot
  path (bf16 cache, or a bf16 query on an int8/fp8 cache) is only tested with the FMA
  variant on a CPU.
- the interpreter flushes fp8 subnormals to zero when it casts; the store test allows
  exactly that difference on a CPU and none on a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rarefy.errors import RarefyError  # noqa: E402
from rarefy.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_ref,
    plan_decode,
    store_kv,
)
from rarefy.kernels.paged_attention.torch_decode import paged_decode_attention_torch, store_kv_torch  # noqa: E402
from rarefy.kv.quant import KV_DTYPES, is_quantized, roundtrip, storage_dtype  # noqa: E402
from triton_interp import CUDA, kernel_module  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
QUANT = ("int8", "fp8_e4m3", "fp8_e5m2")


@pytest.fixture(scope="module")
def dec():
    return kernel_module("rarefy.kernels.paged_attention.triton_decode", "_decode_kernel")


@pytest.fixture(scope="module")
def st():
    return kernel_module("rarefy.kernels.paged_attention.triton_store", "_store_kernel")


# ----------------------------------------------------------------------------- helpers


def poison_cache(num_blocks, hkv, bs, d, kv_dtype, device="cpu"):
    """A cache whose never-written slots read as NaN (int8: 127 with NaN scales)."""
    sd = storage_dtype(kv_dtype)
    if sd == torch.int8:
        kc = torch.full((num_blocks, hkv, bs, d), 127, dtype=sd, device=device)
    else:
        # made on the CPU and moved: a CUDA fp32 -> half cast gives NaN another bit pattern,
        # and the store test compares never-written slots bit for bit
        kc = torch.full((num_blocks, hkv, bs, d), float("nan")).to(sd).to(device)
    ks = torch.full((num_blocks, hkv, bs), float("nan"), dtype=torch.float16, device=device) \
        if is_quantized(kv_dtype) else None
    return kc, kc.clone(), ks, None if ks is None else ks.clone()


def make_case(lens, hq, hkv, d, bs, kv_dtype, seed=0, q_dtype=torch.float32, extra_blocks=3):
    """Random K/V for every cached token, stored (torch path) into shuffled blocks; block-table
    padding entries are random valid ids. Returns a dict, tensors on the CPU."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lens)
    nblk = [math.ceil(n / bs) for n in lens]
    max_blocks = max(nblk + [1]) + 1
    num_blocks = sum(nblk) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.randint(0, num_blocks, (batch, max_blocks), generator=g, dtype=torch.int32)
    slots, i = [], 0
    for b, n in enumerate(lens):
        for j in range(nblk[b]):
            bt[b, j] = perm[i]
            i += 1
        slots += [int(bt[b, t // bs]) * bs + t % bs for t in range(n)]
    kc, vc, ks, vs = poison_cache(num_blocks, hkv, bs, d, kv_dtype)
    n = len(slots)
    k = torch.randn(n, hkv, d, generator=g) * (0.5 + 2 * torch.rand(n, hkv, 1, generator=g))
    v = torch.randn(n, hkv, d, generator=g)
    store_kv_torch(k, v, torch.tensor(slots, dtype=torch.int64), kc, vc, ks, vs, kv_dtype)
    q = torch.randn(batch, hq, d, generator=g).to(q_dtype)
    return dict(q=q, k_cache=kc, v_cache=vc, k_scale=ks, v_scale=vs, block_tables=bt,
                seq_lens=torch.tensor(lens, dtype=torch.int32), k=k, v=v, lens=list(lens), kv_dtype=kv_dtype)


ARGS = ("q", "k_cache", "v_cache", "k_scale", "v_scale", "block_tables", "seq_lens", "kv_dtype")


def args(c, device=DEV):
    return [c[a].to(device) if isinstance(c[a], torch.Tensor) else c[a] for a in ARGS]


def ref_of(c):
    return paged_decode_attention_ref(*args(c, "cpu"))


def sdpa_of(c, sm_scale=None):
    """Dense torch SDPA (float32) on the *unquantized* keys/values, one sequence at a time."""
    q, lens = c["q"].float(), c["lens"]
    hq, hkv = q.shape[1], c["k"].shape[1]
    out = torch.zeros_like(q)
    start = 0
    for b, n in enumerate(lens):
        if n:
            k = c["k"][start:start + n].transpose(0, 1)[None]  # [1, Hkv, n, D]
            v = c["v"][start:start + n].transpose(0, 1)[None]
            out[b] = F.scaled_dot_product_attention(q[b][None, :, None, :], k, v, scale=sm_scale,
                                                    enable_gqa=hq != hkv)[0, :, 0]
        start += n
    return out.double()


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "NaN/inf in the output"
    y = y.double().cpu()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-12)).item()


#: relative error (norm) of the kernel output against the float64 reference on the same cache
OUT_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
#: relative error against SDPA on the unquantized keys/values (fp32 query)
SDPA_TOL = {"fp32": 2e-6, "bf16": 1e-2, "fp16": 2e-3, "int8": 2e-2, "fp8_e4m3": 8e-2, "fp8_e5m2": 1.5e-1}

# (lens, hq, hkv, head_dim, block_size): GQA 4/3/1, head dims 64/128/32, blocks 8/16/32/64,
# lengths 0, 1, not multiples of the block, one long.
CASES = [
    ([37, 1, 70, 0], 8, 2, 64, 16),
    ([5, 130, 17], 3, 1, 128, 8),
    ([33, 9], 4, 4, 64, 32),
    ([150, 64], 8, 2, 32, 64),
]


# ----------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_torch_path_matches_reference_and_sdpa(kv_dtype, case):
    lens, hq, hkv, d, bs = CASES[case]
    c = make_case(lens, hq, hkv, d, bs, kv_dtype, seed=case)
    ref = ref_of(c)
    y = paged_decode_attention(*args(c, "cpu"))
    assert y.shape == c["q"].shape and y.dtype == c["q"].dtype
    assert rel_err(y, ref) < 2e-6
    assert rel_err(y, sdpa_of(c)) < SDPA_TOL[kv_dtype]
    zero = [b for b, n in enumerate(lens) if n == 0]
    assert all(float(y[b].abs().max()) == 0.0 for b in zero)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8_e4m3"])
def test_torch_path_half_queries(q_dtype, kv_dtype):
    c = make_case([20, 77, 3], 8, 2, 64, 16, kv_dtype, seed=5, q_dtype=q_dtype)
    y = paged_decode_attention(*args(c, "cpu"), sm_scale=0.2)
    assert y.dtype == q_dtype
    assert rel_err(y, paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.2)) < OUT_TOL[q_dtype]


def test_torch_path_chunks_sequences(monkeypatch):
    # A tiny chunk budget forces one sequence per chunk; lengths far apart split chunks too.
    import rarefy.kernels.paged_attention.torch_decode as td
    c = make_case([3, 90, 40, 41, 1], 6, 3, 32, 8, "int8", seed=9)
    ref = ref_of(c)
    monkeypatch.setattr(td, "CHUNK_ELEMS", 1)
    assert rel_err(paged_decode_attention_torch(*args(c, "cpu"), 1 / math.sqrt(32)), ref) < 2e-6


# ----------------------------------------------------------------------------- Triton decode


def _dot_ok_in_interpreter(q_dtype, kv_dtype, dec):
    return CUDA or dec.dot_code(q_dtype, kv_dtype) != dec._DOT_BF16


def _variants(c, dec, combos=((True, 1, True), (True, 3, False), (False, 2, True))):
    """(label, plan) pairs: (tl.dot or FMA, splits, fused reduction) with 16-token tiles (many
    iterations), then the default plan."""
    q, kc, bt, kvd = c["q"], c["k_cache"], c["block_tables"], c["kv_dtype"]
    out = []
    for use_dot, splits, fused in combos:
        if use_dot and not _dot_ok_in_interpreter(q.dtype, kvd, dec):
            continue
        out.append((f"dot={use_dot} splits={splits} fused={fused}",
                    dec.make_plan(q, kc, bt, kvd, num_splits=splits, use_dot=use_dot, tile_n=16,
                                  fused_reduce=fused)))
    default = dec.make_plan(q, kc, bt, kvd, max_seq_len=max(c["lens"]))  # what the dispatcher launches
    if not default.use_dot or _dot_ok_in_interpreter(q.dtype, kvd, dec):
        out.append(("default", default))
    return out


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("case", [0, 1, 2])
def test_triton_decode_matches_reference(dec, kv_dtype, case):
    lens, hq, hkv, d, bs = CASES[case]
    c = make_case(lens, hq, hkv, d, bs, kv_dtype, seed=10 + case)
    ref, sdpa = ref_of(c), sdpa_of(c)
    for label, plan in _variants(c, dec):
        y = dec.paged_decode_attention_triton(*args(c), 1 / math.sqrt(d), plan=plan)
        assert y.shape == c["q"].shape and y.dtype == c["q"].dtype
        assert rel_err(y, ref) < OUT_TOL[torch.float32], label
        assert rel_err(y, sdpa) < SDPA_TOL[kv_dtype], label
        assert all(float(y[b].abs().max()) == 0.0 for b, n in enumerate(lens) if n == 0), label


@pytest.mark.parametrize("q_dtype,kv_dtype", [(torch.float16, "fp16"), (torch.float16, "int8"),
                                              (torch.float16, "fp8_e5m2"), (torch.bfloat16, "bf16"),
                                              (torch.bfloat16, "fp8_e4m3"), (torch.float16, "bf16")])
def test_triton_decode_half_queries(dec, q_dtype, kv_dtype):
    c = make_case([37, 1, 70, 0], 8, 2, 64, 16, kv_dtype, seed=3, q_dtype=q_dtype)
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.1)
    for label, plan in _variants(c, dec, combos=((True, 2, True), (False, 1, True))):
        y = dec.paged_decode_attention_triton(*args(c), 0.1, plan=plan)
        assert y.dtype == q_dtype
        assert rel_err(y, ref) < OUT_TOL[q_dtype], label


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_triton_decode_quantized_tile_conversions(dec, kv_dtype, q_dtype):
    """Every way an int8/fp8 tile reaches the tensor cores (plan.dot_dtype / convert / qk_int8)
    against the float64 reference; on a GPU "bits" runs the inline-PTX conversions, in the
    interpreter their plain equivalents (int8 exact, e4m3 scaled by 1/256 and back). Values
    span 1e-3..1e2 per token so the fp16 P path meets small and large scales in one tile."""
    c = make_case([45, 1, 130, 0, 17], 8, 2, 64, 16, kv_dtype, seed=21, q_dtype=q_dtype)
    g = torch.Generator().manual_seed(5)
    for scale in (c["k_scale"], c["v_scale"]):  # per-token scales over five decades
        scale.mul_(torch.logspace(-3, 2, scale.numel(), dtype=torch.float32)[torch.randperm(scale.numel(), generator=g)]
                   .view(scale.shape).to(scale.device).to(scale.dtype))
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.05)
    kw = [dict(dot_dtype="fp16", convert="plain"), dict()]
    if CUDA:
        kw.append(dict(dot_dtype="bf16", convert="plain"))
    if kv_dtype != "fp8_e5m2":
        kw.append(dict(dot_dtype="fp16", convert="bits"))
    if kv_dtype == "int8":
        kw.append(dict(qk_int8=True))
    for o in kw:
        plan = dec.make_plan(c["q"], c["k_cache"], c["block_tables"], kv_dtype, num_splits=2, tile_n=32, **o)
        y = dec.paged_decode_attention_triton(*args(c), 0.05, plan=plan)
        assert bool(torch.isfinite(y).all()), o
        tol = 1e-2 if o.get("qk_int8") else OUT_TOL[torch.bfloat16 if o.get("dot_dtype") == "bf16" else q_dtype]
        assert rel_err(y, ref) < tol, (o, rel_err(y, ref))


def test_triton_decode_short_sequences_leave_splits_empty(dec):
    # max_seq_len far above the real lengths: most splits of every sequence have no tokens
    # (LSE -inf), one sequence is empty, and the reduction must still be exact.
    c = make_case([1, 2, 0, 17], 4, 2, 32, 8, "fp16", seed=4, extra_blocks=20)
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.3)
    counters = torch.zeros(64, dtype=torch.int32, device=DEV)
    for fused, launches in ((True, 2), (False, 1)):  # fused twice: the counters must be re-armed
        plan = dec.make_plan(c["q"], c["k_cache"], c["block_tables"], "fp16", num_splits=7, tile_n=16,
                             max_seq_len=200, fused_reduce=fused)
        for _ in range(launches):
            y = dec.paged_decode_attention_triton(*args(c), 0.3, plan=plan, counters=counters)
            assert rel_err(y, ref) < 2e-6
            assert float(y[2].abs().max()) == 0.0
            assert int(counters.abs().sum()) == 0


def test_triton_decode_plan_too_small_is_still_right(dec):
    # The last split takes everything past num_splits * tokens_per_split.
    c = make_case([120, 70], 4, 2, 32, 16, "int8", seed=6)
    plan = dec.make_plan(c["q"], c["k_cache"], c["block_tables"], "int8", num_splits=2, tile_n=16, max_seq_len=20)
    assert plan.num_splits * plan.tokens_per_split < 120
    y = dec.paged_decode_attention_triton(*args(c), 0.25, plan=plan)
    assert rel_err(y, paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.25)) < 2e-6


# ----------------------------------------------------------------------------- store


def _store_inputs(n, hkv, d, x_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mag = torch.logspace(-5, 3, n)[:, None, None]  # tiny (scale clamp, subnormals) .. large
    k = (torch.randn(n, hkv, d, generator=g) * mag).to(x_dtype)
    v = torch.randn(n, hkv, d, generator=g).to(x_dtype)
    k[2, 0] = 0.0
    k[3, 1, 5] = 1e4  # one outlier
    return k, v


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)


_STORE_CASES = [(kvd, x) for kvd in QUANT for x in (torch.float32, torch.bfloat16, torch.float16)] + [
    ("bf16", torch.float32), ("bf16", torch.float16), ("fp16", torch.bfloat16), ("fp32", torch.bfloat16)]


@pytest.mark.parametrize("kv_dtype,x_dtype", _STORE_CASES)
def test_triton_store_bit_identical(st, kv_dtype, x_dtype):
    n, hkv, d, bs, nb = 14, 2, 64, 16, 2
    k, v = _store_inputs(n, hkv, d, x_dtype, seed=1)
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(2))[:n]
    slots[7] = -1  # padding: skipped
    want = [poison_cache(nb, hkv, bs, d, kv_dtype) for _ in range(2)]
    store_kv_torch(k, v, slots, *want[0], kv_dtype)
    got = poison_cache(nb, hkv, bs, d, kv_dtype, DEV)
    st.store_kv_triton(k.to(DEV), v.to(DEV), slots.to(DEV), *got, kv_dtype)
    for w, g in zip(want[0], got):
        if w is None:
            continue
        g = g.cpu()
        same = _bits(w) == _bits(g)
        if not CUDA and kv_dtype.startswith("fp8"):
            # the interpreter flushes fp8 subnormals to zero on its final cast
            tiny = 2.0 ** (-6 if kv_dtype == "fp8_e4m3" else -14)
            same |= (w.float().abs() < tiny) & (g.float() == 0)
        assert bool(same.all()), f"{int((~same).sum())} stored values differ"


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_store_round_trip(kv_dtype):
    # store_kv (the dispatcher: torch on a CPU, Triton on a GPU), then read the slots back.
    n, hkv, d, bs, nb = 10, 3, 32, 8, 3
    k, v = _store_inputs(n, hkv, d, torch.float32, seed=3)
    slots = torch.tensor([0, 9, 8, 23, 1, 2, 12, 13, 14, 20])
    kc, vc, ks, vs = poison_cache(nb, hkv, bs, d, kv_dtype, DEV)
    store_kv(k.to(DEV), v.to(DEV), slots.to(DEV), kc, vc, ks, vs, kv_dtype)
    blk, off = slots // bs, slots % bs
    for x, c, s in ((k, kc, ks), (v, vc, vs)):
        got = c.cpu()[blk, :, off].float()
        if s is not None:
            got = got * s.cpu()[blk, :, off].float()[..., None]
        assert torch.equal(got, roundtrip(x, kv_dtype).float())


def test_store_then_decode_end_to_end():
    c = make_case([12, 30], 4, 2, 32, 8, "int8", seed=8)
    kc, vc, ks, vs = poison_cache(c["k_cache"].shape[0], 2, 8, 32, "int8", DEV)
    slots = []
    for b, n in enumerate(c["lens"]):
        slots += [int(c["block_tables"][b, t // 8]) * 8 + t % 8 for t in range(n)]
    store_kv(c["k"].to(DEV), c["v"].to(DEV), torch.tensor(slots, device=DEV), kc, vc, ks, vs, "int8")
    y = paged_decode_attention(c["q"].to(DEV), kc, vc, ks, vs, c["block_tables"].to(DEV), c["seq_lens"].to(DEV), "int8")
    assert rel_err(y, ref_of(c)) < 1e-5


def test_pdl_request_is_ignored_where_unavailable(dec):
    """pdl=True asks for programmatic dependent launch; where the device has none (the
    interpreter, pre-Hopper GPUs) the kernels launch plainly and give the same result."""
    from rarefy.kernels.paged_attention.triton_decode import paged_decode_attention_triton, pdl_available
    if CUDA and pdl_available(torch.device("cuda")):
        pytest.skip("this device has PDL (tests/kernels/test_paged_attention_pdl.py covers it)")
    c = make_case([40, 7], 8, 2, 32, 8, "int8", seed=31)
    a = args(c)
    y = paged_decode_attention_triton(*a, 32 ** -0.5, pdl=True, num_splits=3)
    assert torch.equal(y, paged_decode_attention_triton(*a, 32 ** -0.5, pdl=False, num_splits=3))
    assert rel_err(y, ref_of(c)) < 1e-5


# ----------------------------------------------------------------------------- plan


def test_plan_shapes():
    p = plan_decode(1, 32768, 32, 8, 128, "bf16", 16, 132)
    assert p.grid[:2] == (1, 8) and p.grid[2] == p.num_splits > 1
    assert p.num_splits * p.tokens_per_split >= 32768 and p.tokens_per_split % p.tile_n == 0
    assert not p.fused_reduce and p.reduce_grid == (1, 32) and p.use_dot and p.group == 4 and p.group_pad == 16
    assert plan_decode(1, 32768, 32, 8, 128, "bf16", 16, 132, fused_reduce=True).reduce_grid is None
    assert p.programs >= 2 * 132 * 0.9 and p.smem_bytes > 0 and p.occupancy >= 1
    p = plan_decode(32, 4096, 32, 8, 128, "bf16", 16, 132)
    assert p.programs >= 132
    p = plan_decode(2, 100, 8, 8, 64, "fp8_e4m3", 16, 132, num_splits=3)
    assert p.num_splits == 3 and p.use_dot and p.group_pad == 16 and p.workspace_bytes == 2 * 8 * 3 * 65 * 4
    p = plan_decode(2, 100, 8, 8, 64, "fp8_e4m3", 16, 132, use_dot=False)
    assert not p.use_dot and p.group_pad == 1
    assert plan_decode(1, 4096, 32, 8, 128, "bf16", 16, 132, q_dtype="fp32").tile_n == 16
    with pytest.raises(RarefyError):
        plan_decode(1, 10, 64, 4, 64, "bf16", 16, 132, use_dot=False)  # FMA takes groups <= 8
    for bad in (dict(num_kv_heads=3), dict(head_dim=96), dict(head_dim=512), dict(batch=0)):
        kw = dict(batch=1, max_seq_len=10, num_heads=8, num_kv_heads=2, head_dim=64, kv_dtype="bf16",
                  block_size=16, sm_count=132)
        kw.update(bad)
        with pytest.raises(RarefyError):
            plan_decode(**kw)
    with pytest.raises(RarefyError):
        plan_decode(1, 10, 8, 2, 64, "fp4", 16, 132)


# ----------------------------------------------------------------------------- errors


def test_bad_input_errors():
    c = make_case([10, 3], 4, 2, 32, 8, "int8", seed=1)
    a = dict(zip(ARGS, args(c, "cpu")))

    def call(**kw):
        d = dict(a)
        d.update(kw)
        return paged_decode_attention(*[d[k] for k in ARGS])

    call()  # fine
    bad = [
        dict(q=a["q"][0]),                                   # not 3-D
        dict(q=a["q"].to(torch.int32)),                      # dtype
        dict(q=torch.randn(2, 4, 16)),                       # head_dim mismatch
        dict(q=torch.randn(2, 3, 32)),                       # 3 heads over 2 KV heads
        dict(k_cache=a["k_cache"].float()),                  # storage dtype
        dict(v_cache=a["v_cache"][:, :1].contiguous()),      # K/V shapes differ
        dict(k_scale=None),                                  # missing scale
        dict(v_scale=a["v_scale"].float()),                  # scale dtype
        dict(block_tables=a["block_tables"][:1]),            # batch mismatch
        dict(block_tables=a["block_tables"].float()),        # table dtype
        dict(seq_lens=torch.tensor([10, 300], dtype=torch.int32)),  # longer than the table
        dict(seq_lens=torch.tensor([-1, 3], dtype=torch.int32)),    # negative
        dict(kv_dtype="fp4"),
    ]
    for kw in bad:
        with pytest.raises(RarefyError):
            call(**kw)
    with pytest.raises(RarefyError):
        paged_decode_attention(*args(c, "cpu"), num_splits=0)
    kc, vc, ks, vs = poison_cache(2, 2, 8, 32, "fp16")
    k = torch.randn(3, 2, 32)
    with pytest.raises(RarefyError):
        store_kv(k, k, torch.tensor([0, 1, 99]), kc, vc, ks, vs, "fp16")  # slot past the cache
    with pytest.raises(RarefyError):
        store_kv(k, k[:, :1], torch.tensor([0, 1, 2]), kc, vc, ks, vs, "fp16")
    with pytest.raises(RarefyError):
        store_kv(k, k, torch.tensor([0, 1]), kc, vc, ks, vs, "fp16")
    with pytest.raises(RarefyError):
        store_kv(k, k, torch.tensor([0, 1, 2]), kc, vc, ks, vs, "int8")  # cache dtype / no scales


# ----------------------------------------------------------------------------- CLI


def test_bench_attention_cli_cpu(tmp_path):
    import json

    from typer.testing import CliRunner

    from rarefy.cli import app
    out = tmp_path / "attn.md"
    r = CliRunner().invoke(app, ["bench", "attention", "--device", "cpu", "--quick", "--json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.output.rstrip().splitlines()
    data = json.loads(lines[-1])  # --json: one JSON object, the last line (README convention)
    rows = data["rows"]
    from rarefy.bench.attention import DTYPES
    assert rows and {row["kv_dtype"] for row in rows} == set(DTYPES)
    assert all(row["check"] == "ok" and row["us"] > 0 and row["sdpa_us"] > 0 for row in rows)
    assert "| kv" in out.read_text()
    assert any(line.split() and line.split()[0] in DTYPES for line in lines[:-1])  # the table before it


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode_realistic(kv_dtype, q_dtype):
    c = make_case([4096, 1, 333, 2048 + 5], 32, 8, 128, 16, kv_dtype, seed=21, q_dtype=q_dtype)
    ref = ref_of(c)
    for splits in (None, 1, 7):
        y = paged_decode_attention(*args(c), num_splits=splits)
        assert rel_err(y, ref) < OUT_TOL[q_dtype]


@pytest.mark.gpu
def test_gpu_decode_graph_capture_and_fma():
    from rarefy.kernels.paged_attention.triton_decode import make_plan, paged_decode_attention_triton
    c = make_case([700, 65], 8, 8, 64, 32, "fp8_e4m3", seed=22, q_dtype=torch.bfloat16)
    a = args(c)
    ref = ref_of(c)
    plan = make_plan(a[0], a[1], a[5], "fp8_e4m3", use_dot=True)
    assert rel_err(paged_decode_attention_triton(*a, 0.125, plan=plan), ref) < OUT_TOL[torch.bfloat16]
    capacity = a[5].shape[1] * 32  # the plan a capture uses (seq_lens are not read while capturing)
    paged_decode_attention(*a, 0.125, max_seq_len=capacity)  # compile + counters before capturing
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = paged_decode_attention(*a, 0.125)
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(y, ref) < OUT_TOL[torch.bfloat16]


# ----------------------------------------------------------------------------- sm_90 compile

_AOT = r'''
import json, re, subprocess, sys, tempfile, os
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rarefy.kernels.paged_attention import triton_decode as td
from rarefy.kernels.paged_attention.plan import plan_decode
import torch

kvd, ctx, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
p = plan_decode(batch, ctx, 32, 8, 128, kvd, 16, 132)
quant = kvd in ("int8", "fp8_e4m3", "fp8_e5m2")
ptr = {"bf16": "*bf16", "fp8_e4m3": "*fp8e4nv", "int8": "*i8"}[kvd]
types = dict(q_ptr="*bf16", k_ptr=ptr, v_ptr=ptr, ks_ptr="*fp16" if quant else ptr, vs_ptr="*fp16" if quant else ptr,
             bt_ptr="*i32", sl_ptr="*i32", out_ptr="*bf16", po_ptr="*fp32", plse_ptr="*fp32", cnt_ptr="*i32",
             qk_scale="fp32")
cx = dict(GROUP=p.group, GROUP_PAD=p.group_pad, HEAD_DIM=128, BLOCK_SIZE=16, TILE_N=p.tile_n,
          SPLIT=p.num_splits > 1, FUSED=p.fused_reduce, QUANT=quant, USE_DOT=p.use_dot,
          DOT=td.dot_code(torch.bfloat16, kvd), CHUNK=16 if p.num_splits > 8 else 8, CONV=td.conv_code(p, kvd),
          QK_I8=p.qk_int8, KV_MUL=256.0 if td.conv_code(p, kvd) in (2, 3) else 1.0,
          PDL_WAIT=True, PDL=p.num_splits > 1 and not p.fused_reduce, PREFETCH=p.prefetch_pages,
          PAGE_LINES=16 * 128 * (2 if kvd == "bf16" else 1) // 128, LINE_ELEMS=128 // (2 if kvd == "bf16" else 1),
          stride_vd=1)  # a token-major V: Triton specialises an argument equal to 1
fn = td._decode_kernel
sig = {n: "constexpr" if n in cx else types.get(n, "i32") for n in fn.arg_names}
div = [n for n in fn.arg_names if n.endswith("_ptr") or (n.startswith("stride") and n not in ("stride_btb", "stride_vd"))]
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
k = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=p.num_warps, num_stages=p.num_stages))
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"]); f.flush()
    usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
bufs = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x%dx128" % p.tile_n, k.asm["ttgir"])
print(json.dumps(dict(shared=k.metadata.shared, est=p.smem_bytes, regs=int(m.group(1)), stack=int(m.group(2)),
                      bufs=[int(b) for b in bufs], stages=p.num_stages)))
'''


def _ptxas_available() -> bool:
    try:
        import triton
        return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    except ImportError:
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
@pytest.mark.parametrize("kv_dtype,ctx,batch", [("fp8_e4m3", 32768, 1), ("bf16", 4096, 32)])
def test_compiles_for_sm90_as_planned(kv_dtype, ctx, batch):
    """Compile the Triton kernel for an H100 (sm_90) ahead of time, no GPU needed: the default
    plan builds, stays out of local memory, gets the K/V buffers the plan counts on
    (max(1, (stages - 1) // 2)) and the shared memory the plan estimates."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT, kv_dtype, str(ctx), str(batch)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["stack"] == 0 and got["regs"] <= 168, got
    assert got["bufs"] == [max(1, (got["stages"] - 1) // 2)] * 2, got
    assert abs(got["shared"] - got["est"]) <= 2048, got


def test_bench_sweep_variants():
    """`rarefy bench attention --sweep` variants: all valid plans; --sweep-quant keeps only the
    stage and 8-bit conversion variants."""
    from rarefy.bench.attention_sweep import sweep_variants
    for kvd in ("bf16", "int8", "fp8_e5m2"):
        base = plan_decode(1, 32768, 32, 8, 128, kvd, 16, 132, kernel="base")
        full = sweep_variants(base, kvd, 1, 8, 132)
        assert full["default"] == {} and any(k.startswith("splits=") for k in full)
        assert ("qk int8" in full) == (kvd == "int8") and ("dot fp16 bits" in full) == (kvd == "int8")
        for kw in full.values():  # each one a plan plan_decode accepts
            plan_decode(1, 32768, 32, 8, 128, kvd, 16, 132, kernel="base", **kw)
        quant_only = sweep_variants(base, kvd, 1, 8, 132, generic=False)
        assert not any(k.startswith(("splits=", "tile_n=", "warps=", "2k ")) for k in quant_only)
        assert set(quant_only) <= set(full)
