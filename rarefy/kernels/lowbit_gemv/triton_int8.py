"""Triton kernels: ``y = x @ (Q * s)^T`` with int8 ``Q`` (weight-only, symmetric) read as
int8 -- half the bytes of bf16 -- and converted in registers.

``_int8_fma_kernel`` (one row of ``x`` per program; the M = 1 decode path)
    16-byte loads of the int8 tile, conversion without the slow int->float unit:
    ``(u8(q) ^ 0x4B000080)`` reinterpreted as float32 is ``2^23 + q + 128``, one FADD makes
    it ``q`` (the same magic-number idea as FasterTransformer's / Marlin's dequantizers,
    here in fp32 so that the multiply stays exact). FFMA into an fp32 tile; each thread
    folds its ``FOLD`` neighbours (so the accumulator stays small), and with per-group
    scales multiplies each folded chunk by its group's scale.

``_int8_dot_kernel`` (``BLOCK_M`` = 16/32 rows of ``x`` per program)
    ``tl.dot(Q_tile -> x dtype, x_tile^T)`` on tensor cores (int8 values are exact in
    bf16/fp16); per-group scales are applied to each K step's partial product (the step
    must lie inside one group), per-channel scales at the end.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .plan import Int8Config, cdiv, fit_int8_config, next_pow2, pick_int8_config
from .triton_common import (
    GemvWorkspace,
    device_sms,
    pdl_launch_dependents,
    pdl_wait,
    store_tile,
    workspace_for,
)


@triton.jit
def _i8_to_f32(w):
    # u8(q) ^ 0x80 = q + 128; | 0x4B000000 -> float 2^23 + q + 128
    return (w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _int8_fma_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    k_per_split, split_k, n_iter,
    GROUPED: tl.constexpr,
    GROUP: tl.constexpr,        # group size in elements (GROUPED only; a multiple of FOLD)
    FOLD: tl.constexpr,
    EVEN: tl.constexpr,
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.where(offs_n < N, offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_K // FOLD)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + k_start + offs_k
    s_rows = s_ptr + rows[:, None].to(tl.int64) * stride_sn

    acc = tl.zeros([BLOCK_N, BLOCK_K // FOLD], dtype=tl.float32)
    if PREFETCH:
        if EVEN:
            w_nxt = tl.load(w_ptrs)
        else:
            w_nxt = tl.load(w_ptrs, mask=(k_start + offs_k)[None, :] < k_end, other=0)
    pdl_wait(PDL)
    for it in range(n_iter):
        k0 = k_start + it * BLOCK_K
        if PREFETCH:
            # register double buffering (the last step re-reads its own tile)
            w = w_nxt
            if EVEN:
                w_nxt = tl.load(w_ptrs + tl.where(it + 1 < n_iter, BLOCK_K, 0))
            else:
                w_nxt = tl.load(w_ptrs + BLOCK_K, mask=(k0 + BLOCK_K + offs_k)[None, :] < k_end, other=0)
        else:
            if EVEN:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=(k0 + offs_k)[None, :] < k_end, other=0)
        if EVEN:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(k0 + offs_k) < k_end, other=0.0)
        prod = _i8_to_f32(w) * x.to(tl.float32)[None, :]
        if FOLD > 1:
            part = tl.sum(tl.reshape(prod, [BLOCK_N, BLOCK_K // FOLD, FOLD]), axis=2)
        else:
            part = prod
        if GROUPED:
            cidx = (k0 + offs_c * FOLD) // GROUP
            if EVEN:
                sc = tl.load(s_rows + cidx[None, :]).to(tl.float32)
            else:
                sc = tl.load(s_rows + cidx[None, :], mask=(k0 + offs_c * FOLD)[None, :] < k_end, other=0.0)
                sc = sc.to(tl.float32)
            acc += part * sc
        else:
            acc += part
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    pdl_launch_dependents(PDL)

    res = tl.sum(acc, axis=1)
    if not GROUPED:
        res = res * tl.load(s_ptr + rows).to(tl.float32)
    offs_m = pid_m + tl.arange(0, 1)
    store_tile(res[None, :], out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid_k, split_k,
               SPLIT, 1, BLOCK_N)


@triton.jit
def _int8_dot_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    k_per_split, split_k, n_iter,
    GROUPED: tl.constexpr,
    GROUP: tl.constexpr,        # group size (GROUPED only; a multiple of BLOCK_K)
    EVEN: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.where(offs_n < N, offs_n, N - 1)
    rows_m = tl.where(offs_m < M, offs_m, M - 1)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + rows_m[None, :].to(tl.int64) * stride_xm + (k_start + offs_k)[:, None]

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    pdl_wait(PDL)
    for it in range(n_iter):
        k0 = k_start + it * BLOCK_K
        if EVEN:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            kmask = (k0 + offs_k) < k_end
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0)
            x = tl.load(x_ptrs, mask=kmask[:, None], other=0.0)
        wq = _i8_to_f32(w).to(x.dtype)
        if GROUPED:
            part = tl.dot(wq, x)
            sc = tl.load(s_ptr + rows_n.to(tl.int64) * stride_sn + k0 // GROUP).to(tl.float32)
            acc += part * sc[:, None]
        else:
            acc = tl.dot(wq, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    pdl_launch_dependents(PDL)

    if not GROUPED:
        acc = acc * tl.load(s_ptr + rows_n).to(tl.float32)[:, None]
    store_tile(tl.trans(acc), out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid_k, split_k,
               SPLIT, BLOCK_M, BLOCK_N)


# --------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class _Plan:
    grid: tuple
    per_split: int
    split: int
    n_iter: int
    ws_elems: int
    counters: int
    meta: dict = field(hash=False, compare=False)


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, K: int, cfg: Int8Config, group_size: int | None) -> _Plan:
    cfg = fit_int8_config(cfg, K, group_size)
    grouped = group_size is not None
    if cfg.path == "fma":
        bk = max(16, min(cfg.block_k, next_pow2(K)))
        fold = min(cfg.fold, bk)
        bn = max(1, min(cfg.block_n, next_pow2(N)))
        bm = 1
        nw = max(1, min(cfg.num_warps, bk // 512))
    else:
        bk = cfg.block_k
        bn = max(16, min(cfg.block_n, next_pow2(N)))
        bm = max(16, cfg.block_m)
        nw = cfg.num_warps
    steps = cdiv(K, bk)
    split = max(1, min(cfg.split_k, steps))
    per_split = cdiv(steps, split) * bk
    split = cdiv(K, per_split)
    m_tiles = M if cfg.path == "fma" else cdiv(M, bm)
    grid = (cdiv(N, bn), split, m_tiles)
    meta = dict(GROUPED=grouped, GROUP=group_size if grouped else 1, EVEN=K % per_split == 0,
                SPLIT=split > 1, PDL=cfg.pdl, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=cfg.num_stages)
    if cfg.path == "fma":
        meta.update(FOLD=fold, PREFETCH=cfg.prefetch)
    else:
        meta.update(BLOCK_M=bm)
    return _Plan(grid, per_split, split, per_split // bk, split * m_tiles * grid[0] * bm * bn, m_tiles * grid[0], meta)


def int8_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    group_size: int | None = None,
    out: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    config: Int8Config | None = None,
    workspace: GemvWorkspace | None = None,
    compile_only: bool = False,
) -> torch.Tensor:
    """``out = x @ (Q * s)^T`` with the Triton kernels.

    Args:
        x: ``[M, K]`` bf16/fp16/fp32.
        qweight: int8 ``[N, K]`` (rows contiguous).
        scale: ``[N]`` / ``[N, 1]`` per channel or ``[N, K // group_size]``.
        out: optional ``[M, N]`` output (contiguous rows) in `out_dtype` (default ``x.dtype``).
        config: launch configuration (:func:`pick_int8_config` if None).
    """
    M, K = x.shape
    N = qweight.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if qweight.stride(1) != 1:
        qweight = qweight.contiguous()
    if config is None:
        xk = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[x.dtype]
        config = pick_int8_config(M, N, K, group_size, xk, device_sms(x))
    if config.path == "dot" and x.dtype == torch.float32:
        config = Int8Config("fma", 4, 2048, 1, prefetch=True)
    plan = _plan(M, N, K, config, group_size)
    if group_size is None:
        s = scale.reshape(-1)
        if s.stride(0) != 1:
            s = s.contiguous()
        stride_sn = 1
    else:
        s = scale if scale.stride(-1) == 1 else scale.contiguous()
        stride_sn = s.stride(0)
    if plan.split > 1:
        ws = workspace if workspace is not None else workspace_for(x.device)
        ws.ensure(plan.ws_elems, plan.counters)
        ws_buf, cnt_buf = ws.partials, ws.counters
    else:
        ws_buf = cnt_buf = out
    kernel = _int8_fma_kernel if config.path == "fma" else _int8_dot_kernel
    args = (x, qweight, s, out, ws_buf, cnt_buf, M, N, K,
            x.stride(0), qweight.stride(0), stride_sn, out.stride(0),
            plan.per_split, plan.split, plan.n_iter)
    extra = dict(launch_pdl=True) if config.pdl else {}
    if compile_only:
        kernel.warmup(*args, grid=plan.grid, **plan.meta, **extra)
    else:
        kernel[plan.grid](*args, **plan.meta, **extra)
    return out
