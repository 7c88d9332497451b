"""Benchmark the Triton skinny-GEMM / GEMV kernel against cuBLAS on decode shapes.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. python3 benchmarks/gemv_bench.py --out gemv.md [--sweep] [--json sweep.json]

For every shape (Llama-3-8B with fused qkv / gate_up projections, a Qwen-27B-ish
5120-hidden model) and M in {1, 8, 32} it

1. checks the kernel against the float64 reference on fresh random data
   (relative error ||out - ref|| / ||ref||, no NaN in a NaN-prefilled output);
2. times the kernel (heuristic config) and ``torch.nn.functional.linear``
   (cuBLAS) with ``triton.testing.do_bench`` (median; it flushes L2 before each
   call) while rotating among several weight buffers so L2 (50 MB on an H100)
   never serves a repeat, and also as back-to-back launches replayed from a
   CUDA graph (the way decode runs);
3. prints a table (bytes = weights + x + out) and writes it as markdown to
   ``--out``.

``--sweep`` first times a grid of candidate configurations per case (CUDA-graph
timing, every candidate also checked for correctness) and reports the winners:
that is what the heuristic in ``rarefy/kernels/gemv/triton.py`` is fitted to.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

# The timing helpers live in rarefy.bench.gpu_timing (shared with `rarefy bench kernels`).
from rarefy.bench.gpu_timing import L2_BYTES, n_buffers
from rarefy.bench.gpu_timing import copy_bandwidth_tbs as _copy_bandwidth_tbs
from rarefy.bench.gpu_timing import do_bench_us as _do_bench_us
from rarefy.bench.gpu_timing import graph_time_us as _graph_time_us

# (name, N, K). Llama-3-8B: hidden 4096, 32 q / 8 kv heads of 128, MLP 14336,
# vocab 128256. Qwen-27B-ish: hidden 5120, MLP 17408; its attention shapes are
# stand-ins (q 5120 + k/v 1024 each, o 5120x5120).
SHAPES = [
    ("llama3-8b qkv", 6144, 4096),
    ("llama3-8b o", 4096, 4096),
    ("llama3-8b gate_up", 28672, 4096),
    ("llama3-8b down", 4096, 14336),
    ("llama3-8b lm_head", 128256, 4096),
    ("llama3-8b k|v (unfused)", 1024, 4096),
    ("qwen-27b qkv~", 7168, 5120),
    ("qwen-27b o~", 5120, 5120),
    ("qwen-27b gate_up", 34816, 5120),
    ("qwen-27b down", 5120, 17408),
]
MS = [1, 8, 32]
PEAK_TBS = 3.0  # measured device-to-device copy bandwidth of the H100 (read + write)


def _candidates(M: int, K: int):
    """The sweep space (second round: around the first round's winners)."""
    from rarefy.kernels.gemv.triton import GemvConfig

    out = []
    if M == 1:
        for bn, bk, nw in [(1, 1024, 4), (2, 1024, 4), (4, 1024, 4), (2, 2048, 8), (4, 2048, 8), (8, 2048, 8), (2, 4096, 16), (4, 512, 2)]:
            for split in (1, 2, 4):
                out.append(GemvConfig(1, bn, bk, split, False, nw, 1, prefetch=True, fold=True))
        out.append(GemvConfig(1, 2, 1024, 1, False, 4, 1, prefetch=False, fold=True))
        out.append(GemvConfig(16, 64, 128, 1, True, 4, 6))
    else:
        bm = 16 if M <= 16 else 32
        for bn, bk, nw, ns in [(64, 128, 4, 6), (64, 128, 4, 8), (64, 64, 4, 8), (64, 64, 4, 10), (64, 256, 4, 4),
                               (128, 128, 4, 5), (128, 64, 4, 8), (32, 128, 4, 8)]:
            for split in (1, 2, 4, 8):
                out.append(GemvConfig(bm, bn, bk, split, True, nw, ns))
    # drop splits that would leave fewer than one K step per split
    return [c for c in out if K // (c.block_k * c.split_k) >= 1]


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _bytes(M, N, K, elem=2):
    return (N * K + M * K + M * N) * elem


def _n_buffers(N, K, elem=2):
    return n_buffers(N * K * elem, L2_BYTES)


class Case:
    """Weights, activations and outputs of one (shape, M) case."""

    def __init__(self, N, K, M, dtype, device, gen_seed):
        g = torch.Generator(device=device).manual_seed(gen_seed)
        self.N, self.K, self.M = N, K, M
        self.nbuf = _n_buffers(N, K)
        self.ws = [(torch.randn(N, K, device=device, generator=g) / math.sqrt(K)).to(dtype) for _ in range(self.nbuf)]
        self.x = torch.randn(M, K, device=device, generator=g).to(dtype)
        self.out = torch.empty(M, N, device=device, dtype=dtype)
        self.ref0 = None

    def ref(self):
        if self.ref0 is None:
            from rarefy.kernels.gemv.ref import gemv_ref

            self.ref0 = gemv_ref(self.x, self.ws[0], out_dtype=torch.float64)
        return self.ref0


def check_config(case, cfg):
    from rarefy.kernels.gemv.triton import gemv_triton

    case.out.fill_(float("nan"))
    gemv_triton(case.x, case.ws[0], out=case.out, config=cfg)
    nan = bool(torch.isnan(case.out).any())
    return _rel_err(case.out, case.ref()), nan


def check_fresh(N, K, M, dtype, device, with_bias, seed):
    """Heuristic config on fresh random data, with or without bias."""
    from rarefy.kernels.gemv.ref import gemv_ref
    from rarefy.kernels.gemv.triton import gemv_triton

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, device=device, generator=g).to(dtype)
    w = (torch.randn(N, K, device=device, generator=g) / math.sqrt(K)).to(dtype)
    b = torch.randn(N, device=device, generator=g).to(dtype) if with_bias else None
    out = torch.full((M, N), float("nan"), device=device, dtype=dtype)
    gemv_triton(x, w, b, out)
    nan = bool(torch.isnan(out).any())
    return _rel_err(out, gemv_ref(x, w, b, out_dtype=torch.float64)), nan


def precompile(cases_cfgs, threads=16):
    """Compile every (case, config) kernel in parallel threads (Triton's
    AsyncCompileMode); later launches then find them compiled."""
    from triton.runtime._async_compile import AsyncCompileMode

    from rarefy.kernels.gemv.triton import gemv_triton

    t = time.time()
    with ThreadPoolExecutor(threads) as ex, AsyncCompileMode(ex, ignore_errors=True):
        for case, cfg, bias in cases_cfgs:
            b = torch.zeros(case.N, device=case.x.device, dtype=case.x.dtype) if bias else None
            gemv_triton(case.x, case.ws[0], b, out=case.out, config=cfg, compile_only=True)
    return time.time() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write all measurements (and sweep) as JSON here")
    ap.add_argument("--sweep", action="store_true", help="time candidate configs first")
    ap.add_argument("--sweep-shapes", default="all", help="comma list of shape-name substrings to sweep")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="all", help="comma list of shape-name substrings")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats per cell (median reported)")
    ap.add_argument("--diag-m1", action="store_true",
                    help="time M = 1 configs under do_bench's dirty-L2 flush on the small shapes")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from rarefy.kernels.gemv.triton import _fit_config, gemv_triton, pick_config

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    ms = [int(v) for v in args.ms.split(",")]

    def sel(spec):
        if spec == "all":
            return SHAPES
        keys = spec.split(",")
        return [s for s in SHAPES if any(k in s[0] for k in keys)]

    shapes = sel(args.shapes)
    info = {
        "device": props.name,
        "sms": sms,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype),
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(info))
    copy_tbs = _copy_bandwidth_tbs(device)
    info["copy_tbs"] = copy_tbs
    print(f"device-to-device copy: {copy_tbs:.2f} TB/s (read + write)")
    result = {"info": info, "sweep": [], "table": [], "checks": []}

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    # ------------------------------------------------------------------ sweep
    if args.sweep:
        sweep_shapes = sel(args.sweep_shapes)
        plan = []
        for name, N, K in sweep_shapes:
            for M in ms:
                plan.append((name, N, K, M))
        t0 = time.time()
        for name, N, K, M in plan:
            case = Case(N, K, M, dtype, device, gen_seed=hash((N, K, M)) % 2**31)
            cands = _candidates(M, K)
            ct = precompile([(case, c, False) for c in cands])
            heur = _fit_config(pick_config(M, N, K, dtype, sms), M, N, K)
            rows = []
            for cfg in cands + [None]:
                c = cfg if cfg is not None else heur
                try:
                    err, nan = check_config(case, c)
                    ok = (not nan) and err < 1e-2
                    us = _graph_time_us(lambda i, c=c: gemv_triton(case.x, case.ws[i], out=case.out, config=c), case.nbuf, device)
                except Exception as e:  # e.g. out of shared memory
                    print(f"[sweep] {name} M={M} {c}: {type(e).__name__}: {str(e)[:200]}")
                    err, nan, ok, us = float("nan"), True, False, float("inf")
                rows.append(dict(shape=name, N=N, K=K, M=M, cfg=c.__dict__, heuristic=cfg is None, us=us, err=err, nan=nan, ok=ok))
            cub = _graph_time_us(lambda i: F.linear(case.x, case.ws[i]), case.nbuf, device)
            good = [r for r in rows if r["ok"] and not r["heuristic"]]
            bad = [r for r in rows if not r["ok"]]
            best = min(good, key=lambda r: r["us"])
            hr = rows[-1]
            tbs = _bytes(M, N, K) / (best["us"] * 1e-6) / 1e12
            print(f"[sweep] {name:18s} M={M:2d} best {best['us']:8.2f} us {tbs:5.2f} TB/s  heur {hr['us']:8.2f} us  "
                  f"cublas {cub:8.2f} us  compile {ct:4.1f}s  bad {len(bad)}  best={best['cfg']}", flush=True)
            for r in sorted(good, key=lambda r: r["us"])[1:4]:
                print(f"[sweep]    next {r['us']:8.2f} us {r['cfg']}")
            for r in bad:
                print(f"[sweep] FAILED CHECK {r}", flush=True)
            result["sweep"].extend(rows)
            result["sweep"].append(dict(shape=name, N=N, K=K, M=M, cublas_graph_us=cub))
            del case
            torch.cuda.empty_cache()
            dump()
        print(f"[sweep] done in {time.time() - t0:.0f}s")

    if args.diag_m1:
        from rarefy.kernels.gemv.triton import GemvConfig

        diag = [GemvConfig(1, 1, 1024, 1, False, 4, 1, True, True), GemvConfig(1, 2, 1024, 1, False, 4, 1, True, True),
                GemvConfig(1, 4, 2048, 1, False, 8, 1, True, True), GemvConfig(1, 8, 1024, 1, False, 4, 1, True, True),
                GemvConfig(1, 8, 1024, 2, False, 4, 1, True, True), GemvConfig(1, 8, 1024, 1, False, 4, 1, False, False)]
        result["diag_m1"] = []
        for name, N, K in sel("llama3-8b o,llama3-8b qkv,qwen-27b o~"):
            case = Case(N, K, 1, dtype, device, gen_seed=7)
            cub = _do_bench_us(lambda i: F.linear(case.x, case.ws[i]), case.nbuf)
            for c in diag:
                launch = lambda i, c=c: gemv_triton(case.x, case.ws[i], out=case.out, config=c)  # noqa: E731
                dirty = [_do_bench_us(launch, case.nbuf) for _ in range(3)]
                clean = _do_bench_us(launch, case.nbuf, clean_l2=True)
                graph = _graph_time_us(launch, case.nbuf, device)
                print(f"[diag] {name:14s} M=1 bn={c.block_n} bk={c.block_k} w={c.num_warps} split={c.split_k} pf={c.prefetch}: "
                      f"do_bench {' '.join(f'{v:.1f}' for v in dirty)} us (cuBLAS {cub:.1f}) | clean-L2 {clean:.1f} | graph {graph:.1f}",
                      flush=True)
                result["diag_m1"].append(dict(shape=name, cfg=c.__dict__, dirty=dirty, clean=clean, graph=graph, cublas=cub))
            del case
            torch.cuda.empty_cache()
        dump()

    if args.no_table:
        dump()
        return 0

    # ------------------------------------------------------------ correctness
    failures = 0
    for name, N, K in shapes:
        for M in ms:
            for with_bias in (False, True):
                err, nan = check_fresh(N, K, M, dtype, device, with_bias, seed=hash((name, M, with_bias)) % 2**31)
                ok = (not nan) and err < 1e-2
                failures += not ok
                result["checks"].append(dict(shape=name, M=M, bias=with_bias, err=err, nan=nan, ok=ok))
                if not ok:
                    print(f"CHECK FAILED {name} M={M} bias={with_bias}: rel err {err:.3e} nan={nan}")
    print(f"correctness: {len(result['checks']) - failures}/{len(result['checks'])} cases pass (rel err < 1e-2, no NaN); "
          f"max rel err {max(c['err'] for c in result['checks']):.2e}")

    # ------------------------------------------------------------------ table
    rows = []
    for name, N, K in shapes:
        for M in ms:
            case = Case(N, K, M, dtype, device, gen_seed=hash((name, M)) % 2**31)
            cfg = _fit_config(pick_config(M, N, K, dtype, sms), M, N, K)

            def tri(i, case=case):
                gemv_triton(case.x, case.ws[i], out=case.out)

            def cub(i, case=case):
                F.linear(case.x, case.ws[i])

            # Interleave Triton and cuBLAS, repeat, keep the median of the medians.
            runs = {k: [] for k in ("t_tri", "t_cub", "c_tri", "c_cub", "g_tri", "g_cub")}
            for _ in range(args.repeats):
                runs["t_tri"].append(_do_bench_us(tri, case.nbuf))
                runs["t_cub"].append(_do_bench_us(cub, case.nbuf))
                runs["c_tri"].append(_do_bench_us(tri, case.nbuf, clean_l2=True))
                runs["c_cub"].append(_do_bench_us(cub, case.nbuf, clean_l2=True))
                runs["g_tri"].append(_graph_time_us(tri, case.nbuf, device))
                runs["g_cub"].append(_graph_time_us(cub, case.nbuf, device))
            t_tri, t_cub, c_tri, c_cub, g_tri, g_cub = (statistics.median(runs[k]) for k in runs)
            nbytes = _bytes(M, N, K)
            tbs = lambda us: nbytes / (us * 1e-6) / 1e12  # noqa: E731
            row = dict(shape=name, N=N, K=K, M=M, bytes=nbytes, cfg=cfg.__dict__,
                       us_triton=t_tri, us_cublas=t_cub, clean_us_triton=c_tri, clean_us_cublas=c_cub,
                       graph_us_triton=g_tri, graph_us_cublas=g_cub, runs=runs)
            rows.append(row)
            print(f"{name:24s} {N:6d}x{K:<5d} M={M:2d}  do_bench {t_tri:7.1f} vs {t_cub:7.1f} us {tbs(t_tri):5.2f} TB/s "
                  f"({tbs(t_tri) / PEAK_TBS:4.0%}) x{t_cub / t_tri:4.2f} | clean-L2 {c_tri:7.1f} vs {c_cub:7.1f} us "
                  f"{tbs(c_tri):5.2f} TB/s x{c_cub / c_tri:4.2f} | graph {g_tri:7.1f} vs {g_cub:7.1f} us {tbs(g_tri):5.2f} TB/s "
                  f"({tbs(g_tri) / PEAK_TBS:4.0%}) x{g_cub / g_tri:4.2f}", flush=True)
            if args.repeats > 1:
                print("    spread (min..max of repeats): " + "  ".join(
                    f"{k} {min(v):.1f}..{max(v):.1f}" for k, v in runs.items()), flush=True)
            del case
            torch.cuda.empty_cache()
    result["table"] = rows
    dump()

    md = [
        "| shape | N x K | M | do_bench µs Triton | µs cuBLAS | TB/s | of 3.0 | speedup "
        "| clean-L2 µs Triton | µs cuBLAS | TB/s | of 3.0 | speedup "
        "| graph µs Triton | µs cuBLAS | TB/s | of 3.0 | speedup |",
        "|---|---|---|" + "---|" * 15,
    ]
    for r in rows:
        cells = [r["shape"], f"{r['N']}x{r['K']}", str(r["M"])]
        for kt, kc in (("us_triton", "us_cublas"), ("clean_us_triton", "clean_us_cublas"), ("graph_us_triton", "graph_us_cublas")):
            t, c = r[kt], r[kc]
            bw = r["bytes"] / (t * 1e-6) / 1e12
            cells += [f"{t:.1f}", f"{c:.1f}", f"{bw:.2f}", f"{bw / PEAK_TBS:.0%}", f"{c / t:.2f}x"]
        md.append("| " + " | ".join(cells) + " |")
    text = "\n".join(md)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"<!-- {json.dumps(info)} -->\n\n{text}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
