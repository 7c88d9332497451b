"""Global allocation of activation sparsity across all layers, from the model's output.

The greedy allocation (rarefy.sparsity.activation_greedy, after TEAL) keeps every layer at the
target average and judges steps by one layer's output error. Here sparsity may also move
between layers, and the cost is measured at the model's output, in the spirit of
sensitivity-based layer-wise allocations for weight pruning (e.g. OWL, Yin et al. 2024,
"Outlier Weighed Layerwise Sparsity"), applied to activation sparsity:

1. Sensitivity curves. For every input j (layer and attn_in / o_in / mlp_in / down_in) and
   every sparsity s of a grid, only input j is sparsified at s (the mode's parameter from the
   dense statistics, as for uniform allocation) and the calibration window runs from j's
   layer to the logits; the cost C_j(s) is the mean KL divergence of the dense next-token
   distribution to the sparsified one over the window's tokens. C_j(0) = 0.
2. Allocation. Costs are taken as additive over inputs: minimise sum_j C_j(s_j) subject to
   sum_j w_j s_j = T sum_j w_j, w_j the weights input j gates. With C_j replaced by the lower
   convex hull of its grid points (piecewise linear), the optimum takes hull segments in
   order of cost per gated weight, (C_j(b) - C_j(a)) / (w_j (b - a)), until the budget is
   spent; the last segment is taken in part, so the average is the target exactly.

Cost: (inputs x grid points) partial forward passes of one window, about half the model each.
The additivity is an approximation (errors of different inputs interact), the same one the
layer-wise greedy makes within a layer.
"""

from __future__ import annotations

import itertools

import torch

from rarefy.errors import RarefyError
from rarefy.sparsity.activation_modes import apply_rule

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def check_global_options(sparsities, grid) -> list[float]:
    grid = sorted(float(g) for g in grid)
    if not grid or any(not 0.0 < g < 1.0 for g in grid):
        raise RarefyError(f"the global allocation grid must hold sparsities in (0, 1), got {grid}")
    if max(sparsities) > grid[-1]:
        raise RarefyError(f"global allocation reaches at most sparsity {grid[-1]} (the grid's largest), "
                          f"got {max(sparsities)}")
    return grid


def _logprobs(model, h):
    return torch.log_softmax(model.lm_head(model.model.norm(h)).float(), dim=-1)


def _tail(layers, start, h, rope):
    cos, sin, pos = rope
    for layer in layers[start:]:
        h = layer(h, cos, sin, pos, None, None, None)
    return h


@torch.no_grad()
def sensitivity_curves(model, data, mode: str, stats, scales, grid, windows: int = 1, tokens: int | None = None,
                       progress: bool = False) -> dict[str, list[float]]:
    """{input: [C_j(s) for s in grid]}: mean KL(dense || sparse) at the logits, input j alone,
    on the first `tokens` tokens (default all) of the first `windows` kept windows."""
    from rarefy.sparsity.activation import INPUT_NAMES, decoder_layers, input_sites

    sites = input_sites(model)
    layers = decoder_layers(model)
    n_win = min(windows, len(data.layer_inputs[0]) if data.layer_inputs else 0)
    if n_win < 1:
        raise RarefyError("global allocation needs layer inputs: collect_statistics(keep_windows > 0)")
    n = tokens or data.layer_inputs[0][0].shape[1]

    def inputs(i, w):  # prefixes are exact: attention is causal
        return data.layer_inputs[i][w][:, :n], tuple(r[:, :n] for r in data.rope[w])

    refs = [_logprobs(model, _tail(layers, 0, *inputs(0, w))) for w in range(n_win)]
    names = [f"{i}.{n}" for i in range(len(layers)) for n in INPUT_NAMES]
    it = names
    if progress:
        from tqdm import tqdm
        it = tqdm(names, desc="sensitivity", unit="input", leave=False)
    out = {}
    for name in it:
        i = int(name.split(".")[0])
        scale = None if scales is None else scales[name]
        curve = []
        for s in grid:
            param = stats[name].param(mode, s)
            handle = sites[name].hook.register_forward_pre_hook(
                lambda mod, args, p=param, sc=scale: (apply_rule(mode, p, args[0], sc)[0],) + tuple(args[1:]))
            try:
                kl = 0.0
                for w in range(n_win):
                    lp = _logprobs(model, _tail(layers, i, *inputs(i, w)))
                    ref = refs[w]
                    kl += float((ref.exp() * (ref - lp)).sum(-1).mean())
            finally:
                handle.remove()
            curve.append(max(kl / n_win, 0.0))
        out[name] = curve
    return out


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of points sorted by x (Andrew's monotone chain, lower half)."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] not below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(curves: dict[str, list[float]], grid, weights: dict[str, int], target: float) -> dict[str, float]:
    """Per-input sparsities minimising the summed hull costs at weighted average `target`."""
    if target <= 0:
        return {n: 0.0 for n in curves}
    segments = []
    for n, curve in curves.items():
        hull = _hull([(0.0, 0.0)] + list(zip(grid, curve)))
        for (a, ca), (b, cb) in itertools.pairwise(hull):
            segments.append(((cb - ca) / (weights[n] * (b - a)), a, n, b))
    segments.sort()
    total = sum(weights[n] for n in curves)
    budget = target * total
    s = {n: 0.0 for n in curves}
    spent = 0.0
    for _, a, n, b in segments:
        gain = weights[n] * (b - a)
        if spent + gain >= budget:
            s[n] = a + (budget - spent) / weights[n]
            return s
        s[n] = b
        spent += gain
    raise RarefyError(f"global allocation could not reach sparsity {target} (the grid ends at {grid[-1]})")


def global_allocation(model, data, sparsities, mode: str, stats, scales, grid=DEFAULT_GRID, windows: int = 1,
                      tokens: int | None = None, progress: bool = False):
    """Per target, {input: sparsity}; and a report with the curves and the predicted costs."""
    from rarefy.sparsity.activation import _key, input_weights

    grid = check_global_options(sparsities, grid)
    curves = sensitivity_curves(model, data, mode, stats, scales, grid, windows, tokens, progress)
    weights = input_weights(model)
    alloc = [allocate(curves, grid, weights, float(t)) for t in sparsities]

    report = {"grid": grid, "windows": min(windows, len(data.layer_inputs[0])),
              "tokens": min(tokens or data.seq_len, data.layer_inputs[0][0].shape[1]),
              "predicted_cost": {_key(t): {"global": _total(curves, grid, a),
                                           "uniform": _total(curves, grid, {n: float(t) for n in curves})}
                                 for t, a in zip(sparsities, alloc)},
              "curves": {n: [round(v, 6) for v in c] for n, c in curves.items()}}
    return alloc, report


def _interp(grid, curve, s: float) -> float:
    xs, ys = [0.0] + list(grid), [0.0] + list(curve)
    for (a, ca), (b, cb) in itertools.pairwise(zip(xs, ys)):
        if s <= b:
            return ca + (cb - ca) * (s - a) / (b - a)
    return ys[-1]


def _total(curves, grid, s_of) -> float:
    """Summed (interpolated) cost of an allocation: the additive model's prediction."""
    return float(sum(_interp(grid, c, s_of[n]) for n, c in curves.items()))
