"""Pieces shared by the low-bit Triton kernels: the split-K epilogue, the workspace cache,
programmatic-dependent-launch hooks, device facts.

Split-K works as in ``rarefy.kernels.gemv.triton``: each split writes its fp32 partial
tile (scales already applied: every scale is per output row / column, so it commutes with
the sum over K) to a workspace, bumps a per-tile arrival counter (acq_rel atomic), and
the last split to arrive sums the partials in split order (deterministic), stores the
tile and re-arms the counter. One launch, no host synchronisation: graph-capturable.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rarefy.kernels.gemv.triton import GemvWorkspace

__all__ = ["GemvWorkspace", "cdiv", "next_pow2", "sm_count", "workspace_for"]


@triton.jit
def store_tile(res, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_om, pid_k, split_k,
               SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store a finished ``[BLOCK_M, BLOCK_N]`` fp32 tile (rows ``offs_m`` of ``out``, columns
    ``offs_n``), or -- with SPLIT -- add it to the split-K reduction of its tile."""
    if SPLIT:
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(2)
        n_tiles = tl.num_programs(0)
        m_tiles = tl.num_programs(2)
        tile = pid_m * n_tiles + pid_n
        tile_elems = BLOCK_M * BLOCK_N
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        stride_split = m_tiles * n_tiles * tile_elems
        ws_tile = ws_ptr + tile.to(tl.int64) * tile_elems + local
        # padding rows of x (M < BLOCK_M) are neither written nor read back
        live = (offs_m[:, None] < M) & (offs_n[None, :] >= 0)
        tl.store(ws_tile + pid_k.to(tl.int64) * stride_split, res, mask=live)
        # every thread's partial store happens before the counter release
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(split_k):
                total += tl.load(ws_tile + s * stride_split, mask=live, other=0.0, cache_modifier=".cg")
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], res.to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def first_words(w_ptrs, u0, u_end, PREFETCH: tl.constexpr, EVEN: tl.constexpr):
    """The packed words of the first step when prefetching (else a placeholder)."""
    if PREFETCH:
        if EVEN:
            return tl.load(w_ptrs)
        return tl.load(w_ptrs, mask=u0 < u_end, other=0)
    # the words' own dtype (int32, or uint8 when the packed rows are not 4-byte aligned): the
    # compiler requires every return of a helper to have one type, constexpr branches included
    return tl.zeros(w_ptrs.shape, dtype=w_ptrs.dtype.element_ty)


@triton.jit
def step_words(w_ptrs, w_nxt, it, n_iter, u, u_end, PREFETCH: tl.constexpr, EVEN: tl.constexpr,
               BLOCK_U: tl.constexpr):
    """(this step's packed words, the next step's). With PREFETCH the next step's loads go out
    before this step's math (register double buffering; the last step re-reads its own
    words instead of masking)."""
    if PREFETCH:
        if EVEN:
            nxt = tl.load(w_ptrs + tl.where(it + 1 < n_iter, BLOCK_U, 0))
        else:
            nxt = tl.load(w_ptrs + BLOCK_U, mask=(u + BLOCK_U) < u_end, other=0)
        return w_nxt, nxt
    if EVEN:
        return tl.load(w_ptrs), w_nxt
    return tl.load(w_ptrs, mask=u < u_end, other=0), w_nxt


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With programmatic dependent launch: wait here for the previous kernel in the stream
    (everything before this point may only read data no earlier kernel writes: weights,
    scales). A no-op otherwise."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """With programmatic dependent launch: let the next kernel start its prologue now."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    """SM count of `t`'s device (132, an H100 SXM, off the GPU -- for tests and planning)."""
    if not t.is_cuda:
        return 132
    return sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


_WORKSPACES: dict[torch.device, GemvWorkspace] = {}


def workspace_for(device: torch.device) -> GemvWorkspace:
    """The per-device split-K workspace of the low-bit kernels (grows on demand; run each
    shape once before capturing a CUDA graph)."""
    ws = _WORKSPACES.get(device)
    if ws is None:
        ws = _WORKSPACES[device] = GemvWorkspace(device)
    return ws
