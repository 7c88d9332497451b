"""Cross-layer weight sharing: replace layers I..J by one layer applied J-I+1 times.

If neighbouring layers are nearly the same matrices (see `rarefy analyze`'s
layer similarity), one copy could serve them all and the weights read per
token would shrink by the layers dropped. This experiment measures what that
costs in perplexity.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rarefy.errors import RarefyError
from rarefy.models.llama import DecoderLayer, DecoderLM

MODES = ("first", "mean")


def _view_at(layer: DecoderLayer, idx: int) -> DecoderLayer:
    """A layer object sharing `layer`'s parameters but writing KV-cache row `idx`."""
    view = copy.copy(layer)
    view._modules = dict(layer._modules)  # own dict, so swapping self_attn leaves `layer` alone
    view.self_attn = copy.copy(layer.self_attn)
    view.self_attn.layer_idx = idx
    return view


def share_layers(model: DecoderLM, start: int, end: int, mode: str = "first") -> dict:
    """In place: layers start..end (inclusive) become one shared layer.

    mode "first" keeps layer `start`'s weights; "mean" averages the span's
    weights element-wise. Returns what was saved: layers and parameters.
    """
    n = len(model.model.layers)
    if mode not in MODES:
        raise RarefyError(f"--mode must be one of {', '.join(MODES)}")
    if not 0 <= start < end < n:
        raise RarefyError(f"need 0 <= --start < --end < {n} (the model has {n} layers)")
    layers = list(model.model.layers)
    shared = layers[start]
    if mode == "mean":
        span = layers[start:end + 1]
        with torch.no_grad():
            for name, p in shared.named_parameters():
                stack = [dict(l.named_parameters())[name].float() for l in span]
                p.copy_(torch.stack(stack).mean(0).to(p.dtype))
    dropped = sum(p.numel() for l in layers[start + 1:end + 1] for p in l.parameters())
    for i in range(start, end + 1):
        layers[i] = shared if i == start else _view_at(shared, i)
    model.model.layers = nn.ModuleList(layers)
    return {"layers_shared": end - start + 1, "layers_dropped": end - start,
            "params_dropped": dropped}
