"""Decode attention in the Generator's static cache at short contexts (H100): torch SDPA per
backend over a 256-slot bucket with the causal bool mask (what StaticKVCache.attend runs), against
rarefy's paged decode kernel reading the same cache through an identity block table. 32 query / 8
KV heads, head dim 128, bf16, batch 1; CUDA-graph replay of 50 calls; outputs compared first.

    PYTHONPATH=. python3 benchmarks/gpu_decode_sdpa_probe.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rarefy.bench.gpu_timing import graph_time_us

dev = torch.device("cuda")
B, HQ, HKV, D, S = 1, 32, 8, 128, 256
for ctx in (40, 160, 250):
    g = torch.Generator(device=dev).manual_seed(ctx)
    q = torch.randn(B, HQ, 1, D, device=dev, generator=g).to(torch.bfloat16)
    k = torch.randn(B, HKV, S, D, device=dev, generator=g).to(torch.bfloat16)
    v = torch.randn(B, HKV, S, D, device=dev, generator=g).to(torch.bfloat16)
    mask = (torch.arange(S, device=dev) < ctx)[None, None, None, :]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    row = [f"ctx {ctx}:"]
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("math", SDPBackend.MATH), ("default", None)):
        try:
            def f(i, be=be):
                if be is None:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            err = float((f(0).float() - ref).norm() / ref.norm())
            row.append(f"{name} {graph_time_us(f, 1, dev, reps=50):.1f} µs (err {err:.0e})")
        except Exception as e:  # noqa: BLE001
            row.append(f"{name} n/a ({type(e).__name__})")
    # rarefy's paged kernel over the same storage: block (b, j) = slots 16j..16j+15 of row b
    from rarefy.kernels.paged_attention import paged_decode_attention
    kc = k.view(B, HKV, S // 16, 16, D).permute(0, 2, 1, 3, 4).reshape(B * S // 16, HKV, 16, D).contiguous()
    vc = v.view(B, HKV, S // 16, 16, D).permute(0, 2, 1, 3, 4).reshape(B * S // 16, HKV, 16, D).contiguous()
    bt = torch.arange(B * S // 16, device=dev, dtype=torch.int32).view(B, S // 16)
    sl = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    qq = q[:, :, 0].contiguous()
    y = paged_decode_attention(qq, kc, vc, None, None, bt, sl, "bf16", max_seq_len=S)
    err = float((y.float() - ref[:, :, 0]).norm() / ref.norm())
    t = graph_time_us(lambda i: paged_decode_attention(qq, kc, vc, None, None, bt, sl, "bf16", max_seq_len=S), 1, dev,
                      reps=50)
    row.append(f"rarefy paged {t:.1f} µs (err {err:.0e}; cache copied to pages)")
    print("  ".join(row), flush=True)
