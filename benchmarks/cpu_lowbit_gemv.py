"""CPU low-bit GEMV benchmark: rarefy's ternary / int8 / GGUF kernels against torch's dense paths.

For each shape (a 4096 x 4096 matrix and the embedded model's decode shapes), batch (M) and
thread count, in one run and interleaved repeat after repeat:

- torch fp32 ``F.linear`` (the dequantized weights in fp32),
- torch bf16 ``F.linear`` on a cached dequantized bf16 copy ("dequantize-once-and-cache", the
  baseline issue 7 names: what ``TernaryLinear``/``Int8Linear`` do in ``cache`` mode),
- rarefy's fp16-weight GEMV (``gemv_cpu.gemv_f16``: the engine's default dense CPU path; for
  GGUF, the dequantized fp16 path),
- ``ternary_gemv_cpu`` (16-bit activations, and ``act_quant="int8"``), ``int8_gemv_cpu``
  (per channel; both activation modes), ``gguf_gemv_cpu`` on Q4_0 / Q4_1 / Q8_0 blocks.

Every variant rotates over its own weight copies (more than --min-mb MB in all), so each call
streams its weights from memory as in decode, not from L2. Median over --repeats of ~20 ms
samples. Timing means something only on a quiet machine: the script waits (polling every 30 s,
up to --max-wait s) until the 1-minute load average is below --max-load, and records the load
before and after each table.

    python3 benchmarks/cpu_lowbit_gemv.py --out docs/results/lowbit-cpu-gemv.md
    python3 benchmarks/cpu_lowbit_gemv.py --probe ...    # also the kernel-design probe (g++)
    python3 benchmarks/cpu_lowbit_gemv.py --e2e --append docs/results/lowbit-cpu-gemv.md

``--e2e`` instead measures decode of the embedded Q4_1 GGUF end to end: rarefy with every
projection and lm_head kept as GGUF blocks (``lowbit_cpu.gguf_linear.use_gguf_blocks``),
rarefy's default fp16w and fp32 (dequantized) engines, and llama.cpp through
llama-cpp-python (a benchmark peer, never a dependency of rarefy; llama_cpp_peer.py installs it
when missing, ``--no-install-peer`` skips that), on the same file and thread count, batch 1, 128 new tokens, greedy; plus WikiText-2 perplexity of the GGUF-kernel model
(kernel path forced for every row count) against the dequantized fp32 model.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.bench.cpu_timing import bench_rotating  # noqa: E402
from rarefy.bench.machine import cpu_name  # noqa: E402
from rarefy.formats import gguf_blocks  # noqa: E402
from rarefy.kernels import gemv_cpu, lowbit_cpu  # noqa: E402
from rarefy.lowbit.int8 import quantize_int8  # noqa: E402
from rarefy.lowbit.ternary import dequantize_ternary, pack_ternary  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_cpp_peer import PROMPT, ensure_llama_cpp, llama_cpp_rate, llama_cpp_version  # noqa: E402

SHAPES = [  # (N, K, what)
    (4096, 4096, "4096 x 4096"),
    (576, 576, "q_proj / o_proj"),
    (192, 576, "k_proj / v_proj"),
    (1536, 576, "gate_proj / up_proj"),
    (576, 1536, "down_proj"),
    (49152, 576, "lm_head"),
]
PROBE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "rarefy", "kernels", "lowbit_cpu", "probe_ternary.cpp")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    want = ["avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512vbmi",
                            "avx512_bf16", "amx_tile"]
                    return " ".join(w for w in want if w in have)
    except OSError:
        pass
    return ""


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_load: float, max_wait: float) -> tuple[float, float]:
    """Poll every 30 s until the 1-minute load is below max_load; returns (load, seconds waited)."""
    t0 = time.time()
    while load1() >= max_load and time.time() - t0 < max_wait:
        print(f"  load {load1():.2f} >= {max_load}: waiting", flush=True)
        time.sleep(30)
    return load1(), time.time() - t0


def build_variants(n: int, k: int, m: int, min_mb: float, seed: int):
    """name -> (fn(x, w), x, list of weight copies, weight bytes per call)."""
    g = torch.Generator().manual_seed(seed)

    def copies(nbytes: int) -> int:
        return max(2, math.ceil(min_mb * 1e6 / nbytes))

    def rot(t: torch.Tensor, c: int) -> list:
        return [t] + [t.clone() for _ in range(c - 1)]

    x32 = torch.randn(m, k, generator=g)
    xbf = x32.bfloat16()
    dense = torch.randn(n, k, generator=g) / math.sqrt(k)
    codes = torch.randint(-1, 2, (n, k), generator=g)
    packed = pack_ternary(codes)
    tscale = torch.tensor([[0.02]])
    tern_bf = dequantize_ternary(packed, tscale, k, None, torch.bfloat16)
    iw = quantize_int8(dense)
    v = {
        "fp32": (lambda x, w: F.linear(x, w), x32, rot(dense, copies(4 * n * k)), 4 * n * k),
        "bf16 cache": (lambda x, w: F.linear(x, w), xbf, rot(tern_bf, copies(2 * n * k)), 2 * n * k),
        "fp16w": (lambda x, w: gemv_cpu.gemv_f16(x, w), x32, rot(dense.half(), copies(2 * n * k)), 2 * n * k),
        "ternary": (lambda x, w: lowbit_cpu.ternary_gemv_cpu(x, w, tscale), x32, rot(packed, copies(packed.numel())),
                    packed.numel()),
        "ternary A8": (lambda x, w: lowbit_cpu.ternary_gemv_cpu(x, w, tscale, act_quant="int8"), x32,
                       rot(packed, copies(packed.numel())), packed.numel()),
        "int8": (lambda x, w: lowbit_cpu.int8_gemv_cpu(x, w, iw.scale), x32, rot(iw.qweight, copies(n * k)), n * k),
        "int8 A8": (lambda x, w: lowbit_cpu.int8_gemv_cpu(x, w, iw.scale, act_quant="int8"), x32,
                    rot(iw.qweight, copies(n * k)), n * k),
    }
    for qt in ("Q4_0", "Q4_1", "Q8_0"):
        b = gguf_blocks.quantize(dense, qt)
        v[qt] = (functools.partial(_gguf_call, qtype=qt, shape=(n, k)), x32, rot(b, copies(b.numel())), b.numel())
    # spot checks (the tests do the thorough job)
    ref = lowbit_cpu.ternary_gemv_ref(x32, packed, tscale)
    assert torch.allclose(v["ternary"][0](x32, packed).double(), ref, rtol=1e-4, atol=1e-3)
    b = v["Q4_1"][2][0]
    assert torch.allclose(v["Q4_1"][0](x32, b).double(), lowbit_cpu.gguf_gemv_ref(x32, b, "Q4_1", (n, k)),
                          rtol=1e-4, atol=1e-3)
    return v


def _gguf_call(x, w, qtype, shape):
    return lowbit_cpu.gguf_gemv_cpu(x, w, qtype, shape)


def bench(variants: dict, repeats: int) -> dict:
    """name -> (median seconds per call, GB/s of weights)."""
    med = bench_rotating(variants, repeats)
    return {name: (med[name], nbytes / med[name] / 1e9) for name, (_, _, _, nbytes) in variants.items()}


def run_probe() -> str:
    """Compile and run the ternary kernel-design probe; its stdout (or why it could not run)."""
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "probe")
        r = subprocess.run(["g++", "-O3", "-fopenmp", "-o", exe, PROBE], capture_output=True, text=True)
        if r.returncode:
            return f"(probe build failed: {r.stderr.strip()[:300]})"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run([exe], capture_output=True, text=True, env=env)
        return r.stdout.strip() if r.returncode == 0 else f"(probe failed: {r.stderr.strip()[:300]})"


GGUF_EAGER = "rarefy GGUF blocks (gguf_gemv_cpu)"
GGUF_A8 = "rarefy GGUF blocks, int8 activations"
GGUF_COMPILED = "rarefy GGUF blocks, torch.compile decode"
FP16W = "rarefy fp16w (the old CPU default)"
FP16W_COMPILED = "rarefy fp16w, torch.compile decode"
FP32 = "rarefy fp32 (dequantized)"
TERNARY = "rarefy ternary + Q8_0 lm_head, torch.compile decode"
TERNARY_A8 = "rarefy ternary A8 (W1.58A8) + Q8_0 lm_head, torch.compile decode"
INT8 = "rarefy int8 + Q8_0 lm_head, torch.compile decode"
LLAMA = "llama.cpp (llama-cpp-python)"


def lowbit_model(path: str, fmt: str, act_quant: str | None = None):
    """The embedded model quantized post-training to `fmt` ("ternary": BitNet b1.58 absmean per
    tensor; "int8": per output channel) from its dequantized fp32 weights, every projection a
    TernaryLinear / Int8Linear in "fused" mode (the C++ kernels on the packed weights), q/k/v and
    gate/up stacked (`fuse_lowbit`), and the tied lm_head the file's own Q8_0 blocks
    (GGUFLinear), as llama.cpp runs it."""
    from rarefy.kernels.lowbit_cpu import gguf_linear
    from rarefy.layers.lowbit_linear import is_lowbit, set_lowbit_mode
    from rarefy.lowbit.quantize import quantize_model
    from rarefy.models.loader import load_model

    lm = load_model(None, dtype="fp32")
    rep = quantize_model(lm.model, fmt)  # every projection; the tied lm_head stays dense here
    for mod in lm.model.modules():
        if is_lowbit(mod):
            mod.act_quant = act_quant
    set_lowbit_mode(lm.model, "fused")
    lm.model.fuse_projections()
    n_head = gguf_linear.use_gguf_blocks(lm.model, path, only=("lm_head",))
    assert n_head == 1, "lm_head was not replaced by the file's blocks"
    return lm, len(rep.quantized)


def run_e2e(a) -> list[str]:
    from rarefy.engine.generate import Generator
    from rarefy.eval.perplexity import perplexity
    from rarefy.kernels.lowbit_cpu import gguf_linear
    from rarefy.layers.lowbit_linear import set_lowbit_mode
    from rarefy.layers.sampler import SamplingParams
    from rarefy.models.default_model import default_model_path
    from rarefy.models.loader import load_model

    path = default_model_path()
    threads = a.threads[0]
    torch.set_num_threads(threads)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    # with another process on a core, every parallel region waits a scheduler slice: even the
    # warm-up would crawl, so wait for a quiet machine first (and again before measuring)
    wait_quiet(a.max_load, a.max_wait)
    engines = {GGUF_EAGER: load_model(None, dtype="fp32"), GGUF_A8: load_model(None, dtype="fp32"),
               FP16W: load_model(None, dtype="fp16w"), FP32: load_model(None, dtype="fp32")}
    n_swapped = gguf_linear.use_gguf_blocks(engines[GGUF_EAGER].model, path)
    gguf_linear.use_gguf_blocks(engines[GGUF_A8].model, path, act_quant="int8")
    n_fused = 0
    for k in (GGUF_EAGER, GGUF_A8):
        n_fused = gguf_linear.fuse_gguf_projections(engines[k].model)
    lowbit = {"ternary": (TERNARY, "ternary", None), "A8": (TERNARY_A8, "ternary", "int8"),
              "int8": (INT8, "int8", None)}
    lowbit = {v[0]: v[1:] for k, v in lowbit.items() if k in a.e2e_lowbit}
    n_lowbit = 0
    for k, (fmt, act) in lowbit.items():
        engines[k], n_lowbit = lowbit_model(path, fmt, act)
    tk = engines[FP32].tokenizer
    prompt = tk.encode(PROMPT)
    params = SamplingParams(max_tokens=a.new_tokens, ignore_eos=True)
    gens = {k: Generator(engines[k].model, engines[k].tokenizer) for k in (GGUF_EAGER, GGUF_A8, FP16W, FP32)}
    # decode steps through torch.compile (CPU inductor; the C++ projection ops stay opaque through
    # their fake kernels), compiled during the warm-up call below
    gens[GGUF_COMPILED] = Generator(engines[GGUF_EAGER].model, tk, cpu_compile=True)
    gens[FP16W_COMPILED] = Generator(engines[FP16W].model, tk, cpu_compile=True)
    for k in lowbit:
        gens[k] = Generator(engines[k].model, tk, cpu_compile=True)
    warm = {}
    for k, g in gens.items():
        t0 = time.perf_counter()
        g.generate([prompt], params)
        warm[k] = time.perf_counter() - t0
        print(f"warm-up {k}: {warm[k]:.0f} s", flush=True)
    before, waited = wait_quiet(a.max_load, a.max_wait)
    rates = {k: [] for k in [*gens, LLAMA]}
    loads = []
    tokens = {}
    for i in range(a.e2e_repeats):  # alternate engines so load drift hits all of them
        loads.append(load1())
        for k, g in gens.items():
            (c,), st = g.generate([prompt], params)
            rates[k].append(st.decode_tok_s)
            tokens[k] = c.token_ids
        r = llama_cpp_rate(path, threads, PROMPT, a.new_tokens) if getattr(a, "peer_ok", True) else None
        if r is not None:
            rates[LLAMA].append(r[0])
            tokens[LLAMA] = r[1]
        print(f"run {i} (load {loads[-1]:.2f}): " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items() if v),
              flush=True)
    after = load1()

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt"),
              encoding="utf-8") as f:
        ids = tk.encode(f.read(), add_special_tokens=False)
    gguf_linear.MAX_KERNEL_ROWS = 1 << 30  # perplexity through the kernel, not the dense fallback
    ppl = {k: perplexity(engines[k].model, ids, ctx=512, max_chunks=a.ppl_chunks).ppl
           for k in (GGUF_EAGER, GGUF_A8, FP32)}
    for k in lowbit:  # the low-bit layers' "cache" mode: the same weights, exact fp32 products
        set_lowbit_mode(engines[k].model, "cache")
        ppl[k] = perplexity(engines[k].model, ids, ctx=512, max_chunks=a.ppl_chunks).ppl
        set_lowbit_mode(engines[k].model, "fused")
    ref = tokens[FP32]
    peer = statistics.median(rates[LLAMA]) if rates[LLAMA] else None
    L = ["## End to end: decode of the embedded Q4_1 GGUF", "",
         f"Command: `python3 benchmarks/cpu_lowbit_gemv.py {' '.join(sys.argv[1:])}`  ",
         f"Date: {datetime.date.today().isoformat()}; {cpu_name()}, {os.cpu_count()} logical CPUs;"
         f" {threads} threads; batch 1, {len(prompt)}-token prompt,"
         f" {a.new_tokens} new tokens, greedy, EOS ignored; median of {a.e2e_repeats} alternating runs."
         f" 1-minute load: {before:.2f} before (waited {waited:.0f} s), at each run's start "
         + ", ".join(f"{x:.2f}" for x in loads) + f", {after:.2f} after.  ",
         f"rarefy GGUF blocks: {n_swapped} layers (every projection and the tied lm_head) run"
         " `gguf_gemv_cpu` on the file's Q4_1 / Q8_0 bytes, q/k/v and gate/up stacked"
         f" (`fuse_gguf_projections`, {n_fused} fused layers: 4 calls per decoder layer); embeddings,"
         " norms, attention as in rarefy's fp32 engine.  "]
    if lowbit:
        L[-1] += (f"rarefy ternary / int8: the {n_lowbit} projections quantized post-training from the"
                  " dequantized weights (`quantize_model`: ternary = BitNet b1.58 absmean per tensor; int8 per"
                  " output channel), TernaryLinear / Int8Linear in \"fused\" mode (the C++ kernels on the packed"
                  " weights), q/k/v and gate/up stacked (`fuse_lowbit`), lm_head the file's Q8_0 blocks"
                  " (GGUFLinear); A8 = BitNet's per-token int8 activations, otherwise 16-bit fixed point.  ")
    L[-1] += ("torch.compile rows: `Generator(cpu_compile=True)`, compiled in a warm-up call ("
              + ", ".join(f"{k.split(',')[0].replace('rarefy ', '')}: {warm[k]:.0f} s" for k in gens
                          if 'compile' in k) + "), not in the rates.  ")
    L[-1] += ("llama.cpp: llama-cpp-python" + (f" {llama_cpp_version()}" if peer else " (not installed: no figure)")
              + ", same file, same threads; its decode rate is timed from the first to the last generated token.")
    L += ["",
          "| engine | decode tok/s | vs llama.cpp | greedy tokens equal to fp32 (dequantized) | WikiText-2 ppl |"
          " runs (tok/s) |",
          "| --- | --- | --- | --- | --- | --- |"]
    for k, v in rates.items():
        if not v:
            continue
        r = statistics.median(v)
        same = sum(x == y for x, y in zip(tokens[k], ref))
        p = ppl.get({GGUF_COMPILED: GGUF_EAGER}.get(k, k))
        L.append(f"| {k} | {r:.1f} | {r / peer:.2f}x |" if peer else f"| {k} | {r:.1f} | - |")
        L[-1] += f" {same}/{len(ref)} | {'-' if p is None else f'{p:.2f}'} | {', '.join(f'{x:.1f}' for x in v)} |"
    p_k, p_8, p_d = ppl[GGUF_EAGER], ppl[GGUF_A8], ppl[FP32]
    L += ["", f"WikiText-2 valid perplexity (first {a.ppl_chunks} chunks of 512, the kernel path for every row"
          f" count): GGUF blocks through gguf_gemv_cpu {p_k:.4f} ({100 * (p_k / p_d - 1):+.3f}%; target: within 0.1%),"
          f" with int8 activations (llama.cpp's scheme) {p_8:.4f} ({100 * (p_8 / p_d - 1):+.3f}%),"
          f" dequantized fp32 {p_d:.4f}."
          + "".join(f" {k.split(',')[0].replace('rarefy ', '')}: {ppl[k]:.2f} ({ppl[k] / p_d:.3g}x fp32's)"
                    for k in lowbit)
          + ("; the low-bit rows' perplexity is computed with the same packed weights in \"cache\" mode"
             " (fp32 products). Post-training ternary quantization of a model not trained for it destroys"
             " it: the ternary rows are a speed measurement, not a usable model." if lowbit else ""),
          "",
          "llama.cpp's greedy tokens differ from rarefy's after a few tokens: its own tokenization of the"
          " prompt (BOS) and its int8 activations change the logits; rarefy's GGUF and dense engines agree"
          " with each other.",
          ""]
    return L


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES (default: all)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-mb", type=float, default=300.0, help="weight copies per variant exceed this (MB)")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=1200.0)
    ap.add_argument("--probe", action="store_true", help="also compile and run probe_ternary.cpp")
    ap.add_argument("--out", default=None)
    ap.add_argument("--e2e", action="store_true", help="end-to-end decode against llama.cpp instead")
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ppl-chunks", type=int, default=8)
    ap.add_argument("--e2e-lowbit", nargs="*", default=["ternary", "A8", "int8"],
                    help="--e2e: low-bit rows to add (ternary, A8 = ternary with int8 activations, int8)")
    ap.add_argument("--append", default=None, help="--e2e: append the section to this file")
    ap.add_argument("--no-install-peer", action="store_true",
                    help="--e2e: do not pip-install llama-cpp-python when it is missing (no llama.cpp figure then)")
    a = ap.parse_args()
    if a.e2e:
        from rarefy.models.default_model import default_model_path
        a.peer_ok = ensure_llama_cpp(not a.no_install_peer, str(default_model_path()), max(a.threads))
        if a.threads == [1, 2]:
            a.threads = [2]
        lines = run_e2e(a)
        print("\n".join(lines))
        if a.append:
            with open(a.append, "a") as f:
                f.write("\n" + "\n".join(lines).rstrip() + "\n")
            print(f"appended to {a.append}")
        return

    t0 = time.perf_counter()
    for ext in (lowbit_cpu, gemv_cpu):
        if not ext.warm_up():
            sys.exit(f"extension unavailable: {ext._state['error']}")
    load_s = time.perf_counter() - t0
    isa = lowbit_cpu.ISA_NAMES[lowbit_cpu.best_isa()]
    dev = f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
    print(f"device: {dev}\nflags: {cpu_flags()}\nlowbit path: {isa}; extensions ready in {load_s:.1f} s", flush=True)
    shapes = [SHAPES[i] for i in a.shapes] if a.shapes else SHAPES

    sections, headline = [], {}
    for threads in a.threads:
        torch.set_num_threads(threads)
        for m in a.m:
            before, waited = wait_quiet(a.max_load, a.max_wait)
            rows = []
            for i, (n, k, what) in enumerate(shapes):
                r = bench(build_variants(n, k, m, a.min_mb, seed=n + k), a.repeats)
                rows.append((n, k, what, r))
                if (n, k) == (4096, 4096):
                    headline[(threads, m)] = r
                us = {name: t * 1e6 for name, (t, _) in r.items()}
                print(f"threads {threads} M {m} {n}x{k}: " + ", ".join(f"{nm} {u:.1f}" for nm, u in us.items()),
                      flush=True)
            after = load1()
            sections.append((threads, m, before, after, waited, rows))

    probe = run_probe() if a.probe else None
    if probe:
        print(probe)
    if a.out:
        write_report(a, dev, isa, sections, headline, probe)
        print(f"wrote {a.out}")


def _fmt_rows(rows, cols, ratio_cols):
    out = []
    for n, k, what, r in rows:
        cells = [f"{n} x {k}", what] + [f"{r[c][0] * 1e6:.1f}" for c in cols]
        cells += [f"{r[num][0] / r[den][0]:.2f}x" for num, den in ratio_cols]
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_report(a, dev, isa, sections, headline, probe):
    cmd = "python3 benchmarks/cpu_lowbit_gemv.py " + " ".join(sys.argv[1:])
    L = [
        "# CPU low-bit GEMV: ternary, int8 and GGUF blocks against torch's dense paths",
        "",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Device: {dev}  ",
        f"CPU flags: {cpu_flags()}  ",
        f"Kernel path: `{isa}` (rarefy/kernels/lowbit_cpu)  ",
        f"Command: `{cmd}`",
        "",
        "Times are µs per call, median of interleaved repeats; every variant rotates over its own weight"
        f" copies (> {a.min_mb:.0f} MB per variant) so weights stream from memory as in decode (the L3 is"
        " large and shared, so part of that may be L3 hits). `bf16 cache` is torch's bf16 F.linear on a"
        " cached dequantized bf16 copy (the dequantize-once-and-cache baseline); `fp16w` is rarefy's"
        " fp16-weight GEMV (the engine's dense CPU default; for GGUF the dequantized fp16 path); `fp32`"
        " is F.linear on the dequantized fp32 weights. `ternary` / `int8` use 16-bit fixed-point"
        " activations (two int8 planes), `A8` BitNet's per-token int8 activations; the GGUF kernels run their"
        " default 16-bit activations per block of 32 (two int8 planes; `act_quant=\"int8\"`, llama.cpp's"
        " scheme, is timed end to end below). Ratios are baseline time / kernel time.",
        "",
    ]
    if (2, 1) in headline:
        r = headline[(2, 1)]
        L += ["## Targets (4096 x 4096, batch 1, 2 threads)", "",
              f"- ternary GEMV vs torch fp32 matvec: {r['fp32'][0] / r['ternary'][0]:.1f}x"
              f" (A8: {r['fp32'][0] / r['ternary A8'][0]:.1f}x); target >= 4x",
              f"- ternary GEMV vs the dequantize-once-and-cache bf16 path: {r['bf16 cache'][0] / r['ternary'][0]:.1f}x"
              f" (A8: {r['bf16 cache'][0] / r['ternary A8'][0]:.1f}x); target > 1x",
              ""]
    for threads, m, before, after, waited, rows in sections:
        L += [f"## {threads} thread{'s' if threads > 1 else ''}, M = {m}", "",
              f"1-minute load average: {before:.2f} before (after waiting {waited:.0f} s), {after:.2f} after.", ""]
        cols = ["fp32", "bf16 cache", "fp16w", "ternary", "ternary A8", "int8", "int8 A8"]
        L += ["| shape N x K | layer | " + " | ".join(f"{c} µs" for c in cols)
              + " | ternary vs fp32 | vs bf16 cache | int8 vs fp32 |",
              "|" + "---|" * (len(cols) + 5)]
        L += _fmt_rows(rows, cols, [("fp32", "ternary"), ("bf16 cache", "ternary"), ("fp32", "int8")])
        L += [""]
        cols = ["fp32", "fp16w", "Q4_0", "Q4_1", "Q8_0"]
        L += ["| shape N x K | layer | " + " | ".join(f"{c} µs" for c in cols)
              + " | Q4_1 vs fp32 | Q4_1 vs fp16w | Q8_0 vs fp16w | Q4_1 GB/s |",
              "|" + "---|" * (len(cols) + 6)]
        for line, (n, k, what, r) in zip(_fmt_rows(rows, cols, [("fp32", "Q4_1"), ("fp16w", "Q4_1"),
                                                                  ("fp16w", "Q8_0")]), rows):
            L.append(line + f" {r['Q4_1'][1]:.1f} |")
        L += [""]
    if probe:
        L += ["## Ternary kernel-design probe (one thread, hot weights)", "",
              "`rarefy/kernels/lowbit_cpu/probe_ternary.cpp`, built and run by `--probe`: the same 1024 x 4096"
              " ternary GEMV (M = 1) computed by each candidate inner loop.", "", "```", probe, "```", ""]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(L).rstrip() + "\n")


if __name__ == "__main__":
    main()
