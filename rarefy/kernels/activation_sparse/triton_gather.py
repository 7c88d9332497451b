"""Input-sparse GEMV that visits only the active rows (batch 1), for the GPU.

The predicated kernel (triton.py) walks every row of its K chunk and pays the x load,
the test and the dependent weight load even for rows it skips, so its time hardly falls
with sparsity (docs/results/activation-gpu.md). Here each program first compacts its
chunk: it loads the chunk's x once, computes the mask from the threshold, and writes the
active row indices and their x values, in order, to a small scratch (a prefix sum gives
each active row its slot). It then loops over the active rows only, gathering whole
weight-row segments (contiguous ``BLOCK_N`` columns), ``BLOCK_K`` rows a step.

Every program of one K chunk computes the same compaction and writes the same values to
the chunk's scratch, so the races are benign; each program reads back only after its own
barrier. Split-K reduction and GLU epilogue: the shared ``_epilogue`` of triton.py.

The loop is run by Triton's software pipeliner with ``stages`` stages (``tl.range(num_stages=)``:
the index and x loads, then the weight rows they address, as 16-byte asynchronous copies several
steps ahead). It replaced a hand-pipelined loop with one step of weights in flight, which the
pipelined one beat on every Llama-3-8B shape (H100, docs/results/activation-gpu.md, ninth session).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rarefy.kernels.activation_sparse.triton import _epilogue
from rarefy.kernels.gemv.triton import GemvWorkspace, _workspace_for


@dataclass(frozen=True)
class GatherConfig:
    chunk: int = 512   # K rows compacted per program (power of two)
    block_n: int = 128
    block_k: int = 16  # active rows per step
    num_warps: int = 4
    stages: int = 3  # software-pipeline stages of the row loop


@triton.jit
def _gather_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, scr_idx, scr_x,
    N, K, threshold, stride_wk, n_glu,
    HAS_BIAS: tl.constexpr, GLU: tl.constexpr, SPLIT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles = tl.num_programs(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # no clamp when N fills the tiles: a clamp hides the columns' contiguity (2-byte loads)
    cols = offs_n if EVEN_N else tl.where(offs_n < N, offs_n, N - 1)
    k0 = pid_k * CHUNK

    # Compact the chunk's active rows into its scratch (same values from every program).
    ks = k0 + tl.arange(0, CHUNK)
    xk = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    keep = (tl.abs(xk) >= threshold) & (ks < K)
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    count = tl.sum(keep.to(tl.int32), axis=0)
    idx_ptr = scr_idx + pid_k * CHUNK
    xv_ptr = scr_x + pid_k * CHUNK
    tl.store(idx_ptr + pos, ks, mask=keep)
    tl.store(xv_ptr + pos, xk, mask=keep)
    tl.debug_barrier()

    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    if GLU:
        acc_u = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    # 1-D index and x loads (a broadcast load in the tile's layout would be copied BLOCK_N
    # times over by the pipeliner's asynchronous copies)
    for j in tl.range(0, count, BLOCK_K, num_stages=STAGES):
        r = j + tl.arange(0, BLOCK_K)
        ok_r = r < count
        idx_j = tl.load(idx_ptr + r, mask=ok_r, other=0)
        x_j = tl.load(xv_ptr + r, mask=ok_r, other=0.0)[:, None]
        ptr_j = w_ptr + idx_j.to(tl.int64)[:, None] * stride_wk + cols[None, :]
        ok_j = ok_r[:, None] & (cols[None, :] >= 0)
        acc += tl.load(ptr_j, mask=ok_j, other=0.0).to(tl.float32) * x_j
        if GLU:
            acc_u += tl.load(ptr_j + n_glu, mask=ok_j, other=0.0).to(tl.float32) * x_j

    res = tl.sum(acc, axis=0)[None, :]
    res_u = res
    if GLU:
        res_u = tl.sum(acc_u, axis=0)[None, :]
    offs_m = tl.arange(0, 1)
    _epilogue(res, res_u, ws_ptr, cnt_ptr, b_ptr, out_ptr, offs_m, offs_n, pid_n, pid_k, 0,
              n_tiles, 1, 1, N, 0, HAS_BIAS, GLU, SPLIT, 1, BLOCK_N)


_SCRATCH: dict = {}


def _scratch(device: torch.device, n: int):
    buf = _SCRATCH.get(device)
    if buf is None or buf[0].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("gather scratch must grow outside CUDA graph capture; call each shape once first")
        buf = _SCRATCH[device] = (torch.empty(n, dtype=torch.int32, device=device),
                                  torch.empty(n, dtype=torch.float32, device=device))
    return buf


@functools.lru_cache(maxsize=1024)
def pick_gather_config(N: int, K: int) -> GatherConfig:
    """Fitted to the H100 sweep of the ninth session (benchmarks/gpu_activation_probe.py --gather,
    Llama-3-8B shapes at 50%): Triton's pipeliner with 32 rows a step and 4 warps; larger chunks
    and tiles for the large matrices (gate/up 2x14336 wide, down 14336 deep)."""
    big = max(N, K) >= 8192
    return GatherConfig(chunk=2048 if big else 1024, block_n=256 if N >= 8192 else 128, block_k=32,
                        num_warps=4, stages=4 if big else 3)


def input_sparse_gemv_gather(x: torch.Tensor, wt: torch.Tensor, threshold: float,
                             bias: torch.Tensor | None = None, *, glu: bool = False,
                             config: GatherConfig | None = None,
                             workspace: GemvWorkspace | None = None) -> torch.Tensor:
    """Batch-1 ``(x * (|x| >= threshold)) @ wt + bias`` (GLU: ``silu(g) * u``); x: [1, K] or [K]."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] != 1 or wt.dim() != 2 or x.shape[1] != wt.shape[0]:
        raise ValueError(f"expected x [1, K] and wt [K, N], got {tuple(x.shape)} and {tuple(wt.shape)}")
    if wt.dtype != x.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x and wt must share one float dtype, got {x.dtype} and {wt.dtype}")
    K, n_total = wt.shape
    if glu and n_total % 2:
        raise ValueError(f"GLU weight needs an even number of columns, got {n_total}")
    N = n_total // 2 if glu else n_total
    if bias is not None and (glu or bias.shape != (N,)):
        raise ValueError("bias must be [N] and is not supported with glu")
    cfg = config or pick_gather_config(N, K)
    if cfg.stages < 1:
        raise ValueError(f"the gather kernel needs at least one pipeline stage, got {cfg.stages}")
    out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    x = x.contiguous()
    if wt.stride(1) != 1:
        wt = wt.contiguous()
    chunk = min(cfg.chunk, max(16, 1 << (K - 1).bit_length()))
    block_n = min(cfg.block_n, max(16, 1 << (N - 1).bit_length()))
    n_tiles, split = -(-N // block_n), -(-K // chunk)
    idx, xv = _scratch(x.device, split * chunk)
    if split > 1:
        ws = workspace if workspace is not None else _workspace_for(x.device)
        ws.ensure(split * n_tiles * block_n * (2 if glu else 1), n_tiles)
        ws_buf, cnt_buf = ws.partials, ws.counters
    else:
        ws_buf = cnt_buf = out
    _gather_kernel[(n_tiles, split)](
        x, wt, bias if bias is not None else out, out, ws_buf, cnt_buf, idx, xv,
        N, K, float(threshold), wt.stride(0), N if glu else 0,
        HAS_BIAS=bias is not None, GLU=glu, SPLIT=split, CHUNK=chunk, BLOCK_N=block_n,
        BLOCK_K=cfg.block_k, EVEN_N=N % block_n == 0, STAGES=cfg.stages, num_warps=cfg.num_warps)
    return out
