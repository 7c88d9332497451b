"""Plain PyTorch references for the low-bit matmuls (tests, benchmark, CPU fallback).

Everything is upcast (float64 by default) so the references' own rounding is far below
what the fast kernels are held to. The CPU fallback of the public API calls these with
``compute_dtype=torch.float32``.

Semantics (docs/lowbit-formats.md has the storage layouts):

* ternary: ``y = x @ (Q * s)^T`` with ``Q`` unpacked from layout v1 and ``s`` one scale
  per tensor or one per (output row, group of ``group_size`` input columns);
* int8: ``y = x @ (Q * s)^T`` with ``s`` per output row or per (row, group);
* ternary with int8 activations (BitNet b1.58's W1.58A8): per token (row of ``x``)
  ``x_scale = max|x| / 127`` (``max|x|`` clamped to 1e-5 first) and
  ``x_q = clamp(round(x / x_scale), -128, 127)`` (round half to even), then
  ``y = x_scale * (x_q @ (Q * s)^T)`` -- the integer products are exact.
"""

from __future__ import annotations

import torch

from rarefy.lowbit.ternary import unpack_ternary

#: BitNet's clamp on the per-token absmax before dividing by it.
ACT_EPS = 1e-5


def _expand_scale(scale: torch.Tensor, n: int, k: int, group_size: int, dtype) -> torch.Tensor:
    """[N, K // group_size] scales -> [N, K] (each repeated over its group)."""
    return scale.to(dtype).reshape(n, k // group_size).repeat_interleave(group_size, dim=1)


def ternary_weight_ref(packed: torch.Tensor, scale: torch.Tensor, k: int, group_size: int | None = None,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dequantized ternary weight ``Q * s`` as ``[N, K]`` in `dtype`."""
    q = unpack_ternary(packed, k).to(dtype)
    if group_size is None:
        return q * scale.to(dtype).reshape(1, 1)
    return q * _expand_scale(scale, q.shape[0], k, group_size, dtype)


def int8_weight_ref(qweight: torch.Tensor, scale: torch.Tensor, group_size: int | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dequantized int8 weight ``Q * s`` as ``[N, K]`` in `dtype` (per channel: scale ``[N]``/``[N, 1]``)."""
    n, k = qweight.shape
    q = qweight.to(dtype)
    if group_size is None:
        return q * scale.to(dtype).reshape(n, 1)
    return q * _expand_scale(scale, n, k, group_size, dtype)


def quantize_act_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization: ``(x_q int8 [M, K], x_scale fp32 [M])``,
    ``x ~= x_q * x_scale`` (BitNet b1.58's activation quantization, computed in fp32)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1).clamp(min=ACT_EPS)
    inv = 127.0 / amax
    xq = (xf * inv.unsqueeze(-1)).round().clamp(-128, 127).to(torch.int8)
    return xq, amax / 127.0


def dp4a_order(xq: torch.Tensor) -> torch.Tensor:
    """Natural-order int8 ``[M, K]`` (``K % 16 == 0``) -> the order the dp4a kernel reads: each
    group of 16 stored transposed as a 4 x 4 block (byte ``16 g + 4 t + i`` holds element
    ``16 g + 4 i + t``)."""
    m, k = xq.shape
    return xq.reshape(m, k // 16, 4, 4).transpose(-1, -2).reshape(m, k).contiguous()


def quantize_act_dp4a_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_act_int8_ref` in the dp4a order, in plain torch ops (so that
    torch.compile can fuse it into the kernel that produces ``x``)."""
    xq, xs = quantize_act_int8_ref(x)
    return dp4a_order(xq), xs


def ternary_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int | None = None,
                       *, out_dtype: torch.dtype | None = None,
                       compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x [M, K] @ (Q * s)^T`` -> ``[M, N]`` in `out_dtype` (default ``x.dtype``)."""
    k = x.shape[-1]
    w = ternary_weight_ref(packed, scale, k, group_size, compute_dtype)
    return (x.to(compute_dtype) @ w.t()).to(out_dtype or x.dtype)


def int8_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, group_size: int | None = None,
                    *, out_dtype: torch.dtype | None = None,
                    compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``x [M, K] @ (Q * s)^T`` -> ``[M, N]`` in `out_dtype` (default ``x.dtype``)."""
    w = int8_weight_ref(qweight, scale, group_size, compute_dtype)
    return (x.to(compute_dtype) @ w.t()).to(out_dtype or x.dtype)


def ternary_matmul_int8act_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                               group_size: int | None = None, *, x_scale: torch.Tensor | None = None,
                               out_dtype: torch.dtype | None = None,
                               compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W1.58A8: quantize ``x`` per token (unless it is already int8 with `x_scale`), then
    ``x_scale * (x_q @ (Q * s)^T)``. Default `out_dtype`: ``x.dtype`` for float ``x``,
    float32 for int8 ``x``."""
    if x.dtype == torch.int8:
        if x_scale is None:
            raise ValueError("int8 activations need x_scale")
        xq, xs = x, x_scale.reshape(-1).float()
        default = torch.float32
    else:
        xq, xs = quantize_act_int8_ref(x)
        default = x.dtype
    k = xq.shape[-1]
    w = ternary_weight_ref(packed, scale, k, group_size, compute_dtype)
    y = (xq.to(compute_dtype) @ w.t()) * xs.to(compute_dtype).unsqueeze(-1)
    return y.to(out_dtype or default)
