"""Refine an allocation of activation sparsity with the measured output KL at its operating point.

The global allocation (rarefy.sparsity.activation_global) takes each input's cost from the
dense model, alone, to second order. At the operating point every input is sparsified at
once, and there the KL to the dense model has a first-order term that the Fisher expansion
(which assumes the dense model, where the gradient of the KL vanishes) does not see, plus the
interactions between inputs. Here the true KL is measured instead, on calibration text:

1. Inputs are grouped by kind (attn_in, o_in, mlp_in, down_in) and by blocks of ``block``
   consecutive layers (the embedded model: 4 kinds x 6 blocks of 5 layers = 24 groups), so
   that one measured step moves a systematic error of the estimate, not per-input noise.
2. At the allocation s, with every input sparsified, the layer inputs of the calibration
   windows are cached; for each group G the sparsity of its inputs is raised by ``step`` and
   the model is run from G's first layer to the logits: the finite difference of the mean
   KL(dense || sparse) per gated weight added is G's marginal cost r_G.
3. Sparsity moves from the groups of highest marginal cost to those of lowest: each group's
   inputs shift by -a (r_G - lambda) / spread, clipped to [-step, step] and to [0, max],
   with lambda set so that the weighted average sparsity stays the target. The step length a
   is chosen among a few by the measured KL of the whole sparsified model (kept only if it
   improves on s), then the next round starts from there.

Cost per round: (groups) partial passes plus a few full passes per window.
"""

from __future__ import annotations

import torch

from rarefy.errors import RarefyError
from rarefy.sparsity.activation_modes import apply_rule

STEP_SCALES = (1.0, 0.5, 0.25)


def groups_of(names: list[str], block: int) -> dict[str, list[str]]:
    """{group: inputs}: inputs of one kind in `block` consecutive layers."""
    if block < 1:
        raise RarefyError(f"the refinement block must be at least one layer, got {block}")
    out: dict[str, list[str]] = {}
    for n in names:
        layer, kind = n.split(".", 1)
        out.setdefault(f"{int(layer) // block}.{kind}", []).append(n)
    return out


class _Runner:
    """Sparsified forward passes over cached calibration windows, KL to the dense logits."""

    def __init__(self, model, data, mode, stats, scales, windows: int, tokens: int | None):
        from rarefy.sparsity.activation import decoder_layers, input_sites

        self.model, self.mode, self.stats, self.scales = model, mode, stats, scales
        self.sites = input_sites(model)
        self.layers = decoder_layers(model)
        n_win = min(windows, len(data.layer_inputs[0]) if data.layer_inputs else 0)
        if n_win < 1:
            raise RarefyError("refining an allocation needs layer inputs: collect_statistics(keep_windows > 0)")
        n = tokens or data.layer_inputs[0][0].shape[1]
        self.h0 = [data.layer_inputs[0][w][:, :n] for w in range(n_win)]
        self.rope = [tuple(r[:, :n] for r in data.rope[w]) for w in range(n_win)]
        self.refs = [self._logprobs(self._tail(0, h, r)) for h, r in zip(self.h0, self.rope)]
        self.cache: list[list[torch.Tensor]] = []

    def _logprobs(self, h):
        return torch.log_softmax(self.model.lm_head(self.model.model.norm(h)).float(), dim=-1)

    def _tail(self, start, h, rope):
        cos, sin, pos = rope
        for layer in self.layers[start:]:
            h = layer(h, cos, sin, pos, None, None, None)
        return h

    def _hooks(self, alloc: dict[str, float]):
        hs = []
        for name, site in self.sites.items():
            p = self.stats[name].param(self.mode, alloc[name])
            sc = None if self.scales is None else self.scales[name]
            hs.append(site.hook.register_forward_pre_hook(
                lambda mod, args, p=p, sc=sc: (apply_rule(self.mode, p, args[0], sc)[0],) + tuple(args[1:])))
        return hs

    def _kl(self, lp, ref) -> float:
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    @torch.no_grad()
    def full(self, alloc: dict[str, float], keep: bool = False) -> float:
        """Mean KL with every input at `alloc`; `keep` caches every layer's input."""
        hs = self._hooks(alloc)
        if keep:
            self.cache = [[] for _ in self.h0]
            for w in range(len(self.h0)):
                hs += [layer.register_forward_pre_hook(
                    lambda mod, args, w=w: self.cache[w].append(args[0].detach())) for layer in self.layers]
        try:
            kl = sum(self._kl(self._logprobs(self._tail(0, h, r)), ref)
                     for h, r, ref in zip(self.h0, self.rope, self.refs))
        finally:
            for h in hs:
                h.remove()
        return kl / len(self.h0)

    @torch.no_grad()
    def partial(self, alloc: dict[str, float], start: int) -> float:
        """Mean KL with every input at `alloc`, run from layer `start` on the cached inputs."""
        hs = self._hooks(alloc)
        try:
            kl = sum(self._kl(self._logprobs(self._tail(start, self.cache[w][start], r)), ref)
                     for w, (r, ref) in enumerate(zip(self.rope, self.refs)))
        finally:
            for h in hs:
                h.remove()
        return kl / len(self.h0)


def _shift(alloc, groups, weights, delta: dict[str, float], hi: float) -> dict[str, float]:
    out = dict(alloc)
    for g, d in delta.items():
        for n in groups[g]:
            out[n] = min(max(alloc[n] + d, 0.0), hi)
    return out


def _balanced(alloc, groups, weights, rate, step, hi, scale) -> dict[str, float]:
    """Shift each group by -scale*step*(r_G - lambda)/spread (clipped), lambda by bisection so
    that the weighted average sparsity is unchanged."""
    total_w = sum(weights.values())
    target = sum(weights[n] * v for n, v in alloc.items()) / total_w
    vals = sorted(rate.values())
    spread = max(vals[-1] - vals[0], 1e-30) / 2

    def make(lam):
        delta = {g: max(-step, min(step, -scale * step * (r - lam) / spread)) for g, r in rate.items()}
        return _shift(alloc, groups, weights, delta, hi)

    lo_l, hi_l = vals[0] - 4 * spread, vals[-1] + 4 * spread  # sparsity rises with lambda
    for _ in range(60):
        mid = (lo_l + hi_l) / 2
        a = make(mid)
        if sum(weights[n] * v for n, v in a.items()) / total_w < target:
            lo_l = mid
        else:
            hi_l = mid
    a = make((lo_l + hi_l) / 2)
    # the bisection leaves a tiny residue; put it on the largest group to hit the target exactly
    miss = target * total_w - sum(weights[n] * v for n, v in a.items())
    biggest = max(a, key=lambda n: weights[n] if 0.0 < a[n] < hi else -1)
    a[biggest] = min(max(a[biggest] + miss / weights[biggest], 0.0), hi)
    return a


def refine_measured(model, data, mode: str, stats, scales, alloc: dict[str, float], weights: dict[str, int],
                    rounds: int = 2, block: int = 5, step: float = 0.05, windows: int = 1,
                    tokens: int | None = 256, hi: float = 0.9, progress: bool = False):
    """The allocation after `rounds` measured rounds (see the module doc), and a log per round."""
    if rounds < 0 or not 0.0 < step < 1.0:
        raise RarefyError(f"refinement needs rounds >= 0 and a step in (0, 1), got {rounds}, {step}")
    run = _Runner(model, data, mode, stats, scales, windows, tokens)
    groups = groups_of(list(alloc), block)
    first = {g: min(int(n.split(".")[0]) for n in ns) for g, ns in groups.items()}
    log = []
    cur = dict(alloc)
    cur_kl = run.full(cur, keep=True)
    for rnd in range(rounds):
        rate = {}
        for g, ns in groups.items():
            up = _shift(cur, groups, weights, {g: step}, hi)
            added = sum(weights[n] * (up[n] - cur[n]) for n in ns)
            if added <= 0:
                continue
            rate[g] = (run.partial(up, first[g]) - cur_kl) / added
        if len(rate) < 2:
            break
        best, best_kl = None, cur_kl
        tried = {}
        for sc in STEP_SCALES:
            cand = _balanced(cur, {g: groups[g] for g in rate}, weights, rate, step, hi, sc)
            tried[sc] = run.full(cand)
            if tried[sc] < best_kl:
                best, best_kl = cand, tried[sc]
        log.append({"round": rnd, "kl": cur_kl, "tried": tried, "rates": rate})
        if progress:
            print(f"refine round {rnd}: KL {cur_kl:.5f} -> {best_kl:.5f}", flush=True)
        if best is None:
            break
        cur = best
        cur_kl = run.full(cur, keep=True)
    log.append({"final_kl": cur_kl})
    return cur, log
