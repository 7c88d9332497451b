"""Calibration data and the layer-by-layer pruning pipeline (Wanda, SparseGPT).

Both papers prune one decoder layer at a time, feeding each layer the outputs
of the layers before it *after* those were pruned, so a layer's weights are
fitted to the inputs it will actually see:

1. embed every calibration sample: hidden [S, T, D] in the model dtype;
2. per decoder layer: run it (dense) on `hidden` in mini-batches while forward
   hooks accumulate each linear's input statistic in fp32 -- squared column
   norms for Wanda, X^T X for SparseGPT -- without keeping any activations;
   the dense outputs go to `out`;
3. prune the layer's linears from those statistics;
4. rerun the pruned layer on `hidden`; its outputs replace `out` (and give the
   layer's relative output error against the dense outputs); `out` becomes the
   next layer's `hidden`.

Within a layer all statistics come from the dense layer (as in Wanda and in
SparseGPT's default mode): o_proj's inputs are those of unpruned q/k/v.
Linears that read the same tensor (q/k/v, gate/up) share one statistic.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from rarefy.errors import RarefyError
from rarefy.sparsity.masks import Pattern
from rarefy.sparsity.prune import PruneReport, Target, prune_group


def calibration_batches(tokenizer, path: str | os.PathLike, samples: int, seq_len: int,
                        seed: int = 0) -> torch.Tensor:
    """`samples` random windows of `seq_len` tokens from the tokenized file: [samples, seq_len] int64.

    The whole file is tokenized once without BOS (as `eval ppl` does) and the
    window starts are drawn uniformly with torch.Generator(seed), so a seed
    fixes the data. Windows may overlap. Raises RarefyError if the file is
    missing, unreadable, empty or shorter than `seq_len` tokens.
    """
    if not os.path.isfile(path):
        raise RarefyError(f"calibration file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise RarefyError(f"cannot read calibration file {path}: {e}") from None
    if not text.strip():
        raise RarefyError(f"calibration file {path} is empty")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < seq_len:
        raise RarefyError(f"calibration file {path} has {len(ids)} tokens, fewer than the "
                          f"calibration length {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (samples,), generator=gen)
    tokens = torch.tensor(ids, dtype=torch.long)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


class StatsCollector:
    """Forward hooks on a layer's target linears that accumulate fp32 input statistics.

    kind: "norms" -> stats[owner] [in] = sum over tokens of x_j^2 (Wanda);
          "hessian" -> stats[owner] [in, in] = X^T X (SparseGPT); None -> no hooks.
    Linears called on the very same tensor object within one forward (q/k/v)
    share the statistic of the first one called (`owner`).
    """

    def __init__(self, targets: list[Target], kind: str | None):
        self.targets, self.kind = targets, kind
        self.owner: dict[str, str] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs of the current forward
        self._handles = []

    def __enter__(self) -> "StatsCollector":
        if self.kind is not None:
            for t in self.targets:
                self._handles.append(t.module.register_forward_hook(self._hook(t.name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def end_forward(self) -> None:
        self._seen.clear()  # drop the references to this forward's inputs

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            same = next((k for t, k in self._seen if t is x), None)
            if name in self.owner and self.owner[name] != name:
                if same != self.owner[name]:  # sharing must hold in every forward
                    raise RuntimeError(f"{name} no longer shares its input with {self.owner[name]}")
                return
            if same is not None:  # first forward: share the earlier linear's statistic
                self.owner[name] = same
                return
            self.owner[name] = name
            self._seen.append((x, name))
            xf = x.reshape(-1, x.shape[-1]).float()
            if name not in self.stats:
                n = xf.shape[1]
                shape = (n,) if self.kind == "norms" else (n, n)
                self.stats[name] = torch.zeros(shape, dtype=torch.float32, device=xf.device)
                self.tokens[name] = 0
            if self.kind == "norms":
                self.stats[name] += xf.square().sum(0)
            else:
                self.stats[name].addmm_(xf.T, xf)
            self.tokens[name] += xf.shape[0]
        return hook

    def groups(self) -> list[tuple[str, list[Target]]]:
        """(owner, targets sharing its statistic) in first-call order."""
        out: dict[str, list[Target]] = {}
        for t in self.targets:
            out.setdefault(self.owner[t.name], []).append(t)
        return list(out.items())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prune_decoder_layer(layer, targets: list[Target], hidden: torch.Tensor, out: torch.Tensor,
                        rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor], method: str,
                        pattern: Pattern, report: PruneReport, dampening: float = 0.01,
                        blocksize: int = 128, batch_size: int = 8) -> float:
    """Prune one DecoderLayer in place from its calibration inputs.

    hidden: [S, T, D] inputs (model dtype); out: [S, T, D] buffer that receives
    the pruned layer's outputs; rope: (cos, sin, positions) for `batch_size`
    rows, [b, T, head_dim] x2 and [b, T] int64. Appends MatrixResults to
    `report`, adds to its forward/solve seconds and returns the relative output
    error ||Y_pruned - Y_dense||_F / ||Y_dense||_F (0.0 without targets).
    """
    cos, sin, pos = rope
    dev = hidden.device
    kind = {"wanda": "norms", "sparsegpt": "hessian"}.get(method)

    def run(start: int) -> torch.Tensor:
        h = hidden[start:start + batch_size]
        b = h.shape[0]
        return layer(h, cos[:b], sin[:b], pos[:b], None, None, None)

    _sync(dev)
    t0 = time.perf_counter()
    with StatsCollector(targets, kind) as col:
        for s in range(0, hidden.shape[0], batch_size):
            out[s:s + batch_size] = run(s)
            col.end_forward()
    _sync(dev)
    t1 = time.perf_counter()
    report.seconds_forward += t1 - t0
    if not targets:
        return 0.0
    for owner, group in (col.groups() if kind else [(t.name, [t]) for t in targets]):
        report.matrices += prune_group(method, group, col.stats.get(owner), col.tokens.get(owner, 0),
                                       pattern, dampening, blocksize, report.warnings)
    _sync(dev)
    t2 = time.perf_counter()
    report.seconds_solve += t2 - t1
    num = den = 0.0
    for s in range(0, hidden.shape[0], batch_size):
        y = run(s)
        dense = out[s:s + batch_size].float()
        num += (y.float() - dense).square().sum().item()
        den += dense.square().sum().item()
        out[s:s + batch_size] = y
    _sync(dev)
    report.seconds_forward += time.perf_counter() - t2
    return math.sqrt(num / den) if den > 0 else 0.0


@torch.no_grad()
def prune_layerwise(model, batches: torch.Tensor, method: str, targets: list[Target],
                    pattern: Pattern, report: PruneReport, dampening: float = 0.01,
                    blocksize: int = 128, batch_size: int = 8, progress: bool = True) -> None:
    """Run the pipeline above over every decoder layer of `model` (a DecoderLM, in place).

    batches: [S, T] int64 calibration tokens (any device). Fills
    report.matrices, report.layer_errors and the timing fields.
    """
    dev, dtype = model.device, model.dtype
    S, T = batches.shape
    _sync(dev)
    t0 = time.perf_counter()
    emb = model.model.embed_tokens
    hidden = torch.empty(S, T, emb.weight.shape[1], dtype=dtype, device=dev)
    for s in range(0, S, batch_size):
        hidden[s:s + batch_size] = emb(batches[s:s + batch_size].to(dev))
    out = torch.empty_like(hidden)
    pos = torch.arange(T, device=dev).expand(min(batch_size, S), T)
    cos, sin = model.rotary(pos, dtype)
    _sync(dev)
    report.seconds_forward += time.perf_counter() - t0
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    layers = model.model.layers
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(layers), desc=f"pruning ({method})", unit="layer", file=sys.stderr)
    report.layer_errors = []
    try:
        for i, layer in enumerate(layers):
            err = prune_decoder_layer(layer, by_layer.get(i, []), hidden, out, (cos, sin, pos),
                                      method, pattern, report, dampening, blocksize, batch_size)
            report.layer_errors.append(err)
            hidden, out = out, hidden  # this layer's outputs are the next layer's inputs
            if bar is not None:
                bar.set_postfix(err=f"{err:.3f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
