"""Drive the paged cache's bookkeeping with an attention-policy config: one sequence decoding
`--steps` tokens one at a time, and report the pool's peak use against a dense cache's, plus
how many such sequences a byte budget holds. Memory here is what the cache really holds:
blocks are allocated from and freed back to the pool by the cache's own eviction (layer
groups, or per-(layer, KV head) tables for per-head configs).

    python3 benchmarks/kv_policies/cache_drive.py benchmarks/kv_policies/smollm2-135m-window-25-out.toml \\
        [--steps 2048] [--budget-mib 256] [--model-tokens 2048] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from rarefy.kv.paged import HeadGroupedKVCache, PagedKVCache
from rarefy.kv.policies import resolve_policy_config
from rarefy.models.loader import load_model


def drive(cfg, policy, steps: int, block: int, budget_mib: int) -> dict:
    cache = PagedKVCache.for_model(cfg, device="cpu", kv_dtype="bf16", block_size=block, tokens=steps,
                                   policy=policy)
    units_per_layer_block = cfg.num_kv_heads if isinstance(cache, HeadGroupedKVCache) else 1
    cache.add_sequence(0)
    peak = 0
    for _ in range(steps):
        cache.begin_step([0], [1])
        peak = max(peak, cache.allocator.num_used)
    cache.free_sequence(0)
    assert cache.allocator.num_used == 0
    width = 1 if cache.grouped else cache.num_layers  # an ungrouped cache's block holds every layer
    used = peak * width  # in the pool's units (layer-blocks, or head-blocks when per head)
    dense = cfg.num_layers * units_per_layer_block * -(-steps // block)
    big = PagedKVCache.for_model(cfg, device="cpu", kv_dtype="bf16", block_size=block,
                                 memory_bytes=budget_mib * 2**20, policy=policy)
    dense_cache = PagedKVCache.for_model(cfg, device="cpu", kv_dtype="bf16", block_size=block,
                                         memory_bytes=budget_mib * 2**20)
    return {"kind": type(cache).__name__, "grouped": cache.grouped, "unit": "head-blocks" if units_per_layer_block > 1
            else "layer-blocks", "peak_units": used, "dense_units": dense, "peak_fraction": used / dense,
            "layer_blocks_for": cache.layer_blocks_for(steps), "sequences_that_fit": big.sequences_that_fit(steps),
            "dense_sequences_that_fit": dense_cache.sequences_that_fit(steps),
            "effective_bytes_per_token": big.effective_bytes_per_token(steps), "bytes_per_token": big.bytes_per_token,
            "config_memory_fraction": resolve_policy_config(policy).memory_fraction(cfg.num_layers, steps, block)}


def model_drive(loaded, policy, tokens: int, block: int, prefill_chunk: int = 256) -> dict:
    """The real model through the paged cache: a WikiText-2 prompt of tokens // 2 tokens in
    prefill chunks, then greedy decode up to `tokens`; the pool's peak use is measured while
    keys and values are really stored and attended."""
    import torch

    model, cfg = loaded.model, loaded.config
    valid = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "wikitext-2", "valid.txt")
    with open(valid, encoding="utf-8") as f:
        ids = loaded.tokenizer.encode(f.read()[:200_000], add_special_tokens=False)[:tokens // 2]
    cache = PagedKVCache.for_model(cfg, device="cpu", kv_dtype="bf16", block_size=block, tokens=tokens,
                                   policy=policy)
    cache.add_sequence(0)
    peak, pos, seq = 0, 0, list(ids)
    with torch.inference_mode():
        while pos < len(seq):
            n = min(prefill_chunk, len(seq) - pos)
            cache.begin_step([0], [n])
            logits = model(torch.tensor([seq[pos:pos + n]]), torch.arange(pos, pos + n)[None], cache)
            pos += n
            peak = max(peak, cache.allocator.num_used)
        while len(seq) < tokens:
            seq.append(int(logits[0, -1].argmax()))
            cache.begin_step([0], [1])
            logits = model(torch.tensor([[seq[-1]]]), torch.tensor([[pos]]), cache)
            pos += 1
            peak = max(peak, cache.allocator.num_used)
    width = 1 if cache.grouped else cache.num_layers
    per_layer_block = cfg.num_kv_heads if isinstance(cache, HeadGroupedKVCache) else 1
    dense = cfg.num_layers * per_layer_block * -(-tokens // block)
    return {"tokens": tokens, "prompt": len(ids), "peak_units": peak * width, "dense_units": dense,
            "peak_fraction": peak * width / dense, "decode_peak_bound": cache.layer_blocks_for(tokens),
            "pool_bytes": cache.nbytes()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("policy", help="a policy spec or config file")
    ap.add_argument("--steps", type=int, default=2048)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--model-tokens", type=int, default=0,
                    help="also run the real model through the cache: a prompt of N/2 tokens, greedy decode to N")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    loaded = load_model(None, device="cpu", dtype="fp32", sparse="off")
    cfg = loaded.config
    policy = resolve_policy_config(a.policy)
    policy.check(cfg.num_layers, cfg.num_kv_heads)
    r = drive(cfg, policy, a.steps, a.block, a.budget_mib)
    r["policy"] = a.policy
    if a.model_tokens:
        r["model"] = model_drive(loaded, policy, a.model_tokens, a.block)
    if a.json:
        print(json.dumps(r))
        return
    print(f"{a.policy}: {r['kind']}; peak {r['peak_units']} of {r['dense_units']} {r['unit']} "
          f"({r['peak_fraction']:.1%} of dense) over {a.steps} decode steps "
          f"(config accounting {r['config_memory_fraction']:.1%}); with {a.budget_mib} MiB of bf16 KV: "
          f"{r['sequences_that_fit']} sequences of {a.steps} tokens fit (dense {r['dense_sequences_that_fit']}), "
          f"{r['effective_bytes_per_token']:,.0f} bytes/token (dense {r['bytes_per_token']:,})")
    if "model" in r:
        m = r["model"]
        print(f"model through the cache: prompt {m['prompt']} tokens + greedy decode to {m['tokens']}: peak "
              f"{m['peak_units']} of {m['dense_units']} {r['unit']} ({m['peak_fraction']:.1%} of dense; a decode-only "
              f"drive holds {m['decode_peak_bound']}; prompt chunks hold their whole length for their step)")


if __name__ == "__main__":
    main()
