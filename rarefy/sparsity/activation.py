"""Activation sparsity, TEAL-style: per-layer magnitude thresholds on each projection's input.

For y = W x, every input channel with |x_i| below a threshold is set to zero, so column i of
W need not be read. Four inputs per decoder layer are thresholded (q/k/v share one input,
gate/up share one):

    attn_in   input of q_proj / k_proj / v_proj (the attention RMSNorm output)
    o_in      input of o_proj (the attention output)
    mlp_in    input of gate_proj / up_proj (the MLP RMSNorm output)
    down_in   input of down_proj (SiLU(gate) * up)

``calibrate_thresholds`` runs calibration text through the model, keeps a uniform random
sample of |x| per input (all tokens, all channels) and takes, for each target sparsity s,
the s-quantile as the threshold (uniform allocation: every input at the same sparsity).
``sparsify_activations`` installs forward pre-hooks that zero the small entries; compute
stays dense (this is the quality reference the sparse kernels must match).
Thresholds are saved as JSON (``save_thresholds`` / ``load_thresholds``), described in
docs/activation-sparsity.md.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from rarefy.errors import RarefyError

FORMAT = "rarefy-activation-thresholds"
VERSION = 1
# input -> (module of the decoder layer, its child whose input it is; None = that module's own
# input). attn_in and mlp_in hook the attention / MLP module itself, so q, k, v (gate, up)
# all see the zeroed input whether or not the projections are fused.
INPUTS = {"attn_in": ("self_attn", None), "o_in": ("self_attn", "o_proj"),
          "mlp_in": ("mlp", None), "down_in": ("mlp", "down_proj")}
SAMPLE_PER_INPUT = 1 << 18  # |x| values kept per input for the quantiles


@dataclass
class Thresholds:
    """thresholds[sparsity][f"{layer}.{input}"] = t; zero |x| < t."""

    sparsities: list[float]
    thresholds: dict[str, dict[str, float]]
    model: dict = field(default_factory=dict)

    def for_sparsity(self, s: float) -> dict[str, float]:
        key = _key(s)
        if key not in self.thresholds:
            raise RarefyError(f"no thresholds for sparsity {s}; calibrated: "
                              f"{', '.join(self.thresholds)}")
        return self.thresholds[key]


def _key(s: float) -> str:
    return f"{float(s):.4f}"


def check_sparsities(values) -> list[float]:
    out = []
    for v in values:
        s = float(v)
        if not 0.0 <= s < 1.0:
            raise RarefyError(f"activation sparsity must be in [0, 1), got {v}")
        out.append(s)
    if not out:
        raise RarefyError("give at least one sparsity")
    return sorted(set(out))


def _target_modules(model) -> dict[str, nn.Module]:
    """name -> the module whose input is that activation ("3.mlp_in" -> layers[3].mlp.gate_proj)."""
    out = {}
    for i, layer in enumerate(model.model.layers if hasattr(model, "model") else model.layers):
        for inp, (parent, child) in INPUTS.items():
            owner = getattr(layer, parent, None)
            mod = owner if child is None or owner is None else getattr(owner, child, None)
            if mod is None:
                raise RarefyError(f"layer {i} has no {parent}{'.' + child if child else ''} to take {inp} from")
            out[f"{i}.{inp}"] = mod
    return out


def model_signature(model) -> dict:
    cfg = model.config
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size}


@torch.no_grad()
def calibrate_thresholds(model, token_ids: list[int], sparsities, seq_len: int = 512, samples: int = 16,
                         seed: int = 0, progress: bool = False) -> Thresholds:
    """Thresholds for each target sparsity from `samples` windows of `seq_len` tokens."""
    sparsities = check_sparsities(sparsities)
    if len(token_ids) < seq_len + 1:
        raise RarefyError(f"calibration text has {len(token_ids)} tokens; need more than {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    targets = _target_modules(model)
    pools: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    per_window = max(1, SAMPLE_PER_INPUT // samples)

    def hook(name):
        def pre(mod, args):
            a = args[0].detach().abs().reshape(-1).float().cpu()
            idx = torch.randint(0, a.numel(), (min(per_window, a.numel()),), generator=gen)
            pools[name].append(a[idx])
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    starts = torch.randint(0, len(token_ids) - seq_len, (samples,), generator=gen).tolist()
    it = starts
    if progress:
        from tqdm import tqdm
        it = tqdm(starts, desc="calibrating", unit="window", leave=False)
    device = next(model.parameters()).device
    try:
        for s in it:
            model(torch.tensor([token_ids[s:s + seq_len]], device=device))
    finally:
        for h in handles:
            h.remove()
    table = {}
    qs = torch.tensor(sparsities, dtype=torch.float64)
    for name, parts in pools.items():
        sample = torch.cat(parts).double()
        table[name] = torch.quantile(sample, qs).tolist()
    thresholds = {_key(s): {n: float(v[j]) for n, v in table.items()} for j, s in enumerate(sparsities)}
    return Thresholds(sparsities, thresholds, model_signature(model))


@contextmanager
def sparsify_activations(model, thresholds: dict[str, float]):
    """Zero every projection input entry with |x| below its threshold while the context is open.
    Yields a dict counting zeroed and total entries per input (the true sparsity reached)."""
    targets = _target_modules(model)
    missing = [n for n in targets if n not in thresholds]
    if missing:
        raise RarefyError(f"thresholds lack {len(missing)} inputs of this model, e.g. {missing[0]} "
                          "(calibrated on another model?)")
    counts = {n: [0, 0] for n in targets}

    def hook(name, t):
        def pre(mod, args):
            x = args[0]
            keep = x.abs() >= t
            counts[name][0] += int((~keep).sum())
            counts[name][1] += keep.numel()
            return (x * keep,) + tuple(args[1:])
        return pre

    handles = [m.register_forward_pre_hook(hook(n, thresholds[n])) for n, m in targets.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def measured_sparsity(counts: dict[str, list[int]]) -> float:
    """Fraction of zeroed entries over all inputs (each input weighted by its entries)."""
    zero = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    return zero / total if total else 0.0


def save_thresholds(th: Thresholds, path: str | os.PathLike) -> None:
    data = {"format": FORMAT, "version": VERSION, "mode": "threshold", "allocation": "uniform",
            "model": th.model, "sparsities": th.sparsities, "thresholds": th.thresholds}
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def load_thresholds(path: str | os.PathLike, model=None) -> Thresholds:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RarefyError(f"threshold file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RarefyError(f"{path} is not a rarefy threshold file (not JSON)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RarefyError(f"{path} is not a rarefy threshold file")
    th = Thresholds(data["sparsities"], data["thresholds"], data.get("model", {}))
    if model is not None and th.model and th.model != model_signature(model):
        raise RarefyError(f"{path} was calibrated on another model ({th.model}, this one is "
                          f"{model_signature(model)})")
    return th
