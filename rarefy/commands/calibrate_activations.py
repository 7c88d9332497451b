"""`rarefy calibrate-activations`: per-layer activation thresholds (TEAL-style) for a model.

Writes OUT/activation_thresholds.json (format: docs/activation-sparsity.md); `rarefy generate`
and `rarefy eval ppl` apply it with `--activation-sparsity OUT [--activation-level S]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rarefy.cli_common import DeviceOpt, JsonOpt, ModelOpt, emit_json, load_for_cli, read_text_file, user_errors
from rarefy.errors import RarefyError

FILE = "activation_thresholds.json"
MODES = ("threshold",)


@user_errors
def calibrate_activations(
    calib: str = typer.Option(..., "--calib", help="calibration text file (UTF-8)"),
    out: str = typer.Option(..., "--out", help="directory for the thresholds (must not exist or be empty)"),
    sparsity: str = typer.Option("0.25,0.4,0.5", "--sparsity", help="target sparsities in [0, 1), comma list"),
    mode: str = typer.Option("threshold", "--mode", help="threshold: |x| < t -> 0, t per layer and input"),
    samples: int = typer.Option(16, "--samples", help="calibration windows"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per window"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    as_json: bool = JsonOpt,
):
    """Calibrate per-layer activation thresholds for the given sparsities."""
    from rarefy.formats.checkpoint import check_destination, write_directory
    from rarefy.sparsity.activation import calibrate_thresholds, check_sparsities, save_thresholds

    if mode not in MODES:
        raise RarefyError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        levels = check_sparsities(s for s in sparsity.split(",") if s.strip())
    except ValueError:
        raise RarefyError(f"--sparsity takes numbers, got {sparsity!r}") from None
    if samples < 1 or seq_len < 8:
        raise RarefyError("--samples must be >= 1 and --seq-len >= 8")
    check_destination(out, model, overwrite)
    body = read_text_file(calib)
    loaded = load_for_cli(model, device, "auto", sparse="off")
    ids = loaded.tokenizer.encode(body, add_special_tokens=False)
    th = calibrate_thresholds(loaded.model, ids, levels, seq_len=seq_len, samples=samples, seed=seed,
                              progress=not as_json)
    dest = write_directory(out, lambda tmp: save_thresholds(th, tmp / FILE))
    if as_json:
        emit_json({"out": str(dest), "sparsities": levels, "inputs": len(th.for_sparsity(levels[0]))})
    else:
        typer.echo(f"thresholds for {', '.join(f'{s:g}' for s in levels)} over "
                   f"{len(th.for_sparsity(levels[0]))} projection inputs saved to {dest / FILE}")


def activation_context(model, directory: str | None, level: float | None):
    """The sparsify_activations context for --activation-sparsity DIR [--activation-level S],
    or a no-op context when DIR is None."""
    import contextlib

    from rarefy.sparsity.activation import load_thresholds, sparsify_activations

    if directory is None:
        if level is not None:
            raise RarefyError("--activation-level needs --activation-sparsity DIR")
        return contextlib.nullcontext()
    path = Path(directory) / FILE if Path(directory).is_dir() else Path(directory)
    th = load_thresholds(path, model)
    if level is None:
        if len(th.sparsities) != 1:
            raise RarefyError(f"{path} holds several sparsities ({', '.join(f'{s:g}' for s in th.sparsities)}): "
                              "choose one with --activation-level")
        level = th.sparsities[0]
    return sparsify_activations(model, th.for_sparsity(level))
