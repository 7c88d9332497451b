"""MLPs that run only the neurons a predictor picks, for generation (Deja Vu-style contextual sparsity).

`use_predicted_mlp(model, predictors)` swaps every decoder layer's MLP for a PredictedMLP:

- Calls of more than ``max_rows`` tokens (16: prompts; the engine packs a step's sequences into
  one call, so a decode step of up to 16 sequences stays sparse) run dense, as the issue asks
  ("prefill stays dense unless asked"; ``sparse_prefill=True`` masks them too). The threshold
  layers draw the same line (rarefy.layers.activation_sparse.MAX_SPARSE_ROWS on the CPU).
- Decode, one sequence, on the CPU with float weights: the predictor's top-k mask goes to a
  DifferentialWeightCache (rarefy.sparsity.weight_cache), which copies only the neurons that
  changed since the previous token into its compact pool, and the SwiGLU runs over the pool's
  rows only: gate, up and down are read for the active neurons alone.
- Decode otherwise (several sequences, GPU): each row's predicted neurons are kept and the rest
  zeroed before down_proj (the same values; no bytes are skipped there).

The predictor reads the MLP's input (the normalised hidden state) of its source layer: the
layer itself, or the layer before for predictors trained one layer ahead. Counts of neurons
zeroed are kept in ``counts`` ({"{layer}.mlp_neurons": [zeroed, total]}; CPU only) like
rarefy.sparsity.predictors.predicted_mlp_sparsity, whose masks this module reproduces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rarefy.errors import RarefyError

#: calls with more tokens than this are prompts and run dense (unless sparse_prefill)
MAX_PREDICTED_ROWS = 16


class PredictedMLP(nn.Module):
    """One decoder layer's MLP with predicted neuron sparsity at decode (see the module doc)."""

    def __init__(self, mlp: nn.Module, predictors, layer_idx: int, inputs: dict[int, torch.Tensor],
                 counts: dict[str, list[int]], sparse_prefill: bool = False, use_cache: bool = True,
                 max_rows: int = MAX_PREDICTED_ROWS):
        super().__init__()
        self.mlp = mlp
        self.intermediate_size = mlp.intermediate_size
        self.predictors, self.layer_idx = predictors, layer_idx
        self.inputs, self.counts = inputs, counts
        self.sparse_prefill, self.max_rows = sparse_prefill, max_rows
        self.cache = None
        counts.setdefault(f"{layer_idx}.mlp_neurons", [0, 0])
        w = getattr(mlp.down_proj, "weight", None)
        if use_cache and isinstance(w, torch.Tensor) and w.device.type == "cpu":
            from rarefy.sparsity.weight_cache import DifferentialWeightCache
            try:  # fp16-stored weights stay fp16 in the pool; other float weights go fp32
                self.cache = DifferentialWeightCache.from_mlp(
                    mlp, predictors.keep / self.intermediate_size,
                    dtype=torch.float16 if w.dtype == torch.float16 else torch.float32)
            except RarefyError:  # quantized or biased projections: decode runs masked
                self.cache = None

    def fuse_projections(self) -> None:
        """The engine stacks projections on the GPU; the weight cache (CPU) keeps its own copies."""
        self.mlp.fuse_projections()

    def _gate_up(self, x):
        m = self.mlp
        if getattr(m, "gate_up_proj", None) is not None:
            return m.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return m.gate_proj(x), m.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from rarefy.sparsity.predictors import predict_mask

        self.inputs[self.layer_idx] = x
        if x.numel() // x.shape[-1] > self.max_rows and not self.sparse_prefill:
            return self.mlp(x)  # a prompt runs dense
        src = self.inputs[self.predictors.source_layer(self.layer_idx)]
        mask = predict_mask(self.predictors, self.layer_idx, src)  # [tokens, I]
        if not x.is_cuda:  # counting reads the mask back: no host syncs inside a CUDA graph
            c = self.counts[f"{self.layer_idx}.mlp_neurons"]
            c[0] += int(mask.numel() - mask.sum())
            c[1] += mask.numel()
        if self.cache is not None and mask.shape[0] == 1:
            self.cache.update(mask[0])
            return self.cache.mlp(x.float()).to(x.dtype)
        gate, up = self._gate_up(x)
        act = F.silu(gate) * up
        return self.mlp.down_proj(act * mask.view(act.shape).to(act.dtype))


def use_predicted_mlp(model, predictors, sparse_prefill: bool = False, use_cache: bool = True) -> dict:
    """Swap every decoder layer's MLP for a PredictedMLP; returns the shared neuron counts.
    Refuses predictors trained on another model, and MLPs already swapped."""
    from rarefy.sparsity.predictors import model_signature

    sig = model_signature(model)
    if sig != predictors.model:
        raise RarefyError(f"the predictors were trained on another model ({predictors.model}; this one is {sig})")
    layers = model.model.layers if hasattr(model, "model") else model.layers
    if any(isinstance(layer.mlp, PredictedMLP) for layer in layers):
        raise RarefyError("this model's MLPs already run with predictors")
    inputs: dict[int, torch.Tensor] = {}
    counts: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        layer.mlp = PredictedMLP(layer.mlp, predictors, i, inputs, counts, sparse_prefill, use_cache)
    return counts
