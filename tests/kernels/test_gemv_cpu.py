"""Tests for the fp16-weight CPU GEMV extension (rarefy.kernels.gemv_cpu).

The extension is compiled once per machine (cached by torch); the module-scoped fixture
triggers the build so the first test does not carry it alone. Skipped if it cannot build.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from rarefy.kernels import gemv_cpu
from rarefy.kernels.gemv_cpu import gemv_f16, gemv_f16_ref

MS = [1, 2, 5, 9]
NS = [1, 7, 33, 130]
KS = [1, 15, 16, 17, 100, 576]


@pytest.fixture(scope="module", autouse=True)
def built():
    # fp16w is the CPU default: a build failure here must fail CI, not hide behind a skip
    assert gemv_cpu.warm_up(), f"gemv_f16 extension unavailable: {gemv_cpu._state['error']}"


def _isas():
    return list(range(gemv_cpu.best_isa() + 1))


def _inputs(m, n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = (torch.randn(n, k, generator=g) / k**0.5).half()
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


def _check(y, ref):
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.isfinite(y).all()
    rel = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_all_shapes(bias):
    """Every M x N x K combination, on every code path this CPU has (scalar, AVX2, AVX-512)."""
    for seed, (m, n, k) in enumerate(itertools.product(MS, NS, KS)):
        x, w, b = _inputs(m, n, k, bias, seed)
        ref = gemv_f16_ref(x, w, b)
        for isa in _isas():
            _check(gemv_f16(x, w, b, isa=isa), ref)


def test_isa_paths_listed():
    assert gemv_cpu.best_isa() in gemv_cpu.ISA_NAMES
    with pytest.raises((RuntimeError, ValueError)):
        gemv_f16(*_inputs(1, 4, 16, False, 0)[:2], isa=gemv_cpu.best_isa() + 1)


def test_model_shapes_and_large_m():
    """A decode-size layer, and M past several tiles (9..33) where rows tile 4 at a time."""
    for m, n, k in [(1, 1536, 576), (3, 576, 1536), (33, 70, 200)]:
        x, w, b = _inputs(m, n, k, True, m)
        _check(gemv_f16(x, w, b), gemv_f16_ref(x, w, b))


def test_leading_dims_and_noncontiguous_x():
    x, w, b = _inputs(6, 33, 100, True, 1)
    ref = gemv_f16_ref(x, w, b)
    # [..., K] input keeps its leading dims.
    y3 = gemv_f16(x.view(2, 3, 100), w, b)
    assert y3.shape == (2, 3, 33)
    _check(y3.reshape(6, 33), ref)
    y1 = gemv_f16(x[0], w, b)
    assert y1.shape == (33,)
    _check(y1, ref[0])
    # Non-contiguous views: transposed storage, strided rows, strided columns.
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    _check(gemv_f16(xt, w, b), ref)
    big = torch.zeros(12, 100)
    big[::2] = x
    _check(gemv_f16(big[::2], w, b), ref)
    wide = torch.zeros(6, 200)
    wide[:, ::2] = x
    _check(gemv_f16(wide[:, ::2], w, b), ref)


def test_zero_sizes():
    w = torch.randn(3, 5).half()
    assert gemv_f16(torch.randn(0, 5), w).shape == (0, 3)
    assert gemv_f16(torch.randn(2, 5), torch.randn(0, 5).half()).shape == (2, 0)
    b = torch.randn(3)
    torch.testing.assert_close(gemv_f16(torch.randn(2, 0), torch.randn(3, 0).half(), b), b.expand(2, 3))


def test_bad_arguments_raise():
    x, w, b = _inputs(2, 8, 32, True, 3)
    bad = [
        (x.double(), w, b),                    # x not fp32
        (x.half(), w, b),                      # x fp16
        (x, w.float(), b),                     # w fp32
        (x, w.bfloat16(), b),                  # w bf16
        (x, w, b.half()),                      # bias fp16
        (x, w, torch.randn(9)),                # bias wrong length
        (x, w, torch.randn(8, 1)),             # bias 2-D
        (x[:, :31], w, b),                     # K mismatch
        (x, w.view(2, 4, 32), b),              # w not 2-D
        (x, w.t().contiguous().t(), b),        # w [8, 32] but column-major
        (x, torch.randn(32, 8).half().t(), b),  # w transposed view
        (torch.tensor(1.0), w, b),             # scalar x
    ]
    for args in bad:
        with pytest.raises((RuntimeError, TypeError, ValueError)):
            gemv_f16(*args)


def test_threads_do_not_change_results():
    """Each output is summed by one thread in a fixed order: 1 thread == all threads, bitwise."""
    x, w, b = _inputs(3, 4099, 576, True, 7)  # large enough to split over threads, odd N
    n0 = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = gemv_f16(x, w, b)
        torch.set_num_threads(max(2, n0))
        yn = gemv_f16(x, w, b)
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(y1, yn)
    _check(yn, gemv_f16_ref(x, w, b))


def test_available_never_raises_when_build_fails(monkeypatch):
    """A broken build reports False (and logs) instead of raising."""
    import torch.utils.cpp_extension as ce

    saved = dict(gemv_cpu._state)
    try:
        gemv_cpu._state.update(tried=False, op=None, error=None, seconds=None)

        def boom(*a, **k):
            raise OSError("no compiler")

        monkeypatch.setattr(ce, "load", boom)
        assert gemv_cpu.available() is False
        assert "no compiler" in gemv_cpu._state["error"]
        with pytest.raises(RuntimeError, match="unavailable"):
            gemv_f16(torch.randn(1, 4), torch.randn(2, 4).half())
    finally:
        gemv_cpu._state.clear()
        gemv_cpu._state.update(saved)
