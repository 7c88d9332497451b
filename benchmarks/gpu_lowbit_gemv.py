"""Fused low-bit GEMV / small-batch GEMM on the GPU against cuBLAS bf16, Llama-3-8B shapes.

    PYTHONPATH=. python3 benchmarks/gpu_lowbit_gemv.py [--quick] [--out lowbit.md] [--json lowbit.json]

Needs only torch and triton (and a CUDA GPU). For every shape (4096x4096 q/o, 1024x4096 k/v,
14336x4096 gate/up, 4096x14336 down) and batch M = 1 and 8:

1. checks every kernel against the float reference on the benchmark's own weights (output
   pre-filled with NaN; relative error ||y - ref|| / ||ref||): ternary (bf16 activations),
   ternary W1.58A8 (int8 activations), int8 weight-only -- default plans, per-tensor /
   per-channel scales, plus per-group (128) at M = 1 and 8 on 4096x4096;
2. times them and ``F.linear`` on a bf16 weight (cuBLAS) as back-to-back launches replayed
   from a CUDA graph, rotating over copies of the weight that together exceed 4x L2
   (``rarefy.bench.gpu_timing``), median of 7 replays;
3. prints µs, bytes moved (packed weight + scales + x + y), TB/s, the fraction of the
   device-to-device copy bandwidth measured in the same run, and the speed-up over cuBLAS;
4. sweeps a few launch configurations per case (block sizes, split-K, warps, stages,
   prefetch, programmatic dependent launch) and prints the best of each (--quick: fewer
   shapes and candidates);
5. ends with the issue's targets (ternary >= 6x, int8 >= 1.8x at M = 1; M = 8 keeps >= 70 %
   of that), with the default plans and with the best swept configuration.

--quick runs in well under 2 minutes on an H100, the full run in under 5.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from rarefy.bench.gpu_timing import (
    copy_bandwidth_tbs,
    graph_time_us,
    l2_bytes,
    n_buffers,
)

SHAPES = [
    ("q/o 4096x4096", 4096, 4096),
    ("k/v 1024x4096", 1024, 4096),
    ("gate/up 14336x4096", 14336, 4096),
    ("down 4096x14336", 4096, 14336),
]
QUICK_SHAPES = ["q/o 4096x4096", "gate/up 14336x4096"]
BATCHES = [1, 8]
KERNELS = ["ternary", "ternary_i8act", "int8"]
TARGET = {"ternary": 6.0, "ternary_i8act": 6.0, "int8": 1.8}
KEEP = 0.7


def rel_err(y, ref) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- weights


class Weights:
    """One random weight in every format, plus enough copies to defeat L2."""

    def __init__(self, n: int, k: int, device, seed: int, l2: int, group_size: int | None = None,
                 copies: bool = True, dtype=torch.bfloat16):
        from rarefy.lowbit.int8 import quantize_int8
        from rarefy.lowbit.ternary import quantize_ternary

        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g) / math.sqrt(k)
        self.n, self.k, self.group_size = n, k, group_size
        tw = quantize_ternary(w, group_size)
        iw = quantize_int8(w, group_size)
        self.packed = [tw.packed.to(device)]
        self.tscale = tw.scale.to(device)
        self.q8 = [iw.qweight.to(device)]
        self.s8 = iw.scale.to(device)
        self.bf16 = [w.to(device, dtype)]  # the cuBLAS baseline (bf16 unless --dtype fp16)
        if copies:
            self.add_copies(l2)

    def add_copies(self, l2: int) -> None:
        """Clone every weight until its copies together exceed 4x L2."""
        for lst in (self.packed, self.q8, self.bf16):
            nb = n_buffers(lst[0].numel() * lst[0].element_size(), l2)
            while len(lst) < nb:
                lst.append(lst[0].clone())

    def bytes(self, kernel: str, m: int) -> int:
        """Bytes a launch must move: weight (+ scales) + activations + output (bf16)."""
        io = m * self.k * 2 + m * self.n * 2
        if kernel == "cublas":
            return self.n * self.k * 2 + io
        if kernel.startswith("ternary"):
            w = self.packed[0].numel() + self.tscale.numel() * self.tscale.element_size()
            if kernel == "ternary_i8act":
                io = m * self.k + m * 4 + m * self.n * 2
            return w + io
        return self.q8[0].numel() + self.s8.numel() * self.s8.element_size() + io


class Runner:
    """Launch closures for one (weights, M): kernel name + config -> launch(i)."""

    def __init__(self, wts: Weights, m: int, device, seed: int, dtype=torch.bfloat16):
        from rarefy.kernels.lowbit_gemv import triton_int8 as ti
        from rarefy.kernels.lowbit_gemv import triton_ternary as tt

        self.tt, self.ti = tt, ti
        self.w, self.m = wts, m
        g = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(m, wts.k, device=device, generator=g).to(dtype)
        self.xq, self.xs = tt.quantize_act_triton(self.x)
        self.out = torch.empty(m, wts.n, device=device, dtype=dtype)
        self._refs = {}

    def launch(self, kernel: str, cfg=None, compile_only: bool = False):
        w, G = self.w, self.w.group_size
        if kernel == "cublas":
            return lambda i: F.linear(self.x, w.bf16[i % len(w.bf16)])
        if kernel == "ternary":
            return lambda i: self.tt.ternary_triton(self.x, w.packed[i % len(w.packed)], w.tscale, G, self.out,
                                                    config=cfg, compile_only=compile_only)
        if kernel == "ternary_i8act":
            return lambda i: self.tt.ternary_triton(self.xq, w.packed[i % len(w.packed)], w.tscale, G, self.out,
                                                    x_scale=self.xs, config=cfg, compile_only=compile_only)
        if kernel == "ternary_i8act+quant":  # float x: quantize (one launch) + GEMV

            def run(i):
                xq, xs = self.tt.quantize_act_triton(self.x)
                self.tt.ternary_triton(xq, w.packed[i % len(w.packed)], w.tscale, G, self.out, x_scale=xs,
                                       config=cfg)

            return run
        if kernel == "int8":
            return lambda i: self.ti.int8_triton(self.x, w.q8[i % len(w.q8)], w.s8, G, self.out, config=cfg,
                                                 compile_only=compile_only)
        raise ValueError(kernel)

    def reference(self, kernel: str):
        key = "ternary_i8act" if kernel.startswith("ternary_i8act") else kernel
        if key not in self._refs:
            self._refs[key] = self._reference(key)
        return self._refs[key]

    def _reference(self, kernel: str):
        from rarefy.kernels.lowbit_gemv import ref as R

        w, G = self.w, self.w.group_size
        kw = dict(out_dtype=torch.float64, compute_dtype=torch.float32)
        if kernel == "ternary":
            return R.ternary_matmul_ref(self.x, w.packed[0], w.tscale, G, **kw)
        if kernel.startswith("ternary_i8act"):
            return R.ternary_matmul_int8act_ref(self.xq, w.packed[0], w.tscale, G, x_scale=self.xs, **kw)
        return R.int8_matmul_ref(self.x, w.q8[0], w.s8, G, **kw)

    def check(self, kernel: str, cfg=None) -> tuple[float, bool]:
        self.out.fill_(float("nan"))
        self.launch(kernel, cfg)(0)
        if self.out.is_cuda:
            torch.cuda.synchronize()
        bad = not bool(torch.isfinite(self.out).all())
        return rel_err(self.out, self.reference(kernel)), bad

    def nbuf(self, kernel: str) -> int:
        w = self.w
        return len(w.bf16) if kernel == "cublas" else len(w.q8) if kernel == "int8" else len(w.packed)

    def time(self, kernel: str, cfg=None) -> float:
        return graph_time_us(self.launch(kernel, cfg), self.nbuf(kernel), self.x.device)


XK = "bf16"  # activation dtype key of the plans (--dtype)


def default_config(kernel: str, m: int, n: int, k: int, group_size, sms: int):
    from rarefy.kernels.lowbit_gemv import plan as P

    if kernel == "int8":
        return P.pick_int8_config(m, n, k, group_size, XK, sms)
    if kernel.startswith("ternary_i8act"):
        return P.pick_ternary_config(m, n, k, group_size, "int8", True, sms)
    return P.pick_ternary_config(m, n, k, group_size, XK, False, sms)


# ----------------------------------------------------------------------------- sweep space


def candidates(kernel: str, m: int, n: int, k: int, sms: int, quick: bool):
    """A small grid around the defaults (each is checked against the reference too).
    Configurations that differ only in split-K share one compiled kernel."""
    from rarefy.kernels.lowbit_gemv import plan as P

    d = default_config(kernel, m, n, k, None, sms)
    out = [replace(d, pdl=True)]
    bm = 16 if m <= 16 else 32

    def splits(tiles: int, steps: int, target: int) -> list[int]:
        base = P._split_for(tiles, steps, target)
        return sorted({base, min(2 * base, steps)} if quick else {max(1, base // 2), base, min(2 * base, steps)})

    if kernel == "int8":
        if m == 1:
            out.append(replace(d, prefetch=not d.prefetch))
            grid = [(4, 2048, 4), (8, 2048, 4), (8, 1024, 2)] if quick else \
                [(2, 2048, 4), (4, 2048, 4), (8, 2048, 4), (8, 1024, 2), (16, 1024, 2)]
            for bn, bk, nw in grid:
                for sp in (1,) if quick else (1, 2):
                    out.append(P.Int8Config("fma", bn, bk, sp, 1, 16, nw, 1, prefetch=True))
        grid = [(64, 128, 4, 4), (128, 128, 4, 4), (128, 64, 4, 4)]
        if not quick:
            grid += [(64, 256, 4, 3), (128, 128, 8, 3)]
        if m > 1 or not quick:
            for bn, bk, nw, st in grid[: (1 if m == 1 else len(grid))]:
                for sp in splits(-(-n // bn) * -(-m // bm), -(-k // bk), sms):
                    out.append(P.Int8Config("dot", bn, bk, sp, bm, 1, nw, st))
    else:
        if m == 1 and (kernel == "ternary" or not quick):
            out.append(replace(d, prefetch=not d.prefetch) if d.path == "fma" else d)
            grid = [(8, 128, 4), (16, 128, 4), (32, 128, 4)] + ([] if quick else [(16, 64, 2)])
            for bn, bu, nw in grid:
                st = -(-(k // 16) // bu)
                for sp in splits(-(-n // bn), st, 3 * sms):
                    out.append(P.TernaryConfig("fma", bn, bu, sp, 1, 1, nw, 1, prefetch=-(-st // sp) >= 2))
        grid = [(128, 16, 4, 2), (64, 16, 4, 2), (128, 8, 4, 2)]
        if not quick:
            grid += [(128, 32, 4, 2), (256, 16, 8, 2), (128, 16, 4, 3)]
        if m > 1 or kernel == "ternary_i8act" or not quick:
            for bn, bu, nw, st in grid[: (1 if m == 1 and kernel == "ternary" else len(grid))]:
                for sp in splits(-(-n // bn) * -(-m // bm), -(-(k // 16) // bu), sms):
                    out.append(P.TernaryConfig("dot", bn, bu, sp, bm, 1, nw, st))
        if kernel == "ternary_i8act" and not quick:
            out.append(replace(d, i8mma=True))
    seen, uniq = {d}, []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def precompile(runner: Runner, jobs, threads: int = 16) -> float:
    """Compile every (kernel, config) in parallel (Triton's AsyncCompileMode)."""
    from triton.runtime._async_compile import AsyncCompileMode

    t = time.time()
    with ThreadPoolExecutor(threads) as ex, AsyncCompileMode(ex, ignore_errors=True):
        for kernel, cfg in jobs:
            try:
                runner.launch(kernel, cfg, compile_only=True)(0)
            except Exception:  # noqa: BLE001 - reported when the config is run
                pass
    return time.time() - t


# ----------------------------------------------------------------------------- main


def fmt_cfg(c) -> str:
    return c.short() if c is not None else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 shapes swept, fewer candidates")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--shapes", default="all", help="comma list of shape-name substrings")
    ap.add_argument("--out", default=None, help="write the tables as markdown here")
    ap.add_argument("--json", default=None, help="write every measurement as JSON here")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="activations and cuBLAS weight")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # dry runs of the script logic
    args = ap.parse_args(argv)
    global XK
    XK = args.dtype
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16

    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    t_start = time.time()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    l2 = l2_bytes(device)
    info = dict(device=props.name, sms=sms, l2_mb=l2 / 2**20, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=datetime.date.today().isoformat(), quick=args.quick)
    print(json.dumps(info), flush=True)
    copy_tbs = copy_bandwidth_tbs(device)
    info["copy_tbs"] = copy_tbs
    print(f"device-to-device copy: {copy_tbs:.2f} TB/s (read + write)", flush=True)

    shapes = SHAPES if args.shapes == "all" else [s for s in SHAPES if any(t in s[0] for t in args.shapes.split(","))]
    result = dict(info=info, checks=[], table=[], sweep=[], targets=[])
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=str)

    # ------------------------------------------------------------- correctness first
    failures = 0
    say("## Correctness (default plans; NaN-prefilled output; rel. error vs fp32 reference)")
    say("")
    say("| shape | scales | M | kernel | plan | rel. error | ok |")
    say("|---|---|---|---|---|---|---|")
    todo = []
    plain = {}  # per-tensor / per-channel weights, reused (with copies) for the timing
    for name, n, k in shapes:
        for G in [None, 128] if n == k == 4096 else [None]:
            wts = Weights(n, k, device, seed=n + k + (G or 0), l2=l2, group_size=G, copies=False, dtype=dtype)
            if G is None:
                plain[name] = wts
            for m in BATCHES:
                todo.append((name, n, k, G, m, Runner(wts, m, device, seed=m, dtype=dtype)))
    from triton.runtime._async_compile import AsyncCompileMode

    t0 = time.time()
    with ThreadPoolExecutor(16) as ex, AsyncCompileMode(ex, ignore_errors=True):
        for name, n, k, G, m, r in todo:
            for kern in KERNELS:
                try:
                    r.launch(kern, default_config(kern, m, n, k, G, sms), compile_only=True)(0)
                except Exception:  # noqa: BLE001 - reported by the check below
                    pass
    print(f"compiled the default plans in {time.time() - t0:.0f}s", flush=True)
    for name, n, k, G, m, r in todo:
        for kern in KERNELS:
            cfg = default_config(kern, m, n, k, G, sms)
            try:
                err, bad = r.check(kern, cfg)
            except Exception as e:  # noqa: BLE001
                err, bad = float("nan"), True
                print(f"  {kern} failed: {type(e).__name__}: {str(e)[:300]}")
            tol = 1e-2
            ok = (not bad) and err < tol
            failures += not ok
            result["checks"].append(dict(shape=name, group=G, m=m, kernel=kern, cfg=asdict(cfg), err=err,
                                         ok=ok))
            say(f"| {name} | {'group ' + str(G) if G else 'tensor/channel'} | {m} | {kern} | "
                f"{fmt_cfg(cfg)} | {err:.2e} | {'yes' if ok else 'NO'} |")
    del todo
    torch.cuda.empty_cache()
    say("")
    say(f"{len(result['checks']) - failures}/{len(result['checks'])} checks pass")
    say("")

    # ------------------------------------------------------------- timing + sweep
    best = {}
    table = []
    for name, n, k in shapes:
        wts = plain.pop(name)
        wts.add_copies(l2)
        for m in BATCHES:
            r = Runner(wts, m, device, seed=m, dtype=dtype)
            t_cub = statistics.median([r.time("cublas") for _ in range(3)])
            row = dict(shape=name, n=n, k=k, m=m, cublas_us=t_cub, bytes_cublas=wts.bytes("cublas", m))
            sweep_here = (not args.no_sweep) and (not args.quick or name in QUICK_SHAPES)
            jobs = []
            for kern in KERNELS:
                d = default_config(kern, m, n, k, None, sms)
                jobs.append((kern, d))
                if sweep_here and not (args.quick and kern == "ternary_i8act"):
                    jobs += [(kern, c) for c in candidates(kern, m, n, k, sms, args.quick)]
            ct = precompile(r, jobs)
            for kern in KERNELS:
                d = default_config(kern, m, n, k, None, sms)
                try:
                    t_def = statistics.median([r.time(kern, d) for _ in range(3)])
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    print(f"  timing {name} M={m} {kern} {fmt_cfg(d)} FAILED: {type(e).__name__}: {str(e)[:200]}")
                    t_def = float("inf")
                row[f"{kern}_us"] = t_def
                row[f"{kern}_cfg"] = fmt_cfg(d)
                row[f"{kern}_bytes"] = wts.bytes(kern, m)
                best[(name, m, kern)] = (t_def, d)
                if kern == "ternary_i8act":
                    try:
                        row["ternary_i8act+quant_us"] = r.time("ternary_i8act+quant", d)
                    except Exception:  # noqa: BLE001
                        row["ternary_i8act+quant_us"] = float("inf")
            for kern, c in jobs:
                if c == default_config(kern, m, n, k, None, sms):
                    continue
                try:
                    err, bad = r.check(kern, c)
                    ok = (not bad) and err < 1e-2
                    us = r.time(kern, c) if ok else float("inf")
                    msg = ""
                except Exception as e:  # noqa: BLE001 - out of shared memory, PDL unsupported, ...
                    err, ok, us, msg = float("nan"), False, float("inf"), f"{type(e).__name__}: {str(e)[:160]}"
                result["sweep"].append(dict(shape=name, m=m, kernel=kern, cfg=asdict(c), us=us, err=err, ok=ok,
                                            error=msg))
                if ok and us < best[(name, m, kern)][0]:
                    best[(name, m, kern)] = (us, c)
                if not ok:
                    print(f"  [sweep] {name} M={m} {kern} {fmt_cfg(c)}: FAILED {msg or f'err {err:.2e}'}")
            table.append(row)
            result["table"].append(row)
            brief = "  ".join(f"{kern} {row[f'{kern}_us']:.1f} us (x{t_cub / row[f'{kern}_us']:.2f})" for kern in KERNELS)
            print(f"{name} M={m}: cuBLAS {t_cub:.1f} us | {brief} | compile {ct:.0f}s", flush=True)
            dump()
        del wts
        torch.cuda.empty_cache()

    # ------------------------------------------------------------- tables
    say("## Time per call (CUDA-graph replay, weights rotated over > 4x L2, default plans)")
    say("")
    say(f"Copy bandwidth measured in this run: {copy_tbs:.2f} TB/s (read + write). TB/s counts the "
        "bytes a call must move (packed weight + scales + x + y).")
    say("")
    say("| shape | M | kernel | plan | µs | MB | TB/s | of copy | vs cuBLAS |")
    say("|---|---|---|---|---|---|---|---|---|")
    for row in table:
        n, k, m = row["n"], row["k"], row["m"]
        cb = row["cublas_us"]
        mb = row["bytes_cublas"] / 1e6
        tb = row["bytes_cublas"] / (cb * 1e-6) / 1e12
        say(f"| {row['shape']} | {m} | cuBLAS {args.dtype} | F.linear | {cb:.1f} | {mb:.2f} | {tb:.2f} | {tb / copy_tbs:.0%} | 1.00x |")
        for kern in KERNELS:
            us = row[f"{kern}_us"]
            by = row[f"{kern}_bytes"]
            tb = by / (us * 1e-6) / 1e12
            say(f"| {row['shape']} | {m} | {kern} | {row[f'{kern}_cfg']} | {us:.1f} | {by / 1e6:.2f} | {tb:.2f} | "
                f"{tb / copy_tbs:.0%} | {cb / us:.2f}x |")
        q = row["ternary_i8act+quant_us"]
        say(f"| {row['shape']} | {m} | ternary_i8act + quantize launch | (float x) | {q:.1f} | | | | {cb / q:.2f}x |")
    say("")

    if result["sweep"]:
        say("## Sweep: best configuration per case (all candidates checked against the reference)")
        say("")
        say("| shape | M | kernel | default µs | best µs | best plan | candidates | failed |")
        say("|---|---|---|---|---|---|---|---|")
        for row in table:
            for kern in KERNELS:
                key = (row["shape"], row["m"], kern)
                cands = [s for s in result["sweep"] if (s["shape"], s["m"], s["kernel"]) == key]
                if not cands:
                    continue
                bus, bcfg = best[key]
                say(f"| {row['shape']} | {row['m']} | {kern} | {row[f'{kern}_us']:.1f} | {bus:.1f} | {fmt_cfg(bcfg)} | "
                    f"{len(cands)} | {sum(not s['ok'] for s in cands)} |")
        say("")
        say("Top candidates per case (µs):")
        say("")
        for row in table:
            for kern in KERNELS:
                key = (row["shape"], row["m"], kern)
                cands = sorted((s for s in result["sweep"] if (s["shape"], s["m"], s["kernel"]) == key and s["ok"]),
                               key=lambda s: s["us"])[:4]
                if cands:
                    from rarefy.kernels.lowbit_gemv import plan as P

                    cls = P.Int8Config if kern == "int8" else P.TernaryConfig
                    say(f"- {row['shape']} M={row['m']} {kern}: " + "; ".join(
                        f"{s['us']:.1f} {cls(**s['cfg']).short()}" for s in cands))
        say("")

    say(f"## Targets (speed-up over cuBLAS {args.dtype} in this run)")
    say("")
    say("| shape | kernel | M=1 default | M=1 best | target | M=8 default | M=8 best | M=8 target (70%) | met (best) |")
    say("|---|---|---|---|---|---|---|---|---|")
    for name, n, k in shapes:
        rows = {r["m"]: r for r in table if r["shape"] == name}
        if 1 not in rows or 8 not in rows:
            continue
        for kern in KERNELS:
            s1d = rows[1]["cublas_us"] / rows[1][f"{kern}_us"]
            s8d = rows[8]["cublas_us"] / rows[8][f"{kern}_us"]
            s1b = rows[1]["cublas_us"] / best[(name, 1, kern)][0]
            s8b = rows[8]["cublas_us"] / best[(name, 8, kern)][0]
            tgt = TARGET[kern]
            met = s1b >= tgt and s8b >= KEEP * tgt
            result["targets"].append(dict(shape=name, kernel=kern, m1_default=s1d, m1_best=s1b, m8_default=s8d,
                                          m8_best=s8b, target=tgt, met=met))
            say(f"| {name} | {kern} | {s1d:.2f}x | {s1b:.2f}x | >= {tgt:.1f}x | {s8d:.2f}x | {s8b:.2f}x | "
                f">= {KEEP * tgt:.2f}x | {'yes' if met else 'no'} |")
    say("")
    say(f"({time.time() - t_start:.0f} s in all; {failures} correctness failures)")
    dump()
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"<!-- {json.dumps(info)} -->\n\n" + "\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
