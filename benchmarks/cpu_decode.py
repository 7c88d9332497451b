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
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.engine.generate import Generator  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402

PROMPT = "The history of the city of Paris begins in the"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@torch.inference_mode()
def hf_decode_rate(hf, ids, new_tokens):
    """(decode tok/s, prefill s): generate's time minus a 1-token generate's time."""
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    t1 = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    t2 = time.perf_counter()
    return (new_tokens - 1) / ((t2 - t1) - (t1 - t0)), t1 - t0, out[0, ids.shape[1]:].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import transformers as tf

    lm = load_model(None, dtype=torch.float32)
    prompt = lm.tokenizer.encode(PROMPT)
    gen = Generator(lm.model, lm.tokenizer)
    params = SamplingParams(max_tokens=a.new_tokens, ignore_eos=True)
    d, f = os.path.split(lm.source)
    hf = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    gen.generate([prompt], params)  # warm-up both
    hf_decode_rate(hf, ids, 8)
    ours, theirs, ttft_ours, ttft_theirs = [], [], [], []
    same = True
    for i in range(a.repeats):
        (c,), s = gen.generate([prompt], params)
        ours.append(s.decode_tok_s)
        ttft_ours.append(s.ttft_s)
        rate, prefill, hf_ids = hf_decode_rate(hf, ids, a.new_tokens)
        theirs.append(rate)
        ttft_theirs.append(prefill)
        same &= hf_ids == c.token_ids
        print(f"run {i}: rarefy {ours[-1]:.1f} tok/s, transformers {theirs[-1]:.1f} tok/s", flush=True)

    r, t = statistics.median(ours), statistics.median(theirs)
    lines = [
        f"date: {datetime.date.today()}; device: {cpu_name()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {tf.__version__}",
        f"model: embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), batch 1, "
        f"{len(prompt)}-token prompt, {a.new_tokens} new tokens, greedy; median of {a.repeats} alternating runs",
        f"quality: greedy tokens identical to transformers: {same}",
        "",
        "| engine | decode tok/s | TTFT ms | runs (tok/s) |",
        "| --- | --- | --- | --- |",
        f"| rarefy fp32 | {r:.1f} | {statistics.median(ttft_ours) * 1000:.0f} | "
        f"{', '.join(f'{x:.1f}' for x in ours)} |",
        f"| transformers generate fp32 | {t:.1f} | {statistics.median(ttft_theirs) * 1000:.0f} | "
        f"{', '.join(f'{x:.1f}' for x in theirs)} |",
        "",
        f"rarefy / transformers: {r / t:.2f}x (target >= 1.5x)",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(f"# CPU decode, embedded model\n\nCommand: `python3 benchmarks/cpu_decode.py --out {a.out}`\n\n"
                     + table + "\n")


if __name__ == "__main__":
    main()
