"""Per-layer window budgets: give each layer the sink + recent window it needs under an
average memory budget (docs/attention-policies.md, "Per-layer window budgets").

A uniform window spends the same blocks on every layer, but layers differ a lot in how
far back they read (PyramidKV, DuoAttention). Calibration measures, on text that is not
used for evaluation, how much each layer's attention output changes when it only reads a
candidate window instead of every key; an allocation then grows the windows of the layers
where an extra block removes the most error, until the average budget is spent.

    errs = measure_window_errors(model, chunks, candidates)       # one dense forward per chunk
    alloc = allocate_windows(errs, budget=0.25)                     # greedy, per layer
    alloc.config                                                    # a PolicyConfig
    write_policy_config(alloc.config, "window-25.toml", header)    # --attention-policy FILE

Memory is counted like `Window.memory_fraction`: peak blocks held while generating `ctx`
tokens over dense's ceil(ctx / block), averaged over layers.

Error metrics (both measured in the same pass, on the scored second half of each chunk,
every layer isolated: its own dense output is what the next layer sees):

- `out` (default): ‖o_proj(o_window − o_dense)‖² / ‖h‖² summed over tokens, h = the layer's
  residual-stream input: how much the window perturbs the residual stream, relative to it.
  Comparable across layers, which the greedy allocation needs.
- `cos`: 1 − mean cosine of (token, query head) attention outputs against dense.
- `grad` (with `grad=True`: one backward pass per chunk): the first-order change of the
  mean NLL of the scored tokens, Σ ⟨∂NLL/∂o, o_window − o_dense⟩ / tokens, o = the layer's
  attention output: an estimate of what the window costs in loss, additive over layers.
- `fisher` (with `fisher=S`: S backward passes per chunk, labels sampled from the model):
  ½ Σ_t E_y[⟨∂log p(y)/∂o_t, o_window,t − o_dense,t⟩²] / tokens, the second-order (Fisher,
  block-diagonal over positions) estimate of the KL between the dense and the windowed
  next-token distributions of the scored tokens: judged by the model's loss, always ≥ 0,
  and without the first-order term that makes `grad` noise.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rarefy.errors import RarefyError
from rarefy.kv.policies import PerHead, PolicyConfig, Window, parse_policy
from rarefy.kv.quant import roundtrip
from rarefy.kv.simulate import clear_eval_attention, simulated_attention

METRICS = ("out", "cos", "grad", "sens", "fisher")
# total blocks held per layer (sinks included) tried by default, at ctx 2048 / block 16 = 128 blocks
DEFAULT_SIZES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128)


def check_budget(budget: float) -> float:
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or not 0.0 < budget <= 1.0:
        raise RarefyError(f"the memory budget is a fraction of the context in (0, 1], got {budget!r}")
    return float(budget)


def window_for_blocks(blocks: int, sinks: int, ctx: int, block_size: int) -> Window | None:
    """The widest `window:sinks=S` whose peak blocks held at `ctx` is ≤ `blocks` (None if even
    window=1 holds more)."""
    def held(w):
        return round(Window(sinks, w, 0, block_size).memory_fraction(ctx, block_size) * -(-ctx // block_size))
    if held(1) > blocks:
        return None
    lo, hi = 1, ctx
    while lo < hi:  # the largest w with held(w) <= blocks (held is non-decreasing in w)
        mid = (lo + hi + 1) // 2
        if held(mid) <= blocks:
            lo = mid
        else:
            hi = mid - 1
    return Window(sinks, lo, 0, block_size)


def candidate_windows(ctx: int, block_size: int = 16, sinks=(16,), sizes=None) -> list[Window]:
    """One window per (sinks, total blocks held) pair, each as wide as its blocks allow; the
    sizes default to DEFAULT_SIZES scaled to ctx. Duplicates are dropped."""
    dense = -(-ctx // block_size)
    if sizes is None:
        sizes = sorted({max(1, min(dense, round(s * dense / 128))) for s in DEFAULT_SIZES})
    out, seen = [], set()
    for s in sinks:
        if s < 0:
            raise RarefyError(f"sink tokens must be ≥ 0, got {s}")
        for m in sizes:
            w = window_for_blocks(int(m), int(s), ctx, block_size)
            if w is not None and w not in seen:
                seen.add(w)
                out.append(w)
    if not out:
        raise RarefyError("no candidate window fits the sizes given")
    return out


# ----------------------------------------------------------------------------- measurement

class _Probe:
    """A layer's eval_attention hook: returns dense (kv-dtype rounded) attention and
    accumulates every candidate's error on the queries at positions ≥ first."""

    def __init__(self, attn, cands: list[Window], first: int, kv_dtype: str, heads: bool = False):
        self.attn, self.cands, self.first, self.kv_dtype = attn, cands, first, kv_dtype
        self.h_sq = 0.0  # Σ ‖h‖² over the measured tokens (set by the layer's pre-hook)
        self.out_sq = torch.zeros(len(cands), dtype=torch.float64)
        self.cos_sum = torch.zeros(len(cands), dtype=torch.float64)
        self.count = 0  # (token, head) pairs
        self.h_total = 0.0
        self.grad_sum = torch.zeros(len(cands), dtype=torch.float64)
        self.heads = heads  # also measure each KV head's error alone (per-head windows)
        self.out_sq_h = None  # [candidate, kv head]
        self.cos_sum_h = None
        self.track_grad = False
        self.saved = None
        self.fisher_grads: list = []  # sampled-label gradients of this chunk (fisher metric)
        self.fisher_sq = torch.zeros(len(cands), dtype=torch.float64)
        self.fisher_sq_h = None

    def pre_hook(self, module, args):
        h = args[0]
        self.h_sq = float(h.detach()[:, self.first:].float().pow(2).sum())
        self.h_total += self.h_sq

    def __call__(self, q, k, v, positions):
        if self.track_grad:  # measured after the backward pass (grad_errors)
            # the rounding of the stored keys/values is kept out of the graph (straight through)
            kr = k + (roundtrip(k.detach().float(), self.kv_dtype).to(k.dtype) - k).detach()
            vr = v + (roundtrip(v.detach().float(), self.kv_dtype).to(v.dtype) - v).detach()
            dense = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            if dense.requires_grad:
                dense.retain_grad()
            else:  # nothing before this layer needs a gradient (frozen weights): a leaf
                dense.requires_grad_(True)
            self.saved = (q.detach(), k.detach(), v.detach(), positions, dense)
            return dense
        dense = simulated_attention(q, k, v, positions, self.kv_dtype, None)
        self._measure(q, k, v, positions, dense, None)
        return dense

    def grad_errors(self):
        q, k, v, positions, dense = self.saved
        self.saved = None
        with torch.no_grad():
            self._measure(q, k, v, positions, dense.detach(), dense.grad)

    def keep_fisher_grad(self):
        """After a sampled-label backward pass: keep ∂(log-likelihood)/∂o of the scored queries."""
        q, k, v, positions, dense = self.saved
        self.fisher_grads.append(dense.grad[:, :, self.first:].float())
        self.saved = (q, k, v, positions, dense.detach())

    def fisher_errors(self):
        q, k, v, positions, dense = self.saved
        self.saved = None
        with torch.no_grad():
            self._measure(q, k, v, positions, dense, None, self.fisher_grads)
        self.fisher_grads = []

    def _measure(self, q, k, v, positions, dense, grad, fisher_grads=None):
        B, Hq, T, D = q.shape
        qs, qpos = q[:, :, self.first:], positions[..., self.first:]
        ref = dense[:, :, self.first:].float()
        o_proj = self.attn.o_proj
        for c, pol in enumerate(self.cands):
            out = simulated_attention(qs, k, v, positions, self.kv_dtype, pol, q_positions=qpos).float()
            cos = F.cosine_similarity(out, ref, dim=-1, eps=1e-12)
            self.cos_sum[c] += float(cos.double().sum())
            if grad is not None:
                self.grad_sum[c] += float(((out - ref) * grad[:, :, self.first:].float()).double().sum())
            if fisher_grads:
                # ½ E_y[(g_t · δ_t)²] per scored query t, g = ∂ log p(y)/∂o with y sampled from the
                # model: the second-order (Fisher) estimate of the KL the window adds, per token
                Hkv = k.shape[1]
                if self.fisher_sq_h is None:
                    self.fisher_sq_h = torch.zeros(len(self.cands), Hkv, dtype=torch.float64)
                for g in fisher_grads:
                    dots = ((out - ref) * g).sum(-1).double()  # [B, Hq, Tq]
                    self.fisher_sq[c] += 0.5 * float(dots.sum(1).pow(2).sum()) / len(fisher_grads)
                    per_kv = dots.reshape(B, Hkv, Hq // Hkv, -1).sum(2)
                    self.fisher_sq_h[c] += 0.5 * per_kv.pow(2).sum((0, 2)) / len(fisher_grads)
            diff = (out - ref).transpose(1, 2).reshape(B, T - self.first, Hq * D)
            if not self.heads:
                self.out_sq[c] += float(o_proj(diff.to(q.dtype)).float().pow(2).sum())
                continue
            Hkv = k.shape[1]
            G = Hq // Hkv
            if self.out_sq_h is None:
                self.out_sq_h = torch.zeros(len(self.cands), Hkv, dtype=torch.float64)
                self.cos_sum_h = torch.zeros(len(self.cands), Hkv, dtype=torch.float64)
            self.cos_sum_h[c] += cos.double().reshape(B, Hkv, G, -1).sum((0, 2, 3))
            weight = getattr(o_proj, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.shape[-1] == Hq * D:
                # o_proj is linear: the residual change of head h alone is W[:, cols(h)] @ diff[cols(h)],
                # and the layer's is their sum (one o_proj's worth of work in all)
                ys = [F.linear(diff[..., h * G * D:(h + 1) * G * D].to(weight.dtype),
                               weight[:, h * G * D:(h + 1) * G * D]).float() for h in range(Hkv)]
                for h, y in enumerate(ys):
                    self.out_sq_h[c, h] += float(y.pow(2).sum())
                self.out_sq[c] += float(sum(ys).pow(2).sum())
            else:
                self.out_sq[c] += float(o_proj(diff.to(q.dtype)).float().pow(2).sum())
                for h in range(Hkv):  # the residual-stream change if only KV head h were windowed
                    dh = torch.zeros_like(diff)
                    dh[..., h * G * D:(h + 1) * G * D] = diff[..., h * G * D:(h + 1) * G * D]
                    self.out_sq_h[c, h] += float(o_proj(dh.to(q.dtype)).float().pow(2).sum())
        self.count += B * Hq * (T - self.first)


@dataclass
class WindowErrors:
    """Per-layer error of each candidate window, from `measure_window_errors`."""

    candidates: list[Window]
    out: list[list[float]]  # [layer][candidate] relative residual perturbation
    cos: list[list[float]]  # [layer][candidate] 1 − mean cosine
    ctx: int
    block_size: int
    tokens: int  # scored tokens per layer
    source: str = ""
    grad: list[list[float]] | None = None  # [layer][candidate] first-order Δ mean NLL
    sensitivity: list[float] | None = None  # [layer] Δ mean NLL with only that layer at sens_ref
    sens_ref: Window | None = None
    # per KV head (measure_window_errors(heads=True)): [layer][kv head][candidate], each head
    # windowed alone (the other heads of its layer dense)
    out_heads: list[list[list[float]]] | None = None
    cos_heads: list[list[list[float]]] | None = None
    # Fisher (second-order) estimate of the KL of the next-token distribution that the window
    # adds, nats per scored token ([layer][candidate]; per head [layer][kv head][candidate])
    fisher: list[list[float]] | None = None
    fisher_heads: list[list[list[float]]] | None = None

    @property
    def num_kv_heads(self) -> int | None:
        return None if self.out_heads is None else len(self.out_heads[0])

    def head_metric(self, name: str) -> list[list[list[float]]]:
        """Per-(layer, KV head) error curves: `out` / `cos` as measured per head; `sens`: the
        per-head `out` curves scaled by the layer's measured loss sensitivity (the layer's
        loss change split between its heads in proportion to their `out` error at sens_ref)."""
        if name == "fisher":
            if self.fisher_heads is None:
                raise RarefyError("this error table has no per-KV-head fisher errors (measure them with "
                                  "--metric fisher --per-head)")
            return self.fisher_heads
        if self.out_heads is None:
            raise RarefyError("this error table has no per-KV-head errors (measure them with --per-head)")
        if name == "out":
            return self.out_heads
        if name == "cos":
            return self.cos_heads
        if name == "sens":
            if self.sensitivity is None:
                raise RarefyError("this error table has no layer sensitivities (measure them with --metric sens)")
            c = self.candidates.index(self.sens_ref)
            out = []
            for layer, heads in enumerate(self.out_heads):
                tot = max(sum(h[c] for h in heads), 1e-12)
                scale = max(self.sensitivity[layer], 1e-5) / tot
                out.append([[x * scale for x in h] for h in heads])
            return out
        raise RarefyError(f"per-head allocation takes the metric out, cos, sens or fisher, got {name!r}")

    @property
    def sens(self) -> list[list[float]] | None:
        """`out` curves scaled per layer to the measured loss sensitivity (scale_by_sensitivity)."""
        if self.sensitivity is None:
            return None
        return scale_by_sensitivity(self, self.sensitivity, self.sens_ref, "out")

    @property
    def num_layers(self) -> int:
        return len(self.out)

    def metric(self, name: str) -> list[list[float]]:
        if name not in METRICS:
            raise RarefyError(f"unknown window error metric {name!r}; choose one of {', '.join(METRICS)}")
        if getattr(self, name) is None:
            raise RarefyError(f"this error table has no {name!r} errors (measure them with --metric {name})")
        return getattr(self, name)

    def blocks(self) -> list[int]:
        dense = -(-self.ctx // self.block_size)
        return [round(w.memory_fraction(self.ctx, self.block_size) * dense) for w in self.candidates]

    def to_dict(self) -> dict:
        return {"candidates": [w.spec for w in self.candidates], "out": self.out, "cos": self.cos,
                "ctx": self.ctx, "block_size": self.block_size, "tokens": self.tokens, "source": self.source,
                "grad": self.grad, "sensitivity": self.sensitivity,
                "sens_ref": None if self.sens_ref is None else self.sens_ref.spec,
                "out_heads": self.out_heads, "cos_heads": self.cos_heads, "fisher": self.fisher,
                "fisher_heads": self.fisher_heads}

    @classmethod
    def from_dict(cls, d: dict) -> WindowErrors:
        try:
            return cls([parse_policy(s) for s in d["candidates"]], d["out"], d["cos"], int(d["ctx"]),
                       int(d["block_size"]), int(d["tokens"]), d.get("source", ""), d.get("grad"),
                       d.get("sensitivity"), parse_policy(d["sens_ref"]) if d.get("sens_ref") else None,
                       d.get("out_heads"), d.get("cos_heads"), d.get("fisher"), d.get("fisher_heads"))
        except (KeyError, TypeError, ValueError) as e:
            raise RarefyError(f"not a window-error table: {e}") from None

    def merge(self, other: WindowErrors) -> WindowErrors:
        """Both tables' candidates (measured at the same context and block size, e.g. more sink
        counts later); `grad` and the sensitivity are kept only if both have them / this one has."""
        if (other.ctx, other.block_size, other.num_layers) != (self.ctx, self.block_size, self.num_layers):
            raise RarefyError("window-error tables to merge must share ctx, block size and layer count")
        new = [c for c, w in enumerate(other.candidates) if w not in self.candidates]

        def cat(a, b):
            return [ra + [rb[c] for c in new] for ra, rb in zip(a, b)]
        grad = cat(self.grad, other.grad) if self.grad is not None and other.grad is not None else None

        def cat_h(a, b):
            if a is None or b is None:
                return None
            return [cat(la, lb) for la, lb in zip(a, b)]
        return WindowErrors(self.candidates + [other.candidates[c] for c in new], cat(self.out, other.out),
                            cat(self.cos, other.cos), self.ctx, self.block_size, min(self.tokens, other.tokens),
                            "; ".join(x for x in (self.source, other.source) if x), grad, self.sensitivity,
                            self.sens_ref, cat_h(self.out_heads, other.out_heads),
                            cat_h(self.cos_heads, other.cos_heads),
                            cat(self.fisher, other.fisher) if self.fisher is not None and other.fisher is not None
                            else None, cat_h(self.fisher_heads, other.fisher_heads))

    def pooled(self, other: WindowErrors) -> WindowErrors:
        """Both tables' errors averaged, weighted by scored tokens: the same candidates measured
        on other text (more calibration chunks). The sensitivity is kept only if one has it."""
        if other.candidates != self.candidates or (other.ctx, other.block_size, other.num_layers) != (
                self.ctx, self.block_size, self.num_layers):
            raise RarefyError("window-error tables to pool must have the same candidates, ctx, block size and layers")
        a, b = self.tokens / (self.tokens + other.tokens), other.tokens / (self.tokens + other.tokens)

        def avg(x, y):
            if x is None or y is None:
                return None
            if isinstance(x, list):
                return [avg(u, v) for u, v in zip(x, y, strict=True)]
            return a * x + b * y
        return WindowErrors(self.candidates, avg(self.out, other.out), avg(self.cos, other.cos), self.ctx,
                            self.block_size, self.tokens + other.tokens,
                            "; ".join(x for x in (self.source, other.source) if x), avg(self.grad, other.grad),
                            self.sensitivity or other.sensitivity, self.sens_ref or other.sens_ref,
                            avg(self.out_heads, other.out_heads), avg(self.cos_heads, other.cos_heads),
                            avg(self.fisher, other.fisher), avg(self.fisher_heads, other.fisher_heads))

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> WindowErrors:
        if not os.path.isfile(path):
            raise RarefyError(f"window-error table {path!r} not found")
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except ValueError as e:
            raise RarefyError(f"cannot parse window-error table {path!r}: {e}") from None


def measure_window_errors(model, chunks: torch.Tensor, candidates: list[Window], kv_dtype: str = "bf16",
                          progress: bool = False, source: str = "", grad: bool = False,
                          heads: bool = False, fisher: int = 0) -> WindowErrors:
    """chunks [N, ctx] token ids → each layer's error for each candidate window, over the
    second half of each chunk (every measured query has ≥ ctx/2 tokens of context). One
    dense forward per chunk; each layer's candidates are evaluated on that layer's q, k, v.
    grad: also a backward pass of the scored tokens' NLL, for the `grad` metric.
    heads: also each KV head's `out` and `cos` error with only that head windowed (per-head
    windows, allocate_head_windows).
    fisher: > 0 → the `fisher` metric from that many backward passes per chunk with labels
    sampled from the model (instead of the one dense forward; `grad` is then not measured)."""
    N, ctx = chunks.shape
    if N < 1:
        raise RarefyError("window calibration needs at least one chunk of text")
    block = candidates[0].block_size
    if any(w.block_size != block for w in candidates):
        raise RarefyError("candidate windows must share one block size")
    first = ctx // 2
    layers = model.model.layers
    probes, handles = [], []
    try:
        for layer in layers:
            p = _Probe(layer.self_attn, candidates, first, kv_dtype, heads)
            layer.self_attn.eval_attention = p
            handles.append(layer.register_forward_pre_hook(p.pre_hook))
            probes.append(p)
        it = range(N)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="calibrating windows", unit="chunk", leave=False)
        device = next(model.parameters()).device
        for i in it:
            chunk = chunks[i].to(device)
            if fisher:
                gen = torch.Generator(device=device).manual_seed(1234 + i)
                for sample in range(fisher):
                    for p in probes:
                        p.track_grad = True
                    with torch.enable_grad():
                        idx = torch.arange(first - 1, ctx - 1, device=device)
                        logits = model(chunk[None], last_index=idx).float()
                        y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
                        F.cross_entropy(logits, y, reduction="sum").backward()
                    del logits
                    for p in probes:
                        p.keep_fisher_grad()
                        p.track_grad = False
                for p in probes:
                    p.h_total -= (fisher - 1) * p.h_sq  # the same dense input in every pass: count it once
                    p.fisher_errors()
                continue
            if not grad:
                with torch.inference_mode():
                    model(chunk[None], last_index=torch.tensor([ctx - 1], device=device))
                continue
            for p in probes:
                p.track_grad = True
            with torch.enable_grad():
                idx = torch.arange(first - 1, ctx - 1, device=device)
                logits = model(chunk[None], last_index=idx).float()
                F.cross_entropy(logits, chunk[first:], reduction="sum").backward()
            del logits
            for p in probes:
                p.grad_errors()
    finally:
        for h in handles:
            h.remove()
        clear_eval_attention(model)
    out = [(p.out_sq / max(p.h_total, 1e-30)).tolist() for p in probes]
    cos = [(1.0 - p.cos_sum / max(p.count, 1)).tolist() for p in probes]
    tokens = N * (ctx - first)
    g = [(p.grad_sum / tokens).tolist() for p in probes] if grad else None
    fi = fh = None
    if fisher:
        fi = [(p.fisher_sq / tokens).tolist() for p in probes]
        fh = [(p.fisher_sq_h / tokens).T.tolist() for p in probes]
    oh = ch = None
    if heads:
        oh = [(p.out_sq_h / max(p.h_total, 1e-30)).T.tolist() for p in probes]
        ch = [(1.0 - p.cos_sum_h / max(p.count / p.out_sq_h.shape[1], 1)).T.tolist() for p in probes]
    return WindowErrors(list(candidates), out, cos, ctx, block, tokens, source, g, out_heads=oh, cos_heads=ch,
                        fisher=fi, fisher_heads=fh)


def sensitivity_reference(candidates: list[Window], ctx: int, block_size: int) -> Window:
    """The candidate the sensitivity pass windows each layer with: the fewest sinks measured,
    and the block count closest to a quarter of the context (32 of 128 blocks)."""
    dense = -(-ctx // block_size)
    fewest = min(w.sinks for w in candidates)
    pool = [w for w in candidates if w.sinks == fewest]
    return min(pool, key=lambda w: abs(w.memory_fraction(ctx, block_size) * dense - dense / 4))


@torch.inference_mode()
def measure_layer_sensitivity(model, chunks: torch.Tensor, ref: Window, kv_dtype: str = "bf16",
                              progress: bool = False) -> list[float]:
    """Per layer, the change of the mean NLL of the scored tokens (second half of each chunk)
    when that layer alone reads only `ref` and every other layer is dense: a direct measure
    of how much the model's loss depends on the layer's distant context. Runs the dense
    forward once per chunk, then for each layer l only layers l.. from the saved hidden
    state (about L/2 forwards per chunk)."""
    from rarefy.kv.simulate import SimulatedAttention

    N, ctx = chunks.shape
    first = ctx // 2
    layers = model.model.layers
    L = len(layers)
    device = next(model.parameters()).device
    deltas = [0.0] * L

    def nll(h, target):
        logits = model.lm_head(model.model.norm(h[0, first - 1:ctx - 1])).float()
        return float(F.cross_entropy(logits, target, reduction="sum"))

    it = [(i, layer) for i in range(N) for layer in range(-1, L)]
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="layer sensitivity", unit="forward", leave=False)
    dense = [SimulatedAttention(kv_dtype, None) for _ in range(L)]
    try:
        for i, l in it:
            if l == -1:  # the dense forward of chunk i, keeping every layer's input
                ids = chunks[i:i + 1].to(device)
                target = ids[0, first:]
                positions = torch.arange(ctx, device=device)[None]
                for layer, hook in zip(layers, dense):
                    layer.self_attn.eval_attention = hook
                h = model.model.embed_tokens(ids)
                cos, sin = model.rotary(positions, h.dtype)
                saved = []
                for layer in layers:
                    saved.append(h)
                    h = layer(h, cos, sin, positions, None, None, None)
                base = nll(h, target)
                continue
            layers[l].self_attn.eval_attention = SimulatedAttention(kv_dtype, ref)
            h = saved[l]
            for layer in layers[l:]:
                h = layer(h, cos, sin, positions, None, None, None)
            deltas[l] += nll(h, target) - base
            layers[l].self_attn.eval_attention = dense[l]
    finally:
        clear_eval_attention(model)
    return [d / (N * (ctx - first)) for d in deltas]


def scale_by_sensitivity(errors: WindowErrors, sensitivity: list[float], ref: Window,
                         metric: str = "out", floor: float = 1e-5) -> list[list[float]]:
    """Per-layer error curves rescaled so that each layer's error at `ref` equals its measured
    loss sensitivity (at least `floor`): the shape across window sizes comes from the local
    metric, the weight between layers from the loss."""
    errs = errors.metric(metric)
    if ref not in errors.candidates:
        raise RarefyError(f"{ref.spec} is not among the measured candidates")
    c = errors.candidates.index(ref)
    out = []
    for layer, row in enumerate(errs):
        scale = max(sensitivity[layer], floor) / max(row[c], 1e-12)
        out.append([x * scale for x in row])
    return out


# ----------------------------------------------------------------------------- allocation

@dataclass
class Allocation:
    config: PolicyConfig
    windows: list[Window]  # per layer
    blocks: list[int]  # peak blocks held per layer at ctx
    errors: list[float]  # the chosen candidate's error per layer (the metric used)
    budget: float
    memory_fraction: float  # mean over layers of blocks / dense blocks
    metric: str
    ctx: int
    block_size: int
    extra: dict = field(default_factory=dict)


def _hull(costs: list[int], errs: list[float]) -> list[int]:
    """Indices of the lower convex hull of (cost, err) points, by increasing cost, error
    strictly decreasing (points that a cheaper one matches or beats are dropped)."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], errs[i]))
    front = []
    for i in order:  # Pareto front
        if front and costs[i] == costs[front[-1]]:
            continue
        if front and errs[i] >= errs[front[-1]]:
            continue
        front.append(i)
    hull: list[int] = []
    for i in front:  # keep the slopes increasing (less gain per block as windows grow)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            s_ab = (errs[a] - errs[b]) / (costs[b] - costs[a])
            s_bi = (errs[b] - errs[i]) / (costs[i] - costs[b])
            if s_bi >= s_ab:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _greedy(hulls: list[list[int]], errs: list[list[float]], costs: list[int], total: float, budget: float,
            dense_total: int, what: str) -> list[int]:
    """Each unit (layer, or (layer, KV head)) starts at the first point of its hull; while
    `total` allows, the unit whose next hull step removes the most error per extra block
    grows. Returns each unit's position on its hull."""
    pos = [0] * len(hulls)
    used = sum(costs[h[0]] for h in hulls)
    if used > total + 1e-9:
        raise RarefyError(f"a budget of {budget:g} of the context ({total:.0f} blocks over the {what}) is below "
                          f"the smallest windows measured ({used} blocks, {used / dense_total:.3f}); "
                          "raise --budget or measure smaller windows")
    while True:
        best, best_gain = None, 0.0
        for u, h in enumerate(hulls):
            if pos[u] + 1 >= len(h):
                continue
            a, b = h[pos[u]], h[pos[u] + 1]
            extra = costs[b] - costs[a]
            if used + extra > total + 1e-9:
                continue
            gain = (errs[u][a] - errs[u][b]) / extra
            if best is None or gain > best_gain:
                best, best_gain = u, gain
        if best is None:
            return pos
        h = hulls[best]
        used += costs[h[pos[best] + 1]] - costs[h[pos[best]]]
        pos[best] += 1


def allocate_windows(errors: WindowErrors, budget: float, metric: str = "out", sinks=None,
                     fixed: dict[int, Window] | None = None) -> Allocation:
    """Greedy per-layer allocation: every layer starts at its cheapest candidate (on the lower
    convex hull of blocks vs error); then, while the average budget allows, the layer whose
    next hull step removes the most error per extra block grows. sinks: restrict the
    candidates to these sink counts (default: all measured). fixed: layers whose window is
    forced (it must be a measured candidate)."""
    budget = check_budget(budget)
    errs = errors.metric(metric)
    costs = errors.blocks()
    L = errors.num_layers
    dense = -(-errors.ctx // errors.block_size)
    allowed = [c for c, w in enumerate(errors.candidates) if sinks is None or w.sinks in tuple(sinks)]
    if not allowed:
        raise RarefyError(f"no measured candidate has sinks in {sinks}")
    hulls = []
    for layer in range(L):
        if fixed and layer in fixed:
            if fixed[layer] not in errors.candidates:
                raise RarefyError(f"layer {layer}: {fixed[layer].spec} was not measured")
            hulls.append([errors.candidates.index(fixed[layer])])
            continue
        idx = _hull([costs[c] for c in allowed], [errs[layer][c] for c in allowed])
        hulls.append([allowed[i] for i in idx])
    total = budget * L * dense
    pos = _greedy(hulls, errs, costs, total, budget, L * dense, "layers")
    chosen = [h[p] for h, p in zip(hulls, pos)]
    windows = [errors.candidates[c] for c in chosen]
    blocks = [costs[c] for c in chosen]
    default = Counter(windows).most_common(1)[0][0]
    config = PolicyConfig(default, {i: w for i, w in enumerate(windows) if w != default})
    return Allocation(config, windows, blocks, [errs[i][c] for i, c in enumerate(chosen)], budget,
                      sum(blocks) / (L * dense), metric, errors.ctx, errors.block_size)


@dataclass
class HeadAllocation:
    """allocate_head_windows' result: windows[layer][kv head] and their blocks (head-blocks)."""
    config: PolicyConfig
    windows: list[list[Window]]
    blocks: list[list[int]]
    budget: float
    memory_fraction: float  # Σ head-blocks / (layers · heads · dense blocks)
    metric: str
    ctx: int
    block_size: int


def head_config(windows: list[list[Window]]) -> PolicyConfig:
    """Per-(layer, KV head) windows → a PolicyConfig: a layer whose heads agree gets one Window,
    the others a PerHead; the most common layer policy is the default."""
    per_layer = [ws[0] if len(set(ws)) == 1 else PerHead(tuple(ws)) for ws in windows]
    default = Counter(per_layer).most_common(1)[0][0]
    return PolicyConfig(default, {i: p for i, p in enumerate(per_layer) if p != default})


def allocate_head_windows(errors: WindowErrors, budget: float, metric: str = "out", sinks=None) -> HeadAllocation:
    """Greedy allocation over (layer, KV head) units under the average `budget`, from the
    per-head error curves (WindowErrors.head_metric): a head whose distant context matters
    ("retrieval") can keep all of it while others keep only sinks and a short window."""
    budget = check_budget(budget)
    errs3 = errors.head_metric(metric)
    costs = errors.blocks()
    L, H = errors.num_layers, len(errs3[0])
    dense = -(-errors.ctx // errors.block_size)
    allowed = [c for c, w in enumerate(errors.candidates) if sinks is None or w.sinks in tuple(sinks)]
    if not allowed:
        raise RarefyError(f"no measured candidate has sinks in {sinks}")
    rows = [errs3[layer][h] for layer in range(L) for h in range(H)]
    hulls = []
    for row in rows:
        idx = _hull([costs[c] for c in allowed], [row[c] for c in allowed])
        hulls.append([allowed[i] for i in idx])
    pos = _greedy(hulls, rows, costs, budget * L * H * dense, budget, L * H * dense, "KV heads")
    chosen = [h[p] for h, p in zip(hulls, pos)]
    windows = [[errors.candidates[chosen[layer * H + h]] for h in range(H)] for layer in range(L)]
    blocks = [[costs[chosen[layer * H + h]] for h in range(H)] for layer in range(L)]
    return HeadAllocation(head_config(windows), windows, blocks, budget,
                          sum(map(sum, blocks)) / (L * H * dense), metric, errors.ctx, errors.block_size)


# ----------------------------------------------------------------------------- files

def _ranges(layers: dict) -> list[tuple[int, int, object]]:
    """{i: policy} → [(first, last, policy)] merging consecutive equal policies."""
    out: list[tuple[int, int, object]] = []
    for i in sorted(layers):
        if out and out[-1][1] == i - 1 and out[-1][2] == layers[i]:
            out[-1] = (out[-1][0], i, layers[i])
        else:
            out.append((i, i, layers[i]))
    return out


def policy_config_text(config: PolicyConfig, path: str, header: list[str] | None = None) -> str:
    """The config as a TOML (path ends in .toml) or JSON file that load_policy_config reads."""
    def val(p):  # a per-head policy is written as a list of specs, one per KV head
        return [h.spec for h in p.heads] if isinstance(p, PerHead) else p.spec
    layers = {(f"{a}" if a == b else f"{a}-{b}"): val(p) for a, b, p in _ranges(config.layers)}
    if path.endswith(".toml"):
        lines = [f"# {h}" for h in (header or [])]
        lines.append(f"default = {json.dumps(val(config.default))}")
        if layers:
            lines += ["", "[layers]"] + [f'"{k}" = {json.dumps(v)}' for k, v in layers.items()]
        return "\n".join(lines) + "\n"
    if path.endswith(".json"):
        return json.dumps({"default": val(config.default), "layers": layers}, indent=1) + "\n"
    raise RarefyError(f"the policy config file name must end in .toml or .json, got {path!r}")


def write_policy_config(config: PolicyConfig, path: str, header: list[str] | None = None) -> None:
    text = policy_config_text(config, path, header)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise RarefyError(f"directory {d!r} does not exist")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
