"""Training neuron predictors: calibration inputs, labels, the whitened SwiGLU initialisation,
class-weighted BCE fitting, and recall / precision on held-out windows.

The predictors themselves (networks, file format, masks and the hooks that apply them) are in
rarefy.sparsity.predictors; the method is described in docs/activation-predictors.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rarefy.errors import RarefyError
from rarefy.sparsity.predictors import (_ROWS, DEFAULT_KIND, HOLDOUT_FRACTION, MODES, SWIGLU_DEFAULT_EPOCHS,
                                        LowRankPredictor, Predictors, SwiGLUPredictor, _layers, _low_rank,
                                        check_kind, check_rank, check_sparsity, kept_neurons, mlp_activations,
                                        mlp_gate_up_weights, model_signature, new_predictors, topk_mask)

# -- calibration data --------------------------------------------------------------------

@dataclass
class MLPInputs:
    """Normalised MLP inputs of calibration windows through the dense model, per layer:
    train[l] / held[l]: float32 [tokens, hidden]. held windows are disjoint from train ones."""

    train: list[torch.Tensor]
    held: list[torch.Tensor]
    dtype: torch.dtype  # the model's compute dtype (inputs are cast back for gate/up)
    windows: tuple[int, int]  # (train windows, held-out windows)
    seq_len: int
    cache_activations: bool = False
    _acts: dict = field(default_factory=dict)

    def activations(self, model, layer: int, split: str) -> torch.Tensor:
        """|silu(gate) * up| of layer `layer` for the train or held inputs, [tokens, f] float32."""
        key = (layer, split)
        if key in self._acts:
            return self._acts[key].float()
        xs = (self.train if split == "train" else self.held)[layer]
        mlp = _layers(model)[layer].mlp
        dev = next(model.parameters()).device
        with torch.no_grad():
            a = torch.cat([mlp_activations(mlp, xs[r:r + _ROWS].to(dev, self.dtype)).cpu()
                           for r in range(0, xs.shape[0], _ROWS)])
        if self.cache_activations:
            self._acts[key] = a.half()
        return a


@torch.no_grad()
def collect_mlp_inputs(model, token_ids: list[int], seq_len: int = 512, samples: int = 32, seed: int = 0,
                       progress: bool = False, cache_activations: bool = False) -> MLPInputs:
    """Run `samples` non-overlapping windows of `seq_len` tokens (chosen at random with `seed`)
    through the dense model and keep every layer's MLP input. About 1/8 of the windows (at
    least one) are held out for recall / precision."""
    if seq_len < 2:
        raise RarefyError("seq_len must be at least 2")
    if seq_len > model.config.max_position_embeddings:
        raise RarefyError(f"seq_len {seq_len} exceeds the model's context of "
                          f"{model.config.max_position_embeddings} tokens")
    if samples < 2:
        raise RarefyError("need at least 2 calibration windows (one is held out)")
    n_chunks = len(token_ids) // seq_len
    if n_chunks < 2:
        raise RarefyError(f"calibration text has {len(token_ids)} tokens; need at least two windows "
                          f"of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_chunks, generator=gen)[:samples].tolist()
    n_held = max(1, round(len(chosen) * HOLDOUT_FRACTION))
    held_w, train_w = chosen[:n_held], chosen[n_held:]
    layers = _layers(model)
    bufs = {"train": [[] for _ in layers], "held": [[] for _ in layers]}
    dest = bufs["train"]

    def hook(i):
        def pre(mod, args):
            x = args[0]
            dest[i].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
        return pre

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    work = [("held", c) for c in held_w] + [("train", c) for c in train_w]
    it = work
    if progress:
        from tqdm import tqdm
        it = tqdm(work, desc="collecting", unit="window", leave=False)
    try:
        for split, c in it:
            dest = bufs[split]
            model(torch.tensor([token_ids[c * seq_len:(c + 1) * seq_len]], device=device))
    finally:
        for h in handles:
            h.remove()
    return MLPInputs([torch.cat(b) for b in bufs["train"]], [torch.cat(b) for b in bufs["held"]],
                     model.dtype, (len(train_w), len(held_w)), seq_len, cache_activations)


# -- labels and training -----------------------------------------------------------------

def label_threshold(acts: torch.Tensor, sparsity: float) -> float:
    """The s-quantile of acts (all tokens and neurons): a > t leaves a fraction s inactive."""
    flat = acts.reshape(-1)
    n0 = round(sparsity * flat.numel())
    if n0 <= 0:
        return float("-inf")
    return float(flat.kthvalue(n0).values)


def make_labels(acts: torch.Tensor, sparsity: float, mode: str, threshold: float | None = None) -> torch.Tensor:
    """Active neurons, bool like acts: acts > threshold (mode threshold), or each token's
    top-k (mode topk, k = kept_neurons)."""
    if mode == "topk":
        return topk_mask(acts, kept_neurons(acts.shape[-1], sparsity))
    if threshold is None:
        threshold = label_threshold(acts, sparsity)
    return acts > threshold


def recall_precision(pred: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    tp = int((pred & labels).sum())
    pos, npred = int(labels.sum()), int(pred.sum())
    return (tp / pos if pos else 1.0), (tp / npred if npred else 1.0)


def _bce_loop(net: nn.Module, z: torch.Tensor, labels: torch.Tensor, logit, epochs: int, lr: float,
              batch_size: int, gen: torch.Generator) -> float:
    """Class-weighted BCE of ``logit(z_batch)`` against the labels, Adam + one-cycle schedule;
    returns the last epoch's mean loss and leaves net frozen in eval mode."""
    pos = labels.float().mean().item()
    pos_weight = torch.tensor((1 - pos) / pos if 0 < pos < 1 else 1.0)
    net.requires_grad_(True).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    n = z.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    last = float("nan")
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total, seen = 0.0, 0
            for b in range(0, n, batch_size):
                idx = perm[b:b + batch_size]
                loss = F.binary_cross_entropy_with_logits(logit(z[idx]), labels[idx].float(), pos_weight=pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                seen += len(idx)
            last = total / seen
    net.requires_grad_(False).eval()
    return last


def _fit_layer(net: LowRankPredictor, z: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
               batch_size: int, gen: torch.Generator) -> float:
    """Train `net` on inputs z [N, hidden] and labels [N, f] with class-weighted BCE; the
    per-channel standardisation of z used in training is folded into net's weights."""
    if epochs <= 0:
        return float("nan")
    mean, std = z.mean(0), z.std(0).clamp_min(1e-6)
    last = _bce_loop(net, z, labels, lambda zb: net((zb - mean) / std), epochs, lr, batch_size, gen)
    with torch.no_grad():  # x -> (x - mean) / std folded into inp.weight and out.bias
        w = net.inp.weight / std
        net.out.bias -= net.out.weight @ (w @ mean)
        net.inp.weight.copy_(w)
    return last


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], centred covariance [d, d]) of rows of x, float64."""
    x = x.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / max(1, x.shape[0])


def _sqrt_and_inv(cov: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    e, v = torch.linalg.eigh(cov)
    e = e.clamp_min(floor * float(e.max().clamp_min(1e-30)))
    return (v * e.sqrt()) @ v.T, (v / e.sqrt()) @ v.T


def whitened_swiglu_init(net: SwiGLUPredictor, mlp, x: torch.Tensor, z: torch.Tensor | None = None,
                         dtype: torch.dtype | None = None) -> None:
    """Set net's factors to the rank-r maps z -> gate(x), z -> up(x) of least squared error on the
    calibration rows: x [N, hidden] the layer's own MLP inputs, z the predictor's inputs (None:
    z = x, then this is the truncated SVD of W whitened by the inputs' covariance; otherwise a
    reduced-rank regression of W x on z)."""
    rank, hidden = net.gate_b.weight.shape
    wg, wu, bg, bu = mlp_gate_up_weights(mlp, hidden, dtype)
    mu_x, cov_x = _moments(x)
    if z is None:
        mu_z, cov_z, cross = mu_x, cov_x, None
    else:
        mu_z, cov_z = _moments(z)
        n = x.shape[0]
        cross = (x.double() - mu_x).T @ (z.double() - mu_z) / max(1, n)  # E[(x - mu_x)(z - mu_z)^T]
    sq, isq = _sqrt_and_inv(cov_z)
    if cross is not None:
        ridge = 1e-6 * float(cov_z.diagonal().mean()) * torch.eye(cov_z.shape[0], dtype=cov_z.dtype)
        reg = cross @ torch.linalg.inv(cov_z + ridge)  # x - mu_x ~ reg (z - mu_z)
    factors = []
    for w, b in ((wg, bg), (wu, bu)):
        w_eff = w if cross is None else w @ reg
        a, bb, _ = _low_rank(w_eff, b, rank, sq, isq)
        # y = w x + b ~ a bb (z - mu_z) + w mu_x + b
        bias = (b + w @ mu_x - a.double() @ (bb.double() @ mu_z)).float()
        factors.append((a, bb, bias))
    net.set_factors(*factors)


def _finetune_swiglu(net: SwiGLUPredictor, z: torch.Tensor, labels: torch.Tensor, threshold: float,
                     epochs: int, lr: float, batch_size: int, gen: torch.Generator) -> float:
    """Class-weighted BCE on the logit tau * (log score - log threshold), Adam + one-cycle,
    all factors, biases and tau trained."""
    if epochs <= 0 or not (math.isfinite(threshold) and threshold > 0):
        return float("nan")
    log_t = math.log(threshold)
    return _bce_loop(net, z, labels, lambda zb: net.temperature * (net(zb).clamp_min(1e-30).log() - log_t),
                     epochs, lr, batch_size, gen)


def default_epochs(kind: str) -> int:
    """Training epochs of kind linear; fine-tuning epochs of kind swiglu (0: the whitened SVD
    as is, see docs/results/activation-predictors.md)."""
    return 8 if kind == "linear" else SWIGLU_DEFAULT_EPOCHS


def default_lr(kind: str) -> float:
    return 3e-3 if kind == "linear" else 1e-3


def fit_predictors(model, data: MLPInputs, sparsity: float, rank: int | None = None, ahead: bool = False,
                   mode: str = "threshold", epochs: int | None = None, lr: float | None = None,
                   batch_size: int = 256, seed: int = 0, progress: bool = False,
                   kind: str = DEFAULT_KIND) -> Predictors:
    """Fit predictors on collected MLP inputs (see collect_mlp_inputs) and measure recall /
    precision of their top-k masks on the held-out windows. kind swiglu: whitened truncated SVD
    of gate / up, then `epochs` of BCE fine-tuning (default 0); kind linear: `epochs` of BCE
    training (default 8) from random initialisation."""
    kind = check_kind(kind)
    epochs = default_epochs(kind) if epochs is None else int(epochs)
    lr = default_lr(kind) if lr is None else float(lr)
    if epochs < 0:
        raise RarefyError(f"epochs must be >= 0, got {epochs}")
    preds = new_predictors(model, sparsity, rank, ahead, mode, seed, kind=kind, svd_init=False)
    gen = torch.Generator().manual_seed(seed)
    n_layers = preds.num_layers
    thresholds = [] if mode == "threshold" else None
    it = range(n_layers)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="fitting predictors", unit="layer")
    losses = []
    for i in it:
        src = preds.source_layer(i)
        acts = data.activations(model, i, "train")
        t = label_threshold(acts, preds.sparsity)
        need_labels = kind == "linear" or epochs > 0
        labels = make_labels(acts, preds.sparsity, mode, t) if need_labels else None
        del acts
        net = preds.nets[i]
        if kind == "swiglu":
            mlp = _layers(model)[i].mlp
            whitened_swiglu_init(net, mlp, data.train[i], None if src == i else data.train[src], data.dtype)
            losses.append(_finetune_swiglu(net, data.train[src], labels, t, epochs, lr, batch_size, gen)
                          if need_labels else float("nan"))
        else:
            losses.append(_fit_layer(net, data.train[src], labels, epochs, lr, batch_size, gen))
        del labels
        held = make_labels(data.activations(model, i, "held"), preds.sparsity, mode,
                           t if mode == "threshold" else None)
        with torch.no_grad():
            pred = topk_mask(net(data.held[src]), preds.keep)
        r, p = recall_precision(pred, held)
        preds.recall.append(r)
        preds.precision.append(p)
        if thresholds is not None:
            thresholds.append(t)
    preds.thresholds = thresholds
    loss = "bce, positives weighted by negatives/positives"
    if kind == "swiglu":
        loss = (("reduced-rank regression of gate / up on the previous layer's input" if ahead else
                 "truncated SVD of gate / up whitened by the inputs' covariance") +
                (f", then {epochs} epochs of {loss} on tau * (log score - log t)" if epochs else ""))
    preds.training = {"kind": kind, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                      "loss": loss,
                      "train_tokens": int(data.train[0].shape[0]), "held_out_tokens": int(data.held[0].shape[0]),
                      "seq_len": data.seq_len, "final_loss": losses}
    preds.nets.to(next(model.parameters()).device)
    return preds


def train_predictors(model, token_ids: list[int], sparsity: float, rank: int | None = None,
                     ahead: bool = False, mode: str = "threshold", epochs: int | None = None, seq_len: int = 512,
                     samples: int = 32, seed: int = 0, progress: bool = False, lr: float | None = None,
                     batch_size: int = 256, kind: str = DEFAULT_KIND) -> Predictors:
    """Collect calibration MLP inputs from `token_ids` and train one predictor per MLP layer
    for neuron sparsity `sparsity` (see the module docstring)."""
    sparsity = check_sparsity(sparsity)
    kind = check_kind(kind)
    sig = model_signature(model)
    check_rank(rank, sig["hidden_size"], sig["intermediate_size"], kind)
    if mode not in MODES:
        raise RarefyError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if epochs is not None and epochs < 0:
        raise RarefyError(f"epochs must be >= 0, got {epochs}")
    data = collect_mlp_inputs(model, token_ids, seq_len, samples, seed, progress)
    return fit_predictors(model, data, sparsity, rank, ahead, mode, epochs, lr, batch_size, seed, progress,
                          kind=kind)
