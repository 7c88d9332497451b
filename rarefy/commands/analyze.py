"""`rarefy analyze`: weight statistics, block density, layer similarity and napkin math.

Registered in rarefy/cli.py as `app.command("analyze")(analyze)`; until then (and for the
benchmark) `python -m rarefy.commands.analyze --model DIR` runs it on its own.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

import typer

from rarefy.cli_common import JsonOpt, ModelOpt, emit_json, user_errors
from rarefy.errors import RarefyError


def _floats(text: str, what: str, lo: float, hi: float, hi_open: bool = True) -> tuple[float, ...]:
    """Parse "0.1,0.25" into floats in [lo, hi) (or [lo, hi]); RarefyError otherwise."""
    try:
        vals = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise RarefyError(f"{what}: expected comma-separated numbers, got '{text}'") from None
    if not vals:
        raise RarefyError(f"{what}: give at least one value")
    for v in vals:
        if not (lo < v < hi if hi_open else lo < v <= hi):
            raise RarefyError(f"{what}: {v:g} is outside ({lo:g}, {hi:g}{')' if hi_open else ']'}")
    return tuple(sorted(set(vals)))


def _blocks(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(sorted({int(v) for v in text.replace(" ", "").split(",") if v}))
    except ValueError:
        raise RarefyError(f"--blocks: expected comma-separated integers, got '{text}'") from None
    if not vals or any(v < 4 or v % 4 for v in vals):
        raise RarefyError(f"--blocks: block sizes must be multiples of 4 (4, 8, 16, ...), got '{text}'")
    return vals


def _check_plots_dir(plots: str) -> None:
    try:
        os.makedirs(plots, exist_ok=True)
    except OSError as e:
        raise RarefyError(f"cannot create --plots directory {plots}: {e.strerror or e}") from None
    if not os.access(plots, os.W_OK):
        raise RarefyError(f"--plots directory {plots} is not writable")


@user_errors
def analyze(
    model: Optional[str] = ModelOpt,
    as_json: bool = JsonOpt,
    plots: Optional[str] = typer.Option(None, "--plots", help="write PNG plots (histograms, similarity heatmaps) here"),
    thresholds: str = typer.Option("0.001,0.005,0.01,0.02", "--thresholds",
                                   help="absolute |w| thresholds, comma-separated"),
    rel_thresholds: str = typer.Option("0.1,0.25,0.5", "--rel-thresholds",
                                       help="thresholds as fractions of each matrix's RMS"),
    sparsities: str = typer.Option("0.5,0.75", "--sparsities", help="magnitude-pruning sparsities for block density"),
    blocks: str = typer.Option("4,16,32,64", "--blocks", help="block edge sizes (multiples of 4)"),
    similarity_threshold: float = typer.Option(0.95, "--similarity-threshold",
                                               help="cosine above which adjacent layers form a sharing span"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="napkin math for one GPU: h100, h200, b200, a100"),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="napkin math for this memory bandwidth, TB/s"),
    tflops: Optional[float] = typer.Option(None, "--tflops", help="dense bf16 TFLOP/s for the compute-bound time"),
    context: int = typer.Option(4096, "--context", help="context length for the KV-cache bytes per token"),
    sim_budget_mb: int = typer.Option(512, "--sim-budget-mb",
                                      help="memory for exact layer similarity; larger series are sketched"),
    threads: int = typer.Option(0, "--threads", help="tensors analysed at once (0: one per CPU)"),
):
    """How sparse could this checkpoint be, and what would it buy? Streams one tensor at a time."""
    from rarefy.bench.roofline import pick_gpus
    from rarefy.sparsity.analyze import AnalyzeOptions, analyze_checkpoint

    if not -1.0 <= similarity_threshold <= 1.0:
        raise RarefyError(f"--similarity-threshold must be in [-1, 1], got {similarity_threshold:g}")
    if context < 0 or sim_budget_mb < 0 or threads < 0:
        raise RarefyError("--context, --sim-budget-mb and --threads must not be negative")
    opts = AnalyzeOptions(
        thresholds=_floats(thresholds, "--thresholds", 0.0, math.inf),
        rel_thresholds=_floats(rel_thresholds, "--rel-thresholds", 0.0, math.inf),
        sparsities=_floats(sparsities, "--sparsities", 0.0, 1.0),
        blocks=_blocks(blocks), similarity_threshold=similarity_threshold,
        similarity_budget=sim_budget_mb << 20, threads=threads, progress=sys.stderr.isatty(),
        gpus=pick_gpus(gpu, bandwidth, tflops), context=context)
    if plots:
        _check_plots_dir(plots)
    result = analyze_checkpoint(model, opts)
    if plots:
        from rarefy.sparsity.plots import write_plots
        result["plots"] = write_plots(result, plots)
    typer.echo(format_report(result))
    if as_json:
        emit_json(result)


# -- the text report --------------------------------------------------------------------------

def _pct(v) -> str:
    return "     -" if v is None else f"{100 * v:5.1f}%"


def _count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_report(r: dict) -> str:
    o, comps = r["options"], r["components"]
    out = [f"{r['source']} ({r['format']}): {r['tensors']} tensors, {_count(r['params'])} parameters, "
           f"{r['bytes_read'] / 1e9:.2f} GB read in {r['stream_seconds']:.1f} s "
           f"({r['read_gb_s'] or 0:.2f} GB/s)"
           + (f"; skipped {len(r['skipped'])} non-float tensors" if r["skipped"] else "")]
    w = max(len(c) for c in comps) + 1
    out += ["", "Weight magnitudes: share of |w| below absolute thresholds | below fractions of each "
            "matrix's RMS",
            f"{'component':<{w}}{'tensors':>8}{'params':>9}{'rms':>9}"
            + "".join(f"{'<' + format(t, 'g'):>8}" for t in o["thresholds"]) + "  |"
            + "".join(f"{'<' + format(f, 'g') + 'rms':>9}" for f in o["rel_thresholds"])]
    for name, c in comps.items():
        out.append(f"{name:<{w}}{c['tensors']:>8}{_count(c['params']):>9}{c['rms']:>9.4f}"
                   + "".join(f"{_pct(v):>8}" for v in c["below_abs"].values()) + "  |"
                   + "".join(f"{_pct(v):>9}" for v in c["below_rel"].values()))
    bs = o["blocks"]
    out += ["", "Block density after magnitude pruning each matrix: all-zero blocks | sparsity reachable "
            "by removing whole blocks at the same removed |w| mass",
            f"{'component':<{w}}{'target':>7}{'pruned':>8} "
            + "".join(f"{f'{b}x{b}':>8}" for b in bs) + "  |" + "".join(f"{f'{b}x{b}':>8}" for b in bs)]
    for name, c in comps.items():
        for e in c["block_density"]:
            if e["matrix_params"]:
                out.append(f"{name:<{w}}{_pct(e['sparsity']):>7}{_pct(e['achieved']):>8} "
                           + "".join(f"{_pct(e['zero_block_share'][str(b)]):>8}" for b in bs) + "  |"
                           + "".join(f"{_pct(e['block_sparsity'][str(b)]):>8}" for b in bs))
    out += ["", f"Layer similarity: cosine of the same tensor across layers; spans = runs where every "
            f"adjacent pair >= {o['similarity_threshold']:g} (weight-sharing candidates)"]
    for s in r["similarity"]:
        adj = [a for a in s["adjacent"] if a is not None]
        mode = s["mode"] if s["mode"] == "exact" else (
            f"sketch k={s['sketch_dim']}, +-{s['expected_error_at_threshold']:.4f}")
        spans = ", ".join(f"{p['start']}-{p['end']} (min adj {p['min_adjacent']:.3f}, all pairs "
                          f"{p['min_pairwise']:.3f})" for p in s["spans"]) or "none"
        out.append(f"  {s['series']} [{len(s['layers'])} layers, {mode}]: adjacent min/mean/max "
                   f"{min(adj, default=math.nan):.3f}/{sum(adj) / max(len(adj), 1):.3f}/"
                   f"{max(adj, default=math.nan):.3f}; spans: {spans}")
    if not r["similarity"]:
        out.append("  (no tensor appears in two or more layers)")
    out += ["", *format_napkin(r["napkin"])]
    if r.get("plots"):
        out += ["", f"plots: {len(r['plots'])} PNG files in {os.path.dirname(r['plots'][0])}"]
    return "\n".join(out)


def format_napkin(n: dict) -> list[str]:
    gpus = n["gpus"]
    out = ["Napkin math per decoded token (batch 1, weights only; sparse = bitmap, 1 bit/weight + "
           "kept values; ternary = 2 bits packed; int8/ternary + one bf16 scale per row)",
           f"{'format':<8}{'sparsity':>9}{'bits/w':>8}{'MB/token':>10}{'GFLOP':>8} |"
           + "".join(f"{g['name'] + ' ms, tok/s':>26}" for g in gpus)]
    for row in n["rows"]:
        cells = "".join(f"{row['gpus'][g['name']]['ms_per_token']:>13.3f}"
                        f"{row['gpus'][g['name']]['tok_s']:>13,.0f}" for g in gpus)
        out.append(f"{row['format']:<8}{_pct(row['sparsity']):>9}{row['bits_per_matrix_weight']:>8.2f}"
                   f"{row['bytes_per_token'] / 1e6:>10.1f}{2 * (row['kept_params']) / 1e9:>8.2f} |{cells}")
    peaks = ", ".join(f"{g['name']} {g['bf16_tflops']:g}" for g in gpus if g["bf16_tflops"])
    if peaks:
        out.append(f"compute-bound ms/token at the dense bf16 peak ({peaks} TFLOP/s), and the batch "
                   "at which it matches the bandwidth-bound time:")
        for row in n["rows"]:
            cells = "".join(f"{g['name']:>10} {row['gpus'][g['name']]['compute_ms_per_token']:.5f} ms "
                            f"(batch {row['gpus'][g['name']]['crossover_batch']:.0f})"
                            for g in gpus if g["bf16_tflops"])
            out.append(f"  {row['format']:<8}{_pct(row['sparsity']):>7}{cells}")
    lt = n["layer_types"]
    if lt:
        out += [f"per layer type (from the parameter names in each layer); MB/token per type, KV cache "
                f"read at {n['context']} tokens of context:",
                f"  {'type':<28}{'layers':>7}{'params/layer':>14}{'bf16':>9}{'int8':>9}{'ternary':>9}"
                f"{'bf16@50%':>10}{'KV MB':>9}"]
        for t in lt:
            b = t["bytes_per_token"]
            out.append(f"  {t['type']:<28}{t['count']:>7}{_count(t['params_per_layer']):>14}"
                       f"{b['bf16@0'] / 1e6:>9.1f}{b['int8@0'] / 1e6:>9.1f}{b['ternary@0'] / 1e6:>9.1f}"
                       f"{b.get('bf16@0.5', math.nan) / 1e6:>10.1f}{t['kv_bytes_per_token'] / 1e6:>9.1f}")
    return out


if __name__ == "__main__":
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    _app.command()(analyze)
    _app()
