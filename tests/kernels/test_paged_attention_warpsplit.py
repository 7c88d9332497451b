"""The warp-split paged decode kernel (rarefy/kernels/paged_attention/triton_decode_warpsplit.py)
against the float64 reference: both V layouts (token-major, dim-major), every cache dtype that
the interpreter can multiply (fp16 dots: the interpreter computes bf16 ``tl.dot`` wrongly),
lengths 0, 1 and not multiples of the page or the tile, empty splits, fused and separate
reductions, sub-streams that see no token at all."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_paged_attention import DEV, args, make_case, rel_err  # noqa: E402
from triton_interp import CUDA, kernel_module  # noqa: E402

from rarefy.errors import RarefyError  # noqa: E402
from rarefy.kernels.paged_attention import paged_decode_attention_ref  # noqa: E402


@pytest.fixture(scope="module")
def ws():
    return kernel_module("rarefy.kernels.paged_attention.triton_decode_warpsplit", "_decode_swap_kernel")


@pytest.fixture(scope="module")
def dec():
    return kernel_module("rarefy.kernels.paged_attention.triton_decode", "_decode_kernel")


def _run(ws, dec, c, sm_scale, v_dim_major, **plan_kw):
    q, kc, bt, kvd = c["q"], c["k_cache"], c["block_tables"], c["kv_dtype"]
    plan = dec.make_plan(q, kc, bt, kvd, **{"kernel": "swap", **plan_kw})
    a = args(c)
    if plan.convert == "bias_u8":  # the kernel reads offset-binary bytes (x + 128)
        a[1], a[2] = [(t.view(torch.uint8) ^ 0x80).view(torch.int8) for t in (a[1], a[2])]
    if v_dim_major:
        a[2] = a[2].transpose(2, 3).contiguous().transpose(2, 3)  # a view of [blocks, heads, dim, slot]
    return ws.paged_decode_attention_warpsplit(*a, sm_scale, plan=plan, v_dim_major=v_dim_major)


# (kv dtype, q dtype, tolerance against float64)
DTYPES = [("fp16", torch.float16, 3e-3), ("int8", torch.float16, 3e-3), ("fp8_e4m3", torch.float16, 3e-3),
          ("fp8_e5m2", torch.float16, 3e-3)]
if CUDA:
    DTYPES += [("bf16", torch.bfloat16, 1.5e-2), ("int8", torch.bfloat16, 1.5e-2)]


@pytest.mark.parametrize("kv_dtype,q_dtype,tol", DTYPES)
@pytest.mark.parametrize("v_dim_major", [True, False])
def test_warpsplit_matches_reference(ws, dec, kv_dtype, q_dtype, tol, v_dim_major):
    # GQA 4, head dim 64, pages of 8 (two per 16-token sub-stream), lengths 0/1/odd/long
    c = make_case([45, 1, 130, 0, 17], 8, 2, 64, 8, kv_dtype, seed=31, q_dtype=q_dtype)
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.1)
    for kw in (dict(num_splits=1, tile_n=32, num_warps=2), dict(num_splits=3, tile_n=64, num_warps=4),
               dict(num_splits=2, tile_n=32, num_warps=2, fused_reduce=True)):
        y = _run(ws, dec, c, 0.1, v_dim_major, **kw)
        assert y.dtype == q_dtype and y.shape == c["q"].shape
        assert rel_err(y, ref) < tol, (kw, rel_err(y, ref))
        assert float(y[3].abs().max()) == 0.0  # the empty sequence


@pytest.mark.parametrize("convert", ["bias_k", "bias", "bias_u8"])
@pytest.mark.parametrize("v_dim_major", [True, False])
def test_int8_biased_conversions(ws, dec, convert, v_dim_major):
    # K (and V) enter the MMA as x + 1152 and the bias is taken back out of the scores and the
    # output: the same answer as the plain conversion, lengths 0/1/odd, empty splits, a
    # partial tile, and large-magnitude queries (the bias term then dwarfs the true score)
    c = make_case([45, 1, 130, 0, 17], 8, 2, 64, 8, "int8", seed=37, q_dtype=torch.float16)
    c["q"] = c["q"] * 8
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.05)
    for kw in (dict(num_splits=1, tile_n=32, num_warps=2), dict(num_splits=3, tile_n=64, num_warps=4),
               dict(num_splits=2, tile_n=32, num_warps=2, fused_reduce=True, max_seq_len=300)):
        y = _run(ws, dec, c, 0.05, v_dim_major, convert=convert, **kw)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) < 3e-3, (kw, rel_err(y, ref))
        assert float(y[3].abs().max()) == 0.0


@pytest.mark.skipif(not CUDA, reason="long contexts need the GPU (the interpreter's products are exact anyway)")
@pytest.mark.parametrize("convert", ["bits", "bias_k", "bias", "bias_u8"])
def test_int8_biased_conversions_long_context_gpu(ws, dec, convert):
    # one split over 20k near-uniform tokens: one accumulator takes every tile, the case where
    # a bias carried across tiles lost the output in the MMA's accumulation (6.6e-2 at 128k)
    c = make_case([20000], 8, 2, 128, 16, "int8", seed=41, q_dtype=torch.float16)
    c["q"] = c["q"] * 0.05
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=1 / 128 ** 0.5)
    y = _run(ws, dec, c, 1 / 128 ** 0.5, True, convert=convert, num_splits=1, tile_n=64, num_warps=2)
    assert rel_err(y, ref) < 4e-3, rel_err(y, ref)


def test_int8_bias_needs_the_swap_kernel(dec):
    from rarefy.kernels.paged_attention.plan import plan_decode
    with pytest.raises(RarefyError, match="swap kernel"):
        plan_decode(1, 4096, 32, 8, 128, "int8", 16, 132, kernel="base", convert="bias")
    with pytest.raises(RarefyError, match="int8 cache"):
        plan_decode(1, 4096, 32, 8, 128, "fp8_e4m3", 16, 132, v_dim_major=True, convert="bias_k")


@pytest.mark.parametrize("v_dim_major", [True, False])
def test_warpsplit_empty_splits_and_idle_substreams(ws, dec, v_dim_major):
    # max_seq_len far above the lengths: most splits are empty and, in the splits that hold
    # tokens, most sub-streams see none (their running max stays -inf until the merge)
    c = make_case([1, 2, 0, 17], 4, 2, 32, 16, "fp8_e5m2", seed=4, extra_blocks=20, q_dtype=torch.float16)
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.3)
    y = _run(ws, dec, c, 0.3, v_dim_major, num_splits=5, tile_n=64, num_warps=4, max_seq_len=300)
    assert rel_err(y, ref) < 3e-3
    assert float(y[2].abs().max()) == 0.0


def test_warpsplit_refuses_plans_it_cannot_run(ws, dec):
    c = make_case([20], 4, 2, 32, 16, "fp16", seed=1, q_dtype=torch.float16)
    with pytest.raises(ValueError, match="warp-split"):
        _run(ws, dec, c, 0.3, False, tile_n=16, num_warps=2)  # 8 tokens per sub-stream < a page
    with pytest.raises(ValueError, match="warp-split"):  # a plan made for the base kernel
        _run(ws, dec, c, 0.3, False, tile_n=32, num_warps=2, kernel="base")
    with pytest.raises(RarefyError, match="swap kernel"):  # no tensor-core path: no swap plan at all
        _run(ws, dec, c, 0.3, False, tile_n=32, use_dot=False)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_swap_other_group_sizes(ws, dec, group):
    # MHA (one query head per KV head, padded to 2 columns), GQA 3 (padded to 4) and 8
    c = make_case([40, 3], 2 * group, 2, 32, 16, "int8", seed=50 + group, q_dtype=torch.float16)
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.2)
    y = _run(ws, dec, c, 0.2, True, num_splits=2, tile_n=32, num_warps=2)
    assert rel_err(y, ref) < 3e-3


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_dispatcher_runs_swap_on_dim_major_v(dec, kv_dtype):
    # the paged cache's own layout for 8-bit caches: V a view of dim-major storage; the default
    # plan is then the swap kernel, and the base kernel (forced) reads the same view correctly
    c = make_case([45, 1, 130, 0, 17], 8, 2, 64, 16, kv_dtype, seed=61, q_dtype=torch.float16)
    a = args(c)
    a[2] = a[2].transpose(2, 3).contiguous().transpose(2, 3)
    assert dec.v_is_dim_major(a[2]) and not dec.v_is_dim_major(args(c)[2])
    plan = dec.make_plan(c["q"], c["k_cache"], c["block_tables"], kv_dtype, v_dim_major=True)
    # 130 tokens at most: one tile per split, so half tiles (twice the programs)
    assert plan.kernel == "swap" and plan.num_warps == 2 and plan.tile_n == 32
    from rarefy.kernels.paged_attention.plan import plan_decode
    long = plan_decode(1, 32768, 32, 8, 128, kv_dtype, 16, 132, v_dim_major=True)
    assert long.kernel == "swap" and long.tile_n == 64 and long.num_splits == 32
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.1)
    y = dec.paged_decode_attention_triton(*a, 0.1)  # the dispatcher's own plan
    assert rel_err(y, ref) < 3e-3
    base = dec.make_plan(c["q"], c["k_cache"], c["block_tables"], kv_dtype, num_splits=2, kernel="base")
    y = dec.paged_decode_attention_triton(*a, 0.1, plan=base)
    assert rel_err(y, ref) < 3e-3
    # a float32 query cannot use the swap kernel: the dispatcher plans the base kernel
    assert dec.make_plan(c["q"].float(), c["k_cache"], c["block_tables"], kv_dtype, v_dim_major=True).kernel == "base"


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "bf16"])
def test_store_kernel_into_dim_major_v(kv_dtype):
    """The Triton store kernel writes V through its strides: into a view of dim-major storage it
    stores exactly what it stores into a contiguous V (compared as logical tensors)."""
    from test_paged_attention import poison_cache

    st = kernel_module("rarefy.kernels.paged_attention.triton_store", "_store_kernel")
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(9, 2, 32, generator=g), torch.randn(9, 2, 32, generator=g)
    slots = torch.tensor([0, 5, 17, 31, 32, 40, 63, -1, 2], dtype=torch.int64)
    kc, vc, ks, vs = (None if t is None else t.to(DEV) for t in poison_cache(4, 2, 16, 32, kv_dtype))
    kc2, ks2, vs2 = kc.clone(), None if ks is None else ks.clone(), None if vs is None else vs.clone()
    vc_dm = vc.transpose(2, 3).contiguous().transpose(2, 3)
    k, v, slots = k.to(DEV), v.to(DEV), slots.to(DEV)
    st.store_kv_triton(k, v, slots, kc, vc, ks, vs, kv_dtype)
    st.store_kv_triton(k, v, slots, kc2, vc_dm, ks2, vs2, kv_dtype)
    bits = (lambda t: t.view(torch.int8) if t.element_size() == 1 else t.view(torch.int16))
    assert torch.equal(bits(vc_dm).cpu(), bits(vc).cpu()) and torch.equal(bits(kc2).cpu(), bits(kc).cpu())
    if vs is not None:
        assert torch.equal(vs2.view(torch.int16).cpu(), vs.view(torch.int16).cpu())


def test_which_caches_store_v_dim_major():
    from rarefy.kv.paged import stores_v_dim_major
    for kvd in ("int8", "fp8_e4m3", "fp8_e5m2"):
        assert stores_v_dim_major(kvd, "cpu") and stores_v_dim_major(kvd, "cuda")
    assert stores_v_dim_major("bf16", "cuda") and stores_v_dim_major("fp16", torch.device("cuda", 0))
    assert not stores_v_dim_major("bf16", "cpu") and not stores_v_dim_major("fp32", "cuda")
    from rarefy.kernels.paged_attention.plan import plan_decode
    assert plan_decode(1, 32768, 32, 8, 128, "bf16", 16, 132, v_dim_major=True).kernel == "swap"
    assert plan_decode(1, 32768, 32, 8, 128, "bf16", 16, 132).kernel == "base"
    assert plan_decode(1, 32768, 32, 8, 128, "bf16", 16, 132, v_dim_major=True, q_dtype="fp32").kernel == "base"


def test_paged_cache_keeps_8bit_v_dim_major():
    from rarefy.kv.paged import PagedKVCache

    from rarefy.kernels.paged_attention.triton_decode import v_is_dim_major

    for kvd, want in (("int8", True), ("fp8_e5m2", True), ("bf16", False)):
        cache = PagedKVCache(2, 2, 32, 8, block_size=16, kv_dtype=kvd)
        assert tuple(cache.v_cache[0].shape) == (8, 2, 16, 32)
        assert v_is_dim_major(cache.v_cache[0]) == want


_SASS = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import sass_decode_swap as s
out = {}
for kv in ("int8", "fp8_e4m3", "bf16"):
    r = s.report(kv)
    out[kv] = {k: r[k] for k in ("plan", "regs", "stack", "shared", "loop", "loop_ops", "ops")}
print(json.dumps(out))
'''


def test_swap_kernel_compiles_for_sm90():
    """The default swap-kernel plans at 32k x 1 build for an H100 (sm_90) ahead of time, no GPU
    needed: no local memory, the L2 prefetch present (CCTL) with PDL, and int8 through the
    x + 1152 conversion costing no more than e4m3's hardware conversion plus its XORs (before,
    with its subtractions, the loop was 36% longer than e4m3's)."""
    import json
    import subprocess
    import sys
    from test_paged_attention import _ptxas_available
    if not _ptxas_available():
        pytest.skip("Triton's bundled ptxas is missing")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _SASS, os.path.join(root, "benchmarks")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for kv, g in got.items():
        assert "swap kernel" in g["plan"] and "prefetch 4" in g["plan"], g["plan"]
        assert g["stack"] == 0 and g["regs"] <= 255, (kv, g)
        assert g["ops"].get("CCTL", 0) >= 2, (kv, g["ops"])  # prefetch.global.L2 of K and V
        assert g["loop"] > 0
    i8, e4 = got["int8"], got["fp8_e4m3"]
    assert "bias" in i8["plan"] and i8["loop_ops"].get("HADD2", 0) <= 16, i8["loop_ops"]
    assert i8["loop"] <= e4["loop"] + i8["loop_ops"].get("LOP3", 0) + 40, (i8["loop"], e4["loop"])
