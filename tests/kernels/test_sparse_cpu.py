"""Tests for the bitmap sparse matmul CPU extension (rarefy.kernels.sparse_cpu).

Every result is compared with a float64 reference on the exact stored values, element by
element, against the worst-case fp32 summation bound (k + 2) * 2^-24 * (|x| @ |W|^T + |bias|),
which holds for any summation order. Every available code path (scalar, AVX-512, AVX-512 +
VBMI2) is run. The extension builds once per machine (cached by torch).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from rarefy.formats.sparse_weight import NMSparse, TiledBitmap
from rarefy.kernels import sparse_cpu
from rarefy.kernels.sparse_cpu import bitmap_args, bitmap_matmul, bitmap_matmul_ref, densify

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert sparse_cpu.warm_up(), f"bitmap_matmul extension unavailable: {sparse_cpu._state['error']}"


def _isas():
    return list(range(sparse_cpu.best_isa() + 1))


def _weight(n, k, sparsity, dtype, g):
    """Random [n, k] weight (already rounded to dtype) with about `sparsity` zeros."""
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    return w.to(dtype)


def _check(y, x, args, bias=None):
    bitmask, values, row_start, k = args
    ref = bitmap_matmul_ref(x, bitmask, values, row_start, k, bias)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.isfinite(y).all(), "non-finite output"
    w = densify(bitmask, values, row_start, k).double()
    bound = x.double().abs() @ w.abs().t()
    if bias is not None:
        bound = bound + bias.double().abs()
    tol = (k + 2) * 2.0**-24 * bound + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_odd_shapes(dtype):
    """K around word boundaries and large, N 1/7/193, M 1..17, sparsity 0..99%, bias on/off."""
    g = torch.Generator().manual_seed(0)
    sparsities = [0.0, 0.5, 0.7, 0.99]
    for i, (k, n, m) in enumerate(itertools.product([1, 31, 32, 33, 45, 577], [1, 7, 193], [1, 3, 8, 17])):
        w = _weight(n, k, sparsities[i % 4], dtype, g)
        args = bitmap_args(TiledBitmap.from_dense(w))
        x = torch.randn(m, k, generator=g)
        bias = torch.randn(n, generator=g) if i % 2 else None
        for isa in _isas():
            _check(bitmap_matmul(x, *args, bias, isa=isa), x, args, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_rows_and_words(dtype):
    """Empty rows, all-zero and fully dense words (mask -1), single bits at word edges."""
    g = torch.Generator().manual_seed(1)
    n, k = 12, 100  # Kw = 4, last word holds 4 columns
    w = torch.randn(n, k, generator=g)
    w[0] = 0                    # empty row
    w[1, 32:64] = 0             # one all-zero word in the middle
    w[3] = 0
    w[3, [0, 31, 32, 63, 64, 95, 96, 99]] = 1.5  # only word-edge columns
    w[5, :] = 0
    w[5, 99] = -2.0             # last column only
    w[7] = 0                    # second empty row; rows 2, 4, 6, 8.. stay fully dense
    w = w.to(dtype)
    args = bitmap_args(TiledBitmap.from_dense(w))
    assert (args[0][2, :3] == -1).all()  # fully dense words really are 0xffffffff
    for m in [1, 4, 9]:
        x = torch.randn(m, k, generator=g)
        for isa in _isas():
            y = bitmap_matmul(x, *args, isa=isa)
            _check(y, x, args)
            assert (y[:, [0, 7]] == 0).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.99, 1.0])
def test_extreme_sparsity(sparsity):
    g = torch.Generator().manual_seed(2)
    w = _weight(64, 300, sparsity, torch.float16, g)
    args = bitmap_args(TiledBitmap.from_dense(w))
    x = torch.randn(5, 300, generator=g)
    b = torch.randn(64, generator=g)
    for isa in _isas():
        _check(bitmap_matmul(x, *args, b, isa=isa), x, args, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nmsparse_layout(dtype):
    """NMSparse (2:4, explicit zeros stored) through bitmap_args: values [N, G*n], row_start n*G*n."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 70, generator=g)
    keep = torch.rand(40, 18, 4, generator=g).argsort(-1)[..., :2]  # 2 of every 4 (K padded to 72)
    mask = torch.zeros(40, 18, 4, dtype=torch.bool).scatter_(-1, keep, True).view(40, 72)[:, :70]
    w = (w * mask).to(dtype)
    nm = NMSparse.from_dense(w, 2, 4)
    args = bitmap_args(nm)
    assert args[1].dim() == 1 and int(args[2][-1]) == 39 * nm.values.shape[1]
    x = torch.randn(3, 70, generator=g)
    for isa in _isas():
        y = bitmap_matmul(x, *args, isa=isa)
        _check(y, x, args)
        # values as stored ([N, G*n], contiguous) work too
        torch.testing.assert_close(bitmap_matmul(x, args[0], nm.values, args[2], 70, isa=isa), y, rtol=0, atol=0)
    torch.testing.assert_close(densify(*args), w, rtol=0, atol=0)


def test_padding_bits_past_k_are_ignored():
    """Bits at columns >= k (NMSparse pads its last group) consume a value each, which is
    ignored even if it is nan or inf."""
    g = torch.Generator().manual_seed(8)
    k = 40  # Kw = 2, columns 40..63 are padding
    w = _weight(5, k, 0.5, torch.float16, g)
    tb = TiledBitmap.from_dense(w)
    chunks, starts, pos = [], [], 0
    for r in range(5):
        starts.append(pos)
        chunks.append(w[r][w[r] != 0])
        chunks.append(torch.tensor([float("nan"), float("inf")], dtype=torch.float16))  # cols 41, 63
        pos += chunks[-2].numel() + 2
    bm = tb.bitmask.clone()
    bm[:, 1] |= (1 << 9) | (-(1 << 31))  # word 1: bits 9 (col 41) and 31 (col 63)
    args = (bm, torch.cat(chunks), torch.tensor(starts, dtype=torch.int32), k)
    for m in [1, 3, 12]:
        x = torch.randn(m, k, generator=g)
        ref = x.double() @ w.double().t()
        for isa in _isas():
            y = bitmap_matmul(x, *args, isa=isa)
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_rows_stored_out_of_order():
    """row_start may point anywhere: rows stored in reverse order, with a gap."""
    g = torch.Generator().manual_seed(4)
    w = _weight(9, 77, 0.6, torch.float16, g)
    tb = TiledBitmap.from_dense(w)
    counts = (w != 0).sum(1).tolist()
    chunks, starts, pos = [], [0] * 9, 5  # 5 junk values first
    chunks.append(torch.full((5,), float("nan"), dtype=torch.float16))
    for r in reversed(range(9)):
        starts[r] = pos
        chunks.append(w[r][w[r] != 0])
        pos += counts[r]
    args = (tb.bitmask, torch.cat(chunks), torch.tensor(starts, dtype=torch.int32), 77)
    x = torch.randn(2, 77, generator=g)
    for isa in _isas():
        _check(bitmap_matmul(x, *args, isa=isa), x, args)


def test_large_m_and_thread_invariance():
    """M > 8 takes the decode-to-buffer path (N not a multiple of 4); results do not depend
    on the thread count (each output is summed by one thread in a fixed order)."""
    g = torch.Generator().manual_seed(5)
    w = _weight(1031, 600, 0.5, torch.float16, g)
    args = bitmap_args(TiledBitmap.from_dense(w))
    for m in [9, 64]:
        x = torch.randn(m, 600, generator=g)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            y1 = bitmap_matmul(x, *args)
            torch.set_num_threads(max(2, old))
            y2 = bitmap_matmul(x, *args)
        finally:
            torch.set_num_threads(old)
        _check(y1, x, args)
        assert torch.equal(y1, y2)


def test_leading_dims_noncontiguous_and_empty():
    g = torch.Generator().manual_seed(6)
    w = _weight(33, 100, 0.5, torch.bfloat16, g)
    args = bitmap_args(TiledBitmap.from_dense(w))
    x = torch.randn(6, 100, generator=g)
    y = bitmap_matmul(x, *args)
    assert bitmap_matmul(x.view(2, 3, 100), *args).shape == (2, 3, 33)
    torch.testing.assert_close(bitmap_matmul(x.view(2, 3, 100), *args).view(6, 33), y, rtol=0, atol=0)
    y1 = bitmap_matmul(x[0], *args)  # 1-D x -> [N]; M = 1 sums in another order than M = 6
    assert y1.shape == (33,)
    _check(y1[None], x[:1], args)
    xt = torch.randn(100, 6, generator=g).t()  # non-contiguous: copied
    _check(bitmap_matmul(xt, *args), xt, args)
    assert bitmap_matmul(torch.randn(0, 100), *args).shape == (0, 33)
    empty = bitmap_args(TiledBitmap.from_dense(torch.zeros(0, 100, dtype=torch.float16)))
    assert bitmap_matmul(x, *empty).shape == (6, 0)


def test_bad_inputs_raise_clearly():
    g = torch.Generator().manual_seed(7)
    w = _weight(8, 70, 0.5, torch.float16, g)
    bm, vals, rs, k = bitmap_args(TiledBitmap.from_dense(w))
    x = torch.randn(2, 70, generator=g)
    cases = [
        (TypeError, "x must be float32", (x.double(), bm, vals, rs, k)),
        (TypeError, "bitmask must be int32", (x, bm.long(), vals, rs, k)),
        (TypeError, "row_start must be int32", (x, bm, vals, rs.long(), k)),
        (TypeError, "values must be", (x, bm, vals.to(torch.int16), rs, k)),
        (ValueError, "K = k", (x, bm, vals, rs, 71)),
        (ValueError, "bitmask must be", (x[:, :64], bm, vals, rs, 64)),
        (ValueError, "row_start must be", (x, bm, vals, rs[:-1], k)),
        (ValueError, "contiguous", (x, bm, torch.stack([vals, vals], 1)[:, 0], rs, k)),
        (ValueError, "but values has", (x, bm, vals[:-1], rs, k)),
        (ValueError, "but values has", (x, bm, vals, rs - 1, k)),
        (ValueError, "but values has", (x, bm, vals, rs + 10**6, k)),
        (ValueError, "bias must be", (x, bm, vals, rs, k, torch.zeros(7))),
        (TypeError, "bias must be float32", (x, bm, vals, rs, k, torch.zeros(8, dtype=torch.float64))),
    ]
    for isa in _isas():
        for exc, msg, a in cases:
            with pytest.raises(exc, match=msg):
                bitmap_matmul(*a, isa=isa)
    with pytest.raises((RuntimeError, ValueError)):
        bitmap_matmul(x, bm, vals, rs, k, isa=sparse_cpu.best_isa() + 1)
    with pytest.raises(TypeError):
        bitmap_args(w)


def test_isa_names():
    assert sparse_cpu.best_isa() in sparse_cpu.ISA_NAMES
    assert sparse_cpu.build_seconds() is not None


def test_opaque_to_torch_compile():
    # a CPU-only kernel plus a shape-only fake: a compiled decode step keeps the sparse matmul
    # as one opaque call (fullgraph, no graph break) with the eager result bit for bit
    g = torch.Generator().manual_seed(23)
    w = _weight(70, 100, 0.5, torch.float16, g)
    args = bitmap_args(TiledBitmap.from_dense(w))
    x = torch.randn(1, 100, generator=g)

    def step(x):
        return bitmap_matmul(x, *args) * 2  # exact, so compiled == eager bit for bit

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, dynamic=False)(x)
    assert torch.equal(got, step(x))
    _check(bitmap_matmul(x, *args), x, args)
