"""Neuron predictors for the SwiGLU MLP, after Deja Vu (Liu et al. 2023, "Deja Vu: Contextual
Sparsity for Efficient LLMs at Inference Time").

For each decoder layer l a small predictor reads the layer's normalised MLP input x (the
post-attention RMSNorm output, the input of gate/up) and scores every intermediate neuron j.
Two kinds:

- ``kind="swiglu"`` (default): low-rank estimates of the two projections,
  g^ = A_g B_g x + c_g and u^ = A_u B_u x + c_u (rank r each), and the score
  |silu(g^_j) * u^_j|, the neuron's true nonlinearity applied to the estimates. The factors
  are a truncated SVD of the weights whitened by the calibration inputs' covariance (the rank-r
  map with the least output error on calibration activations; with ``ahead`` a reduced-rank
  regression from the previous layer's input). Optionally fine-tuned with class-weighted BCE
  on the logit  tau * (log score - log t_l)  (``epochs`` > 0).
- ``kind="linear"``: a low-rank network  hidden -> r -> intermediate  whose output is a logit,
  trained from random initialisation with class-weighted BCE (Deja Vu's predictor; it cannot
  represent |up_j(x)| and does little better than chance on SwiGLU models).

The MLP then computes

    down(mask * silu(gate(x)) * up(x))

with mask = the top-k neurons by predictor logit, k = intermediate - round(s * intermediate)
for the target neuron sparsity s, so a sparse kernel only needs rows j of gate/up and columns
j of down for the kept neurons. Top-k (rather than logits > 0) makes the sparsity exactly the
target one on every token, whatever the calibration of the logits.

Labels. Neuron j of a token is *active* when a_j = |silu(gate_j) * up_j| is
  - mode "threshold": above a per-layer threshold t_l, the s-quantile of a over all calibration
    (training) tokens and neurons, so sparsity s holds on calibration data on average; or
  - mode "topk": among the k largest a_j of that token.

Training (kind linear, and the optional fine-tuning of kind swiglu): class-weighted binary
cross-entropy (positives weighted by negatives / positives of the layer), Adam, on the MLP
inputs of calibration windows run through the dense model. For kind linear the predictor input
is standardised per channel during training and the standardisation is folded into the saved
weights, so at inference the predictor reads the raw normalised MLP input.
Recall and precision are measured on held-out calibration windows (never trained on).

``ahead=True``: the predictor of layer l+1 reads layer l's MLP input (the mask is known one
layer ahead, so its weights can be fetched while layer l runs); layer 0 has no earlier input
and reads its own.

File format and method: docs/activation-predictors.md. Calibration inputs, labels and fitting
(collect_mlp_inputs, fit_predictors, train_predictors) are in rarefy.sparsity.predictor_training.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rarefy.errors import RarefyError

FORMAT = "rarefy-neuron-predictors"
VERSION = 2  # 2: "kind" (swiglu | linear); version 1 files (no kind) are linear and still load
READ_VERSIONS = (1, 2)
META_FILE = "predictors.json"
WEIGHTS_FILE = "predictors.safetensors"
MODES = ("threshold", "topk")
KINDS = ("swiglu", "linear")
DEFAULT_KIND = "swiglu"
DEFAULT_RANK_FRACTION = 0.04  # kind linear
SWIGLU_DEFAULT_EPOCHS = 0  # fine-tuning epochs of kind swiglu
SWIGLU_COST_FRACTION = 0.15  # kind swiglu: predictor parameters <= 15% of the MLP's (3 * hidden * intermediate)
HOLDOUT_FRACTION = 0.125  # of the calibration windows, for recall / precision
_ROWS = 4096  # tokens per batch when computing activations


# -- the predictor -----------------------------------------------------------------------

class LowRankPredictor(nn.Module):
    """logits = out(inp(x)): hidden -> rank (no bias) -> intermediate (bias)."""

    def __init__(self, hidden: int, rank: int, intermediate: int):
        super().__init__()
        self.inp = nn.Linear(hidden, rank, bias=False)
        self.out = nn.Linear(rank, intermediate, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inp(x))


class SwiGLUPredictor(nn.Module):
    """score = |silu(g^) * u^| with g^ = gate_a(gate_b(x)) + gate_bias, u^ likewise: rank-r
    estimates of gate(x) and up(x). ``temperature`` only scales the fine-tuning logit
    tau * (log score - log t); it does not change the per-token ranking and is not saved."""

    def __init__(self, hidden: int, rank: int, intermediate: int):
        super().__init__()
        self.gate_b = nn.Linear(hidden, rank, bias=False)
        self.gate_a = nn.Linear(rank, intermediate, bias=True)
        self.up_b = nn.Linear(hidden, rank, bias=False)
        self.up_a = nn.Linear(rank, intermediate, bias=True)
        self.temperature = nn.Parameter(torch.ones(()))

    def estimates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_a(self.gate_b(x)), self.up_a(self.up_b(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.estimates(x)
        return (F.silu(g) * u).abs()

    def set_factors(self, gate: tuple, up: tuple) -> None:
        """gate / up: (A [f, r], B [r, d], bias [f]) with projection ~ A @ B @ x + bias."""
        with torch.no_grad():
            for (a, b, c), la, lb in ((gate, self.gate_a, self.gate_b), (up, self.up_a, self.up_b)):
                la.weight.copy_(a)
                la.bias.copy_(c)
                lb.weight.copy_(b)


def _tensors_of(net: nn.Module, i: int) -> dict[str, torch.Tensor]:
    if isinstance(net, SwiGLUPredictor):
        pairs = {"gate.a": net.gate_a.weight, "gate.b": net.gate_b.weight, "gate.bias": net.gate_a.bias,
                 "up.a": net.up_a.weight, "up.b": net.up_b.weight, "up.bias": net.up_a.bias}
    else:
        pairs = {"in.weight": net.inp.weight, "out.weight": net.out.weight, "out.bias": net.out.bias}
    return {f"layers.{i}.{k}": v for k, v in pairs.items()}


def new_net(kind: str, hidden: int, rank: int, intermediate: int) -> nn.Module:
    return (SwiGLUPredictor if kind == "swiglu" else LowRankPredictor)(hidden, rank, intermediate)


def default_rank(intermediate_size: int, hidden_size: int | None = None, kind: str = "linear") -> int:
    """kind linear: about 4% of the intermediate size, rounded up to a multiple of 8.
    kind swiglu: the largest multiple of 8 whose predictor (2 r (hidden + intermediate)
    weights) is at most 15% of the MLP's 3 hidden intermediate weights (88 for 576 / 1536),
    at least 8 and at most the hidden size."""
    if kind == "swiglu":
        if hidden_size is None:
            raise ValueError("default_rank(kind='swiglu') needs hidden_size")
        d, f = hidden_size, intermediate_size
        r = SWIGLU_COST_FRACTION * 3 * d * f / (2 * (d + f))
        return min(d, max(8, 8 * math.floor(r / 8)))
    return max(8, 8 * math.ceil(DEFAULT_RANK_FRACTION * intermediate_size / 8))


def predictor_params(kind: str, rank: int, hidden: int, intermediate: int) -> int:
    """Weights of one layer's predictor (biases included)."""
    if kind == "swiglu":
        return 2 * (rank * (hidden + intermediate) + intermediate)
    return rank * (hidden + intermediate) + intermediate


def kept_neurons(intermediate_size: int, sparsity: float) -> int:
    """k, the neurons kept per token at neuron sparsity s (at least one)."""
    return max(1, intermediate_size - round(sparsity * intermediate_size))


def check_sparsity(s) -> float:
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise RarefyError(f"sparsity must be a number in [0, 1), got {s!r}") from None
    if not 0.0 <= s < 1.0:
        raise RarefyError(f"sparsity must be in [0, 1), got {s}")
    return s


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise RarefyError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def check_rank(rank: int | None, hidden_size: int, intermediate_size: int, kind: str = "linear") -> int:
    if rank is None:
        return default_rank(intermediate_size, hidden_size, kind)
    if not 1 <= int(rank) <= hidden_size:
        raise RarefyError(f"rank must be between 1 and the hidden size {hidden_size}, got {rank}")
    return int(rank)


def _layers(model):
    return model.model.layers


def model_signature(model) -> dict:
    """What predictors must match: the same as activation thresholds record."""
    cfg = model.config
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size}


@dataclass
class Predictors:
    """One predictor per MLP layer (SwiGLUPredictor or LowRankPredictor, by `kind`), plus what
    they were trained for.

    thresholds: per-layer label thresholds t_l (mode "threshold"; None in mode "topk").
    recall / precision: per layer, of the top-k predicted mask against the labels, on
    held-out calibration tokens.
    """

    nets: nn.ModuleList
    sparsity: float
    rank: int
    ahead: bool
    mode: str
    model: dict
    recall: list[float] = field(default_factory=list)
    precision: list[float] = field(default_factory=list)
    thresholds: list[float] | None = None
    training: dict = field(default_factory=dict)
    kind: str = "linear"

    @property
    def num_layers(self) -> int:
        return len(self.nets)

    @property
    def intermediate_size(self) -> int:
        return self.model["intermediate_size"]

    @property
    def keep(self) -> int:
        return kept_neurons(self.intermediate_size, self.sparsity)

    def source_layer(self, layer_idx: int) -> int:
        """Whose MLP input the predictor of `layer_idx` reads."""
        return layer_idx - 1 if self.ahead and layer_idx > 0 else layer_idx

    def metadata(self) -> dict:
        d, f = self.model["hidden_size"], self.intermediate_size
        per_layer = predictor_params(self.kind, self.rank, d, f)
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "model": self.model, "rank": self.rank,
                "params_per_layer": per_layer, "cost_vs_mlp": per_layer / (3 * d * f),
                "sparsity": self.sparsity, "keep": self.keep, "ahead": self.ahead, "mode": self.mode,
                "inference": "topk", "label_thresholds": self.thresholds,
                "recall": self.recall, "precision": self.precision,
                "mean_recall": _mean(self.recall), "mean_precision": _mean(self.precision),
                "training": self.training}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write DIR/predictors.json and DIR/predictors.safetensors atomically (a previous
        DIR is replaced only once both files are complete)."""
        from rarefy.formats.checkpoint import write_directory
        return write_directory(directory, self._write)

    def _write(self, tmp: Path) -> None:
        from safetensors.torch import save_file
        tensors = {}
        for i, net in enumerate(self.nets):
            for k, v in _tensors_of(net, i).items():
                tensors[k] = v.detach().float().cpu().contiguous()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "rarefy_format": FORMAT})
        with open(tmp / META_FILE, "w") as f:
            json.dump(self.metadata(), f, indent=1)


def _mean(v):
    return sum(v) / len(v) if v else None


def new_predictors(model, sparsity: float, rank: int | None = None, ahead: bool = False,
                   mode: str = "threshold", seed: int = 0, kind: str = DEFAULT_KIND,
                   svd_init: bool = True) -> Predictors:
    """Untrained predictors for `model`: kind linear randomly initialised; kind swiglu from a
    plain (unwhitened) truncated SVD of each layer's gate / up weights (no calibration data;
    with svd_init=False left random)."""
    sig = model_signature(model)
    d, f = sig["hidden_size"], sig["intermediate_size"]
    sparsity = check_sparsity(sparsity)
    kind = check_kind(kind)
    rank = check_rank(rank, d, f, kind)
    if mode not in MODES:
        raise RarefyError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        nets = nn.ModuleList(new_net(kind, d, rank, f) for _ in range(sig["num_layers"]))
    if kind == "swiglu" and svd_init:
        for i, net in enumerate(nets):
            wg, wu, bg, bu = mlp_gate_up_weights(_layers(model)[i].mlp, d, getattr(model, "dtype", None))
            net.set_factors(_low_rank(wg, bg, rank), _low_rank(wu, bu, rank))
    return Predictors(nets.eval().requires_grad_(False), sparsity, rank, bool(ahead), mode, sig, kind=kind)


def load_predictors(directory: str | os.PathLike, model=None) -> Predictors:
    """Read predictors written by Predictors.save; with `model`, refuse predictors trained on
    another model and move them to its device."""
    d = Path(directory)
    meta_path, weights_path = d / META_FILE, d / WEIGHTS_FILE
    if not d.is_dir():
        raise RarefyError(f"predictor directory not found: {d}")
    if not meta_path.is_file() or not weights_path.is_file():
        raise RarefyError(f"{d} is not a rarefy predictor directory (needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RarefyError(f"{meta_path} is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RarefyError(f"{d} is not a rarefy predictor directory ({meta_path} has another format)")
    if meta.get("version") not in READ_VERSIONS:
        raise RarefyError(f"{d}: predictor format version {meta.get('version')} is not supported "
                          f"(this rarefy reads versions {', '.join(map(str, READ_VERSIONS))})")
    kind = meta.get("kind", "linear") if meta["version"] >= 2 else "linear"
    if kind not in KINDS:
        raise RarefyError(f"{d}: unknown predictor kind {kind!r}")
    sig = meta["model"]
    if model is not None and sig != model_signature(model):
        raise RarefyError(f"the predictors in {d} were trained on another model ({sig}; this one is "
                          f"{model_signature(model)})")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise RarefyError(f"corrupt predictor weights {weights_path}: {e}") from None
    hidden, f, rank = sig["hidden_size"], sig["intermediate_size"], meta["rank"]
    nets = nn.ModuleList()
    for i in range(sig["num_layers"]):
        net = new_net(kind, hidden, rank, f)
        try:
            for k, v in _tensors_of(net, i).items():
                v.data.copy_(tensors[k])
        except (KeyError, RuntimeError):
            raise RarefyError(f"corrupt predictor weights {weights_path}: layer {i} is missing or "
                              "has the wrong shape") from None
        nets.append(net)
    nets = nets.eval().requires_grad_(False)
    if model is not None:
        nets = nets.to(next(model.parameters()).device)
    return Predictors(nets, float(meta["sparsity"]), rank, bool(meta["ahead"]), meta["mode"], sig,
                      meta.get("recall", []), meta.get("precision", []), meta.get("label_thresholds"),
                      meta.get("training", {}), kind)


# -- masks -------------------------------------------------------------------------------

def topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """bool mask of the `keep` largest entries of each row of scores [tokens, n]."""
    n = scores.shape[-1]
    if keep >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    idx = scores.topk(keep, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


@torch.no_grad()
def predictor_scores(predictors: Predictors, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
    """Scores [tokens, intermediate] (float32) of layer `layer_idx`'s predictor for input x: the
    logits (kind linear) or |silu(g^) * u^| (kind swiglu). The mask is their per-token top-k."""
    net = predictors.nets[layer_idx]
    w = next(net.parameters())
    if w.device != x.device:
        predictors.nets.to(x.device)
    return net(x.reshape(-1, x.shape[-1]).to(w.dtype)).float()


predictor_logits = predictor_scores  # the name before kind swiglu


@torch.no_grad()
def predict_mask(predictors: Predictors, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
    """Predicted active neurons of layer `layer_idx`: bool [tokens, intermediate], exactly
    `predictors.keep` True per token.

    x: [..., hidden], the normalised MLP input of layer ``predictors.source_layer(layer_idx)``
    (the layer itself, or with ahead=True the layer before it; layer 0 always its own)."""
    return topk_mask(predictor_scores(predictors, layer_idx, x), predictors.keep)


def mlp_activations(mlp, x: torch.Tensor) -> torch.Tensor:
    """|silu(gate(x)) * up(x)|, [tokens, intermediate] float32, for x [tokens, hidden]."""
    f = mlp.intermediate_size
    if getattr(mlp, "gate_up_proj", None) is not None:
        gate, up = mlp.gate_up_proj(x).split(f, dim=-1)
    else:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    return (F.silu(gate) * up).abs().float()


@torch.no_grad()
def mlp_gate_up_weights(mlp, hidden_size: int | None = None, dtype: torch.dtype | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_gate [f, d], W_up [f, d], b_gate [f], b_up [f]) float64, read by applying the
    projections to the identity (works with any linear module class, split or fused). The
    hidden size d defaults to down_proj's output size; dtype (the model's compute dtype, which
    may differ from the stored weights') to the first parameter's."""
    f = mlp.intermediate_size
    p = next(mlp.parameters())
    d = hidden_size or getattr(mlp.down_proj, "out_features", None)
    if getattr(mlp, "gate_up_proj", None) is not None:
        proj = lambda x: mlp.gate_up_proj(x).split(f, dim=-1)  # noqa: E731
    else:
        proj = lambda x: (mlp.gate_proj(x), mlp.up_proj(x))  # noqa: E731
    if d is None:
        raise RarefyError("cannot tell the MLP's hidden size")
    if dtype is None:
        dtype = p.dtype if p.is_floating_point() else torch.float32
    eye = torch.eye(d, device=p.device, dtype=dtype)
    g0, u0 = (t.double().cpu() for t in proj(torch.zeros(1, d, device=p.device, dtype=dtype)))
    g, u = (t.double().cpu() for t in proj(eye))
    return (g - g0).T.contiguous(), (u - u0).T.contiguous(), g0[0], u0[0]


def _low_rank(w: torch.Tensor, bias: torch.Tensor, rank: int, sqrt_cov: torch.Tensor | None = None,
              inv_sqrt_cov: torch.Tensor | None = None) -> tuple:
    """Rank-r factors (A [f, r], B [r, d], bias) of w [f, d]: a truncated SVD of w, or of
    w @ sqrt_cov (whitened; B then carries inv_sqrt_cov). float32 out, float64 inside."""
    m = w if sqrt_cov is None else w @ sqrt_cov
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, sv.numel())
    a, b = u[:, :r] * sv[:r], vh[:r]
    if inv_sqrt_cov is not None:
        b = b @ inv_sqrt_cov
    if r < rank:  # rank above min(f, d): pad with zeros
        a = torch.cat([a, a.new_zeros(a.shape[0], rank - r)], 1)
        b = torch.cat([b, b.new_zeros(rank - r, b.shape[1])], 0)
    return a.float(), b.float(), bias.float()


def _masked_mlp(model, mask_fn, counts):
    """Hooks: remember each MLP's input; zero down_proj's input outside mask_fn(i, inputs, act)."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def mlp_pre(i):
        def pre(mod, args):
            inputs[i] = args[0]
        return pre

    def down_pre(i):
        def pre(mod, args):
            act = args[0]
            mask = mask_fn(i, inputs, act.reshape(-1, act.shape[-1])).view(act.shape)
            c = counts[f"{i}.mlp_neurons"]
            c[0] += int(mask.numel() - mask.sum())
            c[1] += mask.numel()
            return (act * mask,) + tuple(args[1:])
        return pre

    for i, layer in enumerate(_layers(model)):
        counts[f"{i}.mlp_neurons"] = [0, 0]
        handles.append(layer.mlp.register_forward_pre_hook(mlp_pre(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_pre(i)))
    return handles, inputs


@contextmanager
def predicted_mlp_sparsity(model, predictors: Predictors):
    """While open, every MLP computes down(mask * silu(gate) * up) with the predicted mask
    (dense compute: the quality reference for sparse kernels). Yields a dict
    {"{layer}.mlp_neurons": [neurons zeroed, neurons in all]}, filled as the model runs
    (see neuron_sparsity)."""
    sig = model_signature(model)
    if sig != predictors.model:
        raise RarefyError(f"the predictors were trained on another model ({predictors.model}; this one "
                          f"is {sig})")
    counts: dict[str, list[int]] = {}

    def mask_fn(i, inputs, act):
        return predict_mask(predictors, i, inputs[predictors.source_layer(i)])

    handles, inputs = _masked_mlp(model, mask_fn, counts)
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
        inputs.clear()


@contextmanager
def oracle_mlp_sparsity(model, sparsity: float, thresholds: list[float] | None = None):
    """The mask a perfect predictor would give: per-token top-k of |silu(gate) * up| at neuron
    sparsity s, or with `thresholds` (one per layer) |silu(gate) * up| > t_l. Yields counts
    like predicted_mlp_sparsity."""
    sparsity = check_sparsity(sparsity)
    keep = kept_neurons(model.config.intermediate_size, sparsity)
    if thresholds is not None and len(thresholds) != len(_layers(model)):
        raise RarefyError(f"{len(thresholds)} thresholds for {len(_layers(model))} layers")
    counts: dict[str, list[int]] = {}

    def mask_fn(i, inputs, act):
        a = act.abs()
        return topk_mask(a, keep) if thresholds is None else a > thresholds[i]

    handles, inputs = _masked_mlp(model, mask_fn, counts)
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
        inputs.clear()


def neuron_sparsity(counts: dict[str, list[int]]) -> float:
    """Fraction of MLP neurons zeroed over all layers and tokens."""
    zero = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    return zero / total if total else 0.0
