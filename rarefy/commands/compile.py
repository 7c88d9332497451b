"""`rarefy compile`: prepare a pruned model's sparse kernels and report what was chosen.

Every projection sparse enough to matter is analysed, given a format / kernel config /
schedule, autotuned on this device (batch sizes of --batches) and the plan cached on disk
(the cache `rarefy generate` / `eval ppl` read when they load the same pruned model, so
they skip the search). --out receives report.json and report.md: per matrix the chosen
format, the predicted bandwidth-bound speed-up (dense bytes / sparse bytes) and the
measured one, and which matrices stay dense because sparse measured slower.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Optional

import typer

from rarefy.cli_common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, emit_json, user_errors
from rarefy.errors import RarefyError


def _fmt_speedups(d: dict) -> str:
    return " / ".join(f"{v:.2f}x" if v else "-" for v in d.values())


def _fmt_us(d: dict) -> str:
    return " / ".join(f"{v:.1f}" if v else "-" for v in d.values())


def report_markdown(reports: list[dict], header: dict) -> str:
    lines = [f"# rarefy compile: {header['model']}", "",
             f"{header['date']} · {header['device']} · batches {header['batches']} · "
             f"autotune {'on' if header['autotune'] else 'off'}", "",
             "| matrix | shape | density | format | predicted | measured (per batch) | sparse µs | dense µs | cache |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        fmt = r["format"] + (str(r["param"]) if r["param"] else "")
        if r.get("kept"):
            fmt = "dense (sparse slower)"
        lines.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['density']:.3f} | {fmt} | "
                     f"{r['predicted_speedup']:.2f}x | {_fmt_speedups(r['measured_speedup'])} | "
                     f"{_fmt_us(r['measured_us'])} | {_fmt_us(r['dense_us'])} | {'hit' if r['cache_hit'] else 'miss'} |")
    s = header["summary"]
    lines += ["", f"{s['sparse_layers']} of {s['matrices']} matrices run sparse; "
              f"{s['dense_fallback']} stay dense (sparse measured slower)."]
    for b, v in s["linear_time_speedup"].items():
        if v:
            lines.append(f"- batch {b}: sum of chosen kernels' time vs all-dense: {v:.2f}x")
    return "\n".join(lines) + "\n"


def summarize(reports: list[dict], batches) -> dict:
    out = {"matrices": len(reports), "sparse_layers": sum(1 for r in reports if not r.get("kept")),
           "dense_fallback": sum(1 for r in reports if r.get("kept")), "linear_time_speedup": {}}
    for b in batches:
        k = str(b)
        dense = [r["dense_us"].get(k) for r in reports]
        chosen = [r["dense_us"].get(k) if r.get("kept") else r["measured_us"].get(k) for r in reports]
        if all(dense) and all(chosen):
            out["linear_time_speedup"][k] = sum(dense) / sum(chosen)
        else:
            out["linear_time_speedup"][k] = None
    return out


@user_errors
def compile_model(
    out: str = typer.Option(..., "--out", help="directory for report.json / report.md (must not exist or be empty)"),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batches: str = typer.Option("1,8", "--batches", help="batch sizes to tune for, e.g. 1,8"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="plan cache (default ~/.cache/rarefy/compile)"),
    autotune: bool = typer.Option(True, "--autotune/--no-autotune", help="time candidates on this device"),
    min_sparsity: float = typer.Option(0.25, "--min-sparsity", help="projections sparser than this are compiled"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    as_json: bool = JsonOpt,
):
    """Compile a pruned model's sparse layers for this device and report choices and speed-ups."""
    import torch

    from rarefy.formats.checkpoint import check_destination, write_directory
    from rarefy.layers.sparse_linear import use_sparse_weights
    from rarefy.models.loader import load_model
    from rarefy.sparse_compiler.compile import device_name

    try:
        batch_sizes = sorted({int(b) for b in batches.split(",") if b.strip()})
    except ValueError:
        raise RarefyError(f"--batches takes comma-separated integers, got {batches!r}") from None
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > 256:
        raise RarefyError("--batches needs sizes between 1 and 256")
    if not 0.0 <= min_sparsity < 1.0:
        raise RarefyError("--min-sparsity must be in [0, 1)")
    check_destination(out, model, overwrite)
    loaded = load_model(model, device=device, dtype=dtype, with_tokenizer=False, progress=True, sparse="off")
    reports = use_sparse_weights(loaded.model, batch_sizes=batch_sizes, autotune=autotune, cache_dir=cache_dir,
                                 min_sparsity=min_sparsity, progress=True)
    if not reports:
        raise RarefyError(f"no projection of {loaded.source} is at least {min_sparsity:.0%} sparse: nothing to compile")
    header = {"model": loaded.source, "date": datetime.date.today().isoformat(),
              "device": device_name(next(loaded.model.parameters()).device), "batches": batch_sizes,
              "autotune": autotune, "torch": torch.__version__, "summary": summarize(reports, batch_sizes)}
    def write(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps({**header, "matrices": reports}, indent=1))
        (tmp / "report.md").write_text(report_markdown(reports, header))

    dest = write_directory(out, write)
    s = header["summary"]
    if as_json:
        emit_json({"out": str(dest), **s})
    else:
        typer.echo(f"compiled {s['matrices']} matrices: {s['sparse_layers']} sparse, {s['dense_fallback']} dense "
                   f"(sparse slower); report in {dest}/report.md")
