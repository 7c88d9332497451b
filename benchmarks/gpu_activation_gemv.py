"""Input-sparse GEMV (activation sparsity) on the GPU against cuBLAS and rarefy's dense GEMV.

    PYTHONPATH=. python3 benchmarks/gpu_activation_gemv.py [--sweep] [--quick] [--out FILE]

Llama-3-8B decode shapes, bf16, weights stored transposed for the sparse kernel and in
nn.Linear layout for the baselines. Inputs: random normal x; the threshold is the
s-quantile of |x| so a fraction s of the inputs is skipped. Every call is checked against
float64 first (NaN fails). Times: CUDA-graph replay of 20 calls cycling over weight copies
that overflow L2 (rarefy.sparse_compiler.compile.time_us), median of several replays.
gate_up is the fused GLU kernel (gate, up, SiLU and multiply) against cuBLAS's gate_up
product alone (the elementwise SiLU·up is not charged to the baseline).

--sweep: try a grid of launch configs per shape at 50% and keep the fastest (the table
then shows both the heuristic's and the best config's figures).
Batch > 1: independent rows (the union of masks is what the kernel reads) and rows that
share one mask (to measure the density crossover against dense).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.kernels.activation_sparse.ref import input_sparse_matmul_ref  # noqa: E402
from rarefy.kernels.activation_sparse.triton import (ActSparseConfig, input_sparse_matmul_triton,  # noqa: E402
                                                     pick_config)
from rarefy.kernels.gemv import gemv  # noqa: E402
from rarefy.sparse_compiler.compile import time_us  # noqa: E402

SHAPES = [  # name, K (inputs), N (outputs), glu
    ("qkv", 4096, 6144, False),
    ("o", 4096, 4096, False),
    ("gate_up (GLU)", 4096, 2 * 14336, True),
    ("down", 14336, 4096, False),
]
L2_FLUSH = 200 << 20


def threshold_for(x: torch.Tensor, s: float) -> float:
    if s <= 0:
        return 0.0
    a = x.abs().float().flatten().sort().values
    return float(a[min(a.numel() - 1, int(round(s * a.numel())))])


def check(x, wt, t, glu, cfg=None):
    y = input_sparse_matmul_triton(x, wt, t, glu=glu, config=cfg)
    ref = input_sparse_matmul_ref(x, wt, t, glu=glu)
    assert torch.isfinite(y).all(), "NaN/inf"
    err = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    assert err < 2e-2, f"rel err {err}"
    return err


def weight_copies(k, n, dev):
    nbytes = k * n * 2
    count = max(1, -(-L2_FLUSH // nbytes))
    gen = torch.Generator(device=dev).manual_seed(0)
    wt = [torch.randn(k, n, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(count)]
    w = [t.t().contiguous() for t in wt]  # nn.Linear layout for the baselines
    return wt, w


def sweep_configs(m: int, k: int, n: int):
    grid = []
    for bn, bk, it, nw in itertools.product((64, 128, 256), (16, 32, 64), (2, 4, 8, 16), (4, 8)):
        if bk * it > k or bk * bn * it > 256 * 1024:
            continue
        grid.append(ActSparseConfig(block_n=bn, block_k=bk, iters=it, num_warps=nw))
    return grid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer sparsities and batches")
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=None, help="comma list of shape names (default: all)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    sparsities = (0.0, 0.4, 0.5, 0.9) if a.quick else (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
    gen = torch.Generator(device=dev).manual_seed(1)
    rows_m1, rows_batch, best_cfgs = [], [], {}
    t_start = time.time()
    for name, k, n, glu in SHAPES:
        if a.shapes and name.split(" ")[0] not in a.shapes.split(","):
            continue
        wt, w = weight_copies(k, n, dev)
        n_out = n // 2 if glu else n
        x1 = torch.randn(1, k, device=dev, dtype=torch.bfloat16, generator=gen)
        cublas = time_us([lambda w_=w_: F.linear(x1, w_) for w_ in w], dev)
        rdense = time_us([lambda w_=w_: gemv(x1, w_) for w_ in w], dev)
        heur = pick_config(1, n_out, k)
        best = heur
        if a.sweep:
            t50 = threshold_for(x1, 0.5)
            scores = []
            for cfg in sweep_configs(1, k, n_out):
                try:
                    check(x1, wt[0], t50, glu, cfg)
                    us = time_us([lambda wt_=wt_, c=cfg: input_sparse_matmul_triton(x1, wt_, t50, glu=glu, config=c)
                                  for wt_ in wt], dev)
                except Exception as e:  # a config that does not compile (registers, smem) is skipped
                    print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
                    continue
                scores.append((us, cfg))
            scores.sort(key=lambda p: p[0])
            best = scores[0][1]
            print(f"{name}: best {best} {scores[0][0]:.1f} us; heuristic {heur}; top5 "
                  + "; ".join(f"{u:.1f}" for u, _ in scores[:5]), flush=True)
        best_cfgs[name] = best
        for s in sparsities:
            t = threshold_for(x1, s)
            check(x1, wt[0], t, glu, best)
            us_h = time_us([lambda wt_=wt_: input_sparse_matmul_triton(x1, wt_, t, glu=glu, config=heur)
                            for wt_ in wt], dev)
            us_b = time_us([lambda wt_=wt_: input_sparse_matmul_triton(x1, wt_, t, glu=glu, config=best)
                            for wt_ in wt], dev) if best != heur else us_h
            density = float((x1.abs() >= t).float().mean())
            read = density * k * n * 2
            rows_m1.append((name, s, density, cublas, rdense, us_h, us_b, read / min(us_h, us_b) / 1e6))
            print(f"{name} s={s:.2f}: cuBLAS {cublas:.1f} us, rarefy dense {rdense:.1f}, sparse {us_h:.1f}"
                  f" / best {us_b:.1f} -> {cublas / min(us_h, us_b):.2f}x", flush=True)
        # batch > 1
        for m in ((4, 8) if a.quick else (2, 4, 8, 16)):
            xm = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
            cub = time_us([lambda w_=w_: F.linear(xm, w_) for w_ in w], dev)
            for shared, s in [(False, 0.5), (True, 0.0), (True, 0.25), (True, 0.5), (True, 0.75)]:
                if a.quick and shared and s in (0.25, 0.75):
                    continue
                x = xm.clone()
                if shared:  # one mask for all rows: union density = 1 - s
                    keep = torch.rand(k, device=dev, generator=gen) >= s
                    x = torch.where(keep, x.abs() + 1.0, x * 0.01) * torch.sign(x)
                    t = 0.5 if s > 0 else 0.0
                else:
                    t = threshold_for(x, s)
                check(x, wt[0], t, glu)
                us = time_us([lambda wt_=wt_: input_sparse_matmul_triton(x, wt_, t, glu=glu) for wt_ in wt], dev)
                union = float((x.abs() >= t).any(0).float().mean())
                rows_batch.append((name, m, "shared" if shared else "independent", s, union, cub, us))
                print(f"{name} M={m} {'shared' if shared else 'indep'} s={s}: union {union:.2f} "
                      f"cuBLAS {cub:.1f} sparse {us:.1f} -> {cub / us:.2f}x", flush=True)
        del wt, w
        torch.cuda.empty_cache()

    lines = [f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; CUDA-graph replay over "
             f"weight copies > L2; {time.strftime('%Y-%m-%d')}; {time.time() - t_start:.0f} s", "",
             "### Batch 1", "",
             "| shape | sparsity | density read | cuBLAS µs | rarefy dense µs | sparse µs (heuristic) | "
             "sparse µs (best) | vs cuBLAS | vs rarefy dense | TB/s of bytes read |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s, d, cub, rd, uh, ub, tbs in rows_m1:
        u = min(uh, ub)
        lines.append(f"| {name} | {s:.0%} | {d:.2f} | {cub:.1f} | {rd:.1f} | {uh:.1f} | {ub:.1f} | "
                     f"{cub / u:.2f}x | {rd / u:.2f}x | {tbs:.2f} |")
    lines += ["", "Best configs (sweep at 50%): " + "; ".join(f"{k}: {v}" for k, v in best_cfgs.items()), "",
              "### Batch > 1 (union of the rows' masks)", "",
              "| shape | M | rows | sparsity per row | union density | cuBLAS µs | sparse µs | vs cuBLAS |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m, kind, s, union, cub, us in rows_batch:
        lines.append(f"| {name} | {m} | {kind} | {s:.0%} | {union:.2f} | {cub:.1f} | {us:.1f} | {cub / us:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
