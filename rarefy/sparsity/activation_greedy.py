"""Greedy block-wise allocation of activation sparsity across a layer's four inputs.

After TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models"),
which allocates sparsity per block greedily instead of uniformly. The algorithm here:

For each decoder layer, on the layer's dense inputs from a few calibration windows:

1. Start with every input (attn_in, o_in, mlp_in, down_in) at sparsity 0.
2. For each input j below the cap, try raising its sparsity by `step` (the rule's parameter
   for that sparsity comes from the dense calibration statistics, as for uniform allocation)
   and measure the layer output error E = ||y - y_dense||^2 / ||y_dense||^2 (y: the layer's
   output, residual included, on a random subset of the windows' tokens; attention always
   sees the full windows).
3. Take the step with the least added error per unit of layer sparsity gained,
   (E_j - E) / (w_j * step), where w_j is input j's share of the layer's weights
   (attn_in: q+k+v, o_in: o, mlp_in: gate+up, down_in: down). The layer sparsity is the
   weight-weighted average sum_j w_j s_j. The search is lazy: a candidate's score from an
   earlier step is kept as an estimate (an error's growth rarely slows as sparsity rises), and
   only the candidate with the lowest estimate is measured again; it is taken if its fresh
   score is still the lowest. This measures ~2 candidates per step instead of 4.
4. When a step carries the layer sparsity past a target T, record the allocation with the
   chosen input raised only part of the step, so that sum_j w_j s_j = T exactly.
5. Repeat until the largest target is reached.

For every target the recorded allocation's error is compared with uniform allocation's (all
inputs at T) on the same tokens; if uniform is better, the layer keeps uniform for that target
(reported as ``uniform_kept``). Only the stage of the layer downstream of the changed input is
recomputed for each candidate.

With ``upstream="sparse"`` the search runs once per target instead of once for all, on the
layer inputs that the model produces with every earlier layer sparsified by its allocation
for that target (the windows are carried from layer to layer); the error is still this
layer's, against its own output with no sparsity in it, on those inputs. It costs about
(sum of targets) / (largest target) times the dense-input search.
"""

from __future__ import annotations

import torch

from rarefy.errors import RarefyError
from rarefy.sparsity.activation_modes import apply_rule

CAP = 0.99  # highest sparsity the greedy search gives one input
UPSTREAM = ("dense", "sparse")  # the layer inputs the search runs on
_EPS = 1e-9


def check_greedy_options(sparsities, step: float, windows: int, tokens: int, upstream: str = "dense") -> None:
    if upstream not in UPSTREAM:
        raise RarefyError(f"greedy upstream must be one of {', '.join(UPSTREAM)}, got {upstream!r}")
    if not 0.0 < step <= 0.25:
        raise RarefyError(f"greedy step must be in (0, 0.25], got {step}")
    if windows < 1 or tokens < 1:
        raise RarefyError("greedy allocation needs at least one window and one token")
    if max(sparsities) > CAP:
        raise RarefyError(f"greedy allocation reaches at most sparsity {CAP}, got {max(sparsities)}")


class _Stop(Exception):
    """Raised by a capture hook to skip the rest of a module's forward."""


class _LayerProbe:
    """The layer split into four stages, one per input, each recomputable from its input on."""

    def __init__(self, layer, hs, sites, names, data, mode, token_idx, stats=None, scales=None):
        """names: the layer's four input names in INPUT_NAMES order; hs: its dense inputs;
        stats / scales: the criterion's statistics and per-channel scales (None: magnitude)."""
        self.layer, self.mode = layer, mode
        stats = data.stats if stats is None else stats
        self.stats = [stats[n] for n in names]
        self.scales = [None if scales is None else scales[n] for n in names]
        self.o_proj, self.down = sites[names[1]].hook, sites[names[3]].hook
        self.hs, self.rope = hs, data.rope
        self.token_idx = token_idx
        self.a = [layer.input_layernorm(h) for h in hs]
        self.h = torch.cat([h.reshape(-1, h.shape[-1]) for h in hs])[token_idx]
        self._params: dict = {}
        self._capture = None
        self._handles = [m.register_forward_pre_hook(self._grab) for m in (self.o_proj, self.down)]

    def close(self):
        for h in self._handles:
            h.remove()

    def _grab(self, mod, args):
        if self._capture is not None and self._capture[0] is mod:
            self._capture[1].append(args[0])
            raise _Stop

    def _op(self, j, s, x):
        if s <= 0:
            return x
        key = (j, round(s, 9))
        if key not in self._params:
            self._params[key] = self.stats[j].param(self.mode, s)
        return apply_rule(self.mode, self._params[key], x, self.scales[j])[0]

    def _run_until(self, mod, fn):
        self._capture = (mod, [])
        try:
            fn()
        except _Stop:
            pass
        finally:
            got, self._capture = self._capture[1], None
        if len(got) != 1:
            raise RarefyError("greedy allocation needs the standard decoder layer "
                              "(attention output through o_proj, MLP output through down_proj)")
        return got[0]

    def attention_input_of_o(self, s):
        outs = []
        for a, (cos, sin, pos) in zip(self.a, self.rope):
            xa = self._op(0, s, a)
            o = self._run_until(self.o_proj, lambda: self.layer.self_attn(xa, cos, sin, pos, None, None, None))
            outs.append(o.reshape(-1, o.shape[-1]))
        return torch.cat(outs)[self.token_idx]

    def full_outputs(self, s):
        """The layer's output on every window with input sparsities s (to feed the next layer)."""
        mods = [self.layer.self_attn, self.o_proj, self.layer.mlp, self.down]

        def hook(j):
            return lambda mod, args: (self._op(j, s[j], args[0]),) + tuple(args[1:])

        handles = [m.register_forward_pre_hook(hook(j)) for j, m in enumerate(mods)]
        try:
            return [self.layer(h, cos, sin, pos, None, None, None) for h, (cos, sin, pos) in zip(self.hs, self.rope)]
        finally:
            for h in handles:
                h.remove()

    def run(self, s, start=0, cache=None):
        """Layer output on the token subset with input sparsities s; recomputes from stage
        `start` on, reusing `cache` (the previous run's intermediates) before it."""
        o_in, h_mid, d_in, out = cache if cache is not None else (None,) * 4
        if start <= 0:
            o_in = self.attention_input_of_o(s[0])
        if start <= 1:
            h_mid = self.h + self.o_proj(self._op(1, s[1], o_in))
        if start <= 2:
            xm = self._op(2, s[2], self.layer.post_attention_layernorm(h_mid))
            d_in = self._run_until(self.down, lambda: self.layer.mlp(xm))
        if start <= 3:
            out = h_mid + self.down(self._op(3, s[3], d_in))
        return o_in, h_mid, d_in, out


def _error(out, ref, ref_sq) -> float:
    return float((out.float() - ref).pow(2).sum() / ref_sq)


@torch.no_grad()
def greedy_allocation(model, data, sparsities, mode: str, step: float = 0.05, tokens: int = 256,
                      seed: int = 0, progress: bool = False, stats=None, scales=None, upstream: str = "dense"):
    """Per target, {input name: sparsity} over all layers; and a report
    {"error": {level: {"greedy": [per layer], "uniform": [per layer]}}, "uniform_kept": {level: n},
     "tokens": tokens used per layer}."""
    from rarefy.sparsity.activation import INPUT_NAMES, _key, decoder_layers, input_sites

    check_greedy_options(sparsities, step, 1, tokens, upstream)
    targets = sorted(float(s) for s in sparsities)
    sites = input_sites(model)
    layers = decoder_layers(model)
    n_tok = sum(h.shape[0] * h.shape[1] for h in data.layer_inputs[0])
    gen = torch.Generator().manual_seed(seed + 7)
    token_idx = torch.randperm(n_tok, generator=gen)[:min(tokens, n_tok)].sort().values
    token_idx = token_idx.to(data.layer_inputs[0][0].device)
    alloc = [dict() for _ in targets]
    report = {"error": {_key(t): {"greedy": [], "uniform": []} for t in targets},
              "uniform_kept": {_key(t): 0 for t in targets}, "tokens": int(token_idx.numel())}
    it = range(len(layers))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="greedy allocation", unit="layer", leave=False)
    carried = [list(data.layer_inputs[0]) for _ in targets]  # upstream="sparse": inputs per target
    for i in it:
        names = [f"{i}.{n}" for n in INPUT_NAMES]
        weights = [sites[n].weights for n in names]
        if upstream == "dense":
            probe = _LayerProbe(layers[i], data.layer_inputs[i], sites, names, data, mode, token_idx, stats, scales)
            try:
                levels = _greedy_layer(probe, layers[i], weights, targets, step)
            finally:
                probe.close()
        else:
            levels = []
            for t_idx, t in enumerate(targets):
                probe = _LayerProbe(layers[i], carried[t_idx], sites, names, data, mode, token_idx, stats, scales)
                try:
                    (s, err_g, err_u), = _greedy_layer(probe, layers[i], weights, [t], step)
                    levels.append((s, err_g, err_u))
                    if i + 1 < len(layers):
                        carried[t_idx] = probe.full_outputs([t] * 4 if err_u < err_g else s)
                finally:
                    probe.close()
        for t_idx, t in enumerate(targets):
            s, err_g, err_u = levels[t_idx]
            report["error"][_key(t)]["greedy"].append(err_g)
            report["error"][_key(t)]["uniform"].append(err_u)
            if err_u < err_g:
                s = [t] * 4
                report["uniform_kept"][_key(t)] += 1
            alloc[t_idx].update({n: float(v) for n, v in zip(names, s)})
    return alloc, report


def _greedy_layer(probe: _LayerProbe, layer, weights, targets, step):
    """[(allocation, greedy error, uniform error)] per target."""
    total = float(sum(weights))
    w = [x / total for x in weights]
    zero = [0.0] * 4
    cache = probe.run(zero)
    ref = cache[3].float()
    ref_sq = max(float(ref.pow(2).sum()), 1e-30)
    _check_stages(probe, layer, ref)

    def avg(s):
        return sum(wi * si for wi, si in zip(w, s))

    recorded = {}
    s, err = list(zero), 0.0
    t_next = 0
    while t_next < len(targets) and targets[t_next] <= _EPS:
        recorded[t_next] = list(zero)
        t_next += 1
    scores: list[float | None] = [None] * 4  # last measured added error per unit of layer sparsity
    while t_next < len(targets):
        # lazy greedy: take the input with the lowest score; if that score is stale (measured
        # before the last step), measure it again and retry; a fresh lowest score wins.
        fresh: dict[int, tuple] = {}
        while True:
            avail = [j for j in range(4) if s[j] < CAP - _EPS]
            if not avail:  # every input at the cap; cannot happen for targets <= CAP
                raise RarefyError("greedy allocation could not reach the target sparsity")
            j = min(avail, key=lambda k: float("-inf") if scores[k] is None else scores[k])
            if j in fresh:
                best = fresh[j]
                break
            cand = list(s)
            cand[j] = min(s[j] + step, CAP)
            c = probe.run(cand, start=j, cache=cache)
            e = _error(c[3], ref, ref_sq)
            scores[j] = (e - err) / (w[j] * (cand[j] - s[j]))
            fresh[j] = (scores[j], j, cand, c, e)
        _, j, cand, c, e = best
        a0, a1 = avg(s), avg(cand)
        while t_next < len(targets) and targets[t_next] <= a1 + _EPS:
            rec = list(s)
            rec[j] = min(cand[j], s[j] + max(0.0, targets[t_next] - a0) / w[j])
            recorded[t_next] = rec
            t_next += 1
        s, err, cache = cand, e, c
    out = []
    for t_idx, t in enumerate(targets):
        rec = recorded[t_idx]
        if t <= _EPS:
            out.append((rec, 0.0, 0.0))
            continue
        e_g = _error(probe.run(rec)[3], ref, ref_sq)
        e_u = _error(probe.run([t] * 4)[3], ref, ref_sq)
        out.append((rec, e_g, e_u))
    return out


def _check_stages(probe: _LayerProbe, layer, ref) -> None:
    """The staged dense computation must equal the layer's own forward."""
    full = []
    for h, (cos, sin, pos) in zip(probe.hs, probe.rope):
        y = layer(h, cos, sin, pos, None, None, None)
        full.append(y.reshape(-1, y.shape[-1]))
    full = torch.cat(full)[probe.token_idx].float()
    rel = float((full - ref).norm() / full.norm().clamp_min(1e-30))
    if rel > 1e-2:
        raise RarefyError("greedy allocation needs the standard decoder layer h + attn(norm(h)) + "
                          f"mlp(norm(h)); the staged computation differs by {rel:.2g}")
