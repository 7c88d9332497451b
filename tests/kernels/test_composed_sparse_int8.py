"""Sparse + int8 (Int8TiledBitmap): format, the C++ CPU kernel on every code path this CPU
has, the Triton kernel under the interpreter (or on a GPU), and the sparse_matmul dispatch.

The kernels are compared with a float64 reference on the exact stored values (scale * Q):
the CPU kernel against the worst-case fp32 summation bound (K + 3) * 2^-24 * |x| @ |W|^T
(one more rounding than the float kernel: the scale multiply), the Triton kernel within
1e-5 relative in fp32 (the interpreter runs NumPy fp32).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rarefy.errors import RarefyError  # noqa: E402
from rarefy.formats.sparse_weight import Int8TiledBitmap, TiledBitmap  # noqa: E402
from rarefy.kernels import sparse_cpu  # noqa: E402
from rarefy.kernels.sparse_matmul import sparse_matmul, sparse_matmul_ref  # noqa: E402
from triton_interp import CUDA, kernel_module  # noqa: E402


def _pruned(n, k, sparsity, g, empty_rows=()):
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    for r in empty_rows:
        if r < n:
            w[r] = 0
    return w


def _ref64(x, w: Int8TiledBitmap, bias=None):
    q = w.quantized().double()
    y = x.double() @ (q * w.scale.double()[:, None]).t()
    return y if bias is None else y + bias.double()


# -- format ----------------------------------------------------------------------------

@pytest.mark.parametrize("n,k,sparsity", [(1, 1, 0.0), (7, 33, 0.5), (13, 577, 0.99), (5, 64, 0.0), (9, 100, 1.0)])
def test_format_quantizes_per_row(n, k, sparsity):
    g = torch.Generator().manual_seed(1)
    w = _pruned(n, k, sparsity, g, empty_rows=(2,))
    q8 = Int8TiledBitmap.from_dense(w)
    assert q8.values.dtype == torch.int8 and q8.scale.dtype == torch.float32 and q8.scale.shape == (n,)
    q = q8.quantized()
    assert q.shape == (n, k) and int(q.abs().max()) <= 127
    # zeros of the pruned matrix stay zeros; the mask holds only Q's nonzeros
    assert not bool(((w == 0) & (q != 0)).any())
    assert torch.equal(q8.mask(), q != 0)
    # symmetric per-row error bound |W - sQ| <= s / 2 (and the row max is represented exactly as 127)
    err = (w - q8.to_dense()).abs()
    assert bool((err <= q8.scale[:, None] / 2 * (1 + 1e-6)).all())
    amax = w.abs().amax(1)
    assert torch.allclose(q8.scale[amax > 0], amax[amax > 0] / 127)
    assert bool((q8.scale[amax == 0] == 1).all())
    # bytes: int8 values + mask words + tile offsets + scales
    kw = -(-k // 32)
    assert q8.nbytes == q8.nnz + 4 * n * kw + 4 * q8.tile_offsets.numel() + 4 * n
    assert q8.dense_nbytes == n * k + 4 * n


def test_format_bytes_at_half_density():
    g = torch.Generator().manual_seed(2)
    w = _pruned(256, 4096, 0.5, g)
    q8 = Int8TiledBitmap.from_dense(w)
    fp16 = TiledBitmap.from_dense(w.half())
    per_weight = q8.nbytes / w.numel()
    assert 0.62 < per_weight < 0.64, per_weight  # 0.5 + 1/8 + offsets/scales
    assert q8.nbytes < 0.6 * fp16.nbytes


def test_format_errors_and_moves():
    with pytest.raises(RarefyError, match="2-D"):
        Int8TiledBitmap.from_dense(torch.zeros(3))
    with pytest.raises(RarefyError, match="floating"):
        Int8TiledBitmap.from_dense(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(RarefyError, match="NaN"):
        Int8TiledBitmap.from_dense(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(RarefyError, match="one float scale per row"):
        Int8TiledBitmap.from_quantized(torch.ones(3, 4, dtype=torch.int8), torch.ones(2))
    with pytest.raises(RarefyError, match="-128"):
        Int8TiledBitmap.from_quantized(torch.full((1, 4), -128, dtype=torch.int8), torch.ones(1))
    w = Int8TiledBitmap.from_dense(torch.randn(4, 40))
    w2 = w.to("cpu", dtype=torch.bfloat16)  # dtype is ignored: values stay int8, scales fp32
    assert w2.values.dtype == torch.int8 and w2.scale.dtype == torch.float32


def test_from_quantized_round_trip():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (11, 70), generator=g, dtype=torch.int8)
    q[torch.rand(11, 70, generator=g) < 0.6] = 0
    s = torch.rand(11, generator=g) + 0.1
    w = Int8TiledBitmap.from_quantized(q, s[:, None])
    assert torch.equal(w.quantized(), q)
    assert torch.equal(w.scale, s)


# -- CPU kernel --------------------------------------------------------------------------

def _isas():
    return list(range(sparse_cpu.best_isa() + 1))


def _check_cpu(y, x, w, bias=None):
    ref = _ref64(x, w, bias)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    q = w.quantized().double().abs() * w.scale.double()[:, None]
    bound = x.double().abs() @ q.t()
    if bias is not None:
        bound = bound + bias.double().abs()
    tol = (w.shape[1] + 3) * 2.0**-24 * bound + 1e-30
    err = (y.double() - ref).abs()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


@pytest.fixture(scope="module")
def cpu_built():
    if not sparse_cpu.warm_up():
        pytest.skip(f"bitmap_matmul extension unavailable: {sparse_cpu._state['error']}")


def test_cpu_kernel_odd_shapes_every_path(cpu_built):
    """K around word boundaries, N 1/7/193, M 1..17 (both the register-tile and decoded-row
    paths), sparsity 0/50/70/99%, empty rows, bias on/off, each code path."""
    g = torch.Generator().manual_seed(4)
    sparsities = [0.0, 0.5, 0.7, 0.99]
    for i, (k, n, m) in enumerate(itertools.product([1, 31, 32, 33, 45, 577], [1, 7, 193], [1, 3, 8, 17])):
        w = Int8TiledBitmap.from_dense(_pruned(n, k, sparsities[i % 4], g, empty_rows=(0, 5)))
        x = torch.randn(m, k, generator=g)
        bias = torch.randn(n, generator=g) if i % 2 else None
        for isa in _isas():
            y = sparse_cpu.bitmap_matmul_int8(x, w.bitmask, w.values, w.tile_offsets[:, 0].contiguous(),
                                              w.scale, k, bias, isa=isa)
            _check_cpu(y, x, w, bias)


def test_cpu_kernel_all_zero_and_dense(cpu_built):
    g = torch.Generator().manual_seed(5)
    for sparsity in (0.0, 1.0):
        w = Int8TiledBitmap.from_dense(_pruned(64, 300, sparsity, g))
        x = torch.randn(2, 300, generator=g)
        for isa in _isas():
            y = sparse_cpu.bitmap_matmul_int8(x, w.bitmask, w.values, w.tile_offsets[:, 0].contiguous(),
                                              w.scale, 300, isa=isa)
            _check_cpu(y, x, w)
    assert w.nnz == 0 and bool((y == 0).all())


def test_cpu_kernel_rejects_bad_input(cpu_built):
    w = Int8TiledBitmap.from_dense(torch.randn(4, 40))
    rs = w.tile_offsets[:, 0].contiguous()
    x = torch.randn(1, 40)
    with pytest.raises(TypeError, match="values must be int8"):
        sparse_cpu.bitmap_matmul_int8(x, w.bitmask, w.values.float(), rs, w.scale, 40)
    with pytest.raises(ValueError, match="scale must be contiguous with N = 4"):
        sparse_cpu.bitmap_matmul_int8(x, w.bitmask, w.values, rs, w.scale[:3], 40)
    with pytest.raises(TypeError, match="scale must be float32"):
        sparse_cpu.bitmap_matmul_int8(x, w.bitmask, w.values, rs, w.scale.double(), 40)
    with pytest.raises(TypeError, match="x must be float32"):
        sparse_cpu.bitmap_matmul_int8(x.half(), w.bitmask, w.values, rs, w.scale, 40)
    with pytest.raises(ValueError, match="bad row_start or bitmask"):
        sparse_cpu.bitmap_matmul_int8(x, w.bitmask, w.values[:3].contiguous(), rs, w.scale, 40)


def test_sparse_matmul_dispatch_cpu(cpu_built):
    g = torch.Generator().manual_seed(6)
    w = Int8TiledBitmap.from_dense(_pruned(50, 96, 0.75, g))
    x = torch.randn(3, 2, 96, generator=g)
    bias = torch.randn(50, generator=g)
    y = sparse_matmul(x, w, bias)
    assert y.shape == (3, 2, 50) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), sparse_matmul_ref(x, w, bias), rtol=1e-5, atol=1e-5)
    yb = sparse_matmul(x.bfloat16(), w, bias.bfloat16())
    assert yb.dtype == torch.bfloat16


# -- Triton kernel -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def kern():
    return kernel_module("rarefy.kernels.sparse_matmul.triton_bitmap_int8", "_int8_kernel")


CASES = [  # (n, k, m, sparsity, config kwargs)
    (7, 33, 1, 0.5, {}),
    (16, 64, 1, 0.0, {"block_n": 8, "block_k": 64}),
    (9, 70, 1, 0.99, {"block_n": 4, "block_k": 32, "flat": True}),
    (32, 128, 1, 0.75, {"block_n": 16, "block_k": 128, "flat": True}),
    (5, 100, 3, 0.5, {"block_n": 4, "block_k": 64, "block_m": 4}),
    (32, 64, 17, 0.5, {"block_n": 16, "block_k": 32, "block_m": 16, "use_dot": True}),
    (6, 40, 2, 1.0, {"block_n": 4, "block_k": 32, "block_m": 2}),
]


@pytest.mark.parametrize("n,k,m,sparsity,cfg", CASES)
def test_triton_kernel(kern, n, k, m, sparsity, cfg):
    from rarefy.kernels.sparse_matmul.triton_bitmap import BitmapConfig
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(7)
    w = Int8TiledBitmap.from_dense(_pruned(n, k, sparsity, g, empty_rows=(1,)))
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if m % 2 else None
    wd = w.to(dev)
    y = kern.bitmap_int8_matmul_triton(x.to(dev), wd.bitmask, wd.values, wd.tile_offsets, wd.scale, n,
                                       bias=None if bias is None else bias.to(dev),
                                       config=BitmapConfig(**cfg) if cfg else None)
    torch.testing.assert_close(y.cpu().double(), _ref64(x, w, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_half(kern, dtype):
    from rarefy.kernels.sparse_matmul.triton_bitmap import BitmapConfig
    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(8)
    w = Int8TiledBitmap.from_dense(_pruned(24, 96, 0.5, g))
    x = torch.randn(1, 96, generator=g).to(dtype)
    wd = w.to(dev)
    for cfg in (None, BitmapConfig(block_n=8, block_k=64, flat=True)):
        y = kern.bitmap_int8_matmul_triton(x.to(dev), wd.bitmask, wd.values, wd.tile_offsets, wd.scale, 24,
                                           config=cfg)
        assert y.dtype == dtype
        torch.testing.assert_close(y.cpu().double(), _ref64(x, w), rtol=2e-2, atol=2e-2)


def test_triton_rejects_bad_input(kern):
    w = Int8TiledBitmap.from_dense(torch.randn(4, 40))
    x = torch.randn(1, 40)
    with pytest.raises(TypeError, match="values must be int8"):
        kern.bitmap_int8_matmul_triton(x, w.bitmask, w.values.float(), w.tile_offsets, w.scale, 4)
    with pytest.raises(ValueError, match="scale must be float32 with 4"):
        kern.bitmap_int8_matmul_triton(x, w.bitmask, w.values, w.tile_offsets, w.scale[:2], 4)
    with pytest.raises(ValueError, match="bitmask must be"):
        kern.bitmap_int8_matmul_triton(torch.randn(1, 80), w.bitmask, w.values, w.tile_offsets, w.scale, 4)
