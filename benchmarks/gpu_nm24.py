"""2:4 sparse GEMV on the H100: rarefy's dedicated 2:4 kernel against cuBLAS bf16 (F.linear),
rarefy's dense GEMV and the generic bitmap kernel on the same 2:4 matrix, in one run.

    PYTHONPATH=. python3 benchmarks/gpu_nm24.py [--batches 1,8] [--sweep]

Llama-3-8B shapes, random bf16 weights magnitude-pruned to 2:4. Every kernel is checked
against a float64 reference before it is timed (CUDA-graph replay over weight copies
larger than 4x L2, rarefy.bench.gpu_timing). Prints µs, speed-up over cuBLAS, and the
bandwidth of the compressed bytes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    from rarefy.bench.gpu_timing import graph_time_us, l2_bytes, n_buffers
    from rarefy.formats.sparse_weight import NMSparse
    from rarefy.kernels.gemv import gemv
    from rarefy.kernels.sparse_matmul.triton_bitmap import bitmap_matmul_triton
    from rarefy.kernels.sparse_matmul.triton_nm24 import (Nm24Config, default_nm24_config, default_nm24_dot_config,
                                                          nm24_matmul_triton)
    from rarefy.sparsity.masks import nm_mask

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    l2 = l2_bytes(dev)
    rows = []
    for name, (n, k) in [(s_, SHAPES[s_]) for s_ in a.shapes.split(",")]:
        g = torch.Generator(device=dev).manual_seed(n + k)
        w = torch.randn(n, k, generator=g, device=dev, dtype=torch.bfloat16)
        w = w * nm_mask(w.float().abs(), 2, 4)
        nbuf = n_buffers(n * k * 2, l2)
        dense = [w.clone() for _ in range(nbuf)]
        sp = [NMSparse.from_dense(d, 2, 4) for d in dense]
        sparse_bytes = sp[0].values.numel() * 2 + sp[0].bitmask.numel() * 4
        kw = sp[0].bitmask.shape[1]
        for m in [int(b) for b in a.batches.split(",")]:
            x = torch.randn(m, k, generator=g, device=dev).to(torch.bfloat16)
            ref = x.double() @ w.double().T

            def err(y):
                return float((y.double() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("inf")

            def t(fn):
                return graph_time_us(lambda i: fn(i), nbuf, dev, samples=5)

            res = {}
            res["cuBLAS"] = t(lambda i: F.linear(x, dense[i]))
            if m == 1:
                assert err(gemv(x, dense[0])) < 1e-2
                res["rarefy dense"] = t(lambda i: gemv(x, dense[i]))
            yb = bitmap_matmul_triton(x, sp[0].bitmask, sp[0].values, n, nm=(2, 4))
            if err(yb) < 1e-2:
                res["bitmap nm"] = t(lambda i: bitmap_matmul_triton(x, sp[i].bitmask, sp[i].values, n, nm=(2, 4)))
            cfgs = {"nm24 default": default_nm24_config(n, kw) if m == 1 else default_nm24_dot_config(n, kw)}
            if a.sweep and m == 1:
                for bn, bw, sk, nw in list(itertools.product((2, 4, 8), (8, 16, 32), (1, 2), (4,))) + [
                        (4, 16, 1, 2), (4, 16, 1, 8), (8, 16, 1, 8), (2, 16, 1, 2)]:
                    cfgs[f"nm24 n{bn} w{bw} s{sk} w{nw}"] = Nm24Config(bn, bw, sk, nw)
            elif a.sweep:
                d = cfgs["nm24 default"].split_k
                for bn, bw, st, sk in itertools.product((32, 64, 128), (2, 4), (2, 3), sorted({max(1, d // 2), d, 2 * d})):
                    cfgs[f"nm24 dot n{bn} w{bw} st{st} s{sk}"] = Nm24Config(bn, bw, sk, 4, dot=True, num_stages=st)
                cfgs["nm24 fma n4 w16"] = Nm24Config(4, 16, 1, 4)
            for label, cfg in cfgs.items():
                try:
                    y = nm24_matmul_triton(x, sp[0].bitmask, sp[0].values, n, config=cfg)
                    e = err(y)
                    if not e < 1e-2:
                        print(f"{name} M={m} {label}: FAILED rel err {e:.2e}", flush=True)
                        continue
                    res[label] = t(lambda i, c=cfg: nm24_matmul_triton(x, sp[i].bitmask, sp[i].values, n, config=c))
                except Exception as ex:  # noqa: BLE001
                    print(f"{name} M={m} {label}: {type(ex).__name__} {str(ex)[:120]}", flush=True)
            base = res["cuBLAS"]
            best = min((v, lab) for lab, v in res.items() if lab.startswith("nm24"))
            for lab in ["cuBLAS", "rarefy dense", "bitmap nm", "nm24 default"]:
                if lab in res:
                    rows.append((name, m, lab, res[lab], base / res[lab], sparse_bytes / res[lab] / 1e6))
            if a.sweep:
                rows.append((name, m, "nm24 best: " + best[1][5:], best[0], base / best[0], sparse_bytes / best[0] / 1e6))
            print(f"{name} M={m}: " + ", ".join(f"{lab} {v:.1f}" for lab, v in res.items() if not lab.startswith("nm24 n")),
                  f"| best nm24 {best[1]} {best[0]:.1f}", flush=True)
    print("\n| shape | M | kernel | µs | vs cuBLAS | TB/s (2:4 bytes) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m, lab, us, sp_, tbs in rows:
        print(f"| {name} | {m} | {lab} | {us:.1f} | {sp_:.2f}x | {tbs:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
