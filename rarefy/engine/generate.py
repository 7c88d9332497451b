"""Batch generation: prefill, then one-token decode steps.

Several prompts run together as one static batch; finished rows keep
computing (their outputs are ignored) so shapes never change, which is what
lets the decode step run as a CUDA graph. The KV cache is the static contiguous
one by default, or a paged (optionally quantized, optionally sparse-attention)
cache when `kv` options are given; the paged path decodes eagerly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from rarefy.engine.cpu_compile import CompiledCpuStep
from rarefy.engine.stop import cut_at_stop, visible_length
from rarefy.errors import RarefyError
from rarefy.kv.cache import StaticKVCache
from rarefy.kv.paged import DEFAULT_BLOCK_SIZE, PagedKVCache
from rarefy.layers.sampler import SamplingParams, sample
from rarefy.models.llama import DecoderLM
from rarefy.tokenizer import Tokenizer

CACHE_BUCKET = 256  # cache lengths are rounded up so graphs are reused across calls


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


@dataclass
class GenerationStats:
    prompt_tokens: list[int]
    ttft_s: float  # prefill + first token, measured after warm-up
    decode_s: float
    decode_tokens: int  # tokens produced by decode steps, all rows together
    warmup_s: float  # CUDA-graph capture and kernel compilation, not in the figures above

    @property
    def decode_steps(self) -> int:
        return self.decode_tokens // max(1, len(self.prompt_tokens))

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of one sequence (steps per second)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def throughput_tok_s(self) -> float:
        """Tokens per second over the whole batch."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class KVOptions:
    """A paged KV cache for generation. Size: memory_bytes, or num_blocks, or (neither)
    just enough blocks for the batch's prompts plus max_tokens."""
    kv_dtype: str = "bf16"
    block_size: int = DEFAULT_BLOCK_SIZE
    memory_bytes: int | None = None
    num_blocks: int | None = None
    policy: object = None  # a rarefy.kv.policies policy or policy config


class Generator:
    def __init__(self, model: DecoderLM, tokenizer: Tokenizer | None, use_cuda_graph: bool = True,
                 compile: bool = False, kv: KVOptions | None = None, cpu_compile: bool = False):
        """On CUDA the decode step is captured as a graph (use_cuda_graph), after
        torch.compile fuses its small kernels (compile; slower warm-up). On the CPU,
        cpu_compile runs the decode step through torch.compile with inductor's C++ wrapper
        (rarefy/engine/cpu_compile.py; about 1-2 min once, cached on disk, for the
        embedded model; measured with GGUF blocks and low-bit layers, whose C++ ops have fake
        kernels -- a layer whose op has none cannot be traced). With `kv`
        the paged cache is used and decode runs eagerly."""
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        self.kv = kv
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda" and kv is None
        self.compile = compile and self.use_cuda_graph
        # CPU: torch.compile the whole decode step (inductor fuses the norms, rotary, residuals
        # and attention glue around the opaque projection ops); the step always attends over
        # the whole static cache (masked) so its shapes never change and it compiles once.
        self._cpu_step = CompiledCpuStep(model) if (
            cpu_compile and self.device.type == "cpu" and kv is None) else None
        if self.device.type == "cuda":
            model.fuse_projections()
        self._cache: StaticKVCache | None = None
        self._graph = None

    def _cache_for(self, batch: int, needed: int):
        """Reuse the cache (and its graph) when the batch matches and it is long enough."""
        cfg = self.model.config
        c = self._cache
        if c is None or c.batch != batch or c.max_seq < needed:
            size = min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, cfg.max_position_embeddings)
            self._cache = self._graph = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._cache = StaticKVCache(cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim,
                                        self.model.dtype, self.device)
        return self._cache

    def _paged_for(self, lens: list[int], max_tokens: int) -> PagedKVCache:
        o, cfg = self.kv, self.model.config
        size = {"memory_bytes": o.memory_bytes} if o.memory_bytes is not None else \
            {"num_blocks": o.num_blocks} if o.num_blocks is not None else \
            {"num_blocks": sum(-(-(n + max_tokens) // o.block_size) for n in lens)}
        return PagedKVCache.for_model(cfg, device=self.device, kv_dtype=o.kv_dtype,
                                      block_size=o.block_size, policy=o.policy, **size)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_text: Callable[[int, str], None] | None = None):
        """prompts: token id lists. Returns (completions, stats).

        on_text(row, delta) is called with newly decoded text as it arrives.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RarefyError("empty prompt: give at least one token of text")
        cfg = self.model.config
        lens = [len(p) for p in prompts]
        needed = max(lens) + params.max_tokens
        if needed > cfg.max_position_embeddings:
            raise RarefyError(
                f"prompt ({max(lens)} tokens) plus --max-tokens ({params.max_tokens}) exceeds the "
                f"model's context of {cfg.max_position_embeddings} tokens")
        B, dev = len(prompts), self.device
        rows = list(range(B))
        if self.kv is None:
            cache = self._cache_for(B, needed)
        else:
            cache = self._paged_for(lens, params.max_tokens)
            for r in rows:
                cache.add_sequence(r)

        t0 = time.perf_counter()
        if self.use_cuda_graph and self._graph is None:
            from rarefy.engine.cuda_graph import GraphedDecodeStep
            self._graph = GraphedDecodeStep(self.model, cache, B, compile=self.compile)
            self._sync()
        warmup_s = time.perf_counter() - t0

        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=dev).manual_seed(params.seed)
        ids = torch.zeros(B, max(lens), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        ids = ids.to(dev)
        last = torch.tensor(lens, device=dev) - 1

        self._sync()
        t0 = time.perf_counter()
        if self.kv is not None:
            cache.begin_step(rows, lens)
        logits = self.model(ids, None, cache, kv_len=max(lens), last_index=last)
        tokens = sample(logits, params, gen)
        tok_list = tokens.tolist()
        ttft = time.perf_counter() - t0

        stream = _TextStreamer(self.tokenizer, params, B, on_text)
        stream.push(tok_list)
        positions = torch.tensor(lens, device=dev).unsqueeze(1)
        decode_tokens = 0
        t0 = time.perf_counter()
        for step in range(1, params.max_tokens):
            if stream.all_done:
                break
            step_ids = tokens.unsqueeze(1)
            if self._graph is not None:
                logits = self._graph(step_ids, positions)
            elif self.kv is not None:
                cache.begin_step(rows, [1] * B)
                logits = self.model(step_ids, positions, cache)[:, -1]
            elif self._cpu_step is not None:
                building = not self._cpu_step.built
                t_step = time.perf_counter()
                logits = self._cpu_step(step_ids, positions, cache, kv_len=cache.max_seq)[:, -1]
                if building:  # the first call compiles the step: warm-up, not decode (nor its token)
                    built_s = time.perf_counter() - t_step
                    warmup_s += built_s
                    t0 += built_s
                    decode_tokens -= B
            else:
                kv_len = max(lens) + step
                logits = self.model(step_ids, positions, cache, kv_len=kv_len)[:, -1]
            tokens = sample(logits, params, gen)
            positions = positions + 1
            stream.push(tokens.tolist())
            decode_tokens += B
        decode_s = time.perf_counter() - t0
        completions = stream.finish()
        return completions, GenerationStats(lens, ttft, decode_s, decode_tokens, warmup_s)


class _TextStreamer:
    """Tracks each row's tokens, EOS and stop strings, and emits text deltas."""

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, batch: int, on_text):
        self.tk, self.params, self.on_text = tokenizer, params, on_text
        self.rows = [Completion() for _ in range(batch)]
        self._emitted = [0] * batch
        self.eos = set() if params.ignore_eos or tokenizer is None else set(tokenizer.eos_token_ids)

    @property
    def all_done(self) -> bool:
        return all(r.finish_reason is not None for r in self.rows)

    def push(self, tokens: list[int]) -> None:
        for i, tok in enumerate(tokens):
            row = self.rows[i]
            if row.finish_reason is not None:
                continue
            row.token_ids.append(tok)
            if tok in self.eos:
                row.finish_reason = "stop"
            elif len(row.token_ids) >= self.params.max_tokens:
                row.finish_reason = "length"
            if self.tk is not None:
                self._update_text(i, row)

    def _update_text(self, i: int, row: Completion) -> None:
        text, stopped = cut_at_stop(self.tk.decode(row.token_ids), self.params.stop)
        if stopped:
            row.finish_reason = "stop"
        row.text = text
        visible = len(text) if row.finish_reason is not None else visible_length(text, self.params.stop)
        if self.on_text is not None and visible > self._emitted[i]:
            self.on_text(i, text[self._emitted[i]:visible])
        self._emitted[i] = max(self._emitted[i], visible)

    def finish(self) -> list[Completion]:
        for i, row in enumerate(self.rows):
            if row.finish_reason is None:
                row.finish_reason = "length"
            if self.on_text is not None and len(row.text) > self._emitted[i]:
                self.on_text(i, row.text[self._emitted[i]:])
                self._emitted[i] = len(row.text)
        return self.rows
