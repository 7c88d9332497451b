"""Generation through the paged cache: same greedy tokens as the contiguous cache."""

from __future__ import annotations

import pytest
import torch

from rarefy.engine.generate import Generator, KVOptions
from rarefy.kv.blocks import KVCacheFull
from rarefy.kv.paged import PagedKVCache
from rarefy.layers.sampler import SamplingParams


def _prompts(tk):
    texts = ["The tower is 324 metres tall, about as high as",
             "Name three colours.",
             "In 1905 Einstein published four papers that"]
    return [tk.encode(t) for t in texts]


@pytest.mark.slow
def test_paged_greedy_equals_contiguous(embedded_model):
    tk, model = embedded_model.tokenizer, embedded_model.model
    prompts = _prompts(tk)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want, _ = Generator(model, tk).generate(prompts, params)
    # block size 4 puts many block boundaries inside prompts and decode
    got, _ = Generator(model, tk, kv=KVOptions(kv_dtype="fp32", block_size=4)).generate(prompts, params)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
    # a quantized cache still generates sensible text: int8 keeps the first tokens
    q8, _ = Generator(model, tk, kv=KVOptions(kv_dtype="int8")).generate(prompts, params)
    agree = sum(a == b for w, g in zip(want, q8) for a, b in zip(w.token_ids[:8], g.token_ids[:8]))
    assert agree >= 20  # of 24


def test_paged_prefill_then_chunks_match_one_forward(tiny_model_dir):
    """Chunked prefill (prompt split over several steps) equals one full forward."""
    from rarefy.models.loader import load_model

    model = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32).model
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        want = model(ids)
        cache = PagedKVCache.for_model(cfg, device="cpu", kv_dtype="fp32", block_size=8, tokens=128)
        for r in (0, 1):
            cache.add_sequence(r)
        outs, start = [], 0
        for n in (5, 16, 1, 1, 14):
            cache.begin_step([0, 1], [n, n])
            pos = torch.arange(start, start + n).expand(2, n)
            outs.append(model(ids[:, start:start + n], pos, cache))
            start += n
    got = torch.cat(outs, dim=1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cache_too_small_is_a_clear_error(tiny_model_dir):
    from rarefy.models.loader import load_model

    loaded = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)
    gen = Generator(loaded.model, loaded.tokenizer, kv=KVOptions(kv_dtype="fp32", block_size=4, num_blocks=3))
    with pytest.raises(KVCacheFull, match="too small"):
        gen.generate([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], SamplingParams(max_tokens=8, ignore_eos=True))
