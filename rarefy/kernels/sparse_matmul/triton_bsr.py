"""Triton block-sparse (BSR) matmul: ``y = x @ W.T`` with W stored as dense b×b blocks.

x: [M, K] fp16/bf16/fp32; W: BlockSparse (row_ptr int32 [Nb+1], col_idx int32 [nblocks],
blocks [nblocks, b, b]); y: [M, N] x.dtype.

One program owns one block-row (b output rows) and walks its stored blocks UNROLL at a
time: the blocks are contiguous b*b runs, so the weight stream is as sequential as a dense
matrix's, and only the x segments under them are read. Block-rows hold different numbers
of blocks; ``order`` (the compiler's schedule) lists block-rows longest first, so the
heavy ones start early and the short ones fill the tail (an LPT schedule).
M == 1 multiplies in registers; M > 1 uses tl.dot on [b, b] x [b, BLOCK_M] per block.
A block-row alone is too little work to keep the GPU's memory system busy when there are
few block-rows (4096 rows / b=32 = 128 programs for 132 SMs), so ``split`` programs share
a block-row and add their fp32 partial sums atomically (order-dependent rounding in the
last fp32 bit; the result is cast to x.dtype afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class BsrConfig:
    unroll: int = 4       # blocks loaded per step
    block_m: int = 1      # x rows per program; > 1 needs >= 16 (tensor cores)
    split: int = 1        # programs per block-row (each takes every split-th group of blocks)
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _bsr_kernel(
    x_ptr, row_ptr, col_ptr, blk_ptr, order_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym,
    B: tl.constexpr, UNROLL: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    br = tl.load(order_ptr + tl.program_id(0) // SPLIT)
    part = tl.program_id(0) % SPLIT
    pid_m = tl.program_id(1)
    start = tl.load(row_ptr + br)
    end = tl.load(row_ptr + br + 1)
    r = tl.arange(0, B)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    if BLOCK_M == 1:
        acc = tl.zeros([B, B], dtype=tl.float32)
    else:
        acc = tl.zeros([B, BLOCK_M], dtype=tl.float32)
    blk_off = r[:, None] * B + r[None, :]  # a block is B rows of B contiguous values
    for i0 in range(start + part * UNROLL, end, UNROLL * SPLIT):
        for u in tl.static_range(UNROLL):  # UNROLL independent block loads in flight
            i = i0 + u
            ok = i < end
            col = tl.load(col_ptr + i, mask=ok, other=0)
            blk = tl.load(blk_ptr + i.to(tl.int64) * (B * B) + blk_off, mask=ok, other=0.0)
            xc = col * B + r
            if BLOCK_M == 1:
                xs = tl.load(x_ptr + pid_m * stride_xm + xc, mask=ok & (xc < K), other=0.0)
                acc += blk.to(tl.float32) * xs.to(tl.float32)[None, :]
            else:
                xs = tl.load(x_ptr + offs_m[None, :] * stride_xm + xc[:, None],
                             mask=ok & (xc < K)[:, None] & m_ok[None, :], other=0.0)
                if xs.dtype == tl.float32:  # fp32 stays fp32 (tl.dot's default on a GPU is TF32)
                    acc = tl.dot(blk.to(tl.float32), xs, acc, input_precision="ieee")
                else:
                    acc = tl.dot(blk.to(xs.dtype), xs, acc)
    if BLOCK_M == 1:
        res = tl.sum(acc, axis=1)[:, None]  # [B, 1]
    else:
        res = acc
    rows = br * B + r
    row_ok = rows < N
    if HAS_BIAS:
        res += tl.load(b_ptr + rows, mask=row_ok & (part == 0), other=0.0).to(tl.float32)[:, None]
    out = y_ptr + offs_m[None, :] * stride_ym + rows[:, None]
    if SPLIT == 1:
        tl.store(out, res.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & m_ok[None, :])
    else:  # fp32 partial sums of the block-row's parts
        tl.atomic_add(out, res, mask=row_ok[:, None] & m_ok[None, :], sem="relaxed")


def longest_first(row_ptr: torch.Tensor) -> torch.Tensor:
    """Block-rows ordered by stored blocks, most first (int32): the default schedule."""
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


def bsr_matmul_triton(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, blocks: torch.Tensor,
                      n: int, *, order: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      config: BsrConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias), W in BSR form (see module doc); returns [M, N] in x.dtype."""
    m_rows, k = x.shape
    b = blocks.shape[-1]
    if config is None:
        # the H100 sweep's winner at every Llama-3-8B shape (docs/results/sparse-kernels.md)
        config = BsrConfig(unroll=2, block_m=1 if m_rows == 1 else 16, split=8, num_warps=4)
    if m_rows > 1 and config.block_m < 16:
        raise ValueError("M > 1 needs block_m >= 16 (tensor-core path)")
    if order is None:
        order = longest_first(row_ptr)
    x = x if x.stride(-1) == 1 else x.contiguous()
    split = config.split
    y = (torch.empty if split == 1 else torch.zeros)(m_rows, n, device=x.device,
                                                      dtype=x.dtype if split == 1 else torch.float32)
    if m_rows == 0 or n == 0:
        return y.to(x.dtype)
    grid = ((row_ptr.numel() - 1) * split, triton.cdiv(m_rows, config.block_m))
    _bsr_kernel[grid](
        x, row_ptr, col_idx, blocks, order, bias if bias is not None else x, y,
        m_rows, n, k, x.stride(0), y.stride(0),
        B=b, UNROLL=config.unroll, BLOCK_M=config.block_m, HAS_BIAS=bias is not None, SPLIT=split,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y if split == 1 else y.to(x.dtype)
