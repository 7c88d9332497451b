"""The three rules that zero entries of a projection input, and their calibration.

Each rule has one number per input (per layer and input name), its *parameter*:

    threshold   t       zero |x_i| < t                     (t: quantile of calibration |x|)
    topk        f       keep the k = round(f * width) largest |x_i| of each token (k >= 1)
    adaptive    c       keep the k_t = clamp(round(c * n_t), 1, width) largest |x_i| of token t,
                        where n_t = exp(H(p_t)) is the effective number of channels of the token,
                        p_t,i = |x_t,i| / sum_j |x_t,j|, H = -sum_i p log p (natural log)

``InputStats.param(mode, s)`` turns a target sparsity s of one input into that parameter from
dense calibration statistics: the s-quantile of a sample of |x| (threshold), 1 - s (topk),
or, for adaptive, the scale c whose average sparsity over the calibration tokens,
mean_t(1 - k_t / width), is closest to s (bisection; k_t grows with c).
``apply_rule`` zeroes the entries and returns how many it zeroed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rarefy.errors import RarefyError

MODES = ("threshold", "topk", "adaptive")
#: file key of each mode's per-input parameter
PARAM_KEY = {"threshold": "thresholds", "topk": "keep_fraction", "adaptive": "entropy_scale"}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise RarefyError(f"unknown activation sparsity mode {mode!r}; known: {', '.join(MODES)}")
    return mode


def effective_count(x: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row's normalized magnitudes: 1 (one channel) .. width (flat).
    x: [..., width] -> [...] float32. An all-zero row counts as flat."""
    a = x.detach().abs().float()
    total = a.sum(-1, keepdim=True)
    p = a / total.clamp_min(1e-30)
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    n = torch.exp(h)
    return torch.where(total.squeeze(-1) > 0, n, torch.full_like(n, x.shape[-1]))


def topk_count(keep_fraction: float, width: int) -> int:
    return min(width, max(1, round(keep_fraction * width)))


def adaptive_counts(neff: torch.Tensor, scale: float, width: int) -> torch.Tensor:
    return (neff * scale).round().clamp(1, width)


def apply_rule(mode: str, param: float, x: torch.Tensor, scale: torch.Tensor | None = None):
    """(x with the dropped entries zeroed, number of dropped entries: int or 0-d tensor).

    The rule ranks entries by |x| (criterion ``magnitude``) or, given ``scale`` (one positive
    number per channel, criterion ``weighted``: rarefy.sparsity.activation_criteria), by
    |x_i| * scale_i; the entries it drops are zeroed in x itself."""
    score = x.abs() if scale is None else (x * scale.to(x.dtype)).abs()
    keep, dropped = keep_mask(mode, param, score)
    return (x if keep is None else x * keep), dropped


def keep_mask(mode: str, param: float, score: torch.Tensor):
    """(bool mask of the entries kept, or None when all are; number dropped), from scores >= 0."""
    width = score.shape[-1]
    if mode == "threshold":
        if param <= 0.0:
            return None, 0
        keep = score >= param
        return keep, (~keep).sum()
    if mode == "topk":
        k = topk_count(param, width)
        if k >= width:
            return None, 0
        idx = score.topk(k, dim=-1, sorted=False).indices
        keep = torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(-1, idx, True)
        return keep, (width - k) * (score.numel() // width)
    if mode == "adaptive":
        k = adaptive_counts(effective_count(score), param, width)  # float [...]
        kmax = int(k.max()) if k.numel() else width
        if kmax >= width and bool((k >= width).all()):
            return None, 0
        idx = score.topk(kmax, dim=-1, sorted=True).indices
        sel = torch.arange(kmax, device=score.device) < k.unsqueeze(-1).to(score.device)
        keep = torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(-1, idx, sel)
        return keep, (~keep).sum()
    raise RarefyError(f"unknown activation sparsity mode {mode!r}")


def finite_number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RarefyError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def check_param(mode: str, value, where: str) -> float:
    """A file's parameter, validated: finite, and in range for its mode."""
    v = finite_number(value, where)
    if mode == "threshold" and v < 0:
        raise RarefyError(f"{where}: a threshold must be >= 0, got {v}")
    if mode == "topk" and not 0.0 < v <= 1.0:
        raise RarefyError(f"{where}: a keep fraction must be in (0, 1], got {v}")
    if mode == "adaptive" and v <= 0:
        raise RarefyError(f"{where}: an entropy scale must be > 0, got {v}")
    return v


@dataclass
class InputStats:
    """Dense calibration statistics of one input: a sorted sample of |x| and every token's
    effective channel count."""

    width: int
    weights: int  # weights this input gates (it skips their columns when zero)
    sample: torch.Tensor  # sorted float64 |x| values
    neff: torch.Tensor  # float64 [tokens]

    def param(self, mode: str, s: float) -> float:
        if mode == "threshold":
            return 0.0 if s <= 0 else quantile_sorted(self.sample, s)
        if mode == "topk":
            return 1.0 - s
        if mode == "adaptive":
            return adaptive_scale(self.neff, self.width, s)
        raise RarefyError(f"unknown activation sparsity mode {mode!r}")


def quantile_sorted(sorted_values: torch.Tensor, q: float) -> float:
    """Linear-interpolated q-quantile of an ascending tensor (torch.quantile's default)."""
    n = sorted_values.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac)


def adaptive_sparsity(neff: torch.Tensor, width: int, scale: float) -> float:
    return float(1.0 - adaptive_counts(neff, scale, width).mean() / width)


def adaptive_scale(neff: torch.Tensor, width: int, s: float) -> float:
    """The scale c whose calibration sparsity mean_t(1 - k_t/width) is closest to s."""
    hi = float(width)  # n_t >= 1, so c = width keeps every channel (sparsity 0)
    if s <= 0:
        return hi
    lo = 0.0  # keeps one channel per token
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if adaptive_sparsity(neff, width, mid) > s:
            lo = mid
        else:
            hi = mid
    if lo <= 0:
        return hi
    return lo if abs(adaptive_sparsity(neff, width, lo) - s) < abs(adaptive_sparsity(neff, width, hi) - s) else hi
