"""CPU sparse GEMV benchmark: bitmap_matmul (fp16 values) against dense F.linear fp32 and gemv_f16.

Shapes: SmolLM2-135M's linear layers (hidden 576, MLP 1536, 9 heads / 3 KV heads of 64) and one
4096 x 4096 matrix. Weights are pruned per row by magnitude (random Gaussian weights, so the
kept positions are random) to 50% and 70%. Batch (rows of x) 1 and 4.

Two cache regimes, both reported:
  hot     one copy of each weight, called over and over: it sits in L2/L3 (this CPU's L3 is
          large), so the numbers measure compute and call overhead.
  stream  calls rotate over distinct copies totalling more than --min-mb MB per variant (more
          than the L3), so every call reads its weights from DRAM, as decode of a model that
          does not fit in cache does.
Variants run interleaved, repeat after repeat, so drift in machine load hits all of them; the
median per-call time is reported. GB/s = bytes of weight (+ metadata) read per call / time.

    python3 benchmarks/cpu_sparse_gemv.py --out docs/results/sparse-cpu-gemv.md
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
from rarefy.formats.sparse_weight import TiledBitmap  # noqa: E402
from rarefy.kernels import gemv_cpu, sparse_cpu  # noqa: E402

SHAPES = [  # (N, K, what)
    (576, 576, "q_proj / o_proj"),
    (192, 576, "k_proj / v_proj"),
    (1536, 576, "gate_proj / up_proj"),
    (576, 1536, "down_proj"),
    (4096, 4096, "4096 x 4096 (7B-class)"),
]


def prune_rows(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the smallest-|w| fraction `sparsity` of each row (unstructured magnitude pruning)."""
    drop = int(round(sparsity * w.shape[1]))
    if drop == 0:
        return w.clone()
    idx = w.abs().argsort(dim=1)[:, :drop]
    return w.clone().scatter_(1, idx, 0.0)


def time_calls(fn, args_list, rounds: int) -> float:
    """Seconds per call, calling fn(*args) for every entry of args_list `rounds` times."""
    t0 = time.perf_counter()
    for _ in range(rounds):
        for a in args_list:
            fn(*a)
    return (time.perf_counter() - t0) / (rounds * len(args_list))


def bench(n, k, m, sparsities, mode, min_mb, repeats):
    """{variant: (seconds per call, bytes per call)} for one shape, batch and cache mode."""
    g = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    x = torch.randn(m, k, generator=g)

    def copies(nbytes):
        return 1 if mode == "hot" else max(2, math.ceil(min_mb * 1e6 / nbytes))

    w32 = w.contiguous()
    w16 = w.half()
    variants = {
        "fp32": (F.linear, [(x, w32.clone()) for _ in range(copies(w32.nbytes))], w32.nbytes),
        "f16": (gemv_cpu.gemv_f16, [(x, w16.clone()) for _ in range(copies(w16.nbytes))], w16.nbytes),
    }
    for s in sparsities:
        ws = prune_rows(w, s).half()
        bm, vals, rs, _ = sparse_cpu.bitmap_args(TiledBitmap.from_dense(ws))
        nbytes = bm.nbytes + vals.nbytes + rs.nbytes
        # Correctness spot check against the dense fp16 weight it encodes.
        ref = x.double() @ ws.double().t()
        got = sparse_cpu.bitmap_matmul(x, bm, vals, rs, k).double()
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5, f"bitmap_matmul wrong at {n}x{k}"
        args = [(x, bm.clone(), vals.clone(), rs.clone(), k) for _ in range(copies(nbytes))]
        variants[f"sp{s}"] = (sparse_cpu.bitmap_matmul, args, nbytes)

    # ~20 ms per measurement: short bursts of load from other processes spoil a few samples,
    # which the median drops. Hot mode reuses one copy many times per round.
    rounds = {}
    for name, (fn, L, _) in variants.items():
        fn(*L[0])
        t = time_calls(fn, L, 1)
        rounds[name] = max(1, round(0.02 / (t * len(L))))
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, (fn, L, _) in variants.items():
                times[name].append(time_calls(fn, L, rounds[name]))
    return {name: (statistics.median(times[name]), nb) for name, (_, _, nb) in variants.items()}


def wait_for_low_load(max_load: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until the 1-minute load average is below max_load; returns it."""
    t0 = time.time()
    while os.getloadavg()[0] >= max_load and time.time() - t0 < max_wait:
        time.sleep(10)
    return os.getloadavg()[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4], help="rows of x (batch)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--modes", nargs="+", default=["stream", "hot"], choices=["stream", "hot"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-mb", type=float, default=512.0, help="stream mode: copies per variant exceed this")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-load", type=float, default=1.5, help="wait for the 1-min load average to drop below")
    ap.add_argument("--max-wait", type=float, default=600.0)
    ap.add_argument("--out", default=None, help="write a markdown report here")
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    for mod, name in [(gemv_cpu, "gemv_f16"), (sparse_cpu, "bitmap_matmul")]:
        if not mod.warm_up():
            sys.exit(f"{name} extension unavailable: {mod._state['error']}")
    isa = sparse_cpu.ISA_NAMES[sparse_cpu.best_isa()]
    dev = f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    load0 = wait_for_low_load(a.max_load, a.max_wait)
    print(f"device: {dev}\nbitmap_matmul path: {isa}; load average at start {load0:.2f}")

    hdr = ("| shape N x K | layer | sparsity | F.linear fp32 µs | gemv_f16 µs | sparse µs | sparse KB |"
           " sparse GB/s | gemv_f16 GB/s | vs fp32 | vs gemv_f16 |")
    sep = "|" + "---|" * (hdr.count("|") - 1)
    lines = []
    for mode in a.modes:
        for m in a.m:
            title = f"### {mode}, M = {m}"
            print(f"\n{title}\n{hdr}\n{sep}")
            lines += [title, "", hdr, sep]
            for n, k, what in SHAPES:
                r = bench(n, k, m, a.sparsity, mode, a.min_mb, a.repeats)
                t32, t16 = r["fp32"][0], r["f16"][0]
                for s in a.sparsity:
                    ts, nb = r[f"sp{s}"]
                    row = (f"| {n} x {k} | {what} | {s:.0%} | {t32 * 1e6:.1f} | {t16 * 1e6:.1f} | {ts * 1e6:.1f} |"
                           f" {nb / 1024:.0f} | {nb / ts / 1e9:.1f} | {r['f16'][1] / t16 / 1e9:.1f} |"
                           f" {t32 / ts:.2f}x | {t16 / ts:.2f}x |")
                    print(row, flush=True)
                    lines.append(row)
            lines.append("")
    load1 = os.getloadavg()[0]
    print(f"\nload average at end {load1:.2f}")

    if a.out:
        cmd = "python3 benchmarks/cpu_sparse_gemv.py " + " ".join(sys.argv[1:])
        body = [
            "# CPU sparse GEMV: bitmap_matmul (fp16 values) vs dense F.linear fp32 and gemv_f16",
            "",
            f"Date: {time.strftime('%Y-%m-%d')}  ",
            f"Device: {dev}  ",
            f"Kernel path: `{isa}` (rarefy/kernels/sparse_cpu)  ",
            f"Load average (1 min): {load0:.2f} at start, {load1:.2f} at end (2-core machine shared with"
            " other jobs: compare ratios, not absolute times)  ",
            f"Command: `{cmd}`",
            "",
            "Weights: Gaussian, pruned per row by magnitude (random unstructured positions), stored as"
            " TiledBitmap with fp16 values (bitmask 1 bit/weight + fp16 per kept weight + 4 B/row)."
            " F.linear uses the dense fp32 weight (4 B/weight), gemv_f16 the dense fp16 weight"
            " (2 B/weight). `sparse KB` = bytes bitmap_matmul reads per call; GB/s = those bytes /"
            f" time. Median over {a.repeats} interleaved repeats of ~20 ms each.",
            "",
            "- **stream**: each call reads a different copy of the weights (copies per variant"
            f" > {a.min_mb:.0f} MB, above this CPU's L3), so weights come from DRAM as in decode of a"
            " model that does not fit in cache.",
            "- **hot**: one copy called repeatedly, so it sits in L2/L3: compute and call overhead.",
            "",
            *lines,
            "Notes:",
            "",
            "- Decoding costs about the same per 32-column mask word whatever the density (one"
            " vpexpandw, an extract and two vcvtph2ps: ~2.3 ns per word and core measured, mostly"
            " shuffle-port work), about twice dense fp16's widening per weight position. So the"
            " kernel wins where weights come from DRAM: hot, the SmolLM2 layers sit in L2 and it is"
            " compute bound, slower than gemv_f16 (and than F.linear on the small layers); the hot"
            " 4096 x 4096 weight (18 MB) lives in L3 and it still wins there. 70% is barely faster"
            " than 50% except where the stream is bandwidth bound.",
            "- Software prefetch (4 KiB ahead in the value stream) is what reaches DRAM bandwidth:"
            " with the hardware prefetcher alone the stream runs reached ~12 GB/s.",
            "- The small layers (192 x 576: 122 KB at 50%) pay a fixed ~3 µs per call (op dispatch,"
            " thread fork/join), as gemv_f16 and F.linear do.",
            "- M = 4 reuses each decoded word for the 4 rows of x, but it still does the same FMAs per"
            " weight position as dense fp16 (zeros included) on top of the decode, so once compute"
            " bound it cannot beat gemv_f16: the gain shrinks (stream) or turns into a loss (hot).",
            "- This VM reports a 260 MB L3. SmolLM2-135M's linear weights at 50% in this format are"
            " ~120 MB (fp32 dense: ~425 MB), so real decode of the embedded model on this machine"
            " sits between the hot and stream rows.",
        ]
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write("\n".join(body).rstrip() + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
