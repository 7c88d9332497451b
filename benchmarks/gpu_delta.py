"""Unstructured sparse GEMV (batch 1) on the H100: the delta format's two Triton kernels
(per-entry scan `_delta_kernel`, register prefix sums `_delta_chunk_kernel`) against cuBLAS
bf16 (F.linear) and rarefy's dense GEMV, in one run.

    PYTHONPATH=. python3 benchmarks/gpu_delta.py [--sparsity 0.5,0.75,0.9] [--sweep]

Llama-3-8B shapes, random bf16 weights magnitude-pruned unstructured. Every kernel is checked
against a float64 reference before it is timed (CUDA-graph replay over weight copies larger
than 4x L2, rarefy.bench.gpu_timing). Prints µs, speed-up over cuBLAS and the bandwidth of
the compressed bytes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
OLD = [(2, 256, 2), (1, 512, 1), (4, 64, 1), (1, 256, 1)]          # the compiler's old candidates
CHUNKED = [(1, 256, 1, False), (1, 512, 1, False), (1, 256, 1, True), (1, 512, 1, True), (1, 1024, 1, True),
           (1, 512, 2, True), (1, 1024, 2, True), (2, 256, 2, True)]


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    from rarefy.bench.gpu_timing import copy_bandwidth_tbs, graph_time_us, l2_bytes, n_buffers
    from rarefy.formats.sparse_weight import DeltaSparse
    from rarefy.kernels.gemv import gemv
    from rarefy.kernels.sparse_matmul.triton_delta import DeltaConfig, delta_matmul_triton
    from rarefy.sparsity.masks import unstructured_mask

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", default="0.5,0.75,0.9")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="more chunked configs")
    ap.add_argument("--chunked", default="", help="chunked configs to time instead of the built-in list: "
                    "n<rows a program>v<values a step>w<warps>[p] (p: prefetch), comma separated")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    l2 = l2_bytes(dev)
    copy = copy_bandwidth_tbs(dev)
    import re

    chunked = [(int(m[1]), int(m[2]), int(m[3]), bool(m[4])) for m in
               (re.fullmatch(r"n(\d+)v(\d+)w(\d+)(p?)", c.strip()) for c in a.chunked.split(",") if c.strip())]
    chunked = (chunked or CHUNKED) + ([(bn, bv, nw, pf) for bn, bv, nw, pf in itertools.product((1, 2), (128, 256, 512, 1024), (1, 2, 4), (False, True))]
                         if a.sweep else [])
    rows, summary = [], {}
    for sp in [float(s) for s in a.sparsity.split(",")]:
        for name, (n, k) in [(s_, SHAPES[s_]) for s_ in a.shapes.split(",")]:
            g = torch.Generator(device=dev).manual_seed(n + k)
            w = torch.randn(n, k, generator=g, device=dev, dtype=torch.bfloat16)
            w = w * unstructured_mask(w.float().abs(), sp)
            nbuf = n_buffers(n * k * 2, l2)
            dense = [w.clone() for _ in range(nbuf)]
            ds = [DeltaSparse.from_dense(d) for d in dense]
            nbytes = ds[0].nbytes
            x = torch.randn(1, k, generator=g, device=dev).to(torch.bfloat16)
            ref = x.double() @ w.double().T

            def err(y):
                return float((y.double() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("inf")

            def t(fn):
                return graph_time_us(lambda i: fn(i), nbuf, dev, samples=5)

            res = {"cuBLAS": t(lambda i: F.linear(x, dense[i]))}
            assert err(gemv(x, dense[0])) < 1e-2
            res["rarefy dense"] = t(lambda i: gemv(x, dense[i]))
            cfgs = {} if a.chunked else {f"scan n{bn} v{bv} w{nw}": DeltaConfig(bn, bv, 1, num_warps=nw)
                                         for bn, bv, nw in OLD}
            cfgs.update({f"chunk n{bn} v{bv} w{nw}{' pf' if pf else ''}":
                         DeltaConfig(bn, bv, 1, num_warps=nw, chunked=True, prefetch=pf) for bn, bv, nw, pf in chunked})
            for label, cfg in cfgs.items():
                try:
                    e = err(delta_matmul_triton(x, ds[0].row_ptr, ds[0].values, ds[0].gaps, n, config=cfg))
                    if not e < 1e-2:
                        print(f"{name} {sp} {label}: FAILED rel err {e:.2e}", flush=True)
                        continue
                    res[label] = t(lambda i, c=cfg: delta_matmul_triton(x, ds[i].row_ptr, ds[i].values, ds[i].gaps, n, config=c))
                except Exception as ex:  # noqa: BLE001
                    print(f"{name} {sp} {label}: {type(ex).__name__} {str(ex)[:160]}", flush=True)
            base = res["cuBLAS"]
            best = {kind: min(((v, lab) for lab, v in res.items() if lab.startswith(kind)), default=None)
                    for kind in ("scan", "chunk")}
            for lab in ("cuBLAS", "rarefy dense"):
                rows.append((sp, name, lab, res[lab], base / res[lab], n * k * 2 / res[lab] / 1e6))
            for kind, b in best.items():
                if b:
                    rows.append((sp, name, f"best {b[1]}", b[0], base / b[0], nbytes / b[0] / 1e6))
                    summary.setdefault((sp, kind), []).append(base / b[0])
            print(f"{sp} {name}: " + ", ".join(f"{lab} {v:.1f}" for lab, v in res.items()), flush=True)
    print(f"\ncopy bandwidth {copy:.2f} TB/s")
    print("| sparsity | shape | kernel | µs | vs cuBLAS | TB/s (stored bytes) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for sp, name, lab, us, s_, tbs in rows:
        print(f"| {sp:.0%} | {name} | {lab} | {us:.1f} | {s_:.2f}x | {tbs:.2f} |")
    print("\n| sparsity | kernel | median speed-up over the 4 shapes |")
    print("| --- | --- | --- |")
    for (sp, kind), v in sorted(summary.items()):
        print(f"| {sp:.0%} | {kind} | {statistics.median(v):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
