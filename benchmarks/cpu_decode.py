"""CPU decode benchmark: rarefy against transformers' `generate` on the embedded model.

Batch 1, greedy, 128 new tokens, fp32 on both sides, the same GGUF weights
(transformers dequantizes the same file). Runs alternate between the two
engines so drift in machine load hits both; the median is reported.

    python3 benchmarks/cpu_decode.py --out docs/results/cpu-decode.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.bench.machine import cpu_name  # noqa: E402

from rarefy.engine.generate import Generator  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402

PROMPT = "The history of the city of Paris begins in the"


@torch.inference_mode()
def hf_decode_rate(hf, ids, new_tokens):
    """(decode tok/s, prefill s): generate's time minus a 1-token generate's time."""
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    t1 = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    t2 = time.perf_counter()
    return (new_tokens - 1) / ((t2 - t1) - (t1 - t0)), t1 - t0, out[0, ids.shape[1]:].tolist()


def wikitext_ppl(model, tokenizer, chunks: int) -> float:
    from rarefy.eval.perplexity import perplexity
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2", "valid.txt")
    with open(path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_special_tokens=False)
    return perplexity(model, ids, ctx=512, max_chunks=chunks).ppl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ppl-chunks", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import transformers as tf

    engines = {"rarefy fp32": load_model(None, dtype="fp32"),
               "rarefy fp16w (default)": load_model(None, dtype="fp16w")}
    tk = engines["rarefy fp32"].tokenizer
    prompt = tk.encode(PROMPT)
    gens = {k: Generator(v.model, v.tokenizer) for k, v in engines.items()}
    params = SamplingParams(max_tokens=a.new_tokens, ignore_eos=True)
    d, f = os.path.split(engines["rarefy fp32"].source)
    hf = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    for g in gens.values():  # warm-up
        g.generate([prompt], params)
    hf_decode_rate(hf, ids, 8)
    rates = {k: [] for k in [*gens, "transformers fp32"]}
    ttft = {k: [] for k in rates}
    tokens = {}
    for i in range(a.repeats):  # alternate engines so load drift hits all of them
        for k, g in gens.items():
            (c,), s = g.generate([prompt], params)
            rates[k].append(s.decode_tok_s)
            ttft[k].append(s.ttft_s)
            tokens[k] = c.token_ids
        rate, prefill, tokens["transformers fp32"] = hf_decode_rate(hf, ids, a.new_tokens)
        rates["transformers fp32"].append(rate)
        ttft["transformers fp32"].append(prefill)
        print(f"run {i}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)

    ppl = {k: wikitext_ppl(v.model, v.tokenizer, a.ppl_chunks) for k, v in engines.items()}
    base = statistics.median(rates["transformers fp32"])
    ref_tokens = tokens["transformers fp32"]
    lines = [
        f"date: {datetime.date.today()}; device: {cpu_name()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {tf.__version__}",
        f"model: embedded SmolLM2-135M-Instruct (Q4_1 GGUF), batch 1, {len(prompt)}-token prompt, "
        f"{a.new_tokens} new tokens, greedy; median of {a.repeats} alternating runs; "
        f"quality: WikiText-2 valid perplexity, first {a.ppl_chunks} chunks of 512, and greedy tokens "
        f"equal to transformers'",
        "",
        "| engine | decode tok/s | vs transformers | TTFT ms | ppl | same greedy tokens | runs (tok/s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, v in rates.items():
        r = statistics.median(v)
        same = sum(x == y for x, y in zip(tokens[k], ref_tokens))
        lines.append(f"| {k} | {r:.1f} | {r / base:.2f}x | {statistics.median(ttft[k]) * 1000:.0f} | "
                     f"{ppl.get(k, float('nan')):.4f} | {same}/{len(ref_tokens)} | "
                     f"{', '.join(f'{x:.1f}' for x in v)} |")
    lines += ["", "Target: rarefy >= 1.5x transformers (fp32) decode tok/s."]
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(f"# CPU decode, embedded model\n\nCommand: `python3 benchmarks/cpu_decode.py --out {a.out}`\n\n"
                     + table + "\n")


if __name__ == "__main__":
    main()
