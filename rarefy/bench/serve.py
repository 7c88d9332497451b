"""`rarefy bench serve`: load-test an OpenAI-compatible server (rarefy's own, started in
this process, or any running one) and report requests/s, output tokens/s, time to first
token and time per output token.

Every request streams from /v1/completions with `stream_options.include_usage` (the
output token count comes from the server) and `ignore_eos` (fixed output lengths). The
client is plain `http.client`, one thread per request in flight.

    TTFT  = arrival of the first streamed chunk - send time
    TPOT  = (latency - TTFT) / (output tokens - 1)      per request
    ITL   = gap between two streamed chunks
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rarefy.errors import RarefyError

WIKITEXT_VALID = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "wikitext-2",
                              "valid.txt")


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    disconnected: bool = False

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


class Client:
    """Requests to one server; thread-safe (one connection per request)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme != "http":
            raise RarefyError(f"--url must be an http:// address, got {url!r}")
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.prefix = u.path.rstrip("/")
        if self.prefix.endswith("/v1"):
            self.prefix = self.prefix[:-3]
        self.api_key, self.timeout = api_key, timeout

    def _headers(self) -> dict:
        h = {"content-type": "application/json"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h

    def get_json(self, path: str) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", self.prefix + path, headers=self._headers())
            r = conn.getresponse()
            body = r.read()
        except OSError as e:
            raise RarefyError(f"cannot reach the server at {self.host}:{self.port}: {e}") from None
        finally:
            conn.close()
        if r.status != 200:
            raise RarefyError(f"GET {path}: HTTP {r.status}: {body[:300].decode(errors='replace')}")
        return json.loads(body)

    def request(self, path: str, body: dict, drop_after_chunks: int | None = None,
                drop_after_s: float | None = None) -> RequestResult:
        """POST one request; streamed when body["stream"]. drop_after_*: hang up after that
        many chunks (streaming) or seconds (not streaming), as a client that goes away."""
        res = RequestResult(ok=False)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        t0 = time.perf_counter()
        try:
            conn.request("POST", self.prefix + path, body=json.dumps(body), headers=self._headers())
            if drop_after_s is not None and not body.get("stream"):
                time.sleep(drop_after_s)
                _hang_up(conn)
                res.disconnected = True
                return res
            r = conn.getresponse()
            res.status = r.status
            if r.status != 200:
                payload = r.read().decode(errors="replace")
                res.error = f"HTTP {r.status}: {payload[:500]}"
                return res
            if not body.get("stream"):
                data = json.loads(r.read())
                res.latency = time.perf_counter() - t0
                usage = data.get("usage") or {}
                res.prompt_tokens = usage.get("prompt_tokens", 0)
                res.output_tokens = usage.get("completion_tokens", 0)
                ch = data["choices"][0]
                res.finish_reason = ch.get("finish_reason")
                res.text = ch.get("text") if "text" in ch else (ch.get("message") or {}).get("content") or ""
                res.ok = True
                return res
            self._read_stream(r, res, t0, drop_after_chunks, conn)
            return res
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            if res.disconnected:
                return res
            res.error = f"{type(e).__name__}: {e}"
            return res
        finally:
            conn.close()

    @staticmethod
    def _read_stream(r, res: RequestResult, t0: float, drop_after: int | None, conn) -> None:
        last, chunks, done = None, 0, False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                done = True
                break
            obj = json.loads(payload)
            if "error" in obj:
                res.error = f"in-stream error: {obj['error'].get('message')}"
                return
            now = time.perf_counter()
            if obj.get("usage"):
                res.prompt_tokens = obj["usage"].get("prompt_tokens", 0)
                res.output_tokens = obj["usage"].get("completion_tokens", 0)
            for ch in obj.get("choices") or ():
                piece = ch.get("text")
                if piece is None:
                    piece = (ch.get("delta") or {}).get("content") or ""
                res.text += piece
                if ch.get("finish_reason"):
                    res.finish_reason = ch["finish_reason"]
                if piece or ch.get("finish_reason"):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
            if drop_after is not None and chunks >= drop_after:
                _hang_up(conn)
                res.disconnected = True
                return
        res.latency = time.perf_counter() - t0
        if not done:
            res.error = "the stream ended without data: [DONE]"
            return
        res.ok = True


def _hang_up(conn: http.client.HTTPConnection) -> None:
    if conn.sock is not None:
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


# ---- workloads ---------------------------------------------------------------------------

def synthetic_prompts(n: int, tokens: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """n prompts of exactly `tokens` token ids, drawn away from the vocabulary's ends
    (where special tokens usually sit)."""
    lo = min(1000, vocab_size // 4)
    hi = max(lo + 1, vocab_size // 2)
    rng = random.Random(seed)
    return [[rng.randrange(lo, hi) for _ in range(tokens)] for _ in range(n)]


def wikitext_prompts(n: int, tokens: int, tokenizer=None, path: str | None = None,
                     seed: int = 0) -> list:
    """n prompts cut from WikiText-2 validation paragraphs: `tokens` token ids each with a
    tokenizer, else about that many tokens of text (0.75 words a token)."""
    path = path or WIKITEXT_VALID
    if not os.path.isfile(path):
        raise RarefyError(f"WikiText-2 validation text not found at {path} (give --dataset-path)")
    with open(path, encoding="utf-8") as f:
        paras = [ln.strip() for ln in f if len(ln.split()) > 20 and not ln.strip().startswith("=")]
    if not paras:
        raise RarefyError(f"{path} has no paragraphs")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = " ".join(rng.choice(paras) for _ in range(1 + tokens // 100))
        if tokenizer is not None:
            ids = tokenizer.encode(text)[:tokens]
            if len(ids) == tokens:
                out.append(ids)
        else:
            out.append(" ".join(text.split()[:max(1, int(tokens * 0.75))]))
    return out


# ---- running a workload --------------------------------------------------------------------

def percentiles(xs: list[float], scale: float = 1000.0) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    s = sorted(xs)

    def q(p):  # linear interpolation, as numpy's default
        k = (len(s) - 1) * p
        f = math.floor(k)
        c = min(f + 1, len(s) - 1)
        return (s[f] + (s[c] - s[f]) * (k - f)) * scale

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": sum(s) / len(s) * scale}


def run_workload(client: Client, model: str, prompts: list, output_tokens: int, concurrency: int,
                 request_rate: float = math.inf, seed: int = 0, temperature: float = 0.0) -> dict:
    """Send every prompt (at most `concurrency` in flight; arrivals Poisson at `request_rate`
    per second, or all at once); returns the summary dict."""
    rng = random.Random(seed)
    results: list[RequestResult | None] = [None] * len(prompts)

    def one(i: int) -> None:
        body = {"model": model, "prompt": prompts[i], "max_tokens": output_tokens, "temperature": temperature,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        results[i] = client.request("/v1/completions", body)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = []
        for i in range(len(prompts)):
            if math.isfinite(request_rate) and i:
                time.sleep(rng.expovariate(request_rate))
            futures.append(pool.submit(one, i))
        for f in futures:
            f.result()
    duration = time.perf_counter() - t0
    return summarize(results, duration, concurrency, request_rate)


def summarize(results: list[RequestResult], duration: float, concurrency: int, request_rate: float) -> dict:
    ok = [r for r in results if r is not None and r.ok]
    errors = [r.error for r in results if r is not None and not r.ok and not r.disconnected]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "request_rate": None if not math.isfinite(request_rate) else request_rate,
        "requests": len(results), "completed": len(ok), "errors": len(errors), "error_samples": errors[:3],
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else 0.0,
        "total_tokens_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration if duration > 0 else 0.0,
        "mean_prompt_tokens": sum(r.prompt_tokens for r in ok) / len(ok) if ok else 0.0,
        "mean_output_tokens": out_tokens / len(ok) if ok else 0.0,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": percentiles([r.latency for r in ok]),
    }


def format_table(rows: list[dict]) -> str:
    head = ("conc", "rate", "ok/sent", "err", "time s", "req/s", "out tok/s", "TTFT p50/p90/p99 ms",
            "TPOT p50/p90/p99 ms")

    def trio(d):
        return "/".join("-" if d[k] is None else f"{d[k]:.0f}" if d[k] >= 100 else f"{d[k]:.1f}"
                        for k in ("p50", "p90", "p99"))

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rate = "inf" if r["request_rate"] is None else f"{r['request_rate']:g}"
        lines.append("| " + " | ".join([
            str(r["concurrency"]), rate, f"{r['completed']}/{r['requests']}", str(r["errors"]),
            f"{r['duration_s']:.1f}", f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.1f}",
            trio(r["ttft_ms"]), trio(r["tpot_ms"])]) + " |")
    return "\n".join(lines)


# ---- soak --------------------------------------------------------------------------------

WORDS = ("the quick brown fox jumps over lazy dog sparse models run fast perplexity measures how "
         "surprised a model is by text").split()


def soak(url: str, model: str, n: int, concurrency: int = 8, seed: int = 0, disconnect_frac: float = 0.25,
         max_prompt: int = 64, max_tokens: int = 64, api_key: str | None = None,
         progress=None) -> dict:
    """n requests with random prompt and output lengths, streaming or not, completion or
    chat, some dropped by the client mid-way. Returns {completed, disconnected, errors:
    [messages of valid requests that failed or came back wrong]}."""
    client = Client(url, api_key)
    vocab = client.get_json("/v1/models")["data"][0].get("vocab_size") or 0
    rng = random.Random(seed)
    plans = []
    for _ in range(n):
        m = rng.randint(1, max_tokens)
        stream, chat = rng.random() < 0.7, rng.random() < 0.3
        plen = rng.randint(1, max_prompt)
        if chat or vocab < 8:
            body = {"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(plen))}]}
            path = "/v1/chat/completions"
        else:
            body = {"prompt": [rng.randrange(3, vocab) for _ in range(plen)]}
            path = "/v1/completions"
        body.update(model=model, max_tokens=m, stream=stream, ignore_eos=True,
                    temperature=rng.choice([0.0, 0.0, 0.8]), seed=rng.randrange(1000))
        if stream:
            body["stream_options"] = {"include_usage": True}
        drop = rng.random() < disconnect_frac
        kw = {}
        if drop and stream:
            kw["drop_after_chunks"] = rng.randint(1, max(1, m - 1))
        elif drop:
            kw["drop_after_s"] = rng.uniform(0.0, 0.3)
        plans.append((path, body, kw))

    results: list[RequestResult | None] = [None] * n
    done = [0]
    lock = threading.Lock()

    def one(i):
        path, body, kw = plans[i]
        results[i] = client.request(path, body, **kw)
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], n)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n)))
    errors, completed, disconnected = [], 0, 0
    for (path, body, _), r in zip(plans, results):
        if r.disconnected:
            disconnected += 1
            continue
        if not r.ok:
            errors.append(f"{path}: {r.error}")
            continue
        if r.output_tokens != body["max_tokens"] or r.finish_reason != "length":
            errors.append(f"{path}: {r.output_tokens} tokens ({r.finish_reason}) for max_tokens "
                          f"{body['max_tokens']} with ignore_eos")
            continue
        completed += 1
    return {"requests": n, "completed": completed, "disconnected": disconnected, "errors": errors,
            "duration_s": time.perf_counter() - t0}


# ---- the whole benchmark (rarefy bench serve) -----------------------------------------------

@dataclass
class ServeBenchConfig:
    url: str | None = None  # a running server; None: start one in this process
    api_key: str | None = None
    num_prompts: int = 32
    concurrency: tuple[int, ...] = (1, 8)
    request_rate: float = math.inf
    dataset: str = "synthetic"  # or "wikitext"
    dataset_path: str | None = None
    prompt_tokens: int = 32
    output_tokens: int = 64
    warmup: int = 2
    seed: int = 0
    command: str = "rarefy bench serve"


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_bench(cfg: ServeBenchConfig, loaded=None, options=None, progress=None, labels: dict | None = None) -> dict:
    """Run the workload once per concurrency level, against cfg.url or a server started here
    over `loaded` (rarefy.models.loader's result) with engine `options`."""
    from rarefy.bench.machine import cpu_name

    srv = None
    info: dict = {"command": cfg.command, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(),
                  "cores": os.cpu_count()}
    try:
        if cfg.url is None:
            from rarefy.server import ServerThread, build_server
            app = build_server(loaded, options)
            srv = ServerThread(app).start()
            url = srv.url
            st = app.state.serving
            import torch
            info["server"] = {"in_process": True, "model": st.model_name,
                              "device": str(loaded.model.device),
                              "dtype": str(loaded.model.dtype).removeprefix("torch."),
                              "weights": _weight_kinds(loaded.model),
                              "torch_threads": torch.get_num_threads(), **(labels or {}),
                              "kv_dtype": options.kv_dtype, "kv_tokens": st.num_blocks * st.block_size,
                              "max_num_seqs": options.max_num_seqs, "max_step_tokens": options.max_step_tokens}
        else:
            url = cfg.url
            info["server"] = {"in_process": False, "url": url}
        client = Client(url, cfg.api_key)
        card = client.get_json("/v1/models")["data"][0]
        model = card["id"]
        info["server"]["model"] = model
        tokenizer = loaded.tokenizer if loaded is not None and cfg.url is None else None
        n_all = cfg.num_prompts * len(cfg.concurrency) + cfg.warmup
        if cfg.dataset == "synthetic":
            vocab = card.get("vocab_size") or (tokenizer.vocab_size if tokenizer is not None else 0)
            if not vocab:
                raise RarefyError("the server does not report its vocab_size: use --dataset wikitext")
            prompts = synthetic_prompts(n_all, cfg.prompt_tokens, vocab, cfg.seed)
        elif cfg.dataset == "wikitext":
            prompts = wikitext_prompts(n_all, cfg.prompt_tokens, tokenizer, cfg.dataset_path, cfg.seed)
        else:
            raise RarefyError(f"--dataset must be synthetic or wikitext, got {cfg.dataset!r}")
        for i in range(cfg.warmup):  # first forwards, allocator warm-up: not measured
            r = client.request("/v1/completions", {"model": model, "prompt": prompts[-1 - i], "max_tokens": 4,
                                                   "stream": True, "ignore_eos": True, "temperature": 0})
            if not r.ok:
                raise RarefyError(f"warm-up request failed: {r.error}")
        runs = []
        for k, c in enumerate(cfg.concurrency):
            batch = prompts[k * cfg.num_prompts:(k + 1) * cfg.num_prompts]
            before = load_avg()
            res = run_workload(client, model, batch, cfg.output_tokens, c, cfg.request_rate, cfg.seed)
            res["load_before"], res["load_after"] = before, load_avg()
            runs.append(res)
            if progress is not None:
                progress(res)
        info.update(dataset=cfg.dataset, prompt_tokens=cfg.prompt_tokens, output_tokens=cfg.output_tokens,
                    num_prompts=cfg.num_prompts, runs=runs)
        if len(runs) > 1 and runs[0]["output_tokens_per_s"] > 0:
            info["speedup_vs_first"] = [r["output_tokens_per_s"] / runs[0]["output_tokens_per_s"] for r in runs]
        return info
    finally:
        if srv is not None:
            srv.stop()


def _weight_kinds(model) -> str:
    """The projection classes in the model, e.g. 'HalfWeightLinear x211'."""
    from collections import Counter
    kinds = Counter(type(m).__name__ for name, m in model.named_modules()
                    if name.endswith("_proj") or name.endswith("lm_head"))
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common())


def format_markdown(result: dict) -> str:
    s = result["server"]
    lines = [f"Command: `{result['command']}`", "",
             f"date: {result['date']}; machine: {result['cpu']}, {result['cores']} cores; load average "
             f"(1/5/15 min) before the first run: {result['runs'][0]['load_before']}",
             "server: " + ", ".join(f"{k} {v}" for k, v in s.items()),
             f"workload: {result['num_prompts']} requests per row, {result['dataset']} prompts of "
             f"{result['prompt_tokens']} tokens, {result['output_tokens']} output tokens (ignore_eos), greedy, "
             "streamed", "", format_table(result["runs"])]
    if "speedup_vs_first" in result:
        lines += ["", "output tokens/s vs the first row: " +
                  ", ".join(f"{r['concurrency']}: {x:.2f}x" for r, x in zip(result["runs"], result["speedup_vs_first"]))]
    return "\n".join(lines) + "\n"
