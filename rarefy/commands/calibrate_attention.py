"""`rarefy calibrate-attention`: per-layer sink + window sizes under an average memory budget.

Writes a policy config file (TOML or JSON) that `--attention-policy FILE` reads; see
docs/attention-policies.md, "Per-layer window budgets". Calibrate on text that is not the
text you evaluate on.
"""

from __future__ import annotations

import math
import os

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


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RarefyError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not vals:
        raise RarefyError(f"{what} is empty")
    return vals


@user_errors
def calibrate_attention(
    out: str = typer.Option(..., "--out", help="policy config to write (.toml or .json)"),
    budget: float = typer.Option(0.25, "--budget", help="average fraction of the context each layer may keep, "
                                                        "in (0, 1] (peak blocks held at --ctx over dense's)"),
    calib: str | None = typer.Option(None, "--calib", help="calibration text file (UTF-8); not your eval text"),
    ctx: int = typer.Option(2048, "--ctx", help="context length the budget and the errors are measured at"),
    chunks: int = typer.Option(4, "--chunks", help="chunks of --ctx tokens to measure on"),
    skip: int = typer.Option(0, "--skip-chunks", help="chunks of the text to skip first"),
    sinks: str = typer.Option("16,32,64", "--sinks", help="sink-token counts to try per layer, comma list"),
    metric: str = typer.Option("out", "--metric",
                               help="out: the window's change of the layer's output relative to its residual "
                                    "stream; sens: out weighted per layer by the loss change measured with only "
                                    "that layer windowed (about L/2 more forwards per chunk); cos: 1 - cosine of "
                                    "attention outputs; grad: first-order loss change (one backward per chunk); "
                                    "fisher: second-order estimate of the KL of the next-token distribution "
                                    "(--fisher-samples backward passes per chunk, labels sampled from the model)"),
    fisher_samples: int = typer.Option(2, "--fisher-samples", help="backward passes per chunk for --metric fisher"),
    block_size: int = typer.Option(16, "--kv-block-size", help="tokens per KV-cache block"),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="KV storage dtype simulated while measuring"),
    per_head: bool = typer.Option(False, "--per-head",
                                  help="one window per (layer, KV head) instead of per layer (DuoAttention-style "
                                       "retrieval / streaming heads; metric out, cos or sens); measuring adds each "
                                       "head's error alone"),
    errors_out: str | None = typer.Option(None, "--errors-out", help="also save the measured error table (JSON)"),
    errors: str | None = typer.Option(None, "--errors", help="allocate from saved error tables (comma list: "
                                                                "tables of the same candidates on other text are "
                                                                "averaged, others merged) instead of measuring "
                                                                "(no model or text)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
    model: str | None = ModelOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Calibrate a per-layer window-with-sinks policy that keeps --budget of the context on average."""
    from rarefy.kv.quant import check_kv_dtype
    from rarefy.kv.window_budget import (
        METRICS,
        WindowErrors,
        allocate_windows,
        candidate_windows,
        check_budget,
        measure_layer_sensitivity,
        measure_window_errors,
        policy_config_text,
        sensitivity_reference,
    )

    check_budget(budget)
    if metric not in METRICS:
        raise RarefyError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if per_head and metric == "grad":
        raise RarefyError("--per-head takes --metric out, cos, sens or fisher (grad is measured per layer only)")
    if fisher_samples < 1:
        raise RarefyError(f"--fisher-samples must be >= 1, got {fisher_samples}")
    if not out.endswith((".toml", ".json")):
        raise RarefyError(f"--out must end in .toml or .json, got {out!r}")
    if os.path.exists(out) and not overwrite:
        raise RarefyError(f"{out} exists (pass --overwrite to replace it)")
    sink_list = _int_list(sinks, "--sinks")
    if errors is not None:
        paths = [x for x in errors.split(",") if x.strip()]
        table = WindowErrors.load(paths[0])
        for extra in paths[1:]:
            other = WindowErrors.load(extra)
            # the same candidates on other text: pool (average); other candidates: merge
            table = table.pooled(other) if other.candidates == table.candidates else table.merge(other)
    else:
        if calib is None:
            raise RarefyError("give --calib TEXT to measure on (or --errors TABLE from an earlier run)")
        if block_size < 1 or block_size & (block_size - 1):
            raise RarefyError(f"--kv-block-size must be a power of two, got {block_size}")
        if ctx < 4 * block_size:
            raise RarefyError(f"--ctx must be at least {4 * block_size} tokens, got {ctx}")
        if chunks < 1 or skip < 0:
            raise RarefyError("--chunks must be >= 1 and --skip-chunks >= 0")
        check_kv_dtype(kv_dtype)
        body = read_text_file(calib)
        from rarefy.eval.perplexity import chunk_tokens
        loaded = load_for_cli(model, device, "fp32" if device == "cpu" else "auto", sparse="off")
        ids = loaded.tokenizer.encode(body, add_special_tokens=False)
        have = len(ids) // ctx
        if have < skip + chunks:
            raise RarefyError(f"{calib} has {len(ids)} tokens: {have} chunks of {ctx}, fewer than "
                              f"--skip-chunks {skip} + --chunks {chunks}")
        data = chunk_tokens(ids, ctx, skip + chunks)[skip:]
        cands = candidate_windows(ctx, block_size, sink_list)
        ref = sensitivity_reference(cands, ctx, block_size)
        if not as_json:
            typer.echo(f"measuring {len(cands)} candidate windows on {chunks} chunks of {ctx} tokens "
                       f"(chunks {skip}..{skip + chunks - 1} of {calib})", err=True)
        table = measure_window_errors(loaded.model, data, cands, kv_dtype, progress=not as_json,
                                      source=f"{os.path.basename(calib)} chunks {skip}..{skip + chunks - 1} "
                                             f"of {ctx} tokens", grad=metric == "grad", heads=per_head,
                                      fisher=fisher_samples if metric == "fisher" else 0)
        if metric == "sens":
            table.sensitivity = measure_layer_sensitivity(loaded.model, data, ref, kv_dtype, progress=not as_json)
            table.sens_ref = ref
        if errors_out:
            table.save(errors_out)
    if per_head:
        _per_head_result(table, budget, metric, sink_list, out, as_json)
        return
    alloc = allocate_windows(table, budget, metric, sinks=sink_list)
    header = [f"rarefy calibrate-attention: budget {budget:g} of a {table.ctx}-token context, metric {metric}",
              f"calibrated on {table.source or 'a saved error table'}",
              (f"mean peak blocks held over dense: {alloc.memory_fraction:.4f} "
               f"({sum(alloc.blocks)} of {table.num_layers} x {math.ceil(table.ctx / table.block_size)} blocks)")]
    text = policy_config_text(alloc.config, out, header)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    if as_json:
        emit_json({"out": out, "budget": budget, "memory_fraction": alloc.memory_fraction, "metric": metric,
                   "layers": [w.spec for w in alloc.windows], "blocks": alloc.blocks})
    else:
        typer.echo(f"{'layer':>5} {'blocks':>6}  policy")
        for i, (w, b) in enumerate(zip(alloc.windows, alloc.blocks)):
            typer.echo(f"{i:>5} {b:>6}  {w.spec}")
        typer.echo(f"mean memory {alloc.memory_fraction:.1%} of dense at ctx {table.ctx}; saved to {out}")


def _per_head_result(table, budget, metric, sink_list, out, as_json) -> None:
    from rarefy.kv.window_budget import allocate_head_windows, policy_config_text

    alloc = allocate_head_windows(table, budget, metric, sinks=sink_list)
    L, H = table.num_layers, table.num_kv_heads
    dense = math.ceil(table.ctx / table.block_size)
    header = [f"rarefy calibrate-attention --per-head: budget {budget:g} of a {table.ctx}-token context, metric {metric}",
              f"calibrated on {table.source or 'a saved error table'}",
              (f"mean peak blocks held over dense: {alloc.memory_fraction:.4f} "
               f"({sum(map(sum, alloc.blocks))} of {L} x {H} x {dense} head-blocks)"),
              "a layer given a list has one policy per KV head"]
    text = policy_config_text(alloc.config, out, header)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    if as_json:
        emit_json({"out": out, "budget": budget, "memory_fraction": alloc.memory_fraction, "metric": metric,
                   "per_head": True, "heads": [[w.spec for w in ws] for ws in alloc.windows],
                   "blocks": alloc.blocks})
        return
    typer.echo(f"{'layer':>5}  blocks per KV head  policies")
    for i, (ws, bs) in enumerate(zip(alloc.windows, alloc.blocks)):
        typer.echo(f"{i:>5}  {' '.join(f'{b:>3}' for b in bs):<18}  " + " | ".join(
            f"sinks={w.sinks},window={w.window}" for w in ws))
    typer.echo(f"mean memory {alloc.memory_fraction:.1%} of dense at ctx {table.ctx}; saved to {out}")
