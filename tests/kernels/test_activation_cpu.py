"""Tests for the input-sparse (activation sparsity) CPU kernel (rarefy.kernels.activation_cpu).

Every result is compared with the float64 reference on the exact stored weight values, element
by element, against the worst-case fp32 summation bound (K + 2) * 2^-24 * (|xm| @ |wt| + |bias|),
which holds for any summation order. Every code path this CPU has (scalar, AVX2, AVX-512) is
run on fresh random inputs. The extension builds once per machine (cached by torch).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rarefy.kernels import activation_cpu
from rarefy.kernels.activation_cpu import (dense_crossover, input_sparse_matmul_cpu, input_sparse_matmul_cpu_ref,
                                           union_density, use_sparse)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert activation_cpu.warm_up(), f"input_sparse_matmul extension unavailable: {activation_cpu._state['error']}"


def _isas():
    return list(range(activation_cpu.best_isa() + 1))


def _raw(x, wt, t, bias=None, isa=-1, group=0, pf=-1, ksplit=-1):
    """The op itself, with the tuning knobs (rows per register pass, prefetch distance, work split)."""
    return torch.ops.rarefy_actsparse.input_sparse_matmul(x, wt, float(t), bias, isa, group, pf, ksplit)


def _inputs(m, k, n, dtype, bias, g, sparsity=0.5):
    """Random x, wt (already rounded to dtype), bias and the threshold that zeroes ~sparsity of x."""
    x = torch.randn(m, k, generator=g)
    wt = (torch.randn(k, n, generator=g) / max(1, k) ** 0.5).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    t = x.abs().flatten().quantile(sparsity).item() if x.numel() and sparsity > 0 else 0.0
    return x, wt, b, t


def _check(y, x, wt, t, bias=None):
    ref = input_sparse_matmul_cpu_ref(x, wt, t, bias)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.isfinite(y).all(), "NaN/inf in the output"
    xm = input_sparse_matmul_cpu_ref(x, torch.eye(x.shape[1], dtype=torch.float64), t).abs()
    mag = xm @ wt.double().abs() + (bias.double().abs() if bias is not None else 0)
    bound = (x.shape[1] + 2) * 2.0**-24 * mag + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max().item()} vs bound {bound.max().item()}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_odd_shapes(dtype):
    """M x K x N over odd sizes (N < 16, not multiples of 16/32/64), every code path, +-bias."""
    g = torch.Generator().manual_seed(0)
    for m, k, n in itertools.product([1, 3, 17], [1, 15, 16, 17, 100], [1, 5, 15, 16, 17, 33, 100, 130]):
        bias = (m + k + n) % 2 == 0
        x, wt, b, t = _inputs(m, k, n, dtype, bias, g)
        for isa in _isas():
            _check(input_sparse_matmul_cpu(x, wt, t, b, isa=isa), x, wt, t, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_model_shapes(dtype, sparsity):
    """SmolLM2-135M layer shapes (wt [K, N]) at several sparsities, batch 1 and 4."""
    g = torch.Generator().manual_seed(1)
    for m, (k, n) in itertools.product([1, 4], [(576, 576), (576, 192), (576, 1536), (1536, 576)]):
        x, wt, b, t = _inputs(m, k, n, dtype, True, g, sparsity)
        for isa in _isas():
            _check(input_sparse_matmul_cpu(x, wt, t, b, isa=isa), x, wt, t, b)


@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 17, 64])
def test_token_tiles(m):
    """Every register tile size (1..8 tokens, AVX2 1..4) and M past several tiles."""
    g = torch.Generator().manual_seed(m)
    x, wt, b, t = _inputs(m, 300, 200, torch.float16, True, g, 0.6)
    for isa in _isas():
        _check(input_sparse_matmul_cpu(x, wt, t, b, isa=isa), x, wt, t, b)


def test_prefill_sized_x():
    """M * K past the kept per-thread buffers (freed after the call), and many row groups."""
    g = torch.Generator().manual_seed(8)
    x, wt, b, t = _inputs(300, 4000, 70, torch.float16, True, g, 0.7)
    _check(input_sparse_matmul_cpu(x, wt, t, b), x, wt, t, b)
    _check(input_sparse_matmul_cpu(x[:2], wt, t, b), x[:2], wt, t, b)


@pytest.mark.parametrize("group,pf", [(1, 0), (3, 64), (5, 1024), (32, 100000), (10**6, -1)])
def test_row_groups_and_prefetch(group, pf):
    """Group boundaries (rows per register pass) and the prefetch target switching groups."""
    g = torch.Generator().manual_seed(group)
    for m, k, n, dtype in [(1, 200, 300, torch.float16), (3, 77, 1000, torch.float32), (9, 64, 70, torch.bfloat16)]:
        x, wt, b, t = _inputs(m, k, n, dtype, True, g, 0.4)
        for isa in _isas():
            _check(_raw(x, wt, t, b, isa, group, pf), x, wt, t, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_mask_gives_bias(dtype):
    g = torch.Generator().manual_seed(2)
    for m in [1, 3, 17]:
        x, wt, b, _ = _inputs(m, 100, 37, dtype, True, g)
        for isa in _isas():
            for t in (1e30, math.inf, x.abs().max().item() * 1.01):
                assert torch.equal(input_sparse_matmul_cpu(x, wt, t, b, isa=isa), b.expand(m, 37))
                assert torch.equal(input_sparse_matmul_cpu(x, wt, t, None, isa=isa), torch.zeros(m, 37))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_active_is_dense(dtype):
    """threshold 0 keeps every entry (zeros included): the plain dense product."""
    g = torch.Generator().manual_seed(3)
    for m in [1, 3, 17]:
        x, wt, b, _ = _inputs(m, 130, 70, dtype, True, g)
        x[0, :5] = 0.0
        ref = x.double() @ wt.double() + b.double()
        for isa in _isas():
            y = input_sparse_matmul_cpu(x, wt, 0.0, b, isa=isa)
            _check(y, x, wt, 0.0, b)
            assert ((y.double() - ref).abs() <= 1e-5 * (1 + ref.abs())).all()


def test_each_token_uses_its_own_mask():
    """Batch > 1 reads the union of the masks, but token 1 must not use token 0's channel."""
    wt = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).half()
    x = torch.tensor([[10.0, 0.1, 0.0], [0.1, 10.0, 0.0]])
    for isa in _isas():
        y = input_sparse_matmul_cpu(x, wt, 1.0, isa=isa)
        assert torch.equal(y, torch.tensor([[10.0, 20.0], [30.0, 40.0]]))


def test_nan_never_passes():
    """NaN inputs are inactive whatever the threshold (0 included): the output stays finite."""
    g = torch.Generator().manual_seed(4)
    for m, dtype in [(1, torch.float16), (3, torch.float32), (17, torch.bfloat16)]:
        x, wt, b, t = _inputs(m, 100, 50, dtype, True, g)
        x[0, 3] = math.nan
        x[m - 1, 17] = -math.nan
        x[:, 40] = math.nan  # a whole channel
        for thr in (0.0, t):
            for isa in _isas():
                y = input_sparse_matmul_cpu(x, wt, thr, b, isa=isa)
                _check(y, x, wt, thr, b)  # asserts finite too
        assert union_density(x, 1e30) == 0.0


def test_threshold_compares_exactly():
    """|x| >= t in exact arithmetic although t is a python float (double) and x is float32."""
    t = 0.1  # not a float32: float32(0.1) > 0.1, its predecessor < 0.1
    a32 = torch.tensor(0.1, dtype=torch.float32)
    above = a32.item()
    below = torch.nextafter(a32, torch.tensor(0.0)).item()  # the float32 predecessor
    assert below < t < above
    x = torch.tensor([[above, below, -above, -below, 0.5]], dtype=torch.float32)
    wt = torch.eye(5).half()
    for isa in _isas():
        y = input_sparse_matmul_cpu(x, wt, t, isa=isa)
        assert torch.equal(y, torch.tensor([[above, 0.0, -above, 0.0, 0.5]]))
        # t just above a float32 value: that value must NOT pass.
        y2 = input_sparse_matmul_cpu(x, wt, above + 1e-12, isa=isa)
        assert torch.equal(y2, torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5]]))


def test_independent_of_thread_count():
    g = torch.Generator().manual_seed(5)
    x, wt, b, t = _inputs(4, 576, 1536, torch.float16, True, g)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = input_sparse_matmul_cpu(x, wt, t, b)
        torch.set_num_threads(max(2, n))
        y2 = input_sparse_matmul_cpu(x, wt, t, b)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
def test_ksplit_matches_reference(dtype, m):
    """K split (active rows halved, two partials summed) and column split, forced, odd shapes,
    every code path, +-bias; the automatic choice equals the forced one it picks."""
    g = torch.Generator().manual_seed(40 + m)
    for k, n in [(1, 5), (2, 17), (3, 1), (37, 13), (129, 47), (577, 192), (200, 333)]:
        for bias, sparsity in itertools.product((False, True), (0.0, 0.5, 0.9)):
            x, wt, b, t = _inputs(m, k, n, dtype, bias, g, sparsity)
            for isa in _isas():
                for ks in (0, 1):
                    _check(_raw(x, wt, t, b, isa, ksplit=ks), x, wt, t, b)
                # n * esize <= 16 KiB and m <= 16 here: the automatic choice is the K split.
                assert torch.equal(_raw(x, wt, t, b, isa), _raw(x, wt, t, b, isa, ksplit=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_ksplit_empty_and_full_mask(dtype):
    g = torch.Generator().manual_seed(50)
    for m in (1, 3):
        x, wt, b, _ = _inputs(m, 301, 96, dtype, True, g)
        for isa in _isas():
            # No channel passes: y = bias exactly (or 0).
            assert torch.equal(_raw(x, wt, 1e30, b, isa, ksplit=1), b.expand(m, 96))
            assert torch.equal(_raw(x, wt, 1e30, None, isa, ksplit=1), torch.zeros(m, 96))
            # Every channel passes (t = 0): the dense product.
            _check(_raw(x, wt, 0.0, b, isa, ksplit=1), x, wt, 0.0, b)
            _check(_raw(x, wt, 0.0, None, isa, ksplit=1), x, wt, 0.0)
            # One active channel (fewer than the two parts): falls back to one pass, still exact.
            x1 = torch.zeros(m, 301)
            x1[:, 7] = 2.0
            y1 = _raw(x1, wt, 1.0, b, isa, ksplit=1)
            assert torch.equal(y1, (b + 2.0 * wt[7].float()).expand(m, 96))


@pytest.mark.parametrize("ksplit", [0, 1])
@pytest.mark.parametrize("m", [1, 3])
def test_split_independent_of_thread_count(ksplit, m):
    """Both work splits give bit-identical results with 1 and 2 threads (large enough to fork)."""
    g = torch.Generator().manual_seed(60 + m)
    x, wt, b, t = _inputs(m, 1536, 576, torch.float16, True, g, 0.3)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = _raw(x, wt, t, b, ksplit=ksplit)
        torch.set_num_threads(max(2, n))
        y2 = _raw(x, wt, t, b, ksplit=ksplit)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y2)
    _check(y2, x, wt, t, b)


def test_fresh_inputs_are_not_cached():
    """Two calls with different x on the same weight: no state leaks between calls."""
    g = torch.Generator().manual_seed(6)
    x1, wt, b, t = _inputs(3, 200, 64, torch.float16, True, g, 0.2)
    x2 = torch.randn(1, 200, generator=g)
    _check(input_sparse_matmul_cpu(x1, wt, t, b), x1, wt, t, b)
    _check(input_sparse_matmul_cpu(x2, wt, 1.5, b), x2, wt, 1.5, b)
    _check(input_sparse_matmul_cpu(x1[:1], wt, 0.3, b), x1[:1], wt, 0.3, b)


def test_noncontiguous_x_is_copied_and_empty_shapes():
    g = torch.Generator().manual_seed(7)
    x, wt, b, t = _inputs(6, 40, 24, torch.float32, True, g)
    xs = x.t().contiguous().t()  # same values, transposed storage
    assert not xs.is_contiguous()
    _check(input_sparse_matmul_cpu(xs, wt, t, b), x, wt, t, b)
    _check(input_sparse_matmul_cpu(x[::2], wt, t, b), x[::2], wt, t, b)
    assert input_sparse_matmul_cpu(torch.zeros(0, 40), wt, t, b).shape == (0, 24)
    y = input_sparse_matmul_cpu(torch.zeros(2, 0), torch.zeros(0, 24).half(), 0.0, b)
    assert torch.equal(y, b.expand(2, 24))


def test_bad_input_raises():
    x = torch.randn(2, 8)
    wt = torch.randn(8, 4).half()
    b = torch.randn(4)
    f = input_sparse_matmul_cpu
    bad = [
        lambda: f(x.half(), wt, 0.5),                      # x dtype
        lambda: f(x.double(), wt, 0.5),
        lambda: f(x, wt.to(torch.int8), 0.5),              # wt dtype
        lambda: f(x, wt.double(), 0.5),
        lambda: f(x[0], wt, 0.5),                          # x 1-D
        lambda: f(x.view(1, 2, 8), wt, 0.5),               # x 3-D
        lambda: f(x, wt[0], 0.5),                          # wt 1-D
        lambda: f(x, torch.randn(9, 4).half(), 0.5),       # K mismatch
        lambda: f(x, torch.randn(4, 8).half().t(), 0.5),   # transposed view, not contiguous
        lambda: f(x, wt, 0.5, b.double()),                 # bias dtype
        lambda: f(x, wt, 0.5, torch.randn(5)),             # bias shape
        lambda: f(x, wt, 0.5, torch.randn(8)[::2]),        # bias not contiguous
        lambda: f(x, wt, -0.1),                            # negative threshold
        lambda: f(x, wt, math.nan),
        lambda: f(x, wt, -math.inf),
        lambda: f(x, wt, "0.5"),
        lambda: f(x, wt, None),
        lambda: f(x.numpy(), wt, 0.5),                     # not a tensor
        lambda: f(x, wt, 0.5, isa=activation_cpu.best_isa() + 1),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} did not raise")


def test_density_helpers():
    x = torch.tensor([[3.0, 0.1, 0.0, 0.2], [0.1, 0.0, 0.0, 2.0]])
    assert union_density(x, 1.0) == 0.5
    assert union_density(x, 0.0) == 1.0
    assert union_density(x[:1], 1.0) == 0.25
    assert 0.5 <= dense_crossover(1) <= 1.0
    assert all(0.0 < dense_crossover(m) <= 1.0 for m in (1, 2, 3, 4, 8, 64))
    assert use_sparse(x, 1.0) == (0.5 <= dense_crossover(2))
    assert not use_sparse(x, 0.0) or dense_crossover(2) >= 1.0
    with pytest.raises(ValueError):
        dense_crossover(0)
    with pytest.raises(ValueError):
        union_density(x, -1.0)


def test_opaque_to_torch_compile():
    # the op has a CPU kernel and a shape-only fake: a compiled decode step keeps it as one
    # opaque call (fullgraph, no graph break) and gets the eager result bit for bit
    from rarefy.kernels.activation_sparse import input_sparse_matmul
    g = torch.Generator().manual_seed(11)
    x, wt, b, t = _inputs(1, 96, 130, torch.float16, True, g)
    wd = (torch.randn(65, 40, generator=g) / 8).to(torch.float16)

    def mlp(x):
        h = input_sparse_matmul(x, wt, t, glu=True)
        return input_sparse_matmul(h, wd, 0.05, b[:40])

    torch._dynamo.reset()
    got = torch.compile(mlp, fullgraph=True, dynamic=False)(x)
    assert torch.equal(got, mlp(x))
    _check(mlp(x), torch.nn.functional.silu(input_sparse_matmul_cpu(x, wt, t)[:, :65])
           * input_sparse_matmul_cpu(x, wt, t)[:, 65:], wd, 0.05, b[:40])
