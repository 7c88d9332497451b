"""The embedded model behind the server: greedy outputs equal `rarefy generate`'s Generator."""

from __future__ import annotations

import openai
import pytest

from rarefy.engine.generate import Generator
from rarefy.engine.llm_engine import EngineOptions
from rarefy.layers.sampler import SamplingParams
from serverutil import live_server, wait_idle

pytestmark = pytest.mark.slow


def test_embedded_greedy_equals_generate(embedded_model):
    tk = embedded_model.tokenizer
    prompt = "The capital of France is"
    msgs = [{"role": "user", "content": "Name three colours."}]
    gen = Generator(embedded_model.model, tk)
    params = SamplingParams(max_tokens=16)
    want = gen.generate([tk.encode(prompt)], params)[0][0]
    want_chat = gen.generate([tk.encode(tk.apply_chat_template(msgs))], params)[0][0]
    opts = EngineOptions(kv_dtype="fp32", kv_memory_bytes=64 * 2**20)
    with live_server(embedded_model, opts, name="smollm2") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = c.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0)
        assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
        assert r.usage.completion_tokens == len(want.token_ids)
        chunks = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=16, temperature=0,
                                           stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == want_chat.text and want_chat.text.strip()
        wait_idle(srv)
