"""`rarefy train-predictors`: neuron predictors (kind swiglu or Deja Vu's linear) for every MLP layer.

Writes OUT/predictors.json + OUT/predictors.safetensors (format: docs/activation-predictors.md);
`rarefy eval ppl --predictors OUT` applies them.
"""

from __future__ import annotations

from typing import Optional

import typer

from rarefy.cli_common import DeviceOpt, JsonOpt, ModelOpt, emit_json, load_for_cli, read_text_file, user_errors
from rarefy.errors import RarefyError


@user_errors
def train_predictors_cmd(
    calib: str = typer.Option(..., "--calib", help="calibration text file (UTF-8)"),
    out: str = typer.Option(..., "--out", help="directory for the predictors (must not exist or be empty)"),
    sparsity: float = typer.Option(0.5, "--sparsity", help="target MLP neuron sparsity in [0, 1)"),
    kind: str = typer.Option("swiglu", "--kind",
                             help="swiglu (low-rank gate / up estimates scored by |silu(g)*u|, whitened SVD) "
                                  "or linear (Deja Vu's low-rank logit, BCE-trained)"),
    rank: Optional[int] = typer.Option(None, "--rank",
                                       help="predictor rank (default: swiglu <= 15% of the MLP's weights, "
                                            "linear ~4% of the intermediate size; multiples of 8)"),
    ahead: bool = typer.Option(False, "--ahead", help="predict layer l+1's mask from layer l's MLP input"),
    mode: str = typer.Option("threshold", "--mode",
                             help="labels: threshold (|silu(gate)*up| above the per-layer s-quantile) or "
                                  "topk (each token's top-k)"),
    epochs: Optional[int] = typer.Option(None, "--epochs",
                                         help="passes over the training tokens per layer (default: linear 8; "
                                              "swiglu 0, i.e. BCE fine-tuning off)"),
    samples: int = typer.Option(32, "--samples", help="calibration windows (1/8 held out for recall/precision)"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per window"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    as_json: bool = JsonOpt,
):
    """Fit per-layer MLP neuron predictors (kind swiglu by default, or Deja Vu's linear) for a target
    neuron sparsity."""
    from rarefy.formats.checkpoint import check_destination
    from rarefy.sparsity.predictor_training import train_predictors
    from rarefy.sparsity.predictors import KINDS, MODES, check_rank, check_sparsity

    sparsity = check_sparsity(sparsity)
    if kind not in KINDS:
        raise RarefyError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if mode not in MODES:
        raise RarefyError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if rank is not None and rank < 1:
        raise RarefyError(f"--rank must be at least 1, got {rank}")
    if epochs is not None and epochs < (1 if kind == "linear" else 0):
        raise RarefyError(f"--epochs must be >= {1 if kind == 'linear' else 0} for --kind {kind}, got {epochs}")
    if samples < 2 or seq_len < 8:
        raise RarefyError("--samples must be >= 2 and --seq-len >= 8")
    check_destination(out, model, overwrite)
    body = read_text_file(calib)
    # dense weights: the predictors are fitted to the gate/up matrices, which GGUF blocks do not expose
    loaded = load_for_cli(model, device, "auto", sparse="off", gguf_blocks=False)
    cfg = loaded.model.config
    check_rank(rank, cfg.hidden_size, cfg.intermediate_size, kind)
    ids = loaded.tokenizer.encode(body, add_special_tokens=False)
    preds = train_predictors(loaded.model, ids, sparsity, rank=rank, ahead=ahead, mode=mode, epochs=epochs,
                             seq_len=seq_len, samples=samples, seed=seed, progress=not as_json, kind=kind)
    dest = preds.save(out)
    meta = preds.metadata()
    if as_json:
        emit_json({"out": str(dest), "kind": preds.kind, "cost_vs_mlp": meta["cost_vs_mlp"],
                   "epochs": preds.training["epochs"], "sparsity": preds.sparsity, "keep": preds.keep,
                   "rank": preds.rank,
                   "ahead": preds.ahead, "mode": preds.mode, "layers": preds.num_layers,
                   "recall": preds.recall, "precision": preds.precision,
                   "mean_recall": meta["mean_recall"], "mean_precision": meta["mean_precision"],
                   "held_out_tokens": preds.training["held_out_tokens"]})
        return
    typer.echo(f"held-out recall / precision of the top-{preds.keep} masks "
               f"({preds.training['held_out_tokens']} tokens not trained on):")
    for i, (r, p) in enumerate(zip(preds.recall, preds.precision)):
        typer.echo(f"  layer {i:3d}  recall {r:.3f}  precision {p:.3f}")
    typer.echo(f"  mean       recall {meta['mean_recall']:.3f}  precision {meta['mean_precision']:.3f}")
    typer.echo(f"{preds.kind} predictors for neuron sparsity {preds.sparsity:g} (rank {preds.rank}, "
               f"{meta['cost_vs_mlp']:.1%} of the MLP's weights, "
               f"{'one layer ahead' if preds.ahead else 'same layer'}, {preds.mode} labels) saved to {dest}")


def predictor_context(model, directory: str | None):
    """predicted_mlp_sparsity for --predictors DIR (yields the neuron counts), or a no-op context
    yielding None when DIR is None."""
    import contextlib

    from rarefy.sparsity.predictors import load_predictors, predicted_mlp_sparsity

    if directory is None:
        return contextlib.nullcontext(None)
    return predicted_mlp_sparsity(model, load_predictors(directory, model))
