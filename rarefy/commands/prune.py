"""`rarefy prune`: magnitude / Wanda / SparseGPT into a sparse-bitmask checkpoint."""

from __future__ import annotations

import datetime
import os
from typing import Optional

import typer

from rarefy.cli_common import JsonOpt, ModelOpt, emit_json, load_for_cli, user_errors
from rarefy.errors import RarefyError


@user_errors
def prune(
    method: str = typer.Option(..., "--method", help="magnitude, wanda or sparsegpt"),
    out: str = typer.Option(..., "--out", help="directory for the pruned checkpoint (must not exist or be empty)"),
    sparsity: Optional[str] = typer.Option(None, "--sparsity",
                                           help="0.5, or per component: mlp=0.6,attn=0.4 / q_proj=0.5,down_proj=0.7"),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured, e.g. 2:4 (N kept of every M)"),
    block: Optional[str] = typer.Option(None, "--block", help="whole RxC blocks, e.g. 16x16 (with --sparsity)"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text file (wanda, sparsegpt)"),
    calib_samples: int = typer.Option(128, "--calib-samples"),
    calib_len: int = typer.Option(512, "--calib-len"),
    dampening: float = typer.Option(0.01, "--dampening", help="SparseGPT: fraction of mean diag(H) added"),
    blocksize: int = typer.Option(128, "--blocksize", help="SparseGPT: columns per block"),
    skip: list[str] = typer.Option([], "--skip", help="fnmatch pattern of module names left dense (repeatable)"),
    seed: int = typer.Option(0, "--seed", help="seed of the calibration windows"),
    model: Optional[str] = ModelOpt,
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype",
                                             help="fp32, bf16 or fp16 (default: the source's dtype; fp16 for GGUF)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    as_json: bool = JsonOpt,
):
    """Prune a checkpoint's decoder linears and save it as a sparse-bitmask checkpoint."""
    from rarefy.formats.checkpoint import check_destination, file_sha256, save_pruned
    from rarefy.models.default_model import default_model_path
    from rarefy.models.loader import DTYPES
    from rarefy.sparsity.prune import prune_model

    source = model or default_model_path()
    check_destination(out, source, overwrite)  # before minutes of pruning, not after
    if calib is not None and not os.path.isfile(calib):
        raise RarefyError(f"calibration file not found: {calib}")
    if save_dtype is not None and save_dtype not in DTYPES:
        raise RarefyError(f"unsupported --save-dtype '{save_dtype}' (use fp32, bf16 or fp16)")
    loaded = load_for_cli(source, device, "fp32", sparse="off")  # statistics and updates in fp32
    report = prune_model(loaded.model, loaded.tokenizer, method, sparsity=sparsity, pattern=pattern,
                         block=block, calib=calib, calib_samples=calib_samples, calib_len=calib_len,
                         dampening=dampening, blocksize=blocksize, skip=tuple(skip),
                         progress=not as_json, seed=seed)
    meta = {
        "method": method, "sparsity": sparsity, "pattern": report.pattern, "skip": list(skip),
        "calibration": (dict(report.calibration or {}, sha256=file_sha256(calib),
                             file=os.path.basename(calib)) if calib else None),
        "dampening": report.dampening, "blocksize": report.blocksize,
        "source": os.path.abspath(source), "date": datetime.date.today().isoformat(),
        "prune_seconds": round(report.seconds, 2),
    }
    dtype = DTYPES[save_dtype] if save_dtype else _default_save_dtype(loaded)
    summary = save_pruned(loaded.model, out, source_path=source, tokenizer_files_from=loaded.tokenizer,
                          rarefy_meta=meta, dtype=dtype, overwrite=overwrite)
    pruned = [m for m in report.matrices]
    total = sum(m.shape[0] * m.shape[1] for m in pruned)
    zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in pruned)
    result = {"out": os.path.abspath(out), "method": method, "pattern": report.pattern,
              "matrices": len(pruned), "sparsity": zeros / total if total else 0.0,
              "seconds": report.seconds, "skipped": report.skipped,
              "bytes": summary.get("bytes") if isinstance(summary, dict) else None}
    if as_json:
        emit_json(result)
    else:
        typer.echo(f"pruned {len(pruned)} matrices with {method} ({report.pattern}) to "
                   f"{result['sparsity']:.1%} sparsity in {report.seconds:.1f} s; saved to {out}")


def _default_save_dtype(loaded):
    """Keep an HF checkpoint's own dtype; a dequantized GGUF is saved as fp16."""
    import json

    import torch
    if loaded.checkpoint_format == "gguf":
        return torch.float16
    try:
        with open(os.path.join(loaded.source, "config.json")) as f:
            cfg = json.load(f)
        name = cfg.get("torch_dtype") or cfg.get("dtype")
    except (OSError, ValueError):
        name = None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)
