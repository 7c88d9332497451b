"""The engine loop: schedule a step, run it, turn sampled tokens into text and finishes.

Continuous batching: sequences join (add_request) and leave (finish, abort) between
any two steps; each step runs whatever the scheduler picked.

Steady decoding is pipelined on CUDA: step N+1 is queued on the GPU (its input tokens
taken from step N's samples on the device, marked PENDING on the host) before the
host reads step N's tokens, so the host's scheduling and bookkeeping overlap the GPU's
work instead of adding to it. A sequence that ends on a token of step N (EOS, stop
string) has already been given step N+1; that one token is computed and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from rarefy.engine.model_runner import ModelRunner
from rarefy.engine.scheduler import Scheduler
from rarefy.engine.sequence import PENDING, Sequence, SequenceStatus
from rarefy.engine.stop import cut_at_stop, visible_length
from rarefy.errors import RarefyError
from rarefy.kv.paged import PagedKVCache
from rarefy.layers.sampler import SamplingParams


@dataclass
class EngineOptions:
    kv_dtype: str = "bf16"
    block_size: int = 16
    kv_memory_bytes: int | None = None  # default: DEFAULT_KV_TOKENS[device type] tokens' worth
    attention_policy: object = None
    max_num_seqs: int = 64
    max_step_tokens: int = 1024
    use_cuda_graph: bool = True  # CUDA: replay captured graphs for decode-only steps
    compile: bool = False  # CUDA: torch.compile the decode step before capture (slow warm-up per bucket)
    pipeline: bool | None = None  # overlap host work with the GPU's decode (default: with CUDA graphs)


# A CPU cache of 32k tokens would be 1.5 GB in fp32 for a 135M model; 8k is the model's
# whole context and preemption takes care of bursts.
DEFAULT_KV_TOKENS = {"cuda": 32768, "cpu": 8192}


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
        default_tokens = DEFAULT_KV_TOKENS.get(model.device.type, DEFAULT_KV_TOKENS["cpu"])
        size = {"memory_bytes": o.kv_memory_bytes} if o.kv_memory_bytes else {"tokens": default_tokens}
        self.cache = PagedKVCache.for_model(cfg, device=model.device, kv_dtype=o.kv_dtype,
                                            block_size=o.block_size, policy=o.attention_policy, **size)
        self.scheduler = Scheduler(self.cache.blocks, o.max_num_seqs, o.max_step_tokens)
        self.runner = ModelRunner(model, self.cache, o.use_cuda_graph, compile=o.compile)
        self.eos = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
        self._emitted: dict[int, int] = {}
        self._inflight = None  # InFlight: a launched step whose tokens are not read back yet
        self.pipeline = self.runner.use_cuda_graph if o.pipeline is None else o.pipeline
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
        _drop_pending(seq)
        self._emitted.pop(seq.seq_id, None)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

    def step(self) -> list[StepOutput]:
        outs = []
        if self._inflight is not None and (self.scheduler.waiting or not self.pipeline):
            outs += self._resolve()  # an eager step (prefill) needs every token on the host
        step = self.scheduler.schedule()
        if not step:
            outs += self._resolve()
            if not outs and self.scheduler.waiting:
                raise RuntimeError("scheduler made no progress with an idle engine")
            return outs
        if self.pipeline and self.runner.decode_only(step):
            tokens = self.runner.launch_decode(step, self._inflight)
            for seq in step.seqs:
                seq.output_ids.append(PENDING)
            outs += self._resolve()
            self._inflight = tokens
            return outs
        if self._inflight is not None:
            outs += self._resolve()
            keep = [i for i, q in enumerate(step.seqs) if not q.is_finished]  # some just ended
            step.seqs, step.num_new = [step.seqs[i] for i in keep], [step.num_new[i] for i in keep]
            if not step:
                return outs
        for seq, tok in zip(step.seqs, self.runner.run(step)):
            if tok is not None:
                seq.output_ids.append(tok)
                outs.append(self._postprocess(seq, len(seq.output_ids)))
        return outs

    def _resolve(self) -> list[StepOutput]:
        """Read back the in-flight step's tokens and post-process them."""
        if self._inflight is None:
            return []
        flight, self._inflight = self._inflight, None
        outs = []
        for seq, tok in zip(flight.seqs, flight.read()):
            if seq.is_finished:  # ended (or was aborted) while this step was in flight
                continue
            ids = seq.output_ids
            i = len(ids) - 1  # the first PENDING: at most one newer step is in flight
            while i > 0 and ids[i - 1] == PENDING:
                i -= 1
            ids[i] = tok
            outs.append(self._postprocess(seq, i + 1))
        return outs

    def _postprocess(self, seq: Sequence, n: int) -> StepOutput:
        """The sequence's first n output tokens are known; the n-th was just sampled."""
        p, tok = seq.params, seq.output_ids[n - 1]
        reason = None
        if tok in self.eos and not p.ignore_eos:
            reason = "stop"
        elif n >= p.max_tokens:
            reason = "length"
        delta = ""
        if self.tokenizer is not None:
            ids = seq.output_ids[:n - 1] if reason == "stop" else seq.output_ids[:n]
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
            del seq.output_ids[n:]  # a token sampled after the end (pipelining) is dropped
            self.scheduler.finish(seq, reason)
            self._emitted.pop(seq.seq_id, None)
        return StepOutput(seq, tok, delta, seq.status is SequenceStatus.FINISHED)

    def kv_usage(self) -> float:
        return self.cache.usage()


def _drop_pending(seq: Sequence) -> None:
    if PENDING in seq.output_ids:
        del seq.output_ids[seq.output_ids.index(PENDING):]
