"""The split side of paged decode: each program's result (direct output, or a partial output
and its log-sum-exp), the split reduction (fused through arrival counters, or a separate
``_reduce_kernel``), the workspaces and counters a launch needs, and programmatic dependent
launch (PDL). Shared by both decode kernels (triton_decode.py, triton_decode_warpsplit.py);
the scheme is described in triton_decode.py's module doc."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rarefy.kernels.paged_attention.plan import DecodePlan


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _pdl_prologue(WAIT: tl.constexpr, TRIGGER: tl.constexpr):
    """Programmatic dependent launch (docs/attention-kernels.md, "PDL"). A kernel launched with
    ``launch_pdl`` may start while the kernel before it still runs: ``WAIT`` blocks until that
    grid has finished and its writes are visible, so nothing before this call may read what
    it writes. ``TRIGGER`` then lets the next PDL-launched kernel start; it comes after the
    wait so a chain of such kernels runs at most one ahead."""
    if WAIT:
        gdc_wait()
    if TRIGGER:
        gdc_launch_dependents()


@triton.jit
def _l2_prefetch(ptrs):
    """``prefetch.global.L2`` of every address (no result; kept because it is not pure)."""
    tl.inline_asm_elementwise(asm="prefetch.global.L2 [$1];\n mov.u32 $0, 0;", constraints="=r,l",
                              args=[ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_first_pages(bt_row, start, end, k_ptr, v_ptr, k_head, v_head, stride_kb, stride_vb,
                          BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr, PAGE_LINES: tl.constexpr,
                          LINE_ELEMS: tl.constexpr):
    """Ask L2 for the K and V pages of a split's first ``PAGES`` pages (each a contiguous
    ``PAGE_LINES`` lines of 128 bytes, ``LINE_ELEMS`` elements each) before ``gdc_wait``:
    their DRAM latency then overlaps the kernel before instead of starting the split's chain.
    Only block tables and sequence lengths are read (host-written, never by the kernel before,
    so they may be read before the wait); K/V lines the kernel before may still write are only
    prefetched, and L2 is where every write lands, so a later load sees them."""
    pg = start // BLOCK_SIZE + tl.arange(0, PAGES)
    blk = tl.load(bt_row + pg, mask=pg * BLOCK_SIZE < end, other=0).to(tl.int64)
    lines = (tl.arange(0, PAGE_LINES) * LINE_ELEMS)[None, :]
    _l2_prefetch(k_ptr + (blk * stride_kb + k_head)[:, None] + lines)
    _l2_prefetch(v_ptr + (blk * stride_vb + v_head)[:, None] + lines)


@triton.jit
def _split_range(sl_ptr, b, sp, tokens_per_split, num_splits):
    """Tokens [start, end) of split ``sp`` of sequence ``b``; the last split takes the rest,
    whatever the plan assumed."""
    seq_len = tl.load(sl_ptr + b).to(tl.int32)
    start = sp * tokens_per_split
    if sp == num_splits - 1:
        end = seq_len
    else:
        end = tl.minimum(start + tokens_per_split, seq_len)
    return start, end


@triton.jit
def _begin_split(sl_ptr, bt_ptr, k_ptr, v_ptr, b, kvh, sp, tokens_per_split, num_splits, stride_btb,
                 stride_kb, stride_kh, stride_vb, stride_vh, BLOCK_SIZE: tl.constexpr, PDL_WAIT: tl.constexpr,
                 PDL: tl.constexpr, PREFETCH: tl.constexpr, PAGE_LINES: tl.constexpr, LINE_ELEMS: tl.constexpr):
    """A decode program's start: its token range, the PDL wait (and trigger), and, with
    ``PREFETCH`` pages, the L2 prefetch of its first pages issued before that wait."""
    if PREFETCH > 0:  # the range is read before the wait: sequence lengths are host-written
        start, end = _split_range(sl_ptr, b, sp, tokens_per_split, num_splits)
        _prefetch_first_pages(bt_ptr + b.to(tl.int64) * stride_btb, start, end, k_ptr, v_ptr,
                              kvh.to(tl.int64) * stride_kh, kvh.to(tl.int64) * stride_vh, stride_kb, stride_vb,
                              BLOCK_SIZE, PREFETCH, PAGE_LINES, LINE_ELEMS)
    _pdl_prologue(PDL_WAIT, PDL)  # wait for the kernel before; the split reduction may launch
    if PREFETCH == 0:
        start, end = _split_range(sl_ptr, b, sp, tokens_per_split, num_splits)
    return start, end


@triton.jit
def _write_result(acc, m_i, l_i, b, kvh, sp, heads, g_mask, offs_d, out_ptr, po_ptr, plse_ptr, cnt_ptr,
                  stride_ob, stride_oh, num_splits, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                  SPLIT: tl.constexpr, FUSED: tl.constexpr, CHUNK: tl.constexpr):
    """Normalise one program's accumulator (``acc`` [GROUP_PAD, HEAD_DIM], running max ``m_i``
    and sum ``l_i`` in base 2) and write it: the output directly with one split, else the
    partial output and its LSE, and with ``FUSED`` the last program of (b, kvh) combines."""
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if not SPLIT:
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # workspaces: po [B, H, num_splits, HEAD_DIM], plse [B, H, num_splits], contiguous
        hrow = (b * (tl.num_programs(1) * GROUP) + heads).to(tl.int64) * num_splits + sp
        tl.store(po_ptr + hrow[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(plse_ptr + hrow, lse, mask=g_mask)
        if FUSED:
            # The last split of (b, kvh) to arrive combines all splits of its GROUP heads.
            tl.debug_barrier()  # every thread's partial stores are issued before the release
            cnt = cnt_ptr + b * tl.num_programs(1) + kvh
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                for g in range(GROUP):
                    head = kvh * GROUP + g
                    base = (b * (tl.num_programs(1) * GROUP) + head).to(tl.int64) * num_splits
                    _combine(po_ptr, plse_ptr, out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh, base,
                             num_splits, HEAD_DIM, CHUNK, True)
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")  # re-armed for the next launch


@triton.jit
def _load_cg(ptrs, mask, other, CG: tl.constexpr):
    if CG:  # written by other programs of this launch: read from L2, never a stale L1 line
        return tl.load(ptrs, mask=mask, other=other, cache_modifier=".cg")
    else:
        return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def _combine(po_ptr, plse_ptr, o_ptr, base, num_splits, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
             CG: tl.constexpr):
    """out = sum_s exp2(lse_s - max) * po_s / sum_s exp2(lse_s - max) over one head's splits
    (rows base .. base + num_splits of the workspaces); zeros when every split is empty.

    One pass, ``CHUNK`` splits at a time with a running maximum, so the LSEs and the partial
    outputs of a chunk are loaded together: one dependent global round trip per chunk (the
    launcher makes ``CHUNK`` cover every split when it can)."""
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.max(tl.full([CHUNK], float("-inf"), tl.float32), axis=0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    den = tl.sum(tl.zeros([CHUNK], tl.float32), axis=0)
    for c in range(0, num_splits, CHUNK):
        rows = c + offs_c
        valid = rows < num_splits
        lse = _load_cg(plse_ptr + base + rows, valid, float("-inf"), CG)
        part = _load_cg(po_ptr + (base + rows)[:, None] * HEAD_DIM + offs_d[None, :], valid[:, None], 0.0, CG)
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # all empty so far: keep exp2 finite
        w = tl.exp2(lse - m_use)  # 0 for an empty split (its partial is 0, never NaN: it was written)
        rescale = tl.exp2(m - m_use)
        acc = acc * rescale + tl.sum(w[:, None] * part, axis=0)
        den = den * rescale + tl.sum(w, axis=0)
        m = m_new
    o = acc / tl.where(den > 0.0, den, 1.0)
    tl.store(o_ptr + offs_d, o.to(o_ptr.dtype.element_ty))


@triton.jit
def _reduce_kernel(
    po_ptr, plse_ptr, out_ptr,
    stride_ob, stride_oh, num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    _pdl_prologue(PDL, PDL)  # launched early: wait for the decode kernel's partials
    b = tl.program_id(0)
    h = tl.program_id(1)
    base = (b * NUM_HEADS + h).to(tl.int64) * num_splits
    _combine(po_ptr, plse_ptr, out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh, base, num_splits,
             HEAD_DIM, CHUNK, False)


_COUNTERS: dict = {}


def counters_for(device: torch.device, n: int) -> torch.Tensor | None:
    """The device's cached zeroed arrival counters (at least n), or None when they would have to
    grow during CUDA-graph capture."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[device] = torch.zeros(max(n, 1 << 16, 2 * (0 if buf is None else buf.numel())),
                                              dtype=torch.int32, device=device)
    return buf


def launch_buffers(q, plan: DecodePlan, num_kv_heads: int, counters: torch.Tensor | None = None):
    """(out, po, plse, counters, fused, chunk) for one decode launch: the output, the fp32 split
    workspaces (aliases of ``out`` with one split), the arrival counters of the fused reduction
    (None when it is off or cannot be had), and the reduction's chunk of splits."""
    batch, num_heads, head_dim = q.shape
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    splits = plan.num_splits
    if splits > 1:
        po = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        plse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    else:
        po = plse = out  # unused
    fused = plan.fused_reduce and splits > 1
    cnt = None
    if fused:
        cnt = counters if counters is not None else counters_for(q.device, batch * num_kv_heads)
        fused = cnt is not None
    # every split in one chunk (one round trip in the reduction) up to 64; few distinct values,
    # so a changing split count rarely recompiles
    chunk = min(64, max(8, 1 << (max(1, splits) - 1).bit_length()))
    return out, po, plse, cnt, fused, chunk


def pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper or later, not under the interpreter."""
    return (device.type == "cuda" and not _interpreting()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def prefetch_constants(k_cache, v_cache, pages: int) -> dict:
    """The kernels' PREFETCH constexprs: ``pages`` first pages of each split asked of L2 before
    the PDL wait, when every (block, head) page of K and V is one contiguous run (the page
    layouts rarefy's caches use); otherwise none."""
    _, _, bs, d = k_cache.shape
    elem = k_cache.element_size()
    page_bytes = bs * d * elem
    contiguous = (k_cache.stride(3) == 1 and k_cache.stride(2) == d
                  and ((v_cache.stride(3) == 1 and v_cache.stride(2) == d)      # token-major
                       or (v_cache.stride(2) == 1 and v_cache.stride(3) == bs)))  # dim-major
    lines = page_bytes // 128
    if pages <= 0 or pages & (pages - 1) or not contiguous or page_bytes % 128 or lines & (lines - 1):
        return dict(PREFETCH=0, PAGE_LINES=1, LINE_ELEMS=1)
    return dict(PREFETCH=pages, PAGE_LINES=lines, LINE_ELEMS=128 // elem)


def pdl_options(pdl: bool) -> dict:
    """Launch options of a PDL-launched kernel (nothing without PDL)."""
    return {"launch_pdl": True} if pdl else {}


def launch_reduce(po, plse, out, splits: int, chunk: int, pdl: bool = False) -> None:
    """The separate split reduction: ``_reduce_kernel`` over (batch, num_heads). With ``pdl``
    it is launched as a programmatic dependent of the decode kernel (which must have called
    ``gdc_launch_dependents``): its launch overlaps the decode kernel's tail, and it waits
    for the decode kernel's writes in ``gdc_wait``; it then lets the next PDL kernel start."""
    batch, num_heads, head_dim = out.shape
    _reduce_kernel[(batch, num_heads)](
        po, plse, out, out.stride(0), out.stride(1), splits,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, CHUNK=chunk, PDL=pdl,
        num_warps=4 if head_dim * chunk >= 2048 else 2,
        **pdl_options(pdl),
    )
