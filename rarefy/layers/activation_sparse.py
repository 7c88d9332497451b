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
    """y = (x * (|x| >= threshold)) @ weight_t + bias, weight_t: [in, out]."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float,
                 max_rows: int | None = None, sparse_prefill: bool = False):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.weight_t = nn.Parameter(weight_t.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.threshold, self.max_rows, self.sparse_prefill = float(threshold), max_rows, sparse_prefill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features <= _limit(self.max_rows, x):
            return input_sparse_matmul(x, self.weight_t, self.threshold, self.bias)
        return _dense(x, self.weight_t, self.bias, self.threshold, self.sparse_prefill)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, threshold={self.threshold:.4g}, "
                f"weight={str(self.weight_t.dtype).replace('torch.', '')} transposed")


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


def use_activation_sparsity(model: nn.Module, thresholds: dict[str, float], max_rows: int | None = None,
                            sparse_prefill: bool = False) -> int:
    """Swap every decoder layer's projections for input-sparse ones; returns the layers changed.

    ``thresholds`` maps ``"{layer}.{input}"`` (inputs attn_in, o_in, mlp_in, down_in) to the
    threshold below which an input is skipped (rarefy.sparsity.activation, threshold mode).
    """
    layers = model.model.layers if hasattr(model, "model") else model.layers
    missing = [f"{i}.{n}" for i in range(len(layers)) for n in ("attn_in", "o_in", "mlp_in", "down_in")
               if f"{i}.{n}" not in thresholds]
    if missing:
        raise RarefyError(f"thresholds lack {len(missing)} inputs of this model, e.g. {missing[0]} "
                          "(calibrated on another model?)")
    kw = dict(max_rows=max_rows, sparse_prefill=sparse_prefill)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
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
            attn.qkv_proj = ActivationSparseLinear(_transposed(ws), bias, thresholds[f"{i}.attn_in"], **kw)
            for n in ("q_proj", "k_proj", "v_proj"):
                if hasattr(attn, n):
                    delattr(attn, n)
            (wo,), (bo,) = _weights(attn, ("o_proj",))
            attn.o_proj = ActivationSparseLinear(wo.t(), bo, thresholds[f"{i}.o_in"], **kw)
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
        layer.mlp = ActivationSparseMLP(gate_up_t, wd.t(), thresholds[f"{i}.mlp_in"],
                                        thresholds[f"{i}.down_in"], **kw)
    return len(layers)
