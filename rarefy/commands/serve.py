"""`rarefy serve`: the OpenAI-compatible HTTP server (docs/serving.md).

    rarefy serve                                   # the embedded model on http://127.0.0.1:8000
    rarefy serve --model ckpt/ --device cuda --max-num-seqs 128 --kv-memory 20GiB
    rarefy serve --host 0.0.0.0 --api-key "$KEY"   # reachable from other machines: use a key

Registered in rarefy/cli.py as ``app.command("serve")(serve)``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import typer

from rarefy.cli_common import (AttnPolicyOpt, DeviceOpt, DtypeOpt, KvBlockOpt, ModelOpt, SparseOpt, load_for_cli,
                               user_errors)
from rarefy.errors import RarefyError

KvDtypeServeOpt = typer.Option("auto", "--kv-dtype", help="KV-cache storage: auto (fp32 on cpu, bf16 on cuda), "
                               "bf16, fp16, fp32, fp8_e4m3, fp8_e5m2, int8")
KvMemoryServeOpt = typer.Option(None, "--kv-memory", help="KV-cache budget, e.g. 2GiB "
                                "(default: 32768 tokens' worth on cuda, 8192 on cpu)")


def engine_options(device: str, kv_dtype: str, kv_block_size: int, kv_memory: str | None,
                   attention_policy: str | None, max_num_seqs: int, max_step_tokens: int, compile: bool = False):
    """EngineOptions from the serving options (shared with `rarefy bench serve`)."""
    from rarefy.engine.llm_engine import EngineOptions
    from rarefy.kv.options import load_attention_policy, parse_memory
    from rarefy.kv.quant import check_kv_dtype

    if kv_dtype == "auto":
        kv_dtype = "bf16" if str(device).startswith("cuda") else "fp32"
    check_kv_dtype(kv_dtype)
    if max_num_seqs < 1:
        raise RarefyError("--max-num-seqs must be at least 1")
    if max_step_tokens < 1:
        raise RarefyError("--max-step-tokens must be at least 1")
    return EngineOptions(kv_dtype=kv_dtype, block_size=kv_block_size,
                         kv_memory_bytes=None if kv_memory is None else parse_memory(kv_memory),
                         attention_policy=load_attention_policy(attention_policy),
                         max_num_seqs=max_num_seqs, max_step_tokens=max_step_tokens, compile=compile)


def set_threads(threads: int) -> None:
    if threads < 0:
        raise RarefyError("--threads must not be negative")
    if threads:
        import torch
        torch.set_num_threads(threads)


@user_errors
def serve(
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, sparse: str = SparseOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback by default; "
                             "0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RAREFY_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on every route but /health "
                                               "(or set RAREFY_API_KEY)"),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="the model id clients send (default: the checkpoint's name)"),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="most sequences in the running batch"),
    max_step_tokens: int = typer.Option(1024, "--max-step-tokens",
                                        help="token budget of one engine step (prefill chunks + decodes)"),
    kv_dtype: str = KvDtypeServeOpt, kv_block_size: int = KvBlockOpt, kv_memory: Optional[str] = KvMemoryServeOpt,
    attention_policy: Optional[str] = AttnPolicyOpt,
    act_dir: Optional[str] = typer.Option(None, "--activation-sparsity",
                                          help="directory (or file) from `rarefy calibrate-activations`"),
    act_level: Optional[float] = typer.Option(None, "--activation-level",
                                              help="which calibrated sparsity to apply, e.g. 0.4"),
    threads: int = typer.Option(0, "--threads", help="CPU: torch threads (0: torch's default, one per core); "
                                "fewer can help on a machine shared with other work"),
    compile: bool = typer.Option(False, "--compile", help="CUDA: torch.compile each decode batch size before its "
                                 "graph is captured (batch-1 time per token 7.75 -> 6.19 ms at Llama-3-8B shape on "
                                 "an H100; tens of seconds of compiling the first time each batch size occurs)"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug"),
):
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    import uvicorn

    from rarefy.commands.calibrate_activations import activation_for_decode
    from rarefy.server.runner import bind_socket, build_server, is_loopback

    if not 0 <= port <= 65535:
        raise RarefyError(f"--port must be between 0 and 65535, got {port}")
    if api_key is not None and not api_key.strip():
        raise RarefyError("--api-key must not be empty")
    options = engine_options(device, kv_dtype, kv_block_size, kv_memory, attention_policy,
                             max_num_seqs, max_step_tokens, compile)
    set_threads(threads)
    sock = bind_socket(host, port)  # fail before the model loads when the port is taken
    if not is_loopback(host) and api_key is None:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach this machine "
                   "can use the model", err=True)
    loaded = load_for_cli(model, device, dtype, sparse, gguf_blocks=False if act_dir else None)
    act = activation_for_decode(loaded.model, act_dir, act_level)
    logging.basicConfig(level=log_level.upper() if log_level.upper() in logging._nameToLevel else "INFO")
    with act:
        app = build_server(loaded, options, served_model_name, api_key)
        name = app.state.serving.model_name
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"serving {name} on http://{shown}:{sock.getsockname()[1]} "
                   f"(pid {os.getpid()}, KV cache {app.state.serving.num_blocks * app.state.serving.block_size} "
                   f"tokens, {options.kv_dtype}); Ctrl-C stops", err=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a clean stop here
            pass
    typer.echo("server stopped", err=True)
