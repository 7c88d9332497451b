"""Greedy sampling's argmax over a Llama-3 vocabulary (128,256 logits) on the GPU: torch.argmax
against a two-stage argmax (per-chunk max, then the first chunk holding the overall max), one
CUDA-graph replay of 50 calls each, after checking both give the same index (ties included).

    PYTHONPATH=. python3 benchmarks/gpu_argmax_probe.py
"""
import torch

from rarefy.bench.gpu_timing import graph_time_us
from rarefy.layers.sampler import greedy_tokens

dev = torch.device("cuda")
for dtype in (torch.float32, torch.bfloat16):
    for b in (1, 8):
        x = torch.randn(b, 128256, device=dev).to(dtype)
        x[:, 5000] = x.max() + 1  # a tie: the first index must win
        x[:, 90000] = x[:, 5000]
        assert torch.equal(greedy_tokens(x), torch.argmax(x, dim=-1)), "mismatch"
        t_ref = graph_time_us(lambda i: torch.argmax(x, dim=-1), 1, dev, reps=50)
        t_new = graph_time_us(lambda i: greedy_tokens(x), 1, dev, reps=50)
        print(f"{str(dtype):15s} batch {b}: torch.argmax {t_ref:.1f} µs, two-stage {t_new:.1f} µs")
