"""Pieces every rarefy command shares: option definitions, error handling, JSON output.

Command modules import from here (not from rarefy.cli), so a new command is a new
module plus one registration line in rarefy/cli.py.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import typer

from rarefy.errors import RarefyError

MODEL_HELP = "HF checkpoint directory or GGUF file (default: the embedded SmolLM2-135M-Instruct)"
ModelOpt = typer.Option(None, "--model", "-m", help=MODEL_HELP)
DeviceOpt = typer.Option("cpu", "--device", help="cpu or cuda")
DtypeOpt = typer.Option("auto", "--dtype",
                        help="auto (fp16w on cpu, bf16 on cuda), fp32, fp16w (fp32 compute, fp16 weights; cpu), bf16, fp16")
SparseOpt = typer.Option("auto", "--sparse",
                         help="auto: a `rarefy prune` checkpoint runs through SparseLinear (dense where "
                              "sparse measured slower); on: any checkpoint, autotuned; force: every sparse "
                              "projection sparse, untimed; off: dense")
JsonOpt = typer.Option(False, "--json", help="print one JSON object as the last line of stdout")
NoCompileOpt = typer.Option(False, "--no-compile",
                            help="on CUDA, skip torch.compile of the decode step (faster warm-up, slower decode)")
KvCacheOpt = typer.Option("auto", "--kv-cache", help="static (contiguous) or paged; auto: paged when any "
                          "other --kv-* or --attention-policy option is given")
KvDtypeOpt = typer.Option("bf16", "--kv-dtype", help="paged KV-cache storage: bf16, fp16, fp32, fp8_e4m3, fp8_e5m2, int8")
KvBlockOpt = typer.Option(16, "--kv-block-size", help="tokens per KV-cache block (paged)")
KvMemoryOpt = typer.Option(None, "--kv-memory", help="paged KV-cache budget, e.g. 512MiB (default: just "
                           "enough for the prompts plus --max-tokens)")
AttnPolicyOpt = typer.Option(None, "--attention-policy",
                             help="sparse attention for decode: dense, window:sinks=16,window=496[,stride=S], "
                                  "topk:k=256 | topk:frac=0.25, threshold:t=0.001, entropy[:factor=F], "
                                  "or a policy config file (docs/attention-policies.md)")


def kv_options(kv_cache: str, kv_dtype: str, block_size: int, memory: str | None, policy: str | None):
    """The Generator's KVOptions from the --kv-* options, or None for the static cache."""
    from rarefy.engine.generate import KVOptions
    from rarefy.kv.options import load_attention_policy, parse_memory
    from rarefy.kv.quant import check_kv_dtype

    if kv_cache not in ("auto", "static", "paged"):
        raise RarefyError(f"--kv-cache must be auto, static or paged, got {kv_cache!r}")
    check_kv_dtype(kv_dtype)
    asked = kv_dtype != "bf16" or block_size != 16 or memory is not None or policy is not None
    if kv_cache == "static":
        if asked:
            raise RarefyError("--kv-dtype, --kv-block-size, --kv-memory and --attention-policy need "
                              "--kv-cache paged")
        return None
    if kv_cache == "auto" and not asked:
        return None
    return KVOptions(kv_dtype=kv_dtype, block_size=block_size,
                     memory_bytes=None if memory is None else parse_memory(memory),
                     policy=load_attention_policy(policy))


def user_errors(fn):
    """Turn RarefyError (and Ctrl-C) into one line on stderr and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RarefyError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
    return wrapper


def load_for_cli(model, device, dtype, sparse: str = "auto", gguf_blocks: bool | None = None):
    """Load a model with its tokenizer, with a progress bar on a terminal. A checkpoint
    written by `rarefy prune` runs through SparseLinear unless `sparse` is "off".
    ``gguf_blocks``: as load_model's (False: GGUF files load as dense weights)."""
    from rarefy.models.loader import load_model
    loaded = load_model(model, device=device, dtype=dtype, progress=sys.stderr.isatty(), sparse=sparse,
                        gguf_blocks=gguf_blocks)
    if loaded.tokenizer is None:
        raise RarefyError("this checkpoint has no tokenizer")
    return loaded


def emit_json(obj: dict) -> None:
    """One JSON object on one line: the last line of stdout."""
    typer.echo(json.dumps(obj))


def read_text_file(path: str) -> str:
    """A UTF-8 text file's contents; missing, non-UTF-8 or empty files are user errors."""
    if not os.path.isfile(path):
        raise RarefyError(f"text file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            body = f.read()
    except UnicodeDecodeError:
        raise RarefyError(f"{path} is not UTF-8 text") from None
    if not body.strip():
        raise RarefyError(f"{path} is empty")
    return body
