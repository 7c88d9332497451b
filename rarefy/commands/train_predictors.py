"""`rarefy train-predictors`: Deja Vu-style neuron predictors for every MLP layer of a model.

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
    rank: Optional[int] = typer.Option(None, "--rank",
                                       help="predictor rank (default: ~4% of the intermediate size, "
                                            "a multiple of 8)"),
    ahead: bool = typer.Option(False, "--ahead", help="predict layer l+1's mask from layer l's MLP input"),
    mode: str = typer.Option("threshold", "--mode",
                             help="labels: threshold (|silu(gate)*up| above the per-layer s-quantile) or "
                                  "topk (each token's top-k)"),
    epochs: int = typer.Option(8, "--epochs", help="passes over the training tokens per layer"),
    samples: int = typer.Option(32, "--samples", help="calibration windows (1/8 held out for recall/precision)"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per window"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    as_json: bool = JsonOpt,
):
    """Train per-layer neuron predictors (Deja Vu style) for a target MLP neuron sparsity."""
    from rarefy.formats.checkpoint import check_destination
    from rarefy.sparsity.predictors import MODES, check_rank, check_sparsity, train_predictors

    sparsity = check_sparsity(sparsity)
    if mode not in MODES:
        raise RarefyError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if rank is not None and rank < 1:
        raise RarefyError(f"--rank must be at least 1, got {rank}")
    if epochs < 1 or samples < 2 or seq_len < 8:
        raise RarefyError("--epochs must be >= 1, --samples >= 2 and --seq-len >= 8")
    check_destination(out, model, overwrite)
    body = read_text_file(calib)
    loaded = load_for_cli(model, device, "auto", sparse="off")
    cfg = loaded.model.config
    check_rank(rank, cfg.hidden_size, cfg.intermediate_size)
    ids = loaded.tokenizer.encode(body, add_special_tokens=False)
    preds = train_predictors(loaded.model, ids, sparsity, rank=rank, ahead=ahead, mode=mode, epochs=epochs,
                             seq_len=seq_len, samples=samples, seed=seed, progress=not as_json)
    dest = preds.save(out)
    meta = preds.metadata()
    if as_json:
        emit_json({"out": str(dest), "sparsity": preds.sparsity, "keep": preds.keep, "rank": preds.rank,
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
    typer.echo(f"predictors for neuron sparsity {preds.sparsity:g} (rank {preds.rank}, "
               f"{'one layer ahead' if preds.ahead else 'same layer'}, {preds.mode} labels) saved to {dest}")


def predictor_context(model, directory: str | None):
    """predicted_mlp_sparsity for --predictors DIR (yields the neuron counts), or a no-op context
    yielding None when DIR is None."""
    import contextlib

    from rarefy.sparsity.predictors import load_predictors, predicted_mlp_sparsity

    if directory is None:
        return contextlib.nullcontext(None)
    return predicted_mlp_sparsity(model, load_predictors(directory, model))
