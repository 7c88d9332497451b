"""Triton flash-decoding over the paged KV cache (layout: docs/kv-cache.md).

``paged_decode_attention_triton`` launches exactly what :func:`plan_decode` returns:

* ``_decode_kernel``, grid ``(batch, num_kv_heads, num_splits)``. Program ``(b, h, s)``
  streams its token range of sequence ``b`` ``TILE_N`` tokens per iteration; each token's
  page comes from the block table (``block_tables[b, tok // BLOCK_SIZE]``), so one tile
  spans ``TILE_N / BLOCK_SIZE`` pages and every row of a tile is one contiguous
  ``head_dim`` vector (16-byte loads along D). The K and V tiles are loaded once for all
  ``GROUP`` query heads of KV head ``h`` (GQA). Scores and the output accumulator are fp32
  with an online softmax in base 2 (``qk_scale = sm_scale * log2(e)``).

  Two inner-product variants (``USE_DOT``):

  - tensor cores: the group is padded to ``GROUP_PAD >= 16`` query rows and both products
    are ``tl.dot`` (``q @ K^T`` and ``P @ V``); K/V are converted to the dot dtype in
    registers after the (pipelined) load. int8 / fp8 values convert to bf16/fp16 exactly,
    so the per-token scale is applied to the score column (``s * k_scale``) and to the
    probability column before ``P @ V`` (``p * v_scale``): exactly ``q . (k * scale)``
    and ``sum p * (v * scale)`` up to fp32 summation order. The dot dtype is the cache's
    for bf16/fp16 caches, the query's for int8/fp8 caches, and fp32 with
    ``input_precision="ieee"`` for a float32 query or an fp32 cache.
  - broadcast FMA (``GROUP_PAD = next_pow2(GROUP)``, plain multiply-adds in fp32): for
    MHA (group 1) where a 16-row dot would waste 15/16 of its work on padding.

  One split writes ``out`` directly; several write a normalised partial output and its
  log-sum-exp (base 2) to fp32 workspaces. A split with no tokens (short sequence)
  writes LSE = -inf; a sequence of length 0 produces zeros. With ``fused_reduce`` (the
  default) each program then bumps the arrival counter of its (sequence, KV head) (an
  acq_rel atomic after a barrier, the pattern of rarefy.kernels.gemv's split-K) and the
  last to arrive combines the splits of the group's heads (``_combine``, reading the
  partials with ``.cg`` loads) and resets the counter to zero.
* ``_reduce_kernel``, grid ``(batch, num_heads)`` (``fused_reduce=False``): combines the
  partials of each head weighted by ``exp2(lse_s - max lse)``.

The arrival counters are one int32 per (sequence, KV head), zero between launches, cached
per device (64K of them up front, grown outside graph capture; a launch that would need more
while a graph is being captured falls back to the two-kernel reduction). Launches running
concurrently on different streams of one device must not share them: pass ``counters=``.

No host synchronisation and no data-dependent allocation: CUDA-graph capturable. The split
count and tokens per split are runtime arguments, so a changing context length never
recompiles (only the head/tile shape, dtypes and split-or-not are compile-time).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from rarefy.kernels.paged_attention.plan import DecodePlan, plan_decode
from rarefy.kernels.paged_attention.triton_splits import (  # noqa: F401 (re-exported for the swap kernel)
    _begin_split, _interpreting, _pdl_prologue, _write_result, launch_buffers, launch_reduce, pdl_available,
    pdl_options, prefetch_constants)

LOG2E = 1.4426950408889634

#: DOT codes for the constexpr DOT argument.
_DOT_F32, _DOT_BF16, _DOT_F16 = 0, 1, 2

# --------------------------------------------------------------------------
# int8 / fp8 -> fp16 in registers (CONV codes: module doc)
# --------------------------------------------------------------------------
#
# Triton's own int8 -> fp16 conversion is one I2F per value, which runs at a quarter of the
# FMA rate on sm_90 and made the quantized kernels conversion-bound (docs/results/attention.md).
# These convert four packed bytes with a handful of integer ops:
#
# * int8: x ^ 0x80 is x + 128 as an unsigned byte u; fp16 bits 0x6400 | u are 1024 + u
#   exactly, and 1024 + u - 1152 = x. Two byte permutes and two packed fp16 subtractions.
# * fp8 e4m3 (bits s eeee mmm): placed in the high byte of a 16-bit lane and shifted right by
#   one under the sign, it is the fp16 number with exponent field 0eeee and mantissa mmm0000000,
#   i.e. the e4m3 value times 2^(7 - 15) = 2^-8 (subnormals included); the kernel multiplies
#   the 2^8 back into the scores and the output (KV_MUL). e4m3 NaN (never stored) is not kept.
# fp8 e5m2 needs nothing: it is the high byte of an fp16, and Triton's own conversion is a byte
# permute.


@triton.jit
def _i8x4_to_f16(x):
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, a, b, c, m;
        xor.b32 t, $2, 0x80808080;
        mov.b32 c, 0x64646464;
        prmt.b32 a, t, c, 0x4140;
        prmt.b32 b, t, c, 0x4342;
        mov.b32 m, 0x64806480;
        sub.f16x2 $0, a, m;
        sub.f16x2 $1, b, m;
        }""",
        constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _i8_to_f16_plus1152(x, ASM: tl.constexpr, OFFSET: tl.constexpr = False):
    """int8 x as the fp16 number x + 1152 (exact): the int8 bit trick without its subtraction,
    which the caller takes back out of a product instead (``convert="bias"``). ``OFFSET``: the
    bytes hold x in offset binary (x + 128, the sign bit flipped), so not even the XOR is
    needed. ASM: the packed inline-PTX form (the interpreter has no inline assembly)."""
    if ASM:
        if OFFSET:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 c;
                mov.b32 c, 0x64646464;
                prmt.b32 $0, $2, c, 0x4140;
                prmt.b32 $1, $2, c, 0x4342;
                }""",
                constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, c;
            xor.b32 t, $2, 0x80808080;
            mov.b32 c, 0x64646464;
            prmt.b32 $0, t, c, 0x4140;
            prmt.b32 $1, t, c, 0x4342;
            }""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
    if OFFSET:
        return (x.to(tl.uint8, bitcast=True).to(tl.float32) + 1024.0).to(tl.float16)
    return (x.to(tl.float32) + 1152.0).to(tl.float16)


@triton.jit
def _e4m3x4_to_f16_div256(x):
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 a, b, z, s;
        mov.b32 z, 0;
        prmt.b32 a, $2, z, 0x1404;
        prmt.b32 b, $2, z, 0x3424;
        shr.b32 s, a, 1;
        and.b32 s, s, 0x3F803F80;
        and.b32 a, a, 0x80008000;
        or.b32 $0, s, a;
        shr.b32 s, b, 1;
        and.b32 s, s, 0x3F803F80;
        and.b32 b, b, 0x80008000;
        or.b32 $1, s, b;
        }""",
        constraints="=r,=r,r", args=[x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _to_dot(x, DOT: tl.constexpr, CONV: tl.constexpr):
    """A loaded K/V tile as the dot dtype. CONV: 0 plain .to(); 1 int8 bit trick (fp16);
    2 e4m3 bit trick (fp16, value / 256); 3 the same value / 256 by plain conversions (the
    interpreter has no inline assembly)."""
    if CONV == 1:
        return _i8x4_to_f16(x)
    elif CONV == 2:
        return _e4m3x4_to_f16_div256(x)
    elif CONV == 3:
        return (x.to(tl.float32) * 0.00390625).to(tl.float16)
    elif DOT == 1:
        return x.to(tl.bfloat16)
    elif DOT == 2:
        return x.to(tl.float16)
    else:
        return x.to(tl.float32)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, sl_ptr, out_ptr, po_ptr, plse_ptr, cnt_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_sb, stride_sh,
    stride_btb,
    stride_ob, stride_oh,
    tokens_per_split, num_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    SPLIT: tl.constexpr,
    FUSED: tl.constexpr,
    QUANT: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT: tl.constexpr,
    CHUNK: tl.constexpr,
    CONV: tl.constexpr,
    QK_I8: tl.constexpr,
    KV_MUL: tl.constexpr,
    PDL_WAIT: tl.constexpr = False,
    PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,
    PAGE_LINES: tl.constexpr = 1,
    LINE_ELEMS: tl.constexpr = 1,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    start, end = _begin_split(sl_ptr, bt_ptr, k_ptr, v_ptr, b, kvh, sp, tokens_per_split, num_splits, stride_btb,
                              stride_kb, stride_kh, stride_vb, stride_vh, BLOCK_SIZE, PDL_WAIT, PDL, PREFETCH,
                              PAGE_LINES, LINE_ELEMS)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, TILE_N)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g

    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0)
    if USE_DOT and DOT == 1:
        q = q.to(tl.bfloat16)
    elif USE_DOT and DOT == 2:
        q = q.to(tl.float16)
    else:  # the FMA path multiplies in fp32 whatever the dot dtype would be
        q = q.to(tl.float32)
    if QK_I8:  # per-head symmetric int8 query: scores = (q_i8 . k_i8) * q_sc * k_scale
        qf = q.to(tl.float32)
        q_amax = tl.max(tl.abs(qf), axis=1)
        q_sc = tl.where(q_amax > 0.0, q_amax / 127.0, 1.0)
        q_i8 = tl.floor(qf / q_sc[:, None] + 0.5).to(tl.int8)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    head_off = kvh.to(tl.int64) * stride_kh
    v_head_off = kvh.to(tl.int64) * stride_vh
    scale_head_off = kvh.to(tl.int64) * stride_sh

    for t0 in range(start, end, TILE_N):
        tok = t0 + offs_t
        t_mask = tok < end
        blk = tl.load(bt_row + tok // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        off = (tok % BLOCK_SIZE).to(tl.int64)
        row = blk * stride_kb + head_off + off * stride_kt  # [TILE_N] element offsets of the K/V rows
        kv_offs = row[:, None] + offs_d[None, :]

        k = tl.load(k_ptr + kv_offs, mask=t_mask[:, None], other=0.0)
        if QK_I8:  # int8 x int8 -> int32 on the tensor cores: K is never converted
            s = tl.dot(q_i8, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * q_sc[:, None]
        elif USE_DOT:
            kd = _to_dot(k, DOT, CONV)
            if DOT == 0:
                s = tl.dot(q, tl.trans(kd), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kd))
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = s * qk_scale
        if QUANT:
            srow = blk * stride_sb + scale_head_off + off
            k_s = tl.load(ks_ptr + srow, mask=t_mask, other=0.0).to(tl.float32)
            s = s * k_s[None, :]
        s = tl.where(t_mask[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_offs = (blk * stride_vb + v_head_off + off * stride_vt)[:, None] + offs_d[None, :] * stride_vd
        v = tl.load(v_ptr + v_offs, mask=t_mask[:, None], other=0.0)
        acc = acc * alpha[:, None]
        if QUANT and USE_DOT and DOT == 2:
            # fp16 P would underflow if it carried the per-token scales (p * 1e-4 * 1e-4), so
            # the scales are normalised by the tile's largest and that factor multiplies the
            # tile's fp32 product instead.
            v_s = tl.load(vs_ptr + srow, mask=t_mask, other=0.0).to(tl.float32)
            v_top = tl.maximum(tl.max(v_s, axis=0), 1e-30)
            pv = tl.dot((p * (v_s / v_top)[None, :]).to(tl.float16), _to_dot(v, DOT, CONV))
            acc += pv * (v_top * KV_MUL)
        else:
            if QUANT:
                v_s = tl.load(vs_ptr + srow, mask=t_mask, other=0.0).to(tl.float32)
                p = p * v_s[None, :]
            if USE_DOT:
                if DOT == 1:
                    acc = tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16), acc)
                elif DOT == 2:
                    acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc)
                else:
                    acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new

    _write_result(acc, m_i, l_i, b, kvh, sp, heads, g_mask, offs_d, out_ptr, po_ptr, plse_ptr, cnt_ptr,
                  stride_ob, stride_oh, num_splits, GROUP, HEAD_DIM, SPLIT, FUSED, CHUNK)


# --------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------

_QUANT = ("int8", "fp8_e4m3", "fp8_e5m2")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count_of(device: torch.device) -> int:
    """SMs of a CUDA device (132 when not on a GPU: the interpreter, planning on a CPU)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def dot_code(q_dtype: torch.dtype, kv_dtype: str) -> int:
    """The default plan's dot dtype as the kernel's DOT code: fp32 for a float32 query or cache,
    bf16 for a bf16 cache, fp16 for fp16 and quantized caches (plan.py, "Quantized caches")."""
    if q_dtype == torch.float32 or kv_dtype == "fp32":
        return _DOT_F32
    return _DOT_BF16 if kv_dtype == "bf16" else _DOT_F16


def conv_code(plan: DecodePlan, kv_dtype: str) -> int:
    """The kernel's CONV code for a plan: the bit tricks need inline PTX, so the interpreter
    runs the plain conversion for int8 (exact either way) and the same value / 256 for e4m3."""
    if plan.convert in ("bias_k", "bias", "bias_u8"):  # V through the bit trick unless biased too
        return 0 if _interpreting() else 1
    if plan.convert != "bits":
        return 0
    if kv_dtype == "int8":
        return 0 if _interpreting() else 1
    return 3 if _interpreting() else 2


def v_is_dim_major(v_cache: torch.Tensor) -> bool:
    """Whether a [blocks, heads, block_size, head_dim] V cache is a view of dim-major storage
    ([blocks, heads, head_dim, block_size], docs/kv-cache.md): tokens contiguous."""
    return v_cache.dim() == 4 and v_cache.shape[2] > 1 and v_cache.stride(2) == 1 and \
        v_cache.transpose(2, 3).is_contiguous()


def make_plan(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor, kv_dtype: str,
              num_splits: int | None = None, max_seq_len: int | None = None, v_dim_major: bool = False,
              **overrides) -> DecodePlan:
    """plan_decode for these tensors (``max_seq_len`` defaults to the block table's capacity)."""
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    q_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[q.dtype]
    return plan_decode(batch, max_seq_len, num_heads, num_kv_heads, head_dim, kv_dtype, block_size,
                       sm_count_of(q.device), num_splits=num_splits, q_dtype=q_dtype, v_dim_major=v_dim_major,
                       **overrides)


def paged_decode_attention_triton(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype,
                                  sm_scale, num_splits=None, max_seq_len=None, plan: DecodePlan | None = None,
                                  return_kernel: bool = False, counters: torch.Tensor | None = None,
                                  pdl: bool | None = None):
    """Launch the kernels (inputs are validated by the dispatcher in ``__init__``).

    ``plan`` replaces :func:`make_plan`'s; ``return_kernel`` also returns the compiled main
    kernel (its ``metadata.shared`` is the real shared memory per program); ``counters``
    (int32 zeros, >= batch * num_kv_heads) replaces the cached arrival counters. ``pdl``
    (default: where the device has it) launches the decode kernel and the split reduction as
    programmatic dependents of the kernel before each.
    """
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    v_dm = v_is_dim_major(v_cache)
    if plan is None:
        plan = make_plan(q, k_cache, block_tables, kv_dtype, num_splits, max_seq_len, v_dim_major=v_dm)
    if plan.kernel == "swap":
        from rarefy.kernels.paged_attention.triton_decode_warpsplit import paged_decode_attention_warpsplit

        return paged_decode_attention_warpsplit(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens,
                                                kv_dtype, sm_scale, plan, v_dim_major=v_dm, counters=counters,
                                                pdl=pdl, return_kernel=return_kernel)
    quant = kv_dtype in _QUANT
    out, po, plse, cnt, fused, chunk = launch_buffers(q, plan, num_kv_heads, counters)
    splits = plan.num_splits
    dot = {"fp32": _DOT_F32, "bf16": _DOT_BF16, "fp16": _DOT_F16}[plan.dot_dtype]
    conv = conv_code(plan, kv_dtype)
    kv_mul = 256.0 if conv in (2, 3) else 1.0
    ks = k_scale if quant else k_cache
    vs = v_scale if quant else v_cache
    stride_sb, stride_sh = (k_scale.stride(0), k_scale.stride(1)) if quant else (0, 0)
    pdl = pdl_available(q.device) and (pdl is None or bool(pdl))  # asked for and available
    split_reduce = splits > 1 and not fused
    kernel = _decode_kernel[plan.grid](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, out, po, plse, cnt if fused else seq_lens,
        float(sm_scale) * LOG2E * kv_mul,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        stride_sb, stride_sh,
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        plan.tokens_per_split, splits,
        GROUP=plan.group, GROUP_PAD=plan.group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE_N=plan.tile_n, SPLIT=splits > 1, FUSED=fused, QUANT=quant, USE_DOT=plan.use_dot,
        DOT=dot, CHUNK=chunk, CONV=conv, QK_I8=plan.qk_int8, KV_MUL=kv_mul,
        PDL_WAIT=pdl, PDL=pdl and split_reduce,
        **prefetch_constants(k_cache, v_cache, plan.prefetch_pages if pdl else 0),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        **({"maxnreg": plan.max_regs} if plan.max_regs and not _interpreting() else {}), **pdl_options(pdl),
    )
    if split_reduce:
        launch_reduce(po, plse, out, splits, chunk, pdl=pdl)
    if return_kernel:
        return out, kernel
    return out


def default_sm_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
