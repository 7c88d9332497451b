"""TernaryLinear and Int8Linear: projections whose weights stay packed in memory.

Three modes:

- "reference": unpack and dequantize the whole weight on every call, then one
  `F.linear`; only the packed weight stays resident. Correct, not fast.
- "cache": dequantize once (in the compute dtype) and keep that matrix — the
  "dequantize-once-and-cache" baseline: as fast as a dense layer, but it saves no
  memory or bandwidth.
- "fused": the fused dequantize-and-multiply kernels read the packed weight directly:
  Triton on CUDA (rarefy.kernels.lowbit_gemv; any batch, > 32 rows fall back inside),
  C++ on CPU for float32 inputs of at most 16 rows (rarefy.kernels.lowbit_cpu; longer
  inputs, i.e. prompts, take the reference path).

`act_quant="int8"` fake-quantizes the activations per token to int8 first (absmax,
as BitNet b1.58's W1.58A8 forward does); BitNet checkpoints load with it on.

Buffers keep the checkpoint's tensor names (docs/lowbit-formats.md):
TernaryLinear `weight_ternary` (uint8) + `weight_scale`; Int8Linear `weight_int8`
(int8) + `weight_scale`; so `state_dict()` is what the checkpoint stores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rarefy.errors import RarefyError
from rarefy.lowbit.int8 import Int8Weight, dequantize_int8, quantize_int8
from rarefy.lowbit.ternary import (TernaryWeight, dequantize_ternary, packed_cols, quantize_ternary,
                                   unpack_ternary)

MODES = ("reference", "cache", "fused")
CPU_FUSED_MAX_ROWS = 16
ACT_QUANT = (None, "int8")


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 8-bit per token (last dim): absmax scale 127 / max|x| (BitNet's
    activation quantization), returned dequantized in x's dtype."""
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((xf * s).round().clamp(-128, 127) / s).to(x.dtype)


class _LowBitLinear(nn.Module):
    """Shared parts: mode, activation quantization, bias, the forward."""

    fmt = "?"

    def __init__(self, in_features: int, out_features: int, group_size: int | None, bias: bool,
                 act_quant: str | None):
        super().__init__()
        if act_quant not in ACT_QUANT:
            raise RarefyError(f"act_quant must be None or 'int8', got {act_quant!r}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.act_quant = act_quant
        self.mode = "reference"
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.register_buffer("weight_cache", None, persistent=False)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_weight(cls, w, bias: torch.Tensor | None = None, act_quant: str | None = None):
        """From a quantized weight (TernaryWeight for TernaryLinear, Int8Weight for Int8Linear)."""
        m = cls(w.in_features, w.out_features, w.group_size, bias is not None, act_quant)
        m._set_weight(w)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    @classmethod
    def from_dense(cls, dense: nn.Module, group_size: int | None = None,
                   scale_dtype: torch.dtype = torch.float32, act_quant: str | None = None):
        w = cls._quantize(dense.weight.detach(), group_size, scale_dtype)
        return cls.from_weight(w, dense.bias, act_quant).to(dense.weight.device)

    def set_mode(self, mode: str, dtype: torch.dtype | None = None) -> None:
        """"reference" or "cache" (materialise the dequantized weight now, in `dtype`,
        default: the bias's dtype or fp32)."""
        if mode not in MODES:
            raise RarefyError(f"low-bit mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        if mode == "cache":
            dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
            self.weight_cache = self.dequantized_weight(dtype)
        else:
            self.weight_cache = None

    def _fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused kernel's output, or None where it does not apply."""
        if x.is_cuda:
            y = self._gpu_kernel(x)
            if y is None:
                return None
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if x.dtype == torch.float32 and x.numel() <= CPU_FUSED_MAX_ROWS * x.shape[-1]:
            return self._cpu_kernel(x)
        return None

    def _gpu_scale(self) -> torch.Tensor:
        return self.weight_scale.reshape(-1) if self.group_size is None else self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fused":
            y = self._fused(x)
            if y is not None:
                return y
        if self.act_quant == "int8":
            x = fake_quant_int8_per_token(x)
        w = self.weight_cache if self.weight_cache is not None else self.dequantized_weight(x.dtype)
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        group = "tensor" if self.group_size is None and self.fmt == "ternary" else (
            "channel" if self.group_size is None else f"group {self.group_size}")
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.fmt}/{group}, mode={self.mode}"
                + (f", act_quant={self.act_quant}" if self.act_quant else ""))


class TernaryLinear(_LowBitLinear):
    """y = x @ (Q * s)^T + b with Q in {-1, 0, 1} packed 4 per byte (layout v1)."""

    fmt = "ternary"

    def __init__(self, in_features: int, out_features: int, group_size: int | None = None,
                 bias: bool = False, act_quant: str | None = None):
        super().__init__(in_features, out_features, group_size, bias, act_quant)
        n_scales = (1, 1) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight_ternary", torch.zeros(out_features, packed_cols(in_features), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(*n_scales, dtype=torch.float32))

    @staticmethod
    def _quantize(w, group_size, scale_dtype) -> TernaryWeight:
        return quantize_ternary(w, group_size, scale_dtype)

    def _set_weight(self, tw: TernaryWeight) -> None:
        self.weight_ternary, self.weight_scale = tw.packed, tw.scale

    def _gpu_kernel(self, x):
        from rarefy.kernels.lowbit_gemv import ternary_matmul, ternary_matmul_int8act
        fn = ternary_matmul_int8act if self.act_quant == "int8" else ternary_matmul
        return fn(x, self.weight_ternary, self._gpu_scale(), self.group_size)

    def _cpu_kernel(self, x):
        from rarefy.kernels.lowbit_cpu import ternary_gemv_cpu
        scale = self.weight_scale.reshape(1, 1) if self.group_size is None else self.weight_scale
        return ternary_gemv_cpu(x, self.weight_ternary, scale, self.group_size, act_quant=self.act_quant,
                                bias=self.bias)

    def codes(self) -> torch.Tensor:
        return unpack_ternary(self.weight_ternary, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_ternary(self.weight_ternary, self.weight_scale, self.in_features,
                                  self.group_size, dtype)


class Int8Linear(_LowBitLinear):
    """y = x @ (Q * s)^T + b with Q int8 [out, in], s per output channel or group."""

    fmt = "int8"

    def __init__(self, in_features: int, out_features: int, group_size: int | None = None,
                 bias: bool = False, act_quant: str | None = None):
        super().__init__(in_features, out_features, group_size, bias, act_quant)
        groups = 1 if group_size is None else in_features // group_size
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32))

    @staticmethod
    def _quantize(w, group_size, scale_dtype) -> Int8Weight:
        return quantize_int8(w, group_size, scale_dtype)

    def _set_weight(self, iw: Int8Weight) -> None:
        self.weight_int8, self.weight_scale = iw.qweight, iw.scale

    def _gpu_kernel(self, x):
        if self.act_quant == "int8":  # no int8 x int8 GPU kernel: the reference path
            return None
        from rarefy.kernels.lowbit_gemv import int8_matmul
        return int8_matmul(x, self.weight_int8, self._gpu_scale(), self.group_size)

    def _cpu_kernel(self, x):
        from rarefy.kernels.lowbit_cpu import int8_gemv_cpu
        return int8_gemv_cpu(x, self.weight_int8, self.weight_scale, self.group_size, act_quant=self.act_quant,
                             bias=self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.weight_scale, self.group_size, dtype)


LOWBIT_CLASSES = {"ternary": TernaryLinear, "int8": Int8Linear}


def is_lowbit(module: nn.Module) -> bool:
    return isinstance(module, _LowBitLinear)


def set_lowbit_mode(model: nn.Module, mode: str, dtype: torch.dtype | None = None) -> int:
    """Put every low-bit layer of `model` in `mode`; returns how many there are."""
    n = 0
    for m in model.modules():
        if isinstance(m, _LowBitLinear):
            m.set_mode(mode, dtype)
            n += 1
    return n


def fuse_lowbit(layers: list[nn.Module]) -> _LowBitLinear | None:
    """One low-bit layer whose output is the concatenation of `layers`' outputs (q/k/v or
    gate/up), or None when they cannot be stacked (different classes, inputs, group sizes,
    activation quantization, modes, or bias on some only).

    Decode is memory-bound and these matrices are small: one launch over the stacked packed
    weights reads the same bytes with one launch's fixed cost and a fuller grid. Ternary
    layers quantized per tensor have one scale each; stacked, each row keeps its own layer's
    scale, i.e. groups of the whole input row (group_size = in_features), which the kernels
    and the checkpoint format already handle -- the product is unchanged.
    """
    first = layers[0]
    cls = type(first)
    if cls not in (TernaryLinear, Int8Linear) or any(type(m) is not cls for m in layers):
        return None
    same = ("in_features", "group_size", "act_quant", "mode")
    if any(getattr(m, a) != getattr(first, a) for m in layers for a in same):
        return None
    if len({m.bias is None for m in layers}) != 1:
        return None
    out = sum(m.out_features for m in layers)
    dev = first.weight_scale.device
    if cls is TernaryLinear:
        if first.group_size is None:
            group = first.in_features
            scales = [m.weight_scale.reshape(1, 1).expand(m.out_features, 1) for m in layers]
        else:
            group, scales = first.group_size, [m.weight_scale for m in layers]
        try:
            fused = TernaryLinear(first.in_features, out, group, first.bias is not None, first.act_quant)
        except RarefyError:  # a group of the whole row the format refuses (odd in_features)
            return None
        fused.weight_ternary = torch.cat([m.weight_ternary for m in layers])
        fused.weight_scale = torch.cat(scales).contiguous()
    else:
        fused = Int8Linear(first.in_features, out, first.group_size, first.bias is not None, first.act_quant)
        fused.weight_int8 = torch.cat([m.weight_int8 for m in layers])
        fused.weight_scale = torch.cat([m.weight_scale for m in layers])
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias for m in layers]), requires_grad=False)
    fused.mode = first.mode
    if first.weight_cache is not None:
        fused.weight_cache = torch.cat([m.weight_cache for m in layers])
    return fused.to(dev)
