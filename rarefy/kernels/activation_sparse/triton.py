"""Triton input-sparse GEMV / skinny GEMM for activation sparsity (TEAL-style).

``out = (x * (|x| >= t)) @ wt + bias`` with the weight stored transposed, ``wt: [K, N]``,
so the weights of one input channel are one contiguous row. Every program computes the
mask of its K rows from the threshold (no separate mask kernel, no index list) and loads
a weight row only when some row of x is active there; a masked-off load issues no memory
transaction, so at 50% activation sparsity half the weight bytes are never read.

* M = 1: FMA into a [BLOCK_K, BLOCK_N] register tile, reduced along K once at the end.
  Lanes run along N (16-byte loads), warps along K, so one warp-wide load covers
  one weight row segment and the row predicate is uniform across it.
* M >= 2: ``tl.dot(x_tile, w_tile)`` with M padded to 16; the union of the rows'
  masks decides which weight rows are read, each row of x keeps its own zeros.
* GLU (the MLP's gate and up): ``wt`` is ``[K, 2I]`` (gate columns, then up columns);
  a program reads the gate and the up tile of its columns under the same mask and
  writes ``silu(gate) * up`` (``[M, I]``), so gate/up/SiLU/multiply is one launch.

Split-K reuses the dense GEMV's deterministic arrival-counter reduction
(rarefy/kernels/gemv/triton.py): partials go to an fp32 workspace, the last program of
each tile sums them in split order and writes the output in its dtype. No atomics on
the output, so bf16 works as well as fp16 (TEAL's kernel was fp16-only because it
accumulated with atomicAdd on the output).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from rarefy.kernels.gemv.triton import GemvWorkspace, _finish_tile, _sm_count, _workspace_for


@dataclass(frozen=True)
class ActSparseConfig:
    """A program reads ``block_n`` output columns over ``block_k * iters`` input rows, in
    ``iters`` unrolled steps; the K range is split into as many programs as that needs."""

    block_n: int = 128
    block_k: int = 32
    iters: int = 4
    use_dot: bool = False
    block_m: int = 1
    num_warps: int = 4
    # M = 1, how x is loaded: 0 as a [BLOCK_K] vector, 1 broadcast to [BLOCK_K, BLOCK_N],
    # 2 as a [BLOCK_K, 1] column (broadcast by the multiply). With the weight columns'
    # contiguity visible (EVEN_N), 2 keeps the weight tile's 16-byte row loads and needs no
    # layout conversion in the loop (sm_90 compile); 1 then costs 16 conversions a call.
    xmode: int = 2
    # M = 1: reduce each step's tile along K into a [BLOCK_N] accumulator (in-thread when
    # block_n == 8 * 32 * num_warps for 16-bit weights: lanes and warps all along N).
    fold: bool = False
    # M = 1: a rolled loop over the program's rows with x loaded two steps ahead and the
    # weight tile one step ahead (register double buffering), instead of the unrolled steps.
    prefetch: bool = False


@triton.jit
def _silu_mul(g, u):
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _load_x2d(x_row, ks, cols, K, threshold):
    in_k = ks < K
    x = tl.load(x_row + ks[:, None] + 0 * cols[None, :], mask=in_k[:, None], other=0.0).to(tl.float32)
    active = (tl.abs(x) >= threshold) & in_k[:, None]
    return tl.where(active, x, 0.0), active


@triton.jit
def _prefetch_loop(x_row, w_ptr, cols, k_base, K, threshold, stride_wk,
                   ITERS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [k_base, k_base + ITERS * BLOCK_K): x two steps ahead, weights one step ahead,
    so neither the x -> mask -> weight chain nor the weight latency is paid per step."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    x_a, act_a = _load_x2d(x_row, k_base + offs_k, cols, K, threshold)
    x_b, act_b = _load_x2d(x_row, k_base + BLOCK_K + offs_k, cols, K, threshold)
    w_a = tl.load(w_ptr + (k_base + offs_k)[:, None].to(tl.int64) * stride_wk + cols[None, :], mask=act_a, other=0.0)
    for i in range(ITERS):
        k2 = k_base + (i + 2) * BLOCK_K + offs_k
        more = i + 2 < ITERS
        x_c, act_c = _load_x2d(x_row, k2, cols, tl.where(more, K, 0), threshold)
        k1 = k_base + (i + 1) * BLOCK_K + offs_k
        w_b = tl.load(w_ptr + k1[:, None].to(tl.int64) * stride_wk + cols[None, :], mask=act_b & (i + 1 < ITERS),
                      other=0.0)
        acc += w_a.to(tl.float32) * x_a
        x_a, act_a, w_a = x_b, act_b, w_b
        x_b, act_b = x_c, act_c
    return acc


@triton.jit
def _act_sparse_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, threshold,
    stride_xm, stride_wk, stride_om, n_glu,
    HAS_BIAS: tl.constexpr, GLU: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    SPLIT: tl.constexpr, ITERS: tl.constexpr, XMODE: tl.constexpr, FOLD: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_tiles = tl.num_programs(0)
    m_tiles = tl.num_programs(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Clamp instead of masking along N and M: loads stay predicated on the K row only
    # (the active-input predicate); duplicated columns/rows are dropped by the store.
    # (a clamp hides the columns' contiguity from Triton: the weight loads then go out two
    # bytes at a time, so it is only there when N is not a multiple of BLOCK_N)
    cols = offs_n if EVEN_N else tl.where(offs_n < N, offs_n, N - 1)
    rows_m = tl.where(offs_m < M, offs_m, M - 1)
    offs_k = tl.arange(0, BLOCK_K)
    k_base = pid_k * (ITERS * BLOCK_K)

    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if GLU:
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif FOLD:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        if GLU:
            acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        if GLU:
            acc_u = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        tl.static_assert(not USE_DOT and not GLU and XMODE == 1, "prefetch: M = 1, no GLU, xmode 1")
        acc = _prefetch_loop(x_ptr + rows_m * stride_xm, w_ptr, cols, k_base, K, threshold, stride_wk,
                             ITERS, BLOCK_K, BLOCK_N)
    # Unrolled, so the steps' x loads issue together, then their (mask-dependent) weight
    # loads: two memory latencies per program instead of two per step.
    for i in tl.static_range(0 if PREFETCH else ITERS):
        ks = k_base + i * BLOCK_K + offs_k
        in_k = ks < K
        if USE_DOT:
            x = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :], mask=in_k[None, :], other=0.0)
            keep = tl.abs(x.to(tl.float32)) >= threshold
            x = tl.where(keep, x, 0.0)
            active = (tl.max(keep.to(tl.int32), axis=0) > 0) & in_k
        elif XMODE == 1:
            # x broadcast over the tile's columns: every thread loads the x of its own rows
            # (same address across a row, an L1 broadcast), so the mask is born in the
            # weight tile's layout.
            x = tl.load(x_ptr + rows_m * stride_xm + ks[:, None] + 0 * cols[None, :],
                        mask=in_k[:, None], other=0.0).to(tl.float32)
            active = (tl.abs(x) >= threshold) & in_k[:, None]
            x = tl.where(active, x, 0.0)
        elif XMODE == 2:
            x = tl.load(x_ptr + rows_m * stride_xm + ks[:, None], mask=in_k[:, None], other=0.0).to(tl.float32)
            active = (tl.abs(x) >= threshold) & in_k[:, None]
            x = tl.where(active, x, 0.0)
        else:
            x = tl.load(x_ptr + rows_m * stride_xm + ks, mask=in_k, other=0.0).to(tl.float32)
            active = (tl.abs(x) >= threshold) & in_k
            x = tl.where(active, x, 0.0)
        w_ptrs = w_ptr + ks[:, None].to(tl.int64) * stride_wk + cols[None, :]
        if XMODE != 0 and not USE_DOT:
            wmask = active
        else:
            wmask = active[:, None]
        w = tl.load(w_ptrs, mask=wmask, other=0.0)
        if GLU:
            w_u = tl.load(w_ptrs + n_glu, mask=wmask, other=0.0)
        if USE_DOT:
            if IEEE:
                acc = tl.dot(x.to(w.dtype), w, acc, input_precision="ieee")
                if GLU:
                    acc_u = tl.dot(x.to(w.dtype), w_u, acc_u, input_precision="ieee")
            else:
                acc = tl.dot(x.to(w.dtype), w, acc)
                if GLU:
                    acc_u = tl.dot(x.to(w.dtype), w_u, acc_u)
        else:
            xb = x if XMODE != 0 else x[:, None]
            if FOLD:
                acc += tl.sum(w.to(tl.float32) * xb, axis=0)
                if GLU:
                    acc_u += tl.sum(w_u.to(tl.float32) * xb, axis=0)
            else:
                acc += w.to(tl.float32) * xb
                if GLU:
                    acc_u += w_u.to(tl.float32) * xb

    if USE_DOT:
        res = acc
        if GLU:
            res_u = acc_u
    elif FOLD:
        res = acc[None, :]
        if GLU:
            res_u = acc_u[None, :]
    else:
        res = tl.sum(acc, axis=0)[None, :]
        if GLU:
            res_u = tl.sum(acc_u, axis=0)[None, :]

    _epilogue(res, res_u if GLU else res, ws_ptr, cnt_ptr, b_ptr, out_ptr, offs_m, offs_n, pid_n, pid_k, pid_m,
              n_tiles, m_tiles, M, N, stride_om, HAS_BIAS, GLU, SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _epilogue(res, res_u, ws_ptr, cnt_ptr, b_ptr, out_ptr, offs_m, offs_n, pid_n, pid_k, pid_m,
              n_tiles, m_tiles, M, N, stride_om, HAS_BIAS: tl.constexpr, GLU: tl.constexpr,
              SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store a [BLOCK_M, BLOCK_N] fp32 result (GLU: silu(res) * res_u); with SPLIT > 1 via the
    deterministic arrival-counter reduction over the K splits."""
    if SPLIT > 1:
        tile = pid_m * n_tiles + pid_n
        tile_elems = BLOCK_M * BLOCK_N * (2 if GLU else 1)
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        stride_split = m_tiles * n_tiles * tile_elems
        ws_tile = ws_ptr + tile.to(tl.int64) * tile_elems + local
        tl.store(ws_tile + pid_k.to(tl.int64) * stride_split, res)
        if GLU:
            tl.store(ws_tile + pid_k.to(tl.int64) * stride_split + BLOCK_M * BLOCK_N, res_u)
        tl.debug_barrier()  # every thread's partial store before the counter release
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            # Last to arrive sums the partials in split order (deterministic); unrolled, so
            # the loads are independent and issue back to back.
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(ws_tile + s * stride_split, cache_modifier=".cg")
            if GLU:
                total_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in tl.static_range(SPLIT):
                    total_u += tl.load(ws_tile + s * stride_split + BLOCK_M * BLOCK_N, cache_modifier=".cg")
                total = _silu_mul(total, total_u)
            _finish_tile(total, b_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        if GLU:
            res = _silu_mul(res, res_u)
        _finish_tile(res, b_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)


def _pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@functools.lru_cache(maxsize=4096)
def pick_config(M: int, N: int, K: int, num_sms: int = 132) -> ActSparseConfig:
    """Heuristic, from the H100 sweep of 2026-11-23 (benchmarks/gpu_activation_gemv.py --sweep,
    docs/results/activation-gpu.md), after the weight loads became 16-byte row loads: M = 1
    takes the FMA path with x as a [BLOCK_K, 1] column and 512 weight rows a program (64
    columns x 64 rows x 8 steps on 8 warps up to N = 4096, 64 x 32 x 16 on 8 warps up to 8192,
    else 128 x 32 x 16 on 4 warps);
    M > 1 takes the tensor-core path."""
    if M == 1:
        if N <= 4096:
            return ActSparseConfig(block_n=64, block_k=64, iters=8, num_warps=8, xmode=2)
        if N <= 8192:
            return ActSparseConfig(block_n=64, block_k=32, iters=16, num_warps=8, xmode=2)
        return ActSparseConfig(block_n=128, block_k=32, iters=16, num_warps=4, xmode=2)
    cfg = ActSparseConfig(block_n=128, block_k=32, iters=8, use_dot=True,
                          block_m=16 if M <= 16 else 32, num_warps=4)
    tiles = -(-N // cfg.block_n) * -(-M // cfg.block_m)
    iters = cfg.iters
    while iters > 4 and tiles * -(-K // (iters * cfg.block_k)) < 12 * num_sms:
        iters //= 2
    return replace(cfg, iters=iters)


def _fit(cfg: ActSparseConfig, M: int, N: int, K: int) -> ActSparseConfig:
    block_n = min(cfg.block_n, max(16, _pow2(N)))
    block_k = min(cfg.block_k, max(16, _pow2(K)))
    block_m = cfg.block_m if cfg.use_dot else 1
    iters = max(1, min(cfg.iters, -(-K // block_k)))
    return replace(cfg, block_n=block_n, block_k=block_k, block_m=block_m, iters=iters)


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def input_sparse_matmul_triton(x: torch.Tensor, wt: torch.Tensor, threshold: float,
                               bias: torch.Tensor | None = None, *, glu: bool = False,
                               config: ActSparseConfig | None = None,
                               workspace: GemvWorkspace | None = None) -> torch.Tensor:
    """``(x * (|x| >= threshold)) @ wt + bias``; with ``glu``, ``silu(g) * u`` of that product's
    two column halves. x: [M, K]; wt: [K, N] (row stride free, columns contiguous)."""
    if x.dim() != 2 or wt.dim() != 2 or x.shape[1] != wt.shape[0]:
        raise ValueError(f"expected x [M, K] and wt [K, N], got {tuple(x.shape)} and {tuple(wt.shape)}")
    if x.dtype not in _SUPPORTED or wt.dtype != x.dtype:
        raise TypeError(f"x and wt must share one dtype of {_SUPPORTED}, got {x.dtype} and {wt.dtype}")
    M, K = x.shape
    n_total = wt.shape[1]
    if glu and n_total % 2:
        raise ValueError(f"GLU weight needs an even number of columns, got {n_total}")
    N = n_total // 2 if glu else n_total
    if bias is not None and (glu or bias.shape != (N,)):
        raise ValueError("bias must be [N] and is not supported with glu")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if wt.stride(1) != 1:
        wt = wt.contiguous()
    if config is None:
        sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
            if x.is_cuda else 132
        config = pick_config(M, N, K, sms)
    cfg = _fit(config, M, N, K)
    n_tiles, m_tiles = -(-N // cfg.block_n), -(-M // cfg.block_m)
    split = -(-K // (cfg.iters * cfg.block_k))
    if split > 1:
        ws = workspace if workspace is not None else _workspace_for(x.device)
        ws.ensure(split * m_tiles * n_tiles * cfg.block_m * cfg.block_n * (2 if glu else 1), m_tiles * n_tiles)
        ws_buf, cnt_buf = ws.partials, ws.counters
    else:
        ws_buf = cnt_buf = out
    _act_sparse_kernel[(n_tiles, split, m_tiles)](
        x, wt, bias if bias is not None else out, out, ws_buf, cnt_buf,
        M, N, K, float(threshold),
        x.stride(0), wt.stride(0), out.stride(0), N if glu else 0,
        HAS_BIAS=bias is not None, GLU=glu, USE_DOT=cfg.use_dot, IEEE=x.dtype == torch.float32,
        SPLIT=split, ITERS=cfg.iters, XMODE=0 if cfg.use_dot else cfg.xmode, FOLD=cfg.fold and not cfg.use_dot and not cfg.prefetch,
        PREFETCH=cfg.prefetch and not cfg.use_dot and not glu and cfg.xmode == 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_N=N % cfg.block_n == 0, num_warps=cfg.num_warps)
    return out
