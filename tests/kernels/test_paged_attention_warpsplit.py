"""The warp-split paged decode kernel (rarefy/kernels/paged_attention/triton_decode_warpsplit.py)
against the float64 reference: both V layouts (token-major, dim-major), every cache dtype that
the interpreter can multiply (fp16 dots: the interpreter computes bf16 ``tl.dot`` wrongly),
lengths 0, 1 and not multiples of the page or the tile, empty splits, fused and separate
reductions, sub-streams that see no token at all."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_paged_attention import DEV, args, make_case, rel_err  # noqa: E402
from triton_interp import CUDA, kernel_module  # noqa: E402

from rarefy.kernels.paged_attention import paged_decode_attention_ref  # noqa: E402


@pytest.fixture(scope="module")
def ws():
    return kernel_module("rarefy.kernels.paged_attention.triton_decode_warpsplit", "_decode_warpsplit_kernel")


@pytest.fixture(scope="module")
def dec():
    return kernel_module("rarefy.kernels.paged_attention.triton_decode", "_decode_kernel")


def _run(ws, dec, c, sm_scale, v_dim_major, swap=False, **plan_kw):
    q, kc, vc, bt, kvd = c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["kv_dtype"]
    plan = dec.make_plan(q, kc, bt, kvd, **plan_kw)
    a = args(c)
    if v_dim_major:
        a[2] = a[2].transpose(2, 3).contiguous()  # [blocks, heads, dim, slot]
    return ws.paged_decode_attention_warpsplit(*a, sm_scale, plan=plan, v_dim_major=v_dim_major, swap=swap)


# (kv dtype, q dtype, tolerance against float64)
DTYPES = [("fp16", torch.float16, 3e-3), ("int8", torch.float16, 3e-3), ("fp8_e4m3", torch.float16, 3e-3),
          ("fp8_e5m2", torch.float16, 3e-3)]
if CUDA:
    DTYPES += [("bf16", torch.bfloat16, 1.5e-2), ("int8", torch.bfloat16, 1.5e-2)]


@pytest.mark.parametrize("kv_dtype,q_dtype,tol", DTYPES)
@pytest.mark.parametrize("v_dim_major,swap", [(False, False), (True, False), (True, True), (False, True)])
def test_warpsplit_matches_reference(ws, dec, kv_dtype, q_dtype, tol, v_dim_major, swap):
    # GQA 4, head dim 64, pages of 8 (two per 16-token sub-stream), lengths 0/1/odd/long
    c = make_case([45, 1, 130, 0, 17], 8, 2, 64, 8, kv_dtype, seed=31, q_dtype=q_dtype)
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.1)
    for kw in (dict(num_splits=1, tile_n=32, num_warps=2), dict(num_splits=3, tile_n=64, num_warps=4),
               dict(num_splits=2, tile_n=32, num_warps=2, fused_reduce=True)):
        y = _run(ws, dec, c, 0.1, v_dim_major, swap, **kw)
        assert y.dtype == q_dtype and y.shape == c["q"].shape
        assert rel_err(y, ref) < tol, (kw, rel_err(y, ref))
        assert float(y[3].abs().max()) == 0.0  # the empty sequence


@pytest.mark.parametrize("v_dim_major,swap", [(False, False), (True, False), (True, True)])
def test_warpsplit_empty_splits_and_idle_substreams(ws, dec, v_dim_major, swap):
    # max_seq_len far above the lengths: most splits are empty and, in the splits that hold
    # tokens, most sub-streams see none (their running max stays -inf until the merge)
    c = make_case([1, 2, 0, 17], 4, 2, 32, 16, "fp8_e5m2", seed=4, extra_blocks=20, q_dtype=torch.float16)
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.3)
    y = _run(ws, dec, c, 0.3, v_dim_major, swap, num_splits=5, tile_n=64, num_warps=4, max_seq_len=300)
    assert rel_err(y, ref) < 3e-3
    assert float(y[2].abs().max()) == 0.0


def test_warpsplit_refuses_plans_it_cannot_run(ws, dec):
    c = make_case([20], 4, 2, 32, 16, "fp16", seed=1, q_dtype=torch.float16)
    with pytest.raises(ValueError, match="warp-split"):
        _run(ws, dec, c, 0.3, False, tile_n=16, num_warps=2)  # 8 tokens per sub-stream < a page
    with pytest.raises(ValueError, match="warp-split"):
        _run(ws, dec, c, 0.3, False, tile_n=32, use_dot=False)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_swap_other_group_sizes(ws, dec, group):
    # MHA (one query head per KV head, padded to 2 columns), GQA 3 (padded to 4) and 8
    c = make_case([40, 3], 2 * group, 2, 32, 16, "int8", seed=50 + group, q_dtype=torch.float16)
    ref = paged_decode_attention_ref(*args(c, "cpu"), sm_scale=0.2)
    y = _run(ws, dec, c, 0.2, True, True, num_splits=2, tile_n=32, num_warps=2)
    assert rel_err(y, ref) < 3e-3
