"""/metrics in the Prometheus text exposition format (version 0.0.4), written by hand."""

from __future__ import annotations

import math
import threading
from collections import defaultdict

from rarefy.engine.async_engine import EngineStats, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RequestCounter:
    """HTTP responses by endpoint and status code."""

    def __init__(self):
        self._counts: dict[tuple[str, int], int] = defaultdict(int)
        self._lock = threading.Lock()

    def inc(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._counts[(endpoint, status)] += 1

    def items(self) -> list[tuple[tuple[str, int], int]]:
        with self._lock:
            return sorted(self._counts.items())


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _labels(**kv) -> str:
    if not kv:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k, v in kv.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class _Writer:
    def __init__(self, model: str):
        self.lines: list[str] = []
        self.model = model

    def head(self, name: str, kind: str, help: str) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value, **labels) -> None:
        self.lines.append(f"{name}{_labels(model_name=self.model, **labels)} {_num(value)}")

    def metric(self, name: str, kind: str, help: str, value, **labels) -> None:
        self.head(name, kind, help)
        self.sample(name, value, **labels)

    def histogram(self, name: str, help: str, h: Histogram) -> None:
        self.head(name, "histogram", help)
        buckets, total, count = h.snapshot()
        for bound, acc in buckets:
            self.sample(f"{name}_bucket", acc, le=_num(bound) if bound != math.inf else "+Inf")
        self.sample(f"{name}_sum", total)
        self.sample(f"{name}_count", count)


def render(model: str, stats: EngineStats, requests: RequestCounter) -> str:
    w = _Writer(model)
    w.head("rarefy_http_requests_total", "counter", "HTTP requests answered, by endpoint and status code.")
    for (endpoint, status), n in requests.items():
        w.sample("rarefy_http_requests_total", n, endpoint=endpoint, status=str(status))
    w.head("rarefy_request_finished_total", "counter", "Sequences finished, by finish reason.")
    for reason, n in sorted(dict(stats.finished).items()):  # a copy: the engine thread adds keys
        w.sample("rarefy_request_finished_total", n, finish_reason=reason)
    w.metric("rarefy_num_requests_running", "gauge", "Sequences in the running batch.", stats.running)
    w.metric("rarefy_num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", stats.waiting)
    w.metric("rarefy_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use (0 to 1).",
             stats.kv_usage)
    w.metric("rarefy_kv_cache_blocks_used", "gauge", "KV-cache blocks in use.", stats.kv_blocks_used)
    w.metric("rarefy_kv_cache_blocks_total", "gauge", "KV-cache blocks in all.", stats.kv_blocks_total)
    w.metric("rarefy_prompt_tokens_total", "counter", "Prompt tokens of admitted sequences.",
             stats.prompt_tokens)
    w.metric("rarefy_generation_tokens_total", "counter", "Tokens generated.", stats.generated_tokens)
    w.metric("rarefy_preemptions_total", "counter", "Preemptions of finished sequences (recomputed).",
             stats.preemptions)
    w.metric("rarefy_engine_steps_total", "counter", "Engine steps run.", stats.steps)
    w.histogram("rarefy_time_to_first_token_seconds", "Time from a request's arrival to its first token.",
                stats.ttft)
    w.histogram("rarefy_inter_token_latency_seconds", "Time between two tokens of one sequence.", stats.itl)
    w.histogram("rarefy_e2e_request_latency_seconds", "Time from a request's arrival to its last token.",
                stats.e2e)
    return "\n".join(w.lines) + "\n"
