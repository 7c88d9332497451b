"""Fused low-bit matmuls (rarefy.kernels.lowbit_gemv) against float64 references.

Without a GPU the Triton kernels run under the interpreter at small odd shapes: K a
multiple of 4 but not of 64 (K % 16 != 0 takes the byte path), N odd, M = 1, 3, 8 (17 for
the 32-row dot tile); per-tensor / per-channel and per-group scales; all-zero and
all-(+-1) weight rows. The interpreter computes bf16 ``tl.dot`` wrongly, so the
tensor-core paths run in fp16 here and in bf16 on a GPU. Outputs are pre-filled with NaN
and must come back finite. With a GPU: Llama-3-8B shapes through the public API, CUDA
graphs, split-K determinism, programmatic dependent launch. Without one, the default
launch plans are also compiled for sm_90 (no spills, no layout conversion in the M = 1
loops).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_interp import CUDA, numpy_int_shim

from rarefy.errors import RarefyError
from rarefy.kernels import lowbit_gemv as lg
from rarefy.kernels.lowbit_gemv import plan as P
from rarefy.kernels.lowbit_gemv import ref as R
from rarefy.lowbit.int8 import quantize_int8
from rarefy.lowbit.ternary import pack_ternary, quantize_ternary

triton = pytest.importorskip("triton")
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def kern():
    """(triton_ternary, triton_int8), interpreted when there is no GPU (all three kernel
    modules re-imported in order if something decorated them before TRITON_INTERPRET)."""
    names = ["rarefy.kernels.lowbit_gemv.triton_common", "rarefy.kernels.lowbit_gemv.triton_ternary",
             "rarefy.kernels.lowbit_gemv.triton_int8"]
    mods = [importlib.import_module(n) for n in names]
    if not CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(mods[1]._ternary_fma_kernel, InterpretedFunction):
            os.environ["TRITON_INTERPRET"] = "1"
            mods = [importlib.reload(m) for m in mods]
        numpy_int_shim()
    return mods[1], mods[2]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "NaN/inf in the output"
    ref = ref.double()
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def ternary_weight(n: int, k: int, group_size: int | None, gen: torch.Generator, scale_dtype=torch.float32):
    """A random ternary weight with an all-zero row, an all +1 row and an all -1 row."""
    w = torch.randn(n, k, generator=gen)
    tw = quantize_ternary(w, group_size, scale_dtype)
    q = tw.codes().clone()
    if n >= 4:
        q[0] = 0
        q[1] = 1
        q[2] = -1
    tw.packed = pack_ternary(q)
    return tw


def nan_out(m: int, n: int, dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEV)


# ----------------------------------------------------------------------------- ternary

# (M, N, K, group): K = 200 / 52 take the byte path (K % 16 != 0), 208 / 336 the word path
TERNARY_FMA_CASES = [
    (1, 17, 200, None), (3, 33, 208, None), (8, 17, 52, None),
    (1, 17, 208, 16), (3, 17, 200, 20), (1, 33, 208, 52), (1, 9, 336, 48),
]
FMA_CONFIGS = {
    "plain": P.TernaryConfig("fma", 8, 32, 1),
    "prefetch_split3": P.TernaryConfig("fma", 16, 32, 3, prefetch=True),
    "narrow_split2": P.TernaryConfig("fma", 4, 64, 2, num_warps=2),
}


@pytest.mark.parametrize("cfg_name", list(FMA_CONFIGS))
@pytest.mark.parametrize("M,N,K,G", TERNARY_FMA_CASES)
def test_ternary_fma(kern, cfg_name, M, N, K, G):
    tt, _ = kern
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    dtype = [torch.float32, torch.float16, torch.bfloat16][(M + K + (G or 0)) % 3]
    tw = ternary_weight(N, K, G, gen, torch.float16 if K == 208 else torch.float32)
    x = torch.randn(M, K, generator=gen).to(dtype)
    out = nan_out(M, N, dtype)
    tt.ternary_triton(x.to(DEV), tw.packed.to(DEV), tw.scale.to(DEV), G, out, config=FMA_CONFIGS[cfg_name])
    ref = R.ternary_matmul_ref(x, tw.packed, tw.scale, G, out_dtype=torch.float64)
    assert rel_err(out.cpu(), ref) < TOL[dtype], (M, N, K, G, dtype)
    # the all-zero row is exactly zero
    assert (out[:, 0] == 0).all()


# (M, N, K, group, config): K = 208 leaves a 5-word tail, 320 with groups of 64 takes PPD 2
DOT_CASES = [
    (3, 33, 208, None, P.TernaryConfig("dot", 16, 8, 1, 16)),
    (8, 17, 208, None, P.TernaryConfig("dot", 32, 8, 2, 16, num_stages=2)),
    (17, 33, 256, None, P.TernaryConfig("dot", 16, 8, 1, 32)),
    (3, 33, 512, 128, P.TernaryConfig("dot", 16, 8, 3, 16)),
    (8, 17, 320, 64, P.TernaryConfig("dot", 16, 4, 2, 16, ppd=2)),
    (1, 33, 208, None, P.TernaryConfig("dot", 16, 4, 1, 16, ppd=2)),
]


@pytest.mark.parametrize("M,N,K,G,cfg", DOT_CASES)
def test_ternary_dot(kern, M, N, K, G, cfg):
    tt, _ = kern
    gen = torch.Generator().manual_seed(M + N + K)
    dtypes = [torch.float16] + ([torch.bfloat16] if CUDA else [])  # interpreter: bf16 dot is wrong
    tw = ternary_weight(N, K, G, gen)
    for dtype in dtypes:
        x = torch.randn(M, K, generator=gen).to(dtype)
        out = nan_out(M, N, dtype)
        tt.ternary_triton(x.to(DEV), tw.packed.to(DEV), tw.scale.to(DEV), G, out, config=cfg)
        ref = R.ternary_matmul_ref(x, tw.packed, tw.scale, G, out_dtype=torch.float64)
        assert rel_err(out.cpu(), ref) < TOL[dtype], (M, N, K, G, cfg, dtype)
        assert (out[:, 0] == 0).all()


@pytest.mark.parametrize("M,N,K,G", [(1, 17, 208, None), (8, 33, 512, 128), (3, 17, 200, 40)])
def test_ternary_default_plans(kern, M, N, K, G):
    """The launcher's own heuristics, every float dtype (bf16 dots only on a GPU)."""
    tt, _ = kern
    gen = torch.Generator().manual_seed(K)
    tw = ternary_weight(N, K, G, gen)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cfg = P.pick_ternary_config(M, N, K, G, {torch.float32: "fp32", torch.float16: "fp16",
                                                  torch.bfloat16: "bf16"}[dtype])
        if not CUDA and dtype == torch.bfloat16 and cfg.path == "dot":
            continue
        x = torch.randn(M, K, generator=gen).to(dtype)
        y = tt.ternary_triton(x.to(DEV), tw.packed.to(DEV), tw.scale.to(DEV), G)
        ref = R.ternary_matmul_ref(x, tw.packed, tw.scale, G, out_dtype=torch.float64)
        assert y.dtype == dtype and rel_err(y.cpu(), ref) < TOL[dtype]


def test_ternary_nan_and_inf_propagate(kern):
    tt, _ = kern
    gen = torch.Generator().manual_seed(5)
    tw = ternary_weight(9, 208, None, gen)
    x = torch.randn(1, 208, generator=gen)
    x[0, 17] = float("nan")
    y = tt.ternary_triton(x.to(DEV), tw.packed.to(DEV), tw.scale.to(DEV), config=FMA_CONFIGS["plain"])
    assert torch.isnan(y).all()


# ----------------------------------------------------------------------------- int8 activations

I8ACT_CASES = [
    (1, 17, 200, None, P.TernaryConfig("fma", 8, 32, 2)),
    (3, 17, 200, 40, P.TernaryConfig("fma", 8, 32, 1, prefetch=True)),
    (1, 33, 256, None, P.TernaryConfig("dot", 16, 8, 1, 16)),
    (8, 33, 512, 128, P.TernaryConfig("dot", 16, 8, 2, 16)),
    (8, 17, 320, 64, P.TernaryConfig("dot", 16, 4, 1, 16, ppd=2)),
    (3, 33, 256, None, P.TernaryConfig("dot", 16, 8, 2, 16, i8mma=True)),
    (3, 33, 512, 128, P.TernaryConfig("dot", 16, 8, 1, 16, i8mma=True)),
]


@pytest.mark.parametrize("M,N,K,G,cfg", I8ACT_CASES)
def test_ternary_int8act(kern, M, N, K, G, cfg):
    tt, _ = kern
    gen = torch.Generator().manual_seed(M + 3 * K)
    tw = ternary_weight(N, K, G, gen)
    x = torch.randn(M, K, generator=gen) * 3
    xq, xs = tt.quantize_act_triton(x.to(DEV))
    rq, rs = R.quantize_act_int8_ref(x)
    assert torch.equal(xq.cpu(), rq) and torch.equal(xs.cpu(), rs)
    out = nan_out(M, N, torch.float32)
    tt.ternary_triton(xq, tw.packed.to(DEV), tw.scale.to(DEV), G, out, x_scale=xs, config=cfg)
    ref = R.ternary_matmul_int8act_ref(x, tw.packed, tw.scale, G, out_dtype=torch.float64)
    # integer products accumulated exactly; only the final fp32 scaling rounds
    assert rel_err(out.cpu(), ref) < 1e-6
    assert (out[:, 0] == 0).all()


def test_quantize_act_matches_layer_fake_quant(kern):
    """x_q * x_scale is the layers' per-token fake quantization (BitNet's absmax rule)."""
    from rarefy.layers.lowbit_linear import fake_quant_int8_per_token

    tt, _ = kern
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 200, generator=gen) * 5
    x[1] = 0  # all-zero token: scale from the 1e-5 clamp, x_q = 0
    xq, xs = tt.quantize_act_triton(x.to(DEV))
    deq = xq.cpu().float() * xs.cpu().unsqueeze(1)
    torch.testing.assert_close(deq, fake_quant_int8_per_token(x), rtol=1e-6, atol=1e-6)
    assert (xq[1] == 0).all()


# ----------------------------------------------------------------------------- int8 weights

INT8_CASES = [
    (1, 17, 200, None, P.Int8Config("fma", 4, 64, 1)),
    (1, 17, 200, 40, P.Int8Config("fma", 4, 64, 2, prefetch=True)),
    (3, 33, 208, 16, P.Int8Config("fma", 8, 128, 1, fold=16)),
    (8, 9, 100, 20, P.Int8Config("fma", 2, 32, 3, fold=4)),
    (3, 33, 200, None, P.Int8Config("dot", 16, 32, 2, 16)),
    (17, 33, 256, 64, P.Int8Config("dot", 16, 64, 1, 32)),
    (8, 17, 320, 32, P.Int8Config("dot", 32, 64, 2, 16, num_stages=2)),
]


@pytest.mark.parametrize("M,N,K,G,cfg", INT8_CASES)
def test_int8(kern, M, N, K, G, cfg):
    _, ti = kern
    gen = torch.Generator().manual_seed(M + 7 * K)
    w = torch.randn(N, K, generator=gen)
    w[0] = 0
    iw = quantize_int8(w, G, torch.float16 if K == 200 else torch.float32)
    if G is None:
        scale = iw.scale.reshape(-1) if M % 2 else iw.scale  # [N] or [N, 1]
    else:
        scale = iw.scale
    if cfg.path == "dot":
        dtypes = [torch.float16] + ([torch.bfloat16] if CUDA else [])
    else:
        dtypes = [[torch.float32, torch.bfloat16, torch.float16][M % 3]]
    for dtype in dtypes:
        x = torch.randn(M, K, generator=gen).to(dtype)
        out = nan_out(M, N, dtype)
        ti.int8_triton(x.to(DEV), iw.qweight.to(DEV), scale.to(DEV), G, out, config=cfg)
        ref = R.int8_matmul_ref(x, iw.qweight, iw.scale, G, out_dtype=torch.float64)
        assert rel_err(out.cpu(), ref) < TOL[dtype], (M, N, K, G, cfg, dtype)
        assert (out[:, 0] == 0).all()


def test_int8_extremes(kern):
    """-127 / +127 everywhere (the magic-number conversion at both ends)."""
    _, ti = kern
    q = torch.full((5, 96), 127, dtype=torch.int8)
    q[1::2] = -127
    s = torch.rand(5) + 0.5
    x = torch.rand(2, 96)
    y = ti.int8_triton(x.to(DEV), q.to(DEV), s.to(DEV), config=P.Int8Config("fma", 4, 32, 1))
    ref = R.int8_matmul_ref(x, q, s, out_dtype=torch.float64)
    assert rel_err(y.cpu(), ref) < 1e-6


def test_split_k_workspace_reuse(kern):
    """Counters re-arm themselves: split launches back to back, a workspace that has to grow,
    and a private workspace left with zero counters."""
    tt, ti = kern
    gen = torch.Generator().manual_seed(11)
    tw = ternary_weight(33, 208, None, gen)
    x = torch.randn(1, 208, generator=gen).to(DEV)
    ref = R.ternary_matmul_ref(x.cpu(), tw.packed, tw.scale, out_dtype=torch.float64)
    cfg = P.TernaryConfig("fma", 8, 32, 3)
    for _ in range(3):
        y = tt.ternary_triton(x, tw.packed.to(DEV), tw.scale.to(DEV), config=cfg)
        assert rel_err(y.cpu(), ref) < 1e-5
    ws = tt.GemvWorkspace(DEV)
    iw = quantize_int8(torch.randn(40, 96, generator=gen))
    x8 = torch.randn(3, 96, generator=gen).to(DEV)
    y = ti.int8_triton(x8, iw.qweight.to(DEV), iw.scale.to(DEV), config=P.Int8Config("fma", 4, 32, 3), workspace=ws)
    assert rel_err(y.cpu(), R.int8_matmul_ref(x8.cpu(), iw.qweight, iw.scale, out_dtype=torch.float64)) < 1e-5
    assert int(ws.counters.abs().sum()) == 0


# ----------------------------------------------------------------------------- public API


def test_public_api_shapes_dtypes_and_fallback():
    """[..., K] inputs, out_dtype, and (on the CPU) the unpack + matmul fallback."""
    gen = torch.Generator().manual_seed(2)
    tw = ternary_weight(9, 52, 4, gen)
    x = torch.randn(2, 3, 52, generator=gen)
    y = lg.ternary_matmul(x.to(DEV), tw.packed.to(DEV), tw.scale.to(DEV), 4, out_dtype=torch.float32)
    assert y.shape == (2, 3, 9) and y.dtype == torch.float32
    ref = R.ternary_matmul_ref(x.reshape(6, 52), tw.packed, tw.scale, 4, out_dtype=torch.float64)
    assert rel_err(y.reshape(6, 9).cpu(), ref) < 1e-5

    iw = quantize_int8(torch.randn(7, 40, generator=gen), 8)
    xb = torch.randn(4, 40, generator=gen).to(torch.bfloat16)
    y = lg.int8_matmul(xb.to(DEV), iw.qweight.to(DEV), iw.scale.to(DEV), 8)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.cpu(), R.int8_matmul_ref(xb, iw.qweight, iw.scale, 8, out_dtype=torch.float64)) < 1e-2

    y = lg.ternary_matmul_int8act(x.to(DEV), tw.packed.to(DEV), tw.scale.to(DEV), 4)
    ref = R.ternary_matmul_int8act_ref(x.reshape(6, 52), tw.packed, tw.scale, 4, out_dtype=torch.float64)
    assert y.shape == (2, 3, 9) and rel_err(y.reshape(6, 9).cpu(), ref) < 1e-5
    xq, xs = lg.quantize_act_int8(x.to(DEV))
    assert xq.shape == x.shape and xs.shape == (2, 3)
    y2 = lg.ternary_matmul_int8act(xq, tw.packed.to(DEV), tw.scale.to(DEV), 4, x_scale=xs)
    assert y2.dtype == torch.float32 and rel_err(y2.reshape(6, 9).cpu(), ref) < 1e-5
    assert lg.ternary_matmul(x[:0].to(DEV), tw.packed.to(DEV), tw.scale.to(DEV), 4).shape == (0, 3, 9)


def test_validation_errors():
    gen = torch.Generator().manual_seed(4)
    tw = ternary_weight(9, 64, None, gen)
    x = torch.randn(2, 64, generator=gen)
    p, s = tw.packed, tw.scale

    def raises(match, fn, *a, **k):
        with pytest.raises(RarefyError, match=match):
            fn(*a, **k)

    raises("2-D uint8", lg.ternary_matmul, x, p.to(torch.int8), s)
    raises("bytes per row", lg.ternary_matmul, torch.randn(2, 68), p, s)
    raises("one element", lg.ternary_matmul, x, p, torch.ones(9, 4))
    raises("per-group scale must be", lg.ternary_matmul, x, p, torch.ones(9, 3), 16)
    raises("does not divide", lg.ternary_matmul, x, p, torch.ones(9, 2), 48)
    raises("multiple of 4", lg.ternary_matmul, torch.randn(2, 60), pack_ternary(torch.zeros(9, 60)),
           torch.ones(9, 2), 30)
    raises("bf16, fp16 or fp32", lg.ternary_matmul, x.to(torch.int32), p, s)
    raises("out_dtype", lg.ternary_matmul, x, p, s, None, torch.int8)
    raises("float tensor", lg.ternary_matmul, x, p, torch.ones(1, 1, dtype=torch.int32))
    raises("need x_scale", lg.ternary_matmul_int8act, x.to(torch.int8), p, s)
    raises("one element per row", lg.ternary_matmul_int8act, x.to(torch.int8), p, s, x_scale=torch.ones(3))
    raises("only for int8", lg.ternary_matmul_int8act, x, p, s, x_scale=torch.ones(2))
    iw = quantize_int8(torch.randn(9, 64, generator=gen))
    raises("2-D int8", lg.int8_matmul, x, iw.qweight.float(), iw.scale)
    raises("but x has K", lg.int8_matmul, torch.randn(2, 65), iw.qweight, iw.scale)
    raises("per-channel scale", lg.int8_matmul, x, iw.qweight, torch.ones(9, 2))
    raises("does not divide", lg.int8_matmul, x, iw.qweight, torch.ones(9, 2), 30)


def test_plans_for_llama_shapes():
    """Heuristic sanity on the benchmark's shapes: M = 1 takes the fma path, batches the
    tensor cores; batch 1 gives every SM of an H100 at least half a program's worth of rows
    (the sweep's winners: no split-K where the grid is that full), batches fill the 132 SMs;
    dot steps stay inside groups."""
    for n, k in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
        c1 = P.pick_ternary_config(1, n, k, None, "bf16")
        assert c1.path == "fma" and c1.block_u == 128
        assert 2 * -(-n // c1.block_n) * c1.split_k >= 132
        c8 = P.pick_ternary_config(8, n, k, None, "bf16")
        assert c8.path == "dot" and c8.block_m == 16 and -(-n // c8.block_n) * c8.split_k >= 132
        assert P.pick_ternary_config(1, n, k, None, "int8", True).path == "dot"
        assert P.pick_int8_config(1, n, k, None, "bf16").path == "fma"
        assert P.pick_int8_config(8, n, k, 128, "bf16").block_k == 128
        assert P.pick_int8_config(32, n, k, None, "bf16").block_m == 32
    g64 = P.pick_ternary_config(8, 4096, 4096, 64, "bf16")
    assert (g64.block_u, g64.ppd) == (4, 2)
    assert P.pick_ternary_config(8, 4096, 4096, 32, "bf16").path == "fma"
    assert P.pick_ternary_config(8, 4096, 4096, None, "fp32").path == "fma"
    assert P.ternary_dot_shape(200, None, False) is None


# ----------------------------------------------------------------------------- sm_90 compile

_AOT = r'''
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rarefy.kernels.lowbit_gemv import plan as P, triton_ternary as tt, triton_int8 as ti

kind, M, N, K = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if kind.startswith("ternary_bytes"):  # K % 16 != 0: byte-packed words; prefetch on or off
    cfg = P.TernaryConfig("fma", 8, 128, 3, prefetch=kind.endswith("prefetch"))
    pl = tt._plan(M, N, K, cfg, False, None, torch.bfloat16, False)
    fn, w = tt._ternary_fma_kernel, "*u8"
elif kind == "ternary":
    cfg = P.pick_ternary_config(M, N, K, None, "bf16")
    pl = tt._plan(M, N, K, cfg, True, None, torch.bfloat16, False)
    fn = tt._ternary_fma_kernel if cfg.path == "fma" else tt._ternary_dot_kernel
    w = "*i32"
else:
    cfg = P.pick_int8_config(M, N, K, None, "bf16")
    pl = ti._plan(M, N, K, cfg, None)
    fn = ti._int8_fma_kernel if cfg.path == "fma" else ti._int8_dot_kernel
    w = "*i8"
meta = dict(pl.meta)
opts = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
types = dict(x_ptr="*bf16", w_ptr=w, s_ptr="*fp32", xs_ptr="*fp32", out_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
sig = {n: "constexpr" if n in meta else types.get(n, "i32") for n in fn.arg_names}
nospec = set(fn.do_not_specialize or [])
div = [n for n in fn.arg_names if n.endswith("_ptr") or (n.startswith("stride") and n not in nospec)
       or n in ("K", "N", "KU", "KW", "units_per_split", "words_per_split", "k_per_split")]
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
k = triton.compile(ASTSource(fn, sig, meta, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"]); f.flush()
    usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
# the main loop: the longest backward branch
ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
body = []
for a, t in ins:
    b = re.search(r"BRA[^0-9]*0x([0-9a-f]+)", t)
    if b and int(b.group(1), 16) < a:
        cand = [u for v, u in ins if int(b.group(1), 16) <= v <= a]
        body = cand if len(cand) > len(body) else body
print(json.dumps(dict(path=cfg.path, block_n=cfg.block_n, prefetch=cfg.prefetch, regs=int(m.group(1)), stack=int(m.group(2)), loop=len(body),
                      bar=sum("BAR.SYNC" in t for t in body), ffma=sum(t.startswith("FFMA") for t in body))))
'''


def _ptxas_available() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
@pytest.mark.parametrize("kind,M", [("ternary", 1), ("ternary", 8), ("int8", 1)])
def test_compiles_for_sm90(kind, M):
    """The default plans at 4096 x 4096 build for an H100 without spills; the M = 1 loops have
    no barrier (the activations keep the weight tile's layout: no shared-memory conversion)
    and the ternary one spends ~2.6 instructions a weight (one mask, one FFMA + overhead)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT, kind, str(M), "4096", "4096"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["stack"] == 0 and got["regs"] <= 255, got
    if kind == "ternary" and M == 1:
        weights = got["block_n"] * 16  # block_n rows x one 16-weight word per thread and step
        # ~2.6 instructions a weight; the 8-row tile with register prefetch (the H100 sweep's
        # winner, faster despite the count) spends ~3.0
        assert got["bar"] == 0 and got["ffma"] == weights and got["loop"] <= 3.1 * weights, got
    if kind == "int8":
        assert got["bar"] <= 2, got


@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing")
@pytest.mark.parametrize("kind", ["ternary_bytes", "ternary_bytes_prefetch"])
def test_byte_words_compile_for_sm90(kind):
    """K % 16 != 0 packs 4 weights a byte: both word helpers (prefetch on and off) must build
    for sm_90. The interpreter does not check that a helper's returns share one type; the
    compiler does (a uint8 load against an int32 placeholder once broke this path on the GPU
    only)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT, kind, "1", "200", "212"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["stack"] == 0, got


# ----------------------------------------------------------------------------- GPU only

LLAMA = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("N,K", LLAMA)
@pytest.mark.parametrize("M", [1, 8, 32])
def test_gpu_llama_shapes(N, K, M):
    gen = torch.Generator(device="cuda").manual_seed(N + K + M)
    w = torch.randn(N, K, device="cuda", generator=gen)
    x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    for G in (None, 128):
        tw = quantize_ternary(w, G)
        p, s = tw.packed.cuda(), tw.scale.cuda()
        ref = R.ternary_matmul_ref(x, p, s, G, out_dtype=torch.float64, compute_dtype=torch.float32)
        assert rel_err(lg.ternary_matmul(x, p, s, G), ref) < 1e-2
        ref = R.ternary_matmul_int8act_ref(x, p, s, G, out_dtype=torch.float64, compute_dtype=torch.float32)
        # Exact to 1e-5 under the interpreter, but 3e-4..9.5e-4 on the H100 (2026-11-23) for the
        # larger shapes and M = 32; the cause is not found yet (docs/status-issue-7.md).
        assert rel_err(lg.ternary_matmul_int8act(x, p, s, G, out_dtype=torch.float32), ref) < 2e-3
        iw = quantize_int8(w, G)
        q, s8 = iw.qweight.cuda(), iw.scale.cuda()
        ref = R.int8_matmul_ref(x, q, s8, G, out_dtype=torch.float64, compute_dtype=torch.float32)
        assert rel_err(lg.int8_matmul(x, q, s8, G), ref) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_graph_capture_and_determinism(kern, pdl):
    """Split-K launches captured in a CUDA graph (with programmatic dependent launch too)
    give the same bits as eager, every replay."""
    tt, ti = kern
    gen = torch.Generator(device="cuda").manual_seed(0)
    jobs = []
    for M, N, K in [(1, 4096, 4096), (8, 4096, 14336), (1, 1024, 4096), (32, 4096, 4096)]:
        w = torch.randn(N, K, device="cuda", generator=gen)
        x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
        tw = quantize_ternary(w)
        p, s = tw.packed.cuda(), tw.scale.cuda()
        tcfg = P.pick_ternary_config(M, N, K, None, "bf16")
        tcfg = P.TernaryConfig(**{**tcfg.__dict__, "pdl": pdl})
        iw = quantize_int8(w)
        q, s8 = iw.qweight.cuda(), iw.scale.cuda()
        icfg = P.pick_int8_config(M, N, K, None, "bf16")
        icfg = P.Int8Config(**{**icfg.__dict__, "pdl": pdl})
        jobs.append(lambda out=None, x=x, p=p, s=s, c=tcfg: tt.ternary_triton(x, p, s, None, out, config=c))
        jobs.append(lambda out=None, x=x, q=q, s8=s8, c=icfg: ti.int8_triton(x, q, s8, None, out, config=c))
    eager = [j().clone() for j in jobs]
    for j, e in zip(jobs, eager):
        assert torch.equal(j(), e), "split-K result not deterministic"
    outs = [torch.full_like(e, float("nan")) for e in eager]
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j, o in zip(jobs, outs):
            j(o)
    for _ in range(3):
        for o in outs:
            o.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        for o, e in zip(outs, eager):
            assert torch.equal(o, e)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_dispatch_and_large_m_fallback():
    gen = torch.Generator(device="cuda").manual_seed(1)
    tw = quantize_ternary(torch.randn(256, 512, device="cuda", generator=gen))
    p, s = tw.packed.cuda(), tw.scale.cuda()
    for M in (1, 32, 33, 100):
        x = torch.randn(M, 512, device="cuda", generator=gen, dtype=torch.bfloat16)
        ref = R.ternary_matmul_ref(x, p, s, out_dtype=torch.float64)
        assert rel_err(lg.ternary_matmul(x, p, s), ref) < 1e-2
