"""Triton kernels: ``y = x @ (Q * s)^T`` with ternary ``Q`` kept packed (layout v1, 2 bits a
weight), unpacked in registers -- no dequantized weight is ever written.

Two kernels (docs/lowbit-kernels.md has the reasoning and the sm_90 instruction counts):

``_ternary_fma_kernel`` (one row of ``x`` per program; the M = 1 decode path)
    Reads the packed matrix as int32 *words* (16 weights, ``K % 16 == 0``) or, for other
    ``K``, as bytes (4 weights). Weight ``t`` of a word sits in bits ``2t, 2t+1``; the
    kernel masks it **in place** (``w & (3 << 2t)``, one LOP3) and reinterprets the int32
    as a float32: a bit pattern below 2^24 is the number ``pattern * 2^-149`` (a denormal,
    or just above), so the masked word *is* ``c * 4^t * 2^-149`` with ``c = value + 1``.
    One FFMA with the activation pre-scaled by ``2^(X_EXP - 2t)`` adds ``c * x`` (scaled by
    ``2^(X_EXP-149)``) -- two instructions per weight (mask, FFMA), no shift, no int->float
    conversion. The ``-1`` of ``value = c - 1`` is applied once per step as ``-sum(x)``.
    Weights 12..15 of a word come from ``w >> 16`` (one shift per 16 weights).
    Every thread holds ``BLOCK_N`` rows x one word (the stride argument is not specialised,
    so Triton does not vectorise the word loads and the activation loads keep the weight
    tile's layout: no shared-memory layout conversion inside the loop; checked on sm_90).
    Per-group scales: one scale load per (row, word) -- groups must be a multiple of 16
    (words) or of 4 (byte path).

``_ternary_dot_kernel`` (``BLOCK_M`` = 16/32 rows of ``x`` per program; small batches)
    Tensor cores: ``tl.dot(Wq [BLOCK_N, 2*BLOCK_W], x_p^T)``. The weight tile is built in
    registers two weights per 32-bit register: ``(w & mask_pair) | MAGIC`` puts the codes of
    weights ``p`` and ``p + 8`` of a word into the mantissas of a bf16 (fp16) pair whose
    value is ``M + c * 4^tm``; one packed FMA (``* 4^-tm - (M * 4^-tm + 1)``) makes them
    exactly ``c - 1`` (HFMA2 on sm_90). ``tl.join`` of the two halves + reshape gives a
    ``[BLOCK_N, 2 * BLOCK_W]`` operand that Triton keeps in registers (wgmma with A from
    registers; one int32 layout conversion of the word tile per step). Eight such dots
    (pair positions ``p = 0..7``) cover the 16 weights of each word; the activation tile
    of each dot is gathered to match (``x[m, 16 j + p + 8 s]``). ``PPD = 2`` joins two pair
    positions per dot (K of a dot = 4 * BLOCK_W, for groups of 64).
    int8 activations (``XQ``): ``x_q`` tiles are converted to fp16 (exact) and run through
    the same (fp16) dots; every product is an integer and fp32 sums of integers are exact
    below 2^24 (|x_q| <= 128: K < 131072), so this *is* integer accumulation. ``I8MMA``
    runs them on int8 tensor cores instead (codes as int8 ``c - 1`` four to a register with
    ``(((w >> 2i) & 0x03030303) + 0x7F7F7F7F) ^ 0x80808080``, int32 accumulators): fewer
    MMA bytes, but Triton unpacks and re-packs the four bytes (3.3 vs 2.2 instructions a
    weight on sm_90), so it is off by default.

Both split K across programs when the N tiles cannot fill the GPU (see triton_common).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .plan import TernaryConfig, cdiv, next_pow2, pick_ternary_config, ternary_word_path
from .triton_common import (
    GemvWorkspace,
    device_sms,
    first_words,
    pdl_launch_dependents,
    pdl_wait,
    step_words,
    store_tile,
    workspace_for,
)

#: Activations are scaled by 2^(X_EXP - 2t) before the FFMA with a masked word; products
#: land at 2^(X_EXP - 149) times their value. 99 keeps |x| < 2^29 finite and products of
#: |x| > 2^-76 normal (fp16 activations are always in range).
X_EXP = tl.constexpr(99)


@triton.jit(do_not_specialize=["stride_wn", "stride_sn"])
def _ternary_fma_kernel(
    x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, KU,
    stride_xm, stride_wn, stride_sn, stride_om,
    units_per_split, split_k, n_iter,
    WPB: tl.constexpr,          # weights per load unit: 16 (int32 words) or 4 (bytes)
    GROUPED: tl.constexpr,
    GROUP_U: tl.constexpr,      # group size in units (GROUPED only)
    HAS_XS: tl.constexpr,       # per-row activation scale (int8 activations)
    EVEN: tl.constexpr,
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
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
    s_rows = s_ptr + rows[:, None].to(tl.int64) * stride_sn
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm

    acc = tl.zeros([BLOCK_N, BLOCK_U], dtype=tl.float32)
    if GROUPED:
        xacc = tl.zeros([BLOCK_N, BLOCK_U], dtype=tl.float32)
    else:
        xacc = tl.zeros([1, BLOCK_U], dtype=tl.float32)

    w_nxt = first_words(w_ptrs, u_start + offs_u, u_end, PREFETCH, EVEN)
    # weights and scales are constants: only the activations wait for the previous kernel
    pdl_wait(PDL)

    for it in range(n_iter):
        u = u_start + it * BLOCK_U + offs_u
        w, w_nxt = step_words(w_ptrs, w_nxt, it, n_iter, u, u_end, PREFETCH, EVEN, BLOCK_U)
        w = w.to(tl.int32)
        if WPB == 16:
            wh = w >> 16
        p = tl.zeros([BLOCK_N, BLOCK_U], dtype=tl.float32)
        xsum = tl.zeros([1, BLOCK_U], dtype=tl.float32)
        xp = x_row + u * WPB
        for t in tl.static_range(WPB):
            if EVEN:
                xv = tl.load(xp + t)
            else:
                xv = tl.load(xp + t, mask=(u < u_end) & (u * WPB + t < K), other=0.0)
            xv = xv.to(tl.float32)
            xsum += xv
            # weight t of the unit: code at bit 2t (t < 12: patterns below 2^24, where the
            # float reading is linear), or bit 2t - 16 of w >> 16
            if t < 12:
                f = (w & (3 << (2 * t))).to(tl.float32, bitcast=True)
                p += f * (xv * (2.0 ** (X_EXP - 2 * t)))
            else:
                f = (wh & (3 << (2 * t - 16))).to(tl.float32, bitcast=True)
                p += f * (xv * (2.0 ** (X_EXP - 2 * t + 16)))
        if GROUPED:
            if EVEN:
                sc = tl.load(s_rows + u // GROUP_U).to(tl.float32)
            else:
                sc = tl.load(s_rows + u // GROUP_U, mask=u < u_end, other=0.0).to(tl.float32)
            acc += p * sc
            xacc += xsum * sc
        else:
            acc += p
            xacc += xsum
        w_ptrs += BLOCK_U
    # the next kernel may start its prologue (it waits for this grid before reading our output)
    pdl_launch_dependents(PDL)

    # sum_k (c - 1) x = sum c x - sum x ; c x was accumulated at 2^(X_EXP - 149)
    if GROUPED:
        res = tl.sum(acc, axis=1) * (2.0 ** (149 - X_EXP)) - tl.sum(xacc, axis=1)
    else:
        s = tl.load(s_ptr).to(tl.float32)
        res = (tl.sum(acc, axis=1) * (2.0 ** (149 - X_EXP)) - tl.sum(tl.sum(xacc, axis=1), axis=0)) * s
    if HAS_XS:
        res = res * tl.load(xs_ptr + pid_m).to(tl.float32)
    offs_m = pid_m + tl.arange(0, 1)
    store_tile(res[None, :], out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid_k, split_k,
               SPLIT, 1, BLOCK_N)


@triton.jit
def _pair(ww, TM: tl.constexpr, MAGIC: tl.constexpr, MVAL: tl.constexpr):
    """Weights ``p`` and ``p + 8`` of each word (codes at bits ``2*TM`` of ``ww``'s two
    halves) as exact ``c - 1`` in the activation's 16-bit float type: ``[.., 2]``."""
    # ww already has the magic's bits set (ww = w | MAGIC2): (w | M) & (m | M) = (w & m) | M,
    # one LOP3 with one immediate per pair of weights
    v = ww & ((3 << (2 * TM)) | (3 << (2 * TM + 16)) | (MAGIC * 65537))
    if MAGIC == 0x4300:
        lo = v.to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (v >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        lo = v.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    # (M + c 4^TM) * 4^-TM - (M 4^-TM + 1) = c - 1, exact
    return tl.join(lo, hi) * (0.25 ** TM) - (MVAL * (0.25 ** TM) + 1.0)


@triton.jit
def _pair_at(w, w1, w2, P: tl.constexpr, MAGIC: tl.constexpr, MVAL: tl.constexpr):
    """Pair position P = 0..7: bits 2P of each half, taken from w (P < 3), w >> 6 (P < 6)
    or w >> 12, so the code lands in the low 6 mantissa bits."""
    if P < 3:
        r = _pair(w, P, MAGIC, MVAL)
    elif P < 6:
        r = _pair(w1, P - 3, MAGIC, MVAL)
    else:
        r = _pair(w2, P - 6, MAGIC, MVAL)
    return r


@triton.jit
def _i8_codes(w, I: tl.constexpr):
    """Weights 4b + I (b = 0..3) of each word as int8 ``c - 1``: ``[.., 2, 2]`` with
    element ``[.., e, f]`` = byte ``2 f + e``."""
    v = (((w >> (2 * I)) & 0x03030303) + 0x7F7F7F7F) ^ -2139062144  # ^ 0x80808080
    b0 = v.to(tl.int8)
    b1 = (v >> 8).to(tl.int8)
    b2 = (v >> 16).to(tl.int8)
    b3 = (v >> 24).to(tl.int8)
    return tl.join(tl.join(b0, b1), tl.join(b2, b3))


@triton.jit(do_not_specialize=["stride_sn"])
def _ternary_dot_kernel(
    x_ptr, w_ptr, s_ptr, xs_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, KW,
    stride_xm, stride_wn, stride_sn, stride_om,
    words_per_split, split_k, n_iter,
    XQ: tl.constexpr,           # int8 activations (x_ptr int8, xs_ptr per-row scale)
    I8MMA: tl.constexpr,        # XQ on int8 tensor cores (else fp16 ones, exact as well)
    MAGIC: tl.constexpr,        # 0x4300 (bf16 activations) or 0x6400 (fp16)
    MVAL: tl.constexpr,         # the magic's value: 128.0 or 1024.0
    PPD: tl.constexpr,          # pair positions per dot: 1 or 2 (float activations)
    GROUPED: tl.constexpr,
    GROUP_W: tl.constexpr,      # group size in words (GROUPED only; a multiple of BLOCK_W)
    EVEN: tl.constexpr,
    SPLIT: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.where(offs_n < N, offs_n, N - 1)
    rows_m = tl.where(offs_m < M, offs_m, M - 1)
    offs_w = tl.arange(0, BLOCK_W)
    w_start = pid_k * words_per_split
    w_end = tl.minimum(KW, w_start + words_per_split)

    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + (w_start + offs_w)[None, :]
    if I8MMA:
        # dot operand column r = 4 j + 2 e + f holds weight 16 j + 4 (2 f + e) + i
        r = tl.arange(0, 4 * BLOCK_W)
        rj = r // 4
        kof = rj * 16 + 4 * (2 * (r % 2) + (r // 2) % 2)
    else:
        # column r = 2 PPD j + PPD s + a holds weight 16 j + (p0 + a) + 8 s
        r = tl.arange(0, 2 * PPD * BLOCK_W)
        rj = r // (2 * PPD)
        kof = rj * 16 + 8 * ((r // PPD) % 2) + (r % PPD)
    x_base = x_ptr + rows_m[None, :].to(tl.int64) * stride_xm + (w_start * 16 + kof)[:, None]
    xmask_j = (w_start + rj)[:, None]

    if I8MMA:
        acc_i = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)

    pdl_wait(PDL)
    for it in range(n_iter):
        wj = w_start + it * BLOCK_W
        if EVEN:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=(wj + offs_w)[None, :] < w_end, other=0)
            xm = (wj - w_start + xmask_j) < w_end
        if I8MMA:
            if GROUPED:
                step = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
            else:
                step = acc_i
            for i in tl.static_range(4):
                q = tl.reshape(_i8_codes(w, i), [BLOCK_N, 4 * BLOCK_W])
                if EVEN:
                    xq = tl.load(x_base + i)
                else:
                    xq = tl.load(x_base + i, mask=xm, other=0)
                step = tl.dot(q, xq, step, out_dtype=tl.int32)
            if GROUPED:
                sc = tl.load(s_ptr + rows_n.to(tl.int64) * stride_sn + wj // GROUP_W).to(tl.float32)
                acc += step.to(tl.float32) * sc[:, None]
            else:
                acc_i = step
        else:
            w1 = (w >> 6) | (MAGIC * 65537)
            w2 = (w >> 12) | (MAGIC * 65537)
            w = w | (MAGIC * 65537)
            if GROUPED:
                step = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            else:
                step = acc
            for g in tl.static_range(8 // PPD):
                if PPD == 1:
                    q = tl.reshape(_pair_at(w, w1, w2, g, MAGIC, MVAL), [BLOCK_N, 2 * BLOCK_W])
                else:
                    q = tl.reshape(tl.join(_pair_at(w, w1, w2, 2 * g, MAGIC, MVAL),
                                           _pair_at(w, w1, w2, 2 * g + 1, MAGIC, MVAL)),
                                   [BLOCK_N, 4 * BLOCK_W])
                if EVEN:
                    xt = tl.load(x_base + PPD * g)
                else:
                    xt = tl.load(x_base + PPD * g, mask=xm, other=0)
                if XQ:
                    # int8 activations are exact in fp16; fp32 sums of integer products
                    # stay exact below 2^24
                    xt = xt.to(tl.float16)
                step = tl.dot(q, xt, step)
            if GROUPED:
                sc = tl.load(s_ptr + rows_n.to(tl.int64) * stride_sn + wj // GROUP_W).to(tl.float32)
                acc += step * sc[:, None]
            else:
                acc = step
        w_ptrs += BLOCK_W
        x_base += BLOCK_W * 16
    pdl_launch_dependents(PDL)

    if I8MMA:
        if not GROUPED:
            acc = acc_i.to(tl.float32)
    if XQ:
        xs = tl.load(xs_ptr + rows_m).to(tl.float32)
        acc = acc * xs[None, :]
    if not GROUPED:
        acc = acc * tl.load(s_ptr).to(tl.float32)
    store_tile(tl.trans(acc), out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid_k, split_k,
               SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _quant_act_kernel(x_ptr, xq_ptr, xs_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """Per-token absmax int8 quantization of one row: ``x_q = clamp(round(x * (127 / a)))``,
    ``x_scale = a / 127`` with ``a = max(max|x|, 1e-5)`` (round half to even, as torch;
    both divisions correctly rounded, so the result is bit-identical to the reference)."""
    m = tl.program_id(0)
    row = x_ptr + m.to(tl.int64) * stride_xm
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    a = tl.maximum(tl.max(amax, axis=0), 1e-5)
    inv = tl.math.div_rn(127.0, a)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        # round half to even: 1.5 * 2^23 forces rounding at the units digit (|v * inv| <= 128)
        q = (v * inv + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(xq_ptr + m.to(tl.int64) * K + k0 + offs, q.to(tl.int8), mask=k0 + offs < K)
    tl.store(xs_ptr + m, tl.math.div_rn(a, 127.0))


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


_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, K: int, cfg: TernaryConfig, word: bool, group_size: int | None, x_dtype: torch.dtype,
          has_xs: bool) -> _Plan:
    """Grid and compile-time arguments of one launch (cached: the Python launch path is on
    the critical path of eager decode)."""
    grouped = group_size is not None
    if cfg.path == "fma":
        wpb = 16 if word else 4
        ku = K // 16 if word else cdiv(K, 4)
        bu = max(1, min(cfg.block_u, next_pow2(ku)))
        steps = cdiv(ku, bu)
        split = max(1, min(cfg.split_k, steps))
        per_split = cdiv(steps, split) * bu
        split = cdiv(ku, per_split)
        bn = max(1, min(cfg.block_n, next_pow2(N)))
        meta = dict(WPB=wpb, GROUPED=grouped, GROUP_U=(group_size // wpb) if grouped else 1, HAS_XS=has_xs,
                    EVEN=(ku * wpb == K and ku % per_split == 0), SPLIT=split > 1, PREFETCH=cfg.prefetch,
                    PDL=cfg.pdl, BLOCK_N=bn, BLOCK_U=bu,
                    num_warps=max(1, min(cfg.num_warps, bu // 32)), num_stages=cfg.num_stages)
        grid = (cdiv(N, bn), split, M)
        return _Plan(grid, per_split, split, per_split // bu, split * M * grid[0] * bn, M * grid[0], meta)
    # dot
    if not word:
        raise ValueError("the ternary dot path needs K % 16 == 0 (packed rows read as int32 words)")
    kw = K // 16
    bw = cfg.block_u
    xq = x_dtype == torch.int8
    if grouped and (group_size % 16 or (group_size // 16) % bw):
        raise ValueError(f"ternary dot path: a step of {16 * bw} weights does not divide group size {group_size}")
    if (4 if xq and cfg.i8mma else 2 * cfg.ppd) * bw < (32 if xq and cfg.i8mma else 16):
        raise ValueError(f"ternary dot path: block_u {bw} (ppd {cfg.ppd}) gives a dot K below the minimum")
    steps = cdiv(kw, bw)
    split = max(1, min(cfg.split_k, steps))
    per_split = cdiv(steps, split) * bw
    split = cdiv(kw, per_split)
    bn = max(16, min(cfg.block_n, next_pow2(N)))
    bm = max(16, cfg.block_m)
    i8mma = xq and cfg.i8mma
    magic, mval = _MAGIC.get(torch.float16 if xq else x_dtype, (0, 0.0))
    meta = dict(XQ=xq, I8MMA=i8mma, MAGIC=magic, MVAL=mval, PPD=1 if i8mma else cfg.ppd, GROUPED=grouped,
                GROUP_W=(group_size // 16) if grouped else 1, EVEN=kw % per_split == 0, SPLIT=split > 1,
                PDL=cfg.pdl, BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid = (cdiv(N, bn), split, cdiv(M, bm))
    return _Plan(grid, per_split, split, per_split // bw, split * grid[2] * grid[0] * bm * bn,
                 grid[2] * grid[0], meta)


def _as_words(packed: torch.Tensor) -> torch.Tensor | None:
    """The packed matrix as int32 words (16 weights each), or None if its rows are not
    4-byte aligned."""
    if packed.stride(1) != 1 or packed.shape[1] % 4 or packed.stride(0) % 4 or packed.storage_offset() % 4:
        return None
    return packed.view(torch.int32)


def ternary_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int | None = None,
    out: torch.Tensor | None = None,
    *,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: TernaryConfig | None = None,
    workspace: GemvWorkspace | None = None,
    compile_only: bool = False,
) -> torch.Tensor:
    """``out = x @ (Q * s)^T`` (times ``x_scale`` per row for int8 ``x``) with the Triton kernels.

    Args:
        x: ``[M, K]`` bf16/fp16/fp32, or int8 (quantized activations) with ``x_scale``.
        packed: uint8 ``[N, ceil(K/4)]``, layout v1.
        scale: per tensor (one element) or ``[N, K // group_size]``.
        x_scale: ``[M]`` float32 multipliers of int8 ``x``.
        out: optional ``[M, N]`` output (contiguous rows), dtype `out_dtype` (default
            ``x.dtype``; float32 for int8 ``x``).
        config: launch configuration (:func:`pick_ternary_config` if None).
        workspace: split-K workspace (a cached per-device one if None).
        compile_only: compile the kernel these arguments need without launching it.

    Inputs are assumed validated (the public ``ternary_matmul*`` functions do that).
    """
    M, K = x.shape
    N = packed.shape[0]
    xq = x.dtype == torch.int8
    if out is None:
        od = out_dtype or (torch.float32 if xq else x.dtype)
        out = torch.empty((M, N), dtype=od, device=x.device)
    if M == 0 or N == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    words = _as_words(packed) if ternary_word_path(K, group_size) else None
    if config is None:
        xk = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "int8"}[x.dtype]
        config = pick_ternary_config(M, N, K, group_size, xk, xq, device_sms(x))
    if config.path == "dot" and (words is None or (x.dtype not in _MAGIC and not xq)):
        config = TernaryConfig("fma", 16, 128, 1, prefetch=True)
    if config.path == "fma" and x_scale is not None and not xq:
        raise ValueError("x_scale goes with int8 activations")
    word = words is not None if config.path == "fma" else True
    w = words if word else packed
    plan = _plan(M, N, K, config, word, group_size, x.dtype, x_scale is not None)
    if group_size is None:
        s = scale.reshape(-1)
        stride_sn = 0
    else:
        s = scale if scale.stride(-1) == 1 else scale.contiguous()
        stride_sn = s.stride(0)
    xs = x_scale if x_scale is not None else s
    if plan.split > 1:
        ws = workspace if workspace is not None else workspace_for(x.device)
        ws.ensure(plan.ws_elems, plan.counters)
        ws_buf, cnt_buf = ws.partials, ws.counters
    else:
        ws_buf = cnt_buf = out
    kernel = _ternary_fma_kernel if config.path == "fma" else _ternary_dot_kernel
    ku = (K // 16 if word else packed.shape[1])
    args = (x, w, s, xs, out, ws_buf, cnt_buf, M, N, K, ku,
            x.stride(0), w.stride(0), stride_sn, out.stride(0),
            plan.per_split, plan.split, plan.n_iter)
    extra = dict(launch_pdl=True) if config.pdl else {}
    if compile_only:
        kernel.warmup(*args, grid=plan.grid, **plan.meta, **extra)
    else:
        kernel[plan.grid](*args, **plan.meta, **extra)
    return out


def quantize_act_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization of ``x [M, K]`` on the GPU: ``(x_q, x_scale)``."""
    M, K = x.shape
    xq = torch.empty((M, K), dtype=torch.int8, device=x.device)
    xs = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return xq, xs
    if x.stride(1) != 1:
        x = x.contiguous()
    bk = max(16, min(2048, next_pow2(K)))
    _quant_act_kernel[(M,)](x, xq, xs, K, x.stride(0), BLOCK_K=bk, num_warps=4, enable_fp_fusion=False)
    return xq, xs
