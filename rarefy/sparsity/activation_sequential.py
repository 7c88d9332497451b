"""Sequential calibration: each input's parameter from activations already sparsified upstream.

The default calibration takes every input's statistics from one dense pass. Once the inputs
before it are sparsified, an input's distribution changes: o_in and down_in in particular get
more small entries, so a threshold calibrated on dense activations zeroes more than its target
(threshold mode reached 0.517 for a 0.50 target on the embedded model). Here, for each level,
the calibration windows run through the model once, all in one batch, with every input
sparsified; each input's pre-hook first derives its parameter (mode and criterion as usual:
the quantile of the scores, or the adaptive scale) from the activations it receives, which
already carry the sparsity of every input before it (earlier layers, and attn_in / mlp_in
before o_in / down_in), then applies it. Top-k's parameter does not depend on the data
(keep fraction 1 - s), so the pass changes nothing for it.
"""

from __future__ import annotations

import torch

from rarefy.sparsity.activation_modes import InputStats, apply_rule, effective_count

SAMPLE = 1 << 18  # scores kept per input for the quantile


@torch.no_grad()
def sequential_params(model, windows: list[list[int]], per_input: dict[str, dict[str, float]], mode: str,
                      scales: dict[str, torch.Tensor] | None, seed: int = 0,
                      progress: bool = False) -> dict[str, dict[str, float]]:
    """{level: {input: parameter}} reaching per_input[level][input] on upstream-sparsified
    activations of `windows` (lists of token ids of one length, run as one batch)."""
    from rarefy.sparsity.activation import input_sites

    sites = input_sites(model)
    device = next(model.parameters()).device
    batch = torch.tensor(windows, device=device)
    out = {}
    levels = list(per_input.items())
    if progress:
        from tqdm import tqdm
        levels = tqdm(levels, desc="sequential calibration", unit="level", leave=False)
    for lk, targets in levels:
        gen = torch.Generator().manual_seed(seed + 11)
        params: dict[str, float] = {}

        def hook(name, site, targets=targets, gen=gen, params=params):
            scale = None if scales is None else scales[name]

            def pre(mod, args):
                x = args[0]
                s = float(targets[name])
                score = x.abs() if scale is None else (x * scale.to(x.dtype)).abs()
                flat = score.reshape(-1).float().cpu()
                idx = torch.randint(0, flat.numel(), (min(SAMPLE, flat.numel()),), generator=gen)
                st = InputStats(site.width, site.weights, flat[idx].double().sort().values,
                                effective_count(score).reshape(-1).double().cpu())
                params[name] = st.param(mode, s)
                y, _ = apply_rule(mode, params[name], x, scale)
                return (y,) + tuple(args[1:])
            return pre

        handles = [s.hook.register_forward_pre_hook(hook(n, s)) for n, s in sites.items()]
        try:
            model(batch)
        finally:
            for h in handles:
                h.remove()
        out[lk] = {n: params[n] for n in targets}
    return out
