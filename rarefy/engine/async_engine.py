"""An asyncio front for LLMEngine: one background thread steps the engine, any number
of coroutines add requests and read their tokens as they come.

    engine = AsyncEngine(LLMEngine(model, tokenizer, options))
    async for out in engine.generate("req-1", prompt_ids, SamplingParams(max_tokens=32)):
        print(out.text_delta, end="")
    engine.shutdown()

LLMEngine is not thread-safe, so only the engine thread touches it. Adds and aborts
go through a lock-protected inbox that the thread applies between two steps; each
step's outputs go back to the event loop of the request's owner with one
`loop.call_soon_threadsafe` per step and loop, into per-request asyncio queues. The
thread sleeps on a condition variable while there is no work.

A request that cannot be served (a prompt longer than the context, an engine
failure) gets an output whose `error` is set; iterating its stream raises it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from rarefy.engine.llm_engine import LLMEngine
from rarefy.engine.sequence import Sequence
from rarefy.errors import RarefyError
from rarefy.layers.sampler import SamplingParams

log = logging.getLogger("rarefy.engine")

# Prometheus-style bucket bounds (seconds): a CPU decode step is tens of ms, a GPU one ~10 ms.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down, or it crashed)."""


@dataclass
class RequestOutput:
    """One request's news from one engine step."""
    request_id: str
    token_id: int | None  # sampled this step (None on an abort or an error)
    text_delta: str  # newly visible text
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" (finished only)
    prompt_tokens: int = 0
    output_tokens: int = 0  # tokens generated so far
    text: str | None = None  # the whole output text (finished only)
    token_ids: list[int] | None = None  # every generated token (finished only)
    error: BaseException | None = None  # the request failed; finished is True


class Histogram:
    """A cumulative histogram (Prometheus semantics); thread-safe."""

    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        with self._lock:
            self.counts[i] += 1
            self.sum += v
            self.count += 1

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """([(upper bound, cumulative count)], sum, count); the last bound is +inf."""
        with self._lock:
            acc, out = 0, []
            for b, c in zip(self.buckets + (float("inf"),), self.counts):
                acc += c
                out.append((b, acc))
            return out, self.sum, self.count


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0  # in the scheduler's queue or not yet taken from the inbox
    kv_usage: float = 0.0  # fraction of KV blocks in use
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens of requests admitted
    generated_tokens: int = 0
    preemptions: int = 0
    finished: dict = field(default_factory=lambda: defaultdict(int))  # finish reason -> requests
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))


class RequestStream:
    """The outputs of one request, read from its owner's event loop: async-iterate it, or
    await `get()`. Iteration ends after the finished output and raises a request's error."""

    def __init__(self, engine: "AsyncEngine", request_id: str, loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue | None):
        self.engine, self.request_id, self.loop = engine, request_id, loop
        self.queue = queue if queue is not None else asyncio.Queue()
        self.arrival = time.monotonic()
        self.tokens = 0  # generated so far (counted by the engine thread)
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished = False

    def _deliver(self, out: RequestOutput) -> None:
        """On the owner's loop: record latencies, then hand the output over."""
        now = time.monotonic()
        stats = self.engine.stats
        if out.token_id is not None:
            if self.first_token_time is None:
                self.first_token_time = now
                stats.ttft.observe(now - self.arrival)
            else:
                stats.itl.observe(now - self.last_token_time)
            self.last_token_time = now
        if out.finished:
            self.finished = True
            if out.error is None and out.finish_reason != "abort":
                stats.e2e.observe(now - self.arrival)
        self.queue.put_nowait(out)

    async def get(self) -> RequestOutput:
        return await self.queue.get()

    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self.request_id)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished and self.queue.empty():
            raise StopAsyncIteration
        out = await self.queue.get()
        if out.error is not None:
            raise out.error
        return out


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.stats = EngineStats(kv_blocks_total=engine.cache.allocator.num_blocks)
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []  # ("add", stream, prompt_ids, params) | ("abort", request_id)
        self._active: dict[str, tuple[Sequence, RequestStream]] = {}  # engine thread only
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rarefy-engine", daemon=True)
        self._thread.start()

    # ---- the caller's side (any thread with a running event loop) --------------------------

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    queue: asyncio.Queue | None = None) -> RequestStream:
        """Queue a request; call from a coroutine. Its outputs go to the returned stream's
        queue, or to `queue` when given (one queue can collect several requests: the
        outputs carry their request_id)."""
        stream = RequestStream(self, request_id, asyncio.get_running_loop(), queue)
        with self._cv:
            if self._stopping or not self._thread.is_alive():
                raise EngineDeadError("the engine is not running" +
                                      (f": {self._error!r}" if self._error is not None else ""))
            self._inbox.append(("add", stream, list(prompt_ids), params))
            self._cv.notify()
        return stream

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        """Async iterator over the request's outputs; leaving the loop early (or being
        cancelled) aborts the request and frees its KV blocks."""
        stream = self.add_request(request_id, prompt_ids, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe); its stream gets a finished output with
        finish_reason "abort" unless it already finished."""
        with self._cv:
            self._inbox.append(("abort", request_id))
            self._cv.notify()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the thread after the current step; unfinished requests end with an error."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._inbox and not self.engine.has_work and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    ops, self._inbox = self._inbox, []
                out: dict = defaultdict(list)  # loop -> [(stream, output)]
                self._apply(ops, out)
                if self.engine.has_work:
                    self._step(out)
                self._update_stats()
                self._send(out)
        except BaseException as e:  # a bug in the engine loop itself: fail everyone, stop
            log.exception("the engine thread crashed")
            self._error = e
        finally:
            with self._cv:
                self._stopping = True
            self._fail_all(self._error or EngineDeadError("the server is shutting down"))
            self._update_stats()

    def _apply(self, ops, out) -> None:
        eng = self.engine
        for op in ops:
            if op[0] == "add":
                _, stream, prompt_ids, params = op
                rid = stream.request_id
                try:
                    if rid in self._active:
                        raise RarefyError(f"request id {rid!r} is already running")
                    seq = eng.add_request(prompt_ids, params, rid)
                except Exception as e:
                    out[stream.loop].append((stream, RequestOutput(rid, None, "", True, error=e,
                                                                   prompt_tokens=len(prompt_ids))))
                    continue
                self._active[rid] = (seq, stream)
                self.stats.prompt_tokens += len(prompt_ids)
            else:
                entry = self._active.pop(op[1], None)
                if entry is None:
                    continue  # finished already, or never added
                seq, stream = entry
                eng.abort(seq)
                self.stats.finished["abort"] += 1
                out[stream.loop].append((stream, RequestOutput(
                    seq.request_id, None, "", True, "abort", len(seq.prompt_ids), stream.tokens,
                    seq.text, list(seq.output_ids))))

    def _step(self, out) -> None:
        try:
            results = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(e)
            return
        self.stats.steps += 1
        for r in results:
            seq = r.seq
            entry = self._active.get(seq.request_id)
            if entry is None or entry[0] is not seq:
                continue
            stream = entry[1]
            if r.new_token is not None:
                self.stats.generated_tokens += 1
                stream.tokens += 1  # counted here: output_ids may hold a token still on the device
            o = RequestOutput(seq.request_id, r.new_token, r.text_delta, r.finished,
                              prompt_tokens=len(seq.prompt_ids), output_tokens=stream.tokens)
            if r.finished:
                o.finish_reason, o.text, o.token_ids = seq.finish_reason, seq.text, list(seq.output_ids)
                o.output_tokens = len(o.token_ids)
                del self._active[seq.request_id]
                self.stats.finished[seq.finish_reason] += 1
                self.stats.preemptions += seq.num_preemptions
            out[stream.loop].append((stream, o))

    def _fail_all(self, error: BaseException) -> None:
        """Abort every request in flight and hand each the error."""
        out: dict = defaultdict(list)
        with self._cv:
            ops, self._inbox = self._inbox, []
        for op in ops:
            if op[0] == "add":
                stream = op[1]
                out[stream.loop].append((stream, RequestOutput(stream.request_id, None, "", True,
                                                               error=error)))
        for rid, (seq, stream) in list(self._active.items()):
            try:
                self.engine.abort(seq)
            except Exception:
                log.exception("aborting %s failed", rid)
            out[stream.loop].append((stream, RequestOutput(rid, None, "", True, error=error,
                                                           prompt_tokens=len(seq.prompt_ids),
                                                           output_tokens=stream.tokens)))
        self._active.clear()
        self._send(out)

    def _update_stats(self) -> None:
        s, sch, alloc = self.stats, self.engine.scheduler, self.engine.cache.allocator
        s.running = len(sch.running)
        s.waiting = len(sch.waiting) + sum(op[0] == "add" for op in self._inbox)
        s.kv_blocks_used = alloc.num_used
        s.kv_usage = alloc.num_used / alloc.num_blocks

    def _send(self, out) -> None:
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for stream, o in items:
                    if not o.finished:
                        self.abort(stream.request_id)


def _deliver_all(items) -> None:
    for stream, o in items:
        stream._deliver(o)
