"""`rarefy bench ...`: kernel benchmarks.

    rarefy bench kernels --quick                     # GPU: Llama-3-8B shapes, batches 1 and 8
    rarefy bench kernels --out kernels.md --json     # GPU: the full sweep (5.7 min on an H100)
    rarefy bench kernels --device cpu                # CPU: SmolLM2-135M shapes, batches 1 and 4

Registered in rarefy/cli.py as ``app.add_typer(bench_app, name="bench")``.
"""

from __future__ import annotations

import shlex
import sys
from typing import Optional

import typer

from rarefy.cli_common import JsonOpt, emit_json, user_errors
from rarefy.errors import RarefyError

def _write_results(result: dict, to_markdown, out: Optional[str], as_json: bool) -> None:
    """--out: the markdown table to a file; --json: the result as the last stdout line."""
    if out:
        try:
            with open(out, "w", encoding="utf-8") as f:
                f.write(to_markdown(result))
        except OSError as e:
            raise RarefyError(f"cannot write --out {out}: {e.strerror or e}") from None
        typer.echo(f"wrote {out}", err=True)
    if as_json:
        emit_json(result)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: kernels against dense and torch.sparse baselines.")


@bench_app.command("kernels")
@user_errors
def kernels(
    device: str = typer.Option("auto", "--device", help="cuda, cpu, or auto (cuda when visible)"),
    as_json: bool = JsonOpt,
    out: Optional[str] = typer.Option(None, "--out", help="write the results as markdown to this file"),
    shapes: Optional[str] = typer.Option(
        None, "--shapes", help="comma list of NxK (e.g. 4096x4096) or sets llama3-8b, qwen3.5-27b, smollm2 "
        "(default: GPU llama3-8b + qwen3.5-27b, CPU smollm2)"),
    patterns: Optional[str] = typer.Option(
        None, "--patterns", help="comma list: unstructured % (50), n:m (2:4), blocks bB@S (b16@50: 16x16 blocks, "
        "50% of blocks removed); default: 50,70,75,90,2:4,4:8 and b16/b32/b64 at 50% and 75%"),
    batches: Optional[str] = typer.Option(None, "--batches", help="comma list of batch sizes M "
                                          "(default: GPU 1,2,4,8,16,32; CPU 1,4)"),
    quick: bool = typer.Option(False, "--quick", help="GPU: Llama-3-8B shapes, batches 1 and 8; CPU: batch 1"),
    methods: Optional[str] = typer.Option(
        None, "--methods", help="only these (comma list): dense, rarefy_dense, csr, semi24, sparse_matmul, rarefy "
        "(CPU also dense_fp32, csr_fp32)"),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32"),
    max_minutes: Optional[float] = typer.Option(
        None, "--max-minutes", help="stop timing after this long; later rows say 'skipped' "
        "(default: 7.5 on GPU, none on CPU; 0 = no limit)"),
    samples: int = typer.Option(5, "--samples", help="timed graph replays (GPU) or bursts (CPU) per row; median"),
    threads: int = typer.Option(0, "--threads", help="CPU: torch threads (0: torch's default)"),
):
    """Sparse kernels vs cuBLAS / torch.sparse / rarefy dense: µs, bytes, TB/s, speed-ups; every row checked first."""
    import torch

    from rarefy.bench import kernels as kb

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise RarefyError(f"--device must be cuda, cpu or auto, got {device}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RarefyError("--device cuda: no CUDA device is visible (use --device cpu)")
    if dtype not in kb.DTYPES:
        raise RarefyError(f"--dtype must be one of {', '.join(kb.DTYPES)}, got {dtype}")
    if samples < 1:
        raise RarefyError("--samples must be at least 1")
    if threads < 0:
        raise RarefyError("--threads must not be negative")
    if threads:
        torch.set_num_threads(threads)
    if max_minutes is None:
        max_minutes = 7.5 if device == "cuda" else 0
    if max_minutes < 0:
        raise RarefyError("--max-minutes must not be negative")

    cfg = kb.default_config(device, quick, dtype=kb.DTYPES[dtype], samples=samples,
                            max_seconds=max_minutes * 60 if max_minutes else None,
                            command="rarefy " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "rarefy bench kernels")
    if shapes is not None:
        cfg.shapes = kb.parse_shapes(shapes)
    if patterns is not None:
        cfg.patterns = kb.parse_patterns(patterns)
    if batches is not None:
        cfg.batches = kb.parse_batches(batches)
    if methods is not None:
        cfg.methods = tuple(m.strip() for m in methods.split(",") if m.strip())
        if not cfg.methods:
            raise RarefyError("--methods: give at least one method")

    result = kb.run_bench(cfg, progress=kb._stderr_progress)  # one line per row on stderr as it is measured
    typer.echo(kb.format_table(result))
    _write_results(result, kb.format_markdown, out, as_json)


@bench_app.command("attention")
@user_errors
def attention(
    device: str = typer.Option("auto", "--device", help="cuda, cpu, or auto (cuda when visible)"),
    as_json: bool = JsonOpt,
    out: Optional[str] = typer.Option(None, "--out", help="write the results as markdown to this file"),
    quick: bool = typer.Option(False, "--quick", help="GPU: 32k x 1, 4k x 32, 1k/8k/128k x 1; CPU: 256 tokens, "
                               "batches 1 and 2"),
    contexts: Optional[str] = typer.Option(None, "--contexts", help="comma list of context lengths (e.g. 1k,32k)"),
    batches: Optional[str] = typer.Option(None, "--batches", help="comma list of batch sizes"),
    kv_dtypes: Optional[str] = typer.Option(None, "--kv-dtypes", help="comma list (default: bf16, fp16, fp8_e4m3, "
                                            "fp8_e5m2, int8)"),
    sweep: bool = typer.Option(False, "--sweep", help="GPU: also time one-at-a-time plan changes at 32k x 1 and "
                               "4k x 32 (bf16, fp8_e4m3, int8)"),
    no_sdpa: bool = typer.Option(False, "--no-sdpa", help="skip the torch SDPA baseline"),
    samples: int = typer.Option(7, "--samples", help="timed graph replays (GPU) or bursts (CPU) per row; median"),
):
    """Paged decode attention (rarefy's kernel) vs the copy bandwidth and torch SDPA, per KV dtype."""
    import torch

    from rarefy.bench import attention as ab

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise RarefyError(f"--device must be cuda, cpu or auto, got {device}")
    if samples < 1:
        raise RarefyError("--samples must be at least 1")
    cfg = ab.default_config(device, quick, command=ab.command_line())
    cfg.samples = samples if device == "cuda" or samples != 7 else cfg.samples
    if contexts is not None or batches is not None:
        ctxs = ab.parse_ints(contexts, "--contexts") if contexts else tuple(sorted({c for c, _ in cfg.points}))
        bats = ab.parse_ints(batches, "--batches") if batches else tuple(sorted({b for _, b in cfg.points}))
        cfg.points = ab.grid_points(ctxs, bats, cfg.max_tokens)
        if not cfg.points:
            raise RarefyError(f"every batch x context is over the {cfg.max_tokens} token cap")
    if kv_dtypes is not None:
        cfg.kv_dtypes = ab.parse_dtypes(kv_dtypes)
    cfg.sweep = sweep and device == "cuda"
    cfg.sdpa = not no_sdpa

    result = ab.run_bench(cfg, progress=ab._stderr_progress)
    typer.echo(ab.format_table(result))
    _write_results(result, ab.format_markdown, out, as_json)  # JSON stays the last line


@bench_app.command("serve")
@user_errors
def serve_bench(
    url: Optional[str] = typer.Option(None, "--url", help="a running OpenAI-compatible server, e.g. "
                                      "http://127.0.0.1:8000 (default: start rarefy's in this process)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RAREFY_API_KEY", help="the server's key"),
    num_prompts: int = typer.Option(32, "--num-prompts", "--requests", "-n", help="requests per concurrency level"),
    concurrency: str = typer.Option("1,8", "--concurrency", help="comma list: requests in flight, one run each"),
    request_rate: float = typer.Option(float("inf"), "--request-rate",
                                       help="Poisson arrivals per second (default inf: all at once, "
                                            "--concurrency at a time)"),
    dataset: str = typer.Option("synthetic", "--dataset", help="synthetic (random token ids) or wikitext "
                                "(WikiText-2 validation paragraphs)"),
    dataset_path: Optional[str] = typer.Option(None, "--dataset-path", help="the WikiText-2 valid.txt to use"),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", help="tokens per prompt"),
    output_tokens: int = typer.Option(64, "--output-tokens", help="tokens generated per request (ignore_eos)"),
    warmup: int = typer.Option(2, "--warmup", help="unmeasured requests first"),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="in-process server: HF checkpoint directory "
                                        "or GGUF file (default: the embedded SmolLM2-135M-Instruct)"),
    device: str = typer.Option("cpu", "--device", help="in-process server: cpu or cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="in-process server: auto, fp32, fp16w, bf16, fp16"),
    sparse: str = typer.Option("auto", "--sparse", help="in-process server: as for rarefy serve"),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="in-process server"),
    max_step_tokens: int = typer.Option(1024, "--max-step-tokens", help="in-process server"),
    kv_dtype: str = typer.Option("auto", "--kv-dtype", help="in-process server: auto, bf16, fp16, fp32, fp8_e4m3, "
                                 "fp8_e5m2, int8"),
    kv_block_size: int = typer.Option(16, "--kv-block-size", help="in-process server"),
    kv_memory: Optional[str] = typer.Option(None, "--kv-memory", help="in-process server, e.g. 2GiB"),
    attention_policy: Optional[str] = typer.Option(None, "--attention-policy", help="in-process server"),
    threads: int = typer.Option(0, "--threads", help="in-process server, CPU: torch threads (0: torch's default)"),
    out: Optional[str] = typer.Option(None, "--out", help="write the results as markdown to this file"),
    as_json: bool = JsonOpt,
):
    """Load-test a server: requests/s, output tokens/s, TTFT and time per output token p50/p90/p99."""
    import math

    from rarefy.bench import serve as sb

    try:
        levels = tuple(int(x) for x in concurrency.split(",") if x.strip())
    except ValueError:
        raise RarefyError(f"--concurrency must be a comma list of integers, got {concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise RarefyError("--concurrency: give one or more integers >= 1")
    if num_prompts < 1 or prompt_tokens < 1 or output_tokens < 1 or warmup < 0:
        raise RarefyError("--num-prompts, --prompt-tokens and --output-tokens must be >= 1, --warmup >= 0")
    if not (request_rate > 0 or math.isinf(request_rate)):
        raise RarefyError("--request-rate must be positive (or inf)")
    cfg = sb.ServeBenchConfig(url=url, api_key=api_key, num_prompts=num_prompts, concurrency=levels,
                              request_rate=request_rate, dataset=dataset, dataset_path=dataset_path,
                              prompt_tokens=prompt_tokens, output_tokens=output_tokens, warmup=warmup, seed=seed,
                              command="rarefy " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "rarefy bench serve")
    loaded = options = None
    if url is None:
        from rarefy.cli_common import load_for_cli
        from rarefy.commands.serve import engine_options, set_threads
        options = engine_options(device, kv_dtype, kv_block_size, kv_memory, attention_policy, max_num_seqs,
                                 max_step_tokens)
        set_threads(threads)
        loaded = load_for_cli(model, device, dtype, sparse)

    def progress(r):
        typer.echo(f"concurrency {r['concurrency']}: {r['completed']}/{r['requests']} ok, "
                   f"{r['output_tokens_per_s']:.1f} output tok/s, TTFT p50 {r['ttft_ms']['p50'] or 0:.0f} ms",
                   err=True)

    labels = None if url else {"dtype_option": dtype, "sparse": sparse}
    result = sb.run_bench(cfg, loaded, options, progress, labels)
    typer.echo(sb.format_markdown(result))
    _write_results(result, sb.format_markdown, out, as_json)
