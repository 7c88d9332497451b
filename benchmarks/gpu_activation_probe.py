"""Probe launch configs of the input-sparse kernel: time, layout conversions, barriers.

    PYTHONPATH=. python3 benchmarks/gpu_activation_probe.py [--shapes qkv,down] [--sparsity 0.5]

For each config: median µs (CUDA-graph replay over weight copies > L2) at the given
sparsity and at 0%, the count of ``convert_layout`` ops in the TTGIR and of ``bar.sync``
in the PTX (a layout conversion inside the loop costs a shared-memory round trip and a
barrier per step), registers per thread. Prints the fastest configs last.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu_activation_gemv import SHAPES, check, threshold_for, weight_copies  # noqa: E402

from rarefy.kernels.activation_sparse.triton import (ActSparseConfig, _act_sparse_kernel,  # noqa: E402
                                                     input_sparse_matmul_triton)
from rarefy.kernels.activation_sparse.triton_gather import GatherConfig, input_sparse_gemv_gather  # noqa: E402
from rarefy.sparse_compiler.compile import time_us  # noqa: E402


GATHER_GRIDS = {
    # (chunk, block_n, block_k, num_warps, stages); the ninth session's sweep also timed the
    # hand-pipelined loop removed after it (stages 0, commit 6cdc188)
    "default": list(itertools.product((1024, 2048), (128, 256), (32, 64), (4, 8), (3, 4))),
    # one chunk per program (no split-K partials), narrow column tiles so every SM has work
    "whole-k": list(itertools.product((4096,), (32, 64), (32, 64), (4, 8), (3, 4))),
    # deeper pipelines for the large matrices
    "deep": list(itertools.product((2048,), (128, 256), (32, 64), (4, 8), (4, 5, 6))),
}


def probe_gather(shapes: str, top: int, grid: str = "default") -> None:
    """The compacting (active rows only) kernel against the predicated heuristic and cuBLAS,
    at 0 / 40 / 50 / 90% sparsity."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    for name, k, n, glu in SHAPES:
        if name.split()[0] not in shapes.split(","):
            continue
        wt, w = weight_copies(k, n, dev)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16, generator=gen)
        base = time_us([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in w], dev)
        t50 = threshold_for(x, 0.5)
        scores = []
        for chunk, bn, bk, nw, st in GATHER_GRIDS[grid]:
            cfg = GatherConfig(chunk=chunk, block_n=bn, block_k=bk, num_warps=nw, stages=st)
            try:
                y = input_sparse_gemv_gather(x, wt[0], t50, glu=glu, config=cfg)
                ref = input_sparse_matmul_triton(x.float(), wt[0].float(), t50, glu=glu)
                assert torch.isfinite(y).all() and ((y.float() - ref).norm() / ref.norm()) < 2e-2
                us = time_us([lambda wt_=wt_: input_sparse_gemv_gather(x, wt_, t50, glu=glu, config=cfg)
                              for wt_ in wt], dev)
            except Exception as e:
                print(f"FAIL gather {name} {cfg}: {type(e).__name__} {str(e)[:200]}", flush=True)
                continue
            scores.append((us, cfg))
        scores.sort(key=lambda p: p[0])
        for us, cfg in scores[:top]:
            print(f"gather {name} 50%: {us:.1f} us ({base / us:.2f}x cuBLAS {base:.1f}) {cfg}", flush=True)
        best = scores[0][1]
        for s in (0.0, 0.4, 0.5, 0.9):
            t = threshold_for(x, s)
            ug = time_us([lambda wt_=wt_: input_sparse_gemv_gather(x, wt_, t, glu=glu, config=best) for wt_ in wt], dev)
            up = time_us([lambda wt_=wt_: input_sparse_matmul_triton(x, wt_, t, glu=glu) for wt_ in wt], dev)
            print(f"TABLE {name} {s:.0%}: cuBLAS {base:.1f} | predicated {up:.1f} ({base / up:.2f}x) | "
                  f"gather {ug:.1f} ({base / ug:.2f}x)", flush=True)
        del wt, w
        torch.cuda.empty_cache()


def asm_stats():
    """(convert_layout count, bar.sync count, registers) of the most recently compiled variant."""
    for dev_cache in _act_sparse_kernel.device_caches.values():
        kernels = dev_cache[0]
        if kernels:
            k = list(kernels.values())[-1]
            return (k.asm["ttgir"].count("convert_layout"), k.asm["ptx"].count("bar.sync"), k.n_regs)
    return (-1, -1, -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qkv,down")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--gather", action="store_true", help="probe the compacting kernel instead")
    ap.add_argument("--grid", default="default", choices=sorted(GATHER_GRIDS), help="configs --gather sweeps")
    a = ap.parse_args()
    if a.gather:
        probe_gather(a.shapes, a.top, a.grid)
        return
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    results = []
    for name, k, n, glu in SHAPES:
        if name.split()[0] not in a.shapes.split(","):
            continue
        wt, w = weight_copies(k, n, dev)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16, generator=gen)
        t = threshold_for(x, a.sparsity)
        base = time_us([lambda w_=w_: torch.nn.functional.linear(x, w_) for w_ in w], dev)
        n_out = n // 2 if glu else n
        grid = [ActSparseConfig(block_n=128, block_k=16, iters=4, num_warps=4, xmode=1)]
        for bn, bk, nw, waves in itertools.product((128, 256), (16, 32), (4, 8), (1, 2, 4)):
            tiles = -(-n_out // bn)
            rows = max(2 * bk, k * tiles // (waves * 132))
            grid.append(ActSparseConfig(block_n=bn, block_k=bk, iters=-(-rows // bk), num_warps=nw, xmode=1,
                                        prefetch=not glu))
        for cfg in grid:
            if cfg.block_k * cfg.iters > k:
                continue
            try:
                check(x, wt[0], t, glu, cfg)
                stats = asm_stats()
                us = time_us([lambda wt_=wt_: input_sparse_matmul_triton(x, wt_, t, glu=glu, config=cfg)
                              for wt_ in wt], dev)
                us0 = time_us([lambda wt_=wt_: input_sparse_matmul_triton(x, wt_, 0.0, glu=glu, config=cfg)
                               for wt_ in wt], dev)
            except Exception as e:
                print(f"FAIL {name} {cfg}: {type(e).__name__} {str(e)[:300]}", flush=True)
                continue
            results.append((name, base, us, us0, cfg, stats))
            print(f"{name} {cfg}: {us:.1f} us (0%: {us0:.1f}), cuBLAS {base:.1f}; "
                  f"convert_layout {stats[0]}, bar.sync {stats[1]}, regs {stats[2]}", flush=True)
        del wt, w
        torch.cuda.empty_cache()
    if os.environ.get("PROBE_DUMP"):
        dump_dir = os.environ["PROBE_DUMP"]
        for dev_cache in _act_sparse_kernel.device_caches.values():
            for i, kern in enumerate(dev_cache[0].values()):
                with open(os.path.join(dump_dir, f"kernel{i}.ttgir"), "w") as f:
                    f.write(kern.asm["ttgir"])
                with open(os.path.join(dump_dir, f"kernel{i}.ptx"), "w") as f:
                    f.write(kern.asm["ptx"])
    print(f"\nfastest at {a.sparsity:.0%} (µs, µs at 0%, cuBLAS µs, speed-up, config, convert/bar/regs)")
    for name in a.shapes.split(","):
        rows = sorted([r for r in results if r[0].split()[0] == name], key=lambda r: r[2])[:a.top]
        for r in rows:
            c = r[4]
            print(f"{name}: {r[2]:.1f} {r[3]:.1f} {r[1]:.1f} {r[1] / r[2]:.2f}x bn={c.block_n} bk={c.block_k} "
                  f"it={c.iters} w={c.num_warps} xmode={c.xmode} fold={c.fold} {r[5]}")


if __name__ == "__main__":
    main()
