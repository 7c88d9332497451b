"""Attention as a KV cache with a storage dtype and a sparse-attention policy would compute it.

- `simulated_attention`: the full-context (evaluation) form. Keys and values go through
  `rarefy.kv.quant.roundtrip` (what the cache would store and a kernel dequantize), scores
  are float32, then the causal mask and the policy mask, softmax, @ v. GQA by
  num_heads // num_kv_heads. Queries are processed in chunks, each against only the keys
  it can see, so memory stays at [B, Hq, q_chunk, T] floats.
- `configure_eval_attention(model, kv_dtype, policy)`: installs it as every layer's
  `self_attn.eval_attention` hook, so a cache-less forward (perplexity) measures the
  quality the cache would serve; `clear_eval_attention(model)` removes it.
- `decode_attention_with_policy`: one query per sequence against gathered (dequantized)
  cache keys, float32, for non-window policies in decode (CPU or GPU).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from rarefy.kv.policies import Dense, PerHead, Policy, PolicyConfig, resolve_policy_config
from rarefy.kv.quant import check_kv_dtype, roundtrip

DEFAULT_Q_CHUNK = 512


def _as_policy(policy) -> Policy:
    if policy is None:
        return Dense()
    if isinstance(policy, Policy):
        return policy
    cfg = resolve_policy_config(policy)
    if cfg.layers:
        raise ValueError("simulated_attention takes one policy; use configure_eval_attention for per-layer configs")
    return cfg.default


def simulated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        kv_dtype: str = "bf16", policy=None, sm_scale: float | None = None,
                        q_chunk: int = DEFAULT_Q_CHUNK, stats: dict | None = None,
                        q_positions: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hkv, T, D] (after rotary), positions [B, T] or [T] (of the
    keys, and of the queries unless q_positions [B, Tq] or [Tq] is given, e.g. to evaluate
    only some queries) → [B, Hq, Tq, D] in q's dtype.

    stats: if a dict, "kept" and "visible" are incremented by the number of (query head,
    query, key) entries the policy kept and the number that were causally visible, counting
    only queries at positions ≥ stats.get("from_pos", 0)."""
    check_kv_dtype(kv_dtype)
    policy = _as_policy(policy)
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    positions = torch.as_tensor(positions, device=q.device).long()
    if positions.dim() == 1:
        positions = positions[None].expand(B, T)
    if q_positions is None:
        if Tq != T:
            raise ValueError("q has a different length from k: pass q_positions")
        q_positions = positions
    q_positions = torch.as_tensor(q_positions, device=q.device).long()
    if q_positions.dim() == 1:
        q_positions = q_positions[None].expand(B, Tq)
    kf = roundtrip(k.float(), kv_dtype)  # what a kernel reads back: float(q) * float(scale)
    vf = roundtrip(v.float(), kv_dtype)
    ascending = T < 2 or bool((positions[:, 1:] > positions[:, :-1]).all())
    from_pos = stats.get("from_pos", 0) if stats is not None else 0
    if policy.score_independent:
        return _masked_sdpa(q, kf, vf, positions, q_positions, policy, scale, ascending, stats, from_pos)
    qf = (q.float() * scale).reshape(B, Hkv, G, Tq, D)  # query head h uses kv head h // G
    out = torch.empty(B, Hkv, G, Tq, D, dtype=torch.float32, device=q.device)
    for s in range(0, Tq, q_chunk):
        e = min(Tq, s + q_chunk)
        qpos = q_positions[:, s:e]
        # with ascending key positions the keys this chunk can see are a prefix
        ke = int((positions <= qpos.amax(1, keepdim=True)).sum(1).max()) if ascending else T
        ke = max(ke, 1)
        kpos = positions[:, :ke]
        scores = torch.matmul(qf[:, :, :, s:e], kf[:, :, None, :ke].transpose(-1, -2))
        scores = policy.apply(scores.view(B, Hq, e - s, ke), qpos, kpos, inplace=True)
        if stats is not None:
            counted = (qpos >= from_pos)  # [B, Tq']
            kept = (scores != float("-inf")) & counted[:, None, :, None]
            visible = (kpos[:, None, :] <= qpos[:, :, None]) & counted[:, :, None]
            stats["kept"] = stats.get("kept", 0) + int(kept.sum())
            stats["visible"] = stats.get("visible", 0) + Hq * int(visible.sum())
        probs = torch.softmax(scores, dim=-1).view(B, Hkv, G, e - s, ke)
        out[:, :, :, s:e] = torch.matmul(probs, vf[:, :, None, :ke])
    return out.view(B, Hq, Tq, D).to(q.dtype)


def _masked_sdpa(q, kf, vf, positions, q_positions, policy, scale, ascending, stats, from_pos):
    """Dense and window policies: the kept set depends on positions only, so the fused SDPA
    kernel with a boolean mask (or is_causal) computes the same softmax over the same keys."""
    _, Hq, Tq, _ = q.shape
    gqa = Hq != kf.shape[1]
    plain_causal = (policy.name == "dense" and ascending and Tq == kf.shape[2]
                    and bool((q_positions == positions).all()))
    if plain_causal and stats is None:
        mask = None
    elif isinstance(policy, PerHead):  # one mask per KV head, repeated over its query heads
        policy.check_heads(kf.shape[1])
        mask = policy.query_mask(q_positions, positions, Hq)
    else:
        mask = policy.keep_mask(q_positions, positions)
    if stats is not None:
        counted = (q_positions >= from_pos)[:, None, :, None]
        visible = (positions[:, None, None, :] <= q_positions[:, None, :, None]) & counted
        stats["kept"] = stats.get("kept", 0) + Hq // mask.shape[1] * int((mask & counted).sum())
        stats["visible"] = stats.get("visible", 0) + Hq * int(visible.sum())
    if plain_causal:
        out = F.scaled_dot_product_attention(q.float(), kf, vf, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.to(q.dtype)


class SimulatedAttention:
    """The callable installed as `Attention.eval_attention` (one per layer)."""

    def __init__(self, kv_dtype: str = "bf16", policy: Policy | None = None, q_chunk: int = DEFAULT_Q_CHUNK,
                 track_reads: bool = False):
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.policy = policy if policy is not None else Dense()
        self.q_chunk = q_chunk
        self.stats: dict | None = {} if track_reads else None  # kept / visible counts over calls

    def __call__(self, q, k, v, positions):
        return simulated_attention(q, k, v, positions, self.kv_dtype, self.policy,
                                   q_chunk=self.q_chunk, stats=self.stats)

    def __repr__(self) -> str:
        return f"SimulatedAttention(kv_dtype={self.kv_dtype!r}, policy={self.policy.spec!r})"


def configure_eval_attention(model, kv_dtype: str = "bf16", policy=None,
                             q_chunk: int = DEFAULT_Q_CHUNK, track_reads: bool = False) -> PolicyConfig:
    """Set every layer's `self_attn.eval_attention` to a SimulatedAttention with `kv_dtype` and
    the layer's policy. policy: None (dense), a spec string, a config file path, a Policy or
    a PolicyConfig. Returns the resolved PolicyConfig. Only cache-less forwards use the hook.
    track_reads: count kept / visible keys (see attention_read_fraction); one extra pass."""
    check_kv_dtype(kv_dtype)
    cfg = resolve_policy_config(policy)
    layers = model.model.layers
    cfg.check(len(layers), getattr(getattr(model, "config", None), "num_kv_heads", None))
    for i, layer in enumerate(layers):
        layer.self_attn.eval_attention = SimulatedAttention(kv_dtype, cfg.for_layer(i), q_chunk, track_reads)
    return cfg


def clear_eval_attention(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.eval_attention = None


@contextlib.contextmanager
def eval_attention(model, kv_dtype: str = "bf16", policy=None, q_chunk: int = DEFAULT_Q_CHUNK,
                   track_reads: bool = False):
    """`with eval_attention(model, "int8", "window:sinks=16,window=496"): perplexity(model, ...)`."""
    cfg = configure_eval_attention(model, kv_dtype, policy, q_chunk, track_reads)
    try:
        yield cfg
    finally:
        clear_eval_attention(model)


def attention_read_fraction(model) -> float | None:
    """Kept / visible (query head, query, key) entries over the installed hooks' calls so far."""
    kept = visible = 0
    for layer in model.model.layers:
        hook = layer.self_attn.eval_attention
        if isinstance(hook, SimulatedAttention) and hook.stats is not None:
            kept += hook.stats.get("kept", 0)
            visible += hook.stats.get("visible", 0)
    return kept / visible if visible else None


def decode_attention_with_policy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
                                 policy=None, sm_scale: float | None = None,
                                 q_pos: torch.Tensor | None = None,
                                 k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step over gathered cache keys, in float32.

    q [B, Hq, D]; k, v [B, Hkv, L, D] already dequantized (any float dtype); seq_lens [B]:
    keys j ≥ seq_lens[b] of row b are padding. Positions default to the dense layout
    (key j at position j, the query at seq_lens − 1), which is what topk / threshold /
    entropy see in evaluation; pass k_pos [B, L] (and q_pos [B]) when the gathered keys
    are not positions 0..L-1 (e.g. a window policy applied to a cache that has evicted
    blocks: there, dense attention over the kept blocks already equals the policy).
    Returns [B, Hq, D] in q's dtype."""
    policy = _as_policy(policy)
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    seq_lens = torch.as_tensor(seq_lens, device=q.device).long()
    if k_pos is None:
        k_pos = torch.arange(L, device=q.device)[None].expand(B, L)
    if q_pos is None:
        q_pos = seq_lens - 1
    q_pos = torch.as_tensor(q_pos, device=q.device).long().reshape(B, 1)
    scores = torch.matmul((q.float() * scale).reshape(B, Hkv, G, 1, D), k.float()[:, :, None].transpose(-1, -2))
    scores = scores.view(B, Hq, 1, L)
    pad = torch.arange(L, device=q.device)[None] >= seq_lens[:, None]  # [B, L]
    scores = scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    scores = policy.apply(scores, q_pos, k_pos, inplace=True)
    probs = torch.softmax(scores, dim=-1).view(B, Hkv, G, 1, L)
    out = torch.matmul(probs, v.float()[:, :, None])  # [B, Hkv, G, 1, D]
    return out.view(B, Hq, D).to(q.dtype)
