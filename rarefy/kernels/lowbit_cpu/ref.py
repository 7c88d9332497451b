"""float64 references for the low-bit CPU kernels, and the kernels' activation quantization
mirrored in torch (the same fp32 operations, so the quantized values are identical).

Note: torch computes ``127.0 / amax`` as ``reciprocal(amax) * 127`` (two roundings); the
kernels do the same, so their int8 mode is ``fake_quant_int8_per_token`` bit for bit.

``*_ref(..., exact=False)`` computes with the activations as the kernel quantizes them, in
float64: the kernel must match it up to fp32 summation error. ``exact=True`` uses x itself:
the difference is the activation quantization error, bounded in ``act_error_bound``.
"""

from __future__ import annotations

import torch

from rarefy.formats import gguf_blocks
from rarefy.lowbit.int8 import dequantize_int8
from rarefy.lowbit.ternary import dequantize_ternary


def _bad_rows(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).all(-1, keepdim=True)


def act_fixed16(x: torch.Tensor) -> torch.Tensor:
    """The default activation mode: two int8 planes per row, x ~ (q1 + q2/254) * amax/127.
    float64 [M, K]; rows with NaN/inf come back NaN."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    t = x * s
    q1 = torch.round(t).clamp(-127, 127)
    q2 = torch.round((t - q1) * 254.0).clamp(-127, 127)
    d = torch.where(amax > 0, 1.0 / s.double(), torch.zeros_like(s, dtype=torch.float64))
    xh = (q1.double() + q2.double() / 254.0) * d
    return torch.where(_bad_rows(x), torch.full_like(xh, float("nan")), xh)


def act_int8(x: torch.Tensor) -> torch.Tensor:
    """BitNet's per-token int8 (= rarefy.layers.lowbit_linear.fake_quant_int8_per_token), float64."""
    x = x.float()
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xh = torch.round(x * s).clamp(-127, 127).double() / s.double()
    return torch.where(_bad_rows(x), torch.full_like(xh, float("nan")), xh)


def act_q8_blocks(x: torch.Tensor, act_quant: str | None = "int8") -> torch.Tensor:
    """GGUF kernels' activations, per block of 32: t = x * 127/amax, q1 = round(t), and with
    act_quant None also q2 = round((t - q1) * 254); x ~ (q1 [+ q2/254]) * amax/127. float64."""
    x = x.float()
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    t = xb * inv
    q = torch.round(t).clamp(-127, 127)
    qh = q.double()
    if act_quant is None:
        qh = qh + torch.round((t - q) * 254.0).clamp(-127, 127).double() / 254.0
    xh = (qh * (amax / 127.0).double()).reshape(m, k)
    return torch.where(_bad_rows(x), torch.full_like(xh, float("nan")), xh)


def act_error_bound(x: torch.Tensor, act_quant: str | None) -> torch.Tensor:
    """Per-element bound on |x - x_hat| (float64 [M, 1]), rounding of x * s included."""
    amax = x.double().abs().amax(-1, keepdim=True)
    if act_quant == "int8":
        return amax.clamp(min=1e-5) / 254.0 * (1 + 1e-6)
    return amax / 64516.0 * (1 + 1e-3) + amax * 2.0**-23


def _act(x: torch.Tensor, act_quant: str | None, exact: bool) -> torch.Tensor:
    if exact:
        return x.double()
    return act_int8(x) if act_quant == "int8" else act_fixed16(x)


def ternary_gemv_ref(x, packed, scale, group_size=None, *, act_quant=None, bias=None, exact=False):
    k = x.shape[-1]
    w = dequantize_ternary(packed, scale.float(), k, group_size, torch.float64)
    y = _act(x, act_quant, exact) @ w.t()
    return y + bias.double() if bias is not None else y


def int8_gemv_ref(x, qweight, scale, group_size=None, *, act_quant=None, bias=None, exact=False):
    w = dequantize_int8(qweight, scale.float(), group_size, torch.float64)
    y = _act(x, act_quant, exact) @ w.t()
    return y + bias.double() if bias is not None else y


def gguf_gemv_ref(x, blocks, qtype, shape, *, act_quant=None, bias=None, exact=False):
    w = gguf_blocks.dequantize(blocks, qtype, shape, torch.float64)
    xh = x.double() if exact else act_q8_blocks(x, act_quant)
    y = xh @ w.t()
    return y + bias.double() if bias is not None else y
