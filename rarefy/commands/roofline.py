"""`rarefy roofline`: FLOPs, bytes and time bounds of one decode step, per operation, and how it
maps onto the GPU (rarefy/bench/decode_roofline.py; docs/roofline.md).

Registered in rarefy/cli.py as `app.command("roofline")(roofline)`; `python -m
rarefy.commands.roofline ...` runs it on its own.
"""

from __future__ import annotations

from typing import Optional

import typer

from rarefy.cli_common import JsonOpt, emit_json, user_errors


@user_errors
def roofline(
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="HF directory (config.json is enough), GGUF file or preset: llama3-8b, llama3-70b, qwen3-8b, "
             "qwen3.5-27b, smollm2-135m (default: the embedded SmolLM2-135M-Instruct)"),
    gpu: str = typer.Option("h100", "--gpu", help="h100, h200, b200 or a100"),
    ctx: int = typer.Option(4096, "--ctx", help="tokens of context each sequence attends to"),
    batch: int = typer.Option(1, "--batch", help="sequences decoded together (one token each)"),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="KV-cache dtype: bf16, fp16, fp8_e4m3, fp8_e5m2, int8 (fp32: tests)"),
    weights: str = typer.Option("bf16", "--weights", help="weight format: bf16, int8 or ternary"),
    as_json: bool = JsonOpt,
):
    """Roofline of one decode step: per-op FLOPs, bytes, bound and time; GPU tiling and launch."""
    from rarefy.bench.decode_roofline import decode_roofline, format_roofline

    r = decode_roofline(model, gpu=gpu, ctx=ctx, batch=batch, kv_dtype=kv_dtype, weights=weights)
    if as_json:
        emit_json(_finite(r))
    else:
        typer.echo(format_roofline(r))


def _finite(x):
    """JSON has no Infinity: intensities of byte-free ops become null."""
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


if __name__ == "__main__":
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    _app.command()(roofline)
    _app()
