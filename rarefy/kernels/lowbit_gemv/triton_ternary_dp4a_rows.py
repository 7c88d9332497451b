"""Ternary GEMV on ``dp4a`` with whole rows per warp and 16-byte loads ("rows" kernel).

Same contract and inputs as :mod:`.triton_ternary_dp4a` (packed layout v1, activations
quantized per token to int8 in the dp4a order), different work split:

- **A warp owns its rows.** Lanes run along K, each lane holding ``VEC = 4`` consecutive
  packed words (one 16-byte load per row and step); the warps of a program take different
  rows. The final sum over K stays inside a warp (shuffles), so there is no shared memory
  and no barrier. The earlier kernel spreads K over 4 warps with one 4-byte word a lane.
- **No shift per weight.** ``w & (0x03030303 << 2t)`` leaves the codes of weights ``t, t+4,
  t+8, t+12`` in place, each byte holding ``c * 4^t`` (at most 192, still an unsigned
  byte), so ``dp4a`` adds ``4^t`` times the products. One accumulator per ``t`` keeps them
  apart, and the epilogue shifts each back (exact: every partial sum is a multiple of
  ``4^t``). Two instructions per four weights instead of three.
- **Persistent.** At most a few programs an SM, each looping over row groups: at batch 1 a
  one-wave grid of ~1800 programs spent about 1 ns a program being launched (H100: time
  grew with the program count at equal bytes), so the grid is sized to the GPU instead.
- **First weights before the PDL wait.** The packed weights are constants, so the first
  step's loads go out before ``gdc_wait``; only the activations wait for the kernel before.

Integer overflow: ``|acc_t| <= 4^t * 3 * 128 * K / 4``, below 2^31 for K up to 2^17.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_common import cdiv, next_pow2, pdl_launch_dependents, pdl_wait
from .triton_ternary_dp4a import _dp4a, _interpreting

VEC = 4  # packed words per lane and step: one 16-byte load


@dataclass(frozen=True)
class Dp4aRowsConfig:
    rows_per_warp: int = 4
    num_warps: int = 4
    programs_per_sm: int = 2  # persistent grid: at most this many programs an SM
    pdl: bool = True

    def short(self) -> str:
        return f"rows r{self.rows_per_warp} w{self.num_warps} p{self.programs_per_sm}" + (" pdl" if self.pdl else "")


@triton.jit
def _quarters(t, A: tl.constexpr, B: tl.constexpr):
    """[A, B * 4] (4 consecutive elements a thread) -> its four [A, B] quarters (element 4 b + j
    of the input is element b of quarter j)."""
    lo, hi = tl.split(tl.reshape(t, (A, B, 2, 2)))  # j = 2 i + s: lo holds s = 0, hi s = 1
    q0, q2 = tl.split(lo)
    q1, q3 = tl.split(hi)
    return q0, q1, q2, q3


@triton.jit
def _load_words(w_ptrs, u, u_end, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(w_ptrs)
    return tl.load(w_ptrs, mask=u[None, :] < u_end, other=0)


@triton.jit
def _word_products(w, x_row, u0, u_end, a0, a1, a2, a3, xacc, LANES: tl.constexpr, BLOCK_N: tl.constexpr,
                   EVEN: tl.constexpr, ASM: tl.constexpr, V: tl.constexpr):
    """Fold packed word ``V`` of every lane (``w`` [BLOCK_N, LANES]) into the accumulators. The
    word's four activation words (one per ``t``) are adjacent in the dp4a order: one 16-byte
    load a lane."""
    j = tl.arange(0, 4 * LANES)[None, :]  # [1, 4 LANES]: lane j // 4, t = j % 4
    g = u0 + (j // 4) * 4 + V  # the packed word's index along K
    if EVEN:
        xv = tl.load(x_row + 4 * g + j % 4)
    else:
        xv = tl.load(x_row + 4 * g + j % 4, mask=g < u_end, other=0)
    x0, x1, x2, x3 = _quarters(xv, 1, LANES)
    ones = tl.full([1, LANES], 0x01010101, dtype=tl.int32)
    # the masks 0x03030303 << 2t, written as int32 (0xC0C0C0C0 is negative)
    a0 = _dp4a(w & 0x03030303, tl.broadcast_to(x0, (BLOCK_N, LANES)), a0, ASM)
    a1 = _dp4a(w & 0x0C0C0C0C, tl.broadcast_to(x1, (BLOCK_N, LANES)), a1, ASM)
    a2 = _dp4a(w & 0x30303030, tl.broadcast_to(x2, (BLOCK_N, LANES)), a2, ASM)
    a3 = _dp4a(w & -1061109568, tl.broadcast_to(x3, (BLOCK_N, LANES)), a3, ASM)
    xacc = _dp4a(ones, x0, xacc, ASM)
    xacc = _dp4a(ones, x1, xacc, ASM)
    xacc = _dp4a(ones, x2, xacc, ASM)
    xacc = _dp4a(ones, x3, xacc, ASM)
    return a0, a1, a2, a3, xacc


@triton.jit
def _ternary_dp4a_rows_kernel(
    xq_ptr, w_ptr, s_ptr, xs_ptr, out_ptr,
    M, N, KU,
    stride_xm, stride_wn, stride_om,
    n_iter,
    EVEN: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr, PER_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr, LANES: tl.constexpr,
):
    """Persistent: program p takes row groups p, p + G, p + 2G, ... (G programs), each a
    BLOCK_N-row group over the whole of K in n_iter steps. One flat loop over (group, step) so
    the next step's words -- the next group's first, at a group's end -- go out before this
    step's math."""
    BLOCK_U: tl.constexpr = LANES * 4
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    pid_m = tl.program_id(2)
    n_groups = tl.cdiv(N, BLOCK_N)
    n_tasks = tl.cdiv(n_groups - pid, n_prog)
    total = n_tasks * n_iter
    arange_n = tl.arange(0, BLOCK_N)
    offs_u = tl.arange(0, BLOCK_U)
    x_row = xq_ptr + pid_m.to(tl.int64) * stride_xm

    rows = tl.minimum(pid * BLOCK_N + arange_n, N - 1)  # clamped; duplicated rows are not stored
    w = _load_words(w_ptr + rows[:, None].to(tl.int64) * stride_wn + offs_u[None, :], offs_u, KU, EVEN)
    pdl_wait(PDL)  # the weights are constants: only the activations wait for the kernel before
    a0 = tl.zeros([BLOCK_N, LANES], dtype=tl.int32)
    a1 = tl.zeros([BLOCK_N, LANES], dtype=tl.int32)
    a2 = tl.zeros([BLOCK_N, LANES], dtype=tl.int32)
    a3 = tl.zeros([BLOCK_N, LANES], dtype=tl.int32)
    xacc = tl.zeros([1, LANES], dtype=tl.int32)
    if PER_ROW:
        sc0 = 1.0
    else:
        sc0 = tl.load(s_ptr).to(tl.float32)
    xs = tl.load(xs_ptr + pid_m)
    for it in range(total):
        task = it // n_iter
        step = it - task * n_iter
        u0 = step * BLOCK_U
        # the next (group, step)'s words; the last iteration re-reads its own
        nit = tl.minimum(it + 1, total - 1)
        ntask = nit // n_iter
        nu0 = (nit - ntask * n_iter) * BLOCK_U
        nrows = tl.minimum((pid + ntask * n_prog) * BLOCK_N + arange_n, N - 1)
        nxt = _load_words(w_ptr + nrows[:, None].to(tl.int64) * stride_wn + (nu0 + offs_u)[None, :], nu0 + offs_u,
                          KU, EVEN)
        w0, w1, w2, w3 = _quarters(w, BLOCK_N, LANES)
        a0, a1, a2, a3, xacc = _word_products(w0, x_row, u0, KU, a0, a1, a2, a3, xacc, LANES, BLOCK_N, EVEN, ASM, 0)
        a0, a1, a2, a3, xacc = _word_products(w1, x_row, u0, KU, a0, a1, a2, a3, xacc, LANES, BLOCK_N, EVEN, ASM, 1)
        a0, a1, a2, a3, xacc = _word_products(w2, x_row, u0, KU, a0, a1, a2, a3, xacc, LANES, BLOCK_N, EVEN, ASM, 2)
        a0, a1, a2, a3, xacc = _word_products(w3, x_row, u0, KU, a0, a1, a2, a3, xacc, LANES, BLOCK_N, EVEN, ASM, 3)
        w = nxt
        if step == n_iter - 1:
            # each lane's sums are exact multiples of 4^t: arithmetic shifts undo the scaling
            per_lane = a0 + (a1 >> 2) + (a2 >> 4) + (a3 >> 6)
            tot = tl.sum(per_lane, axis=1) - tl.sum(tl.sum(xacc, axis=1), axis=0)
            offs_n = (pid + task * n_prog) * BLOCK_N + arange_n
            if PER_ROW:
                sc = tl.load(s_ptr + tl.minimum(offs_n, N - 1)).to(tl.float32)
            else:
                sc = sc0
            tl.store(out_ptr + pid_m.to(tl.int64) * stride_om + offs_n,
                     (tot.to(tl.float32) * sc * xs).to(out_ptr.dtype.element_ty), mask=offs_n < N)
            a0 = tl.zeros([BLOCK_N, LANES], dtype=tl.int32)
            a1 = tl.zeros([BLOCK_N, LANES], dtype=tl.int32)
            a2 = tl.zeros([BLOCK_N, LANES], dtype=tl.int32)
            a3 = tl.zeros([BLOCK_N, LANES], dtype=tl.int32)
            xacc = tl.zeros([1, LANES], dtype=tl.int32)
    pdl_launch_dependents(PDL)


def pick_dp4a_rows_config(M: int, N: int, K: int, sms: int = 132) -> Dp4aRowsConfig:
    """Default: 4 rows a warp, 4 warps a program, at most 2 programs an SM."""
    return Dp4aRowsConfig(4, 4, 2, True)


def ternary_dp4a_rows_triton(xq: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                             out_dtype: torch.dtype = torch.float32, config: Dp4aRowsConfig | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """As :func:`.triton_ternary_dp4a.ternary_dp4a_triton` (same inputs, same result), on this
    module's kernel. Packed rows must hold whole 16-byte vectors (K % 64 == 0); other K are
    refused with a ValueError."""
    M, K = xq.shape
    N = packed.shape[0]
    if K % 64 or packed.shape[1] * 4 != K:
        raise ValueError(f"the dp4a rows kernel needs K % 64 == 0 and packed [N, K / 4]; got K = {K}, "
                         f"packed {tuple(packed.shape)}")
    if scale.numel() not in (1, N):
        raise ValueError(f"the dp4a path takes a per-tensor or per-row scale, got {tuple(scale.shape)}")
    if packed.stride(1) != 1 or packed.stride(0) % 16 or packed.storage_offset() % 16:
        packed = packed.contiguous()
    words = packed.view(torch.int32)
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if M == 0 or N == 0:
        return out
    xw = xq.contiguous().view(torch.int32)
    sms = torch.cuda.get_device_properties(xq.device).multi_processor_count if xq.is_cuda else 132
    if config is None:
        config = pick_dp4a_rows_config(M, N, K, sms)
    ku = K // 16
    lanes = max(1, min(32, next_pow2(cdiv(ku, VEC))))
    bu = lanes * VEC
    num_warps = max(1, config.num_warps)
    bn = max(1, min(config.rows_per_warp * num_warps, next_pow2(N)))
    num_warps = max(1, min(num_warps, bn))
    grid = (max(1, min(cdiv(N, bn), config.programs_per_sm * sms)), 1, M)
    extra = {"launch_pdl": True} if config.pdl and xq.is_cuda else {}
    _ternary_dp4a_rows_kernel[grid](
        xw, words, scale.reshape(-1).contiguous(), x_scale.reshape(-1).float(), out,
        M, N, ku, xw.stride(0), words.stride(0), out.stride(0), cdiv(ku, bu),
        EVEN=ku % bu == 0, PDL=config.pdl and xq.is_cuda, ASM=not _interpreting(),
        PER_ROW=scale.numel() != 1 or N == 1, BLOCK_N=bn, LANES=lanes, num_warps=num_warps, **extra)
    return out
