"""Ternary projections with activation sparsity: TernaryLinear weights read input-sparse.

``use_ternary_activation_sparsity(model, thresholds)`` swaps, in every decoder layer, each
TernaryLinear projection for a ``TernaryInputSparseLinear`` holding its weight a second time
in the transposed ternary layout T1 (``wt`` uint8 [in, ceil(out/4)], docs/lowbit-formats.md),
with the threshold of its input (q/k/v: ``attn_in``, o: ``o_in``, gate/up: ``mlp_in``, down:
``down_in``; the same per-layer thresholds ``rarefy calibrate-activations`` writes and
rarefy.layers.activation_sparse uses for dense weights). Decode-sized calls (at most
``max_rows`` tokens: 16 on CPU, 1 on CUDA) run the input-sparse ternary kernels (C++
``ternary_sparse_cpu`` for float32 x on CPU, Triton ``ternary_sparse.triton`` on CUDA),
which compute the mask themselves and read only the weight rows of active inputs; longer
calls (prompts) run the original TernaryLinear, dense (or with the mask applied, with
``sparse_prefill``).

Per-tensor scales only (BitNet's default; ``rarefy quantize --to ternary`` without
--group-size): a per-group scale is refused with a message. Activation quantization
(``act_quant="int8"``, BitNet checkpoints) is applied before the mask, as TernaryLinear does.
Magnitude criterion only: the weighted criterion folds its scales into the weights, which a
ternary weight cannot hold.

Memory: the T1 copy is 2 bits per weight on top of the TernaryLinear (kept for prompts).
"""

from __future__ import annotations

import torch
from torch import nn

from rarefy.errors import RarefyError
from rarefy.layers.lowbit_linear import TernaryLinear, fake_quant_int8_per_token

__all__ = ["TernaryInputSparseLinear", "use_ternary_activation_sparsity", "has_ternary_projections",
           "MAX_SPARSE_ROWS"]

MAX_SPARSE_ROWS = {"cuda": 1, "cpu": 16}


class TernaryInputSparseLinear(nn.Module):
    """y = s * (x * (|x| >= threshold)) @ Q.T + b, Q ternary in layout T1 (decode), or the
    wrapped TernaryLinear (prompts)."""

    def __init__(self, base: TernaryLinear, threshold: float, max_rows: int | None = None,
                 sparse_prefill: bool = False, triton_config=None):
        super().__init__()
        from rarefy.lowbit.composed import transpose_packed
        if not isinstance(base, TernaryLinear):
            raise RarefyError(f"TernaryInputSparseLinear wraps a TernaryLinear, got {type(base).__name__}")
        if base.group_size is not None:
            raise RarefyError("the input-sparse ternary kernels take a per-tensor scale; this layer has "
                              f"per-group scales (group size {base.group_size}): quantize without --group-size")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base = base
        self.register_buffer("weight_t", transpose_packed(base.weight_ternary, base.in_features).contiguous())
        self.threshold, self.max_rows, self.sparse_prefill = float(threshold), max_rows, sparse_prefill
        self.triton_config = triton_config

    def _limit(self, x: torch.Tensor) -> int:
        return self.max_rows if self.max_rows is not None else MAX_SPARSE_ROWS.get(x.device.type, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= self._limit(x):
            if self.base.act_quant == "int8":
                x = fake_quant_int8_per_token(x)
            scale = self.base.weight_scale
            if x.is_cuda and rows == 1:
                from rarefy.kernels.ternary_sparse.triton import ternary_input_sparse_triton
                y = ternary_input_sparse_triton(x.reshape(1, -1), self.weight_t, scale, self.out_features,
                                                self.threshold, self.base.bias, config=self.triton_config)
                return y.view(*x.shape[:-1], self.out_features)
            if not x.is_cuda:
                from rarefy.kernels import ternary_sparse_cpu
                if ternary_sparse_cpu.available():
                    bias = None if self.base.bias is None else self.base.bias.float()
                    y = ternary_sparse_cpu.ternary_input_sparse_gemv(x.float(), self.weight_t, scale.float(),
                                                                     self.out_features, self.threshold, bias)
                    return y.to(x.dtype)
            x = torch.where(x.abs() >= self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
            return self.base(x) if self.base.act_quant is None else self._base_no_requant(x)
        if self.sparse_prefill:
            x = torch.where(x.abs() >= self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return self.base(x)

    def _base_no_requant(self, x: torch.Tensor) -> torch.Tensor:
        # x is already fake-quantized; TernaryLinear would quantize again (idempotent up to the
        # changed absmax of a masked row, so run its dense math directly)
        w = self.base.dequantized_weight(x.dtype)
        return torch.nn.functional.linear(x, w, None if self.base.bias is None else self.base.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, threshold={self.threshold:.4g}, "
                f"ternary layout T1" + (", act int8" if self.base.act_quant else ""))


def has_ternary_projections(model: nn.Module) -> bool:
    return any(isinstance(m, TernaryLinear) for m in model.modules())


_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
           "o_proj": "o_in", "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
           "down_proj": "down_in"}


def use_ternary_activation_sparsity(model: nn.Module, thresholds, max_rows: int | None = None,
                                    sparse_prefill: bool = False) -> int:
    """Swap every decoder layer's TernaryLinear projections for TernaryInputSparseLinear;
    returns the number of modules swapped.

    ``thresholds``: {"{layer}.{input}": threshold} (inputs attn_in, o_in, mlp_in, down_in) or
    a threshold-mode, magnitude-criterion ``LevelRule`` (``Thresholds.rule(s)``). Every check
    runs before any module changes.
    """
    from rarefy.sparsity.activation import LevelRule
    if isinstance(thresholds, LevelRule):
        if thresholds.mode != "threshold":
            raise RarefyError(f"the input-sparse kernels take thresholds; this calibration is in "
                              f"{thresholds.mode} mode")
        if thresholds.criterion != "magnitude":
            raise RarefyError(f"the {thresholds.criterion} criterion folds its scales into the weights, which "
                              "ternary weights cannot hold; calibrate with the magnitude criterion")
        thresholds = thresholds.params
    layers = model.model.layers if hasattr(model, "model") else model.layers
    plan = []
    for i, layer in enumerate(layers):
        for owner in (layer.self_attn, layer.mlp):
            for name, inp in _INPUTS.items():
                m = getattr(owner, name, None)
                if m is None or isinstance(m, TernaryInputSparseLinear):
                    continue
                if not isinstance(m, TernaryLinear):
                    raise RarefyError(f"layer {i} {name} is {type(m).__name__}, not ternary: the ternary "
                                      "input-sparse path needs every decoder projection ternary")
                if m.group_size is not None:
                    raise RarefyError(f"layer {i} {name} has per-group scales (group size {m.group_size}); the "
                                      "input-sparse ternary kernels take a per-tensor scale")
                key = f"{i}.{inp}"
                if key not in thresholds:
                    raise RarefyError(f"thresholds lack input {key} (calibrated on another model?)")
                plan.append((owner, name, m, float(thresholds[key])))
    for owner, name, m, t in plan:
        setattr(owner, name, TernaryInputSparseLinear(m, t, max_rows, sparse_prefill))
    return len(plan)
