"""rarefy's command line: generate, chat, eval ppl, info."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from rarefy.cli_common import (AttnPolicyOpt, DeviceOpt, DtypeOpt, JsonOpt, KvBlockOpt, KvCacheOpt, KvDtypeOpt,
                               KvMemoryOpt, ModelOpt, NoCompileOpt, SparseOpt, emit_json, kv_options,
                               load_for_cli, read_text_file, user_errors)
from rarefy.commands.calibrate_activations import (activation_context, activation_for_decode, is_predictor_dir,
                                                   refuse_predictor_level)
from rarefy.errors import RarefyError

ActSparsityOpt = typer.Option(None, "--activation-sparsity",
                              help="directory (or file) from `rarefy calibrate-activations` (zero small "
                                   "projection inputs per layer), or from `rarefy train-predictors` (run only "
                                   "the MLP neurons the predictors pick)")
ActLevelOpt = typer.Option(None, "--activation-level", help="which calibrated sparsity to apply, e.g. 0.4")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rarefy: make LLMs sparse and low-bit, then run them fast.")
eval_app = typer.Typer(no_args_is_help=True, help="Quality evaluations.")
app.add_typer(eval_app, name="eval")


def _register_commands() -> None:
    """Commands that live in their own modules (rarefy/commands/)."""
    from rarefy.commands.analyze import analyze
    from rarefy.commands.bench import bench_app
    from rarefy.commands.calibrate_activations import calibrate_activations
    from rarefy.commands.calibrate_attention import calibrate_attention
    from rarefy.commands.compile import compile_model
    from rarefy.commands.experiment import experiment_app
    from rarefy.commands.prune import prune
    from rarefy.commands.quantize import quantize
    from rarefy.commands.roofline import roofline
    from rarefy.commands.serve import serve
    from rarefy.commands.train_predictors import train_predictors_cmd
    app.command("analyze")(analyze)
    app.command("prune")(prune)
    app.command("quantize")(quantize)
    app.command("roofline")(roofline)
    app.command("serve")(serve)
    app.command("compile")(compile_model)
    app.command("calibrate-activations")(calibrate_activations)
    app.command("calibrate-attention")(calibrate_attention)
    app.command("train-predictors")(train_predictors_cmd)
    app.add_typer(experiment_app, name="experiment")
    app.add_typer(bench_app, name="bench")

@app.command()
@user_errors
def generate(
    prompts: list[str] = typer.Argument(..., help="one or more prompts, generated together as a batch"),
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="tokens to generate"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap each prompt in the model's chat template"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="keep generating past EOS"),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="run decode eagerly on CUDA"),
    no_compile: bool = NoCompileOpt,
    cpu_compile: bool = typer.Option(False, "--cpu-compile",
                                     help="on the CPU, run the decode step through torch.compile (inductor C++ wrapper): ~1-2 min "
                                          "once (cached on disk), then ~1.3-1.6x faster decode (static KV cache)"),
    sparse: str = SparseOpt,
    act_dir: Optional[str] = ActSparsityOpt, act_level: Optional[float] = ActLevelOpt,
    kv_cache: str = KvCacheOpt, kv_dtype: str = KvDtypeOpt, kv_block_size: int = KvBlockOpt,
    kv_memory: Optional[str] = KvMemoryOpt, attention_policy: Optional[str] = AttnPolicyOpt,
    as_json: bool = JsonOpt,
):
    """Generate text; tokens stream to the terminal as they come."""
    from rarefy.engine.generate import Generator
    from rarefy.layers.sampler import SamplingParams

    if any(not p.strip() for p in prompts):
        raise RarefyError("empty prompt: give some text to continue")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)
    kv = kv_options(kv_cache, kv_dtype, kv_block_size, kv_memory, attention_policy)
    # activation sparsity (and a calibration's rotation) needs dense weights: GGUF loads dense
    loaded = load_for_cli(model, device, dtype, sparse, gguf_blocks=False if act_dir else None)
    tk = loaded.tokenizer
    texts = [tk.apply_chat_template([{"role": "user", "content": p}]) if chat else p
             for p in prompts]
    ids = [tk.encode(t) for t in texts]
    if cpu_compile and is_predictor_dir(act_dir):
        raise RarefyError("--cpu-compile cannot trace the predictor MLPs (their weight cache changes every "
                          "token): drop --cpu-compile to decode with predictors")
    act = activation_for_decode(loaded.model, act_dir, act_level)  # before the engine captures the model
    gen = Generator(loaded.model, tk, use_cuda_graph=not no_cuda_graph, compile=not no_compile, kv=kv,
                    cpu_compile=cpu_compile)
    streaming = len(prompts) == 1 and not as_json

    def on_text(row, delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    with act as neurons:  # predictor directories: MLP neuron counts, else None
        completions, stats = gen.generate(ids, params, on_text if streaming else None)
    from rarefy.sparsity.predictors import neuron_sparsity
    mlp_sparsity = neuron_sparsity(neurons) if is_predictor_dir(act_dir) and any(
        c[1] for c in neurons.values()) else None
    if streaming:
        sys.stdout.write("\n")
    elif not as_json:
        for p, c in zip(prompts, completions):
            typer.echo(f"--- {p!r}\n{c.text}")
    typer.echo(f"[{sum(stats.prompt_tokens)} prompt tokens, ttft {stats.ttft_s * 1000:.1f} ms, "
               f"decode {stats.decode_tok_s:.1f} tok/s per sequence"
               + (f", {stats.throughput_tok_s:.1f} tok/s total" if len(prompts) > 1 else "")
               + (f", warm-up {stats.warmup_s:.2f} s" if stats.warmup_s > 0.001 else "")
               + (f", MLP neuron sparsity {mlp_sparsity:.3f}" if mlp_sparsity is not None else "") + "]",
               err=True)
    if as_json:
        one = len(prompts) == 1
        emit_json({
            "text": completions[0].text if one else [c.text for c in completions],
            "token_ids": completions[0].token_ids if one else [c.token_ids for c in completions],
            "finish_reason": completions[0].finish_reason if one
            else [c.finish_reason for c in completions],
            "prompt_tokens": stats.prompt_tokens[0] if one else stats.prompt_tokens,
            "ttft_s": stats.ttft_s, "decode_tok_s": stats.decode_tok_s,
            "throughput_tok_s": stats.throughput_tok_s, "warmup_s": stats.warmup_s,
            "device": str(loaded.model.device), "dtype": str(loaded.model.dtype).removeprefix("torch."),
        } | ({} if mlp_sparsity is None else {"mlp_neuron_sparsity": mlp_sparsity}))


@eval_app.command("ppl")
@user_errors
def eval_ppl(
    text: str = typer.Option(..., "--text", help="UTF-8 text file to score"),
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
    ctx: int = typer.Option(512, "--ctx", help="tokens per chunk"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="score only the first N chunks"),
    score_second_half: bool = typer.Option(False, "--score-second-half",
                                           help="score only the second half of each chunk"),
    batch_size: int = typer.Option(1, "--batch-size", help="chunks per forward pass"),
    sparse: str = SparseOpt,
    act_dir: Optional[str] = ActSparsityOpt, act_level: Optional[float] = ActLevelOpt,
    predictors: Optional[str] = typer.Option(None, "--predictors",
                                             help="directory from `rarefy train-predictors`: mask MLP neurons"),
    kv_dtype: Optional[str] = typer.Option(
        None, "--kv-dtype", help="score as if keys/values were read back from a cache of this dtype "
        "(bf16, fp16, fp8_e4m3, fp8_e5m2, int8)"),
    attention_policy: Optional[str] = typer.Option(
        None, "--attention-policy", help="score every token as if decoded under this sparse-attention "
        "policy (spec or config file, as for generate)"),
    as_json: bool = JsonOpt,
):
    """Perplexity over non-overlapping chunks of a text file."""
    from rarefy.commands.train_predictors import predictor_context
    from rarefy.eval.perplexity import perplexity
    from rarefy.sparsity.predictors import neuron_sparsity

    if batch_size < 1:
        raise RarefyError("--batch-size must be at least 1")
    body = read_text_file(text)
    loaded = load_for_cli(model, device, dtype, sparse, gguf_blocks=False if act_dir else None)
    ids = loaded.tokenizer.encode(body, add_special_tokens=False)
    if kv_dtype is not None or attention_policy is not None:
        from rarefy.kv.options import load_attention_policy
        from rarefy.kv.quant import check_kv_dtype
        from rarefy.kv.simulate import configure_eval_attention
        configure_eval_attention(loaded.model, check_kv_dtype(kv_dtype or "bf16"),
                                 load_attention_policy(attention_policy))
    if is_predictor_dir(act_dir):  # --activation-sparsity PREDICTORS: the same as --predictors
        if predictors is not None:
            raise RarefyError("give the predictors once: --predictors DIR or --activation-sparsity DIR")
        refuse_predictor_level(act_dir, act_level)
        predictors, act_dir = act_dir, None
    with activation_context(loaded.model, act_dir, act_level) as act_counts, \
            predictor_context(loaded.model, predictors) as neurons:
        res = perplexity(loaded.model, ids, ctx=ctx, max_chunks=chunks,
                         score_second_half=score_second_half, batch_size=batch_size,
                         progress=not as_json or sys.stderr.isatty())
    extra = {} if neurons is None else {"mlp_neuron_sparsity": neuron_sparsity(neurons)}
    if act_counts is not None:  # measured on the scored text: weighted by the weights each input gates
        from rarefy.sparsity.activation import sparsity_report
        extra["activation_sparsity"] = sparsity_report(act_counts, loaded.model)
    if as_json:
        emit_json(res.as_dict() | extra)
    else:
        typer.echo(f"perplexity {res.ppl:.4f} ± {res.stderr:.4f} over {res.tokens} tokens "
                   f"({res.chunks} chunks of {res.ctx})"
                   + ("" if neurons is None else f", MLP neuron sparsity {neuron_sparsity(neurons):.3f}")
                   + ("" if act_counts is None else
                      f", activation sparsity {extra['activation_sparsity']['weighted']:.3f} (weighted by weights "
                      f"read) / {extra['activation_sparsity']['entries']:.3f} (by entries)"))


@app.command()
@user_errors
def info(model: Optional[str] = ModelOpt,
         dtype: str = typer.Option("bf16", "--dtype", help="dtype to count bytes in: fp32, fp16w, bf16, fp16"),
         as_json: bool = JsonOpt):
    """Architecture, parameter counts and bytes per component."""
    from rarefy.models.info import describe, format_description
    desc = describe(model, dtype)
    if as_json:
        emit_json(desc)
    else:
        typer.echo(format_description(desc))


@app.command()
@user_errors
def chat(
    model: Optional[str] = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt,
    max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.7, "--temperature", "-t"),
    top_p: float = typer.Option(0.9, "--top-p"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    no_compile: bool = NoCompileOpt,
    sparse: str = SparseOpt,
):
    """Interactive chat with the model's chat template (/reset clears, /exit quits)."""
    from rarefy.engine.chat import run_chat
    from rarefy.layers.sampler import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    run_chat(load_for_cli(model, device, dtype, sparse), params, system, compile=not no_compile)


_register_commands()


def main():
    app()


if __name__ == "__main__":
    main()
