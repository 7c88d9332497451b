"""Triton sparse matmul over bitmap layouts (TiledBitmap and NMSparse): ``y = x @ W.T``.

x: [M, K] fp16/bf16/fp32, W given as bitmask int32 [N, Kw] + packed values, y: [M, N] x.dtype.

Decode is memory bound, so the kernel reads the mask words and packed values once, as
row-contiguous streams, and rebuilds each [BLOCK_N, BLOCK_K] weight tile in registers:
the value of column c (bit j of word w) sits at

    bitmap:  running row offset + prefix(words before w in this step) + popc(w & ((1 << j) - 1))
    n:m:     row * values_per_row + (c // m) * n + popc(bits of c's group below c)

so there is no per-element index; the running row offset starts at the row's first tile
offset and grows by the step's popcounts (n:m needs no offsets at all). Columns whose bit is clear load
nothing. M == 1 multiplies in registers (FMA) and reduces at the end; a few x rows
(BLOCK_M <= 8) multiply the same rebuilt tile by each row; ``use_dot`` feeds the rebuilt
tile to tl.dot with the x rows on the narrow side.

The grid is ``(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))``: one program streams BLOCK_N whole
rows, so every program has the same number of columns to decode (the bitmap decodes per
column, so uneven nonzero counts per row cost little).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:  # popc is a libdevice call, which the interpreter cannot run
    from triton.language.extra.cuda import libdevice as _libdevice
except ImportError:  # pragma: no cover
    _libdevice = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class BitmapConfig:
    """Launch configuration: BLOCK_N rows per program, BLOCK_K columns per step (a power of
    two >= 32), BLOCK_M x rows per program (a power of two; FMA for small M, or tl.dot
    with ``use_dot``, which needs BLOCK_M >= 16 and BLOCK_N >= 16)."""

    block_n: int = 8
    block_k: int = 256
    block_m: int = 1
    use_dot: bool = False
    flat: bool = False  # M == 1 only: the 2-D column-per-lane kernel
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _popc(v, INTERP: tl.constexpr):
    """Set bits of each int32 (as a 32-bit pattern)."""
    if INTERP:
        u = v.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        return ((u * 0x01010101) >> 24).to(tl.int32)
    else:
        return _libdevice.popc(v)


@triton.jit
def _bitmap_kernel(
    x_ptr, mask_ptr, val_ptr, off_ptr, b_ptr, y_ptr,
    M, N, K, Kw, T, VALS_PER_ROW, N_STEPS,
    stride_xm, stride_ym,
    NM_N: tl.constexpr, NM_M: tl.constexpr,  # NM_M == 0: bitmap with tile offsets
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,  # EVEN: N % BLOCK_N == 0 and Kw % (BLOCK_K/32) == 0
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INTERP: tl.constexpr,
):
    G: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_c = tl.where(row_ok, rows, 0)
    g = tl.arange(0, G)
    j = tl.arange(0, 32)
    bit3 = (tl.full([32], 1, tl.int64) << j).to(tl.int32)[None, None, :]  # 1 << j as an int32 pattern
    if NM_M == 0:
        low3 = ((tl.full([32], 1, tl.int64) << j) - 1).to(tl.int32)[None, None, :]  # bits below j
        # pointer to the next value of each row, from the row's first tile offset
        vrow = val_ptr + tl.load(off_ptr + rows_c.to(tl.int64) * T, mask=row_ok, other=0).to(tl.int64)
    else:
        grp_shift3 = (j - j % NM_M)[None, None, :]
        grp_low3 = ((1 << (j % NM_M)) - 1)[None, None, :]
        # value slot of each column's group inside a step, and the step's stride
        grp_slot3 = ((g[:, None] * 32 + j[None, :]) // NM_M * NM_N)[None, :, :]
        STEP_VALS: tl.constexpr = BLOCK_K // NM_M * NM_N
        vrow = val_ptr + rows_c.to(tl.int64) * VALS_PER_ROW
    wrow = mask_ptr + rows_c.to(tl.int64) * Kw

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, G, 32], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)

    for step in range(0, N_STEPS):
        k0 = step * BLOCK_K
        wi = k0 // 32 + g  # word index [G]
        if EVEN:
            words = tl.load(wrow[:, None] + wi[None, :])
        else:
            words = tl.load(wrow[:, None] + wi[None, :], mask=row_ok[:, None] & (wi < Kw)[None, :], other=0)
        w3 = words[:, :, None]
        bit = (w3 & bit3) != 0
        # Only set bits load (a predicated gather: measured faster on an H100 than loading
        # every column's neighbour and selecting, 50 vs 65 µs at 14336x4096).
        if NM_M == 0:
            cnt = _popc(words, INTERP)
            word_base = tl.cumsum(cnt, axis=1) - cnt  # exclusive prefix over the step's words
            wv = tl.load(vrow[:, None, None] + (word_base[:, :, None] + _popc(w3 & low3, INTERP)),
                         mask=bit, other=0.0).to(tl.float32)
            vrow += tl.sum(cnt, axis=1)
        else:
            rank = _popc((w3 >> grp_shift3) & grp_low3, INTERP)
            wv = tl.load(vrow[:, None, None] + (grp_slot3 + rank), mask=bit, other=0.0).to(tl.float32)
            vrow += STEP_VALS
        cols = k0 + g[:, None] * 32 + j[None, :]  # [G, 32]
        if USE_DOT:
            c1 = tl.reshape(cols, [BLOCK_K])
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + c1[None, :],
                         mask=m_ok[:, None] & (c1 < K)[None, :], other=0.0)
            if DOT_DTYPE == tl.float32:  # fp32 stays fp32 (tl.dot's default on a GPU is TF32)
                acc = tl.dot(tl.reshape(wv, [BLOCK_N, BLOCK_K]), tl.trans(xt.to(tl.float32)), acc,
                             input_precision="ieee")
            else:
                acc = tl.dot(tl.reshape(wv, [BLOCK_N, BLOCK_K]).to(DOT_DTYPE), tl.trans(xt.to(DOT_DTYPE)), acc)
        elif BLOCK_M == 1:
            if EVEN:
                xv = tl.load(x_ptr + pid_m * stride_xm + cols)
            else:
                xv = tl.load(x_ptr + pid_m * stride_xm + cols, mask=cols < K, other=0.0)
            acc += wv * xv.to(tl.float32)[None, :, :]
        else:  # a few x rows: FMA, reduced every step
            xt = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + cols[None, :, :],
                         mask=m_ok[:, None, None] & (cols < K)[None, :, :], other=0.0).to(tl.float32)
            prod = wv[:, None, :, :] * xt[None, :, :, :]
            acc += tl.sum(tl.sum(prod, axis=3), axis=2)

    if USE_DOT or BLOCK_M > 1:
        res = acc
    else:
        res = tl.sum(tl.sum(acc, axis=2), axis=1)[:, None]  # [BLOCK_N, 1]
    if HAS_BIAS:
        res += tl.load(b_ptr + rows_c, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    ptrs = y_ptr + offs_m[None, :] * stride_ym + rows[:, None]
    tl.store(ptrs, res.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & m_ok[None, :])


@triton.jit
def _bitmap2d_kernel(
    x_ptr, mask_ptr, val_ptr, off_ptr, b_ptr, y_ptr,
    M, N, K, Kw, T, VALS_PER_ROW, N_STEPS,
    stride_xm, stride_ym,
    woff_ptr,
    NM_N: tl.constexpr, NM_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, WORD_OFFSETS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr,
):
    """M == 1 variant on a 2-D [BLOCK_N, BLOCK_K] tile whose columns run along the lanes,
    so a warp's value gathers fall in one or two cache lines. A column's rank among the
    step's set bits comes from a running scan of the bits, or (WORD_OFFSETS) from the
    stored offset of its word plus a popcount, or from its group (n:m)."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_c = tl.where(row_ok, rows, 0)
    c = tl.arange(0, BLOCK_K)
    sh = (c % 32)[None, :]
    if NM_M == 0:
        vrow = val_ptr + tl.load(off_ptr + rows_c.to(tl.int64) * T, mask=row_ok, other=0).to(tl.int64)
        if WORD_OFFSETS:
            low = ((tl.full([BLOCK_K], 1, tl.int64) << (c % 32)) - 1).to(tl.int32)[None, :]
            worow = woff_ptr + rows_c.to(tl.int64) * Kw
    else:
        grp_shift = (c % 32 - c % NM_M)[None, :]
        grp_low = ((1 << (c % NM_M)) - 1)[None, :]
        slot = (c // NM_M * NM_N)[None, :]
        STEP_VALS: tl.constexpr = BLOCK_K // NM_M * NM_N
        vrow = val_ptr + rows_c.to(tl.int64) * VALS_PER_ROW
    wrow = mask_ptr + rows_c.to(tl.int64) * Kw
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for step in range(0, N_STEPS):
        k0 = step * BLOCK_K
        cols = k0 + c
        if EVEN:
            words = tl.load(wrow[:, None] + (cols // 32)[None, :])
            xv = tl.load(x_ptr + cols)
        else:
            words = tl.load(wrow[:, None] + (cols // 32)[None, :],
                            mask=row_ok[:, None] & (cols < Kw * 32)[None, :], other=0)
            xv = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        bit = (words >> sh) & 1
        if NM_M == 0 and WORD_OFFSETS:
            if EVEN:
                wo = tl.load(worow[:, None] + (cols // 32)[None, :]).to(tl.int32)
            else:
                wo = tl.load(worow[:, None] + (cols // 32)[None, :],
                             mask=row_ok[:, None] & (cols < Kw * 32)[None, :], other=0).to(tl.int32)
            wv = tl.load(vrow[:, None] + (wo + _popc(words & low, INTERP)), mask=bit != 0, other=0.0)
        elif NM_M == 0:
            incl = tl.cumsum(bit, axis=1)
            wv = tl.load(vrow[:, None] + (incl - bit), mask=bit != 0, other=0.0)
            vrow += tl.sum(bit, axis=1)
        else:
            rank = _popc((words >> grp_shift) & grp_low, INTERP)
            wv = tl.load(vrow[:, None] + (slot + rank), mask=bit != 0, other=0.0)
            vrow += STEP_VALS
        acc += wv.to(tl.float32) * xv.to(tl.float32)[None, :]
    res = tl.sum(acc, axis=1)
    if HAS_BIAS:
        res += tl.load(b_ptr + rows_c, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, res.to(y_ptr.dtype.element_ty), mask=row_ok)


def default_config(n: int, k: int, m: int) -> BitmapConfig:
    """A config that is reasonable before autotuning (the compiler measures better ones)."""
    if m == 1:
        return BitmapConfig(block_n=4, block_k=512, block_m=1, num_warps=2)
    if m <= 8:
        return BitmapConfig(block_n=4, block_k=256, block_m=triton.next_power_of_2(m), num_warps=4)
    return BitmapConfig(block_n=32, block_k=128, block_m=16 if m <= 16 else 32, use_dot=True, num_warps=4)


def bitmap_matmul_triton(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, n: int,
                         *, tile_offsets: torch.Tensor | None = None, word_offsets: torch.Tensor | None = None,
                         nm: tuple[int, int] | None = None, bias: torch.Tensor | None = None,
                         config: BitmapConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) with W in bitmap form; returns [M, N] in x.dtype.

    Bitmap (TiledBitmap): pass ``tile_offsets`` int32 [N, T] (only column 0, each row's start, is read).
    n:m (NMSparse): pass ``nm=(n, m)``; ``values`` is [N, Kw*32/m*n].
    """
    m_rows, k = x.shape
    kw = bitmask.shape[1]
    if config is None:
        config = default_config(n, k, m_rows)
    if config.block_k % 32 or config.block_k & (config.block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 32, got {config.block_k}")
    if config.use_dot and (config.block_m < 16 or config.block_n < 16):
        raise ValueError("use_dot needs block_m >= 16 and block_n >= 16")
    out_dtype = x.dtype
    dot_dtype = tl.float32 if x.dtype == torch.float32 else (tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16)
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(m_rows, n, device=x.device, dtype=out_dtype)
    if m_rows == 0 or n == 0:
        return y
    if nm is None:
        assert tile_offsets is not None
        off, t, vals_per_row, nm_n, nm_m = tile_offsets, tile_offsets.shape[1], 0, 0, 0
    else:
        off, t, vals_per_row = bitmask, 1, values.shape[-1]
        nm_n, nm_m = nm
    even = n % config.block_n == 0 and kw % (config.block_k // 32) == 0 and k == kw * 32
    n_steps = triton.cdiv(kw * 32, config.block_k)
    if config.flat and m_rows == 1:
        _bitmap2d_kernel[(triton.cdiv(n, config.block_n),)](
            x, bitmask, values, off, bias if bias is not None else x, y,
            m_rows, n, k, kw, t, vals_per_row, n_steps, x.stride(0), y.stride(0),
            word_offsets if word_offsets is not None else bitmask,
            NM_N=nm_n, NM_M=nm_m, HAS_BIAS=bias is not None, EVEN=even,
            WORD_OFFSETS=word_offsets is not None and nm is None,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, INTERP=INTERPRET,
            num_warps=config.num_warps, num_stages=config.num_stages)
        return y
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m_rows, config.block_m))
    _bitmap_kernel[grid](
        x, bitmask, values, off, bias if bias is not None else x, y,
        m_rows, n, k, kw, t, vals_per_row, triton.cdiv(kw * 32, config.block_k), x.stride(0), y.stride(0),
        NM_N=nm_n, NM_M=nm_m, HAS_BIAS=bias is not None,
        EVEN=n % config.block_n == 0 and kw % (config.block_k // 32) == 0 and k == kw * 32,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_M=config.block_m, USE_DOT=config.use_dot, DOT_DTYPE=dot_dtype,
        INTERP=INTERPRET, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y
