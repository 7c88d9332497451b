"""The engine loop: schedule a step, run it, turn sampled tokens into text and finishes.

Continuous batching: sequences join (add_request) and leave (finish, abort) between
any two steps; each step runs whatever the scheduler picked.
"""

from __future__ import annotations

from dataclasses import dataclass

from rarefy.engine.model_runner import ModelRunner
from rarefy.engine.scheduler import Scheduler
from rarefy.engine.sequence import Sequence, SequenceStatus
from rarefy.engine.stop import cut_at_stop, visible_length
from rarefy.errors import RarefyError
from rarefy.kv.paged import PagedKVCache
from rarefy.layers.sampler import SamplingParams


@dataclass
class EngineOptions:
    kv_dtype: str = "bf16"
    block_size: int = 16
    kv_memory_bytes: int | None = None  # default: DEFAULT_KV_TOKENS tokens' worth
    attention_policy: object = None
    max_num_seqs: int = 64
    max_step_tokens: int = 1024
    use_cuda_graph: bool = True  # CUDA: replay captured graphs for decode-only steps


DEFAULT_KV_TOKENS = 32768


@dataclass
class StepOutput:
    seq: Sequence
    new_token: int | None  # sampled this step (None: prefill chunk, or finished by abort)
    text_delta: str  # newly visible text
    finished: bool


class LLMEngine:
    def __init__(self, model, tokenizer, options: EngineOptions | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.options = o = options or EngineOptions()
        cfg = model.config
        size = {"memory_bytes": o.kv_memory_bytes} if o.kv_memory_bytes else {"tokens": DEFAULT_KV_TOKENS}
        self.cache = PagedKVCache.for_model(cfg, device=model.device, kv_dtype=o.kv_dtype,
                                            block_size=o.block_size, policy=o.attention_policy, **size)
        self.scheduler = Scheduler(self.cache.blocks, o.max_num_seqs, o.max_step_tokens)
        self.runner = ModelRunner(model, self.cache, o.use_cuda_graph)
        self.eos = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
        self._emitted: dict[int, int] = {}
        self.max_context = cfg.max_position_embeddings

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> Sequence:
        if not prompt_ids:
            raise RarefyError("empty prompt: give at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise RarefyError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_context} tokens")
        seq = Sequence(list(prompt_ids), params, request_id)
        self.scheduler.add(seq)
        self._emitted[seq.seq_id] = 0
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence now (a client went away); its KV blocks are freed."""
        if not seq.is_finished:
            self.scheduler.finish(seq, "abort")
        self._emitted.pop(seq.seq_id, None)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[StepOutput]:
        step = self.scheduler.schedule()
        if not step:
            if self.scheduler.waiting:  # nothing fits although the cache is empty: cannot happen
                raise RuntimeError("scheduler made no progress with an idle engine")
            return []
        tokens = self.runner.run(step)
        outs = []
        for seq, tok in zip(step.seqs, tokens):
            if tok is None:
                continue
            seq.output_ids.append(tok)
            outs.append(self._postprocess(seq, tok))
        return outs

    def _postprocess(self, seq: Sequence, tok: int) -> StepOutput:
        p = seq.params
        reason = None
        if tok in self.eos and not p.ignore_eos:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        delta = ""
        if self.tokenizer is not None:
            ids = seq.output_ids[:-1] if reason == "stop" else seq.output_ids
            text, stopped = cut_at_stop(self.tokenizer.decode(ids), p.stop)
            if stopped:
                reason = "stop"
            seq.text = text
            visible = len(text) if reason else visible_length(text, p.stop)
            done = self._emitted.get(seq.seq_id, 0)
            if visible > done:
                delta = text[done:visible]
                self._emitted[seq.seq_id] = visible
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._emitted.pop(seq.seq_id, None)
        return StepOutput(seq, tok, delta, seq.status is SequenceStatus.FINISHED)

    def kv_usage(self) -> float:
        return self.cache.usage()
