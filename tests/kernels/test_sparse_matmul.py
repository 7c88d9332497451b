"""Sparse formats and the Triton sparse kernels against float64 references.

Without a GPU the Triton kernels run under the interpreter at small odd shapes (fp32 and
fp16; the interpreter's bf16 dot is wrong, so bf16 runs only on a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rarefy.errors import RarefyError  # noqa: E402
from rarefy.formats.sparse_weight import BlockSparse, DeltaSparse, NMSparse, TiledBitmap  # noqa: E402
from rarefy.kernels.sparse_matmul import sparse_matmul, sparse_matmul_ref  # noqa: E402
from rarefy.sparsity.masks import nm_mask  # noqa: E402
from triton_interp import CUDA, kernel_module  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def kern():
    bm = kernel_module("rarefy.kernels.sparse_matmul.triton_bitmap", "_bitmap_kernel")
    bs = kernel_module("rarefy.kernels.sparse_matmul.triton_bsr", "_bsr_kernel")
    return bm, bs


def random_sparse(n, k, sparsity, gen, dtype=torch.float32, edge=True):
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < sparsity] = 0
    if edge and n > 3 and k > 40:
        w[1] = 0                   # an empty row
        w[2, :32] = 0              # an all-zero word
        w[3, :32] = 1.5            # a fully dense word
    return w.to(dtype)


def nm_weight(n, k, nn_, mm, gen, dtype=torch.float32):
    w = torch.randn(n, k + (-k) % mm, generator=gen)
    return (w * nm_mask(w.abs(), nn_, mm))[:, :k].to(dtype)


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "NaN/inf in the output"
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("n,k", [(1, 1), (7, 45), (33, 100), (64, 257)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
def test_formats_round_trip(n, k, sparsity):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = random_sparse(n, k, sparsity, gen)
    for fmt in (TiledBitmap.from_dense(w, 64), TiledBitmap.from_dense(w, word_offsets=True),
                BlockSparse.from_dense(w, 16), BlockSparse.from_dense(w, 3), DeltaSparse.from_dense(w)):
        assert torch.equal(fmt.to_dense(), w)
        assert fmt.nnz == int((w != 0).sum())
    wn = nm_weight(n, k, 2, 4, gen)
    assert torch.equal(NMSparse.from_dense(wn, 2, 4).to_dense(), wn)


def test_format_bytes_and_errors():
    gen = torch.Generator().manual_seed(0)
    w = random_sparse(256, 512, 0.5, gen, torch.bfloat16, edge=False)
    tb = TiledBitmap.from_dense(w)
    # 50% bf16: ~1 byte of values + 1/8 byte of mask per weight, plus tile offsets
    assert 0.55 < tb.nbytes / tb.dense_nbytes < 0.58
    with pytest.raises(RarefyError, match="not 2:4"):
        NMSparse.from_dense(torch.ones(4, 8), 2, 4)
    with pytest.raises(RarefyError, match="multiple of 32"):
        TiledBitmap.from_dense(w, 48)
    with pytest.raises(RarefyError, match="2-D"):
        TiledBitmap.from_dense(torch.ones(3))


def _bitmap_cases():
    from rarefy.kernels.sparse_matmul.triton_bitmap import BitmapConfig
    return [(1, BitmapConfig(4, 64, 1, num_warps=1)), (1, BitmapConfig(2, 128, 1, num_warps=2)),
            (3, BitmapConfig(2, 64, 4, num_warps=2)), (17, BitmapConfig(16, 64, 32, use_dot=True))]


@pytest.mark.parametrize("n,k", [(7, 45), (33, 100), (64, 128)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("case", range(4))
def test_bitmap_kernel(kern, n, k, sparsity, case):
    m, cfg = _bitmap_cases()[case]
    gen = torch.Generator().manual_seed(hash((n, k, sparsity, case)) % 2**31)
    w = random_sparse(n, k, sparsity, gen)
    x, b = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    tb = TiledBitmap.from_dense(w, 64).to(DEV)
    y = torch.full((m, n), float("nan"))
    y = kern[0].bitmap_matmul_triton(x.to(DEV), tb.bitmask, tb.values, n, tile_offsets=tb.tile_offsets,
                                     bias=b.to(DEV), config=cfg)
    assert rel_err(y.cpu(), sparse_matmul_ref(x, tb.to("cpu"), b)) < TOL[torch.float32]


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
@pytest.mark.parametrize("case", range(3))
def test_nm_kernel(kern, nm, case):
    m, cfg = _bitmap_cases()[case]
    gen = torch.Generator().manual_seed(7 + case)
    w = nm_weight(19, 77, *nm, gen)
    x = torch.randn(m, 77, generator=gen)
    sw = NMSparse.from_dense(w, *nm).to(DEV)
    y = kern[0].bitmap_matmul_triton(x.to(DEV), sw.bitmask, sw.values, 19, nm=nm, config=cfg)
    assert rel_err(y.cpu(), sparse_matmul_ref(x, sw.to("cpu"))) < TOL[torch.float32]


@pytest.mark.parametrize("b", [16, 32])
@pytest.mark.parametrize("m,split", [(1, 1), (1, 3), (5, 1), (5, 2)])
def test_bsr_kernel(kern, b, m, split):
    from rarefy.kernels.sparse_matmul.triton_bsr import BsrConfig
    gen = torch.Generator().manual_seed(b + m + split)
    w = random_sparse(70, 90, 0.3, gen)
    w[:32] = 0  # empty block-rows
    w[:, 64:] *= (torch.rand(70, 26, generator=gen) < 0.5)
    keep = torch.rand(5, 6, generator=gen) < 0.5
    w = w * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)[:70, :90]
    x, bias = torch.randn(m, 90, generator=gen), torch.randn(70, generator=gen)
    sw = BlockSparse.from_dense(w, b).to(DEV)
    cfg = BsrConfig(unroll=2, block_m=1 if m == 1 else 16, split=split, num_warps=2)
    y = kern[1].bsr_matmul_triton(x.to(DEV), sw.row_ptr, sw.col_idx, sw.blocks, 70, order=sw.order,
                                  bias=bias.to(DEV), config=cfg)
    assert rel_err(y.cpu(), sparse_matmul_ref(x, sw.to("cpu"), bias)) < TOL[torch.float32]


def test_delta_long_gaps_and_bytes():
    """Runs of more than 15 zero columns are bridged by zero entries; bytes are 2.5 per entry."""
    w = torch.zeros(3, 200)
    w[0, [0, 16, 17, 150, 199]] = 1.0
    w[2, 199] = 2.0
    d = DeltaSparse.from_dense(w)
    assert torch.equal(d.to_dense(), w)
    assert d.row_ptr.tolist()[1] % 16 == 0 and d.row_ptr[1] == d.row_ptr[2]  # empty row 1
    gen = torch.Generator().manual_seed(0)
    d50 = DeltaSparse.from_dense(random_sparse(64, 4096, 0.5, gen, torch.bfloat16, edge=False))
    assert 0.62 < d50.nbytes / d50.dense_nbytes < 0.64


@pytest.mark.parametrize("n,k,sparsity", [(7, 45, 0.5), (33, 300, 0.9), (16, 1000, 0.99), (5, 64, 0.0)])
@pytest.mark.parametrize("m,bm", [(1, 1), (3, 4), (5, 8)])
def test_delta_kernel(n, k, sparsity, m, bm):
    delta = kernel_module("rarefy.kernels.sparse_matmul.triton_delta", "_delta_kernel")
    gen = torch.Generator().manual_seed(n + m)
    w = random_sparse(n, k, sparsity, gen)
    x, b = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    d = DeltaSparse.from_dense(w).to(DEV)
    y = delta.delta_matmul_triton(x.to(DEV), d.row_ptr, d.values, d.gaps, n, bias=b.to(DEV),
                                  config=delta.DeltaConfig(2, 64, bm, num_warps=1))
    assert rel_err(y.cpu(), sparse_matmul_ref(x, d.to("cpu"), b)) < TOL[torch.float32]


@pytest.mark.parametrize("n,k,sparsity", [(7, 45, 0.5), (33, 300, 0.9), (16, 1000, 0.99), (5, 64, 0.0),
                                          (3, 17, 1.0)])
@pytest.mark.parametrize("m,bn,bv,pf", [(1, 1, 256, False), (2, 2, 64, True), (1, 1, 16, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_chunked_kernel(n, k, sparsity, m, bn, bv, pf, dtype):
    """The register prefix-sum variant: long gaps (bridging entries), padding past K, empty rows;
    bf16 takes the inline-asm loads on the GPU."""
    delta = kernel_module("rarefy.kernels.sparse_matmul.triton_delta", "_delta_chunk_kernel")
    gen = torch.Generator().manual_seed(7 * n + k)
    w = random_sparse(n, k, sparsity, gen, dtype)
    x, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    d = DeltaSparse.from_dense(w).to(DEV)
    y = delta.delta_matmul_triton(x.to(DEV), d.row_ptr, d.values, d.gaps, n, bias=b.to(DEV),
                                  config=delta.DeltaConfig(bn, bv, 1, num_warps=1, chunked=True, prefetch=pf))
    assert torch.isfinite(y).all()
    assert rel_err(y.float().cpu(), sparse_matmul_ref(x, d.to("cpu"), b)) < TOL[dtype]


def test_delta_chunked_rejects_bad_block():
    delta = kernel_module("rarefy.kernels.sparse_matmul.triton_delta", "_delta_chunk_kernel")
    d = DeltaSparse.from_dense(torch.eye(8)).to(DEV)
    with pytest.raises(ValueError, match="multiple of 8"):
        delta.delta_matmul_triton(torch.randn(1, 8, device=DEV), d.row_ptr, d.values, d.gaps, 8,
                                  config=delta.DeltaConfig(1, 12, 1, chunked=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bitmap_kernel_half(kern, dtype):
    from rarefy.kernels.sparse_matmul.triton_bitmap import BitmapConfig
    gen = torch.Generator().manual_seed(3)
    w = random_sparse(24, 96, 0.6, gen, dtype)
    x = torch.randn(1, 96, generator=gen).to(dtype)
    tb = TiledBitmap.from_dense(w).to(DEV)
    y = kern[0].bitmap_matmul_triton(x.to(DEV), tb.bitmask, tb.values, 24, tile_offsets=tb.tile_offsets,
                                     config=BitmapConfig(4, 64, 1, num_warps=1))
    assert y.dtype == dtype
    assert rel_err(y.cpu().float(), sparse_matmul_ref(x, tb.to("cpu"))) < TOL[dtype]


def test_sparse_matmul_dispatch_cpu():
    """On the CPU sparse_matmul uses the C++ kernel (bitmap layouts) or densifies (BSR)."""
    gen = torch.Generator().manual_seed(11)
    w = random_sparse(40, 70, 0.5, gen)
    x = torch.randn(2, 3, 70, generator=gen)
    for sw in (TiledBitmap.from_dense(w), BlockSparse.from_dense(w, 16), NMSparse.from_dense(nm_weight(40, 70, 2, 4, gen), 2, 4)):
        y = sparse_matmul(x, sw)
        assert y.shape == (2, 3, 40)
        assert rel_err(y, sparse_matmul_ref(x, sw)) < 1e-5
    with pytest.raises(ValueError, match="features"):
        sparse_matmul(torch.randn(2, 71), TiledBitmap.from_dense(w))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (4096, 14336)])
def test_kernels_full_shapes_bf16(shape):
    """Real model shapes in bf16 on the GPU, default configs and compiled configs."""
    from rarefy.sparsity.masks import block_mask, unstructured_mask
    n, k = shape
    w = torch.randn(n, k, device="cuda")
    x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
    cases = [TiledBitmap.from_dense((w * unstructured_mask(w.abs(), 0.7)).bfloat16()),
             DeltaSparse.from_dense((w * unstructured_mask(w.abs(), 0.5)).bfloat16()),
             NMSparse.from_dense((w * nm_mask(w.abs(), 2, 4)).bfloat16(), 2, 4),
             BlockSparse.from_dense((w * block_mask(w.abs(), 0.5, 32, 32)).bfloat16(), 32)]
    for sw in cases:
        for m in (1, 8):
            y = sparse_matmul(x[:m], sw)
            assert rel_err(y.float(), sparse_matmul_ref(x[:m], sw)) < 1e-2
