"""`rarefy experiment ...`: what-if studies that report quality against the original."""

from __future__ import annotations

import os
from typing import Optional

import typer

from rarefy.cli_common import JsonOpt, ModelOpt, emit_json, load_for_cli, read_text_file, user_errors
from rarefy.errors import RarefyError

experiment_app = typer.Typer(no_args_is_help=True, help="What-if studies, each with its quality cost.")

# The WikiText-2 validation split beside a rarefy checkout (../shared/data/...).
_SHARED_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                            "wikitext-2", "valid.txt")


def default_eval_text() -> str:
    path = os.environ.get("RAREFY_EVAL_TEXT") or os.path.abspath(_SHARED_TEXT)
    if not os.path.isfile(path):
        raise RarefyError("no evaluation text found; pass --text FILE (or set RAREFY_EVAL_TEXT)")
    return path


@experiment_app.command("share-layers")
@user_errors
def share_layers_cmd(
    start: int = typer.Option(..., "--start", help="first layer of the span (0-based)"),
    end: int = typer.Option(..., "--end", help="last layer of the span (inclusive)"),
    mode: str = typer.Option("first", "--mode", help="first: keep layer START's weights; mean: average the span"),
    model: Optional[str] = ModelOpt,
    device: str = typer.Option("cpu", "--device"),
    text: Optional[str] = typer.Option(None, "--text", help="evaluation text (default: WikiText-2 valid beside the checkout)"),
    ctx: int = typer.Option(512, "--ctx"),
    chunks: Optional[int] = typer.Option(20, "--chunks", help="chunks of --ctx tokens to score (default 20)"),
    as_json: bool = JsonOpt,
):
    """Replace layers START..END by one layer applied END-START+1 times; perplexity vs the original."""
    from rarefy.eval.perplexity import perplexity
    from rarefy.sparsity.share_layers import share_layers

    body = read_text_file(text or default_eval_text())
    loaded = load_for_cli(model, device, "fp32", sparse="off")
    n_layers = len(loaded.model.model.layers)
    if not 0 <= start < end < n_layers:  # check before the slow baseline run
        raise RarefyError(f"need 0 <= --start < --end < {n_layers} (the model has {n_layers} layers)")
    ids = loaded.tokenizer.encode(body, add_special_tokens=False)
    base = perplexity(loaded.model, ids, ctx=ctx, max_chunks=chunks, progress=not as_json)
    total = sum(p.numel() for p in loaded.model.parameters())
    saved = share_layers(loaded.model, start, end, mode)
    shared = perplexity(loaded.model, ids, ctx=ctx, max_chunks=chunks, progress=not as_json)
    result = {"start": start, "end": end, "mode": mode, "ppl_original": base.ppl,
              "stderr_original": base.stderr, "ppl_shared": shared.ppl, "stderr_shared": shared.stderr,
              "tokens": base.tokens, "params_total": total, **saved}
    if as_json:
        emit_json(result)
    else:
        typer.echo(f"layers {start}..{end} shared ({mode}): perplexity {base.ppl:.3f} -> {shared.ppl:.3f} "
                   f"over {base.tokens} tokens; {saved['params_dropped'] / 1e6:.1f}M of "
                   f"{total / 1e6:.1f}M parameters dropped")
