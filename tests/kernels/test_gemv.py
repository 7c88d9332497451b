"""Tests for the skinny GEMM / GEMV kernel (rarefy.kernels.gemv).

Without a GPU the Triton kernel runs under the Triton interpreter
(TRITON_INTERPRET=1, set below before the kernel module is imported; the
interpreter reads it when ``@triton.jit`` decorates the kernel). With a GPU
the same small odd-shape cases run compiled, plus checks at real model shapes,
CUDA-graph capture and split-K determinism.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rarefy.kernels.gemv as gemv_pkg  # noqa: E402
from rarefy.kernels.gemv import gemv, gemv_ref, triton_available  # noqa: E402
from triton_interp import kernel_module  # noqa: E402  (tests/kernels is on sys.path)

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def tri():
    """The Triton kernel module, interpreted when there is no GPU."""
    return kernel_module("rarefy.kernels.gemv.triton", "_gemv_kernel")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.double()
    return ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _check(tri, M, N, K, dtype, cfg, with_bias, *, x_noncontig=False, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else hash((M, N, K, str(dtype), str(cfg), with_bias)) % 2**31)
    x = torch.randn(M, K * (2 if x_noncontig else 1), generator=gen).to(dtype)
    if x_noncontig:
        x = x[:, ::2]
        assert not x.is_contiguous()
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if with_bias else None
    x, w = x.to(DEVICE), w.to(DEVICE)
    b = b.to(DEVICE) if b is not None else None
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    res = tri.gemv_triton(x, w, b, out, config=cfg)
    assert res is out
    ref = gemv_ref(x, w, b, out_dtype=torch.float64)
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements"
    err = _rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.3e} (M={M} N={N} K={K} {dtype} {cfg})"
    return out


def _cfg(tri, **kw):
    return tri.GemvConfig(**kw)


# (name, config kwargs) -- the FMA path (M handled one row per program) and the
# tensor-core path, each with and without split-K.
CONFIGS = {
    "fma": dict(block_m=1, block_n=8, block_k=64),
    "fma_pf_fold_split3": dict(block_m=1, block_n=16, block_k=64, split_k=3, prefetch=True, fold=True),
    "fma_pf": dict(block_m=1, block_n=16, block_k=64, prefetch=True),
    "fma_fold_split2": dict(block_m=1, block_n=16, block_k=32, split_k=2, fold=True),
    "dot": dict(block_m=16, block_n=16, block_k=32, use_dot=True),
    "dot_split4": dict(block_m=16, block_n=32, block_k=16, split_k=4, use_dot=True),
    "dot32_split2": dict(block_m=32, block_n=16, block_k=32, split_k=2, use_dot=True),
}

# (M, N, K): odd sizes, K not a multiple of the block, N = 1, N not a multiple of 8.
SHAPES = [(1, 17, 200), (3, 130, 64), (8, 1, 15), (1, 130, 15), (3, 17, 200), (8, 130, 200)]


def _skip_interp(dtype, cfg_kw):
    if not CUDA and dtype == torch.bfloat16 and cfg_kw.get("use_dot"):
        pytest.skip("Triton interpreter computes bf16 tl.dot wrongly; covered on GPU")


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_configs_fp32_and_fp16(tri, cfg_name, M, N, K):
    cfg = _cfg(tri, **CONFIGS[cfg_name])
    dtype = torch.float32 if (M + N + K) % 2 else torch.float16
    _check(tri, M, N, K, dtype, cfg, with_bias=(N % 2 == 0))


@pytest.mark.parametrize("cfg_name", ["fma", "fma_pf_fold_split3", "dot_split4"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 17, 200), (3, 130, 64)])
def test_bf16(tri, cfg_name, with_bias, M, N, K):
    _skip_interp(torch.bfloat16, CONFIGS[cfg_name])
    _check(tri, M, N, K, torch.bfloat16, _cfg(tri, **CONFIGS[cfg_name]), with_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 130, 200), (8, 17, 64), (20, 130, 15), (33, 9, 40)])
def test_default_config(tri, dtype, M, N, K):
    """The launcher's own heuristic (any M, including > 32 via M tiles)."""
    cfg = tri.pick_config(M, N, K, dtype)
    _skip_interp(dtype, {"use_dot": cfg.use_dot})
    _check(tri, M, N, K, dtype, None, with_bias=True)


def test_noncontiguous_x(tri):
    _check(tri, 3, 17, 64, torch.float32, _cfg(tri, **CONFIGS["dot_split4"]), True, x_noncontig=True)
    _check(tri, 1, 17, 64, torch.float16, _cfg(tri, **CONFIGS["fma"]), False, x_noncontig=True)


def test_split_k_workspace_reuse(tri):
    """Counters re-arm themselves: back-to-back split launches, shapes that
    grow the workspace, and one shape again, all stay right."""
    cfg = _cfg(tri, **CONFIGS["fma_pf_fold_split3"])
    for M, N, K in [(1, 17, 200), (1, 130, 200), (1, 17, 200), (1, 17, 200)]:
        _check(tri, M, N, K, torch.float32, cfg, True)
    ws = tri.GemvWorkspace(DEVICE)
    x = torch.randn(2, 96, device=DEVICE)
    w = torch.randn(40, 96, device=DEVICE)
    out = tri.gemv_triton(x, w, config=_cfg(tri, **CONFIGS["dot_split4"]), workspace=ws)
    assert _rel_err(out, gemv_ref(x, w, out_dtype=torch.float64)) < 1e-5
    assert int(ws.counters.abs().sum()) == 0


def test_validation(tri):
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError):
        tri.gemv_triton(x, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(TypeError):
        tri.gemv_triton(x, torch.randn(4, 8, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError):
        tri.gemv_triton(x, torch.randn(4, 8, device=DEVICE), torch.randn(5, device=DEVICE))


def test_ref_matches_linear():
    x = torch.randn(3, 20, dtype=torch.float64)
    w = torch.randn(7, 20, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(gemv_ref(x, w, b), torch.nn.functional.linear(x, w, b))
    assert gemv_ref(x.float(), w.float()).dtype == torch.float32


def test_dispatch_falls_back_on_cpu():
    x = torch.randn(2, 3, 16)
    w = torch.randn(5, 16)
    b = torch.randn(5)
    out = gemv(x, w, b)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b))
    assert isinstance(triton_available(), bool)


# --------------------------------------------------------------------------
# GPU only: real shapes, dispatch, graphs, determinism
# --------------------------------------------------------------------------

REAL_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (34816, 5120), (5120, 17408)]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("N,K", REAL_SHAPES)
@pytest.mark.parametrize("M", [1, 2, 8, 17, 32])
def test_gpu_real_shapes(tri, N, K, M):
    dtype = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
    b = torch.randn(N, device="cuda", dtype=dtype) if M % 2 else None
    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    tri.gemv_triton(x, w, b, out)
    ref = gemv_ref(x, w, b, out_dtype=torch.float64)
    assert not torch.isnan(out).any()
    assert _rel_err(out, ref) < 1e-2
    # public dispatch takes the Triton path here
    assert gemv_pkg._use_triton(x, w, b)
    assert _rel_err(gemv(x, w, b), ref) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_graph_capture_and_determinism(tri, dtype):
    """Split-K launches captured in a CUDA graph give the same bits as eager."""
    shapes = [(1, 4096, 4096), (8, 4096, 14336), (32, 4096, 4096), (1, 6144, 4096)]
    xs, ws, outs, eager = [], [], [], []
    for M, N, K in shapes:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        w = (torch.randn(N, K, device="cuda") / K**0.5).to(dtype)
        xs.append(x)
        ws.append(w)
        eager.append(tri.gemv_triton(x, w).clone())
        assert torch.equal(tri.gemv_triton(x, w), eager[-1]), "split-K result not deterministic"
        outs.append(torch.full((M, N), float("nan"), device="cuda", dtype=dtype))
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for x, w, o in zip(xs, ws, outs):
            tri.gemv_triton(x, w, out=o)
    for _ in range(3):
        for o in outs:
            o.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        for o, e in zip(outs, eager):
            assert torch.equal(o, e)
