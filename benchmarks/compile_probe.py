"""Print what the sparse compiler tried for one random pruned matrix (GPU): every candidate's
format, batch, config and µs or error, then the plan.

    PYTHONPATH=. python3 benchmarks/compile_probe.py --shape 4096x4096 --sparsity 0.9 --batches 1,8
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from rarefy.sparse_compiler import compile_matrix
from rarefy.sparsity.masks import unstructured_mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batches", default="1,8")
    a = ap.parse_args()
    n, k = map(int, a.shape.split("x"))
    w = torch.randn(n, k, device="cuda")
    w = (w * unstructured_mask(w.abs(), a.sparsity)).bfloat16()
    cm = compile_matrix(w, tuple(int(b) for b in a.batches.split(",")), cache_dir=tempfile.mkdtemp())
    for c in cm.plan.candidates:
        print(c)
    r = cm.report
    print({k: r[k] for k in ("format", "measured_us", "dense_us", "measured_speedup", "predicted_speedup")})


if __name__ == "__main__":
    main()
