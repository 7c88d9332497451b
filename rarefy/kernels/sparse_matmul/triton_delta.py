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

import os
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
    # _delta_chunk_kernel: the prefix sums in registers, one x row per program (made for
    # batch 1; block_v entries per row and step, a multiple of 8)
    chunked: bool = False
    prefetch: bool = False  # chunked: issue the next step's loads before this step's math


@triton.jit
def _ld_b16(addr):
    # a load written as an elementwise op: it keeps its operand's register layout, where
    # tl.load of a gathered address would get its own layout and a shared-memory conversion
    return tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [addr],
                                     dtype=tl.int16, is_pure=True, pack=1)


@triton.jit
def _ld_b32(addr):
    return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [addr],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _row_streams(row_ptr, N, BLOCK_N: tl.constexpr):
    """This program's rows, their validity, entry start and length, and the longest length."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # rows start and end on multiples of ROW_ALIGN (16): tell the compiler, so the value and
    # gap loads become 16-byte vector loads even under the row-length mask
    start = tl.multiple_of(tl.load(row_ptr + rows, mask=row_ok, other=0), 16)
    length = tl.multiple_of(tl.load(row_ptr + rows + 1, mask=row_ok, other=0) - start, 16)
    return rows, row_ok, start, length, tl.max(length, axis=0)


@triton.jit
def _chunk_columns(g):
    """Gap words [A, B] (8 nibbles, entry 0 lowest) -> the column offsets [A, B, 8] of the
    chunk's entries from the column before it (prefix sums of gap + 1), and their total [A, B].

    In a few word operations per chunk: even entries are the low nibbles of the word's bytes,
    odd entries the high ones; a multiply by 0x01010101 sums bytes 0..k into byte k."""
    e = tl.arange(0, 8)
    lo = (g & 0x0F0F0F0F) + 0x01010101
    hi = ((g >> 4) & 0x0F0F0F0F) + 0x01010101
    odd = (lo + hi) * 0x01010101      # byte k: prefix through entry 2k + 1 (<= 128: no carries)
    even = odd - hi                    # byte k: prefix through entry 2k (no borrows)
    # one byte per entry; the select and the shift are constants per register
    sel = (e % 2 == 0)[None, None, :]
    sh = (8 * (e // 2))[None, None, :]
    incl = (tl.where(sel, even[:, :, None], odd[:, :, None]) >> sh) & 0xFF
    return incl, (odd >> 24) & 0xFF


@triton.jit
def _delta_chunk_load(val_ptr, gp, start, length, row_ok, s, c, e, ASM: tl.constexpr):
    """One step's values [BLOCK_N, CHUNKS, 8] and gap words [BLOCK_N, CHUNKS] (zeros past a row)."""
    ch = s // 8 + c
    ok = row_ok[:, None] & (ch[None, :] * 8 < length[:, None])
    ent = start[:, None, None] + (ch * 8)[None, :, None] + e[None, None, :]
    v = tl.load(val_ptr + ent, mask=ok[:, :, None], other=0.0)
    gidx = (start // 8)[:, None] + ch[None, :]
    if ASM:
        # masked lanes read word 0 (always there), then zero
        g = tl.where(ok, _ld_b32(gp.to(tl.int64) + tl.where(ok, gidx, 0).to(tl.int64) * 4), 0)
    else:
        g = tl.load(gp + gidx, mask=ok, other=0)
    return v, g


@triton.jit
def _delta_chunk_kernel(
    x_ptr, row_ptr, val_ptr, gap_ptr, b_ptr, y_ptr,
    N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Batch-1 variant: the row's entries in chunks of 8 (16 bytes of values, one 32-bit word
    of gaps), each chunk meant to live in one thread, so the prefix sum of its gaps is a
    chain of in-register adds. Only the chunk totals are scanned across threads, once per
    8 entries instead of once per entry as in _delta_kernel."""
    pid_m = tl.program_id(1)
    rows, row_ok, start, length, longest = _row_streams(row_ptr, N, BLOCK_N)
    c = tl.arange(0, CHUNKS)
    e = tl.arange(0, 8)
    gp = gap_ptr.to(tl.pointer_type(tl.int32))
    col_base = tl.full([BLOCK_N], -1, tl.int32)
    acc = tl.zeros([BLOCK_N, CHUNKS, 8], dtype=tl.float32)
    xb = (x_ptr + pid_m * stride_xm).to(tl.int64)
    if PREFETCH:
        v, g = _delta_chunk_load(val_ptr, gp, start, length, row_ok, 0, c, e, ASM)
    for s in range(0, longest, CHUNKS * 8):
        if PREFETCH:
            # the next step's loads go out before this step's arithmetic: twice the bytes in
            # flight per warp (one warp per program leaves occupancy at 32 warps per SM)
            v_next, g_next = _delta_chunk_load(val_ptr, gp, start, length, row_ok, s + CHUNKS * 8, c, e, ASM)
        else:
            v, g = _delta_chunk_load(val_ptr, gp, start, length, row_ok, s, c, e, ASM)
        incl, tot = _chunk_columns(g)
        tot3 = tl.broadcast_to(tot[:, :, None], [BLOCK_N, CHUNKS, 8])
        excl = tl.cumsum(tot3, axis=1) - tot3
        col = col_base[:, None, None] + excl + incl
        col_base += tl.sum(tot, axis=1)
        # padding entries (value 0) may point past K: clamp instead of masking the gather
        col = tl.minimum(col, K - 1)
        if ASM:
            xv = _ld_b16(xb + col.to(tl.int64) * 2).to(x_ptr.dtype.element_ty, bitcast=True)
        else:
            xv = tl.load(x_ptr + pid_m * stride_xm + col)
        acc += v.to(tl.float32) * xv.to(tl.float32)
        if PREFETCH:
            v, g = v_next, g_next
    res = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        res += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_m * stride_ym + rows, res.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _delta_kernel(
    x_ptr, row_ptr, val_ptr, gap_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(1)
    rows, row_ok, start, length, longest = _row_streams(row_ptr, N, BLOCK_N)
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    if config.chunked:
        if config.block_v % 8 or config.block_v < 16:
            raise ValueError(f"DeltaConfig.block_v must be a multiple of 8 (>= 16) when chunked, got {config.block_v}")
        _delta_chunk_kernel[(triton.cdiv(n, config.block_n), m_rows)](
            x, row_ptr, values, gaps, bias if bias is not None else x, y,
            n, k, x.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=config.block_n, CHUNKS=config.block_v // 8,
            ASM=not _interpreting() and x.element_size() == 2, PREFETCH=config.prefetch,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return y
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m_rows, config.block_m))
    _delta_kernel[grid](
        x, row_ptr, values, gaps, bias if bias is not None else x, y,
        m_rows, n, k, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_M=config.block_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y
