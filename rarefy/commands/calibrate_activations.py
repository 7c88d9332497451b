"""`rarefy calibrate-activations`: per-layer activation sparsity (TEAL-style) for a model.

Writes OUT/activation_thresholds.json (format: docs/activation-sparsity.md), and with
`--rotate vo` the rotation beside it (OUT/activation_rotation.safetensors, format 4);
`rarefy generate` and `rarefy eval ppl` apply both with `--activation-sparsity OUT
[--activation-level S]`. Activation sparsity works on dense weights: GGUF files load dense
here and wherever --activation-sparsity is given (not as GGUF blocks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rarefy.cli_common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    emit_json,
    load_for_cli,
    read_text_file,
    user_errors,
)
from rarefy.errors import RarefyError

FILE = "activation_thresholds.json"
MODES = ("threshold", "topk", "adaptive")
CRITERIA = ("magnitude", "weighted")
MEASURE_WINDOWS = 4
ROTATIONS = ("vo",)  # what the calibration file carries (rarefy.sparsity.activation_rotation)
ROTATION_SEED = 7  # added to --seed: the windows benchmarks/activation_quality.py rotates from


@user_errors
def calibrate_activations(
    calib: str = typer.Option(..., "--calib", help="calibration text file (UTF-8)"),
    out: str = typer.Option(..., "--out", help="directory for the thresholds (must not exist or be empty)"),
    sparsity: str = typer.Option("0.25,0.4,0.5", "--sparsity", help="target sparsities in [0, 1), comma list"),
    mode: str = typer.Option("threshold", "--mode",
                             help="threshold: |x| < t -> 0, t per layer and input; topk: keep the k largest |x| "
                                  "of each token; adaptive: k per token from the entropy of its |x|"),
    greedy: bool = typer.Option(False, "--greedy", help="greedy per-layer allocation across the four inputs "
                                                        "(TEAL) instead of the same sparsity for every input"),
    criterion: str = typer.Option("magnitude", "--criterion",
                                  help="magnitude: rank entries by |x| (TEAL); weighted: by |x_i| times the norm of "
                                       "the weight column reading channel i (WINA)"),
    sequential: bool = typer.Option(False, "--sequential",
                                    help="derive each input's threshold from activations already sparsified "
                                         "upstream (one extra pass per level) instead of dense ones"),
    global_alloc: bool = typer.Option(False, "--global",
                                      help="allocate sparsity across all layers and inputs from each input's "
                                           "output-KL sensitivity curve (instead of --greedy's per-layer search)"),
    global_method: str = typer.Option("fisher", "--global-method",
                                      help="--global's sensitivity curves: fisher (second-order estimate from a few "
                                           "backward passes, about a minute) or kl (measured, one partial forward "
                                           "pass per input and grid point)"),
    global_refine: int = typer.Option(0, "--global-refine",
                                      help="re-estimate --global's curves N times, each level at its own operating "
                                           "point (every input sparsified by the previous allocation); fisher only"),
    global_match: int = typer.Option(0, "--global-match",
                                      help="rounds moving each --global level's nominal average until the sparsity "
                                           "measured on calibration windows, upstream inputs sparsified, is the "
                                           "target (thresholds from dense statistics otherwise overshoot or "
                                           "undershoot it); 3 is plenty"),
    global_tokens: int = typer.Option(0, "--global-tokens",
                                      help="tokens of the first calibration window that --global's sensitivity "
                                           "curves run on (0: the whole window; 128 keeps --global-method kl "
                                           "affordable)"),
    greedy_step: float = typer.Option(0.05, "--greedy-step", help="sparsity step of the greedy search"),
    greedy_windows: int = typer.Option(2, "--greedy-windows", help="calibration windows the greedy search uses"),
    greedy_tokens: int = typer.Option(256, "--greedy-tokens", help="tokens the greedy search measures error on"),
    greedy_upstream: str = typer.Option("dense", "--greedy-upstream",
                                        help="dense: search every layer on its dense inputs (one search for all "
                                             "levels); sparse: one search per level, on inputs with the earlier "
                                             "layers sparsified"),
    rotate: Optional[str] = typer.Option(None, "--rotate",
                                         help="vo: rotate each key/value head's values (pca basis of the "
                                              "calibration text) and fold the rotation into v_proj / o_proj "
                                              "before calibrating: no run-time cost, better quality at 40%; "
                                              "saved beside the thresholds (file format 4)"),
    rotate_basis: str = typer.Option("pca", "--rotate-basis",
                                     help="pca (eigenvectors of the o_proj input's second moment per head "
                                          "group) or svd (of o_proj's columns)"),
    rotate_windows: int = typer.Option(8, "--rotate-windows", help="calibration windows the pca basis uses"),
    samples: int = typer.Option(16, "--samples", help="calibration windows"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per window"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    as_json: bool = JsonOpt,
):
    """Calibrate per-layer activation sparsity (threshold, top-k or adaptive) for the given sparsities."""
    from rarefy.formats.checkpoint import check_destination, write_directory
    from rarefy.sparsity.activation import (
        calibrate_thresholds,
        check_sparsities,
        measure_levels,
        save_thresholds,
    )
    from rarefy.sparsity.activation_greedy import check_greedy_options

    if mode not in MODES:
        raise RarefyError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if criterion not in CRITERIA:
        raise RarefyError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    try:
        levels = check_sparsities(s for s in sparsity.split(",") if s.strip())
    except ValueError:
        raise RarefyError(f"--sparsity takes numbers, got {sparsity!r}") from None
    if samples < 1 or seq_len < 8:
        raise RarefyError("--samples must be >= 1 and --seq-len >= 8")
    if greedy and global_alloc:
        raise RarefyError("choose one of --greedy and --global")
    if greedy:
        check_greedy_options(levels, greedy_step, greedy_windows, greedy_tokens, greedy_upstream)
    if global_alloc:
        from rarefy.sparsity.activation_global import DEFAULT_GRID, check_global_options
        check_global_options(levels, DEFAULT_GRID)
        if global_refine < 0 or (global_refine and global_method != "fisher"):
            raise RarefyError("--global-refine takes N >= 0, with --global-method fisher")
        if global_method not in ("fisher", "kl"):
            raise RarefyError(f"--global-method must be fisher or kl, got {global_method!r}")
        if global_match < 0:
            raise RarefyError(f"--global-match takes N >= 0, got {global_match}")
        if global_tokens == 1 or global_tokens < 0:
            raise RarefyError(f"--global-tokens must be 0 (whole window) or >= 2, got {global_tokens}")
    if rotate is not None:
        if rotate not in ROTATIONS:
            raise RarefyError(f"--rotate takes {', '.join(ROTATIONS)} (the rotation a calibration file carries), "
                              f"got {rotate!r}")
        if rotate_basis not in ("pca", "svd"):
            raise RarefyError(f"--rotate-basis must be pca or svd, got {rotate_basis!r}")
        if rotate_windows < 1:
            raise RarefyError(f"--rotate-windows must be >= 1, got {rotate_windows}")
    check_destination(out, model, overwrite)
    body = read_text_file(calib)
    loaded = load_for_cli(model, device, "auto", sparse="off", gguf_blocks=False)
    ids = loaded.tokenizer.encode(body, add_special_tokens=False)
    rotation = _rotate(loaded.model, ids, rotate, rotate_basis, rotate_windows, seq_len, seed) if rotate else None
    th = calibrate_thresholds(loaded.model, ids, levels, seq_len=seq_len, samples=samples, seed=seed,
                              progress=not as_json, mode=mode, greedy=greedy, greedy_step=greedy_step,
                              greedy_windows=greedy_windows, greedy_tokens=greedy_tokens, criterion=criterion,
                              sequential=sequential, greedy_upstream=greedy_upstream,
                              allocation="global" if global_alloc else None, global_tokens=global_tokens or None,
                              global_method=global_method, global_refine=global_refine,
                              global_match=global_match)
    if rotation is not None:
        th.rotation, th.rotations = rotation
    # the sparsity actually reached, over all inputs, on calibration windows
    th.measured = measure_levels(loaded.model, ids, th, seq_len=seq_len, windows=min(samples, MEASURE_WINDOWS),
                                 seed=seed + 1)
    dest = write_directory(out, lambda tmp: save_thresholds(th, tmp / FILE))
    n_inputs = len(th.params[next(iter(th.params))])
    if as_json:
        emit_json({"out": str(dest), "mode": mode, "criterion": criterion, "allocation": th.allocation,
                   "sequential": sequential, "rotation": rotate, "sparsities": levels,
                   "inputs": n_inputs, "measured": th.measured})
    else:
        typer.echo(f"{mode} mode, {criterion} criterion, {th.allocation} allocation"
                   f"{', sequential' if sequential else ''}{f', {rotate} rotation' if rotate else ''}, "
                   f"{n_inputs} projection inputs; sparsity reached on "
                   f"{min(samples, MEASURE_WINDOWS)} calibration windows (weighted by gated weights / by entries):")
        for s in levels:
            m = th.measured[f"{s:.4f}"]
            typer.echo(f"  {s:g}: {m['weighted']:.3f} / {m['entries']:.3f}")
        typer.echo(f"saved to {dest / FILE}" + (f" (rotation: {dest / th.rotation['file']})" if rotate else ""))


def _rotate(model, ids, kind, basis, windows, seq_len, seed):
    """Fold the v/o rotation into `model` (pca basis from `windows` random windows of the
    calibration text); returns (description, matrices) for the file."""
    import torch

    from rarefy.sparsity.activation_rotation import (
        apply_vo_rotations,
        compute_vo_rotations,
    )

    span = min(seq_len, len(ids))
    if span < 2:
        raise RarefyError("the calibration text is too short to rotate from")
    gen = torch.Generator().manual_seed(seed + ROTATION_SEED)
    starts = torch.randint(0, max(1, len(ids) - span), (windows,), generator=gen).tolist()
    with torch.no_grad():
        mats = compute_vo_rotations(model, [ids[s:s + span] for s in starts], basis)
    apply_vo_rotations(model, mats)
    return {"kind": kind, "basis": basis, "windows": windows if basis == "pca" else 0, "seq_len": span,
            "seed": seed + ROTATION_SEED}, mats


def load_activation_level(model, directory: str, level: float | None):
    """(calibration, level) for --activation-sparsity DIR [--activation-level S]. A file that
    carries a rotation (format 4) has it folded into `model`'s weights here, so every
    command that applies a calibration (generate, serve, eval ppl) runs the rotated model."""
    from rarefy.sparsity.activation import load_thresholds
    from rarefy.sparsity.activation_rotation import apply_vo_rotations

    path = Path(directory) / FILE if Path(directory).is_dir() else Path(directory)
    th = load_thresholds(path, model)  # checks the rotation sidecar against the model too
    if th.rotations is not None:  # format 4: fold the calibration's rotation first
        apply_vo_rotations(model, th.rotations, tag=th.rotation.get("sha256"))
    if level is None:
        if len(th.sparsities) != 1:
            raise RarefyError(f"{path} holds several sparsities ({', '.join(f'{s:g}' for s in th.sparsities)}): "
                              "choose one with --activation-level")
        level = th.sparsities[0]
    return th, level


def is_predictor_dir(directory: str | None) -> bool:
    """Whether --activation-sparsity DIR names neuron predictors (`rarefy train-predictors`)
    rather than a calibration of thresholds."""
    from rarefy.sparsity.predictors import META_FILE

    return directory is not None and (Path(directory) / META_FILE).is_file()


def refuse_predictor_level(directory: str, level: float | None) -> None:
    """Predictors are trained for one sparsity: --activation-level does not apply to them."""
    if level is not None:
        raise RarefyError(f"--activation-level picks a level of a threshold calibration; {directory} holds "
                          "neuron predictors, trained for one sparsity")


def _load_predictors_for(model, directory: str, level: float | None):
    from rarefy.sparsity.predictors import load_predictors

    refuse_predictor_level(directory, level)
    return load_predictors(directory, model)


def activation_context(model, directory: str | None, level: float | None):
    """The sparsify_activations context for --activation-sparsity DIR [--activation-level S]
    (whatever mode and allocation the file holds), or a no-op context when DIR is None.
    Every token is sparsified, prompt included: the quality reference (eval ppl, which sends
    a predictor directory to --predictors instead)."""
    import contextlib

    from rarefy.sparsity.activation import sparsify_activations

    if directory is None:
        if level is not None:
            raise RarefyError("--activation-level needs --activation-sparsity DIR")
        return contextlib.nullcontext()
    th, level = load_activation_level(model, directory, level)
    return sparsify_activations(model, th.rule(level))


def activation_for_decode(model, directory: str | None, level: float | None):
    """For generation: threshold-mode files swap the projections for the input-sparse kernels
    (decode sparse, prompt dense; rarefy.layers.activation_sparse, or
    rarefy.layers.ternary_activation_sparse when the projections are ternary) and return a
    no-op context; top-k and adaptive files have no kernel yet and run through the hooks.
    A predictor directory swaps the MLPs for PredictedMLP (rarefy.layers.predicted_mlp: the
    prompt dense, decode through the differential weight cache on the CPU)."""
    import contextlib

    from rarefy.sparsity.activation import sparsify_activations

    if directory is None:
        return activation_context(model, directory, level)
    if is_predictor_dir(directory):  # the context yields the MLP neuron counts (CPU)
        from rarefy.layers.predicted_mlp import use_predicted_mlp
        return contextlib.nullcontext(use_predicted_mlp(model, _load_predictors_for(model, directory, level)))
    th, level = load_activation_level(model, directory, level)
    if th.mode != "threshold":
        return sparsify_activations(model, th.rule(level))
    from rarefy.layers.ternary_activation_sparse import (
        has_ternary_projections,
        use_ternary_activation_sparsity,
    )
    if has_ternary_projections(model):
        use_ternary_activation_sparsity(model, th.rule(level))
        return contextlib.nullcontext()
    from rarefy.layers.activation_sparse import use_activation_sparsity

    use_activation_sparsity(model, th.rule(level))  # folds the weighted criterion's scales
    return contextlib.nullcontext()
