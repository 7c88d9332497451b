"""Which entries of a projection input count as small: the *criterion*.

``magnitude`` (TEAL, Liu et al. 2024): rank the entries of x by |x_i|.

``weighted`` (after WINA, Chen et al. 2025, "WINA: Weight Informed Neuron Activation for
Accelerating Large Language Model Inference"; CATS and R-Sparse also rank inputs by more than
|x|): rank by |x_i| * c_i, where c_i is the L2 norm of the weight column that reads channel i.
Zeroing x_i changes the output y = W x by x_i W[:, i], whose norm is exactly |x_i| * c_i, so
this ranks channels by the output change each one causes alone. For a shared input the column
is taken over every projection that reads it:

    attn_in   c_i = || [W_q; W_k; W_v][:, i] ||      o_in     c_i = || W_o[:, i] ||
    mlp_in    c_i = || [W_gate; W_up][:, i] ||       down_in  c_i = || W_down[:, i] ||

Every mode (threshold, topk, adaptive) applies unchanged to the scores |x| * c, and the
calibration takes its statistics on those scores. The criterion is a reparametrisation: with
x' = x * c and W' = W / c (columns), W' x' = W x and the weighted criterion on x is the
magnitude criterion on x'. The input-sparse layers use that (rarefy.layers.activation_sparse:
c folded into the RMSNorm weights for attn_in / mlp_in and into up_proj's rows for down_in; an
explicit x * c for o_in), so the scalar-threshold kernels run unchanged.

The scales are recomputed from the model's weights wherever the criterion is applied; they
are not stored in the calibration file, which keeps one summary per input (``scale_norm``,
||c||) to check that it is applied to the weights it was calibrated on.
"""

from __future__ import annotations

import torch

from rarefy.errors import RarefyError

CRITERIA = ("magnitude", "weighted")
#: relative floor of a column norm, so that a zero column gives a finite 1 / c when folded
SCALE_FLOOR = 1e-6
#: relative difference of ||c|| between the file and the model above which the file is refused
SCALE_TOLERANCE = 0.02


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise RarefyError(f"unknown activation sparsity criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    return criterion


def projection_weight(p) -> torch.Tensor:
    """[out, in] weight of a projection: dense (``weight``), fp16-stored, or already swapped
    for an input-sparse layer (``weight_t``, [in, out])."""
    w = getattr(p, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return w.detach()
    wt = getattr(p, "weight_t", None)
    if isinstance(wt, torch.Tensor) and wt.dim() == 2:
        return wt.detach().t()
    raise RarefyError(f"the weighted criterion needs dense projection weights; {type(p).__name__} has none "
                      "(sparse or quantized weights cannot be combined with it yet)")


def column_norms(weights: list[torch.Tensor]) -> torch.Tensor:
    """|| [W_1; W_2; ...][:, i] || for [out, in] weights sharing their input; float32 [in],
    floored at SCALE_FLOOR times the largest."""
    sq = sum(w.float().pow(2).sum(0) for w in weights)
    c = sq.sqrt()
    return c.clamp_min(float(c.max()) * SCALE_FLOOR if c.numel() else 0.0).clamp_min(1e-30)


def input_scales(model, criterion: str) -> dict[str, torch.Tensor] | None:
    """{"{layer}.{input}": c} for the weighted criterion; None for magnitude (no scaling)."""
    check_criterion(criterion)
    if criterion == "magnitude":
        return None
    from rarefy.sparsity.activation import input_sites

    return {n: column_norms([projection_weight(p) for p in s.projections]) for n, s in input_sites(model).items()}


def scale_summary(scales: dict[str, torch.Tensor]) -> dict[str, float]:
    """||c|| per input, as stored in the file."""
    return {n: float(c.double().norm()) for n, c in scales.items()}


def check_scales(stored: dict[str, float], scales: dict[str, torch.Tensor], where) -> None:
    """Refuse a weighted calibration on weights other than those it was calibrated on."""
    now = scale_summary(scales)
    for n, v in stored.items():
        if n in now and abs(now[n] - v) > SCALE_TOLERANCE * max(abs(v), 1e-30):
            raise RarefyError(f"{where} was calibrated with the weighted criterion on other weights: input {n} "
                              f"has weight column norms {now[n]:.4g} here, {v:.4g} in the file")
