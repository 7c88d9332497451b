"""CPU input-sparse GEMV benchmark (activation sparsity): rarefy's kernel against the dense baselines.

For each layer shape (wt [K, N], the weight transposed) and batch M, the variants are timed in
the same run, interleaved repeat after repeat so drift in machine load hits all of them:

    dense   rarefy gemv_f16 on the untransposed fp16 weight [N, K] (the baseline)
    fp32    torch F.linear, fp32 weight
    s=...   input_sparse_matmul_cpu, fp16 wt [K, N], x with the given fraction of entries
            below the threshold (per token, independent random masks; with --mask shared
            all tokens of the batch share one mask)

Two regimes: "hot" calls the same weight every time (in cache: L2 for the SmolLM2 shapes, L3
for 4096 x 4096), "stream" rotates over weight copies totalling more than --stream-mb MB per
variant (fp16 bytes; more than the 260 MB L3 here) so weights come from DRAM as in decode of a
large model. Median of --repeats measurements of ~20 ms each, after warm-up.

The machine may be shared: before and during each block the CPU time used by OTHER processes
is read from /proc (total busy time minus this process's); a block during which others used
more than --max-load of the CPUs is re-run (up to --retries times, after a pause) and the
load is reported with the results.

    python3 benchmarks/cpu_activation_gemv.py --out docs/results/activation-cpu-gemv.md
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.bench.machine import cpu_name  # noqa: E402
from rarefy.kernels import activation_cpu, gemv_cpu  # noqa: E402

SHAPES = [  # (K, N, what): wt is [K, N]
    (576, 576, "q_proj / o_proj"),
    (576, 192, "k_proj / v_proj"),
    (576, 1536, "gate_proj / up_proj"),
    (576, 3072, "gate+up fused"),
    (1536, 576, "down_proj"),
    (4096, 4096, "larger layer"),
]
SPARSITIES = [0.0, 0.1, 0.2, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9]
DATE = "2026-11-23"


# ----------------------------------------------------------------------------- load monitor
def _busy_total() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [float(a) for a in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)
    return sum(v[:8]) - idle, sum(v[:8])


def _self_ticks() -> float:
    with open("/proc/self/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return float(v[11]) + float(v[12])  # utime + stime, all threads


class LoadMeter:
    """Fraction of all CPUs used by other processes between start() and stop()."""

    def start(self):
        self.b0, self.t0 = _busy_total()
        self.s0 = _self_ticks()

    def stop(self) -> float:
        b1, t1 = _busy_total()
        s1 = _self_ticks()
        dt = t1 - self.t0
        return max(0.0, (b1 - self.b0) - (s1 - self.s0)) / dt if dt > 0 else 0.0


def others_load(seconds: float = 0.5) -> float:
    m = LoadMeter()
    m.start()
    time.sleep(seconds)
    return m.stop()


# ----------------------------------------------------------------------------- timing
CLOCK = time.perf_counter


def time_calls(fn, args_list, rounds: int) -> float:
    """Seconds per call, calling fn(*args) over every entry of args_list `rounds` times."""
    t0 = CLOCK()
    for _ in range(rounds):
        for a in args_list:
            fn(*a)
    return (CLOCK() - t0) / (rounds * len(args_list))


def x_with_sparsity(m: int, k: int, s: float, shared: bool, g: torch.Generator) -> tuple[torch.Tensor, float]:
    """x [m, k] and a threshold with fraction s of the entries below it (per token, or one mask)."""
    x = torch.randn(m, k, generator=g)
    if shared and m > 1:  # one mask for the whole batch: |x| < 0.5 at the same channels
        small = torch.rand(k, generator=g) < s
        x = torch.where(small, 0.5 * torch.rand(m, k, generator=g), 0.5 + x.abs()) * x.sign()
        return x, 0.5
    if s <= 0:
        return x, 0.0
    t = x.abs().flatten().kthvalue(max(1, round(s * x.numel()))).values.item()
    return x, math.nextafter(t, math.inf)


def bench_block(k: int, n: int, m: int, regime: str, stream_mb: float, repeats: int, shared: bool, seed: int):
    """Median seconds per call for every variant, at one shape / batch / regime."""
    g = torch.Generator().manual_seed(seed)
    copies = 1 if regime == "hot" else max(2, math.ceil(stream_mb * 1e6 / (n * k * 2)))
    base = torch.randn(n, k, generator=g) / math.sqrt(k)
    w16 = [(base + 1e-3 * i).half().contiguous() for i in range(copies)]  # [N, K]
    wt16 = [w.t().contiguous() for w in w16]  # [K, N]
    w32 = [w.float() for w in w16]
    x32 = torch.randn(m, k, generator=g)

    variants = {
        "dense": (gemv_cpu.gemv_f16, [(x32, w) for w in w16]),
        "fp32": (F.linear, [(x32, w) for w in w32]),
    }
    density = {}
    for s in SPARSITIES:
        xs, t = x_with_sparsity(m, k, s, shared, g)
        density[s] = activation_cpu.union_density(xs, t)
        variants[s] = (activation_cpu.input_sparse_matmul_cpu, [(xs, w, t) for w in wt16])
        # correctness spot check on the first copy
        ref = activation_cpu.input_sparse_matmul_cpu_ref(xs, wt16[0], t)
        got = activation_cpu.input_sparse_matmul_cpu(xs, wt16[0], t)
        rel = ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert rel < 1e-5, f"input_sparse_matmul_cpu wrong at {k}x{n} s={s}: rel err {rel}"

    # warm-up, then ~20 ms per measurement; interleaved repeats, median
    rounds = {}
    with torch.inference_mode():
        for name, (fn, al) in variants.items():
            time_calls(fn, al, 1)
            t = time_calls(fn, al, 1)
            rounds[name] = max(1, round(0.02 / (t * len(al))))
        times = {name: [] for name in variants}
        for _ in range(repeats):
            for name, (fn, al) in variants.items():
                times[name].append(time_calls(fn, al, rounds[name]))
    del w16, wt16, w32
    return copies, {name: statistics.median(v) for name, v in times.items()}, density


def crossover(density: dict, times: dict, dense_t: float) -> float | None:
    """Union density where the sparse kernel's time reaches the dense time (linear interpolation
    between measured points); None if it is faster everywhere measured."""
    pts = sorted((density[s], times[s]) for s in SPARSITIES)
    # last crossing from faster to slower, scanning up in density
    for (d0, t0), (d1, t1) in zip(reversed(pts[:-1]), reversed(pts[1:])):
        if t1 >= dense_t > t0 and d1 > d0:
            return d0 + (dense_t - t0) * (d1 - d0) / (t1 - t0)
    if pts[0][1] >= dense_t:
        return pts[0][0]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4], help="batch sizes (rows of x)")
    ap.add_argument("--regimes", nargs="+", default=["hot", "stream"], choices=["hot", "stream"])
    ap.add_argument("--mask", nargs="+", default=["independent", "shared"], choices=["independent", "shared"],
                    help="for M > 1: independent random masks per token, or one mask shared by the batch")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--stream-mb", type=float, default=400.0, help="stream regime: copies exceed this (fp16 MB)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-load", type=float, default=0.10, help="re-run a block if others used more CPU than this")
    ap.add_argument("--retries", type=int, default=4)
    ap.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES (default all)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: CPU time of this thread (only with --threads 1, where torch runs the kernels "
                         "inline); not stretched by other processes taking the core, on a shared machine")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    a = ap.parse_args()

    global CLOCK
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "cpu":
        if torch.get_num_threads() != 1:
            sys.exit("--clock cpu needs --threads 1")
        CLOCK = time.thread_time
    for mod, what in ((gemv_cpu, "gemv_f16"), (activation_cpu, "input_sparse_matmul")):
        if not mod.warm_up():
            sys.exit(f"{what} extension unavailable: {mod._state['error']}")
    isa = activation_cpu.ISA_NAMES[activation_cpu.best_isa()]
    dev = f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"device: {dev}\nkernel path: {isa}\nothers' CPU load now: {others_load():.0%}", flush=True)

    shapes = [SHAPES[i] for i in a.shapes] if a.shapes else SHAPES
    sp_hdr = " | ".join(f"{round(s * 100)}%" for s in SPARSITIES)
    lines, loads, cross = [], [], []
    seed = 0
    for regime in a.regimes:
        for m in a.m:
            for mask in (a.mask if m > 1 else ["independent"]):
                title = f"{regime}, M = {m}" + (f", {mask} masks" if m > 1 else "")
                hdr = (f"| wt K x N | layer | dense fp16 µs | F.linear fp32 µs | {sp_hdr} "
                       f"| union density at 50% | crossover density | others' load |")
                sep = "|" + "---|" * (hdr.count("|") - 1)
                print(f"\n{title}\n{hdr}\n{sep}", flush=True)
                lines += [f"### {title}", "", hdr, sep]
                for k, n, what in shapes:
                    seed += 1
                    for attempt in range(a.retries + 1):
                        meter = LoadMeter()
                        meter.start()
                        copies, t, dens = bench_block(k, n, m, regime, a.stream_mb, a.repeats, mask == "shared", seed)
                        load = meter.stop()
                        if load <= a.max_load or attempt == a.retries or a.clock == "cpu":
                            break
                        print(f"  ({k}x{n}: others used {load:.0%} of the CPUs, retrying)", flush=True)
                        time.sleep(20)
                    loads.append(load)
                    dense = t["dense"]
                    ups = " | ".join(f"{dense / t[s]:.2f}x" for s in SPARSITIES)
                    c = crossover(dens, t, dense)
                    cross.append((regime, m, mask, k, n, c))
                    cs = "> 1.00 (never slower)" if c is None else f"{c:.2f}"
                    row = (f"| {k} x {n} | {what} ({copies} cop{'y' if copies == 1 else 'ies'}) | {dense * 1e6:.1f} | "
                           f"{t['fp32'] * 1e6:.1f} | {ups} | {dens[0.5]:.2f} | {cs} | {load:.0%} |")
                    print(row, flush=True)
                    lines.append(row)
                    if k == 576 and n == 576 and regime == "stream":
                        det = ", ".join(f"{round(s * 100)}%: {t[s] * 1e6:.1f}" for s in SPARSITIES)
                        print(f"  sparse µs: {det}", flush=True)
                lines.append("")

    if a.out:
        cmd = "python3 benchmarks/cpu_activation_gemv.py " + " ".join(sys.argv[1:])
        body = [
            "# CPU input-sparse GEMV (activation sparsity): rarefy kernel vs dense",
            "",
            f"Date: {DATE}  ",
            f"Device: {dev}  ",
            f"Kernel path: `{isa}` (rarefy/kernels/activation_cpu)  ",
            f"Command: `{cmd}`  ",
            f"Clock: {'CPU time of the calling thread (time.thread_time)' if a.clock == 'cpu' else 'wall (perf_counter)'}  ",
            f"Others' CPU load during the blocks: median {statistics.median(loads):.0%}, max {max(loads):.0%}",
            "",
            *lines,
        ]
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write("\n".join(body).rstrip() + "\n")
        print(f"\nwrote {a.out}")
    return cross


if __name__ == "__main__":
    main()
