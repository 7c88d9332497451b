"""`rarefy calibrate-activations`: per-layer activation sparsity (TEAL-style) for a model.

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
MODES = ("threshold", "topk", "adaptive")
CRITERIA = ("magnitude", "weighted")
MEASURE_WINDOWS = 4


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
    from rarefy.sparsity.activation import calibrate_thresholds, check_sparsities, measure_levels, save_thresholds
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
    check_destination(out, model, overwrite)
    body = read_text_file(calib)
    loaded = load_for_cli(model, device, "auto", sparse="off")
    ids = loaded.tokenizer.encode(body, add_special_tokens=False)
    th = calibrate_thresholds(loaded.model, ids, levels, seq_len=seq_len, samples=samples, seed=seed,
                              progress=not as_json, mode=mode, greedy=greedy, greedy_step=greedy_step,
                              greedy_windows=greedy_windows, greedy_tokens=greedy_tokens, criterion=criterion,
                              sequential=sequential, greedy_upstream=greedy_upstream,
                              allocation="global" if global_alloc else None, global_tokens=global_tokens or None,
                              global_method=global_method, global_refine=global_refine,
                              global_match=global_match)
    # the sparsity actually reached, over all inputs, on calibration windows
    th.measured = measure_levels(loaded.model, ids, th, seq_len=seq_len, windows=min(samples, MEASURE_WINDOWS),
                                 seed=seed + 1)
    dest = write_directory(out, lambda tmp: save_thresholds(th, tmp / FILE))
    n_inputs = len(th.params[next(iter(th.params))])
    if as_json:
        emit_json({"out": str(dest), "mode": mode, "criterion": criterion, "allocation": th.allocation,
                   "sequential": sequential, "sparsities": levels,
                   "inputs": n_inputs, "measured": th.measured})
    else:
        typer.echo(f"{mode} mode, {criterion} criterion, {th.allocation} allocation"
                   f"{', sequential' if sequential else ''}, {n_inputs} projection inputs; sparsity reached on "
                   f"{min(samples, MEASURE_WINDOWS)} calibration windows (weighted by gated weights / by entries):")
        for s in levels:
            m = th.measured[f"{s:.4f}"]
            typer.echo(f"  {s:g}: {m['weighted']:.3f} / {m['entries']:.3f}")
        typer.echo(f"saved to {dest / FILE}")


def load_activation_level(model, directory: str, level: float | None):
    """(calibration, level) for --activation-sparsity DIR [--activation-level S]."""
    from rarefy.sparsity.activation import load_thresholds

    path = Path(directory) / FILE if Path(directory).is_dir() else Path(directory)
    th = load_thresholds(path, model)
    if level is None:
        if len(th.sparsities) != 1:
            raise RarefyError(f"{path} holds several sparsities ({', '.join(f'{s:g}' for s in th.sparsities)}): "
                              "choose one with --activation-level")
        level = th.sparsities[0]
    return th, level


def activation_context(model, directory: str | None, level: float | None):
    """The sparsify_activations context for --activation-sparsity DIR [--activation-level S]
    (whatever mode and allocation the file holds), or a no-op context when DIR is None.
    Every token is sparsified, prompt included: the quality reference (eval ppl)."""
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
    (decode sparse, prompt dense; rarefy.layers.activation_sparse) and return a no-op
    context; top-k and adaptive files have no kernel yet and run through the hooks."""
    import contextlib

    from rarefy.sparsity.activation import sparsify_activations

    if directory is None:
        return activation_context(model, directory, level)
    th, level = load_activation_level(model, directory, level)
    if th.mode != "threshold":
        return sparsify_activations(model, th.rule(level))
    from rarefy.layers.activation_sparse import use_activation_sparsity

    use_activation_sparsity(model, th.rule(level))  # folds the weighted criterion's scales
    return contextlib.nullcontext()
