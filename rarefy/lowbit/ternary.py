"""Ternary weights as in BitNet b1.58 (Ma et al. 2024, arXiv:2402.17764): absmean
quantization to {-1, 0, +1}, and rarefy's 2-bit packed layout (layout version 1).

Quantization (the paper's eq. 1-3, and the `weight_quant` of its training code):

    s = max(mean(|W|), eps)           over the whole tensor, or over each group
    Q = clamp(round(W * (1 / s)), -1, 1)        round half to even, as torch.round
    W ~= Q * s

eps = 1e-5. `s` is what the checkpoint stores (`weight_scale`): the *multiplier*.

Packed layout (docs/lowbit-formats.md has a worked example):

- A matrix [rows, cols] (HF layout [out, in]) is packed row by row into
  uint8 [rows, ceil(cols / 4)]; the row stride is ceil(cols / 4) bytes.
- Byte j of a row holds columns 4j, 4j+1, 4j+2, 4j+3 in bits 0-1, 2-3, 4-5, 6-7
  (least significant pair first): byte = c0 | c1 << 2 | c2 << 4 | c3 << 6.
- Each 2-bit code is value + 1: 0b00 = -1, 0b01 = 0, 0b10 = +1; 0b11 is invalid
  (rejected by `check_codes`).
- Columns past `cols` in a row's last byte are padded with value 0 (code 0b01).

So four consecutive weights of one output row sit in one byte: a CPU kernel can
map a byte through a 256-entry table (to four values, or to a precomputed sum of
four activations, as T-MAC / bitnet.cpp's TL kernels do), and a GPU kernel unpacks
one value with a shift, a mask and a subtract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rarefy.errors import RarefyError

LAYOUT_VERSION = 1
VALUES_PER_BYTE = 4
EPS = 1e-5  # BitNet's clamp on the absmean
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def packed_cols(cols: int) -> int:
    """Bytes per packed row."""
    return (cols + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE


def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """int [rows, cols] with values in {-1, 0, 1} -> uint8 [rows, ceil(cols/4)] (layout v1)."""
    if values.dim() != 2:
        raise ValueError(f"pack_ternary packs 2-D tensors, got shape {tuple(values.shape)}")
    v = values.detach().cpu()
    if v.is_floating_point():
        if not torch.equal(v, v.round()):
            raise ValueError("pack_ternary: values must be integers in {-1, 0, 1}")
    v = v.to(torch.int16)
    if v.numel() and (v.min() < -1 or v.max() > 1):
        raise ValueError("pack_ternary: values must be in {-1, 0, 1}")
    rows, cols = v.shape
    nb = packed_cols(cols)
    codes = torch.ones(rows, nb * VALUES_PER_BYTE, dtype=torch.uint8)  # padding: value 0 = code 1
    codes[:, :cols] = (v + 1).to(torch.uint8)
    codes = codes.view(rows, nb, VALUES_PER_BYTE) << _SHIFTS
    return (codes[..., 0] | codes[..., 1] | codes[..., 2] | codes[..., 3]).contiguous()


def unpack_ternary(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols/4)] -> int8 [rows, cols] in {-1, 0, 1} (same device)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_ternary wants a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_cols(cols):
        raise ValueError(f"unpack_ternary: {packed.shape[1]} bytes per row cannot hold {cols} columns "
                         f"(expected {packed_cols(cols)})")
    shifts = _SHIFTS.to(packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3  # [rows, nb, 4]: column 4j+i at [j, i]
    vals = codes.view(torch.int8) - 1
    return vals.reshape(packed.shape[0], packed.shape[1] * VALUES_PER_BYTE)[:, :cols]


def byte_lut() -> torch.Tensor:
    """int8 [256, 4]: the four values a byte holds (invalid code 0b11 reads as 0)."""
    b = torch.arange(256, dtype=torch.int16)
    codes = torch.stack([(b >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)], dim=1)
    vals = codes - 1
    vals[codes == 3] = 0
    return vals.to(torch.int8)


def invalid_code_count(packed: torch.Tensor) -> int:
    """How many 2-bit codes are 0b11 (never written by `pack_ternary`)."""
    both = packed & (packed >> 1) & 0x55  # bit 2i set where pair i is 0b11
    return int(sum(int(((both >> (2 * i)) & 1).sum()) for i in range(VALUES_PER_BYTE)))


def check_codes(packed: torch.Tensor, name: str = "tensor") -> None:
    """Raise RarefyError if a packed ternary tensor holds the invalid code 0b11."""
    bad = invalid_code_count(packed)
    if bad:
        raise RarefyError(f"packed ternary weight {name} holds {bad} invalid 2-bit code(s) 0b11 "
                          "(damaged file, or not rarefy's ternary layout)")


@dataclass
class TernaryWeight:
    """A ternary matrix: packed codes and the scales that multiply them.

    packed: uint8 [out, ceil(in/4)]. scale: float [1, 1] (per tensor, group_size None)
    or [out, in // group_size] (per group of `group_size` consecutive input columns).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int
    group_size: int | None = None

    def codes(self) -> torch.Tensor:
        """int8 [out, in] in {-1, 0, 1}."""
        return unpack_ternary(self.packed, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_ternary(self.packed, self.scale, self.in_features, self.group_size, dtype)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scale.numel() * self.scale.element_size()


def check_group_size(in_features: int, group_size: int | None, what: str = "ternary") -> None:
    """Ternary groups: a positive multiple of 4 that divides in_features (one scale per byte)."""
    if group_size is None:
        return
    if not isinstance(group_size, int) or group_size <= 0:
        raise RarefyError(f"group size must be a positive integer, got {group_size!r}")
    if in_features % group_size:
        raise RarefyError(f"group size {group_size} does not divide the in-features {in_features}")
    if group_size % VALUES_PER_BYTE:
        raise RarefyError(f"{what} group size {group_size} is not a multiple of 4 "
                          "(each packed byte must lie in one group)")


def absmean_scale(w: torch.Tensor, group_size: int | None = None, eps: float = EPS) -> torch.Tensor:
    """BitNet's absmean scale: [1, 1] per tensor or [out, in // group_size] per group (fp32)."""
    a = w.detach().float().abs()
    if group_size is None:
        return a.mean().clamp(min=eps).reshape(1, 1)
    rows, cols = a.shape
    return a.view(rows, cols // group_size, group_size).mean(-1).clamp(min=eps)


def _expand(scale: torch.Tensor, rows: int, cols: int, group_size: int | None) -> torch.Tensor:
    if group_size is None:
        return scale.reshape(1, 1)
    return scale.repeat_interleave(group_size, dim=1).view(rows, cols)


def quantize_ternary_values(w: torch.Tensor, group_size: int | None = None,
                            scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [out, in] in {-1,0,1}, scale) by the BitNet b1.58 formula.

    The scale is rounded to `scale_dtype` first, so the values are those that the
    stored scale implies."""
    if w.dim() != 2:
        raise RarefyError(f"ternary quantization takes 2-D weights, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    check_group_size(cols, group_size)
    s = absmean_scale(w, group_size).to(scale_dtype)
    inv = 1.0 / s.float()
    q = (w.detach().float() * _expand(inv, rows, cols, group_size)).round().clamp(-1, 1)
    return q.to(torch.int8), s


def quantize_ternary(w: torch.Tensor, group_size: int | None = None,
                     scale_dtype: torch.dtype = torch.float32) -> TernaryWeight:
    """Quantize a float [out, in] weight to a packed TernaryWeight (on the CPU)."""
    if not w.is_floating_point():
        raise RarefyError(f"ternary quantization takes a float weight, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise RarefyError("the weight holds NaN or inf; it cannot be quantized")
    q, s = quantize_ternary_values(w.cpu(), group_size, scale_dtype)
    return TernaryWeight(pack_ternary(q), s.contiguous(), w.shape[0], w.shape[1], group_size)


def dequantize_ternary(packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                       group_size: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] weights Q * s in `dtype` (computed in fp32, then cast)."""
    q = unpack_ternary(packed, in_features).float()
    rows = q.shape[0]
    return (q * _expand(scale.float(), rows, in_features, group_size)).to(dtype)
