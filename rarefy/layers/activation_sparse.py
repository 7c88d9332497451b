"""Projections that skip the weight rows of near-zero inputs (TEAL-style activation sparsity).

``use_activation_sparsity(model, thresholds)`` swaps, in every decoder layer, q/k/v (one
fused projection, input ``attn_in``), o (``o_in``) and the MLP (``mlp_in`` for gate/up,
``down_in`` for down) for modules that keep their weights transposed (``[in, out]``) and
call the input-sparse kernels (rarefy/kernels/activation_sparse). The MLP becomes two
launches: gate/up/SiLU/multiply fused, then down.

Only decode-sized calls (at most ``max_rows`` tokens) are sparse: prefill stays dense
unless ``sparse_prefill`` is set, in which case it applies the same thresholds with dense
compute. Batch > 1 reads the union of the tokens' active rows; the kernel at 0% sparsity
costs about the same as dense, so no density check (and no host sync) is needed to decide.

The weighted criterion (rarefy.sparsity.activation_criteria: drop x_i when |x_i| * c_i is
small, c_i the norm of the weight column reading channel i) runs on the same scalar-threshold
kernels by a reparametrisation done once, when the layers are swapped: x' = x * c and
W' = W / c (rows of the transposed weights), so x' @ W'^T = x @ W^T and |x'| >= t is the
weighted criterion. c is folded where it costs nothing per token: into the input RMSNorm's
weight for attn_in, into the post-attention RMSNorm's weight for mlp_in, and into up_proj's
output rows for down_in (down_in = SiLU(gate) * up is linear in up). For o_in the layer
multiplies its input by c (one multiply per input channel and token): folding it into
v_proj's rows would need one c per key/value head, while with grouped-query attention each
v row feeds several query heads, whose o_proj columns differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rarefy.errors import RarefyError
from rarefy.kernels.activation_sparse import input_sparse_matmul

#: Tokens per call up to which the sparse kernels run, per device. On the H100 the
#: tensor-core path for M > 1 measured slower than cuBLAS even at 50% union density
#: (docs/results/activation-gpu.md), so CUDA runs only single-token calls sparse; the CPU
#: kernel skips rows by the union of the tokens' masks up to 16 tokens.
MAX_SPARSE_ROWS = {"cuda": 1, "cpu": 16}


def _limit(max_rows, x):
    return max_rows if max_rows is not None else MAX_SPARSE_ROWS.get(x.device.type, 1)


def _dense(x, wt, bias, threshold, sparse_prefill):
    if sparse_prefill:
        x = torch.where(x.abs() >= threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = x @ wt.to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


class ActivationSparseLinear(nn.Module):
    """y = (x' * (|x'| >= threshold)) @ weight_t + bias, weight_t: [in, out], x' = x * in_scale
    (in_scale: None, i.e. x' = x, unless the weighted criterion is applied by scaling here)."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                 max_rows: int | None = None, sparse_prefill: bool = False, in_scale: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.weight_t = nn.Parameter(weight_t.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.threshold, self.max_rows, self.sparse_prefill = float(threshold), max_rows, sparse_prefill
        if in_scale is not None and in_scale.shape != (self.in_features,):
            raise RarefyError(f"in_scale must have shape ({self.in_features},), got {tuple(in_scale.shape)}")
        self.in_scale = None if in_scale is None else nn.Parameter(in_scale.detach().float().clone(),
                                                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scale is not None:
            x = x * self.in_scale.to(x.dtype)
        if x.numel() // self.in_features <= _limit(self.max_rows, x):
            return input_sparse_matmul(x, self.weight_t, self.threshold, self.bias)
        return _dense(x, self.weight_t, self.bias, self.threshold, self.sparse_prefill)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, threshold={self.threshold:.4g}, "
                f"weight={str(self.weight_t.dtype).replace('torch.', '')} transposed"
                + (", input scaled" if self.in_scale is not None else ""))


class ActivationSparseMLP(nn.Module):
    """SwiGLU MLP with input-sparse gate/up (fused with SiLU·up) and input-sparse down."""

    def __init__(self, gate_up_t: torch.Tensor, down_t: torch.Tensor, t_in: float, t_down: float,
                 max_rows: int | None = None, sparse_prefill: bool = False):
        super().__init__()
        self.hidden_size, two_i = gate_up_t.shape
        self.intermediate_size = two_i // 2
        self.gate_up_t = nn.Parameter(gate_up_t.contiguous(), requires_grad=False)
        self.down_t = nn.Parameter(down_t.contiguous(), requires_grad=False)
        self.t_in, self.t_down = float(t_in), float(t_down)
        self.max_rows, self.sparse_prefill = max_rows, sparse_prefill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.hidden_size <= _limit(self.max_rows, x):
            h = input_sparse_matmul(x, self.gate_up_t, self.t_in, glu=True)
            return input_sparse_matmul(h, self.down_t, self.t_down)
        gate, up = _dense(x, self.gate_up_t, None, self.t_in, self.sparse_prefill).chunk(2, dim=-1)
        return _dense(F.silu(gate) * up, self.down_t, None, self.t_down, self.sparse_prefill)

    def fuse_projections(self) -> None:  # gate and up are already one transposed matrix
        pass

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"t_in={self.t_in:.4g}, t_down={self.t_down:.4g}")


def _weights(owner: nn.Module, names: tuple[str, ...]) -> tuple[list[torch.Tensor], list]:
    """[out, in] weights (and biases) of owner's projections `names`, dense or fp16-stored."""
    ws, bs = [], []
    for n in names:
        m = getattr(owner, n, None)
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise RarefyError(f"activation sparsity needs dense projections; {type(m).__name__} {n} has none "
                              "(sparse or quantized weights cannot be combined with it yet)")
        ws.append(w.detach())
        bs.append(getattr(m, "bias", None))
    return ws, bs


def _transposed(ws: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ws).t().contiguous()


def _rows_divided(wt: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """[in, out] weight with row i divided by c_i (in float32, back to its dtype)."""
    if c is None:
        return wt
    return (wt.float() / c.to(wt.device).unsqueeze(1)).to(wt.dtype)


def _fold_into_norm(norm: nn.Module | None, c: torch.Tensor, what: str) -> None:
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != c.shape:
        raise RarefyError(f"the weighted criterion folds its scales into the RMSNorm before {what}; "
                          f"this layer has no such norm weight of shape {tuple(c.shape)}")
    w.data.copy_((w.data.float() * c.to(w.device)).to(w.dtype))


def use_activation_sparsity(model: nn.Module, thresholds, max_rows: int | None = None,
                            sparse_prefill: bool = False, scales: dict[str, torch.Tensor] | None = None) -> int:
    """Swap every decoder layer's projections for input-sparse ones; returns the layers changed.

    ``thresholds`` maps ``"{layer}.{input}"`` (inputs attn_in, o_in, mlp_in, down_in) to the
    threshold below which an input is skipped (rarefy.sparsity.activation, threshold mode), or
    is a threshold-mode ``LevelRule`` (``Thresholds.rule(s)``). A rule with the weighted
    criterion (or explicit ``scales``, {input: c}) folds c into the model as the module
    docstring says; the model's dense outputs do not change (up to float rounding).
    """
    from rarefy.sparsity.activation import LevelRule

    if isinstance(thresholds, LevelRule):
        if thresholds.mode != "threshold":
            raise RarefyError(f"the input-sparse kernels take thresholds; this calibration is in "
                              f"{thresholds.mode} mode (apply it with sparsify_activations)")
        if scales is None and thresholds.criterion != "magnitude":
            from rarefy.sparsity.activation_criteria import input_scales
            scales = input_scales(model, thresholds.criterion)
        thresholds = thresholds.params
    layers = model.model.layers if hasattr(model, "model") else model.layers
    missing = [f"{i}.{n}" for i in range(len(layers)) for n in ("attn_in", "o_in", "mlp_in", "down_in")
               if f"{i}.{n}" not in thresholds]
    if missing:
        raise RarefyError(f"thresholds lack {len(missing)} inputs of this model, e.g. {missing[0]} "
                          "(calibrated on another model?)")
    if scales is not None:
        lack = [n for n in thresholds if n not in scales]
        if lack:
            raise RarefyError(f"scales lack input {lack[0]}")
    kw = dict(max_rows=max_rows, sparse_prefill=sparse_prefill)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        c = {n: None for n in ("attn_in", "o_in", "mlp_in", "down_in")} if scales is None else \
            {n: scales[f"{i}.{n}"].detach().float() for n in ("attn_in", "o_in", "mlp_in", "down_in")}
        if attn.qkv_proj is not None and not isinstance(attn.qkv_proj, ActivationSparseLinear):
            (w,), (b,) = _weights(attn, ("qkv_proj",))
            ws, bs = [w], [b]
        elif attn.qkv_proj is None:
            ws, bs = _weights(attn, ("q_proj", "k_proj", "v_proj"))
        else:
            ws = None  # already swapped
        if ws is not None:
            bias = None if all(b is None for b in bs) else torch.cat(
                [b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(ws, bs)])
            if c["attn_in"] is not None:
                _fold_into_norm(getattr(layer, "input_layernorm", None), c["attn_in"], "attention")
            attn.qkv_proj = ActivationSparseLinear(_rows_divided(_transposed(ws), c["attn_in"]), bias,
                                                   thresholds[f"{i}.attn_in"], **kw)
            for n in ("q_proj", "k_proj", "v_proj"):
                if hasattr(attn, n):
                    delattr(attn, n)
            (wo,), (bo,) = _weights(attn, ("o_proj",))
            attn.o_proj = ActivationSparseLinear(_rows_divided(wo.t(), c["o_in"]), bo, thresholds[f"{i}.o_in"],
                                                 in_scale=c["o_in"], **kw)
        if isinstance(mlp, ActivationSparseMLP):
            continue
        if getattr(mlp, "gate_up_proj", None) is not None:
            (gu,), _ = _weights(mlp, ("gate_up_proj",))
            gate_up_t = gu.t()
        else:
            gate_up_t = _transposed(_weights(mlp, ("gate_proj", "up_proj"))[0])
        (wd,), (bd,) = _weights(mlp, ("down_proj",))
        if bd is not None:
            raise RarefyError("activation sparsity: MLP down_proj with a bias is not supported")
        down_t = wd.t()
        if c["mlp_in"] is not None:
            _fold_into_norm(getattr(layer, "post_attention_layernorm", None), c["mlp_in"], "the MLP")
            inter = gate_up_t.shape[1] // 2
            gate_up_t = _rows_divided(gate_up_t, c["mlp_in"]).contiguous()
            # down_in = SiLU(gate) * up: scaling up's output j by c_j scales down_in_j by c_j
            gate_up_t[:, inter:] = (gate_up_t[:, inter:].float() * c["down_in"].to(gate_up_t.device)).to(
                gate_up_t.dtype)
            down_t = _rows_divided(down_t, c["down_in"])
        layer.mlp = ActivationSparseMLP(gate_up_t, down_t, thresholds[f"{i}.mlp_in"],
                                        thresholds[f"{i}.down_in"], **kw)
    return len(layers)
