"""GPU serving throughput of rarefy's engine at Llama-3-8B shape, random bf16 weights.

Issue 8's workload: 128 requests of 32 prompt tokens and 2048 output tokens, all
submitted at once (vLLM publishes about 6,600 output tokens/s for it on an H100).
Also: batch-1 time per output token against `rarefy generate`'s Generator (static
cache, CUDA graph, torch.compile) on the same weights, and a greedy agreement check
between the two before anything is timed.

    PYTHONPATH=. python3 benchmarks/gpu_serve.py [--requests 128 --output 2048] [--layers 32]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, ".")
from rarefy.config import ModelConfig  # noqa: E402
from rarefy.engine.generate import Generator  # noqa: E402
from rarefy.engine.llm_engine import EngineOptions, LLMEngine  # noqa: E402
from rarefy.layers.sampler import SamplingParams  # noqa: E402
from rarefy.models.llama import DecoderLM  # noqa: E402
from rarefy.models.loader import StateDictCheckpoint, build_model  # noqa: E402

LLAMA3_8B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def random_model(layers: int):
    cfg = ModelConfig.from_hf({**LLAMA3_8B, "num_hidden_layers": layers})
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in DecoderLM(cfg).state_dict().items()}
    g = torch.Generator(device="cuda").manual_seed(0)
    sd = {n: (torch.randn(s, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
          for n, s in shapes.items() if not n.startswith("rotary")}
    for n in sd:
        if n.endswith("norm.weight") or "layernorm" in n:
            sd[n] = torch.ones_like(sd[n])
    model = build_model(cfg, StateDictCheckpoint(sd), torch.device("cuda"), torch.bfloat16)
    del sd
    torch.cuda.empty_cache()
    return model


def run_engine(engine, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    first_token_at = None
    steps = 0
    while engine.has_work:
        outs = engine.step()
        steps += 1
        if first_token_at is None and outs:
            first_token_at = time.perf_counter()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return seqs, wall, steps, (first_token_at or t0) - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--output", type=int, default=2048)
    ap.add_argument("--tpot-tokens", type=int, default=256)
    ap.add_argument("--kv-gb", type=float, default=40.0)
    ap.add_argument("--no-gate", action="store_true",
                    help="time even when the engine's first greedy token differs from Generator's (bf16 near-ties "
                         "of random weights; docs/results/serving-h100.md, seventh session)")
    a = ap.parse_args()
    dev = torch.cuda.get_device_name()
    print(f"device {dev}, torch {torch.__version__}", flush=True)
    model = random_model(a.layers)
    model.fuse_projections()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128000, (a.prompt,), generator=g).tolist() for _ in range(a.requests)]

    opts = EngineOptions(kv_dtype="bf16", kv_memory_bytes=int(a.kv_gb * 1e9), max_num_seqs=a.requests,
                         max_step_tokens=max(2048, a.prompt * a.requests))
    engine = LLMEngine(model, None, opts)
    print(f"KV cache: {engine.cache.allocator.num_blocks} blocks of 16 "
          f"({engine.cache.nbytes() / 1e9:.1f} GB)", flush=True)

    # correctness first: engine greedy == Generator greedy on a few prompts
    check = prompts[:4]
    ref = Generator(model, None, compile=False)
    want = [ref.generate([p], SamplingParams(max_tokens=16, ignore_eos=True))[0][0].token_ids for p in check]
    got, _, _, _ = run_engine(engine, check, 16)
    agree = sum(a_ == b_ for w, s in zip(want, got) for a_, b_ in zip(w, s.output_ids)) / (16 * len(check))
    first_ok = all(w[0] == s.output_ids[0] for w, s in zip(want, got))
    print(f"greedy agreement engine vs Generator: {agree:.1%} of tokens, first tokens equal: {first_ok}", flush=True)
    if not first_ok and not a.no_gate:
        sys.exit("engine and Generator disagree on the first token; not timing")
    assert engine.cache.allocator.num_used == 0

    # warm-up: capture every decode bucket the run will use
    t0 = time.perf_counter()
    run_engine(engine, prompts, 4)
    print(f"warm-up (graph capture) {time.perf_counter() - t0:.1f} s", flush=True)

    seqs, wall, steps, ttft = run_engine(engine, prompts, a.output)
    out_tokens = sum(len(s.output_ids) for s in seqs)
    thr = out_tokens / wall
    print(f"{a.requests} x ({a.prompt} prompt + {a.output} output): {out_tokens} tokens in {wall:.1f} s "
          f"= {thr:.0f} output tok/s; {steps} steps; first token after {ttft * 1000:.0f} ms", flush=True)
    leaked = engine.cache.allocator.num_used

    # batch-1 time per output token: engine (graphs, with and without torch.compile) vs
    # rarefy generate's Generator (static cache, graph + compile)
    tpot = {}
    for compiled in (False, True):
        eng1 = engine if not compiled else LLMEngine(model, None, EngineOptions(
            kv_memory_bytes=int(2e9), max_num_seqs=4, compile=True))
        run_engine(eng1, prompts[:1], 8)  # capture the batch-1 graph outside the timing
        _, wall1, steps1, ttft1 = run_engine(eng1, prompts[:1], a.tpot_tokens)
        tpot[compiled] = (wall1 - ttft1) / (a.tpot_tokens - 1)
    del engine, eng1
    torch.cuda.empty_cache()
    gen = Generator(model, None, compile=True)
    p1 = SamplingParams(max_tokens=a.tpot_tokens, ignore_eos=True)
    gen.generate(prompts[:1], p1)
    _, st = gen.generate(prompts[:1], p1)
    tpot_gen = st.decode_s / st.decode_steps
    print("\n| measure | value |\n| --- | --- |")
    print(f"| device | {dev} |")
    print(f"| model | Llama-3-8B shape, {a.layers} layers, random bf16 weights |")
    print(f"| throughput, {a.requests} requests x {a.prompt}+{a.output} | {thr:.0f} output tok/s (target >= 6000) |")
    print(f"| wall, steps | {wall:.1f} s, {steps} |")
    print(f"| KV blocks leaked | {leaked} |")
    for compiled, t in tpot.items():
        name = "engine, graph + compile" if compiled else "engine, graph"
        print(f"| batch-1 TPOT {name} | {t * 1000:.2f} ms = {t / tpot_gen:.3f}x generate's (target <= 1.10) |")
    print(f"| batch-1 TPOT rarefy generate (graph+compile) | {tpot_gen * 1000:.2f} ms |")

if __name__ == "__main__":
    main()
