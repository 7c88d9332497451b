"""Greedy agreement of the serving engine (paged cache) with `rarefy generate`'s Generator
(static cache) on a GPU, under switches that isolate the decode-attention options: which
one breaks agreement, if any. Llama-3-8B shape with random bf16 weights (few layers).

    PYTHONPATH=. python3 benchmarks/gpu_engine_check.py [--layers 4] [--prompts 4] [--tokens 16]
        [--variants default,tm16,nopdl,noprefetch]

Variants: default; tm16 (bf16 V kept token-major, so the base kernel decodes); nopdl (no
programmatic dependent launches); noprefetch (no L2 prefetch before the PDL wait).
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_serve import random_model, run_engine  # noqa: E402

from rarefy.engine.generate import Generator  # noqa: E402
from rarefy.engine.llm_engine import EngineOptions, LLMEngine  # noqa: E402
from rarefy.kernels.paged_attention import triton_decode, triton_splits  # noqa: E402
from rarefy.kv import paged, quant  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402


def patches(variant: str) -> list:
    if variant == "default":
        return []
    if variant == "tm16":
        return [mock.patch.object(paged, "stores_v_dim_major", lambda kv, dev: quant.is_quantized(kv))]
    if variant == "nopdl":
        return [mock.patch.object(m, "pdl_available", lambda dev: False) for m in (triton_splits, triton_decode)]
    if variant == "noprefetch":
        orig = triton_splits.prefetch_constants
        off = lambda k, v, pages: orig(k, v, 0)  # noqa: E731
        return [mock.patch.object(triton_decode, "prefetch_constants", off),
                mock.patch.object(triton_splits, "prefetch_constants", off)]
    raise SystemExit(f"unknown variant {variant!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--variants", default="default,tm16,nopdl,noprefetch")
    a = ap.parse_args()
    model = random_model(a.layers)
    model.fuse_projections()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128000, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    params = SamplingParams(max_tokens=a.tokens, ignore_eos=True)
    want = [Generator(model, None, compile=False).generate([p], params)[0][0].token_ids for p in prompts]
    bad = 0
    for variant in a.variants.split(","):
        with ExitStack() as stack:
            for p in patches(variant):
                stack.enter_context(p)
            engine = LLMEngine(model, None, EngineOptions(kv_dtype="bf16", kv_memory_bytes=int(4e9),
                                                          max_num_seqs=a.prompts, max_step_tokens=2048))
            got, _, _, _ = run_engine(engine, prompts, a.tokens)
        agree = sum(x == y for w, s in zip(want, got) for x, y in zip(w, s.output_ids)) / (a.tokens * len(prompts))
        first = [w[0] == s.output_ids[0] for w, s in zip(want, got)]
        v = engine.cache.v_cache[0]
        print(f"{variant:11s} agreement {agree:6.1%}  first tokens equal {sum(first)}/{len(first)}  "
              f"V strides {tuple(v.stride())}", flush=True)
        bad += not all(first)
        del engine
        torch.cuda.empty_cache()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
