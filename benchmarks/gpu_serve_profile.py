"""Where a batch-128 decode step of the engine spends its time (Llama-3-8B shape, random weights).

    PYTHONPATH=. python3 benchmarks/gpu_serve_profile.py [--batch 128 --ctx 1024]

Prints: engine step wall time, graph replay time alone, and the top CUDA kernels of a
few replays (torch.profiler), so host overhead and slow kernels can be told apart.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, ".")
from benchmarks.gpu_serve import random_model  # noqa: E402
from rarefy.engine.llm_engine import EngineOptions, LLMEngine  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    model = random_model(a.layers)
    engine = LLMEngine(model, None, EngineOptions(kv_memory_bytes=int(36e9), max_num_seqs=a.batch,
                                                  max_step_tokens=8192))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128000, (a.ctx,), generator=g).tolist() for _ in range(a.batch)]
    seqs = [engine.add_request(p, SamplingParams(max_tokens=a.steps * 3 + 10, ignore_eos=True)) for p in prompts]
    while any(s.num_computed < len(s.prompt_ids) for s in seqs):
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / a.steps * 1e3
    bucket = engine.runner._graphs[min(b for b in engine.runner._graphs if b >= a.batch)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        bucket.graph.replay()
    torch.cuda.synchronize()
    replay_ms = (time.perf_counter() - t0) / a.steps * 1e3
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    kv_gb = a.batch * (a.ctx + a.steps) * engine.cache.bytes_per_token / 1e9
    print(f"\nbatch {a.batch}, ctx ~{a.ctx}: engine step {step_ms:.2f} ms, graph replay alone {replay_ms:.2f} ms, "
          f"KV read per step {kv_gb:.1f} GB")


if __name__ == "__main__":
    main()
