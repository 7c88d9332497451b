"""Weight-only int8, symmetric, per output channel or per group of input columns.

    s = max(|W_g|) / 127        per output row (group_size None) or per group of
                                `group_size` consecutive input columns of a row
    Q = clamp(round(W / s), -127, 127)     int8; -128 is never used (symmetric)
    W ~= Q * s

A row or group of zeros gets s = 1 (its Q is 0). Every element is off by at most
s / 2 (plus the rounding of s to the stored scale dtype): |W - Q*s| <= max|W_g| / 254.

Storage: `weight_int8` int8 [out, in] (row-major, HF layout) and `weight_scale`
float [out, in // group_size] ([out, 1] per channel). See docs/lowbit-formats.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rarefy.errors import RarefyError

QMAX = 127


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float [out, n_groups]
    out_features: int
    in_features: int
    group_size: int | None = None  # None: one scale per output channel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale, self.group_size, dtype)

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scale.numel() * self.scale.element_size()


def check_group_size(in_features: int, group_size: int | None) -> None:
    if group_size is None:
        return
    if not isinstance(group_size, int) or group_size <= 0:
        raise RarefyError(f"group size must be a positive integer, got {group_size!r}")
    if in_features % group_size:
        raise RarefyError(f"group size {group_size} does not divide the in-features {in_features}")


def _groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(rows, 1, cols) if group_size is None else w.view(rows, cols // group_size, group_size)


def int8_scale(w: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """fp32 [out, n_groups]: max|W_g| / 127, or 1 where the group is all zeros."""
    amax = _groups(w.detach().float().abs(), group_size).amax(-1)
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def quantize_int8(w: torch.Tensor, group_size: int | None = None,
                  scale_dtype: torch.dtype = torch.float32) -> Int8Weight:
    """Quantize a float [out, in] weight (on the CPU). The scale is rounded to
    `scale_dtype` before Q is computed, so Q fits the stored scale."""
    if w.dim() != 2:
        raise RarefyError(f"int8 quantization takes 2-D weights, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise RarefyError(f"int8 quantization takes a float weight, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise RarefyError("the weight holds NaN or inf; it cannot be quantized")
    rows, cols = w.shape
    check_group_size(cols, group_size)
    wf = w.detach().cpu().float()
    s = int8_scale(wf, group_size).to(scale_dtype)
    q = (_groups(wf, group_size) / s.float().unsqueeze(-1)).round().clamp(-QMAX, QMAX)
    return Int8Weight(q.view(rows, cols).to(torch.int8).contiguous(), s.contiguous(), rows, cols, group_size)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, group_size: int | None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] weights Q * s in `dtype` (computed in fp32, then cast)."""
    rows, cols = qweight.shape
    w = _groups(qweight.float(), group_size) * scale.float().unsqueeze(-1)
    return w.view(rows, cols).to(dtype)
