"""Triton sparse matmul over the bitmap layout with int8 values (``Int8TiledBitmap``):
``y = x @ (scale[:, None] * Q).T (+ bias)``.

x: [M, K] fp16/bf16/fp32, Q given as bitmask int32 [N, Kw] + packed int8 values + per-row
tile offsets (column 0 = the row's first value), scale fp32 [N]; y: [M, N] in x.dtype,
fp32 accumulation.

The structure is triton_bitmap.py's (same value addressing: running row offset + prefix of
the step's word popcounts + popcount of the bits below the column; only set bits load),
with the values read as int8 (half the value bytes of fp16: 0.625 B/weight at 50% density
against 1.125) and widened to fp32 in registers; the row's scale multiplies the fp32 sum
once, after the K loop. Two kernels, as there:

    _int8_kernel     [BLOCK_N, BLOCK_K/32, 32] tiles, BLOCK_M x rows per program (FMA for
                     small M, ``use_dot`` feeds the rebuilt tile to tl.dot for M >= 16)
    _int8_2d_kernel  M == 1 only (``flat``): a [BLOCK_N, BLOCK_K] tile with columns along the
                     lanes; a column's rank comes from a running scan of the bits

Launch parameters are ``BitmapConfig`` (shared with triton_bitmap.py): block_n, block_k,
block_m, use_dot, flat, num_warps, num_stages.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_bitmap import INTERPRET, BitmapConfig, _popc, default_config

__all__ = ["bitmap_int8_matmul_triton", "BitmapConfig", "default_config"]


@triton.jit
def _int8_kernel(
    x_ptr, mask_ptr, val_ptr, off_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, Kw, T, N_STEPS,
    stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,  # EVEN: N % BLOCK_N == 0 and Kw % (BLOCK_K/32) == 0 and K == 32 Kw
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
    bit3 = (tl.full([32], 1, tl.int64) << j).to(tl.int32)[None, None, :]
    low3 = ((tl.full([32], 1, tl.int64) << j) - 1).to(tl.int32)[None, None, :]
    vrow = val_ptr + tl.load(off_ptr + rows_c.to(tl.int64) * T, mask=row_ok, other=0).to(tl.int64)
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
        wi = k0 // 32 + g
        if EVEN:
            words = tl.load(wrow[:, None] + wi[None, :])
        else:
            words = tl.load(wrow[:, None] + wi[None, :], mask=row_ok[:, None] & (wi < Kw)[None, :], other=0)
        w3 = words[:, :, None]
        bit = (w3 & bit3) != 0
        cnt = _popc(words, INTERP)
        word_base = tl.cumsum(cnt, axis=1) - cnt
        wv = tl.load(vrow[:, None, None] + (word_base[:, :, None] + _popc(w3 & low3, INTERP)),
                     mask=bit, other=0).to(tl.float32)
        vrow += tl.sum(cnt, axis=1)
        cols = k0 + g[:, None] * 32 + j[None, :]
        if USE_DOT:
            c1 = tl.reshape(cols, [BLOCK_K])
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + c1[None, :],
                         mask=m_ok[:, None] & (c1 < K)[None, :], other=0.0)
            if DOT_DTYPE == tl.float32:
                acc = tl.dot(tl.reshape(wv, [BLOCK_N, BLOCK_K]), tl.trans(xt.to(tl.float32)), acc,
                             input_precision="ieee")
            else:  # |q| <= 127 is exact in bf16 and fp16
                acc = tl.dot(tl.reshape(wv, [BLOCK_N, BLOCK_K]).to(DOT_DTYPE), tl.trans(xt.to(DOT_DTYPE)), acc)
        elif BLOCK_M == 1:
            if EVEN:
                xv = tl.load(x_ptr + pid_m * stride_xm + cols)
            else:
                xv = tl.load(x_ptr + pid_m * stride_xm + cols, mask=cols < K, other=0.0)
            acc += wv * xv.to(tl.float32)[None, :, :]
        else:
            xt = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + cols[None, :, :],
                         mask=m_ok[:, None, None] & (cols < K)[None, :, :], other=0.0).to(tl.float32)
            prod = wv[:, None, :, :] * xt[None, :, :, :]
            acc += tl.sum(tl.sum(prod, axis=3), axis=2)

    if USE_DOT or BLOCK_M > 1:
        res = acc
    else:
        res = tl.sum(tl.sum(acc, axis=2), axis=1)[:, None]
    res = res * tl.load(s_ptr + rows_c, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        res += tl.load(b_ptr + rows_c, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    ptrs = y_ptr + offs_m[None, :] * stride_ym + rows[:, None]
    tl.store(ptrs, res.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & m_ok[None, :])


@triton.jit
def _int8_2d_kernel(
    x_ptr, mask_ptr, val_ptr, off_ptr, s_ptr, b_ptr, y_ptr,
    N, K, Kw, T, N_STEPS,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """M == 1 on a 2-D [BLOCK_N, BLOCK_K] tile, columns along the lanes."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_c = tl.where(row_ok, rows, 0)
    c = tl.arange(0, BLOCK_K)
    sh = (c % 32)[None, :]
    vrow = val_ptr + tl.load(off_ptr + rows_c.to(tl.int64) * T, mask=row_ok, other=0).to(tl.int64)
    wrow = mask_ptr + rows_c.to(tl.int64) * Kw
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for step in range(0, N_STEPS):
        cols = step * BLOCK_K + c
        if EVEN:
            words = tl.load(wrow[:, None] + (cols // 32)[None, :])
            xv = tl.load(x_ptr + cols)
        else:
            words = tl.load(wrow[:, None] + (cols // 32)[None, :],
                            mask=row_ok[:, None] & (cols < Kw * 32)[None, :], other=0)
            xv = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        bit = (words >> sh) & 1
        incl = tl.cumsum(bit, axis=1)
        wv = tl.load(vrow[:, None] + (incl - bit), mask=bit != 0, other=0)
        vrow += tl.sum(bit, axis=1)
        acc += wv.to(tl.float32) * xv.to(tl.float32)[None, :]
    res = tl.sum(acc, axis=1) * tl.load(s_ptr + rows_c, mask=row_ok, other=0.0)
    if HAS_BIAS:
        res += tl.load(b_ptr + rows_c, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, res.to(y_ptr.dtype.element_ty), mask=row_ok)


def bitmap_int8_matmul_triton(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor,
                              tile_offsets: torch.Tensor, scale: torch.Tensor, n: int, *,
                              bias: torch.Tensor | None = None,
                              config: BitmapConfig | None = None) -> torch.Tensor:
    """x [M, K] @ (scale * Q).T (+ bias), Q a bitmap with int8 values; returns [M, N] in x.dtype.

    bitmask int32 [N, ceil(K/32)], values int8 (flat), tile_offsets int32 [N, T] (column 0 is
    read), scale float32 [N]; all on x's device. `config` (default ``default_config``) holds
    the launch parameters.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if values.dtype != torch.int8:
        raise TypeError(f"values must be int8, got {values.dtype}")
    if scale.dtype != torch.float32 or scale.numel() != n:
        raise ValueError(f"scale must be float32 with {n} elements, got {scale.dtype} {tuple(scale.shape)}")
    if bitmask.dtype != torch.int32 or tile_offsets.dtype != torch.int32:
        raise TypeError("bitmask and tile_offsets must be int32")
    m_rows, k = x.shape
    kw = bitmask.shape[1]
    if bitmask.shape[0] != n or kw != (k + 31) // 32:
        raise ValueError(f"bitmask must be [N, ceil(K/32)] = [{n}, {(k + 31) // 32}], got {tuple(bitmask.shape)}")
    if config is None:
        config = default_config(n, k, m_rows)
    if config.block_k % 32 or config.block_k & (config.block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 32, got {config.block_k}")
    if config.use_dot and (config.block_m < 16 or config.block_n < 16):
        raise ValueError("use_dot needs block_m >= 16 and block_n >= 16")
    dot_dtype = tl.float32 if x.dtype == torch.float32 else (tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16)
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(m_rows, n, device=x.device, dtype=x.dtype)
    if m_rows == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.to(y.dtype).expand_as(y))
    scale = scale.contiguous()
    even = n % config.block_n == 0 and kw % (config.block_k // 32) == 0 and k == kw * 32
    n_steps = triton.cdiv(kw * 32, config.block_k)
    b = bias if bias is not None else scale
    if config.flat and m_rows == 1:
        _int8_2d_kernel[(triton.cdiv(n, config.block_n),)](
            x, bitmask, values, tile_offsets, scale, b, y,
            n, k, kw, tile_offsets.shape[1], n_steps,
            HAS_BIAS=bias is not None, EVEN=even, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages)
        return y
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m_rows, config.block_m))
    _int8_kernel[grid](
        x, bitmask, values, tile_offsets, scale, b, y,
        m_rows, n, k, kw, tile_offsets.shape[1], n_steps, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN=even,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_M=config.block_m, USE_DOT=config.use_dot,
        DOT_DTYPE=dot_dtype, INTERP=INTERPRET, num_warps=config.num_warps, num_stages=config.num_stages)
    return y
