"""Triton input-sparse ternary GEMV (batch 1 decode): ``y = s * xm @ Q.T (+ bias)``,
xm = x where ``|x| >= threshold`` else 0, Q in {-1, 0, +1} in the transposed layout T1
(``wt`` uint8 [K, ceil(N/4)], four outputs of one input per byte; docs/lowbit-formats.md).

Each program owns BLOCK_N outputs (BLOCK_N/4 bytes of every weight row) and a slice of the
inputs (SPLIT_K slices, each a whole number of BLOCK_K steps). Per step it loads BLOCK_K
activations, computes their mask in registers, and loads the [BLOCK_K, BLOCK_N/4] byte tile
only for active rows (a masked load: an inactive row's bytes are not fetched when they fill
whole 32-byte sectors, i.e. BLOCK_N >= 128). Codes are unpacked with a shift and a mask
(output 4p + j is bits 2j..2j+1 of byte p), multiplied by the activation in fp32 and summed
over the step. SPLIT_K > 1 writes fp32 partials [SPLIT_K, N] summed in a fixed order
afterwards (deterministic; no atomics). Activations fp16 / bf16 / fp32, fp32 accumulation,
output in x.dtype.

Launch parameters: ``TernarySparseConfig`` (block_n, block_k, split_k, num_warps, num_stages).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["TernarySparseConfig", "ternary_input_sparse_triton", "default_config"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TernarySparseConfig:
    """BLOCK_N outputs per program (a multiple of 4; >= 128 lets inactive rows skip whole
    sectors), BLOCK_K inputs per step, SPLIT_K input slices (programs along K)."""

    block_n: int = 256
    block_k: int = 32
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _ternary_input_sparse_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    N, K, Nb, threshold, K_PER_SPLIT,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    byte = offs_n // 4
    shift = (offs_n % 4) * 2
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xv = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        act = tl.abs(xv) >= threshold  # NaN: False
        xm = tl.where(act, xv, 0.0)
        b = tl.load(w_ptr + offs_k.to(tl.int64)[:, None] * Nb + byte[None, :],
                    mask=(act & k_ok)[:, None] & n_ok[None, :], other=0x55)  # 0x55: four zeros
        q = ((b.to(tl.int32) >> shift[None, :]) & 3).to(tl.float32) - 1.0
        acc += tl.sum(q * xm[:, None], axis=0)
    if SPLIT:
        tl.store(y_ptr + pid_k * N + offs_n, acc, mask=n_ok)
    else:
        res = acc * tl.load(s_ptr).to(tl.float32)
        if HAS_BIAS:
            res += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, res.to(y_ptr.dtype.element_ty), mask=n_ok)


def default_config(n: int, k: int) -> TernarySparseConfig:
    """Enough programs to fill a large GPU (~2 x 132 SMs) at batch 1; the sweep refits these."""
    block_n = 256 if n >= 2048 else 128
    programs = triton.cdiv(n, block_n)
    split = max(1, min(16, 264 // max(1, programs), triton.cdiv(k, 256)))
    return TernarySparseConfig(block_n=block_n, block_k=32, split_k=split)


def ternary_input_sparse_triton(x: torch.Tensor, wt: torch.Tensor, scale: torch.Tensor, n: int, threshold: float,
                                bias: torch.Tensor | None = None, *,
                                config: TernarySparseConfig | None = None) -> torch.Tensor:
    """x [1, K] (or [K]) fp16/bf16/fp32 -> y [1, N] in x.dtype; ``wt`` uint8 [K, ceil(n/4)]
    (layout T1), ``scale`` one value (per-tensor), bias [n] or None; all on x's device."""
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"ternary_input_sparse_triton takes one token, x [1, K]; got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    k = x.shape[1]
    nb = (n + 3) // 4
    if wt.dtype != torch.uint8 or wt.dim() != 2 or tuple(wt.shape) != (k, nb) or not wt.is_contiguous():
        raise ValueError(f"wt must be contiguous uint8 [K, ceil(n/4)] = [{k}, {nb}], got {wt.dtype} {tuple(wt.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"scale must be one value (per-tensor), got shape {tuple(scale.shape)}")
    t = float(threshold)
    if math.isnan(t) or t < 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    cfg = config or default_config(n, k)
    if cfg.block_n % 4 or cfg.block_n & (cfg.block_n - 1) or cfg.block_k & (cfg.block_k - 1) or cfg.split_k < 1:
        raise ValueError(f"block_n (a power of two, multiple of 4), block_k (a power of two) and split_k >= 1 "
                         f"needed, got {cfg}")
    x = x.contiguous()
    y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    if n == 0:
        return y
    steps = max(1, triton.cdiv(k, cfg.block_k))
    split = min(cfg.split_k, steps)
    k_per = triton.cdiv(steps, split) * cfg.block_k
    split = triton.cdiv(max(k, 1), k_per)
    grid = (triton.cdiv(n, cfg.block_n), split)
    s = scale.reshape(1).to(torch.float32)
    if split == 1:
        _ternary_input_sparse_kernel[grid](
            x, wt, s, bias if bias is not None else s, y, n, k, nb, t, k_per,
            HAS_BIAS=bias is not None, SPLIT=False, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y
    part = torch.empty(split, n, device=x.device, dtype=torch.float32)
    _ternary_input_sparse_kernel[grid](
        x, wt, s, s, part, n, k, nb, t, k_per,
        HAS_BIAS=False, SPLIT=True, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = part.sum(0, keepdim=True) * s
    if bias is not None:
        out = out + bias.float()
    return y.copy_(out)
