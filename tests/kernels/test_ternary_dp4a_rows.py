"""The "rows" dp4a ternary GEMV (persistent programs, a warp per row group, 16-byte loads, masks
without shifts) against the float64 reference: odd N, programs looping over several row
groups, partial steps, all-zero /
all-(+1) / all-(-1) rows, per-row scales, the largest activation magnitudes (the 4^t-scaled
accumulators must not overflow), and bad shapes. Under TRITON_INTERPRET the dp4a is emulated;
on a GPU the inline PTX runs, at the Llama-3-8B shapes too."""

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
def tr():
    kernel_module("rarefy.kernels.lowbit_gemv.triton_ternary_dp4a", "_ternary_dp4a_kernel")
    return kernel_module("rarefy.kernels.lowbit_gemv.triton_ternary_dp4a_rows", "_ternary_dp4a_rows_kernel")


@pytest.fixture(scope="module")
def td():
    return kernel_module("rarefy.kernels.lowbit_gemv.triton_ternary_dp4a", "_ternary_dp4a_kernel")


def _ternary(n, k, gen):
    q, s = quantize_ternary_values(torch.randn(n, k, generator=gen))
    if n > 3:
        q[0], q[1], q[2] = 0, 1, -1
    return pack_ternary(q), s, q


def _check(tr, td, n, k, cfg, m=2, scale=None, x=None, seed=0):
    gen = torch.Generator().manual_seed(seed + n * 7 + k)
    packed, s, q = _ternary(n, k, gen)
    s = s if scale is None else scale
    x = torch.randn(m, k, generator=gen) if x is None else x
    xq, xs = R.quantize_act_int8_ref(x)
    out = torch.full((x.shape[0], n), float("nan"), device=DEV)
    y = tr.ternary_dp4a_rows_triton(td.dp4a_order(xq).to(DEV), xs.reshape(-1).to(DEV), packed.to(DEV), s.to(DEV),
                                    config=cfg, out=out)
    assert torch.isfinite(y).all()
    sc = s.double().reshape(1, -1) if s.numel() > 1 else s.double()
    ref = (xq.double() @ q.double().t()) * sc * xs.double().reshape(-1, 1)
    assert torch.allclose(y.double().cpu(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("n,k,rows,warps,progs", [
    (7, 64, 4, 1, 2),        # one partial step (8 of 32 lanes' worth of words), N not a multiple of the rows
    (33, 192, 2, 1, 2),      # 12 words: 3 lanes' worth
    (9, 2112, 4, 1, 2),      # 132 words: a whole step then a partial one
    (600, 128, 2, 1, 1),     # 300 row groups on 132 programs: 2-3 groups each (the persistent loop)
    (300, 1024, 1, 2, 1),    # two warps a program, 150 groups: the second group of 18 programs
    (5, 2048, 8, 1, 2),      # more rows a warp than N
])
def test_rows_kernel_against_reference(tr, td, n, k, rows, warps, progs):
    _check(tr, td, n, k, tr.Dp4aRowsConfig(rows, warps, progs, pdl=False))


def test_rows_kernel_extreme_activations_do_not_overflow(tr, td):
    # every activation at 127 and every weight of row 1 at +1 (code 2): the 4^3-scaled
    # accumulator of t = 3 sums 64 * 2 * 127 per lane and word, K / 128 words a lane
    k = 8192
    x = torch.full((1, k), 5.0)
    _check(tr, td, 4, k, tr.Dp4aRowsConfig(4, 1, 2, pdl=False), x=x)


def test_rows_kernel_per_row_scale(tr, td):
    gen = torch.Generator().manual_seed(3)
    _check(tr, td, 21, 128, tr.Dp4aRowsConfig(4, 1, 2, pdl=False), m=1,
           scale=torch.rand(21, 1, generator=gen) + 0.5)


def test_rows_kernel_rejects_bad_shapes(tr):
    with pytest.raises(ValueError, match="K % 64"):
        tr.ternary_dp4a_rows_triton(torch.zeros(1, 48, dtype=torch.int8), torch.ones(1),
                                    torch.zeros(4, 12, dtype=torch.uint8), torch.ones(1))
    with pytest.raises(ValueError, match="per-row"):
        tr.ternary_dp4a_rows_triton(torch.zeros(1, 64, dtype=torch.int8), torch.ones(1),
                                    torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2))


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_rows_llama_shapes_gpu(tr, td, n, k):
    gen = torch.Generator().manual_seed(n + k)
    packed, s, q = _ternary(n, k, gen)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()
    xq, xs = td.quantize_act_dp4a(x)
    y = tr.ternary_dp4a_rows_triton(xq, xs, packed.cuda(), s.cuda())
    rq, rs = R.quantize_act_int8_ref(x.float().cpu())
    ref = (rq.double() @ q.double().t()) * s.double() * rs.double().reshape(-1, 1)
    assert torch.allclose(y.double().cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
