"""Sparse-attention policies: which cached keys a query attends to.

One API for evaluation and decode (docs/attention-policies.md):

    policy.apply(scores, q_pos, k_pos) -> scores with -inf where a key is not read

`scores` are pre-softmax attention logits (sm_scale applied) [B, H, Tq, Tk], one row per
(query head, query). `q_pos` [B, Tq] or [Tq] and `k_pos` [B, Tk] or [Tk] are token
positions (int); keys with k_pos > q_pos are masked too (causality), and entries that
already hold -inf (padding) stay masked. In a full-context evaluation this is a mask over
the whole score matrix; in decode Tq = 1 and the keys are the gathered cache.

Policies:

- `dense`: every causal key.
- `topk`: the k highest-scoring keys per query head, k absolute (`k=256`) or a fraction
  of the keys that query can see (`frac=0.25` → ceil(0.25 · n_visible)).
- `threshold`: drop keys whose softmax probability (over the visible keys) is below t;
  the softmax then renormalises over the rest. The highest-scoring key is always kept.
- `window`: StreamingLLM-style attention sinks + recent window (+ strided blocks), decided
  per key BLOCK so that evaluation == decode with block eviction. Evicts.
- `entropy`: topk with k chosen per query head from the entropy H of that head's attention
  distribution: k = clamp(ceil(factor · exp(H)), k_min, n_visible).

Only `window` bounds memory (`evicts`, `kept_blocks`, `memory_fraction`); the others
reduce the keys a query *reads*, not what the cache stores.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from rarefy.errors import RarefyError

NEG_INF = float("-inf")
POLICY_NAMES = ("dense", "topk", "threshold", "window", "entropy")  # + per KV head: "SPEC | SPEC | ..."


# ----------------------------------------------------------------------------- helpers

def _pos(p: torch.Tensor | None, axis: str, device) -> torch.Tensor | None:
    """q_pos → [B|1, 1, Tq, 1]; k_pos → [B|1, 1, 1, Tk] (int64 on `device`)."""
    if p is None:
        return None
    p = torch.as_tensor(p, device=device).long()
    if p.dim() == 1:
        p = p[None]
    if p.dim() != 2:
        raise ValueError(f"{axis}_pos must be [T] or [B, T], got shape {tuple(p.shape)}")
    return p[:, None, :, None] if axis == "q" else p[:, None, None, :]


def _causal(scores: torch.Tensor, q_pos, k_pos, extra_drop=None, inplace: bool = False):
    """Mask keys after their query (and where the policy's `extra_drop(qp, kp)` bool mask is
    True) in one pass; returns (scores, qp, kp) with positions broadcastable to scores. The
    returned scores are always a tensor the policy may modify in place (a copy of the input
    unless inplace)."""
    if scores.dim() != 4:
        raise ValueError(f"scores must be [B, H, Tq, Tk], got shape {tuple(scores.shape)}")
    qp, kp = _pos(q_pos, "q", scores.device), _pos(k_pos, "k", scores.device)
    if qp is not None and kp is not None:
        drop = kp > qp
        if extra_drop is not None:
            drop = drop | extra_drop(qp, kp)
        scores = scores.masked_fill_(drop, NEG_INF) if inplace else scores.masked_fill(drop, NEG_INF)
    elif not inplace:
        scores = scores.clone()
    return scores, qp, kp


def _kth_largest(rows: torch.Tensor, k: torch.Tensor, hi: int, lo: int) -> torch.Tensor:
    """rows [R, N], k [R] with lo < k ≤ hi ≤ N → the k-th largest value of each row [R, 1].
    An unsorted top-hi (a selection, O(N)) then a sorted pass over its hi − lo smallest."""
    top = torch.topk(rows, hi, dim=-1, sorted=False).values
    tail = torch.topk(top, hi - lo, dim=-1, largest=False, sorted=True).values  # ascending
    return tail.gather(-1, (hi - k)[:, None])


def _keep_top_per_row(scores: torch.Tensor, k_row: torch.Tensor) -> torch.Tensor:
    """Keep the k_row[...] highest finite entries of each row of `scores` (ties at the
    k-th value are all kept); k_row has scores.shape[:-1] and is ≥ 1. Rows are bucketed by
    k (powers of two) so that a few wide heads do not make every row pay for a large k."""
    n_visible = (scores != NEG_INF).sum(-1)
    k_row = torch.minimum(k_row, n_visible).clamp_min(1)
    cut = k_row < n_visible  # rows that drop something
    if not bool(cut.any()):
        return scores
    flat = scores.reshape(-1, scores.shape[-1])
    k_flat, cut_flat = k_row.reshape(-1), cut.reshape(-1)
    kth = torch.full((flat.shape[0], 1), NEG_INF, dtype=scores.dtype, device=scores.device)
    n = flat.shape[-1]
    lo = 0
    while lo < n:
        hi = min(n, max(16, 2 * lo))
        sel = cut_flat & (k_flat > lo) & (k_flat <= hi)
        idx = sel.nonzero().flatten()
        if idx.numel():
            kth[idx] = _kth_largest(flat[idx], k_flat[idx], hi, lo)
        lo = hi
    return scores.masked_fill_(scores < kth.view(*scores.shape[:-1], 1), NEG_INF)


def _probs(scores: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 over finite entries (rows are never all -inf here)."""
    return torch.softmax(scores.float(), dim=-1)


# ----------------------------------------------------------------------------- policies

class Policy:
    """Base: a non-evicting policy (the cache keeps every block)."""

    name = "policy"
    evicts = False

    # True when the kept set depends on positions only (dense, window): then
    # keep_mask(q_pos, k_pos) gives it without scores, and evaluation can use a fused kernel.
    score_independent = False

    def apply(self, scores: torch.Tensor, q_pos=None, k_pos=None, inplace: bool = False) -> torch.Tensor:
        """scores [B, H, Tq, Tk] → the same with -inf where a key is not read. inplace: the
        caller lets the policy overwrite `scores` (saves a copy)."""
        raise NotImplementedError

    def keep_mask(self, q_pos, k_pos) -> torch.Tensor:
        """Score-independent policies: bool [B|1, 1, Tq, Tk], True where the key is read."""
        raise NotImplementedError

    def kept_blocks(self, num_tokens: int, block_size: int) -> list[int]:
        """Logical block indices the cache must keep with `num_tokens` tokens stored."""
        return list(range(-(-num_tokens // block_size)))

    def held_blocks(self, num_tokens: int, block_size: int) -> int:
        """Blocks the cache holds with `num_tokens` tokens stored (= len(kept_blocks))."""
        return -(-max(num_tokens, 0) // block_size)

    def memory_fraction(self, ctx: int, block_size: int) -> float:
        """Peak cache blocks held while generating up to `ctx` tokens, over dense's."""
        return 1.0

    @property
    def spec(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Dense(Policy):
    name = "dense"

    score_independent = True

    def apply(self, scores, q_pos=None, k_pos=None, inplace=False):
        return _causal(scores, q_pos, k_pos, inplace=inplace)[0]

    def keep_mask(self, q_pos, k_pos):
        return _pos(k_pos, "k", None) <= _pos(q_pos, "q", None)

    @property
    def spec(self) -> str:
        return "dense"


@dataclass(frozen=True)
class TopK(Policy):
    """k highest-scoring keys per (query head, query): `k` absolute or `frac` of the visible keys."""

    k: int | None = None
    frac: float | None = None
    name = "topk"

    def __post_init__(self):
        if (self.k is None) == (self.frac is None):
            raise RarefyError("topk needs exactly one of k=<int> or frac=<0..1>")
        if self.k is not None and self.k < 1:
            raise RarefyError(f"topk k must be at least 1, got {self.k}")
        if self.frac is not None and not 0.0 < self.frac <= 1.0:
            raise RarefyError(f"topk frac must be in (0, 1], got {self.frac}")

    def k_for(self, n_visible: torch.Tensor) -> torch.Tensor:
        if self.k is not None:
            return torch.full_like(n_visible, self.k)
        return torch.ceil(n_visible.double() * self.frac - 1e-9).long().clamp_min(1)

    def apply(self, scores, q_pos=None, k_pos=None, inplace=False):
        scores = _causal(scores, q_pos, k_pos, inplace=inplace)[0]
        return _keep_top_per_row(scores, self.k_for((scores != NEG_INF).sum(-1)))

    @property
    def spec(self) -> str:
        return f"topk:k={self.k}" if self.k is not None else f"topk:frac={self.frac:g}"


@dataclass(frozen=True)
class Threshold(Policy):
    """Drop keys whose softmax weight would be below t (the top key always stays)."""

    t: float = 1e-3
    name = "threshold"

    def __post_init__(self):
        if not 0.0 <= self.t < 1.0:
            raise RarefyError(f"threshold t must be in [0, 1), got {self.t}")

    def apply(self, scores, q_pos=None, k_pos=None, inplace=False):
        scores = _causal(scores, q_pos, k_pos, inplace=inplace)[0]
        # p_j = exp(s_j - logsumexp(s)) < t  <=>  s_j < logsumexp(s) + log t; the top key stays
        if self.t <= 0.0:
            return scores
        cut = torch.minimum(torch.logsumexp(scores, -1, keepdim=True) + math.log(self.t),
                            scores.amax(-1, keepdim=True))
        return scores.masked_fill_(scores < cut, NEG_INF)

    @property
    def spec(self) -> str:
        return f"threshold:t={self.t:g}"


@dataclass(frozen=True)
class Entropy(Policy):
    """Dynamic per-head top-k: k = clamp(ceil(factor · exp(H)), k_min, n_visible), where H is
    the entropy (nats) of the head's softmax over its visible keys. exp(H) is the
    distribution's perplexity, the effective number of keys it attends to: 1 for a head
    fixed on one key, n for a uniform head."""

    factor: float = 2.0
    k_min: int = 16
    name = "entropy"

    def __post_init__(self):
        if not self.factor > 0:
            raise RarefyError(f"entropy factor must be > 0, got {self.factor}")
        if self.k_min < 1:
            raise RarefyError(f"entropy min must be at least 1, got {self.k_min}")

    def k_for(self, scores: torch.Tensor) -> torch.Tensor:
        p = _probs(scores)
        h = -torch.special.xlogy(p, p).sum(-1)
        k = torch.ceil(self.factor * torch.exp(h) - 1e-6).long()
        return k.clamp_min(self.k_min)

    def apply(self, scores, q_pos=None, k_pos=None, inplace=False):
        scores = _causal(scores, q_pos, k_pos, inplace=inplace)[0]
        return _keep_top_per_row(scores, self.k_for(scores))

    @property
    def spec(self) -> str:
        return f"entropy:factor={self.factor:g},min={self.k_min}"


@dataclass(frozen=True)
class Window(Policy):
    """Attention sinks + recent window (+ strided blocks), at block granularity.

    A key block b (tokens [b·block, (b+1)·block)) is read by the query at position p iff
    b ≤ p // block (causal; within the last block only keys ≤ p) and one of
      - b < ceil(sinks / block)                         (sink blocks),
      - b ≥ max(0, p − window + 1) // block             (intersects the last `window` tokens),
      - stride > 0 and b % stride == 0                  (strided blocks).
    The query's own block is always read (window ≥ 1)."""

    sinks: int = 4
    window: int = 512
    stride: int = 0
    block_size: int = 16
    name = "window"
    evicts = True

    def __post_init__(self):
        if self.sinks < 0:
            raise RarefyError(f"window sinks must be ≥ 0, got {self.sinks}")
        if self.window < 1:
            raise RarefyError(f"window window must be ≥ 1 (the current token is always kept), got {self.window}")
        if self.stride < 0:
            raise RarefyError(f"window stride must be ≥ 0, got {self.stride}")
        if self.block_size < 1:
            raise RarefyError(f"window block must be ≥ 1, got {self.block_size}")

    @property
    def sink_blocks(self) -> int:
        return -(-self.sinks // self.block_size)

    def _check_block(self, block_size: int) -> None:
        if block_size != self.block_size:
            raise RarefyError(f"the window policy decides per block of {self.block_size} tokens but the cache "
                              f"uses blocks of {block_size}; add block={block_size} to the policy spec")

    def block_keep(self, kb: torch.Tensor, qp: torch.Tensor) -> torch.Tensor:
        """kb: key block indices, qp: query positions (broadcastable) → bool keep (ignoring causality)."""
        start = (qp - self.window + 1).clamp_min(0) // self.block_size
        keep = (kb < self.sink_blocks) | (kb >= start)
        if self.stride > 0:
            keep = keep | (kb % self.stride == 0)
        return keep

    score_independent = True

    def apply(self, scores, q_pos=None, k_pos=None, inplace=False):
        if q_pos is None or k_pos is None:
            raise ValueError("the window policy needs q_pos and k_pos")
        return _causal(scores, q_pos, k_pos, lambda qp, kp: ~self.block_keep(kp // self.block_size, qp),
                       inplace=inplace)[0]

    def keep_mask(self, q_pos, k_pos):
        qp, kp = _pos(q_pos, "q", None), _pos(k_pos, "k", None)
        return (kp <= qp) & self.block_keep(kp // self.block_size, qp)

    def kept_blocks(self, num_tokens: int, block_size: int) -> list[int]:
        """Blocks that the query at position num_tokens − 1 (the newest stored token, whose
        attention may not have run yet) or any later query reads. Everything else can be
        freed: no query at a position ≥ num_tokens − 1 reads it. For the newest query the
        returned blocks are exactly the ones it reads, so dense attention over the kept
        blocks equals the evaluation mask."""
        self._check_block(block_size)
        if num_tokens <= 0:
            return []
        n_blocks = -(-num_tokens // block_size)
        start = max(0, num_tokens - self.window) // block_size
        return [b for b in range(n_blocks)
                if b < self.sink_blocks or b >= start or (self.stride > 0 and b % self.stride == 0)]

    def held_blocks(self, num_tokens: int, block_size: int) -> int:
        """len(self.kept_blocks(num_tokens, block_size)) in O(1)."""
        self._check_block(block_size)
        if num_tokens <= 0:
            return 0
        n_blocks = -(-num_tokens // block_size)
        start = max(0, num_tokens - self.window) // block_size
        sink = min(self.sink_blocks, start)
        held = n_blocks - start + sink
        if self.stride > 0:  # multiples of stride in [sink, start)
            held += max(0, -(-start // self.stride) - (-(-sink // self.stride)))
        return held

    def memory_fraction(self, ctx: int, block_size: int) -> float:
        """Peak blocks held (max over 1..ctx stored tokens of len(kept_blocks)) / ceil(ctx / block)."""
        self._check_block(block_size)
        if ctx <= 0:
            return 1.0
        dense = -(-ctx // block_size)
        return max(self.held_blocks(n, block_size) for n in range(1, ctx + 1)) / dense

    @property
    def spec(self) -> str:
        return f"window:sinks={self.sinks},window={self.window},stride={self.stride},block={self.block_size}"


@dataclass(frozen=True)
class PerHead(Policy):
    """One dense or window policy per KV head of a layer (DuoAttention-style: "retrieval"
    heads keep a long context, "streaming" heads only sinks + a short window). Query head q
    uses heads[q // (num_q_heads // len(heads))], like GQA. Spec: the heads' specs joined by
    " | ", e.g. "dense | window:sinks=16,window=97 | window:sinks=64,window=481"."""

    heads: tuple = ()
    name = "heads"
    score_independent = True

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(self.heads))
        if len(self.heads) < 1:
            raise RarefyError("a per-head attention policy needs one policy per KV head")
        for p in self.heads:
            if not isinstance(p, (Dense, Window)):
                raise RarefyError(f"per-head attention policies must be dense or window, got {p.spec!r} "
                                  "(score-dependent policies apply to whole layers)")
        blocks = {p.block_size for p in self.heads if isinstance(p, Window)}
        if len(blocks) > 1:
            raise RarefyError(f"the heads of a per-head policy must share one block size, got {sorted(blocks)}")

    @property
    def evicts(self) -> bool:  # type: ignore[override]
        return any(p.evicts for p in self.heads)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def check_heads(self, num_kv_heads: int, where: str = "") -> None:
        if len(self.heads) != num_kv_heads:
            raise RarefyError(f"{where}the per-head attention policy {self.spec!r} lists {len(self.heads)} "
                              f"polic{'y' if len(self.heads) == 1 else 'ies'} but the model has {num_kv_heads} "
                              "KV heads (give one per KV head)")

    def keep_mask(self, q_pos, k_pos):
        """bool [B|1, n_heads, Tq, Tk] (one mask per KV head; expand over each head's queries)."""
        masks = [p.keep_mask(q_pos, k_pos) for p in self.heads]
        shape = torch.broadcast_shapes(*(m.shape for m in masks))
        return torch.cat([m.expand(shape) for m in masks], dim=1)

    def query_mask(self, q_pos, k_pos, num_q_heads: int) -> torch.Tensor:
        """bool [B|1, num_q_heads, Tq, Tk]: each query head gets its KV head's mask."""
        if num_q_heads % len(self.heads):
            raise RarefyError(f"{num_q_heads} query heads are not a multiple of the {len(self.heads)} "
                              f"heads of the per-head policy {self.spec!r}")
        return self.keep_mask(q_pos, k_pos).repeat_interleave(num_q_heads // len(self.heads), dim=1)

    def apply(self, scores, q_pos=None, k_pos=None, inplace=False):
        if q_pos is None or k_pos is None:
            raise ValueError("the per-head policy needs q_pos and k_pos")
        keep = self.query_mask(q_pos, k_pos, scores.shape[1])
        return scores.masked_fill_(~keep, NEG_INF) if inplace else scores.masked_fill(~keep, NEG_INF)

    def held_blocks(self, num_tokens: int, block_size: int) -> float:
        """Blocks held in layer-blocks: the mean over heads of each head's blocks (a head-block
        is 1/n_heads of a layer-block); may be fractional."""
        return sum(p.held_blocks(num_tokens, block_size) for p in self.heads) / len(self.heads)

    def kept_blocks(self, num_tokens: int, block_size: int) -> list[int]:
        raise RarefyError("a per-head policy keeps different blocks per KV head: use heads[h].kept_blocks")

    def memory_fraction(self, ctx: int, block_size: int) -> float:
        return sum(p.memory_fraction(ctx, block_size) for p in self.heads) / len(self.heads)

    def with_block_size(self, block_size: int) -> PerHead:
        return PerHead(tuple(Window(p.sinks, p.window, p.stride, block_size) if isinstance(p, Window) else p
                             for p in self.heads))

    @property
    def spec(self) -> str:
        return " | ".join(p.spec for p in self.heads)


# ----------------------------------------------------------------------------- parsing

_FIELDS = {  # spec key -> (constructor argument, type)
    "dense": {},
    "topk": {"k": ("k", int), "frac": ("frac", float)},
    "threshold": {"t": ("t", float)},
    "window": {"sinks": ("sinks", int), "window": ("window", int), "stride": ("stride", int),
               "block": ("block_size", int)},
    "entropy": {"factor": ("factor", float), "min": ("k_min", int)},
}
_CLASSES = {"dense": Dense, "topk": TopK, "threshold": Threshold, "window": Window, "entropy": Entropy}


def parse_policy(spec: str) -> Policy:
    """"dense", "topk:k=256", "topk:frac=0.25", "threshold:t=0.001",
    "window:sinks=4,window=512,stride=0[,block=16]", "entropy:factor=2[,min=16]"; per KV head
    (dense / window only): "SPEC | SPEC | ..." or a list of specs, one per KV head."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, (list, tuple)):  # a config file's per-head list
        if not spec or not all(isinstance(x, str) for x in spec):
            raise RarefyError(f"a per-head policy is a non-empty list of policy specs (one per KV head), got {spec!r}")
        return PerHead(tuple(parse_policy(x) for x in spec))
    if not isinstance(spec, str) or not spec.strip():
        raise RarefyError(f"empty attention policy spec {spec!r}")
    if "|" in spec:
        parts = [x.strip() for x in spec.split("|")]
        if not all(parts):
            raise RarefyError(f"empty head policy in the per-head spec {spec!r} (one spec per KV head, joined by |)")
        return PerHead(tuple(parse_policy(x) for x in parts))
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _CLASSES:
        raise RarefyError(f"unknown attention policy {name!r} in {spec!r}; choose one of {', '.join(POLICY_NAMES)}")
    fields, kwargs = _FIELDS[name], {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not value:
            raise RarefyError(f"bad option {item!r} in attention policy {spec!r} (expected key=value)")
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise RarefyError(f"unknown option {key!r} for attention policy {name!r} (options: {allowed})")
        arg, typ = fields[key]
        if arg in kwargs:
            raise RarefyError(f"option {key!r} given twice in attention policy {spec!r}")
        try:
            kwargs[arg] = typ(value)
        except ValueError:
            raise RarefyError(f"option {key}={value!r} of attention policy {name!r} must be "
                              f"{'an integer' if typ is int else 'a number'}") from None
        if typ is float and not math.isfinite(kwargs[arg]):
            raise RarefyError(f"option {key}={value!r} of attention policy {name!r} must be finite")
    return _CLASSES[name](**kwargs)


@dataclass
class PolicyConfig:
    """A default policy plus per-layer overrides."""

    default: Policy = field(default_factory=Dense)
    layers: dict[int, Policy] = field(default_factory=dict)

    def for_layer(self, i: int) -> Policy:
        return self.layers.get(i, self.default)

    @property
    def evicts(self) -> bool:
        return self.default.evicts or any(p.evicts for p in self.layers.values())

    def check(self, num_layers: int, num_kv_heads: int | None = None) -> None:
        bad = sorted(i for i in self.layers if i >= num_layers)
        if bad:
            raise RarefyError(f"the attention policy config overrides layer(s) {bad} but the model has "
                              f"{num_layers} layers (0..{num_layers - 1})")
        if num_kv_heads is not None:
            for i in range(num_layers):
                p = self.for_layer(i)
                if isinstance(p, PerHead):
                    p.check_heads(num_kv_heads, f"layer {i}: ")

    @property
    def per_head(self) -> bool:
        return any(isinstance(p, PerHead) for p in (self.default, *self.layers.values()))

    def memory_fraction(self, num_layers: int, ctx: int, block_size: int) -> float:
        """Peak blocks held by all layers together while generating up to `ctx` tokens (max over
        1..ctx stored tokens of the sum over layers), over dense's num_layers · ceil(ctx / block).
        For windows this is the mean of the layers' memory_fraction (every layer peaks at ctx)."""
        if ctx <= 0:
            return 1.0
        dense = -(-ctx // block_size)
        pols = [self.for_layer(i) for i in range(num_layers)]
        for p in pols:
            for x in (p.heads if isinstance(p, PerHead) else (p,)):
                if isinstance(x, Window):
                    x._check_block(block_size)
        peak = max(sum(p.held_blocks(n, block_size) for p in pols) for n in range(1, ctx + 1))
        return peak / (num_layers * dense)

    def with_block_size(self, block_size: int) -> PolicyConfig:
        """The same config with every window policy deciding per `block_size` tokens."""
        def fix(p):
            if isinstance(p, Window):
                return Window(p.sinks, p.window, p.stride, block_size)
            if isinstance(p, PerHead):
                return p.with_block_size(block_size)
            return p
        return PolicyConfig(fix(self.default), {i: fix(p) for i, p in self.layers.items()})

    @property
    def spec(self) -> str:
        over = "; ".join(f"layer {i}: {p.spec}" for i, p in sorted(self.layers.items()))
        return self.default.spec + (f" ({over})" if over else "")

    def __str__(self) -> str:
        return self.spec


def _layer_keys(key: str, path: str) -> list[int]:
    k = str(key).strip()
    try:
        if "-" in k:
            a, b = (int(x) for x in k.split("-", 1))
        else:
            a = b = int(k)
    except ValueError:
        raise RarefyError(f"{path}: layer key {key!r} is not an index (\"3\") or a range (\"0-1\")") from None
    if a < 0 or b < a:
        raise RarefyError(f"{path}: bad layer range {key!r}")
    return list(range(a, b + 1))


def policy_config_from_dict(data: dict, source: str = "policy config") -> PolicyConfig:
    if not isinstance(data, dict):
        raise RarefyError(f"{source}: expected a table/object with 'default' and optional 'layers'")
    unknown = set(data) - {"default", "layers"}
    if unknown:
        raise RarefyError(f"{source}: unknown key(s) {sorted(unknown)} (allowed: default, layers)")
    default = parse_policy(data.get("default", "dense"))
    layers: dict[int, Policy] = {}
    over = data.get("layers", {})
    if not isinstance(over, dict):
        raise RarefyError(f"{source}: 'layers' must map layer indices or ranges to policy specs")
    for key, spec in over.items():
        if isinstance(spec, (list, tuple)) and not spec:
            raise RarefyError(f"{source}: layer {key!r} has an empty per-head list (one spec per KV head)")
        if not isinstance(spec, (str, list, tuple)):
            raise RarefyError(f"{source}: layer {key!r} must be a policy spec or a list of them (one per KV head), "
                              f"got {spec!r}")
        pol = parse_policy(spec)
        for i in _layer_keys(key, source):
            if i in layers:
                raise RarefyError(f"{source}: layer {i} is given more than one policy")
            layers[i] = pol
    return PolicyConfig(default, layers)


def load_policy_config(path: str) -> PolicyConfig:
    """A TOML (.toml) or JSON file:

        default = "window:sinks=16,window=496"      {"default": "window:sinks=16,window=496",
        [layers]                                     "layers": {"0-1": "dense", "29": "topk:k=64"}}
        "0-1" = "dense"
        "29" = "topk:k=64"

    Per KV head (dense / window only): a layer's value is a list of specs, one per KV head,
    e.g. "7" = ["dense", "window:sinks=16,window=97", "window:sinks=64,window=481"]
    (or one string with the specs joined by " | ").
    """
    if not os.path.isfile(path):
        raise RarefyError(f"attention policy config {path!r} not found")
    try:
        if path.endswith(".toml"):
            import tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise RarefyError(f"cannot parse attention policy config {path!r}: {e}") from None
    return policy_config_from_dict(data, path)


def resolve_policy_config(policy) -> PolicyConfig:
    """None → dense; a Policy or PolicyConfig as is; a string → a config file if it names one
    (or ends in .toml/.json), else a policy spec applied to every layer."""
    if policy is None:
        return PolicyConfig()
    if isinstance(policy, PolicyConfig):
        return policy
    if isinstance(policy, Policy):
        return PolicyConfig(policy)
    if isinstance(policy, str):
        if os.path.isfile(policy) or policy.endswith((".toml", ".json")):
            return load_policy_config(policy)
        return PolicyConfig(parse_policy(policy))
    raise RarefyError(f"cannot use {policy!r} as an attention policy")
