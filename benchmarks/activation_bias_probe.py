"""How much of the output error of 50% magnitude activation sparsity is a constant, i.e.
removable by a calibrated bias W @ mean(dropped inputs) at no run-time cost? Embedded model,
fp32, 4 windows of 512 tokens from the second half of WikiText-2 valid; per projection input
the 50% threshold and the mean of the dropped part come from one half of the tokens, the error
is measured on the other half. docs/results/activation-sparsity.md ("Bias correction").

    python3 benchmarks/activation_bias_probe.py
"""
import os
import sys

import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rarefy.models.loader import load_model
torch.set_num_threads(2)
e = load_model(None, dtype="fp32"); m = e.model.eval()
text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext-2", "valid.txt")).read()
ids = e.tokenizer.encode(text, add_special_tokens=False)
n = len(ids) // 2
wins = [ids[n + i * 512: n + (i + 1) * 512] for i in range(4)]
caps = {}
def hook(name):
    def f(mod, inp):
        caps.setdefault(name, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
    return f
hs = []
for li, layer in enumerate(m.model.layers):
    for nm, mod in (("attn_in", layer.self_attn.q_proj), ("o_in", layer.self_attn.o_proj),
                    ("mlp_in", layer.mlp.gate_proj), ("down_in", layer.mlp.down_proj)):
        hs.append(mod.register_forward_pre_hook(hook((li, nm, mod))))
with torch.inference_mode():
    for w in wins:
        m(torch.tensor([w]))
for h in hs: h.remove()
tot = {}
for (li, nm, mod), xs in caps.items():
    x = torch.cat(xs).float()
    half = x.shape[0] // 2
    xc, xe = x[:half], x[half:]          # calibrate on one half, evaluate on the other
    t = xc.abs().flatten().kthvalue(int(0.5 * xc.numel())).values
    W = mod.weight.float() if hasattr(mod, "weight") else None
    if W is None: continue
    dc = torch.where(xc.abs() < t, xc, torch.zeros_like(xc)); mu = dc.mean(0)
    de = torch.where(xe.abs() < t, xe, torch.zeros_like(xe))
    err = de @ W.T                      # output error of dropping (per token)
    err_c = (de - mu) @ W.T             # after a bias W mu
    a, b = err.pow(2).sum(1).mean().item(), err_c.pow(2).sum(1).mean().item()
    tot.setdefault(nm, [0.0, 0.0]); tot[nm][0] += a; tot[nm][1] += b
    if li in (0, 10, 20, 29): print(f"layer {li:2d} {nm:8s} err {a:.3e} -> {b:.3e} ({b / a:.3f})")
for nm, (a, b) in tot.items():
    print(f"ALL {nm:8s}: bias correction leaves {b / a:.3f} of the squared output error")
