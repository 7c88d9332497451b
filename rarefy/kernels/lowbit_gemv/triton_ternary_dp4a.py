"""Ternary GEMV with int8 activations on the integer dot-product unit: ``dp4a``.

``y[m] = x_scale[m] * s * sum_k (c_k - 1) * x_q[m, k]`` for a per-tensor (or per-row) scale ``s``, packed
weights in layout v1 (``c = value + 1``) and activations quantized per token to int8.

Why: the float path (``_ternary_fma_kernel``) spends about 2.4 SASS instructions a weight
(mask, FFMA, plus its share of the activation loads). At batch 1 that limits it to 1.1-1.2
TB/s on the 8B shapes, about 40% of copy. ``dp4a`` multiplies four byte pairs and adds
them to an int32 in one instruction. Weight ``t`` of a packed word sits at bits ``2t``, so
``(w >> 2t') & 0x03030303`` (two instructions) puts the codes of weights ``t', t'+4,
t'+8, t'+12`` in the four bytes of a register. With the activations stored in the matching
order, one ``dp4a`` then adds four products: about 0.7 instructions a weight.

Activation layout (``quantize_act_dp4a``): int8 ``[M, K]``, ``K % 16 == 0``, each group of
16 stored transposed as a 4 x 4 block of bytes: byte ``16 g + 4 t + i`` holds
``x_q[16 g + 4 i + t]``. The word ``t`` of group ``g`` then lines up with the codes register
``t`` of packed word ``g``.

Integer sums are exact: ``|sum c x_q| <= 2 * 128 * K``. The ``-1`` of every weight is
``- sum x_q``, accumulated by a ``dp4a`` with ``0x01010101`` once per word (shared by the
rows a thread holds). Each thread holds ``BLOCK_N`` rows of one word, so the activation
words are loaded once per thread for all its rows. Under ``TRITON_INTERPRET`` the
``dp4a`` is emulated with shifts (same integers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .ref import dp4a_order  # noqa: F401  (tests and callers import it from here too)
from .triton_common import (
    cdiv,
    first_words,
    next_pow2,
    pdl_launch_dependents,
    pdl_wait,
    step_words,
    store_tile,
    workspace_for,
)


@dataclass(frozen=True)
class Dp4aConfig:
    block_n: int = 8      # rows per thread (and per program)
    block_u: int = 128    # packed words per row per step (one per lane)
    split_k: int = 1
    num_warps: int = 4
    prefetch: bool = False
    pdl: bool = False  # programmatic dependent launch (sm_90+)

    def short(self) -> str:
        return (f"dp4a n{self.block_n} u{self.block_u} s{self.split_k} w{self.num_warps}"
                + (" pf" if self.prefetch else "") + (" pdl" if self.pdl else ""))


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + sum of the four byte products of a (unsigned) and b (signed)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return c


@triton.jit(do_not_specialize=["stride_wn"])
def _ternary_dp4a_kernel(
    xq_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, KU,
    stride_xm, stride_wn, stride_om,
    units_per_split, split_k, n_iter,
    EVEN: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
    PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # clamp instead of masking: duplicated rows are dropped by the store
    rows = tl.where(offs_n < N, offs_n, N - 1)
    offs_u = tl.arange(0, BLOCK_U)[None, :]
    u_start = pid_k * units_per_split
    u_end = tl.minimum(KU, u_start + units_per_split)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + (u_start + offs_u)
    x_row = xq_ptr + pid_m.to(tl.int64) * stride_xm  # int32 words, 4 per packed word
    acc = tl.zeros([BLOCK_N, BLOCK_U], dtype=tl.int32)
    xacc = tl.zeros([1, BLOCK_U], dtype=tl.int32)
    ones = tl.full([1, BLOCK_U], 0x01010101, dtype=tl.int32)
    w_nxt = first_words(w_ptrs, u_start + offs_u, u_end, PREFETCH, EVEN)
    # the packed weights are constants: only the activations wait for the previous kernel
    pdl_wait(PDL)
    for it in range(n_iter):
        u = u_start + it * BLOCK_U + offs_u
        w, w_nxt = step_words(w_ptrs, w_nxt, it, n_iter, u, u_end, PREFETCH, EVEN, BLOCK_U)
        for t in tl.static_range(4):
            if EVEN:
                xw = tl.load(x_row + 4 * u + t)
            else:
                xw = tl.load(x_row + 4 * u + t, mask=u < u_end, other=0)
            acc = _dp4a((w >> (2 * t)) & 0x03030303, xw, acc, ASM)
            xacc = _dp4a(ones, xw, xacc, ASM)
        w_ptrs += BLOCK_U
    pdl_launch_dependents(PDL)
    tot = tl.sum(acc, axis=1) - tl.sum(tl.sum(xacc, axis=1), axis=0)
    if PER_ROW:  # one scale per output row (stacked per-tensor layers: q/k/v, gate/up)
        sc = tl.load(s_ptr + rows).to(tl.float32)
    else:
        sc = tl.load(s_ptr).to(tl.float32)
    res = tot.to(tl.float32) * sc * tl.load(xs_ptr + pid_m)
    store_tile(res[None, :], out_ptr, ws_ptr, cnt_ptr, pid_m + tl.arange(0, 1), offs_n, M, N, stride_om,
               pid_k, split_k, SPLIT, 1, BLOCK_N)


@triton.jit
def _quant_act_dp4a_kernel(x_ptr, xq_ptr, xs_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """Per-token absmax int8 quantization (as ``_quant_act_kernel``: bit-identical values),
    stored in the dp4a order: byte ``16 g + 4 t + i`` <- element ``16 g + 4 i + t``."""
    m = tl.program_id(0)
    row = x_ptr + m.to(tl.int64) * stride_xm
    offs = tl.arange(0, BLOCK_K)
    j = offs % 16
    dest = offs - j + 4 * (j % 4) + j // 4
    if BLOCK_K >= K:
        # the whole row in registers: one read, one latency (this launch sits on the decode
        # step's critical path before every projection)
        v = tl.load(row + offs, mask=offs < K, other=0.0).to(tl.float32)
        a = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-5)
        inv = tl.math.div_rn(127.0, a)
        tl.store(xq_ptr + m.to(tl.int64) * K + dest, _round_i8(v * inv), mask=offs < K)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        a = tl.maximum(tl.max(amax, axis=0), 1e-5)
        inv = tl.math.div_rn(127.0, a)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            tl.store(xq_ptr + m.to(tl.int64) * K + k0 + dest, _round_i8(v * inv), mask=k0 + offs < K)
    tl.store(xs_ptr + m, tl.math.div_rn(a, 127.0))


@triton.jit
def _round_i8(v):
    # round half to even: 1.5 * 2^23 forces rounding at the units digit (|v| <= 128)
    q = (v + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def quantize_act_dp4a(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``x [M, K]`` (``K % 16 == 0``) -> ``(x_q in the dp4a order, x_scale [M])``."""
    M, K = x.shape
    if K % 16:
        raise ValueError(f"the dp4a path needs K % 16 == 0, got K = {K}")
    xq = torch.empty((M, K), dtype=torch.int8, device=x.device)
    xs = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return xq, xs
    if x.stride(1) != 1:
        x = x.contiguous()
    bk = max(16, min(16384, next_pow2(K)))
    _quant_act_dp4a_kernel[(M,)](x, xq, xs, K, x.stride(0), BLOCK_K=bk, num_warps=max(4, min(16, bk // 512)),
                                 enable_fp_fusion=False)
    return xq, xs


def pick_dp4a_config(M: int, N: int, K: int, sms: int = 132) -> Dp4aConfig:
    """From the H100 sweep (benchmarks/gpu_ternary_dp4a.py --sweep, docs/results/lowbit-gpu.md):
    4 rows a thread (8 from N = 8192), no K split while that leaves 2 programs an SM,
    programmatic dependent launch on."""
    bn = 8 if N >= 8192 else 4
    tiles = cdiv(N, bn) * M
    split = 1
    while tiles * split < 2 * sms and K // 16 >= 2 * split * 128 and split < 16:
        split *= 2
    return Dp4aConfig(bn, 128, split, 4, prefetch=False, pdl=True)


def ternary_dp4a_triton(xq: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                        out_dtype: torch.dtype = torch.float32, config: Dp4aConfig | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``x_scale * (x_q @ (Q * s)^T)``: ``xq`` int8 ``[M, K]`` in the dp4a order, ``x_scale``
    float32 ``[M]``, ``packed`` uint8 ``[N, K / 4]`` (layout v1, rows 4-byte aligned),
    ``scale`` one element (per tensor) or ``N`` (per row: groups of the whole row)."""
    M, K = xq.shape
    N = packed.shape[0]
    if K % 16 or packed.shape[1] * 4 != K:
        raise ValueError(f"the dp4a path needs K % 16 == 0 and packed [N, K / 4]; got K = {K}, "
                         f"packed {tuple(packed.shape)}")
    if scale.numel() not in (1, N):
        raise ValueError(f"the dp4a path takes a per-tensor or per-row scale, got {tuple(scale.shape)}")
    if packed.stride(1) != 1 or packed.stride(0) % 4 or packed.storage_offset() % 4:
        packed = packed.contiguous()
    words = packed.view(torch.int32)
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if M == 0 or N == 0:
        return out
    xw = xq.contiguous().view(torch.int32)
    if config is None:
        config = pick_dp4a_config(M, N, K, torch.cuda.get_device_properties(xq.device).multi_processor_count
                                  if xq.is_cuda else 132)
    ku = K // 16
    bu = max(1, min(config.block_u, next_pow2(ku)))
    steps = cdiv(ku, bu)
    split = max(1, min(config.split_k, steps))
    per_split = cdiv(steps, split) * bu
    split = cdiv(ku, per_split)
    bn = max(1, min(config.block_n, next_pow2(N)))
    grid = (cdiv(N, bn), split, M)
    if split > 1:
        ws = workspace_for(xq.device)
        ws.ensure(split * M * grid[0] * bn, M * grid[0])
        ws_buf, cnt_buf = ws.partials, ws.counters
    else:
        ws_buf = cnt_buf = out
    extra = {"launch_pdl": True} if config.pdl else {}
    _ternary_dp4a_kernel[grid](
        xw, words, scale.reshape(-1).contiguous(), x_scale.reshape(-1).float(), out, ws_buf, cnt_buf,
        M, N, ku, xw.stride(0), words.stride(0), out.stride(0), per_split, split, per_split // bu,
        EVEN=ku % per_split == 0, SPLIT=split > 1, PREFETCH=config.prefetch, PDL=config.pdl,
        ASM=not _interpreting(), PER_ROW=scale.numel() != 1 or N == 1, BLOCK_N=bn, BLOCK_U=bu,
        num_warps=max(1, min(config.num_warps, bu // 32)), **extra)
    return out
