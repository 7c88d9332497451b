"""Fused dequantize-and-multiply for low-bit weights kept packed: ternary (BitNet b1.58,
layout v1, 2 bits a weight) and weight-only int8. Decode-sized: ``x`` has 1..32 rows.

Public API
----------
``ternary_matmul(x, packed, scale, group_size=None, out_dtype=None) -> y``
    ``x [..., K]`` bf16/fp16/fp32, ``packed`` uint8 ``[N, ceil(K/4)]`` (layout v1,
    ``rarefy.lowbit.ternary``), ``scale`` one element (per tensor: 0-d, ``[1]``, ``[1, 1]``)
    or ``[N, K // group_size]`` (fp16/fp32). ``y [..., N] = x @ (Q * s)^T`` in `out_dtype`
    (default ``x.dtype``).

``int8_matmul(x, qweight, scale, group_size=None, out_dtype=None) -> y``
    ``qweight`` int8 ``[N, K]``, ``scale`` ``[N]`` / ``[N, 1]`` per output channel or
    ``[N, K // group_size]`` (``rarefy.lowbit.int8``).

``ternary_matmul_int8act(x, packed, scale, group_size=None, out_dtype=None, *, x_scale=None) -> y``
    BitNet b1.58's W1.58A8: float ``x`` is quantized per token to int8
    (``x_q = clamp(round(x * 127 / max|x|), -128, 127)``, ``max|x|`` clamped to 1e-5) and
    multiplied with integer accumulation, ``y = x_scale * (x_q @ (Q * s)^T)`` with
    ``x_scale = max|x| / 127``. Pass int8 ``x`` with its ``x_scale [M]`` to skip the
    quantization (default `out_dtype` then float32). On the GPU, float ``x`` of at most
    ``DP4A_MAX_M`` rows with a per-tensor scale (K % 16 == 0) goes to the dp4a kernel
    (``triton_ternary_dp4a``: quantized into its byte order, four products an instruction,
    int32 sums); other cases run the products on tensor cores (exact integer sums);
    elsewhere in fp32, which is exact for ``K < 2^17`` (every partial sum is an integer
    below 2^24).

``quantize_act_int8(x) -> (x_q, x_scale)``
    The per-token quantization alone (one Triton launch on the GPU).

Dispatch: CUDA tensors with Triton available and at most ``MAX_M`` (32) rows go to the
Triton kernels (``rarefy.kernels.lowbit_gemv.triton_ternary`` / ``triton_int8``); larger
batches on the GPU dequantize and call cuBLAS; on the CPU (or without Triton) the
weights are unpacked and multiplied in fp32 (the fast CPU kernels live in
``rarefy.kernels.lowbit_cpu``). Bad input raises ``RarefyError``.

Design, tests and expected H100 figures: docs/lowbit-kernels.md.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from rarefy.errors import RarefyError
from rarefy.lowbit import int8 as _int8
from rarefy.lowbit import ternary as _ternary

from .plan import (
    MAX_M,
    Int8Config,
    TernaryConfig,
    pick_int8_config,
    pick_ternary_config,
)
from .ref import (
    int8_matmul_ref,
    quantize_act_dp4a_ref,
    quantize_act_int8_ref,
    ternary_matmul_int8act_ref,
    ternary_matmul_ref,
    ternary_weight_ref,
)

__all__ = [
    "MAX_M", "Int8Config", "TernaryConfig", "int8_matmul", "int8_matmul_ref", "pick_int8_config",
    "pick_ternary_config", "quantize_act_int8", "ternary_matmul", "ternary_matmul_int8act",
    "ternary_matmul_int8act_ref", "ternary_matmul_ref", "triton_available",
]

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
#: float x with at most this many rows takes the dp4a kernel in ternary_matmul_int8act (GPU)
DP4A_MAX_M = 4
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton is importable and a CUDA device is visible."""
    try:
        return _HAS_TRITON and torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken CUDA setups
        return False


@functools.cache
def _tern():
    from . import triton_ternary

    return triton_ternary


@functools.cache
def _i8():
    from . import triton_int8

    return triton_int8


# ----------------------------------------------------------------------------- validation


def _name(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_x(x, allow_int8: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise RarefyError(f"x must be a tensor, got {type(x).__name__}")
    ok = _FLOATS + ((torch.int8,) if allow_int8 else ())
    if x.dtype not in ok:
        raise RarefyError(f"x must be bf16, fp16 or fp32{' (or int8 with x_scale)' if allow_int8 else ''}, "
                          f"got {x.dtype}")
    if x.dim() < 1:
        raise RarefyError("x must have at least one dimension (the K dimension last)")


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise RarefyError(f"out_dtype must be bf16, fp16 or fp32, got {out_dtype}")


def _check_device(x, *ts) -> None:
    for t in ts:
        if t.device != x.device:
            raise RarefyError(f"x is on {x.device} but a weight tensor is on {t.device}; move them to one device")


def _check_scale(scale, n: int, k: int, group_size: int | None, per_channel: bool, what: str) -> None:
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise RarefyError(f"{what} scale must be a float tensor, got {_name(scale)}")
    if group_size is None:
        if per_channel:
            if scale.numel() != n or scale.dim() > 2 or (scale.dim() == 2 and scale.shape[1] != 1):
                raise RarefyError(f"{what} per-channel scale must be [{n}] or [{n}, 1], got {tuple(scale.shape)} "
                                  "(pass group_size for per-group scales)")
        elif scale.numel() != 1:
            raise RarefyError(f"{what} per-tensor scale must have one element, got {tuple(scale.shape)} "
                              "(pass group_size for per-group scales)")
        return
    want = (n, k // group_size)
    if tuple(scale.shape) != want:
        raise RarefyError(f"{what} per-group scale must be [{want[0]}, {want[1]}] for group size {group_size}, "
                          f"got {tuple(scale.shape)}")


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _validate_ternary(x, packed, scale, group_size, out_dtype, allow_int8=False) -> tuple[int, int]:
    _check_x(x, allow_int8)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise RarefyError(f"packed ternary weight must be a 2-D uint8 tensor (layout v1), got {_name(packed)}")
    k = x.shape[-1]
    n = packed.shape[0]
    if packed.shape[1] != _ternary.packed_cols(k):
        raise RarefyError(f"packed ternary weight has {packed.shape[1]} bytes per row but x has K = {k} "
                          f"(needs ceil(K/4) = {_ternary.packed_cols(k)})")
    try:
        _ternary.check_group_size(k, group_size)
    except RarefyError as e:
        raise RarefyError(f"ternary matmul: {e}") from None
    _check_scale(scale, n, k, group_size, False, "ternary")
    _check_out_dtype(out_dtype)
    _check_device(x, packed, scale)
    return n, k


def _validate_int8(x, qweight, scale, group_size, out_dtype) -> tuple[int, int]:
    _check_x(x)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise RarefyError(f"int8 weight must be a 2-D int8 tensor [N, K], got {_name(qweight)}")
    k = x.shape[-1]
    n = qweight.shape[0]
    if qweight.shape[1] != k:
        raise RarefyError(f"int8 weight is [{n}, {qweight.shape[1]}] but x has K = {k}")
    try:
        _int8.check_group_size(k, group_size)
    except RarefyError as e:
        raise RarefyError(f"int8 matmul: {e}") from None
    _check_scale(scale, n, k, group_size, True, "int8")
    _check_out_dtype(out_dtype)
    _check_device(x, qweight, scale)
    return n, k


def _use_triton(x2: torch.Tensor) -> bool:
    return x2.is_cuda and _HAS_TRITON and 1 <= x2.shape[0] <= MAX_M and x2.shape[1] > 0


# ----------------------------------------------------------------------------- custom ops
# Opaque to torch.compile: the launchers keep plan caches and workspaces.


def _dt(code: int) -> torch.dtype:
    return _FLOATS[code]


def _code(dtype: torch.dtype) -> int:
    return _FLOATS.index(dtype)


@torch.library.custom_op("rarefy::lowbit_ternary_matmul", mutates_args=())
def _ternary_op(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                out_code: int, x_scale: torch.Tensor | None) -> torch.Tensor:
    return _tern().ternary_triton(x2, packed, scale, group_size or None, x_scale=x_scale, out_dtype=_dt(out_code))


@_ternary_op.register_fake
def _(x2, packed, scale, group_size, out_code, x_scale):
    return x2.new_empty((x2.shape[0], packed.shape[0]), dtype=_dt(out_code))


@torch.library.custom_op("rarefy::lowbit_int8_matmul", mutates_args=())
def _int8_op(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, group_size: int,
             out_code: int) -> torch.Tensor:
    return _i8().int8_triton(x2, qweight, scale, group_size or None, out_dtype=_dt(out_code))


@_int8_op.register_fake
def _(x2, qweight, scale, group_size, out_code):
    return x2.new_empty((x2.shape[0], qweight.shape[0]), dtype=_dt(out_code))


@torch.library.custom_op("rarefy::lowbit_ternary_dp4a", mutates_args=())
def _dp4a_op(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_code: int) -> torch.Tensor:
    from .triton_ternary_dp4a import quantize_act_dp4a, ternary_dp4a_triton
    xq, xs = quantize_act_dp4a(x2)
    return ternary_dp4a_triton(xq, xs, packed, scale, out_dtype=_dt(out_code))


@_dp4a_op.register_fake
def _(x2, packed, scale, out_code):
    return x2.new_empty((x2.shape[0], packed.shape[0]), dtype=_dt(out_code))


@torch.library.custom_op("rarefy::lowbit_ternary_dp4a_q", mutates_args=())
def _dp4a_q_op(xq: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
               out_code: int) -> torch.Tensor:
    from .triton_ternary_dp4a import ternary_dp4a_triton
    return ternary_dp4a_triton(xq, xs, packed, scale, out_dtype=_dt(out_code))


@_dp4a_q_op.register_fake
def _(xq, xs, packed, scale, out_code):
    return xq.new_empty((xq.shape[0], packed.shape[0]), dtype=_dt(out_code))


# Under torch.compile the dp4a route quantizes x with traced torch ops, which inductor fuses into
# the kernel that produces x (RMSNorm, SiLU * up): one launch less per projection input. Eager
# calls keep the single Triton quantization kernel. False: always the Triton kernel (A/B runs).
TRACED_DP4A_QUANT = True


def _dp4a_ok(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> bool:
    """The dp4a kernel takes float x with K % 16 == 0, a per-tensor or per-row scale and few rows (one x
    row per program: beyond DP4A_MAX_M the weights would be re-read too often)."""
    k = x2.shape[1]
    per_tensor = group_size is None and scale.numel() == 1
    per_row = group_size == k and scale.numel() == packed.shape[0]  # stacked q/k/v, gate/up
    return (per_tensor or per_row) and k % 16 == 0 and packed.shape[1] * 4 == k and x2.shape[0] <= DP4A_MAX_M


@torch.library.custom_op("rarefy::lowbit_quantize_act_int8", mutates_args=())
def _quant_op(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _tern().quantize_act_triton(x2)


@_quant_op.register_fake
def _(x2):
    return x2.new_empty(x2.shape, dtype=torch.int8), x2.new_empty((x2.shape[0],), dtype=torch.float32)


# ----------------------------------------------------------------------------- public API


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int | None = None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [..., K] @ (Q * s)^T -> [..., N]`` with ternary ``Q`` packed in layout v1.

    Args:
        x: bf16/fp16/fp32 activations, K last.
        packed: uint8 ``[N, ceil(K/4)]`` (``rarefy.lowbit.ternary.pack_ternary``).
        scale: per tensor (one element) or ``[N, K // group_size]``; fp16/fp32.
        group_size: None (per tensor) or the group size of the scales.
        out_dtype: result dtype (default ``x.dtype``).
    """
    n, k = _validate_ternary(x, packed, scale, group_size, out_dtype)
    od = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = _flatten(x)
    if x2.shape[0] == 0 or n == 0:
        return x.new_zeros((*lead, n), dtype=od)
    if _use_triton(x2):
        y = _ternary_op(x2, packed, scale, group_size or 0, _code(od), None)
    elif x2.is_cuda:
        w = ternary_weight_ref(packed, scale, k, group_size, x.dtype)
        y = F.linear(x2, w).to(od)
    else:
        y = ternary_matmul_ref(x2, packed, scale, group_size, out_dtype=od, compute_dtype=torch.float32)
    return y.reshape(*lead, n)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, group_size: int | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [..., K] @ (Q * s)^T -> [..., N]`` with int8 ``Q [N, K]``.

    Args:
        x: bf16/fp16/fp32 activations, K last.
        qweight: int8 ``[N, K]`` (``rarefy.lowbit.int8.quantize_int8``).
        scale: ``[N]`` / ``[N, 1]`` per output channel, or ``[N, K // group_size]``.
        group_size: None (per channel) or the group size of the scales.
        out_dtype: result dtype (default ``x.dtype``).
    """
    n, _ = _validate_int8(x, qweight, scale, group_size, out_dtype)
    od = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = _flatten(x)
    if x2.shape[0] == 0 or n == 0:
        return x.new_zeros((*lead, n), dtype=od)
    if _use_triton(x2):
        y = _int8_op(x2, qweight, scale, group_size or 0, _code(od))
    elif x2.is_cuda:
        from .ref import int8_weight_ref

        y = F.linear(x2, int8_weight_ref(qweight, scale, group_size, x.dtype)).to(od)
    else:
        y = int8_matmul_ref(x2, qweight, scale, group_size, out_dtype=od, compute_dtype=torch.float32)
    return y.reshape(*lead, n)


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization (BitNet b1.58): ``(x_q int8 [..., K], x_scale fp32 [...])``
    with ``x ~= x_q * x_scale``."""
    _check_x(x)
    lead = x.shape[:-1]
    x2 = _flatten(x)
    if x2.is_cuda and _HAS_TRITON and x2.shape[0] > 0 and x2.shape[1] > 0:
        xq, xs = _quant_op(x2)
    else:
        xq, xs = quantize_act_int8_ref(x2)
    return xq.reshape(x.shape), xs.reshape(lead)


def ternary_matmul_int8act(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                           group_size: int | None = None, out_dtype: torch.dtype | None = None, *,
                           x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W1.58A8: ``x_scale * (x_q @ (Q * s)^T)`` with per-token int8 activations.

    Args:
        x: float activations (quantized here), or int8 ``x_q`` with `x_scale`.
        packed, scale, group_size: as :func:`ternary_matmul`.
        out_dtype: result dtype (default ``x.dtype``; float32 for int8 ``x``).
        x_scale: ``[...]`` (one per row of ``x``) multipliers of int8 ``x``.
    """
    n, k = _validate_ternary(x, packed, scale, group_size, out_dtype, allow_int8=True)
    lead = x.shape[:-1]
    if x.dtype == torch.int8:
        if not isinstance(x_scale, torch.Tensor) or not x_scale.is_floating_point():
            raise RarefyError("int8 activations need x_scale (a float tensor, one multiplier per row)")
        m = 1
        for d in lead:
            m *= d
        if x_scale.numel() != m:
            raise RarefyError(f"x_scale must have one element per row of x ({m}), got {tuple(x_scale.shape)}")
        _check_device(x, x_scale)
        od = out_dtype or torch.float32
    else:
        if x_scale is not None:
            raise RarefyError("x_scale is only for int8 x (float x is quantized here)")
        od = out_dtype or x.dtype
    x2 = _flatten(x)
    if x2.shape[0] == 0 or n == 0:
        return x.new_zeros((*lead, n), dtype=od)
    if x.dtype != torch.int8 and _use_triton(x2) and _dp4a_ok(x2, packed, scale, group_size):
        # quantize into the dp4a order and multiply on the integer dot-product unit
        if TRACED_DP4A_QUANT and torch.compiler.is_compiling():
            xq, xs = quantize_act_dp4a_ref(x2)
            return _dp4a_q_op(xq, xs, packed, scale, _code(od)).reshape(*lead, n)
        return _dp4a_op(x2, packed, scale, _code(od)).reshape(*lead, n)
    if x.dtype == torch.int8:
        xq, xs = x2, x_scale.reshape(-1).float()
    elif x2.is_cuda and _HAS_TRITON:
        xq, xs = _quant_op(x2)
    else:
        xq, xs = quantize_act_int8_ref(x2)
    if _use_triton(x2):
        y = _ternary_op(xq, packed, scale, group_size or 0, _code(od), xs.contiguous())
    else:
        cd = torch.float32
        w = ternary_weight_ref(packed, scale, k, group_size, cd)
        y = ((xq.to(cd) @ w.t()) * xs.to(cd).unsqueeze(-1)).to(od)
    return y.reshape(*lead, n)
