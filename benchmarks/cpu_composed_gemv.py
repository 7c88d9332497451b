"""CPU benchmark of low-bit weights composed with sparsity (issue 7, "Composition").

--part sparse-int8 (batch 1, the Llama-3-8B and the embedded model's projection shapes):
    sparse + int8 (``Int8TiledBitmap``, C++ ``bitmap_matmul_int8``) at 50% / 75% sparsity
    against the sparse bitmap alone with fp16 / bf16 values (``bitmap_matmul``), dense int8
    alone (``int8_gemv_cpu``, per channel), rarefy's dense fp16-weight GEMV (``gemv_f16``, the
    default CPU path) and torch dense ``F.linear`` in fp32 and bf16.
--part ternary-act (batch 1, same shapes): the input-sparse ternary GEMV
    (``ternary_sparse_cpu``, transposed 2-bit layout) at 0 / 25 / 40 / 50% inactive inputs (and 75 / 90%
    to locate the crossover)
    against the dense-input ternary kernel (``ternary_gemv_cpu``, layout v1) and torch fp32.
--part gpu (CUDA; the Triton kernels, batch 1 and --batches, Llama-3-8B shapes, bf16
    activations): triton_bitmap_int8 at 50/75% and the sparse bf16 bitmap (triton_bitmap) against
    cuBLAS bf16 (F.linear) and rarefy's dense bf16 GEMV; the input-sparse ternary Triton kernel
    at 0/25/40/50% against the dense-input ternary Triton kernel (lowbit_gemv). Each variant
    sweeps a few launch configs (--sweep) and reports the best and the default; times are
    triton.testing.do_bench medians over rotating weight copies (> 2x L2).
--part quality: WikiText-2 perplexity of the embedded model pruned 50% (Wanda, SparseGPT),
    alone and with int8 values (sparse + int8, run through the kernel), and dense / dense int8.

Every timed variant rotates over its own weight copies (more than --min-mb MB in all), so each
call streams its weights from memory as in decode. Median over --repeats of ~20 ms samples,
variants interleaved. The script waits (polling every 30 s, up to --max-wait s) for the
1-minute load average to drop below --max-load and prints the load before and after.

    python3 benchmarks/cpu_composed_gemv.py --part sparse-int8 --threads 2
    python3 benchmarks/cpu_composed_gemv.py --part ternary-act --threads 2
    python3 benchmarks/cpu_composed_gemv.py --part quality --chunks 8
    python3 benchmarks/cpu_composed_gemv.py --part gpu --sweep --out docs/results/lowbit-composition.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.bench.cpu_timing import bench_rotating  # noqa: E402
from rarefy.bench.machine import cpu_name  # noqa: E402

LLAMA3_8B = [(4096, 4096, "8B q/o_proj"), (1024, 4096, "8B k/v_proj"), (14336, 4096, "8B gate/up_proj"),
             (4096, 14336, "8B down_proj")]
EMBEDDED = [(576, 576, "135M q/o_proj"), (192, 576, "135M k/v_proj"), (1536, 576, "135M gate/up_proj"),
            (576, 1536, "135M down_proj")]
TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext-2",
                    "valid.txt")


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_load: float, max_wait: float) -> float:
    t0 = time.time()
    while load1() >= max_load and time.time() - t0 < max_wait:
        print(f"  load {load1():.2f} >= {max_load}: waiting", flush=True)
        time.sleep(30)
    return load1()


def _copies(nbytes: int, min_mb: float) -> int:
    return max(2, math.ceil(min_mb * 1e6 / max(1, nbytes)))


def _rot(make, nbytes: int, min_mb: float) -> list:
    return [make() for _ in range(_copies(nbytes, min_mb))]


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _pruned(n: int, k: int, sparsity: float, g) -> torch.Tensor:
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    if sparsity > 0:
        w[torch.rand(n, k, generator=g) < sparsity] = 0
    return w


def sparse_int8_variants(n: int, k: int, min_mb: float, seed: int) -> dict:
    """name -> (fn(x, w), x, [weight copies], bytes per call)."""
    from rarefy.formats.sparse_weight import Int8TiledBitmap, TiledBitmap
    from rarefy.kernels import gemv_cpu, lowbit_cpu, sparse_cpu
    from rarefy.kernels.sparse_cpu import bitmap_args
    from rarefy.lowbit.int8 import quantize_int8

    g = torch.Generator().manual_seed(seed)
    x32 = torch.randn(1, k, generator=g)
    dense = _pruned(n, k, 0.0, g)
    v = {}
    v["torch fp32"] = (lambda x, w: F.linear(x, w), x32, _rot(dense.clone, 4 * n * k, min_mb), 4 * n * k)
    v["torch bf16"] = (lambda x, w: F.linear(x, w), x32.bfloat16(),
                       _rot(lambda: dense.bfloat16(), 2 * n * k, min_mb), 2 * n * k)
    v["fp16w dense (gemv_f16)"] = (lambda x, w: gemv_cpu.gemv_f16(x, w), x32,
                                   _rot(lambda: dense.half(), 2 * n * k, min_mb), 2 * n * k)
    iw = quantize_int8(dense)
    v["int8 dense (int8_gemv_cpu)"] = (lambda x, w: lowbit_cpu.int8_gemv_cpu(x, w[0], w[1]), x32,
                                       _rot(lambda: (iw.qweight.clone(), iw.scale.clone()), n * k + 4 * n, min_mb),
                                       n * k + 4 * n)
    for sp in (0.5, 0.75):
        w = _pruned(n, k, sp, g)
        for dt, label in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            tb = TiledBitmap.from_dense(w.to(dt))
            bm, vals, rs, kk = bitmap_args(tb)
            nb = _nbytes((bm, vals, rs))
            v[f"bitmap {label} {sp:.0%}"] = (
                lambda x, a, kk=kk: sparse_cpu.bitmap_matmul(x, a[0], a[1], a[2], kk), x32,
                _rot(lambda bm=bm, vals=vals, rs=rs: (bm.clone(), vals.clone(), rs.clone()), nb, min_mb), nb)
        q8 = Int8TiledBitmap.from_dense(w)
        rs = q8.tile_offsets[:, 0].contiguous()
        nb = _nbytes((q8.bitmask, q8.values, rs, q8.scale))
        v[f"bitmap+int8 {sp:.0%}"] = (
            lambda x, a: sparse_cpu.bitmap_matmul_int8(x, a[0], a[1], a[2], a[3], k), x32,
            _rot(lambda q8=q8, rs=rs: (q8.bitmask.clone(), q8.values.clone(), rs.clone(), q8.scale.clone()),
                 nb, min_mb), nb)
        # spot check against the float64 reference (the tests do the thorough job)
        y = v[f"bitmap+int8 {sp:.0%}"][0](x32, v[f"bitmap+int8 {sp:.0%}"][2][0])
        ref = x32.double() @ q8.to_dense().double().t()
        assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4)
    return v


def ternary_act_variants(n: int, k: int, min_mb: float, seed: int) -> dict:
    from rarefy.kernels import lowbit_cpu
    from rarefy.kernels.ternary_sparse_cpu import ternary_input_sparse_gemv, ternary_input_sparse_ref
    from rarefy.lowbit.composed import pack_ternary_t
    from rarefy.lowbit.ternary import pack_ternary

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    scale = torch.tensor([[0.02]])
    packed = pack_ternary(codes)
    packed_t = pack_ternary_t(codes)
    v = {}
    dense = codes.float() * 0.02
    v["torch fp32"] = (lambda x, w: F.linear(x, w), torch.randn(1, k, generator=g),
                       _rot(dense.clone, 4 * n * k, min_mb), 4 * n * k)
    xr = torch.randn(1, k, generator=g)
    v["ternary dense input (ternary_gemv_cpu)"] = (lambda x, w: lowbit_cpu.ternary_gemv_cpu(x, w, scale), xr,
                                                   _rot(packed.clone, packed.numel(), min_mb), packed.numel())
    # |x| ranks decide which inputs are inactive: threshold at the wanted quantile
    for frac in (0.0, 0.25, 0.40, 0.50, 0.75, 0.90):
        thr = float(torch.quantile(xr.abs(), frac)) if frac > 0 else 0.0
        active = int((xr.abs() >= thr).sum())
        nb = math.ceil(active / k * packed_t.numel())
        v[f"input-sparse ternary {frac:.0%}"] = (
            lambda x, w, thr=thr: ternary_input_sparse_gemv(x, w, scale, n, thr), xr,
            _rot(packed_t.clone, packed_t.numel(), min_mb), nb)
        y = v[f"input-sparse ternary {frac:.0%}"][0](xr, packed_t)
        ref = ternary_input_sparse_ref(xr, codes, scale, thr)
        fixed16 = 0.02 * k * float(xr.abs().max()) / 65534  # the 16-bit activations' error bound
        assert torch.allclose(y.double(), ref, rtol=1e-5, atol=fixed16)
    return v


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process)


def bench(variants: dict, repeats: int) -> dict:
    """name -> (median seconds per call, bytes of weights per call)."""
    med = bench_rotating(variants, repeats, clock=CLOCK)
    return {name: (med[name], variants[name][3]) for name in variants}


def run_timing(a, make, base: str) -> list[str]:
    lines = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        before = wait_quiet(a.max_load, a.max_wait)
        rows, names = [], None
        t0 = time.time()
        for n, k, what in (LLAMA3_8B if not a.small_only else []) + EMBEDDED:
            v = make(n, k, a.min_mb, a.seed)
            r = bench(v, a.repeats)
            del v
            names = list(r)
            rows.append((what, n, k, r))
            print(f"{what} {n}x{k} t={threads}: " + ", ".join(f"{nm} {t * 1e6:.1f}" for nm, (t, _) in r.items()),
                  flush=True)
        after = load1()
        lines.append(f"### {threads} thread{'s' if threads > 1 else ''}, batch 1 "
                     f"(1-minute load {before:.2f} before, {after:.2f} after; {time.time() - t0:.0f} s)\n")
        lines.append(("µs of CPU time" if CLOCK is time.process_time else "µs") + " per call (median); in brackets: "
                     "speed-up over " + base + "; GB/s of weight bytes streamed.\n")
        lines.append("| shape | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for what, n, k, r in rows:
            tb = r[base][0]
            cells = [f"{t * 1e6:.1f} ({tb / t:.2f}x, {nb / t / 1e9:.1f})" for t, nb in r.values()]
            lines.append(f"| {what} {n}x{k} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def run_gpu(a) -> list[str]:
    import triton

    from rarefy.bench.gpu_timing import graph_time_us
    from rarefy.formats.sparse_weight import Int8TiledBitmap, TiledBitmap
    from rarefy.kernels.sparse_matmul.triton_bitmap import BitmapConfig, bitmap_matmul_triton
    from rarefy.kernels.sparse_matmul.triton_bitmap_int8 import bitmap_int8_matmul_triton
    from rarefy.kernels.ternary_sparse.triton import TernarySparseConfig, ternary_input_sparse_triton
    from rarefy.lowbit.composed import pack_ternary_t
    from rarefy.lowbit.ternary import pack_ternary

    dev = torch.device(a.gpu_device)
    l2 = 50e6 * 2 if dev.type == "cuda" else 1e5  # rotate over > 2x an H100's / H200's L2
    shapes = LLAMA3_8B if not a.gpu_dry_run else [(40, 96, "dry-run")]

    def timed(fn, ws):
        i = [0]

        def call():
            fn(ws[i[0] % len(ws)])
            i[0] += 1
        if dev.type != "cuda":  # --gpu-dry-run under TRITON_INTERPRET=1: checks the code path only
            t0 = time.perf_counter()
            call()
            return (time.perf_counter() - t0) * 1e6
        # replayed from a CUDA graph, as decode runs: a few-µs kernel behind a Python custom op
        # would otherwise time the host's launch overhead (do_bench only where capture fails)
        try:
            return graph_time_us(lambda j: fn(ws[j]), len(ws), dev)
        except Exception:  # noqa: BLE001
            torch.cuda.synchronize(dev)
            return triton.testing.do_bench(call, warmup=50, rep=200, return_mode="median") * 1e3  # µs

    def copies(nbytes):
        return max(2, math.ceil(l2 / max(1, nbytes)))

    def checked(fn, ws, ref, what):
        """fn(ws[0]) against the float32 reference first (NaN fails); timed only if it passes."""
        y = fn(ws[0]).float().reshape(-1)
        err = float((y - ref).norm() / ref.norm().clamp_min(1e-12)) if torch.isfinite(y).all() else float("nan")
        if not err < 2e-2:  # bf16 output of a bf16-input product
            raise RuntimeError(f"{what}: output differs from the reference (rel. error {err:.2e})")
        return timed(fn, ws)

    bitmap_cfgs = [None] + ([BitmapConfig(block_n=bn, block_k=bk, num_warps=w, flat=fl)
                             for bn in (2, 4, 8) for bk in (256, 512) for w in (2, 4) for fl in (False, True)]
                            if a.sweep else [])
    tern_cfgs = [None] + ([TernarySparseConfig(block_n=bn, block_k=bk, split_k=sk, num_warps=w)
                           for bn in (128, 256, 512) for bk in (16, 32, 64) for sk in (1, 4, 8, 16) for w in (4, 8)]
                          if a.sweep else [])
    if a.gpu_dry_run:
        bitmap_cfgs = bitmap_cfgs[:2] + [BitmapConfig(block_n=2, block_k=32, flat=True)]
        tern_cfgs = tern_cfgs[:2] + [TernarySparseConfig(block_n=16, block_k=16, split_k=3)]
    lines = ["| shape | variant | density | µs (default) | µs (best) | best config | speed-up vs cuBLAS bf16 |",
             "|---|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(a.seed)
    for n, k, what in shapes:
        x = torch.randn(1, k, generator=g).to(dev, torch.bfloat16)
        w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dev, torch.bfloat16)
        ws = [w.clone() for _ in range(copies(w.numel() * 2))]
        t_cublas = timed(lambda wi: torch.nn.functional.linear(x, wi), ws)
        rows = [("cuBLAS bf16 (F.linear)", "1.00", t_cublas, t_cublas, "-")]
        del ws
        for sp in (0.5, 0.75):
            wp = w.float().cpu()
            wp[torch.rand(n, k, generator=g) < sp] = 0
            tb = TiledBitmap.from_dense(wp.bfloat16()).to(dev)
            q8 = Int8TiledBitmap.from_dense(wp).to(dev)
            for label, obj, call in (
                    ("bitmap bf16 (triton_bitmap)", tb,
                     lambda o, c: bitmap_matmul_triton(x, o.bitmask, o.values, n, tile_offsets=o.tile_offsets,
                                                       config=c)),
                    ("bitmap + int8 (triton_bitmap_int8)", q8,
                     lambda o, c: bitmap_int8_matmul_triton(x, o.bitmask, o.values, o.tile_offsets, o.scale, n,
                                                            config=c))):
                objs = [obj.clone() for _ in range(copies(obj.nbytes))]
                res = []
                ref = (x.float() @ obj.to_dense().to(dev).float().T).reshape(-1)
                for c in bitmap_cfgs:
                    try:
                        res.append((checked(lambda o, c=c: call(o, c), objs, ref, f"{label} {c}"), c))
                    except Exception as e:  # a config the compiler refuses, or a wrong result: skip it
                        print(f"  {label} {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                if not res:
                    print(f"  {label}: no config ran and passed its check; row left out", flush=True)
                    continue
                best = min(res, key=lambda r: r[0])
                rows.append((label, f"{1 - sp:.2f}", res[0][0], best[0], str(best[1])))
                del objs
        codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        s = torch.tensor([[0.02]], device=dev)
        packed = pack_ternary(codes).to(dev)
        try:
            from rarefy.kernels.lowbit_gemv import ternary_matmul
            ps = [packed.clone() for _ in range(copies(packed.numel()))]
            t = checked(lambda p: ternary_matmul(x, p, s), ps,
                        (x.float() @ (codes.float().to(dev) * s).T).reshape(-1), "dense ternary")
            rows.append(("ternary dense input (lowbit_gemv.ternary_matmul)", "1.00", t, t, "-"))
            del ps
        except Exception as e:
            print(f"  dense ternary kernel not timed: {type(e).__name__}: {e}", flush=True)
        wt = pack_ternary_t(codes).to(dev)
        wts = [wt.clone() for _ in range(copies(wt.numel()))]
        xf = x.float().cpu()
        for frac in (0.0, 0.25, 0.40, 0.50):
            thr = float(torch.quantile(xf.abs(), frac)) if frac > 0 else 0.0
            res = []
            xm = torch.where(x.float().abs() >= thr, x.float(), torch.zeros_like(x.float()))
            ref = (xm @ (codes.float().to(dev) * s).T).reshape(-1)
            for c in tern_cfgs:
                try:
                    res.append((checked(lambda o, c=c: ternary_input_sparse_triton(x, o, s, n, thr, config=c), wts,
                                        ref, f"ternary sparse {c}"), c))
                except Exception as e:
                    print(f"  ternary sparse {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            if not res:
                print(f"  input-sparse ternary {frac:.0%}: no config ran and passed its check; row left out", flush=True)
                continue
            best = min(res, key=lambda r: r[0])
            rows.append((f"input-sparse ternary, {frac:.0%} inactive", f"{1 - frac:.2f}", res[0][0], best[0],
                         str(best[1])))
        del wts
        for label, dens, t0, tb, cfg in rows:
            lines.append(f"| {what} {n}x{k} | {label} | {dens} | {t0:.1f} | {tb:.1f} | {cfg} | {t_cublas / tb:.2f}x |")
        print("\n".join(lines[-len(rows):]), flush=True)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "dry run (no GPU)"
    return [f"GPU: {name}, batch 1, bf16 activations.\n"] + lines + [""]


def run_quality(a) -> list[str]:
    from rarefy.eval.perplexity import perplexity
    from rarefy.layers.sparse_linear import SparseLinear
    from rarefy.lowbit.composed import quantize_sparse_int8
    from rarefy.lowbit.quantize import quantize_model
    from rarefy.models.loader import load_model
    from rarefy.sparsity.prune import prune_model

    torch.set_num_threads(a.threads[0])
    base = load_model(None, dtype="fp32")
    with open(TEXT, encoding="utf-8") as f:
        ids = base.tokenizer.encode(f.read(), add_special_tokens=False)
    rows = []

    def record(name, model, note=""):
        t0 = time.time()
        r = perplexity(model, ids, ctx=512, max_chunks=a.chunks)
        rows.append((name, r.ppl, r.stderr, note))
        print(f"{name}: ppl {r.ppl:.3f} ± {r.stderr:.3f} ({time.time() - t0:.0f} s) {note}", flush=True)
        return r.ppl

    dense = record("dense fp32", base.model)
    m = copy.deepcopy(base.model)
    quantize_model(m, "int8", None, ("lm_head",), "fp32", progress=False)
    record("dense int8 (per channel)", m)
    del m
    for method in ("wanda", "sparsegpt"):
        m = copy.deepcopy(base.model)
        t0 = time.time()
        prune_model(m, base.tokenizer, method, sparsity=0.5, calib=TEXT, calib_samples=a.calib_samples,
                    calib_len=512, progress=False)
        pr = record(f"{method} 50%", m, f"pruned in {time.time() - t0:.0f} s")
        rep = quantize_sparse_int8(m, ("lm_head",))
        n_sparse = sum(isinstance(x, SparseLinear) for x in m.modules())
        q = record(f"{method} 50% + int8 values (sparse + int8 kernel)", m,
                   f"{n_sparse} SparseLinear; mean density {sum(rep.density.values()) / len(rep.density):.3f}")
        rows[-1] = rows[-1][:3] + (rows[-1][3] + f"; {100 * (q / pr - 1):+.2f}% vs pruned alone",)
        del m
    lines = [f"WikiText-2 validation, ctx 512, first {a.chunks} chunks, all tokens after each chunk's first; "
             f"calibration {a.calib_samples} x 512 tokens of the same file (seed 0). Dense fp32 = {dense:.3f}.\n",
             "| model | perplexity | ± stderr | note |", "|---|---|---|---|"]
    lines += [f"| {n} | {p:.3f} | {s:.3f} | {note} |" for n, p, s, note in rows]
    return lines + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["sparse-int8", "ternary-act", "quality", "gpu"], required=True)
    ap.add_argument("--sweep", action="store_true", help="gpu: sweep launch configs (default: defaults only)")
    ap.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--gpu-dry-run", action="store_true", help=argparse.SUPPRESS)  # tiny shape, any device
    ap.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[2])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--min-mb", type=float, default=300.0, help="weight copies per variant exceed this (MB)")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small-only", action="store_true", help="only the embedded model's shapes")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--out", default=None, help="append the markdown section to this file")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: CPU time of the process (time.process_time), less sensitive to other load; "
                         "meaningful with --threads 1 only")
    a = ap.parse_args()
    if a.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
        if a.threads != [1]:
            ap.error("--clock cpu needs --threads 1 (CPU time of several threads includes their waiting)")
    head = [f"## {a.part} — {datetime.date.today().isoformat()}, {cpu_name()}, torch {torch.__version__}\n",
            f"`python3 benchmarks/cpu_composed_gemv.py {' '.join(sys.argv[1:])}`\n"]
    if a.part == "sparse-int8":
        body = run_timing(a, sparse_int8_variants, "torch fp32")
    elif a.part == "ternary-act":
        body = run_timing(a, ternary_act_variants, "ternary dense input (ternary_gemv_cpu)")
    elif a.part == "gpu":
        body = run_gpu(a)
    else:
        body = run_quality(a)
    text = "\n".join(head + body) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
