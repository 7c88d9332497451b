"""`rarefy quantize`: ternary (BitNet b1.58) or int8 weights into a low-bit checkpoint."""

from __future__ import annotations

import os
from typing import Optional

import typer

from rarefy.cli_common import JsonOpt, ModelOpt, emit_json, load_for_cli, user_errors
from rarefy.errors import RarefyError


@user_errors
def quantize(
    to: str = typer.Option(..., "--to", help="ternary (BitNet b1.58 absmean, 2 bits packed) or int8 (symmetric)"),
    out: str = typer.Option(..., "--out", help="directory for the quantized checkpoint (must not exist or be empty)"),
    group_size: Optional[int] = typer.Option(None, "--group-size",
                                             help="one scale per G input columns (default: ternary per tensor, "
                                                  "int8 per output channel); must divide the in-features"),
    skip: list[str] = typer.Option([], "--skip", help="fnmatch pattern of module names left dense (repeatable), "
                                                      "added to the default: lm_head"),
    no_default_skip: bool = typer.Option(False, "--no-default-skip",
                                         help="quantize lm_head too (when it is not tied to the embeddings)"),
    model: Optional[str] = ModelOpt,
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype",
                                             help="dtype of the tensors left dense: fp32, bf16 or fp16 "
                                                  "(default: the source's; fp16 for GGUF)"),
    scale_dtype: str = typer.Option("fp32", "--scale-dtype", help="dtype of the scales: fp32 or fp16"),
    sparse: str = typer.Option("auto", "--sparse",
                               help="int8 only: keep the pruned zeros, int8 values in the bitmap layout "
                                    "(sparse + int8, one scale per output row). auto: when the model was "
                                    "written by `rarefy prune`; on: always; off: dense int8"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
    as_json: bool = JsonOpt,
):
    """Quantize a checkpoint's decoder projections to ternary or int8 weights.

    Embeddings are never quantized; lm_head is skipped unless --no-default-skip.
    `rarefy generate --model OUT` and `rarefy eval ppl --model OUT` load the result.
    On a pruned checkpoint (`rarefy prune`), --to int8 keeps the weights sparse: int8
    values in the bitmap layout with one fp32 scale per output row (--sparse off: dense int8).
    """
    from rarefy.commands.prune import _default_save_dtype
    from rarefy.formats.checkpoint import check_destination
    from rarefy.lowbit.checkpoint import save_lowbit
    from rarefy.lowbit.quantize import DEFAULT_SKIP, check_format, plan_quantization, quantize_model, scale_dtype_of
    from rarefy.models.default_model import default_model_path
    from rarefy.models.loader import DTYPES

    check_format(to)
    if group_size is not None and group_size <= 0:
        raise RarefyError(f"--group-size must be a positive integer, got {group_size}")
    scale_dtype_of(scale_dtype)
    if save_dtype is not None and save_dtype not in DTYPES:
        raise RarefyError(f"unsupported --save-dtype '{save_dtype}' (use fp32, bf16 or fp16)")
    source = model or default_model_path()
    if not os.path.exists(source):
        raise RarefyError(f"model not found: {source}")
    check_destination(out, source, force)  # before loading and quantizing, not after
    patterns = tuple(skip) + (() if no_default_skip else DEFAULT_SKIP)
    if sparse not in ("auto", "on", "off"):
        raise RarefyError(f"--sparse must be auto, on or off, got {sparse!r}")
    from rarefy.models.loader import is_pruned_checkpoint
    want_sparse = sparse == "on" or (sparse == "auto" and os.path.isdir(source) and is_pruned_checkpoint(source))
    if want_sparse and to != "int8":
        if sparse == "on":
            raise RarefyError(f"--sparse on composes sparsity with int8 only, not with {to}")
        want_sparse = False
    if want_sparse:
        if group_size is not None:
            raise RarefyError("sparse + int8 uses one scale per output row; --group-size is not supported "
                              "with it (use --sparse off for grouped dense int8)")
        if scale_dtype != "fp32":
            raise RarefyError("sparse + int8 keeps its scales in fp32; --scale-dtype must be fp32")
        return _quantize_sparse_int8(source, out, patterns, save_dtype, force, as_json)

    loaded = load_for_cli(source, "cpu", "fp32", sparse="off")
    plan_quantization(loaded.model, to, group_size, patterns)  # every check, before any work
    report = quantize_model(loaded.model, to, group_size, patterns, scale_dtype, progress=not as_json)
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)
    meta = {
        "format": to, "group_size": group_size,
        "granularity": ("group" if group_size else ("tensor" if to == "ternary" else "channel")),
        "scale_dtype": str(scale_dtype_of(scale_dtype)).removeprefix("torch."), "skip": list(patterns),
        "skipped": report.skipped, "kept_lowbit": report.kept,
    }
    dtype = DTYPES[save_dtype] if save_dtype else _default_save_dtype(loaded)
    summary = save_lowbit(loaded.model, out, source_path=source, tokenizer_files_from=loaded.tokenizer,
                          lowbit_meta=meta, dtype=dtype, overwrite=force)
    result = {"out": os.path.abspath(out), "format": to, "group_size": group_size,
              "quantized": len(report.quantized), "skipped": report.skipped, "kept": len(report.kept),
              "bytes": summary["bytes"], "lowbit_bytes": summary["lowbit_bytes"],
              "lowbit_bf16_bytes": summary["lowbit_bf16_bytes"], "warnings": report.warnings}
    if as_json:
        emit_json(result)
    else:
        ratio = summary["lowbit_bf16_bytes"] / max(summary["lowbit_bytes"], 1)
        typer.echo(f"quantized {len(report.quantized)} matrices to {to}"
                   + (f" (group {group_size})" if group_size else "")
                   + f", {ratio:.1f}x smaller than bf16; {len(report.skipped)} left dense; saved to {out}")


def _quantize_sparse_int8(source: str, out: str, patterns: tuple[str, ...], save_dtype: str | None, force: bool,
                          as_json: bool) -> None:
    from rarefy.commands.prune import _default_save_dtype
    from rarefy.formats.sparse_int8_checkpoint import save_sparse_int8
    from rarefy.lowbit.composed import quantize_sparse_int8
    from rarefy.models.loader import DTYPES

    loaded = load_for_cli(source, "cpu", "fp32", sparse="off")
    dtype = DTYPES[save_dtype] if save_dtype else _default_save_dtype(loaded)
    report = quantize_sparse_int8(loaded.model, patterns, progress=not as_json)
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)
    density = sum(report.density.values()) / max(1, len(report.density))
    meta = {"format": "int8", "granularity": "channel", "skip": list(patterns), "skipped": report.skipped}
    summary = save_sparse_int8(loaded.model, out, source_path=source, tokenizer_files_from=loaded.tokenizer,
                               meta=meta, dtype=dtype, overwrite=force)
    result = {"out": os.path.abspath(out), "format": "sparse-int8", "group_size": None,
              "quantized": len(report.quantized), "skipped": report.skipped,
              "mean_density": round(density, 4), "bytes": summary["bytes"],
              "sparse_int8_bytes": summary["sparse_int8_bytes"], "lowbit_bf16_bytes": summary["dense_bf16_bytes"],
              "warnings": report.warnings}
    if as_json:
        emit_json(result)
    else:
        ratio = summary["dense_bf16_bytes"] / max(summary["sparse_int8_bytes"], 1)
        typer.echo(f"quantized {len(report.quantized)} pruned matrices to sparse + int8 "
                   f"(mean density {density:.3f}), {ratio:.1f}x smaller than dense bf16; "
                   f"{len(report.skipped)} left dense; saved to {out}")
