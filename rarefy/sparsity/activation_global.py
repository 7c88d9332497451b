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

Two ways to get the curves: ``kl`` measures them as above, (inputs x grid points) partial
forward passes, about half the model each (20+ minutes for the embedded model on 2 busy
cores, even on a 128-token prefix). ``fisher`` (default) estimates them to second order from
gradients: KL(p || p + dp) ~ 1/2 dx^T F dx, F the Fisher information of the model's own
next-token distribution, from a few backward passes that give the gradient at every input at
once (see fisher_curves; about a minute). On the test model the two agree within tens of
percent at every grid point (tests/sparsity/test_activation_global.py).

The additivity is an approximation (errors of different inputs interact), the same one the
layer-wise greedy makes within a layer.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch

from rarefy.errors import RarefyError
from rarefy.sparsity.activation_modes import apply_rule

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("fisher", "kl")


def _setup(model, data, windows: int, tokens: int | None):
    """(input sites, decoder layers, windows used, tokens per window) for the sensitivity passes."""
    from rarefy.sparsity.activation import decoder_layers, input_sites

    n_win = min(windows, len(data.layer_inputs[0]) if data.layer_inputs else 0)
    if n_win < 1:
        raise RarefyError("global allocation needs layer inputs: collect_statistics(keep_windows > 0)")
    return input_sites(model), decoder_layers(model), n_win, tokens or data.layer_inputs[0][0].shape[1]


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
    from rarefy.sparsity.activation import INPUT_NAMES

    sites, layers, n_win, n = _setup(model, data, windows, tokens)

    def inputs(i, w):  # prefixes are exact: attention is causal
        return data.layer_inputs[i][w][:, :n], tuple(r[:, :n] for r in data.rope[w])

    refs = [_logprobs(model, _tail(layers, 0, *inputs(0, w))) for w in range(n_win)]
    names = [f"{i}.{inp}" for i in range(len(layers)) for inp in INPUT_NAMES]
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


@contextmanager
def _differentiable():
    """fp16-stored weights run small calls through a C++ GEMV without autograd; send every
    call through torch's matmul while gradients are taken."""
    import rarefy.layers.half_weight_linear as hw

    old = hw.MAX_GEMV_ROWS
    hw.MAX_GEMV_ROWS = 0
    try:
        yield
    finally:
        hw.MAX_GEMV_ROWS = old


def fisher_curves(model, data, mode: str, stats, scales, grid, windows: int = 1, tokens: int | None = None,
                  samples: int = 4, seed: int = 0, operating: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Second-order estimate of the same curves from gradients, in one pass per label sample.

    KL(p || p + dp) ~ 1/2 dx^T F dx with F the Fisher information of the model's own next-token
    distribution; F = E_y[g g^T], g the gradient of sum_t log p(y_t) (labels y sampled from the
    dense model) with respect to the input. Dropping entries changes input j by dx_j (the
    dropped entries, negated), and C_j(s) ~ 1/(2T) sum_t mean_y (g_t . dx_t)^2, token
    cross-terms left out. One forward and backward per label sample gives g for every input at
    once, instead of (inputs x grid) partial forward passes.

    ``operating`` ({input: parameter}): estimate at that operating point instead of the dense
    model. Every input is sparsified by its parameter; x_j (the input as it arrives, with
    everything upstream sparsified) gives the dropped part at each grid point, and g is taken
    at the sparsified input. Labels are still sampled from the dense model.
    """
    from rarefy.sparsity.activation import INPUT_NAMES

    sites, layers, n_win, n = _setup(model, data, windows, tokens)
    names = [f"{i}.{inp}" for i in range(len(layers)) for inp in INPUT_NAMES]
    gen = torch.Generator().manual_seed(seed + 13)
    acc = {name: torch.zeros(len(grid), dtype=torch.float64) for name in names}
    total_tokens = 0
    for w in range(n_win):
        h0 = data.layer_inputs[0][w][:, :n].detach()
        rope = tuple(r[:, :n] for r in data.rope[w])
        drops: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():  # the dropped part of every input at every grid point
            probs = torch.softmax(model.lm_head(model.model.norm(_tail(layers, 0, h0, rope))).float(), -1)
            xs: dict[str, torch.Tensor] = {}

            def record(mod, args, name=None, xs=xs):
                xs[name] = args[0].detach()
                if operating is not None:
                    sc = None if scales is None else scales[name]
                    return (apply_rule(mode, operating[name], args[0], sc)[0],) + tuple(args[1:])
                return None
            handles = [s.hook.register_forward_pre_hook(lambda mod, args, name=name: record(mod, args, name))
                       for name, s in sites.items()]
            try:
                _tail(layers, 0, h0, rope)
            finally:
                for hd in handles:
                    hd.remove()
            for name in names:
                sc = None if scales is None else scales[name]
                drops[name] = [xs[name] - apply_rule(mode, stats[name].param(mode, g), xs[name], sc)[0] for g in grid]
            xs.clear()
        for _ in range(samples):
            labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(probs.shape[:-1])
            seen: dict[str, torch.Tensor] = {}

            def keep(mod, args, name=None, seen=seen):
                x = args[0]
                if operating is not None:
                    sc = None if scales is None else scales[name]
                    x = apply_rule(mode, operating[name], x, sc)[0]
                if not x.requires_grad:
                    raise RarefyError(f"the fisher sensitivity needs gradients through the model, and input {name} "
                                      "has none (a projection without autograd?); use --global-method kl")
                x.retain_grad()
                seen[name] = x
                return (x,) + tuple(args[1:]) if operating is not None else None
            handles = [s.hook.register_forward_pre_hook(lambda mod, args, name=name: keep(mod, args, name))
                       for name, s in sites.items()]
            try:
                with torch.enable_grad(), _differentiable():
                    h = h0.clone().requires_grad_(True)
                    lp = torch.log_softmax(model.lm_head(model.model.norm(_tail(layers, 0, h, rope))).float(), -1)
                    lp.gather(-1, labels.unsqueeze(-1)).sum().backward()
            finally:
                for hd in handles:
                    hd.remove()
            with torch.no_grad():
                for name in names:
                    g = seen[name].grad
                    for k, dx in enumerate(drops[name]):
                        acc[name][k] += float(((g * dx).sum(-1).double() ** 2).sum())
            del seen
        total_tokens += h0.shape[0] * h0.shape[1]
    return {name: [float(v) / (2 * samples * total_tokens) for v in acc[name]] for name in names}


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


#: calibration windows the measured sparsity of --global-match runs on
MATCH_WINDOWS = 8


@torch.no_grad()
def measured_sparsity_of(model, data, mode: str, stats, scales, alloc: dict[str, float],
                         windows: int = MATCH_WINDOWS, tokens: int | None = None) -> float:
    """Fraction of decoder weight reads skipped (inputs weighted by the weights they gate) when
    every input is sparsified by `alloc`'s parameter, on `windows` calibration windows (the
    windows' tokens through the whole model when the data holds them, else the kept layer
    inputs): the sparsity reached with upstream inputs already sparsified, which differs from
    the allocation's nominal average (thresholds come from dense statistics)."""
    from rarefy.sparsity.activation import input_sites, input_weights, measured_sparsity

    sites = input_sites(model)
    counts = {name: [0, 0] for name in sites}

    def hook(name, p, sc):
        def pre(mod, args):
            y, dropped = apply_rule(mode, p, args[0], sc)
            counts[name][0] += int(dropped)
            counts[name][1] += args[0].numel()
            return (y,) + tuple(args[1:])
        return pre

    handles = [site.hook.register_forward_pre_hook(hook(name, stats[name].param(mode, alloc[name]),
                                                        None if scales is None else scales[name]))
               for name, site in sites.items()]
    try:
        if data.windows:
            device = next(model.parameters()).device
            for w in data.windows[:windows]:
                model(torch.tensor([w], device=device))
        else:
            _, layers, n_win, n = _setup(model, data, windows, tokens)
            for w in range(n_win):
                _tail(layers, 0, data.layer_inputs[0][w][:, :n], tuple(r[:, :n] for r in data.rope[w]))
    finally:
        for h in handles:
            h.remove()
    return measured_sparsity(counts, input_weights(model))


def match_sparsity(model, data, mode, stats, scales, curves, grid, weights, target: float, rounds: int,
                   windows: int = MATCH_WINDOWS, tokens: int | None = None):
    """Allocation whose *measured* sparsity on the calibration windows is `target`: the
    nominal average is moved by the miss, `rounds` times (the measured sparsity follows the
    nominal one with slope close to 1). Returns (allocation, log of (nominal, measured))."""
    nominal, log = float(target), []
    alloc = allocate(curves, grid, weights, nominal)
    for _ in range(rounds):
        got = measured_sparsity_of(model, data, mode, stats, scales, alloc, windows, tokens)
        log.append((round(nominal, 5), round(got, 5)))
        nominal = min(max(nominal + (target - got), 0.0), grid[-1] - 1e-6)
        alloc = allocate(curves, grid, weights, nominal)
    return alloc, log


def global_allocation(model, data, sparsities, mode: str, stats, scales, grid=DEFAULT_GRID, windows: int = 1,
                      tokens: int | None = None, progress: bool = False, method: str = "fisher",
                      refine: int = 0, samples: int = 4, match: int = 0):
    """Per target, {input: sparsity}; and a report with the curves and the predicted costs.
    ``match``: rounds of moving each target's nominal average until the sparsity measured on
    the kept calibration windows (upstream inputs sparsified) is the target (match_sparsity)."""
    from rarefy.sparsity.activation import _key, input_weights

    grid = check_global_options(sparsities, grid)
    if method == "kl":
        curves = sensitivity_curves(model, data, mode, stats, scales, grid, windows, tokens, progress)
    elif method == "fisher":
        curves = fisher_curves(model, data, mode, stats, scales, grid, windows, tokens, samples=samples)
    else:
        raise RarefyError(f"unknown sensitivity method {method!r}; known: {', '.join(METHODS)}")
    weights = input_weights(model)
    alloc = [allocate(curves, grid, weights, float(t)) for t in sparsities]
    if refine and method != "fisher":
        raise RarefyError("refining the global allocation needs --global-method fisher")
    for _ in range(refine):  # re-estimate each target's curves at its own operating point
        for k, t in enumerate(sparsities):
            if t <= 0:
                continue
            ops = {n: stats[n].param(mode, v) for n, v in alloc[k].items()}
            c_t = fisher_curves(model, data, mode, stats, scales, grid, windows, tokens, samples=samples,
                                operating=ops)
            alloc[k] = allocate(c_t, grid, weights, float(t))

    matched = {}
    if match:
        for k, t in enumerate(sparsities):
            if t > 0:
                alloc[k], matched[_key(t)] = match_sparsity(model, data, mode, stats, scales, curves, grid, weights,
                                                           float(t), match)
    report = {"grid": grid, "method": method, "refine": refine, "samples": samples, "match": matched,
              "windows": min(windows, len(data.layer_inputs[0])),
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
