"""Sweep launch configs of the Triton sparse kernels on one GPU (the autotuner's search space).

    PYTHONPATH=. python3 benchmarks/sparse_sweep.py [--shapes 4096x4096,...] [--batches 1,8]

Every candidate is checked against the float64 reference first (rel. error < 1e-2, no NaN).
Timing: back-to-back launches replayed from a CUDA graph, rotating over enough weight
copies that L2 never serves a repeat; dense cuBLAS and rarefy's dense GEMV are timed the
same way in the same run. Prints the best config per case and its speed-up.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from rarefy.formats.sparse_weight import BlockSparse, DeltaSparse, NMSparse, TiledBitmap
from rarefy.kernels.gemv import gemv
from rarefy.kernels.sparse_matmul import sparse_matmul, sparse_matmul_ref
from rarefy.kernels.sparse_matmul.triton_bitmap import BitmapConfig
from rarefy.kernels.sparse_matmul.triton_bsr import BsrConfig
from rarefy.kernels.sparse_matmul.triton_delta import DeltaConfig
from rarefy.sparse_compiler.compile import time_us
from rarefy.sparsity.masks import block_mask, nm_mask, unstructured_mask

L2_BYTES = 50 * 2**20


def make_weight(n, k, pattern, gen):
    w = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.float32)
    kind, arg = pattern
    if kind in ("unstructured", "unstructured_w", "delta"):
        w = w * unstructured_mask(w.abs(), arg)
    elif kind == "nm":
        w = w * nm_mask(w.abs(), *arg)
    elif kind == "block":
        b, s = arg
        w = w * block_mask(w.abs(), s, b, b)
    return w.to(torch.bfloat16)


def encode(w, pattern):
    kind, arg = pattern
    if kind == "unstructured":
        return TiledBitmap.from_dense(w)
    if kind == "unstructured_w":
        return TiledBitmap.from_dense(w, word_offsets=True)
    if kind == "delta":
        return DeltaSparse.from_dense(w)
    if kind == "nm":
        return NMSparse.from_dense(w, *arg)
    return BlockSparse.from_dense(w, arg[0])


def graph_us(launch, nbuf):
    """Median µs per call of `launch(i)` (i cycles over nbuf weight copies) replayed in a graph."""
    return time_us([lambda i=i: launch(i) for i in range(nbuf)], torch.device("cuda"))


def bitmap_configs(m):
    if m == 1:
        for bn, bk, nw in itertools.product((1, 2, 4), (256, 512, 1024), (1, 2, 4)):
            if bn * bk // (32 * nw) >= 4:
                yield BitmapConfig(block_n=bn, block_k=bk, block_m=1, num_warps=nw, flat=True)
        for bn, bk, nw in ((2, 512, 1), (1, 1024, 1), (2, 256, 1)):
            yield BitmapConfig(block_n=bn, block_k=bk, block_m=1, num_warps=nw)
    else:
        bm = triton.next_power_of_2(m)
        if bm <= 8:
            for bn, bk, nw in itertools.product((1, 2, 4), (128, 256, 512), (2, 4)):
                yield BitmapConfig(block_n=bn, block_k=bk, block_m=bm, num_warps=nw)
        for bn, bk, nw in itertools.product((16, 32), (64, 128), (4, 8)):
            yield BitmapConfig(block_n=bn, block_k=bk, block_m=max(16, bm), use_dot=True, num_warps=nw)


def delta_configs(m):
    bm = 1 if m == 1 else min(8, triton.next_power_of_2(m))
    for bn, bv, nw in itertools.product((1, 2, 4, 8), (64, 128, 256, 512), (1, 2, 4)):
        if bn * bv // (32 * nw) >= 2:
            yield DeltaConfig(block_n=bn, block_v=bv, block_m=bm, num_warps=nw)


def bsr_configs(m, b, n_block_rows):
    for u, nw, split in itertools.product((2, 4, 8), (2, 4), (1, 2, 4, 8)):
        if u * b <= 256 and n_block_rows * split <= 8192:
            yield BsrConfig(unroll=u, block_m=1 if m == 1 else 16, num_warps=nw, split=split)


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,1024x4096,14336x4096,4096x14336")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--patterns", default="u50,u75,u90,2:4,b32")
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args()
    pats = {"u50": ("unstructured", 0.5), "u70": ("unstructured", 0.7), "u75": ("unstructured", 0.75),
            "u90": ("unstructured", 0.9),
            "d50": ("delta", 0.5), "d75": ("delta", 0.75), "d90": ("delta", 0.9),
            "w50": ("unstructured_w", 0.5), "w75": ("unstructured_w", 0.75), "w90": ("unstructured_w", 0.9), "2:4": ("nm", (2, 4)), "4:8": ("nm", (4, 8)),
            "b16": ("block", (16, 0.5)), "b32": ("block", (32, 0.5)), "b64": ("block", (64, 0.5))}
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        for pname in args.patterns.split(","):
            pattern = pats[pname]
            w = make_weight(n, k, pattern, gen)
            sw = encode(w, pattern)
            nbuf = max(2, -(-3 * L2_BYTES // max(1, sw.nbytes)))
            nbuf_dense = max(2, -(-3 * L2_BYTES // (n * k * 2)))
            sws = [sw] + [sw.clone() for _ in range(min(nbuf, 24) - 1)]
            dws = [w] + [w.clone() for _ in range(min(nbuf_dense, 24) - 1)]
            for m in map(int, args.batches.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = sparse_matmul_ref(x, sw)
                t_cublas = graph_us(lambda i: F.linear(x, dws[i]), len(dws))
                t_dense = graph_us(lambda i: gemv(x, dws[i]), len(dws))
                if isinstance(sw, BlockSparse):
                    cands = list(bsr_configs(m, sw.block, sw.row_ptr.numel() - 1))
                elif isinstance(sw, DeltaSparse):
                    cands = list(delta_configs(m))
                else:
                    cands = list(bitmap_configs(m))
                results = []
                for cfg in cands:
                    try:
                        y = sparse_matmul(x, sw, config=cfg)
                        err = rel_err(y, ref)
                        if not (err < 1e-2):
                            results.append((float("inf"), cfg, f"BAD err={err:.2e}"))
                            continue
                        t = graph_us(lambda i: sparse_matmul(x, sws[i], config=cfg), len(sws))
                        results.append((t, cfg, ""))
                    except Exception as e:  # a config may not compile (resources)
                        results.append((float("inf"), cfg, f"{type(e).__name__}: {str(e)[:80]}"))
                results.sort(key=lambda r: r[0])
                best = results[0]
                tbs = (sw.nbytes + x.numel() * 2 + m * n * 2) / best[0] / 1e6
                row = (shape, pname, m, sw.nbytes / (n * k * 2), t_cublas, t_dense, best[0],
                       t_cublas / best[0], t_dense / best[0], tbs, best[1])
                rows.append(row)
                print(f"{shape:>11} {pname:>4} M={m:<2} bytes={row[3]:.3f} cublas={t_cublas:7.1f} dense={t_dense:7.1f} "
                      f"sparse={best[0]:7.1f}  vs cublas {row[7]:.2f}x  vs dense {row[8]:.2f}x  {tbs:.2f} TB/s", flush=True)
                for r in results[: args.top]:
                    print(f"      {r[0]:8.1f} {r[1]} {r[2]}")
                bad = [r for r in results if r[2].startswith("BAD")]
                if bad:
                    print(f"      !! {len(bad)} configs gave wrong results: {bad[0]}")
            del sws, dws
            torch.cuda.empty_cache()
    print("\n| shape | pattern | M | bytes/dense | cuBLAS µs | dense GEMV µs | sparse µs | vs cuBLAS | vs dense | TB/s | config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.2f} | {r[8]:.2f} | {r[9]:.2f} | {r[10]} |")


if __name__ == "__main__":
    main()
