"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time

import openai
import pytest

from rarefy.engine.generate import Generator
from rarefy.engine.llm_engine import EngineOptions
from rarefy.layers.sampler import SamplingParams
from serverutil import TINY, get, live_server, post, wait_idle


def client(srv, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, **kw)


def aclient(srv, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def greedy(tiny, prompts, max_tokens):
    """Sequential greedy reference: rarefy generate's Generator, one prompt at a time."""
    gen = Generator(tiny.model, tiny.tokenizer)
    out = []
    for p, m in zip(prompts, max_tokens):
        c = gen.generate([p], SamplingParams(max_tokens=m, ignore_eos=True))[0][0]
        out.append(c)
    return out


def random_prompts(n, seed, max_len=40, max_new=24):
    rng = random.Random(seed)
    prompts = [[rng.randint(3, 300) for _ in range(rng.randint(1, max_len))] for _ in range(n)]
    return prompts, [rng.randint(1, max_new) for _ in range(n)]


async def stream_all(srv, prompts, max_tokens):
    """Stream every prompt at once; each: (text, finish_reason, completion_tokens)."""
    c = aclient(srv)

    async def one(p, m):
        text, reason, usage = "", None, None
        stream = await c.completions.create(model=TINY, prompt=p, max_tokens=m, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
        async for ch in stream:
            if ch.usage is not None:
                usage = ch.usage
            for choice in ch.choices:
                text += choice.text
                reason = choice.finish_reason or reason
        return text, reason, usage.completion_tokens

    try:
        return await asyncio.gather(*[one(p, m) for p, m in zip(prompts, max_tokens)])
    finally:
        await c.close()


# ---- the basics ---------------------------------------------------------------------------

def test_completion_chat_and_models(server, tiny):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [TINY]
    prompt = "The quick brown fox"
    ids = tiny.tokenizer.encode(prompt)
    want = greedy(tiny, [ids], [12])[0]
    r = c.completions.create(model=TINY, prompt=prompt, max_tokens=12, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    # token-id prompts, several prompts, n > 1 (greedy: identical choices)
    r = c.completions.create(model=TINY, prompt=[ids, ids[:3]], max_tokens=5, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    assert r.usage.prompt_tokens == len(ids) + 3
    # chat: the tokenizer's template, then generation
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sparse models run fast."}]
    chat_ids = tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(msgs))
    want = greedy(tiny, [chat_ids], [10])[0]
    r = c.chat.completions.create(model=TINY, messages=msgs, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(chat_ids) and r.usage.completion_tokens == 10
    r = c.chat.completions.create(model=TINY, messages=msgs, max_completion_tokens=3, temperature=0, n=3)
    assert len(r.choices) == 3 and all(ch.finish_reason in ("stop", "length") for ch in r.choices)
    wait_idle(server)


def test_streaming_completion_and_chat(server, tiny):
    c = client(server)
    prompt = "Perplexity measures"
    want = greedy(tiny, [tiny.tokenizer.encode(prompt)], [16])[0]
    chunks = list(c.completions.create(model=TINY, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    msgs = [{"role": "user", "content": "hello"}]
    chunks = list(c.chat.completions.create(model=TINY, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                            n=2, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = {0: "", 1: ""}
    reasons = {}
    for ch in chunks[:-1]:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert texts[0] == texts[1] and set(reasons) == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 2
    wait_idle(server)


def test_sampling_seed_stop_and_raw_sse(server, tiny):
    c = client(server)
    kw = dict(model=TINY, prompt="Sparse", max_tokens=12, temperature=0.9, top_p=0.9, seed=7,
              extra_body={"ignore_eos": True})
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    full = c.completions.create(model=TINY, prompt="Sparse", max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    if len(full) >= 4:
        stop = full[2:4]
        r = c.completions.create(model=TINY, prompt="Sparse", max_tokens=12, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.find(stop)]
    # the wire format: data: {...}\n\n ... data: [DONE]\n\n
    status, text = post(server, "/v1/completions", {"prompt": "Sparse", "max_tokens": 4, "stream": True,
                                                    "temperature": 0})
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])
    wait_idle(server)


# ---- concurrency, preemption ---------------------------------------------------------------

def test_16_concurrent_streams_equal_sequential_greedy_and_free_every_block(server, tiny):
    prompts, max_tokens = random_prompts(16, seed=0)
    want = greedy(tiny, prompts, max_tokens)
    got = asyncio.run(stream_all(server, prompts, max_tokens))
    for (text, reason, n), w, m in zip(got, want, max_tokens):
        assert (text, reason, n) == (w.text, "length", m)
    wait_idle(server)
    alloc = server.engine.engine.cache.allocator
    assert alloc.num_free == alloc.num_blocks


def test_preemption_with_a_small_cache_completes_every_request(tiny):
    cfg = tiny.model.config
    per_block = 8 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    opts = EngineOptions(kv_dtype="fp32", block_size=8, max_step_tokens=64, kv_memory_bytes=12 * per_block)
    prompts, max_tokens = random_prompts(8, seed=3)
    want = greedy(tiny, prompts, max_tokens)
    with live_server(tiny, opts) as srv:
        assert srv.engine.engine.cache.allocator.num_blocks == 12
        got = asyncio.run(stream_all(srv, prompts, max_tokens))
        assert [g[0] for g in got] == [w.text for w in want]
        wait_idle(srv)
        assert srv.engine.stats.preemptions > 0, "the workload should have forced a preemption"
        # one request larger than the whole cache is refused up front
        status, body = post(srv, "/v1/completions", {"prompt": [5] * 50, "max_tokens": 60})
        assert status == 400 and body["error"]["param"] == "max_tokens"


# ---- bad input ---------------------------------------------------------------------------

BAD = [
    ("invalid json", "/v1/completions", '{"prompt": "x", ', 400, None),
    ("not an object", "/v1/completions", "[1, 2]", 400, None),
    ("max_tokens a string", "/v1/completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("prompt a number", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("prompt missing", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("stream not a bool", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("temperature a string", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("messages a string", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("zero max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("huge max_tokens chat", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens"),
    ("prompt longer than the context", "/v1/completions", {"prompt": [5] * 300, "max_tokens": 1}, 400, "prompt"),
    ("text prompt longer than the context", "/v1/completions", {"prompt": "fox " * 400}, 400, "prompt"),
    ("chat longer than the context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "fox " * 400}]}, 400, "messages"),
    ("empty message list", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("empty token prompt", "/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("token id out of range", "/v1/completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("negative token id", "/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("n zero", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("temperature too high", "/v1/completions", {"prompt": "x", "temperature": 9}, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("empty stop", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("logprobs", "/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "tools": [{"type": "function"}]}, 400, "tools"),
    ("lone surrogate", "/v1/completions", '{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("image part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server):
    good = {"prompt": "The quick", "max_tokens": 3, "temperature": 0}
    for name, path, body, status, param in BAD:
        got, resp = post(server, path, body, raw=isinstance(body, str))
        assert got == status, (name, got, resp)
        assert set(resp) == {"error"} and set(resp["error"]) == {"message", "type", "param", "code"}, name
        assert resp["error"]["message"] and resp["error"]["param"] == param, (name, resp)
    assert post(server, "/v1/completions", good)[0] == 200
    for odd in ({"temperature": 1e-30}, {"seed": -3}, {"seed": 2**80}, {"top_p": 1e-30, "temperature": 1.5},
                {"top_k": 10**6, "temperature": 2}):
        status, resp = post(server, "/v1/completions", {**good, **odd})
        assert status == 200 and resp["usage"]["completion_tokens"] >= 1, (odd, resp)
    status, resp = get(server, "/v1/nothing")
    assert status == 404 and "error" in json.loads(resp)
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model=TINY, prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="nope", prompt="x")
    wait_idle(server)


def test_bad_input_amid_concurrent_streams(server, tiny):
    """Errors answered while other requests stream do not disturb them."""
    prompts, max_tokens = random_prompts(6, seed=11)
    want = greedy(tiny, prompts, max_tokens)
    result = {}
    t = threading.Thread(target=lambda: result.update(got=asyncio.run(stream_all(server, prompts, max_tokens))))
    t.start()
    for _, path, body, status, _ in BAD[:12]:
        assert post(server, path, body, raw=isinstance(body, str))[0] == status
    t.join(120)
    assert [g[0] for g in result["got"]] == [w.text for w in want]
    wait_idle(server)


# ---- disconnects -------------------------------------------------------------------------

def _open_stream(srv, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    aborted = server.engine.stats.finished["abort"]
    sock = _open_stream(server, {"prompt": [5] * 20, "max_tokens": 230, "stream": True, "ignore_eos": True,
                                 "temperature": 0})
    buf = b""
    while buf.count(b"data: ") < 3:  # a few tokens arrived: the sequence is running
        buf += sock.recv(65536)
    assert server.engine.engine.cache.allocator.num_used > 0
    sock.close()
    wait_idle(server)
    assert server.engine.stats.finished["abort"] == aborted + 1
    # the same for a non-streaming request left before its answer
    sock = _open_stream(server, {"prompt": [5] * 20, "max_tokens": 230, "ignore_eos": True})
    t0 = time.monotonic()
    while server.engine.stats.running == 0 and time.monotonic() - t0 < 10:
        time.sleep(0.005)
    sock.close()
    wait_idle(server)
    assert server.engine.stats.finished["abort"] == aborted + 2
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


# ---- API key, health, metrics --------------------------------------------------------------

def test_api_key(tiny):
    with live_server(tiny, api_key="s3cret") as srv:
        assert get(srv, "/health")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, text = get(srv, "/v1/models", headers)
            assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        assert get(srv, "/metrics")[0] == 401
        assert post(srv, "/v1/completions", {"prompt": "x"})[0] == 401
        with pytest.raises(openai.AuthenticationError):
            client(srv, "wrong").completions.create(model=TINY, prompt="x", max_tokens=2)
        r = client(srv, "s3cret").completions.create(model=TINY, prompt="x", max_tokens=2)
        assert r.usage.completion_tokens >= 1
        assert get(srv, "/metrics", {"Authorization": "Bearer s3cret"})[0] == 200


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)?\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def parse_metrics(text: str) -> dict:
    """name{labels} -> value; every line must be a comment or a valid sample."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(4))
    return out


def test_health_and_metrics(server):
    assert get(server, "/health") == (200, '{"status":"ok"}')
    c = client(server)
    c.completions.create(model=TINY, prompt="The quick", max_tokens=4)
    post(server, "/v1/completions", {"prompt": "x", "max_tokens": -1})
    status, text = get(server, "/metrics")
    assert status == 200
    m = parse_metrics(text)
    names = {k.split("{")[0] for k in m}
    for name in ("rarefy_num_requests_running", "rarefy_num_requests_waiting", "rarefy_kv_cache_usage_ratio",
                 "rarefy_time_to_first_token_seconds_bucket", "rarefy_inter_token_latency_seconds_bucket",
                 "rarefy_time_to_first_token_seconds_count", "rarefy_http_requests_total",
                 "rarefy_generation_tokens_total"):
        assert name in names, name
    ok = m[f'rarefy_http_requests_total{{model_name="{TINY}",endpoint="/v1/completions",status="200"}}']
    bad = m[f'rarefy_http_requests_total{{model_name="{TINY}",endpoint="/v1/completions",status="400"}}']
    assert ok >= 1 and bad >= 1
    assert m[f'rarefy_time_to_first_token_seconds_count{{model_name="{TINY}"}}'] >= 1
    assert m[f'rarefy_time_to_first_token_seconds_bucket{{model_name="{TINY}",le="+Inf"}}'] == \
        m[f'rarefy_time_to_first_token_seconds_count{{model_name="{TINY}"}}']
    assert 0.0 <= m[f'rarefy_kv_cache_usage_ratio{{model_name="{TINY}"}}'] <= 1.0


# ---- a small soak ------------------------------------------------------------------------

def test_soak_random_lengths_and_disconnects(server, tiny):
    """60 requests, 8 at a time: random lengths, streaming or not, chat or not, a quarter of
    them dropped mid-way by the client. No valid request gets an error; no block leaks."""
    from rarefy.bench.serve import soak
    res = soak(server.url, TINY, n=60, concurrency=8, seed=5, disconnect_frac=0.25, max_prompt=60,
               max_tokens=40)
    assert res["errors"] == [] and res["completed"] + res["disconnected"] == 60
    assert res["disconnected"] > 0 and res["completed"] > 30
    wait_idle(server)
    alloc = server.engine.engine.cache.allocator
    assert alloc.num_free == alloc.num_blocks
