"""The Triton input-sparse kernel (activation sparsity) against the float64 reference.

Without a GPU it runs under the Triton interpreter at small odd shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rarefy.kernels.activation_sparse import input_sparse_matmul, input_sparse_matmul_ref  # noqa: E402
from triton_interp import CUDA, kernel_module  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def kern():
    return kernel_module("rarefy.kernels.activation_sparse.triton", "_act_sparse_kernel")


def check(y, ref, tol):
    assert torch.isfinite(y).all(), "NaN/inf in the output"
    err = ((y.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    assert err < tol, err


def tol_for(dtype):
    return {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


def make(m, k, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    wt = torch.randn(k, n, generator=gen).to(dtype)
    return x, wt


@pytest.mark.parametrize("m,k,n", [(1, 37, 45), (1, 300, 130), (3, 100, 70), (17, 64, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t", [0.0, 0.7, 1e9])
def test_matches_reference(kern, m, k, n, dtype, t):
    x, wt = make(m, k, n, dtype, seed=m * 1000 + k + n)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    from dataclasses import replace
    for iters, xmode, fold, pre in ((1, 0, True, False), (3, 1, False, False), (64, 2, True, False),
                                    (64, 1, False, False), (1, 1, False, True), (3, 1, False, True),
                                    (64, 1, False, True)):  # many splits .. none; unrolled / prefetch
        cfg = replace(kern.pick_config(m, n, k), iters=iters, block_k=16, xmode=xmode, fold=fold, prefetch=pre)
        y = kern.input_sparse_matmul_triton(x.to(DEV), wt.to(DEV), t, bias.to(DEV), config=cfg)
        ref = input_sparse_matmul_ref(x, wt, t, bias)
        check(y, ref, tol_for(dtype))
    if t == 1e9:  # nothing active: bias only
        assert torch.allclose(y.double().cpu(), bias.double().expand(m, n), atol=1e-6)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("iters", [1, 2, 64])
def test_glu_matches_reference(kern, m, iters):
    x, wt = make(m, 80, 2 * 52, torch.float32, seed=7 + m)
    from dataclasses import replace
    cfg = replace(kern.pick_config(m, 52, 80), iters=iters, block_k=16)
    y = kern.input_sparse_matmul_triton(x.to(DEV), wt.to(DEV), 0.5, glu=True, config=cfg)
    check(y, input_sparse_matmul_ref(x, wt, 0.5, glu=True), 1e-5)


def test_batch_uses_union_but_each_row_its_own_mask(kern):
    # Row 0 is active only on channel 0, row 1 only on channel 1: the union reads both
    # weight rows, yet each output row must only see its own active input.
    x = torch.zeros(2, 20)
    x[0, 0], x[1, 1] = 2.0, -3.0
    x[0, 1], x[1, 0] = 0.1, 0.1  # below the threshold
    wt = torch.randn(20, 24, generator=torch.Generator().manual_seed(3))
    y = kern.input_sparse_matmul_triton(x.to(DEV), wt.to(DEV), 0.5).cpu()
    assert torch.allclose(y[0], 2.0 * wt[0], atol=1e-5)
    assert torch.allclose(y[1], -3.0 * wt[1], atol=1e-5)


def test_dispatch_and_bad_input():
    x, wt = make(2, 33, 18, torch.float32, seed=5)
    y = input_sparse_matmul(x.to(DEV).view(1, 2, 33), wt.to(DEV), 0.3)
    assert y.shape == (1, 2, 18)
    check(y.reshape(2, 18), input_sparse_matmul_ref(x, wt, 0.3), 1e-5)
    g = input_sparse_matmul(x.to(DEV), wt.to(DEV), 0.3, glu=True)
    check(g, input_sparse_matmul_ref(x, wt, 0.3, glu=True), 1e-5)
    from rarefy.kernels.activation_sparse.triton import input_sparse_matmul_triton
    with pytest.raises(ValueError):
        input_sparse_matmul_triton(x, wt.t(), 0.3)
    with pytest.raises(TypeError):
        input_sparse_matmul_triton(x, wt.half(), 0.3)
    with pytest.raises(ValueError):
        input_sparse_matmul_triton(x, wt[:, :17], 0.3, glu=True)


@pytest.mark.skipif(not CUDA, reason="bf16 dot is exact only on a GPU")
@pytest.mark.parametrize("m", [1, 5])
def test_bf16_gpu(m):
    x, wt = make(m, 4096, 1030, torch.bfloat16, seed=11)
    y = input_sparse_matmul(x.cuda(), wt.cuda(), 0.67)
    check(y, input_sparse_matmul_ref(x, wt, 0.67), 2e-2)


@pytest.mark.skipif(not CUDA, reason="the batch-1 dispatch to the compacting kernel runs on CUDA")
@pytest.mark.parametrize("k,n,glu", [(9000, 1030, False), (4096, 2 * 1400, True), (16384, 256, False)])
@pytest.mark.parametrize("t", [0.0, 0.67, 1e9])
def test_batch1_dispatch_to_gather_gpu(k, n, glu, t):
    # deep matrices and GLU at one token take the pipelined compacting kernel (pick_gather_config)
    x, wt = make(1, k, n, torch.bfloat16, seed=k + n)
    y = input_sparse_matmul(x.cuda(), wt.cuda(), t, glu=glu)
    check(y, input_sparse_matmul_ref(x, wt, t, glu=glu), 2e-2)


@pytest.fixture(scope="module")
def gather():
    return kernel_module("rarefy.kernels.activation_sparse.triton_gather", "_gather_kernel")


@pytest.mark.parametrize("k,n", [(37, 45), (300, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t", [0.0, 0.7, 1e9])
@pytest.mark.parametrize("glu", [False, True])
def test_gather_kernel_matches_reference(gather, k, n, dtype, t, glu):
    n_cols = 2 * n if glu else n
    x, wt = make(1, k, n_cols, dtype, seed=k + n)
    bias = None if glu else torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype)
    # many splits .. none; steps past the count; pipeline depths
    for chunk, bk, stages in ((16, 16, 3), (64, 16, 1), (1024, 32, 2), (64, 16, 4), (1024, 32, 3)):
        cfg = gather.GatherConfig(chunk=chunk, block_n=32, block_k=bk, stages=stages)
        y = gather.input_sparse_gemv_gather(x.to(DEV), wt.to(DEV), t, None if bias is None else bias.to(DEV),
                                            glu=glu, config=cfg)
        check(y, input_sparse_matmul_ref(x, wt, t, bias, glu=glu), tol_for(dtype))
