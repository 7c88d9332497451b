"""Pruning time: magnitude, Wanda and SparseGPT at 50% unstructured and 2:4.

CPU: the embedded model (SmolLM2-135M, fp32, 30 layers) pruned end to end by
`prune_model`, calibrated on `--samples` random windows of `--seq-len` tokens of
wikitext-2 valid (../shared/data/wikitext-2/valid.txt from the repo root).
Magnitude needs no calibration, so its time is the masks alone. Perplexity
after pruning (--ppl-chunks chunks of 512 tokens) is a sanity column; the
quality study is docs/results/pruning.md.

GPU: ONE Llama-3-8B-shaped decoder layer (hidden 4096, intermediate 14336, 32
heads, 8 KV heads), random bf16 weights, `--gpu-samples` x `--gpu-seq-len`
random bf16 activations (1% outlier channels), through `prune_decoder_layer`
(dense pass with statistics, solve, pruned pass). The GPU path imports
neither gguf nor the model loader.

    python3 benchmarks/prune_bench.py --cpu-only --out docs/results/prune-time.md
    PYTHONPATH=. python3 benchmarks/prune_bench.py --gpu-only --out $OUT/prune-gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rarefy.bench.machine import cpu_name  # noqa: E402
from rarefy.sparsity.calibrate import prune_decoder_layer  # noqa: E402
from rarefy.sparsity.masks import Pattern, parse_pattern  # noqa: E402
from rarefy.sparsity.prune import PruneReport, Target  # noqa: E402

WIKITEXT = os.path.join(ROOT, "..", "shared", "data", "wikitext-2", "valid.txt")
METHODS = ("magnitude", "wanda", "sparsegpt")
SETTINGS = (("50%", dict(sparsity=0.5)), ("2:4", dict(pattern="2:4")))


def cpu_rows(a) -> list[dict]:
    from rarefy.eval.perplexity import perplexity
    from rarefy.models.loader import load_model
    from rarefy.sparsity.prune import prune_model

    lm = load_model(None, dtype="fp32")
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ids = None
    if a.ppl_chunks:
        with open(WIKITEXT, encoding="utf-8") as f:
            ids = lm.tokenizer.encode(f.read(), add_special_tokens=False)
        rows = [dict(method="dense", setting="-", ppl=perplexity(lm.model, ids, 512, a.ppl_chunks).ppl)]
    else:
        rows = []
    for method in a.methods:
        for label, kw in SETTINGS:
            lm.model.load_state_dict(state)
            calib = None if method == "magnitude" else WIKITEXT
            r = prune_model(lm.model, lm.tokenizer, method, calib=calib, calib_samples=a.samples,
                            calib_len=a.seq_len, progress=False, **kw)
            row = dict(method=method, setting=label, total=r.seconds, forward=r.seconds_forward,
                       solve=r.seconds_solve, sparsity=r.overall_sparsity,
                       err=(sum(r.layer_errors) / len(r.layer_errors)) if r.layer_errors else None)
            if ids is not None:
                row["ppl"] = perplexity(lm.model, ids, 512, a.ppl_chunks).ppl
            rows.append(row)
            print(fmt_row(row), flush=True)
    return rows


def llama3_8b_layer(device: torch.device):
    """One DecoderLayer with Llama-3-8B's shapes and random bf16 weights (std 0.02)."""
    from rarefy.config import ModelConfig
    from rarefy.layers.rotary import RotaryEmbedding
    from rarefy.models.llama import DecoderLayer

    cfg = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_layers=1, num_heads=32, num_kv_heads=8,
                      head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192)
    with torch.device(device):
        layer = DecoderLayer(cfg, 0).to(torch.bfloat16)
        rotary = RotaryEmbedding(cfg, device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("_proj.weight"):
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    return layer.eval(), rotary


def gpu_rows(a) -> list[dict]:
    dev = torch.device("cuda")
    layer, rotary = llama3_8b_layer(dev)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    gen = torch.Generator(dev).manual_seed(1)
    hidden = torch.randn(a.gpu_samples, a.gpu_seq_len, 4096, device=dev, dtype=torch.bfloat16,
                         generator=gen)
    # 1% of channels 20x larger, like LLM activation outliers; with iid inputs every
    # column norm is equal and Wanda would pick magnitude's mask
    hidden[..., torch.randperm(4096, device=dev, generator=gen)[:41]] *= 20
    out = torch.empty_like(hidden)
    pos = torch.arange(a.gpu_seq_len, device=dev).expand(a.batch_size, a.gpu_seq_len)
    cos, sin = rotary(pos, torch.bfloat16)

    def run(method, pattern, s, samples):
        layer.load_state_dict(state)
        targets = [Target(f"model.layers.0.{sub}", m, 0, s) for sub, m in layer.named_modules()
                   if sub.endswith("_proj")]
        rep = PruneReport(method, pattern.describe())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        err = prune_decoder_layer(layer, targets, hidden[:samples], out[:samples], (cos, sin, pos),
                                  method, pattern, rep, batch_size=a.batch_size)
        torch.cuda.synchronize()
        rep.seconds = time.perf_counter() - t0
        return rep, err

    for method in METHODS:  # warm-up: cuBLAS / cuSOLVER handles, allocator
        run(method, Pattern(), 0.5, a.batch_size)
    rows = []
    for method in a.methods:
        for label, kw in SETTINGS:
            pat = parse_pattern(kw["pattern"]) if "pattern" in kw else Pattern()
            rep, err = run(method, pat, 0.5, a.gpu_samples)
            row = dict(method=method, setting=label, total=rep.seconds, forward=rep.seconds_forward,
                       solve=rep.seconds_solve, sparsity=rep.overall_sparsity, err=err,
                       peak_gb=torch.cuda.max_memory_allocated() / 2**30)
            rows.append(row)
            print(fmt_row(row), flush=True)
    return rows


def secs(t: float) -> str:
    return f"{t:.2f}" if t < 10 else f"{t:.1f}"


def fmt_row(r: dict) -> str:
    if r["method"] == "dense":
        return f"| dense | - | - | - | - | - | - | {r['ppl']:.2f} |"
    err = f"{r['err']:.3f}" if r.get("err") is not None else "-"
    cells = [r["method"], r["setting"], *(secs(r[k]) for k in ("total", "forward", "solve")),
             f"{r['sparsity']:.4f}", err]
    if "ppl" in r:
        cells.append(f"{r['ppl']:.2f}")
    if "peak_gb" in r:
        cells.append(f"{r['peak_gb']:.1f}")
    return "| " + " | ".join(cells) + " |"


HEAD = ["method", "pattern", "total s", "forward s", "solve s", "sparsity", "layer err"]


def table(rows: list[dict], extra: list[str]) -> list[str]:
    head = HEAD + extra
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head), *map(fmt_row, rows)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32, help="CPU calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ppl-chunks", type=int, default=8, help="0 = no perplexity column")
    ap.add_argument("--gpu-samples", type=int, default=128)
    ap.add_argument("--gpu-seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--wait-load", type=float, default=None, metavar="L",
                    help="CPU part: first wait (up to 1 h) until the 1-min load average is below L")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    a = ap.parse_args()
    do_gpu = not a.cpu_only and torch.cuda.is_available()
    if a.gpu_only and not torch.cuda.is_available():
        sys.exit("error: --gpu-only needs a CUDA GPU")
    md = [f"# Pruning time ({a.date})", "",
          "Seconds for `prune_model` / `prune_decoder_layer`: **forward** = embedding, the dense pass "
          "with statistics hooks and the pruned pass; **solve** = masks and SparseGPT's OBS sweeps; "
          "total also counts tokenizing the calibration file. **layer err** = ||Y_pruned - Y_dense|| / "
          "||Y_dense|| of a decoder layer's output on its calibration inputs (CPU: mean over the "
          "layers). "
          "Generated by `benchmarks/prune_bench.py`.", ""]
    if not a.gpu_only:
        print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads", flush=True)
        deadline = time.time() + 3600  # on a shared machine other jobs skew CPU timings badly
        while a.wait_load is not None and os.getloadavg()[0] >= a.wait_load and time.time() < deadline:
            time.sleep(30)
        load = os.getloadavg()[0]
        rows = cpu_rows(a)
        load_end = os.getloadavg()[0]
        md += [f"## CPU: embedded model (SmolLM2-135M, fp32), {a.samples} x {a.seq_len} "
               "calibration tokens", "",
               f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"1-min load average {load:.1f} at start, {load_end:.1f} at the end (2 cores; "
               "above ~2 other jobs shared them and the times are inflated)."
               + (f" ppl: wikitext-2 valid, {a.ppl_chunks} chunks x 512 tokens." if a.ppl_chunks
                  else ""), "",
               *table(rows, ["ppl"] if a.ppl_chunks else []), ""]
    if do_gpu:
        name = torch.cuda.get_device_name()
        print(f"GPU: {name}", flush=True)
        rows = gpu_rows(a)
        md += [f"## GPU: one Llama-3-8B-shaped layer, bf16, {a.gpu_samples} x {a.gpu_seq_len} "
               "random activations (1% of channels 20x)", "",
               f"{name}, torch {torch.__version__}. Weights random N(0, 0.02^2) bf16; statistics "
               "and solves in fp32 (Cholesky in fp64).", "",
               *table(rows, ["peak GB"]), ""]
    elif not a.gpu_only:  # rows for a later GPU run to fill (its --gpu-only table)
        md += ["## GPU: one Llama-3-8B-shaped layer, bf16, 128 x 512 random activations", "",
               "Not run yet: on a CUDA machine, `PYTHONPATH=. python3 benchmarks/prune_bench.py "
               "--gpu-only --out prune-gpu.md` prints these rows.", "",
               "| " + " | ".join(HEAD + ["peak GB"]) + " |", "|" + " --- |" * (len(HEAD) + 1),
               *(f"| {m} | {label} |" + " |" * (len(HEAD) - 1) for m in a.methods
                 for label, _ in SETTINGS), ""]
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(md))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
