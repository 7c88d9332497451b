"""Helpers of the server tests: live servers on 127.0.0.1 (free ports), plain HTTP calls."""

from __future__ import annotations

import contextlib
import http.client
import json
import time

from rarefy.engine.llm_engine import EngineOptions
from rarefy.server import ServerThread, build_server

TINY = "tiny"


@contextlib.contextmanager
def live_server(loaded, options: EngineOptions | None = None, api_key: str | None = None, name: str = TINY):
    options = options or EngineOptions(kv_dtype="fp32", block_size=8, max_step_tokens=64)
    app = build_server(loaded, options, model_name=name, api_key=api_key)
    with ServerThread(app) as srv:
        srv.state = app.state.serving
        srv.engine = srv.state.engine
        yield srv


def wait_idle(srv, timeout: float = 30.0) -> None:
    """Until the engine has no sequence and every KV block is free (or fail)."""
    alloc = srv.engine.engine.cache.allocator
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = srv.engine.stats
        if s.running == 0 and s.waiting == 0 and alloc.num_used == 0 and not srv.engine.engine.has_work:
            return
        time.sleep(0.01)
    raise AssertionError(f"engine not idle after {timeout}s: running {srv.engine.stats.running}, "
                         f"waiting {srv.engine.stats.waiting}, blocks used {alloc.num_used}")


def post(srv, path: str, body, headers: dict | None = None, raw: bool = False):
    """(status, parsed JSON or text) of one request over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    data = body if raw else json.dumps(body)
    conn.request("POST", path, body=data, headers={"content-type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def get(srv, path: str, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    return r.status, text
