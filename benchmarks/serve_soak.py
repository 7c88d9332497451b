"""Soak test of `rarefy serve`: many requests with random lengths and random disconnects.

    python benchmarks/serve_soak.py                       # the embedded model, 500 requests, 8 at a time
    python benchmarks/serve_soak.py --model ckpt/ -n 100  # another model, fewer requests

A server is started in this process (CPU, fp32 KV cache). A warm-up of --warmup requests
runs first; then RSS is read, the soak runs (prompts of 1..--max-prompt tokens or words,
1..--max-tokens output tokens with ignore_eos, 70% streamed, 30% chat, --disconnect of
them dropped by the client mid-way), and afterwards the script checks: no error
response to a valid request, every finished request has exactly max_tokens tokens, no
sequence left in the engine, every KV block free, RSS growth. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rarefy.bench.serve import load_avg, soak  # noqa: E402
from rarefy.engine.llm_engine import EngineOptions  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402
from rarefy.server import ServerThread, build_server  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("-n", "--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--disconnect", type=float, default=0.25, help="fraction of requests the client drops")
    ap.add_argument("--max-prompt", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=24)
    ap.add_argument("--kv-memory", default="256MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = ap.parse_args()

    from rarefy.kv.options import parse_memory
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    loaded = load_model(a.model, dtype=a.dtype)
    opts = EngineOptions(kv_dtype="fp32", kv_memory_bytes=parse_memory(a.kv_memory))
    app = build_server(loaded, opts)
    st = app.state.serving
    with ServerThread(app) as srv:
        def progress(done, n):
            if done % 50 == 0 or done == n:
                print(f"  {done}/{n} requests, RSS {rss_mib():.0f} MiB, load {load_avg()}", file=sys.stderr,
                      flush=True)

        warm = soak(srv.url, st.model_name, a.warmup, a.concurrency, seed=a.seed + 1,
                    disconnect_frac=a.disconnect, max_prompt=a.max_prompt, max_tokens=a.max_tokens)
        rss0, t0, load0 = rss_mib(), time.time(), load_avg()
        res = soak(srv.url, st.model_name, a.requests, a.concurrency, seed=a.seed, disconnect_frac=a.disconnect,
                   max_prompt=a.max_prompt, max_tokens=a.max_tokens, progress=progress)
        deadline = time.time() + 60
        eng = st.engine
        while (eng.engine.has_work or eng.stats.running) and time.time() < deadline:
            time.sleep(0.05)
        alloc = eng.engine.cache.allocator
        rss1 = rss_mib()
        out = {
            "model": st.model_name, "requests": a.requests, "concurrency": a.concurrency,
            "completed": res["completed"], "disconnected": res["disconnected"], "errors": len(res["errors"]),
            "error_samples": res["errors"][:5], "warmup_errors": len(warm["errors"]),
            "duration_s": round(time.time() - t0, 1),
            "engine_aborts": eng.stats.finished.get("abort", 0), "preemptions": eng.stats.preemptions,
            "blocks_used_after": alloc.num_used, "blocks_total": alloc.num_blocks,
            "running_after": eng.stats.running, "waiting_after": eng.stats.waiting,
            "rss_mib_before": round(rss0, 1), "rss_mib_after": round(rss1, 1),
            "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2),
            "load_before": load0, "load_after": load_avg(),
        }
    ok = (out["errors"] == 0 and out["warmup_errors"] == 0 and out["blocks_used_after"] == 0
          and out["running_after"] == 0 and out["rss_growth_pct"] < 5.0)
    out["pass"] = ok
    for k, v in out.items():
        print(f"{k}: {v}")
    if a.json:
        print(json.dumps(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
