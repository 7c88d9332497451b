"""Ternary + activation sparsity: the transposed layout T1, the C++ input-sparse ternary GEMV
on every code path this CPU has, and the Triton version under the interpreter (or on a GPU).

The CPU kernel quantizes the active inputs to 16-bit fixed point per token and sums in
integers, so its error against the float64 reference is bounded by
s * sum_j |q[n, j]| * amax / 65534 (+ fp32 rounding of the final scaling), and every code
path gives the same bits.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rarefy.errors import RarefyError  # noqa: E402
from rarefy.kernels import ternary_sparse_cpu as T  # noqa: E402
from rarefy.lowbit.composed import pack_ternary_t, transpose_packed, unpack_ternary_t  # noqa: E402
from rarefy.lowbit.ternary import pack_ternary  # noqa: E402
from triton_interp import CUDA, kernel_module  # noqa: E402


def _codes(n, k, g, zero_frac=0.33):
    c = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    return c


def _x_with_sparsity(m, k, frac, g):
    """x and a threshold leaving about `frac` of the inputs below it (per token)."""
    x = torch.randn(m, k, generator=g)
    thr = float(torch.quantile(x.abs().flatten(), frac)) if frac > 0 else 0.0
    return x, thr


# -- layout ----------------------------------------------------------------------------

def test_layout_t1_is_pinned_by_a_hand_written_example():
    # W [N=5, K=2]: column 0 = [-1, 0, 1, 1, 0], column 1 = [1, 1, 1, 1, -1]
    w = torch.tensor([[-1, 1], [0, 1], [1, 1], [1, 1], [0, -1]], dtype=torch.int8)
    wt = pack_ternary_t(w)
    assert wt.dtype == torch.uint8 and wt.shape == (2, 2)
    assert wt.tolist() == [[0xA4, 0x55], [0xAA, 0x54]]  # layout v1 of W^T (docs/lowbit-formats.md)
    assert torch.equal(unpack_ternary_t(wt, 5), w)
    assert torch.equal(transpose_packed(pack_ternary(w), 2), wt)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (8, 4), (13, 33)])
def test_layout_round_trip(n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    c = _codes(n, k, g)
    assert torch.equal(unpack_ternary_t(pack_ternary_t(c), n), c)


# -- CPU kernel ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built():
    if not T.warm_up():
        pytest.skip(f"ternary input-sparse extension unavailable: {T._state['error']}")


def _check(y, x, codes, scale, thr, bias=None):
    ref = T.ternary_input_sparse_ref(x, codes, scale, thr, bias)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    xm = torch.where(x.abs() >= thr, x, torch.zeros(()))
    amax = xm.abs().amax(-1, keepdim=True).double()
    s = float(scale.reshape(-1)[0])
    bound = s * amax / 65534 * codes.abs().sum(1).double()[None, :] * 1.0001
    bound = bound + 2e-6 * (ref.abs() + s * xm.double().abs() @ codes.abs().double().t() + 1e-30)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"


def test_kernel_odd_shapes_every_path(built):
    """N around multiples of 4 / 64-byte blocks, K odd, M 1..9, sparsity 0..99%, bias on/off;
    every code path and both work splits (output stripes, active inputs over threads)."""
    g = torch.Generator().manual_seed(0)
    fracs = [0.0, 0.25, 0.5, 0.99]
    for i, (n, k, m) in enumerate(itertools.product([1, 3, 5, 64, 257, 1030], [1, 7, 65, 300], [1, 2, 3, 5, 9])):
        c = _codes(n, k, g)
        x, thr = _x_with_sparsity(m, k, fracs[i % 4], g)
        scale = torch.tensor([[0.05 + 0.01 * i]])
        bias = torch.randn(n, generator=g) if i % 3 == 0 else None
        wt = pack_ternary_t(c)
        ys = [T.ternary_input_sparse_gemv(x, wt, scale, n, thr, bias, isa=isa, ksplit=ks)
              for isa in range(T.best_isa() + 1) for ks in (-1, 0, 1)]
        _check(ys[0], x, c, scale, thr, bias)
        for y in ys[1:]:
            assert torch.equal(y, ys[0]), "code paths or work splits disagree"


def test_all_inactive_and_all_active(built):
    g = torch.Generator().manual_seed(1)
    c = _codes(100, 200, g)
    x = torch.randn(2, 200, generator=g)
    wt = pack_ternary_t(c)
    s = torch.tensor([[0.1]])
    bias = torch.randn(100, generator=g)
    for isa in range(T.best_isa() + 1):
        y = T.ternary_input_sparse_gemv(x, wt, s, 100, 1e6, bias, isa=isa)  # nothing active: y = bias
        assert torch.equal(y, bias.expand(2, 100))
        _check(T.ternary_input_sparse_gemv(x, wt, s, 100, 0.0, isa=isa), x, c, s, 0.0)  # everything active
    # a zero input row and per-token masks inside a union
    x[0] = 0
    _check(T.ternary_input_sparse_gemv(x, wt, s, 100, 0.3), x, c, s, 0.3)
    # an all-zero weight
    z = torch.zeros(9, 40, dtype=torch.int8)
    y = T.ternary_input_sparse_gemv(torch.randn(1, 40), pack_ternary_t(z), s, 9, 0.0)
    assert bool((y == 0).all())


def test_threads_do_not_change_results(built):
    g = torch.Generator().manual_seed(2)
    c = _codes(2048, 256, g)
    x, thr = _x_with_sparsity(1, 256, 0.4, g)
    wt, s = pack_ternary_t(c), torch.tensor([[0.02]])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = T.ternary_input_sparse_gemv(x, wt, s, 2048, thr)
        torch.set_num_threads(2)
        y2 = T.ternary_input_sparse_gemv(x, wt, s, 2048, thr)
        y3 = T.ternary_input_sparse_gemv(x, wt, s, 2048, thr, ksplit=1)
        assert torch.equal(y1, y3)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)


def test_kernel_rejects_bad_input(built):
    wt = pack_ternary_t(torch.zeros(8, 16, dtype=torch.int8))
    s = torch.tensor([[0.1]])
    x = torch.randn(1, 16)
    with pytest.raises(RarefyError, match="threshold"):
        T.ternary_input_sparse_gemv(x, wt, s, 8, -1.0)
    with pytest.raises(RarefyError, match="threshold"):
        T.ternary_input_sparse_gemv(x, wt, s, 8, float("nan"))
    with pytest.raises(RarefyError, match="wt must be contiguous"):
        T.ternary_input_sparse_gemv(x, wt, s, 12, 0.0)  # 12 outputs need 3 bytes per row
    with pytest.raises(RarefyError, match="x must be"):
        T.ternary_input_sparse_gemv(torch.randn(1, 15), wt, s, 8, 0.0)
    with pytest.raises(RarefyError, match="per-tensor scale"):
        T.ternary_input_sparse_gemv(x, wt, torch.ones(8, 1), 8, 0.0)
    with pytest.raises(RarefyError, match="x must be float32"):
        T.ternary_input_sparse_gemv(x.double(), wt, s, 8, 0.0)
    with pytest.raises(RarefyError, match="uint8"):
        T.ternary_input_sparse_gemv(x, wt.to(torch.int8), s, 8, 0.0)


# -- Triton -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kern():
    return kernel_module("rarefy.kernels.ternary_sparse.triton", "_ternary_input_sparse_kernel")


@pytest.mark.parametrize("n,k,frac,cfg", [
    (5, 7, 0.0, {}),
    (64, 128, 0.5, {"block_n": 64, "block_k": 32}),
    (130, 65, 0.99, {"block_n": 32, "block_k": 16}),
    (33, 300, 0.25, {"block_n": 16, "block_k": 64}),
    (12, 40, 1.0, {"block_n": 16, "block_k": 16}),
    (40, 200, 0.4, {"block_n": 16, "block_k": 16, "split_k": 3}),
    (9, 70, 0.5, {"block_n": 8, "block_k": 32, "split_k": 8}),
])
def test_triton_kernel(kern, n, k, frac, cfg):
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(3)
    c = _codes(n, k, g)
    x = torch.randn(1, k, generator=g)
    thr = float(torch.quantile(x.abs(), frac)) if 0 < frac < 1 else (0.0 if frac == 0 else 1e9)
    s = torch.tensor([[0.07]])
    bias = torch.randn(n, generator=g) if n % 2 else None
    cfg = kern.TernarySparseConfig(**cfg) if cfg else None
    y = kern.ternary_input_sparse_triton(x.to(dev), pack_ternary_t(c).to(dev), s.to(dev), n, thr,
                                         None if bias is None else bias.to(dev), config=cfg)
    ref = T.ternary_input_sparse_ref(x, c, s, thr, bias)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_half(kern, dtype):
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(4)
    c = _codes(48, 96, g)
    x = torch.randn(1, 96, generator=g).to(dtype)
    s = torch.tensor([[0.07]])
    y = kern.ternary_input_sparse_triton(x.to(dev), pack_ternary_t(c).to(dev), s.to(dev), 48, 0.5)
    assert y.dtype == dtype
    ref = T.ternary_input_sparse_ref(x.float(), c, s, 0.5)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=2e-2, atol=2e-2)


def test_triton_rejects_bad_input(kern):
    wt = pack_ternary_t(torch.zeros(8, 16, dtype=torch.int8))
    s = torch.tensor([[0.1]])
    with pytest.raises(ValueError, match="wt must be"):
        kern.ternary_input_sparse_triton(torch.randn(1, 16), wt, s, 12, 0.0)
    with pytest.raises(ValueError, match="per-tensor"):
        kern.ternary_input_sparse_triton(torch.randn(1, 16), wt, torch.ones(8, 1), 8, 0.0)
