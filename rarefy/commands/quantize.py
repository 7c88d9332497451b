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
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
    as_json: bool = JsonOpt,
):
    """Quantize a checkpoint's decoder projections to ternary or int8 weights.

    Embeddings are never quantized; lm_head is skipped unless --no-default-skip.
    `rarefy generate --model OUT` and `rarefy eval ppl --model OUT` load the result.
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
