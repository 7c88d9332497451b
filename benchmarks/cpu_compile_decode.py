"""CPU decode step, eager against torch.compile, on the embedded model (docs/engine.md).

    python3 benchmarks/cpu_compile_decode.py [--threads 2] [--steps 64] [--weights fp16w,gguf]

Times single-token decode steps of the model at a fixed 256-slot static cache: eager with a
growing kv_len (what `rarefy generate` does) and compiled with kv_len = the whole cache (what
`Generator(cpu_compile=True)` does). "gguf" keeps the file's Q4_1/Q8_0 blocks (GGUFLinear,
q/k/v and gate/up stacked). Run it on a quiet machine: the figures are wall clock.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(weights: str):
    from rarefy.models.loader import load_model

    if weights == "fp16w":
        return load_model(None, dtype="fp16w").model
    from rarefy.kernels.lowbit_cpu import gguf_linear
    from rarefy.models.default_model import default_model_path

    m = load_model(None, dtype="fp32").model
    gguf_linear.use_gguf_blocks(m, default_model_path())
    gguf_linear.fuse_gguf_projections(m)
    return m


def step_ms(fn, cache, steps: int, fixed: bool) -> float:
    ids, pos = torch.tensor([[5]]), torch.tensor([[10]])
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            fn(ids, pos, cache, kv_len=cache.max_seq if fixed else 11 + i)
            pos = pos + 1
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None) -> int:
    from rarefy.kv.cache import StaticKVCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--weights", default="fp16w,gguf")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for w in a.weights.split(","):
        m = load(w)
        cfg = m.config
        cache = StaticKVCache(cfg.num_layers, 1, 256, cfg.num_kv_heads, cfg.head_dim, m.dtype, m.device)
        eager = step_ms(m, cache, a.steps, fixed=False)
        t0 = time.perf_counter()
        cm = torch.compile(m, dynamic=False)
        step_ms(cm, cache, 1, fixed=True)
        compile_s = time.perf_counter() - t0
        compiled = step_ms(cm, cache, a.steps, fixed=True)
        rows.append((w, eager, compiled, compile_s))
        print(f"{w}: eager {eager:.2f} ms/step, compiled {compiled:.2f} ms/step (compile {compile_s:.0f} s)",
              flush=True)
    print("\n| weights | eager ms/step | compiled ms/step | speed-up | compile s |")
    print("| --- | --- | --- | --- | --- |")
    for w, e, c, s in rows:
        print(f"| {w} | {e:.2f} | {c:.2f} | {e / c:.2f}x | {s:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
