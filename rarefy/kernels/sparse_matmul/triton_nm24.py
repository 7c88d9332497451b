"""2:4 sparse GEMV / small GEMM in Triton: values streamed once, x picked by a byte permute.

A 2:4 matrix keeps 2 of every 4 weights. ``NMSparse`` stores them as a bitmask (exactly two
bits per 4-column group) and the kept values, 2 per group. This kernel reads the same bytes
(1 B of values + 1/8 B of metadata per column in bf16/fp16, 1.78x fewer than dense), but
decodes them without prefix sums or gathers:

* the metadata is re-encoded once per weight (cached) as a 4-bit code per group,
  ``i0 | i1 << 2``: the columns of the group's two kept weights, 8 codes per int32 word;
* the group's four activations are two 32-bit registers (x0|x1, x2|x3). One ``prmt``
  (byte permute; PTX inline assembly) with selector ``0x1010 + 0x22 * i0 + 0x2200 * i1``
  picks ``x[i0] | x[i1]``, matching the value pair ``v0 | v1`` stored for the group;
* both halves are widened to fp32 by a shift / mask (bf16) or a cvt (fp16) and
  multiply-added in fp32.

About 13 instructions per group of 4 columns at batch 1. Program ``(n, s)`` owns rows
``[n * BLOCK_N, ...)`` and the K range of split ``s``; it walks ``BLOCK_W`` words
(``8 * BLOCK_W`` groups) per step. With ``split_k > 1`` the partial sums go to an fp32
workspace that a second small kernel adds up in a fixed order (deterministic). All batch
rows (``M <= MAX_M``) go through one pass over the weights, each decoded selector reused
for every row of x.

The interpreter has no inline assembly: it runs the same selection with plain integer
operations (``_pick_pair``), so CPU tests check the arithmetic and the layout.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Nm24Config", "nm24_codes", "nm24_matmul_triton", "default_nm24_config", "MAX_M"]

#: Largest batch the kernels take (more rows: the bitmap kernel / dense path).
MAX_M = 32


@dataclass(frozen=True)
class Nm24Config:
    block_n: int = 4       # rows per program
    block_w: int = 16      # int32 code words (8 groups = 32 columns each) per step
    split_k: int = 1
    num_warps: int = 4
    dot: bool = False      # tensor-core path (batches): the 2:4 tile expanded to dense in registers
    num_stages: int = 1

    def short(self) -> str:
        s = f"nm24 n{self.block_n} w{self.block_w} s{self.split_k} w{self.num_warps}"
        return s + (f" dot st{self.num_stages}" if self.dot else "")


def default_nm24_config(n: int, kw: int, num_sms: int = 132) -> Nm24Config:
    """Fitted to the H100 sweep of benchmarks/gpu_nm24.py (2026-11-23, batch-1 kernel, Llama-3-8B
    shapes): 2 rows and 32 code words (1024 columns) per step, a split of 2 on long rows
    (K >= 8192) or when the grid would leave SMs idle. Best found: n2 w32 s1 on 4096x4096
    (9.4 µs), 1024x4096 (4.5), 14336x4096 (25.5); n2 w32 s2 on 4096x14336 (28.0)."""
    block_n = 2
    tiles = -(-n // block_n)
    block_w = min(32, max(1, 1 << (max(1, kw).bit_length() - 1)))
    steps = -(-kw // block_w)
    split = 2 if (kw * 32 >= 8192 or tiles < num_sms) and steps >= 2 else 1
    return Nm24Config(block_n, block_w, split, 4)


def default_nm24_dot_config(n: int, kw: int, num_sms: int = 132) -> Nm24Config:
    """Batches: 64 weight rows x 128 columns a step on the tensor cores, split-K until the grid
    has about two programs per SM."""
    block_n = 64
    block_w = min(4, max(1, 1 << (max(1, kw).bit_length() - 1)))
    tiles = -(-n // block_n)
    steps = -(-kw // block_w)
    split = 1
    while tiles * split < 2 * num_sms and steps >= 4 * split and split < 16:
        split *= 2
    return Nm24Config(block_n, block_w, split, 4, dot=True, num_stages=2)


#: id(bitmask) -> (weak reference to it, codes); the entry goes when the bitmask does
#: (tensors compare elementwise, so a WeakKeyDictionary cannot key on them).
_CODES: dict = {}


def nm24_codes(bitmask: torch.Tensor) -> torch.Tensor:
    """int32 [N, Kw]: per 4-column group the code ``i0 | i1 << 2`` (its two kept columns,
    i0 < i1), 8 groups per word, group j of word w in bits 4j..4j+3. Cached per bitmask."""
    key = id(bitmask)
    hit = _CODES.get(key)
    if hit is not None and hit[0]() is bitmask:
        return hit[1]
    b = bitmask.to(torch.int64) & 0xFFFFFFFF
    nib = (b[..., None] >> (4 * torch.arange(8, device=b.device))) & 0xF  # [N, Kw, 8]
    bits = (nib[..., None] >> torch.arange(4, device=b.device)) & 1       # [N, Kw, 8, 4]
    if bool((bits.sum(-1) != 2).any()):
        raise ValueError("not a 2:4 bitmask: every 4-column group must keep exactly two columns")
    i0 = bits.argmax(-1)                                    # first set bit
    i1 = 3 - bits.flip(-1).argmax(-1)                       # last set bit
    code = (i0 | (i1 << 2)) << (4 * torch.arange(8, device=b.device))
    words = code.sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    _CODES[key] = (weakref.ref(bitmask, lambda _r, k=key: _CODES.pop(k, None)), words)
    return words


@triton.jit
def _prmt(a, b, sel):
    return tl.inline_asm_elementwise(
        asm="prmt.b32 $0, $1, $2, $3;", constraints="=r,r,r,r", args=[a, b, sel],
        dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _selector(code, ASM: tl.constexpr):
    """What _pick applies for a group code: the prmt selector (compiled) or the code itself."""
    if ASM:
        return 0x1010 + 0x22 * (code & 3) + 0x2200 * ((code >> 2) & 3)
    else:
        return code


@triton.jit
def _pick(x01, x23, sel, ASM: tl.constexpr):
    """The 16-bit halves x[i0] | x[i1] << 16 of a group's four activations."""
    if ASM:
        return _prmt(x01, x23, sel)
    else:
        i0 = sel & 3
        i1 = (sel >> 2) & 3
        lo = tl.where(i0 == 0, x01 & 0xFFFF, tl.where(i0 == 1, (x01 >> 16) & 0xFFFF,
                      tl.where(i0 == 2, x23 & 0xFFFF, (x23 >> 16) & 0xFFFF)))
        hi = tl.where(i1 == 0, x01 & 0xFFFF, tl.where(i1 == 1, (x01 >> 16) & 0xFFFF,
                      tl.where(i1 == 2, x23 & 0xFFFF, (x23 >> 16) & 0xFFFF)))
        return lo | (hi << 16)


@triton.jit
def _halves_f32(p, BF16: tl.constexpr):
    """The two 16-bit floats packed in int32 p as fp32 (low, high)."""
    if BF16:
        return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((p >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi


@triton.jit
def _program_rows(N, BLOCK_N: tl.constexpr):
    """Grid (row blocks, K splits): this program's split, its weight rows, their mask, as int64."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(1), rows, rows < N, rows.to(tl.int64)


@triton.jit
def _nm24_gemv_kernel(x_ptr, code_ptr, val_ptr, out_ptr, ws_ptr, N, KW, words_per_split,
                      BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr, BF16: tl.constexpr,
                      ASM: tl.constexpr):
    """Batch 1. Tensors are [BLOCK_N, BLOCK_W, 8] (rows, code words, groups of a word); x is
    loaded as one 64-bit word per group into that same shape (row stride 0), so only the code
    words change layout in the loop (sm_90 SASS: 2 barriers a step instead of 6)."""
    pid_s, rows, r_ok, rows64 = _program_rows(N, BLOCK_N)
    ow = tl.arange(0, BLOCK_W)
    oj = tl.arange(0, 8)
    shifts = (4 * oj)[None, None, :]
    zero_r = (rows64 * 0)[:, None, None]
    x64 = x_ptr.to(tl.pointer_type(tl.int64))
    w0 = pid_s * words_per_split
    w_end = tl.minimum(w0 + words_per_split, KW)
    acc = tl.zeros([BLOCK_N, BLOCK_W, 8], tl.float32)
    for w in range(w0, w_end, BLOCK_W):
        ws = w + ow
        m2 = r_ok[:, None] & (ws < w_end)[None, :]
        words = tl.load(code_ptr + rows64[:, None] * KW + ws[None, :], mask=m2, other=0)
        sel = _selector((words[:, :, None] >> shifts) & 0xF, ASM)
        g = (ws[:, None] * 8 + oj[None, :])[None, :, :]
        m3 = m2[:, :, None] & (oj < 8)[None, None, :]
        vals = tl.load(val_ptr + rows64[:, None, None] * (KW * 8) + g, mask=m3, other=0)
        xg = tl.load(x64 + zero_r + g, mask=m3, other=0)
        x01 = xg.to(tl.int32)
        x23 = (xg >> 32).to(tl.int32)
        v0, v1 = _halves_f32(vals, BF16)
        a0, a1 = _halves_f32(_pick(x01, x23, sel, ASM), BF16)
        acc += v0 * a0 + v1 * a1
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if SPLIT:
        tl.store(ws_ptr + pid_s * N + rows, out, mask=r_ok)
    else:
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def _nm24_kernel(x_ptr, code_ptr, val_ptr, out_ptr, ws_ptr, M, N, KW, words_per_split, stride_xm, stride_om,
                 M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr,
                 BF16: tl.constexpr, ASM: tl.constexpr):
    """Batches up to 8 by FMA: tensors are [M_PAD, BLOCK_N, BLOCK_G] (groups flattened), each
    decoded selector used for every x row. Slower than dense at batch 8 on the H100 (Triton
    still converts the x and code layouts through shared memory here)."""
    BLOCK_G: tl.constexpr = 8 * BLOCK_W
    pid_s, rows, r_ok, rows64 = _program_rows(N, BLOCK_N)
    rows64 = rows64[None, :, None]
    offs_m = tl.arange(0, M_PAD)[:, None, None]
    offs_g = tl.arange(0, BLOCK_G)[None, None, :]
    shifts = 4 * (offs_g % 8)
    g0 = pid_s * words_per_split * 8
    g_end = tl.minimum(g0 + words_per_split * 8, KW * 8)
    acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_G], tl.float32)
    wmask_r = r_ok[None, :, None]
    x_row = x_ptr + offs_m * stride_xm
    m_ok = offs_m < M
    for gs in range(g0, g_end, BLOCK_G):
        g = gs + offs_g                                                   # [1, 1, BG]
        g_ok = g < g_end
        wm = wmask_r & g_ok
        words = tl.load(code_ptr + rows64 * KW + g // 8, mask=wm, other=0)   # [1, BN, BG] (8 lanes share a word)
        sel = _selector((words >> shifts) & 0xF, ASM)
        vals = tl.load(val_ptr + rows64 * (KW * 8) + g, mask=wm, other=0)
        v0, v1 = _halves_f32(vals, BF16)
        xm = m_ok & g_ok
        x01 = tl.load(x_row + 2 * g, mask=xm, other=0)                     # [M, 1, BG]
        x23 = tl.load(x_row + 2 * g + 1, mask=xm, other=0)
        a0, a1 = _halves_f32(_pick(x01, x23, sel, ASM), BF16)
        acc += v0 * a0 + v1 * a1
    out = tl.sum(acc, axis=2)                                             # [M, BN]
    om = tl.arange(0, M_PAD)[:, None]
    o_mask = (om < M) & r_ok[None, :]
    if SPLIT:
        tl.store(ws_ptr + (pid_s * M + om) * N + rows[None, :], out, mask=o_mask)
    else:
        tl.store(out_ptr + om * stride_om + rows[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _nm24_dot_kernel(x_ptr, code_ptr, val_ptr, out_ptr, ws_ptr, M, N, KW, words_per_split, stride_xm, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT: tl.constexpr,
                     BF16: tl.constexpr):
    """Batches: each step expands a [BLOCK_N, 32 * BLOCK_W] 2:4 tile to dense 16-bit values in
    registers (two selects per column) and multiplies it with the x tile on the tensor cores."""
    BLOCK_G: tl.constexpr = 8 * BLOCK_W
    pid_s, rows, r_ok, rows64 = _program_rows(N, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, 4)
    offs_k = tl.arange(0, 4 * BLOCK_G)
    g0 = pid_s * words_per_split * 8
    g_end = tl.minimum(g0 + words_per_split * 8, KW * 8)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for gs in range(g0, g_end, BLOCK_G):
        g = gs + offs_g
        g_ok = g < g_end
        wm = r_ok[:, None] & g_ok[None, :]
        words = tl.load(code_ptr + rows64[:, None] * KW + (g // 8)[None, :], mask=wm, other=0)
        code = (words >> (4 * (g % 8))[None, :]) & 0xF
        vals = tl.load(val_ptr + rows64[:, None] * (KW * 8) + g[None, :], mask=wm, other=0)
        i0 = (code & 3)[:, :, None]
        i1 = ((code >> 2) & 3)[:, :, None]
        c = offs_c[None, None, :]
        bits = tl.where(c == i0, (vals & 0xFFFF)[:, :, None], tl.where(c == i1, ((vals >> 16) & 0xFFFF)[:, :, None], 0))
        if BF16:
            w = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            w = bits.to(tl.int16).to(tl.float16, bitcast=True)
        w = tl.reshape(w, [BLOCK_N, 4 * BLOCK_G])
        k = gs * 4 + offs_k
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                     mask=(offs_m[:, None] < M) & (k[None, :] < g_end * 4), other=0.0)
        acc = tl.dot(xk, tl.trans(w), acc)
    o_mask = (offs_m[:, None] < M) & r_ok[None, :]
    if SPLIT:
        tl.store(ws_ptr + (pid_s * M + offs_m[:, None]) * N + rows[None, :], acc, mask=o_mask)
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _split_sum_kernel(ws_ptr, out_ptr, bias_ptr, M, N, stride_om, SPLITS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLITS):  # fixed order: deterministic
        acc += tl.load(ws_ptr + (s * M + m) * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def nm24_matmul_triton(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, n: int,
                       bias: torch.Tensor | None = None, config: Nm24Config | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a 2:4 NMSparse W (bitmask int32 [N, Kw], values [N, Kw*16]).
    x: [M, K] with M <= MAX_M, x.dtype == values.dtype in (bf16, fp16). Returns [M, N]."""
    M, K = x.shape
    kw = bitmask.shape[1]
    if M > MAX_M or M < 1:
        raise ValueError(f"nm24 kernel takes 1..{MAX_M} rows, got {M}")
    if values.dtype not in (torch.bfloat16, torch.float16) or x.dtype != values.dtype:
        raise ValueError("nm24 kernel needs bf16 or fp16 values and x of the same dtype")
    codes = nm24_codes(bitmask)
    xp = x if K == kw * 32 else torch.nn.functional.pad(x, (0, kw * 32 - K))  # padded groups hold zeros
    xp = xp.contiguous()
    if xp.data_ptr() % 16:  # the batch-1 kernel reads x as 64-bit words (a view may start mid-word)
        xp = xp.clone()
    x32 = xp.view(torch.int32)  # [M, Kw*16]: x0|x1, x2|x3 per group
    v32 = values.contiguous().view(torch.int32)  # [N, Kw*8]: v0|v1 per group
    sms = _sm_count(x.device)
    # batches up to 8 stay on the FMA kernel (H100, M = 8: 35.7 µs against 46 µs for the best
    # tensor-core configuration at 4096x4096; both slower than dense there)
    cfg = config or (default_nm24_config(n, kw, sms) if M <= 8 else default_nm24_dot_config(n, kw, sms))
    out = torch.empty((M, n), dtype=x.dtype, device=x.device)
    wps = -(-kw // cfg.split_k)
    wps = -(-wps // cfg.block_w) * cfg.block_w
    splits = -(-kw // wps)
    ws = torch.empty((splits * M, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    grid = (triton.cdiv(n, cfg.block_n), splits)
    if cfg.dot:
        _nm24_dot_kernel[grid](xp.contiguous(), codes, v32, out, ws, M, n, kw, wps, xp.stride(0), out.stride(0),
                               BLOCK_M=16 if M <= 16 else 32, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w,
                               SPLIT=splits > 1, BF16=x.dtype == torch.bfloat16, num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages)
    elif M == 1:
        _nm24_gemv_kernel[grid](x32, codes, v32, out, ws, n, kw, wps, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w,
                                SPLIT=splits > 1, BF16=x.dtype == torch.bfloat16, ASM=not _interpreting(),
                                num_warps=cfg.num_warps)
    else:
        _nm24_kernel[grid](x32, codes, v32, out, ws, M, n, kw, wps, x32.stride(0), out.stride(0),
                           M_PAD=triton.next_power_of_2(M), BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w,
                           SPLIT=splits > 1, BF16=x.dtype == torch.bfloat16, ASM=not _interpreting(),
                           num_warps=cfg.num_warps)
    if splits > 1:
        _split_sum_kernel[(triton.cdiv(n, 256), M)](ws, out, bias if bias is not None else out, M, n, out.stride(0),
                                                    SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=256,
                                                    num_warps=4)
    elif bias is not None:
        out += bias.to(out.dtype)
    return out


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]
