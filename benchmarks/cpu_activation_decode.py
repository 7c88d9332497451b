"""CPU decode of the embedded model with activation sparsity (TEAL-style thresholds) against
rarefy's dense decode, in one process, with each level's perplexity beside its speed.

    python3 benchmarks/cpu_activation_decode.py [--levels 0.25,0.4,0.5] [--thresholds FILE] [--out FILE.md]

Both load the GGUF file as dense fp16-stored weights, fp32 math (gguf_blocks=False: the CPU
default keeps its quantized blocks, which the input-sparse kernels cannot read). "dense" is
rarefy's fp16 GEMV; each level swaps every decoder projection for the input-sparse kernels
(rarefy/kernels/activation_cpu via use_activation_sparsity; the LM head stays dense).
Thresholds: calibrated here (uniform, windows of the second half of WikiText-2 valid) unless
--thresholds gives a file from `rarefy calibrate-activations`. Perplexity: the first 8 chunks
of 512 tokens of the first half (held out), with the same thresholds applied to every token.
Decode: greedy, batch 1, 128 new tokens, the median of --repeats runs per load; dense and
sparse loads interleaved so machine-load drift hits both alike. --compile runs both decode
steps through torch.compile (the input-sparse op stays one opaque call). --predictors DIR adds a
row decoding with neuron predictors (`rarefy train-predictors`): every MLP a PredictedMLP, the
predicted neurons run through the differential weight cache (eager: the cache cannot be traced);
its perplexity masks every token's MLP with the predicted neurons, as `eval ppl --predictors` does.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpu_sparse_decode import rate  # noqa: E402  (same prompt, warm-up and median)

from rarefy.bench.machine import cpu_name  # noqa: E402
from rarefy.eval.perplexity import perplexity  # noqa: E402
from rarefy.layers.activation_sparse import use_activation_sparsity  # noqa: E402
from rarefy.layers.predicted_mlp import use_predicted_mlp  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402
from rarefy.sparsity.activation import (calibrate_thresholds, input_weights, load_thresholds,  # noqa: E402
                                        measured_sparsity, sparsify_activations)
from rarefy.sparsity.predictors import load_predictors, neuron_sparsity, predicted_mlp_sparsity  # noqa: E402

PRED = 2.0  # the predictor row's key among the levels
VALID = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="0.25,0.4,0.5")
    ap.add_argument("--thresholds", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--skip-quality", action="store_true", help="speed only (the perplexity column stays empty)")
    ap.add_argument("--q8-head", action="store_true",
                    help="the tied lm_head (never sparsified) as the file's Q8_0 blocks in every row, as "
                         "llama.cpp and the low-bit rows run it (default: fp16 like the projections)")
    ap.add_argument("--compile", action="store_true",
                    help="dense and sparse decode steps both through torch.compile (inductor's C++ wrapper)")
    ap.add_argument("--predictors", default=None, help="add a row with these neuron predictors (eager decode)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.predictors and a.compile:
        ap.error("--predictors decodes eagerly (the weight cache cannot be traced): drop --compile")
    if a.threads:
        torch.set_num_threads(a.threads)
    levels = [float(v) for v in a.levels.split(",")]
    loaded = load_model(None, gguf_blocks=False)
    ids = loaded.tokenizer.encode(open(VALID, encoding="utf-8").read(), add_special_tokens=False)
    half = len(ids) // 2
    with torch.no_grad():
        if a.thresholds:
            th = load_thresholds(a.thresholds, loaded.model)
            source = a.thresholds
        else:
            th = calibrate_thresholds(loaded.model, ids[half:], levels, seq_len=512, samples=16)
            source = "uniform thresholds calibrated here (16 windows of 512, second half)"
        quality = {0.0: (float("nan") if a.skip_quality else perplexity(loaded.model, ids[:half], 512, a.chunks).ppl,
                         0.0)}
        for s in levels:
            if a.skip_quality:
                quality[s] = (float("nan"), float("nan"))
                continue
            with sparsify_activations(loaded.model, th.for_sparsity(s)) as counts:
                p = perplexity(loaded.model, ids[:half], 512, a.chunks).ppl
            quality[s] = (p, measured_sparsity(counts))
            print(f"level {s}: ppl {p:.3f}, sparsity reached {quality[s][1]:.3f}", flush=True)
        if a.predictors:
            preds = load_predictors(a.predictors, loaded.model)
            with predicted_mlp_sparsity(loaded.model, preds) as neurons:
                p = float("nan") if a.skip_quality else perplexity(loaded.model, ids[:half], 512, a.chunks).ppl
            w = input_weights(loaded.model)  # a skipped neuron skips its gate/up rows and down column
            mlp_share = sum(v for n, v in w.items() if n.endswith(("mlp_in", "down_in"))) / sum(w.values())
            quality[PRED] = (p, preds.sparsity * mlp_share)
            print(f"predictors: ppl {p:.3f}, neuron sparsity {neuron_sparsity(neurons) if neurons else 0:.3f}",
                  flush=True)
            levels = levels + [PRED]
    del loaded
    rows = {0.0: [], **{s: [] for s in levels}}
    outs = {}
    for _round in range(2):
        for s in [0.0] + levels:
            loaded = load_model(None, gguf_blocks=False)
            if a.q8_head:
                from rarefy.kernels.lowbit_cpu import gguf_linear
                from rarefy.models.default_model import default_model_path
                assert gguf_linear.use_gguf_blocks(loaded.model, default_model_path(), only=("lm_head",)) == 1
            if s == PRED:
                use_predicted_mlp(loaded.model, load_predictors(a.predictors, loaded.model))
            elif s > 0:
                use_activation_sparsity(loaded.model, th.for_sparsity(s))
            r, out = rate(loaded, a.tokens, a.repeats, cpu_compile=a.compile)
            rows[s].append(r)
            outs.setdefault(s, out)
            print(f"level {s}: {r:.1f} tok/s", flush=True)
            del loaded
    dense = statistics.median(rows[0.0])
    load = os.getloadavg()[0]
    lines = [f"# CPU decode with activation sparsity ({datetime.date.today().isoformat()})", "",
             f"{cpu_name()}, {torch.get_num_threads()} threads, load average {load:.2f} at the end; embedded "
             f"SmolLM2-135M-Instruct, fp16-stored weights; {'compiled decode step (torch.compile, C++ wrapper)' if a.compile else 'eager decode'}; lm_head {'Q8_0 blocks' if a.q8_head else 'fp16'} in every row; batch 1, greedy, {a.tokens} new tokens, median of "
             f"{a.repeats} per load, two loads per row, interleaved. Thresholds: {source}. Perplexity: WikiText-2 "
             f"valid, first {a.chunks} chunks of 512 of the first half.", "",
             "| level | sparsity reached (all projection inputs) | perplexity | vs dense ppl | tok/s (per load) "
             "| vs dense | first 16 tokens = dense |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    p0 = quality[0.0][0]
    for s in [0.0] + levels:
        r = statistics.median(rows[s])
        p, reached = quality[s]
        name = "dense" if s == 0 else "predictors" if s == PRED else f"{s:.0%}"
        lines.append(f"| {name} | {reached:.3f} | {p:.3f} | {p / p0 - 1:+.1%} | "
                     f"{r:.1f} ({', '.join(f'{v:.1f}' for v in rows[s])}) | {r / dense:.2f}x | "
                     f"{outs[s][:16] == outs[0.0][:16]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
