"""Flash-decoding with one online softmax per warp ("warp split"), for the paged KV cache.

``_decode_kernel`` (triton_decode.py) spreads each tile's tokens over the program's warps
inside one 2-D ``tl.dot``: the row max and row sum of the scores then cross warps (shared
memory and a block-wide barrier) every tile, and ``P`` goes through shared memory so that
every warp can multiply it by its slice of ``V``. For 8-bit caches that chain, not the
bytes, sets the time per tile (docs/results/attention.md, "Quantized caches").

Here (``_decode_swap_kernel``) a tile is ``[SUB, SUB_N]`` tokens and every product is a
batched 3-D ``tl.dot`` whose batch axis is ``SUB`` (= the warp count; Triton gives each
batch slice its own warp), so sub-stream ``w`` keeps its own running max, sum and
accumulator and nothing crosses warps until the end, where the ``SUB`` partial softmaxes are
merged by their maxima (the same log-sum-exp combine the splits use). The products are
transposed (kernel doc). A first version with untransposed products (a [16, HEAD_DIM]
accumulator per warp) was measured and replaced (docs/results/attention.md).

V may be token-major (``[block, head, token, dim]``) or a view of dim-major storage
(``[block, head, dim, token]``, the paged cache's layout for 8-bit caches): the strides say
which. Dim-major keeps the tokens, the reduction axis of ``P @ V``, contiguous, so an 8-bit
V tile reaches the tensor cores with 4-byte shared-memory loads instead of byte loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rarefy.kernels.paged_attention.triton_decode import _i8_to_f16_plus1152, _to_dot
from rarefy.kernels.paged_attention.triton_splits import _begin_split, _write_result


@triton.jit
def _page_ids(bt_row, t0, limit, SUB: tl.constexpr, PAGES: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """[SUB, PAGES] page ids of the tile at t0 (0 for pages at or past ``limit``)."""
    pg = t0 // BLOCK_SIZE + tl.arange(0, SUB)[:, None] * PAGES + tl.arange(0, PAGES)[None, :]
    return tl.load(bt_row + pg, mask=pg * BLOCK_SIZE < limit, other=0).to(tl.int64)


@triton.jit
def _page_scales(s_ptr, blk, s_head, stride_sb, t0, end, SUB: tl.constexpr, SUB_N: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr):
    """[SUB, SUB_N] fp32 per-token scales of the tile at t0 (0 past ``end`` when MASKED)."""
    PAGES: tl.constexpr = SUB_N // BLOCK_SIZE
    offs_b = tl.arange(0, BLOCK_SIZE)
    ptrs = tl.reshape(s_ptr + blk[:, :, None] * stride_sb + s_head + offs_b[None, None, :], (SUB, SUB_N))
    if MASKED:
        pg = t0 // BLOCK_SIZE + tl.arange(0, SUB)[:, None] * PAGES + tl.arange(0, PAGES)[None, :]
        tok = tl.reshape(pg[:, :, None] * BLOCK_SIZE + offs_b[None, None, :], (SUB, SUB_N))
        return tl.load(ptrs, mask=tok < end, other=0.0).to(tl.float32)
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def _swap_tile(t0, end, blk, k_s, v_s, m_i, l_i, acc, r, qb, q_bias, qk_scale, k_ptr, v_ptr, k_head, v_head,
               stride_kb, stride_kt, stride_vb, stride_vt, stride_vd,
               HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SUB: tl.constexpr, SUB_N: tl.constexpr,
               QUANT: tl.constexpr, DOT: tl.constexpr, CONV: tl.constexpr, KV_MUL: tl.constexpr,
               V_DIM_MAJOR: tl.constexpr, V_FINITE: tl.constexpr, MASKED: tl.constexpr,
               K_BIAS: tl.constexpr, V_BIAS: tl.constexpr, ASM: tl.constexpr, OFFSET: tl.constexpr):
    """One tile of ``_decode_swap_kernel``: tokens t0 .. t0 + SUB * SUB_N (sub-stream w takes
    the w-th run of SUB_N), folded into the running (max, sum, accumulator, unit).
    ``blk`` [SUB, PAGES] holds the tile's page ids and ``k_s`` / ``v_s`` [SUB, SUB_N] its fp32
    scales (quantized caches), both loaded ahead by the caller. Without ``MASKED`` every token
    is below ``end``. ``K_BIAS`` / ``V_BIAS`` (int8): the tile enters the MMA as x + 1152 (two
    byte permutes per four values, no subtraction); the bias comes back out of the scores as
    ``q_bias`` (1152 q.1 times the score scale, one FFMA with the scaling) and out of each
    tile's output product (V_BIAS, below)."""
    PAGES: tl.constexpr = SUB_N // BLOCK_SIZE
    offs_w = tl.arange(0, SUB)
    offs_p = tl.arange(0, PAGES)
    offs_b = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM)
    pg = t0 // BLOCK_SIZE + offs_w[:, None] * PAGES + offs_p[None, :]  # [SUB, PAGES]
    if MASKED:
        pg_live = pg * BLOCK_SIZE < end
        tok3 = pg[:, :, None] * BLOCK_SIZE + offs_b[None, None, :]
        t_mask = tl.reshape(tok3 < end, (SUB, SUB_N))

    # K unmasked even in the partial tile: slots past the end (pages past it read page 0) only
    # make scores that the token mask replaces with -inf, NaN included
    k_row = blk[:, :, None] * stride_kb + k_head + offs_b[None, None, :] * stride_kt
    k = tl.reshape(tl.load(k_ptr + k_row[:, :, :, None] + offs_d[None, None, None, :]), (SUB, SUB_N, HEAD_DIM))
    if K_BIAS:
        s = tl.dot(_i8_to_f16_plus1152(k, ASM, OFFSET), qb) * qk_scale - q_bias  # [SUB, SUB_N, GROUP_PAD]
    else:
        s = tl.dot(_to_dot(k, DOT, CONV), qb) * qk_scale  # [SUB, SUB_N, GROUP_PAD]
    if QUANT:
        s = s * k_s[:, :, None]
    if MASKED:
        s = tl.where(t_mask[:, :, None], s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # a sub-stream that has seen no token yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None, :])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    if V_DIM_MAJOR:  # V^T tile [SUB, HEAD_DIM, SUB_N]: each page's slots one contiguous run
        v_t = v_ptr + (blk[:, None, :, None] * stride_vb + v_head + offs_d[None, :, None, None] * stride_vd
                       + offs_b[None, None, None, :] * stride_vt)
        if MASKED:
            # a token mask along the contiguous axis would cost the vector loads: whole pages
            # are masked, then the slots past the end zeroed (P is 0 there, but an unwritten
            # slot may hold a NaN pattern) unless every pattern converts to a finite value
            v_t = tl.reshape(tl.load(v_t, mask=pg_live[:, None, :, None], other=0.0), (SUB, HEAD_DIM, SUB_N))
            if not V_FINITE:
                v_t = tl.where(t_mask[:, None, :], v_t, tl.zeros_like(v_t))
        else:
            v_t = tl.reshape(tl.load(v_t), (SUB, HEAD_DIM, SUB_N))
    else:
        v_t = v_ptr + (blk[:, :, None, None] * stride_vb + v_head + offs_b[None, None, :, None] * stride_vt
                       + offs_d[None, None, None, :] * stride_vd)
        if MASKED:
            v_t = tl.load(v_t, mask=(tok3 < end)[:, :, :, None], other=0.0)
        else:
            v_t = tl.load(v_t)
        v_t = tl.trans(tl.reshape(v_t, (SUB, SUB_N, HEAD_DIM)), (0, 2, 1))
    if QUANT:
        # fp16 P carries the V scales normalised by the tile's largest (fp16 would underflow on
        # the raw products); that factor becomes the accumulator's unit r, so the tile's
        # product still accumulates inside the MMA
        # (kept 2-D, [SUB, 1], so it stays in the scores' layout: no shared-memory round trip)
        v_top = tl.maximum(tl.max(v_s, axis=1, keep_dims=True), 1e-30) * KV_MUL
        pq = (p * (v_s * KV_MUL / v_top)[:, :, None]).to(tl.float16)
        unit = alpha * (r / v_top)  # [SUB, GROUP_PAD]: the accumulator's rescale this tile
        if V_BIAS:
            # 1152 * (the exact sum of the fp16 P^T column the MMA multiplies) is what the bias
            # adds this tile: taken out of the accumulator the MMA adds to (one FFMA instead of
            # the FMUL), so the accumulator never carries the bias. Carried across tiles and
            # taken out at the end, it dwarfs the output and the MMA's accumulation loses it
            # (H100: 6.6e-2 relative error at 128k against 8.8e-4)
            bias = 1152.0 * tl.sum(pq.to(tl.float32), axis=1)  # [SUB, GROUP_PAD]
            acc = tl.dot(_i8_to_f16_plus1152(v_t, ASM, OFFSET), pq, acc * unit[:, None, :] - bias[:, None, :])
        else:
            acc = tl.dot(_to_dot(v_t, DOT, CONV), pq, acc * unit[:, None, :])
        r = v_top
    elif DOT == 1:
        acc = tl.dot(v_t.to(tl.bfloat16), p.to(tl.bfloat16), acc * alpha[:, None, :])
    else:
        acc = tl.dot(v_t.to(tl.float16), p.to(tl.float16), acc * alpha[:, None, :])
    return m_new, l_i, acc, r


@triton.jit
def _decode_swap_kernel(
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
    SUB: tl.constexpr,
    SUB_N: tl.constexpr,
    SPLIT: tl.constexpr,
    FUSED: tl.constexpr,
    QUANT: tl.constexpr,
    DOT: tl.constexpr,
    CHUNK: tl.constexpr,
    CONV: tl.constexpr,
    KV_MUL: tl.constexpr,
    V_DIM_MAJOR: tl.constexpr,
    V_FINITE: tl.constexpr,
    PDL_WAIT: tl.constexpr = False,
    PDL: tl.constexpr = False,
    K_BIAS: tl.constexpr = False,
    V_BIAS: tl.constexpr = False,
    ASM: tl.constexpr = True,
    OFFSET: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,
    PAGE_LINES: tl.constexpr = 1,
    LINE_ELEMS: tl.constexpr = 1,
):
    """The warp split with the products transposed ("swap AB"): scores^T = K q^T
    ([SUB_N, GROUP_PAD] per sub-stream) and out^T = V^T P^T ([HEAD_DIM, GROUP_PAD]). The tokens
    and the head dim fill the MMA's 16-row side, the few query heads its 8-column side, so a
    GQA group of 4 pads to 8 columns instead of 16 rows: half the MMAs, and a [HEAD_DIM, 8]
    accumulator per warp instead of [16, HEAD_DIM]. V dim-major is V^T's natural layout."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    start, end = _begin_split(sl_ptr, bt_ptr, k_ptr, v_ptr, b, kvh, sp, tokens_per_split, num_splits, stride_btb,
                              stride_kb, stride_kh, stride_vb, stride_vh, BLOCK_SIZE, PDL_WAIT, PDL, PREFETCH,
                              PAGE_LINES, LINE_ELEMS)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g

    q_t = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[None, :] * stride_qh + offs_d[:, None],
                  mask=g_mask[None, :], other=0.0)  # [HEAD_DIM, GROUP_PAD]
    if DOT == 1:
        q_t = q_t.to(tl.bfloat16)
    else:
        q_t = q_t.to(tl.float16)
    qb = tl.broadcast_to(q_t[None, :, :], (SUB, HEAD_DIM, GROUP_PAD))
    q_bias = tl.zeros([SUB, 1, GROUP_PAD], tl.float32)
    if K_BIAS:  # what 1152 in every K value adds to a scaled score: 1152 * q.1 (the fp16 q the MMA sees)
        q_bias = q_bias + (tl.sum(q_t.to(tl.float32), axis=0) * (1152.0 * qk_scale))[None, None, :]

    m_i = tl.full([SUB, GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([SUB, GROUP_PAD], tl.float32)
    acc = tl.zeros([SUB, HEAD_DIM, GROUP_PAD], tl.float32)  # out^T in units of r (below)
    r = tl.full([SUB, 1], 1.0, tl.float32)

    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    k_head = kvh.to(tl.int64) * stride_kh
    v_head = kvh.to(tl.int64) * stride_vh
    s_head = kvh.to(tl.int64) * stride_sh

    # whole tiles need no token mask; the one partial tile at the end of a split is peeled off
    TILE: tl.constexpr = SUB * SUB_N
    full_end = start + tl.maximum(end - start, 0) // TILE * TILE
    PAGES: tl.constexpr = SUB_N // BLOCK_SIZE
    # The K/V tiles (and their page ids) are staged through shared memory by Triton's
    # pipeliner, but 2-byte-per-thread scale loads are not pipelined: left in the loop they put
    # two dependent global round trips (page id -> scale) into every tile's chain. So the
    # scales are loaded one tile ahead into registers, from page ids loaded two tiles ahead.
    k_s = tl.zeros([SUB, SUB_N], tl.float32)
    v_s = tl.zeros([SUB, SUB_N], tl.float32)
    blk_s = _page_ids(bt_row, start + TILE, full_end, SUB, PAGES, BLOCK_SIZE)  # next tile's, for its scales
    if QUANT:
        blk0 = _page_ids(bt_row, start, full_end, SUB, PAGES, BLOCK_SIZE)
        k_s = _page_scales(ks_ptr, blk0, s_head, stride_sb, start, end, SUB, SUB_N, BLOCK_SIZE, False)
        v_s = _page_scales(vs_ptr, blk0, s_head, stride_sb, start, end, SUB, SUB_N, BLOCK_SIZE, False)
    for t0 in range(start, full_end, TILE):
        k_s_next = k_s
        v_s_next = v_s
        blk_s_next = blk_s
        if QUANT:
            blk_s_next = _page_ids(bt_row, t0 + 2 * TILE, full_end, SUB, PAGES, BLOCK_SIZE)
            k_s_next = _page_scales(ks_ptr, blk_s, s_head, stride_sb, t0, end, SUB, SUB_N, BLOCK_SIZE, False)
            v_s_next = _page_scales(vs_ptr, blk_s, s_head, stride_sb, t0, end, SUB, SUB_N, BLOCK_SIZE, False)
        blk = _page_ids(bt_row, t0, full_end, SUB, PAGES, BLOCK_SIZE)
        m_i, l_i, acc, r = _swap_tile(
            t0, end, blk, k_s, v_s, m_i, l_i, acc, r, qb, q_bias, qk_scale, k_ptr, v_ptr, k_head, v_head,
            stride_kb, stride_kt, stride_vb, stride_vt, stride_vd,
            HEAD_DIM, BLOCK_SIZE, SUB, SUB_N, QUANT, DOT, CONV, KV_MUL, V_DIM_MAJOR, V_FINITE, False,
            K_BIAS, V_BIAS, ASM, OFFSET)
        blk_s = blk_s_next
        k_s = k_s_next
        v_s = v_s_next
    if full_end < end:
        blk = _page_ids(bt_row, full_end, end, SUB, PAGES, BLOCK_SIZE)
        if QUANT:
            k_s = _page_scales(ks_ptr, blk, s_head, stride_sb, full_end, end, SUB, SUB_N, BLOCK_SIZE, True)
            v_s = _page_scales(vs_ptr, blk, s_head, stride_sb, full_end, end, SUB, SUB_N, BLOCK_SIZE, True)
        m_i, l_i, acc, r = _swap_tile(
            full_end, end, blk, k_s, v_s, m_i, l_i, acc, r, qb, q_bias, qk_scale, k_ptr, v_ptr, k_head, v_head,
            stride_kb, stride_kt, stride_vb, stride_vt, stride_vd,
            HEAD_DIM, BLOCK_SIZE, SUB, SUB_N, QUANT, DOT, CONV, KV_MUL, V_DIM_MAJOR, V_FINITE, True,
            K_BIAS, V_BIAS, ASM, OFFSET)

    m = tl.max(m_i, axis=0)
    m_use = tl.where(m > float("-inf"), m, 0.0)
    w = tl.exp2(m_i - m_use[None, :])
    l_tot = tl.sum(l_i * w, axis=0)
    acc_tot = tl.trans(tl.sum(acc * w[:, None, :] * r[:, :, None], axis=0))  # [GROUP_PAD, HEAD_DIM]
    _write_result(acc_tot, m, l_tot, b, kvh, sp, heads, g_mask, offs_d, out_ptr, po_ptr, plse_ptr, cnt_ptr,
                  stride_ob, stride_oh, num_splits, GROUP, HEAD_DIM, SPLIT, FUSED, CHUNK)


def warpsplit_supported(plan, block_size: int, head_dim: int) -> bool:
    """Whether the swap kernel can run this plan: a plan made for it (``kernel == "swap"``, whose
    group_pad is the column count), tensor-core products in bf16/fp16, whole pages per
    sub-stream (``tile_n / num_warps`` a multiple of the page) and at least 16 tokens per
    sub-stream (the smallest MMA reduction)."""
    sub_n = plan.tile_n // plan.num_warps
    return (plan.kernel == "swap" and plan.use_dot and plan.dot_dtype in ("bf16", "fp16") and not plan.qk_int8
            and plan.tile_n % plan.num_warps == 0 and sub_n >= 16 and sub_n % block_size == 0
            and head_dim >= 16)


def paged_decode_attention_warpsplit(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, kv_dtype,
                                     sm_scale, plan, v_dim_major: bool | None = None, counters=None,
                                     pdl: bool | None = None, return_kernel: bool = False):
    """Launch ``_decode_warpsplit_kernel`` for ``plan`` (a :func:`plan_decode` result that
    :func:`warpsplit_supported` accepts). ``v_cache`` is ``[blocks, kv_heads, block_size,
    head_dim]``, contiguous or a view of dim-major storage (``v_dim_major``, found from the
    strides when None)."""
    from rarefy.kernels.paged_attention.triton_decode import LOG2E, _QUANT, conv_code, v_is_dim_major
    from rarefy.kernels.paged_attention.triton_splits import (
        _interpreting, launch_buffers, launch_reduce, pdl_available, pdl_options, prefetch_constants)

    if v_dim_major is None:
        v_dim_major = v_is_dim_major(v_cache)

    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    if not warpsplit_supported(plan, block_size, head_dim):
        raise ValueError(f"the warp-split decode kernel cannot run this plan: {plan.describe()}")
    quant = kv_dtype in _QUANT
    out, po, plse, cnt, fused, chunk = launch_buffers(q, plan, num_kv_heads, counters)
    conv = conv_code(plan, kv_dtype)
    kv_mul = 256.0 if conv in (2, 3) else 1.0
    stride_vt, stride_vd = v_cache.stride(2), v_cache.stride(3)
    ks = k_scale if quant else k_cache
    vs = v_scale if quant else v_cache
    stride_sb, stride_sh = (k_scale.stride(0), k_scale.stride(1)) if quant else (0, 0)
    kernel = _decode_swap_kernel
    split_reduce = plan.num_splits > 1 and not fused
    pdl = pdl_available(q.device) and (pdl is None or bool(pdl))  # asked for and available
    compiled = kernel[plan.grid](
        q, k_cache, v_cache, ks, vs, block_tables, seq_lens, out, po, plse, cnt if fused else seq_lens,
        float(sm_scale) * LOG2E * kv_mul,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), stride_vt, stride_vd,
        stride_sb, stride_sh,
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        plan.tokens_per_split, plan.num_splits,
        GROUP=plan.group, GROUP_PAD=plan.group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        SUB=plan.num_warps, SUB_N=plan.tile_n // plan.num_warps, SPLIT=plan.num_splits > 1, FUSED=fused,
        QUANT=quant, DOT={"bf16": 1, "fp16": 2}[plan.dot_dtype], CHUNK=chunk, CONV=conv, KV_MUL=kv_mul,
        V_DIM_MAJOR=bool(v_dim_major), V_FINITE=kv_dtype == "int8" or conv == 2,  # the e4m3 bit trick drops NaN
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        PDL_WAIT=pdl, PDL=pdl and split_reduce, K_BIAS=plan.convert in ("bias_k", "bias", "bias_u8"),
        V_BIAS=plan.convert in ("bias", "bias_u8"), ASM=not _interpreting(), OFFSET=plan.convert == "bias_u8",
        **prefetch_constants(k_cache, v_cache, plan.prefetch_pages if pdl else 0),
        **({"maxnreg": plan.max_regs} if plan.max_regs and not _interpreting() else {}), **pdl_options(pdl),
    )
    if split_reduce:
        launch_reduce(po, plse, out, plan.num_splits, chunk, pdl=pdl)
    if return_kernel:
        return out, compiled
    return out
