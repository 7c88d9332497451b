"""The OpenAI-compatible HTTP API (FastAPI) over an AsyncEngine.

    /v1/completions, /v1/chat/completions   (stream: server-sent events, n, stop, ...)
    /v1/models, /health, /metrics

Every request is validated before it reaches the engine; bad input gets an
OpenAI-style error body ({"error": {"message", "type", "param", "code"}}) with a 4xx
status and touches nothing else. Each HTTP request watches its connection while its
sequences run: a client that goes away has them aborted, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rarefy.engine.async_engine import AsyncEngine, EngineDeadError, RequestOutput
from rarefy.errors import RarefyError
from rarefy.layers.sampler import SamplingParams
from rarefy.server import metrics
from rarefy.server.protocol import (MAX_N, MAX_STOP, ApiError, ChatCompletionRequest, CompletionRequest,
                                    ModelCard, error_body, new_id, now)

log = logging.getLogger("rarefy.server")

MAX_BODY_BYTES = 32 * 2**20
MAX_SEQS_PER_REQUEST = 256  # prompts x n
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class ServingState:
    """What the routes share: the engine, the tokenizer and the limits requests are checked against."""

    def __init__(self, engine: AsyncEngine, tokenizer, model_name: str, owns_engine: bool = True):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.owns_engine = owns_engine
        llm = engine.engine
        cfg = llm.model.config
        self.max_context = llm.max_context
        self.vocab_size = cfg.vocab_size
        blocks = llm.cache.blocks
        self.block_size, self.num_blocks = blocks.block_size, blocks.num_blocks
        self.evicting = blocks.evict_policy is not None
        self.requests = metrics.RequestCounter()
        self.created = now()

    # ---- request checks ------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{self.model_name}`.", param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise ApiError(400, "The prompt is empty: give at least one token.", param=param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"Token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1}).",
                           param=param)
        if len(ids) >= self.max_context:
            raise ApiError(400, f"This model's maximum context length is {self.max_context} tokens, "
                                f"but the prompt has {len(ids)} tokens; leave room for at least one "
                                "generated token.", param=param, code="context_length_exceeded")

    def sampling(self, req, prompt_len: int, max_tokens: int | None, default_max: int | None) -> SamplingParams:
        room = self.max_context - prompt_len
        if not self.evicting:  # one sequence alone must fit the KV cache
            room = min(room, self.num_blocks * self.block_size - prompt_len)
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
            if max_tokens < 1:
                raise ApiError(400, f"The prompt ({prompt_len} tokens) leaves no room in the context "
                                    f"({self.max_context} tokens) or the KV cache.", param="prompt",
                               code="context_length_exceeded")
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
        if prompt_len + max_tokens > self.max_context:
            raise ApiError(400, f"This model's maximum context length is {self.max_context} tokens. "
                                f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in "
                                f"the prompt, {max_tokens} for the completion). Please reduce the prompt "
                                "or max_tokens.", param="max_tokens", code="context_length_exceeded")
        if max_tokens > room:
            raise ApiError(400, f"The prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) does "
                                f"not fit the server's KV cache ({self.num_blocks * self.block_size} "
                                "tokens); reduce max_tokens.", param="max_tokens")
        temperature = 1.0 if req.temperature is None else req.temperature
        if not 0.0 <= temperature <= 2.0:
            raise ApiError(400, f"temperature must be between 0 and 2, got {temperature}.",
                           param="temperature")
        if temperature < 1e-5:  # dividing logits by a tiny temperature overflows: it is greedy anyway
            temperature = 0.0
        top_p = 1.0 if req.top_p is None else req.top_p
        if not 0.0 < top_p <= 1.0:
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p}.", param="top_p")
        top_k = 0 if req.top_k in (None, -1) else req.top_k
        if top_k < 0:
            raise ApiError(400, f"top_k must be -1, 0 (off) or positive, got {top_k}.", param="top_k")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"At most {MAX_STOP} stop strings, got {len(stop)}.", param="stop")
        if any(not s for s in stop):
            raise ApiError(400, "Stop strings must not be empty.", param="stop")
        seed = None if req.seed is None else req.seed % 2**63  # any integer; torch takes 64 bits
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop=tuple(stop), ignore_eos=req.ignore_eos)

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except Exception as e:  # the tokenizer refuses some strings (lone surrogates)
            raise ApiError(400, f"The {param} cannot be tokenized: {e}", param=param) from None

    def check_common(self, req) -> None:
        self.check_model(req.model)
        if not 1 <= req.n <= MAX_N:
            raise ApiError(400, f"n must be between 1 and {MAX_N}, got {req.n}.", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported by this server.", param=name)
        if req.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server.", param="logit_bias")

    # ---- running requests ----------------------------------------------------------------

    def jobs(self, prompts: list[list[int]], n: int, params: list[SamplingParams]):
        """One (prompt, params) per choice: prompt i's choices are i*n ... i*n+n-1."""
        if len(prompts) * n > MAX_SEQS_PER_REQUEST:
            raise ApiError(400, f"{len(prompts)} prompts x n={n} is more than {MAX_SEQS_PER_REQUEST} "
                                "sequences in one request.", param="n")
        out = []
        for ids, p in zip(prompts, params):
            for j in range(n):
                out.append((ids, p if p.seed is None or j == 0 else replace(p, seed=p.seed + j)))
        return out

    async def start(self, request: Request, jobs) -> "_Run":
        run = _Run(self, request, jobs)
        run.start()
        return run


class _Run:
    """The sequences of one HTTP request: all feed one queue; a watcher aborts them all
    when the client disconnects."""

    def __init__(self, state: ServingState, request: Request, jobs):
        self.state, self.request, self.jobs = state, request, jobs
        base = new_id("req")
        self.ids = [f"{base}-{i}" for i in range(len(jobs))]
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done: set[str] = set()
        self.watcher: asyncio.Task | None = None
        self.disconnected = False

    def start(self) -> None:
        try:
            for rid, (ids, p) in zip(self.ids, self.jobs):
                self.state.engine.add_request(rid, ids, p, self.queue)
        except EngineDeadError as e:
            self.abort()
            raise ApiError(503, f"The engine is not running: {e}", type="server_error") from None
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            msg = await self.request.receive()
            if msg["type"] == "http.disconnect":
                break
        self.disconnected = True
        self.abort()

    def abort(self) -> None:
        for rid in self.ids:
            if rid not in self.done:
                self.state.engine.abort(rid)

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.ids)

    async def next(self) -> tuple[int, RequestOutput]:
        out = await self.queue.get()
        if out.finished:
            self.done.add(out.request_id)
        if out.error is not None:
            self.abort()
            if isinstance(out.error, RarefyError):
                raise ApiError(400, str(out.error))
            if isinstance(out.error, EngineDeadError):
                raise ApiError(503, str(out.error), type="server_error")
            raise ApiError(500, f"The engine failed: {out.error!r}", type="server_error")
        return self.index[out.request_id], out

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        self.abort()


class _SSEResponse(Response):
    """Server-sent events from an async generator of bytes; the generator is closed
    whatever happens (so its run is aborted when the client goes away)."""

    media_type = "text/event-stream"

    def __init__(self, gen):
        self.gen = gen
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.gen:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away
        finally:
            await self.gen.aclose()


def _sse(obj) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


# ---- the two generation endpoints --------------------------------------------------------

class _Completion:
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, state: ServingState, req: CompletionRequest):
        self.state, self.req = state, req
        if req.echo:
            raise ApiError(400, "echo is not supported by this server.", param="echo")
        if req.logprobs is not None:
            raise ApiError(400, "logprobs is not supported by this server.", param="logprobs")
        if req.suffix:
            raise ApiError(400, "suffix is not supported by this server.", param="suffix")
        if req.best_of not in (None, req.n):
            raise ApiError(400, "best_of is not supported by this server (leave it equal to n).",
                           param="best_of")
        state.check_common(req)
        self.prompts = self._prompt_ids(req.prompt)
        for p in self.prompts:
            state.check_prompt(p, "prompt")
        self.params = [state.sampling(req, len(p), req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
                       for p in self.prompts]

    def _prompt_ids(self, prompt) -> list[list[int]]:
        tk = self.state.tokenizer
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "The prompt list is empty.", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        if isinstance(prompt[0], list):
            return [list(p) for p in prompt]
        if tk is None:
            raise ApiError(400, "This model has no tokenizer: give the prompt as token ids.", param="prompt")
        return [self.state.encode(p, "prompt") for p in prompt]

    def choice(self, i: int, text: str, reason: str | None) -> dict:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

    delta_choice = choice

    def first_chunks(self, n_choices: int) -> list:
        return []


class _Chat(_Completion):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, state: ServingState, req: ChatCompletionRequest):
        self.state, self.req = state, req
        if not req.messages:
            raise ApiError(400, "messages must not be empty.", param="messages")
        if req.logprobs:
            raise ApiError(400, "logprobs is not supported by this server.", param="logprobs")
        if req.tools or req.functions:
            raise ApiError(400, "Tools and functions are not supported by this server.", param="tools")
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise ApiError(400, f"response_format {fmt!r} is not supported by this server.",
                           param="response_format")
        state.check_common(req)
        tk = state.tokenizer
        if tk is None or not tk.chat_template:
            raise ApiError(400, "This model has no chat template; use /v1/completions.", param="messages")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tk.apply_chat_template(msgs)
        except RarefyError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = state.encode(text, "messages")
        state.check_prompt(ids, "messages")
        self.prompts = [ids]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        self.params = [state.sampling(req, len(ids), max_tokens, None)]

    def choice(self, i: int, text: str, reason: str | None) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}

    def delta_choice(self, i: int, text: str, reason: str | None) -> dict:
        return {"index": i, "delta": {"content": text} if text or reason is None else {},
                "logprobs": None, "finish_reason": reason}

    def first_chunks(self, n_choices: int) -> list:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(n_choices)]


async def _serve(state: ServingState, request: Request, ep: _Completion):
    req = ep.req
    jobs = state.jobs(ep.prompts, req.n, ep.params)
    prompt_tokens = sum(len(p) for p in ep.prompts)
    rid, created, model = new_id(ep.id_prefix), now(), state.model_name
    run = await state.start(request, jobs)

    def envelope(obj_type: str, **fields) -> dict:
        return {"id": rid, "object": obj_type, "created": created, "model": model, **fields}

    if not req.stream:
        try:
            finals: dict[int, RequestOutput] = {}
            while not run.finished:
                i, out = await run.next()
                if out.finished:
                    finals[i] = out
        finally:
            run.close()
        if run.disconnected:
            return Response(status_code=499)
        choices = [ep.choice(i, finals[i].text or "", finals[i].finish_reason) for i in sorted(finals)]
        completion_tokens = sum(o.output_tokens for o in finals.values())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return JSONResponse(envelope(ep.object, choices=choices, usage=usage))

    # streaming: wait for the first output, so a failure is still an error status
    try:
        first = await run.next()
    except BaseException:
        run.close()
        raise
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        completion_tokens: dict[int, int] = {}
        try:
            for c in ep.first_chunks(len(jobs)):
                yield _sse(envelope(ep.chunk_object, choices=[c]))
            item = first
            while True:
                i, out = item
                if out.finish_reason == "abort":
                    return  # the client went away (or the server is stopping)
                completion_tokens[i] = out.output_tokens
                reason = out.finish_reason if out.finished else None
                if out.text_delta or reason is not None:
                    yield _sse(envelope(ep.chunk_object, choices=[ep.delta_choice(i, out.text_delta, reason)]))
                if run.finished:
                    break
                try:
                    item = await run.next()
                except ApiError as e:
                    yield _sse(e.body())
                    yield DONE
                    return
            if include_usage:
                ct = sum(completion_tokens.values())
                yield _sse(envelope(ep.chunk_object, choices=[], usage={
                    "prompt_tokens": prompt_tokens, "completion_tokens": ct,
                    "total_tokens": prompt_tokens + ct}))
            yield DONE
        finally:
            run.close()

    return _SSEResponse(events())


# ---- the app -------------------------------------------------------------------------------

class _AuthAndCount:
    """ASGI middleware: the API key check (every route but /health) and the request counter."""

    def __init__(self, app, state: ServingState, api_key: str | None):
        self.app, self.state = app, state
        self.key = api_key.encode() if api_key else None

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return secrets.compare_digest(value[7:].strip(), self.key)
            if name == b"x-api-key":
                return secrets.compare_digest(value.strip(), self.key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]
        if self.key is not None and path != "/health" and not self._authorized(scope):
            status[0] = 401
            resp = JSONResponse(error_body("Incorrect or missing API key: send it as "
                                           "'Authorization: Bearer <key>'.", code="invalid_api_key"),
                                status_code=401, headers={"www-authenticate": "Bearer"})
            await resp(scope, receive, send)
            self.state.requests.inc(endpoint, 401)
            return

        async def counting_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.state.requests.inc(endpoint, status[0])


async def _parse(request: Request, model_cls):
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        # a union reports one error per member; the field is what the client needs
        param = ".".join(str(x) for x in errs[0]["loc"][:1]) or None
        parts = []
        for err in errs[:3]:
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
        raise ApiError(400, "Invalid request: " + "; ".join(parts) + more, param=param) from None


def create_app(engine: AsyncEngine, tokenizer, model_name: str, api_key: str | None = None,
               owns_engine: bool = True) -> FastAPI:
    """The FastAPI app over a running AsyncEngine. With owns_engine the app shuts the
    engine down when it stops."""
    state = ServingState(engine, tokenizer, model_name, owns_engine)

    @asynccontextmanager
    async def lifespan(app):
        yield
        if state.owns_engine:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="rarefy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body(f"Internal server error: {exc!r}", type="server_error"),
                            status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(state, request, _Completion(state, await _parse(request, CompletionRequest)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(state, request, _Chat(state, await _parse(request, ChatCompletionRequest)))

    @app.get("/v1/models")
    async def models():
        card = ModelCard(id=model_name, created=state.created, max_model_len=state.max_context,
                         vocab_size=state.vocab_size)
        return {"object": "list", "data": [card.model_dump()]}

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return JSONResponse({"status": "error", "message": "the engine is not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(model_name, engine.stats, state.requests),
                        media_type=metrics.CONTENT_TYPE)

    app.add_middleware(_AuthAndCount, state=state, api_key=api_key)
    return app
