"""Triton skinny-GEMM / GEMV kernel for decode: ``out = x @ w.T + bias``.

Shapes and layouts
------------------
* ``x``: ``[M, K]`` activations, M small (1..32 is the target; any M works).
* ``w``: ``[N, K]`` weight in ``nn.Linear`` layout, last dim contiguous.
* ``bias``: ``[N]`` or ``None``.
* ``out``: ``[M, N]`` in ``x.dtype`` (fp16, bf16 or fp32), last dim contiguous.

Design (memory bound: the weight is read exactly once)
------------------------------------------------------
Each program owns a ``BLOCK_N``-row tile of ``w`` (and a ``BLOCK_M`` tile of
rows of ``x``, so ``w`` is streamed once for all M rows) and walks a K range in
``BLOCK_K`` steps with 16-byte loads along K, accumulating in fp32. Two inner
products are available:

* ``use_dot=False`` (best for M = 1): elementwise FMA into a register tile,
  reduced along K once at the end; no tensor cores, no shared memory.
* ``use_dot=True`` (M >= 2): ``tl.dot(w_tile, x_tile.T)`` -- the weight tile is
  the MMA's "M" side (64+ rows), the few activation rows the narrow side
  (padded to 16/32), so the tensor cores do the arithmetic that would otherwise
  make M = 8..32 issue-bound.

When the N tiles alone cannot fill the GPU the K range is split across
``split_k`` programs. Partial tiles go to an fp32 workspace; each program then
bumps a per-tile arrival counter (acq_rel atomic) and the *last* one to arrive
sums the partials in a fixed order (so results are deterministic), adds the
bias, writes ``out`` and resets the counter to zero. One launch, no host
synchronisation and no data-dependent allocation, so it is CUDA-graph
capturable. The workspace is cached per device and grows on demand: call each
shape once before capturing a graph. Calls that run concurrently on different
streams of one device must not share it (pass ``workspace=`` to give them
their own).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    """Launch configuration of :func:`gemv_triton`.

    ``block_m`` rows of ``x`` per program (``use_dot`` needs >= 16, padding is
    free), ``block_n`` rows of ``w`` per program, ``block_k`` elements of K per
    step, ``split_k`` programs along K (1 = no split).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    use_dot: bool = False
    num_warps: int = 4
    num_stages: int = 2
    prefetch: bool = False  # M == 1 path: register double buffering of w
    fold: bool = False  # M == 1 path: sum 8 K-neighbours per step (fewer accumulator registers)


@triton.jit
def _finish_tile(res, b_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr):
    """Add bias to a [BLOCK_M, BLOCK_N] fp32 tile and store it (masked)."""
    mask_n = offs_n < N
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        res = res + b[None, :]
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    k_per_split, split_k,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
    FOLD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_tiles = tl.num_programs(0)
    m_tiles = tl.num_programs(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Clamp out-of-range rows instead of masking the loads: the duplicated rows
    # are computed and then dropped by the masked store, and the loads stay
    # unpredicated along N / M.
    rows_n = tl.where(offs_n < N, offs_n, N - 1)
    rows_m = tl.where(offs_m < M, offs_m, M - 1)
    offs_k = tl.arange(0, BLOCK_K)

    k_start = pid_k * k_per_split
    # K left from k_start: only the last split is cut short by it. Every split
    # runs the same number of steps (a launch argument, so the loop bound is
    # uniform); unless EVEN_K (K == split_k * k_per_split) the steps past the
    # end are fully masked and move no data.
    k_len = K - k_start
    n_iter = k_per_split // BLOCK_K

    w_ptrs = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + (k_start + offs_k)[None, :]

    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for it in range(0, n_iter):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                kmask = (it * BLOCK_K + offs_k) < k_len
                w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        res = tl.trans(acc)
    else:
        tl.static_assert(BLOCK_M == 1, "the FMA path takes one row of x per program")
        # One activation row: FMA into a [BLOCK_N, BLOCK_K] register tile (or,
        # with FOLD, into [BLOCK_N, BLOCK_K // 8] after an in-thread sum of 8
        # neighbours), reduced along K once at the end.
        if FOLD:
            acc = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        x1_ptrs = x_ptr + rows_m * stride_xm + k_start + offs_k  # BLOCK_M == 1: shape [BLOCK_K]
        if PREFETCH:
            # Register double buffering: the loads of step it+1 are issued
            # before the FMAs of step it wait on theirs.
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x1_ptrs)
            else:
                kmask = offs_k < k_len
                w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
                x = tl.load(x1_ptrs, mask=kmask, other=0.0)
            for it in range(0, n_iter):
                w_ptrs += BLOCK_K
                x1_ptrs += BLOCK_K
                more = it + 1 < n_iter
                if EVEN_K:
                    w_nxt = tl.load(w_ptrs, mask=more, other=0.0)
                    x_nxt = tl.load(x1_ptrs, mask=more, other=0.0)
                else:
                    kmask = ((it + 1) * BLOCK_K + offs_k) < k_len
                    w_nxt = tl.load(w_ptrs, mask=kmask[None, :] & more, other=0.0)
                    x_nxt = tl.load(x1_ptrs, mask=kmask & more, other=0.0)
                prod = w.to(tl.float32) * x.to(tl.float32)[None, :]
                if FOLD:
                    acc += tl.sum(tl.reshape(prod, [BLOCK_N, BLOCK_K // 8, 8]), axis=2)
                else:
                    acc += prod
                w = w_nxt
                x = x_nxt
        else:
            for it in range(0, n_iter):
                if EVEN_K:
                    w = tl.load(w_ptrs)
                    x = tl.load(x1_ptrs)
                else:
                    kmask = (it * BLOCK_K + offs_k) < k_len
                    w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
                    x = tl.load(x1_ptrs, mask=kmask, other=0.0)
                prod = w.to(tl.float32) * x.to(tl.float32)[None, :]
                if FOLD:
                    acc += tl.sum(tl.reshape(prod, [BLOCK_N, BLOCK_K // 8, 8]), axis=2)
                else:
                    acc += prod
                w_ptrs += BLOCK_K
                x1_ptrs += BLOCK_K
        res = tl.sum(acc, axis=1)[None, :]

    if SPLIT:
        # Partial tile -> workspace laid out [split_k, m_tiles, n_tiles, BLOCK_M, BLOCK_N].
        tile = pid_m * n_tiles + pid_n
        tile_elems = BLOCK_M * BLOCK_N
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        stride_split = m_tiles * n_tiles * tile_elems
        ws_tile = ws_ptr + tile.to(tl.int64) * tile_elems + local
        tl.store(ws_tile + pid_k.to(tl.int64) * stride_split, res)
        # Every thread's partial store happens before the counter release.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            # Last to arrive: sum all partials in split order (deterministic).
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, split_k):
                total += tl.load(ws_tile + s * stride_split, cache_modifier=".cg")
            _finish_tile(total, b_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)
            # Re-arm the counter for the next launch.
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        _finish_tile(res, b_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)


# --------------------------------------------------------------------------
# Configuration heuristics
# --------------------------------------------------------------------------


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_for(tiles: int, k: int, block_k: int, target_programs: int, max_split: int = 16) -> int:
    """Smallest power-of-two split that brings ``tiles * split`` up to
    ``target_programs``, keeping at least two K steps per split."""
    split = 1
    while tiles * split < target_programs and 2 * split <= max_split and k // (2 * split * block_k) >= 2:
        split *= 2
    return split


@functools.lru_cache(maxsize=4096)
def pick_config(M: int, N: int, K: int, dtype: torch.dtype, num_sms: int = 132) -> GemvConfig:
    """Heuristic launch configuration for an ``[M, K] x [N, K]^T`` product.

    Fitted to an H100 SXM sweep (132 SMs; docs/results/gemv-h100.md):

    * M == 1: FMA path, 2 rows x 1024 K per step with 4 warps (each thread one
      16-byte load per row per step), register double buffering. Thousands of
      small programs keep enough loads in flight; split-K lost on every
      Llama/Qwen shape, so it is only used when N is tiny.
    * M >= 2: tensor-core path, 64 weight rows x 128 K per step, 6-deep
      cp.async pipeline, M padded to 16 or 32. Split-K only when the N tiles
      cannot cover a quarter of the SMs (4096 rows = 64 tiles ran fastest
      unsplit).
    """
    elem = torch.finfo(dtype).bits // 8
    vec = 16 // elem  # elements per 16-byte load
    if M == 1:
        num_warps = 4
        block_k = vec * 32 * num_warps
        block_n = 2
        tiles = -(-N // block_n)
        split = _split_for(tiles, K, block_k, num_sms)
        return GemvConfig(1, block_n, block_k, split, False, num_warps, 1, prefetch=True, fold=True)
    block_m = 16 if M <= 16 else 32
    block_n = 64
    block_k = 128
    m_tiles = -(-M // block_m)
    tiles = -(-N // block_n) * m_tiles
    split = _split_for(tiles, K, block_k, num_sms // 4)
    return GemvConfig(block_m, block_n, block_k, split, use_dot=True, num_warps=4, num_stages=6)


def _fit_config(cfg: GemvConfig, M: int, N: int, K: int) -> GemvConfig:
    """Shrink a config to a small problem (blocks no larger than needed) and
    clamp split_k so no split is empty."""
    block_k = max(16, min(cfg.block_k, _next_pow2(K)))
    block_n = min(cfg.block_n, max(16 if cfg.use_dot else 1, _next_pow2(N)))
    # The FMA path takes one row of x per program (more rows go to more
    # programs, each re-reading w: use the dot path for M > 1).
    block_m = cfg.block_m if cfg.use_dot else 1
    split = max(1, min(cfg.split_k, -(-K // block_k)))
    return replace(cfg, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split)


@dataclass(frozen=True)
class _Plan:
    grid: tuple
    k_per_split: int
    split: int
    ws_elems: int
    counters: int
    meta: dict = field(hash=False, compare=False)


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, K: int, config: GemvConfig, ieee: bool, has_bias: bool) -> _Plan:
    """Everything about a launch that depends only on shapes and config
    (cached: the Python launch path is on the critical path of eager decode)."""
    cfg = _fit_config(config, M, N, K)
    n_tiles = -(-N // cfg.block_n)
    m_tiles = -(-M // cfg.block_m)
    # Each split covers whole BLOCK_K steps; recount so that none is empty.
    k_per_split = -(-(-(-K // cfg.block_k)) // cfg.split_k) * cfg.block_k
    split = -(-K // k_per_split)
    meta = dict(
        HAS_BIAS=has_bias,
        USE_DOT=cfg.use_dot,
        IEEE=ieee,
        EVEN_K=K % k_per_split == 0,
        SPLIT=split > 1,
        PREFETCH=cfg.prefetch,
        FOLD=cfg.fold,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return _Plan(
        grid=(n_tiles, split, m_tiles),
        k_per_split=k_per_split,
        split=split,
        ws_elems=split * m_tiles * n_tiles * cfg.block_m * cfg.block_n,
        counters=m_tiles * n_tiles,
        meta=meta,
    )


# --------------------------------------------------------------------------
# Workspace (split-K partials + arrival counters), cached per device
# --------------------------------------------------------------------------


class GemvWorkspace:
    """fp32 partials and int32 arrival counters for split-K launches.

    Counters are zero between launches (the last program of each tile resets
    its counter), so one workspace can be reused by any number of launches
    that run one after another on a stream, including inside a CUDA graph.
    """

    def __init__(self, device: torch.device, partial_elems: int = 0, counters: int = 0):
        self.device = torch.device(device)
        self.partials = torch.empty(max(partial_elems, 1), dtype=torch.float32, device=self.device)
        self.counters = torch.zeros(max(counters, 1), dtype=torch.int32, device=self.device)

    def ensure(self, partial_elems: int, counters: int) -> None:
        if self.partials.numel() >= partial_elems and self.counters.numel() >= counters:
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "gemv workspace must grow while a CUDA graph is being captured; "
                "run each shape once before capturing (or pass a large enough workspace)"
            )
        if self.partials.numel() < partial_elems:
            self.partials = torch.empty(max(partial_elems, 2 * self.partials.numel()), dtype=torch.float32, device=self.device)
        if self.counters.numel() < counters:
            self.counters = torch.zeros(max(counters, 2 * self.counters.numel()), dtype=torch.int32, device=self.device)


_WORKSPACES: dict[torch.device, GemvWorkspace] = {}


def _workspace_for(device: torch.device) -> GemvWorkspace:
    ws = _WORKSPACES.get(device)
    if ws is None:
        ws = _WORKSPACES[device] = GemvWorkspace(device)
    return ws


# --------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def gemv_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    config: GemvConfig | None = None,
    workspace: GemvWorkspace | None = None,
    compile_only: bool = False,
) -> torch.Tensor:
    """``out = x @ w.T + bias`` with the Triton kernel.

    Args:
        x: ``[M, K]`` fp16/bf16/fp32. Made contiguous if its last dim is not.
        w: ``[N, K]`` same dtype as ``x``, ``nn.Linear`` layout; its last dim
            should be contiguous (otherwise it is copied, which is slow).
        bias: optional ``[N]`` (any float dtype; added in fp32).
        out: optional ``[M, N]`` output in ``x.dtype`` with contiguous last
            dim; allocated if ``None``.
        config: launch configuration; :func:`pick_config` if ``None``.
        workspace: split-K workspace; a per-device cached one if ``None``.
        compile_only: compile (and cache) the kernel these arguments need
            without launching it; ``out`` is left unwritten. Under Triton's
            ``AsyncCompileMode`` this returns at once, so many configurations
            can be compiled in parallel.

    Returns:
        ``out`` (``[M, N]``, ``x.dtype``).
    """
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"gemv_triton expects x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    M, K = x.shape
    N, K2 = w.shape
    if K != K2:
        raise ValueError(f"inner dimensions differ: x {tuple(x.shape)} vs w {tuple(w.shape)}")
    if x.dtype not in _SUPPORTED or w.dtype != x.dtype:
        raise TypeError(f"gemv_triton needs x and w of one dtype in {_SUPPORTED}, got {x.dtype} and {w.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or (N > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be [{M}, {N}] {x.dtype} with contiguous rows, got {tuple(out.shape)} {out.dtype}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        if bias is None:
            out.zero_()
        else:
            out.copy_(bias.to(out.dtype).expand(M, N))
        return out

    if x.stride(1) != 1:
        x = x.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()

    if config is None:
        sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 132
        config = pick_config(M, N, K, x.dtype, sms)
    plan = _plan(M, N, K, config, x.dtype == torch.float32, bias is not None)

    if plan.split > 1:
        ws = workspace if workspace is not None else _workspace_for(x.device)
        ws.ensure(plan.ws_elems, plan.counters)
        ws_buf, cnt_buf = ws.partials, ws.counters
    else:
        ws_buf = cnt_buf = out  # unused
    args = (
        x, w, bias if bias is not None else out, out, ws_buf, cnt_buf,
        M, N, K,
        x.stride(0), w.stride(0), out.stride(0),
        plan.k_per_split, plan.split,
    )
    if compile_only:
        _gemv_kernel.warmup(*args, grid=plan.grid, **plan.meta)
    else:
        _gemv_kernel[plan.grid](*args, **plan.meta)
    return out
