"""Triton matmul over DeltaSparse (values + 4-bit column gaps): ``y = x @ W.T``.

x: [M, K] fp16/bf16/fp32, W: DeltaSparse [N, K], y: [M, N] x.dtype.

Work is per stored value, not per column (the bitmap kernels spend ~20 instructions per
column rebuilding the dense tile, which is why they lose to dense on the H100): a program
streams BLOCK_N rows' values and gap nibbles as contiguous runs, turns gaps into columns
with a running prefix sum, and gathers x at those columns (x is small and stays in L1).
Rows end at different lengths; the loop runs to the longest row of the program and masks
the others. Small M reuses the decoded columns for every x row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class DeltaConfig:
    block_n: int = 2     # rows per program
    block_v: int = 512   # stored values per row per step (power of two, >= 16)
    block_m: int = 1     # x rows per program (FMA per row; powers of two up to 8)
    num_warps: int = 2
    num_stages: int = 2


@triton.jit
def _delta_kernel(
    x_ptr, row_ptr, val_ptr, gap_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # rows start and end on multiples of ROW_ALIGN (16): tell the compiler, so the value and
    # gap loads become 16-byte vector loads even under the row-length mask
    start = tl.multiple_of(tl.load(row_ptr + rows, mask=row_ok, other=0), 16)
    length = tl.multiple_of(tl.load(row_ptr + rows + 1, mask=row_ok, other=0) - start, 16)
    longest = tl.max(length, axis=0)
    i = tl.arange(0, BLOCK_V)
    h = tl.arange(0, BLOCK_V // 2)
    col_base = tl.full([BLOCK_N], -1, tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for s in range(0, longest, BLOCK_V):
        e = s + i
        ok = row_ok[:, None] & (e[None, :] < length[:, None])
        ent = start[:, None] + e[None, :]
        v = tl.load(val_ptr + ent, mask=ok, other=0.0)
        hok = row_ok[:, None] & ((s + 2 * h)[None, :] < length[:, None])
        gb = tl.load(gap_ptr + (start // 2)[:, None] + (s // 2 + h)[None, :], mask=hok, other=0).to(tl.int32)
        step = tl.interleave(gb & 15, gb >> 4) + 1  # entry 2j: low nibble of byte j, 2j+1: high
        col = col_base[:, None] + tl.cumsum(step, axis=1)
        col_base += tl.sum(step, axis=1)
        # padding entries (value 0) may point past K: clamp instead of masking the gather
        col = tl.minimum(col, K - 1)
        if BLOCK_M == 1:
            xv = tl.load(x_ptr + pid_m * stride_xm + col)
            acc += v.to(tl.float32) * xv.to(tl.float32)
        else:
            vf = v.to(tl.float32)
            for mi in tl.static_range(BLOCK_M):
                xm = tl.load(x_ptr + (pid_m * BLOCK_M + mi) * stride_xm + col,
                             mask=pid_m * BLOCK_M + mi < M, other=0.0).to(tl.float32)
                part = tl.sum(vf * xm, axis=1)
                acc += tl.where((tl.arange(0, BLOCK_M) == mi)[None, :], part[:, None], 0.0)
    if BLOCK_M == 1:
        res = tl.sum(acc, axis=1)[:, None]
    else:
        res = acc
    if HAS_BIAS:
        res += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + rows[:, None], res.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & m_ok[None, :])


def delta_matmul_triton(x: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, gaps: torch.Tensor,
                        n: int, *, bias: torch.Tensor | None = None,
                        config: DeltaConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias), W as DeltaSparse parts; returns [M, N] in x.dtype."""
    m_rows, k = x.shape
    if config is None:
        config = DeltaConfig(block_m=1 if m_rows == 1 else min(8, triton.next_power_of_2(m_rows)))
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(m_rows, n, device=x.device, dtype=x.dtype)
    if m_rows == 0 or n == 0:
        return y
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m_rows, config.block_m))
    _delta_kernel[grid](
        x, row_ptr, values, gaps, bias if bias is not None else x, y,
        m_rows, n, k, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_M=config.block_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y
