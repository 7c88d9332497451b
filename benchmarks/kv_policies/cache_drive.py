"""Drive the paged cache's bookkeeping with an attention-policy config: one sequence decoding
`--steps` tokens one at a time, and report the pool's peak use against a dense cache's, plus
how many such sequences a byte budget holds. Memory here is what the cache really holds:
blocks are allocated from and freed back to the pool by the cache's own eviction (layer
groups, or per-(layer, KV head) tables for per-head configs).

    python3 benchmarks/kv_policies/cache_drive.py benchmarks/kv_policies/smollm2-135m-window-25-out.toml \\
        [--steps 2048] [--budget-mib 256] [--json]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("policy", help="a policy spec or config file")
    ap.add_argument("--steps", type=int, default=2048)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cfg = load_model(None, device="cpu", dtype="fp32", sparse="off").config
    policy = resolve_policy_config(a.policy)
    policy.check(cfg.num_layers, cfg.num_kv_heads)
    r = drive(cfg, policy, a.steps, a.block, a.budget_mib)
    r["policy"] = a.policy
    if a.json:
        print(json.dumps(r))
        return
    print(f"{a.policy}: {r['kind']}; peak {r['peak_units']} of {r['dense_units']} {r['unit']} "
          f"({r['peak_fraction']:.1%} of dense) over {a.steps} decode steps "
          f"(config accounting {r['config_memory_fraction']:.1%}); with {a.budget_mib} MiB of bf16 KV: "
          f"{r['sequences_that_fit']} sequences of {a.steps} tokens fit (dense {r['dense_sequences_that_fit']}), "
          f"{r['effective_bytes_per_token']:,.0f} bytes/token (dense {r['bytes_per_token']:,})")


if __name__ == "__main__":
    main()
