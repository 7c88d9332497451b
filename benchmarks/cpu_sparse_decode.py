"""CPU decode of a pruned embedded model: SparseLinear (C++ bitmap kernel) against the same
checkpoint run dense, in one process, same prompt.

    python3 benchmarks/cpu_sparse_decode.py --model PRUNED_DIR [--tokens 128] [--out FILE.md]

Both load with the CPU default dtype (fp16-stored weights, fp32 math): "dense" runs rarefy's
fp16 GEMV over the weights with their zeros, "sparse" lets the compiler pick per matrix
(bitmap / n:m or dense where sparse measured slower). Greedy decode, batch 1; the median of
--repeats runs. Also checks the two produce the same tokens for the first 16 steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rarefy.bench.machine import cpu_name  # noqa: E402
from rarefy.engine.generate import Generator  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402
from rarefy.layers.sparse_linear import SparseLinear  # noqa: E402
from rarefy.models.loader import load_model  # noqa: E402

PROMPT = "The history of the city begins in the early middle ages, when"


def rate(loaded, tokens: int, repeats: int, cpu_compile: bool = False) -> tuple[float, list[int]]:
    """Median decode tok/s of ``repeats`` greedy runs after a warm-up (which also compiles the
    step with ``cpu_compile``: torch.compile with inductor's C++ wrapper)."""
    gen = Generator(loaded.model, loaded.tokenizer, cpu_compile=cpu_compile)
    ids = loaded.tokenizer.encode(PROMPT)
    gen.generate([ids], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    rates, out = [], None
    for _ in range(repeats):
        comps, stats = gen.generate([ids], SamplingParams(max_tokens=tokens, ignore_eos=True))
        rates.append(stats.decode_tok_s)
        out = comps[0].token_ids
    return statistics.median(rates), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true",
                    help="both decode steps through torch.compile (inductor's C++ wrapper; the sparse op opaque)")
    ap.add_argument("--no-autotune", action="store_true",
                    help="sparse wherever it saves bytes, without timing each matrix")
    a = ap.parse_args()
    rows = []
    outs = {}
    for mode in ("off", "on", "off", "on"):  # interleaved: load drift hits both alike
        if mode == "on" and a.no_autotune:
            from rarefy.layers.sparse_linear import use_sparse_weights
            loaded = load_model(a.model, sparse="off")
            use_sparse_weights(loaded.model, autotune=False)
        else:
            loaded = load_model(a.model, sparse=mode)
        n_sparse = sum(isinstance(m, SparseLinear) for m in loaded.model.modules())
        r, out = rate(loaded, a.tokens, a.repeats, cpu_compile=a.compile)
        outs[mode] = out
        rows.append((mode, n_sparse, r))
        print(f"sparse={mode}: {r:.1f} tok/s ({n_sparse} SparseLinear)", flush=True)
    dense = statistics.median(r for m, _, r in rows if m == "off")
    sparse = statistics.median(r for m, _, r in rows if m == "on")
    same = outs["off"][:16] == outs["on"][:16]
    load = os.getloadavg()[0]
    lines = [f"# CPU sparse decode ({datetime.date.today().isoformat()})", "",
             f"{cpu_name()}, {torch.get_num_threads()} threads, load average {load:.2f} at the end; "
             f"model {a.model}; autotune {'off' if a.no_autotune else 'on'}; {'compiled' if a.compile else 'eager'} decode step; batch 1, greedy, {a.tokens} new tokens, median of {a.repeats} per load, "
             "two loads each, interleaved", "",
             "| run | SparseLinear layers | tok/s |", "| --- | --- | --- |"]
    lines += [f"| {'sparse' if m == 'on' else 'dense'} | {n} | {r:.1f} |" for m, n, r in rows]
    lines += ["", f"sparse / dense: **{sparse / dense:.2f}x** (medians {sparse:.1f} vs {dense:.1f} tok/s); "
              f"first 16 greedy tokens identical: {same}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
