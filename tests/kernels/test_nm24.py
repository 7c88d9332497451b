"""The dedicated 2:4 kernel (rarefy/kernels/sparse_matmul/triton_nm24.py) against float64.

Without a GPU it runs under the Triton interpreter (the byte permute is then plain integer
selects); bf16 and fp16 both work there since the kernel does no tl.dot.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rarefy.formats.sparse_weight import NMSparse  # noqa: E402
from rarefy.sparsity.masks import nm_mask  # noqa: E402
from triton_interp import CUDA, kernel_module  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def nm():
    return kernel_module("rarefy.kernels.sparse_matmul.triton_nm24", "_nm24_kernel")


def random_24(n, k, gen, dtype):
    """A 2:4 matrix: magnitude top-2 of each group, plus rows/groups with explicit zeros."""
    kp = -(-k // 4) * 4
    w = torch.randn(n, kp, generator=gen)
    w = w * nm_mask(w.abs(), 2, 4)
    w = w[:, :k].clone()
    if n > 3:
        w[1] = 0            # empty row: groups store two explicit zeros
        w[2, :8] = 0        # empty groups
        w[3, 0:4] = torch.tensor([0.0, 1.5, 0.0, -2.0])  # one kept pair at columns 1 and 3
    return w.to(dtype)


def ref(x, w, bias=None):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,m", [(37, 200, 1), (64, 256, 2), (9, 72, 3), (128, 1024, 5), (5, 32, 8), (40, 96, 17)])
def test_nm24_matches_reference(nm, dtype, n, k, m):
    gen = torch.Generator().manual_seed(n * 7 + k + m)
    w = random_24(n, k, gen, dtype)
    sw = NMSparse.from_dense(w, 2, 4).to(DEV)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
    cfgs = [nm.Nm24Config(block_n=4, block_w=2, split_k=3), nm.Nm24Config(block_n=8, block_w=4),
            nm.Nm24Config(block_n=16, block_w=1, split_k=2, dot=True), nm.Nm24Config(block_n=32, block_w=2, dot=True)]
    cfgs.append(None)  # the default: FMA kernel at M = 1, tensor cores for batches
    for cfg in cfgs:
        dot = cfg.dot if cfg is not None else m > 1
        if dot and dtype == torch.bfloat16 and not CUDA:
            continue  # the interpreter's bf16 tl.dot is wrong (fp16 covers the dot path here)
        y = nm.nm24_matmul_triton(x, sw.bitmask, sw.values, n, config=cfg)
        assert y.shape == (m, n) and y.dtype == dtype
        assert torch.isfinite(y).all()
        want = ref(x.cpu(), w)
        err = ((y.cpu().double() - want).norm() / want.norm()).item()
        assert err < (8e-3 if dtype == torch.bfloat16 else 1e-3), (cfg, err)
        assert float(y[:, 1].abs().max()) == 0.0  # the empty row


def test_nm24_bias_and_codes(nm):
    gen = torch.Generator().manual_seed(3)
    w = random_24(16, 64, gen, torch.float16)
    sw = NMSparse.from_dense(w, 2, 4).to(DEV)
    codes = nm.nm24_codes(sw.bitmask)
    assert nm.nm24_codes(sw.bitmask) is codes  # cached per bitmask
    # row 3, group 0 keeps columns 1 and 3: code 1 | 3 << 2
    assert int(codes[3, 0].item()) & 0xF == 1 | (3 << 2)
    x = torch.randn(2, 64, generator=gen).half().to(DEV)
    b = torch.randn(16, generator=gen).half().to(DEV)
    for cfg in (nm.Nm24Config(4, 1, 1), nm.Nm24Config(4, 1, 2), nm.Nm24Config(16, 1, 2, dot=True)):
        y = nm.nm24_matmul_triton(x, sw.bitmask, sw.values, 16, bias=b, config=cfg)
        want = ref(x.cpu(), w, b.cpu())
        assert ((y.cpu().double() - want).norm() / want.norm()).item() < 1e-3


def test_nm24_refuses_bad_input(nm):
    gen = torch.Generator().manual_seed(4)
    w = random_24(8, 64, gen, torch.float16)
    sw = NMSparse.from_dense(w, 2, 4).to(DEV)
    with pytest.raises(ValueError, match="rows"):
        nm.nm24_matmul_triton(torch.zeros(33, 64, dtype=torch.float16, device=DEV), sw.bitmask, sw.values, 8)
    with pytest.raises(ValueError, match="same dtype"):
        nm.nm24_matmul_triton(torch.zeros(1, 64, device=DEV), sw.bitmask, sw.values, 8)
    bad = sw.bitmask.clone()
    bad[0, 0] |= 0xF  # a group keeping all four columns
    with pytest.raises(ValueError, match="2:4"):
        nm.nm24_codes(bad)
