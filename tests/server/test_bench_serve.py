"""`rarefy bench serve` and `rarefy serve` from the command line (tiny model)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from typer.testing import CliRunner

from rarefy.cli import app
from rarefy.server.runner import is_loopback, served_model_name
from serverutil import TINY, wait_idle


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_bench_serve_in_process(tiny_model_dir, tmp_path):
    out = tmp_path / "serving.md"
    r = CliRunner().invoke(app, ["bench", "serve", "--model", str(tiny_model_dir), "-n", "4", "--concurrency", "1,2",
                                 "--prompt-tokens", "8", "--output-tokens", "5", "--warmup", "1", "--out", str(out),
                                 "--json"])
    assert r.exit_code == 0, r.output
    res = last_json(r.output)
    assert [run["concurrency"] for run in res["runs"]] == [1, 2]
    for run in res["runs"]:
        assert run["completed"] == 4 and run["errors"] == 0
        assert run["mean_output_tokens"] == 5 and run["mean_prompt_tokens"] == 8
        assert run["output_tokens_per_s"] > 0 and run["ttft_ms"]["p50"] > 0 and run["tpot_ms"]["p99"] > 0
    assert "| conc |" in out.read_text()


def test_bench_serve_against_a_running_server(server):
    r = CliRunner().invoke(app, ["bench", "serve", "--url", server.url, "-n", "3", "--concurrency", "3",
                                 "--dataset", "wikitext", "--prompt-tokens", "12", "--output-tokens", "4",
                                 "--request-rate", "50", "--json"])
    assert r.exit_code == 0, r.output
    run = last_json(r.output)["runs"][0]
    assert run["completed"] == 3 and run["errors"] == 0 and run["request_rate"] == 50
    wait_idle(server)
    r = CliRunner().invoke(app, ["bench", "serve", "--url", server.url, "--concurrency", "0"])
    assert r.exit_code == 1 and "--concurrency" in r.output


def test_serve_command(tiny_model_dir):
    env = {**os.environ, "RAREFY_API_KEY": "k"}
    p = subprocess.Popen([sys.executable, "-m", "rarefy.cli", "serve", "--model", str(tiny_model_dir), "--port", "0",
                          "--served-model-name", TINY, "--log-level", "warning"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        t0 = time.monotonic()
        while "serving" not in line and time.monotonic() - t0 < 120:
            line = p.stderr.readline()
            assert line or p.poll() is None, "rarefy serve exited early"
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                    assert resp.status == 200
                break
            except OSError:
                time.sleep(0.1)
        req = urllib.request.Request(base + "/v1/models", headers={"Authorization": "Bearer k"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.load(resp)["data"][0]["id"] == TINY
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_loopback_and_names():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert served_model_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert served_model_name("/ckpt/llama-8b/") == "llama-8b"
