"""The embedded SmolLM2-135M-Instruct GGUF against transformers' reading of the same file."""

import math

import pytest
import torch
import torch.nn.functional as F

from rarefy.engine.generate import Generator
from rarefy.eval.perplexity import chunk_tokens, perplexity
from rarefy.layers.sampler import SamplingParams
from tests.conftest import WIKITEXT_VALID

pytestmark = pytest.mark.slow


def test_logits_match(embedded_model, hf_embedded_model):
    ids = torch.tensor([embedded_model.tokenizer.encode("The tower is 324 metres tall, about as high as")])
    with torch.no_grad():
        want = hf_embedded_model(ids).logits
        got = embedded_model.model(ids)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 1e-4


def test_greedy_32_tokens_match(embedded_model, hf_embedded_model):
    tk = embedded_model.tokenizer
    prompt = tk.encode(tk.apply_chat_template([{"role": "user", "content": "Name three colours."}]))
    (c,), _ = Generator(embedded_model.model, tk).generate(
        [prompt], SamplingParams(max_tokens=32, ignore_eos=True))
    with torch.no_grad():
        out = hf_embedded_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                         do_sample=False)
    assert c.token_ids == out[0, len(prompt):].tolist()
    assert c.text == tk.decode(c.token_ids)


def test_perplexity_matches_transformers(embedded_model, hf_embedded_model):
    with open(WIKITEXT_VALID, encoding="utf-8") as f:
        text = f.read()[:200_000]
    ids = embedded_model.tokenizer.encode(text, add_special_tokens=False)
    ctx, n = 256, 3
    ours = perplexity(embedded_model.model, ids, ctx=ctx, max_chunks=n)
    chunks = chunk_tokens(ids, ctx, n)
    with torch.no_grad():
        logits = hf_embedded_model(chunks).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), chunks[:, 1:].reshape(-1))
    want = math.exp(nll.item())
    assert ours.tokens == n * (ctx - 1)
    assert abs(ours.ppl - want) / want < 1e-3
    assert 0 < ours.stderr < ours.ppl


def test_stop_strings_and_eos(embedded_model):
    tk = embedded_model.tokenizer
    prompt = tk.encode(tk.apply_chat_template([{"role": "user", "content": "Count from 1 to 20."}]))
    gen = Generator(embedded_model.model, tk)
    (full,), _ = gen.generate([prompt], SamplingParams(max_tokens=60))
    assert full.finish_reason in ("stop", "length")
    if full.finish_reason == "stop":  # ended on EOS
        assert full.token_ids[-1] in tk.eos_token_ids
    stop = full.text.strip()[4:8]
    pieces = []
    (cut,), _ = gen.generate([prompt], SamplingParams(max_tokens=60, stop=(stop,)),
                             on_text=lambda _, d: pieces.append(d))
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text)
    assert "".join(pieces) == cut.text  # streamed text never shows the stop string
