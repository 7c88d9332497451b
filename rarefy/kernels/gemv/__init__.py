"""Skinny GEMM / GEMV for decode: ``out = x @ w.T + bias`` with few rows in ``x``.

Public API
----------
``gemv(x, w, bias=None)``
    ``x``: ``[..., K]`` activations (the leading dims flatten to ``M`` rows);
    ``w``: ``[N, K]`` weight in ``nn.Linear`` layout (row ``n`` holds output
    ``n``'s input weights), last dim contiguous; ``bias``: ``[N]`` or ``None``.
    Returns ``[..., N]`` in ``x.dtype``. Same contract as
    ``torch.nn.functional.linear``.

    Runs the Triton kernel (:func:`rarefy.kernels.gemv.triton.gemv_triton`)
    when Triton and a CUDA device are available, ``x``/``w`` are CUDA fp16 or
    bf16 of one dtype, ``M <= 32`` and ``w``'s rows are contiguous; otherwise
    it calls ``torch.nn.functional.linear`` (cuBLAS on GPU), which is the
    better choice for larger ``M`` anyway.

``triton_available()``
    Whether Triton can be imported and a CUDA device is present.

``gemv_ref(x, w, bias=None)``
    Upcast PyTorch reference for tests (``rarefy.kernels.gemv.ref``).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from .ref import gemv_ref

__all__ = ["MAX_M", "gemv", "gemv_ref", "triton_available"]

#: Largest number of activation rows routed to the Triton kernel.
MAX_M = 32

_TRITON_DTYPES = (torch.float16, torch.bfloat16)


# Decided once at import: torch.compile must not trace the import machinery.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton is importable and a CUDA device is visible."""
    try:
        return _HAS_TRITON and torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken CUDA setups
        return False


@functools.lru_cache(maxsize=None)
def _triton_impl():
    from .triton import gemv_triton

    return gemv_triton


# A custom op, so torch.compile treats the Triton launcher (plan caches,
# workspaces) as one opaque call instead of tracing into it.
@torch.library.custom_op("rarefy::gemv_triton", mutates_args=())
def _gemv_op(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _triton_impl()(x2, w, bias)


@_gemv_op.register_fake
def _(x2, w, bias):
    return x2.new_empty(x2.shape[0], w.shape[0])


def _use_triton(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x2.is_cuda
        and x2.dtype in _TRITON_DTYPES
        and w.dtype == x2.dtype
        and w.device == x2.device
        and w.dim() == 2
        and 1 <= x2.shape[0] <= MAX_M
        and w.shape[1] == x2.shape[1]
        and x2.shape[1] > 0
        and w.stride(1) == 1
        and (bias is None or (bias.device == x2.device and bias.shape == (w.shape[0],)))
        and _HAS_TRITON
    )


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for decode-sized ``x``.

    Args:
        x: ``[..., K]`` fp16/bf16 (other dtypes go to PyTorch).
        w: ``[N, K]``, ``nn.Linear`` layout, same dtype and device as ``x``.
        bias: optional ``[N]``.

    Returns:
        ``[..., N]`` tensor in ``x.dtype``.
    """
    if x.dim() >= 1 and x.numel() > 0:
        x2 = x.reshape(-1, x.shape[-1])
        if _use_triton(x2, w, bias):
            out = _gemv_op(x2, w, bias)
            return out.reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)
