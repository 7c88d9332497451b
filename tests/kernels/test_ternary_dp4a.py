"""The dp4a ternary GEMV (int8 activations on the integer dot-product unit) against the
float64 reference: odd N, split K, all-zero / all-(+1) / all-(-1) rows, the activation
reordering, and the per-token quantization bit for bit. Under TRITON_INTERPRET the dp4a is
emulated; on a GPU the inline PTX runs (and Llama-3-8B shapes are checked)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_interp import CUDA, kernel_module

from rarefy.kernels.lowbit_gemv import ref as R
from rarefy.lowbit.ternary import pack_ternary, quantize_ternary_values

pytest.importorskip("triton")
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def td():
    return kernel_module("rarefy.kernels.lowbit_gemv.triton_ternary_dp4a", "_ternary_dp4a_kernel")


def _ternary(n, k, gen):
    w = torch.randn(n, k, generator=gen)
    q, s = quantize_ternary_values(w)
    if n > 3:
        q[0] = 0
        q[1] = 1
        q[2] = -1
    return pack_ternary(q), s, q


def test_dp4a_order_is_the_documented_transpose(td):
    xq = torch.arange(32, dtype=torch.int8).reshape(1, 32)
    o = td.dp4a_order(xq)[0].tolist()
    # byte 16g + 4t + i holds element 16g + 4i + t
    assert o[:8] == [0, 4, 8, 12, 1, 5, 9, 13] and o[16:20] == [16, 20, 24, 28]


@pytest.mark.parametrize("m,k", [(1, 48), (3, 160), (2, 4096), (1, 16400)])  # last: the two-pass branch
def test_quantize_act_dp4a_matches_reference(td, m, k):
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=gen) * 3).to(DEV)
    if m > 1:
        x[1] = 0  # an all-zero row: amax clamps to 1e-5
    xq, xs = td.quantize_act_dp4a(x)
    rq, rs = R.quantize_act_int8_ref(x.float().cpu())
    assert torch.equal(xq.cpu(), td.dp4a_order(rq))
    assert torch.allclose(xs.cpu(), rs.reshape(-1).float(), rtol=0, atol=0)
    # the torch-op version torch.compile traces (and fuses into x's producer) is the same
    tq, ts = R.quantize_act_dp4a_ref(x.float().cpu())
    assert torch.equal(tq, xq.cpu()) and torch.equal(ts, xs.cpu())


@pytest.mark.parametrize("n,k,split,bn", [(7, 48, 1, 8), (33, 160, 2, 4), (5, 2048, 4, 8), (64, 512, 1, 16)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_dp4a_kernel_against_reference(td, n, k, split, bn, prefetch):
    gen = torch.Generator().manual_seed(n * 7 + k)
    packed, s, q = _ternary(n, k, gen)
    x = torch.randn(2, k, generator=gen)
    xq, xs = R.quantize_act_int8_ref(x)
    cfg = td.Dp4aConfig(block_n=bn, block_u=32 if k < 4096 else 128, split_k=split, num_warps=1, prefetch=prefetch)
    out = torch.full((2, n), float("nan"), device=DEV)
    y = td.ternary_dp4a_triton(td.dp4a_order(xq).to(DEV), xs.reshape(-1).to(DEV), packed.to(DEV), s.to(DEV),
                               config=cfg, out=out)
    assert torch.isfinite(y).all()
    # integer products: the reference in float64 is exact, the kernel's only rounding is the
    # final float32 multiply by the two scales
    ref = (xq.double() @ q.double().t()) * s.double() * xs.double().reshape(-1, 1)
    assert torch.allclose(y.double().cpu(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_dp4a_rejects_bad_shapes(td):
    packed = torch.zeros(4, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="K % 16"):
        td.ternary_dp4a_triton(torch.zeros(1, 20, dtype=torch.int8), torch.ones(1), packed, torch.ones(1))
    with pytest.raises(ValueError, match="per-row"):
        td.ternary_dp4a_triton(torch.zeros(1, 16, dtype=torch.int8), torch.ones(1),
                               torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4, 2))
    with pytest.raises(ValueError, match="K % 16"):
        td.quantize_act_dp4a(torch.zeros(1, 20))


def test_dp4a_per_row_scale(td):
    """Stacked per-tensor layers (q/k/v) keep one scale per row."""
    gen = torch.Generator().manual_seed(5)
    packed, _, q = _ternary(21, 64, gen)
    s = torch.rand(21, 1, generator=gen) + 0.5
    x = torch.randn(1, 64, generator=gen)
    xq, xs = R.quantize_act_int8_ref(x)
    y = td.ternary_dp4a_triton(td.dp4a_order(xq).to(DEV), xs.reshape(-1).to(DEV), packed.to(DEV), s.to(DEV),
                               config=td.Dp4aConfig(block_n=4, block_u=4, num_warps=1))
    ref = (xq.double() @ q.double().t()) * s.double().t() * xs.double().reshape(-1, 1)
    assert torch.allclose(y.double().cpu(), ref, rtol=1e-6, atol=1e-9)


def test_public_int8act_routes_to_dp4a_and_matches(td):
    """ternary_matmul_int8act on float x: the dp4a route on a GPU, the reference elsewhere;
    the same integers either way (per-tensor and whole-row group scales)."""
    from rarefy.kernels.lowbit_gemv import ternary_matmul_int8act
    gen = torch.Generator().manual_seed(9)
    packed, s, _ = _ternary(40, 128, gen)
    x = torch.randn(2, 128, generator=gen)
    for scale, gs in ((s, None), (torch.rand(40, 1, generator=gen) + 0.5, 128)):
        y = ternary_matmul_int8act(x.to(DEV), packed.to(DEV), scale.to(DEV), gs, out_dtype=torch.float32)
        ref = R.ternary_matmul_int8act_ref(x, packed, scale, gs, out_dtype=torch.float32)
        assert torch.allclose(y.cpu(), ref.float(), rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_dp4a_llama_shapes_gpu(td, n, k):
    gen = torch.Generator().manual_seed(n + k)
    packed, s, q = _ternary(n, k, gen)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()
    xq, xs = td.quantize_act_dp4a(x)
    y = td.ternary_dp4a_triton(xq, xs, packed.cuda(), s.cuda())
    rq, rs = R.quantize_act_int8_ref(x.float().cpu())
    ref = (rq.double() @ q.double().t()) * s.double() * rs.double().reshape(-1, 1)
    assert torch.allclose(y.double().cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_compiled_int8act_traces_the_quantization_gpu():
    """Under torch.compile the dp4a route quantizes with traced torch ops (fused by inductor into
    the multiply that produces x here). fp32 x, so eager and compiled quantize the same values:
    the same products but for the rounding of the odd activation."""
    import rarefy.kernels.lowbit_gemv as lg
    k, n = 4096, 1024
    gen = torch.Generator().manual_seed(2)
    packed, s, _ = _ternary(n, k, gen)
    packed, s = packed.cuda(), s.cuda()
    w = (torch.rand(k, generator=gen) + 0.5).cuda()
    x = torch.randn(1, k, generator=gen).cuda()

    def f(x):
        return lg.ternary_matmul_int8act(x * w, packed, s, out_dtype=torch.float32)

    eager = f(x)
    assert lg.TRACED_DP4A_QUANT
    compiled = torch.compile(f)(x)
    assert torch.isfinite(compiled).all()
    assert float((compiled - eager).norm() / eager.norm()) < 1e-4
