"""The engine end to end on a tiny model: continuous batching equals sequential greedy."""

from __future__ import annotations

import random

import pytest
import torch

from rarefy.engine.generate import Generator
from rarefy.engine.llm import LLM
from rarefy.engine.llm_engine import EngineOptions
from rarefy.errors import RarefyError
from rarefy.layers.sampler import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from rarefy.models.loader import load_model
    return load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)


def sequential(tiny, prompts, params):
    gen = Generator(tiny.model, tiny.tokenizer)
    return [gen.generate([p], sp)[0][0].token_ids for p, sp in zip(prompts, params)]


def prompts_and_params(n, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randint(3, 300) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in range(n)]
    return prompts, params


def test_16_concurrent_equal_sequential_and_free_all_blocks(tiny):
    prompts, params = prompts_and_params(16)
    want = sequential(tiny, prompts, params)
    llm = LLM(loaded=tiny, options=EngineOptions(kv_dtype="fp32", block_size=8, max_step_tokens=48))
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)
    assert llm.engine.cache.allocator.num_free == llm.engine.cache.allocator.num_blocks


def test_preemption_with_a_small_cache_still_correct(tiny):
    prompts, params = prompts_and_params(8, seed=3)
    want = sequential(tiny, prompts, params)
    # 12 blocks of 8 tokens: far fewer than the 8 sequences need together
    cfg = tiny.model.config
    per_block = 8 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    llm = LLM(loaded=tiny, options=EngineOptions(kv_dtype="fp32", block_size=8, max_step_tokens=64,
                                                 kv_memory_bytes=12 * per_block))
    assert llm.engine.cache.allocator.num_blocks == 12
    preempted = []
    orig = llm.engine.scheduler.schedule

    def spy():
        st = orig()
        preempted.extend(st.preempted)
        return st

    llm.engine.scheduler.schedule = spy
    outs = llm.generate(prompts, params)
    assert preempted, "the workload should have forced a preemption"
    assert [o.token_ids for o in outs] == want
    assert llm.engine.cache.allocator.num_free == 12


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(tiny):
    llm = LLM(loaded=tiny, options=EngineOptions(kv_dtype="fp32"))
    p = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    a = llm.generate([[5, 6, 7], [9, 10]], p)
    b = llm.generate([[5, 6, 7], [9, 10]], p)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    text = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, ignore_eos=True))[0].text
    if len(text) > 3:
        stop = text[2:4]
        cut = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))[0]
        assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]


def test_abort_frees_blocks_and_bad_requests(tiny):
    llm = LLM(loaded=tiny, options=EngineOptions(kv_dtype="fp32", block_size=4))
    eng = llm.engine
    s = eng.add_request([5] * 30, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.cache.allocator.num_used > 0
    eng.abort(s)
    assert s.finish_reason == "abort" and eng.cache.allocator.num_used == 0 and not eng.has_work
    with pytest.raises(RarefyError, match="empty prompt"):
        eng.add_request([], SamplingParams())
    with pytest.raises(RarefyError, match="context"):
        eng.add_request([5] * 250, SamplingParams(max_tokens=100))


@pytest.mark.parametrize("small_cache", [False, True])
def test_pipelined_decode_equals_sequential(tiny, small_cache):
    """The pipelined loop (tokens read back one step late) gives the same tokens, including
    when sequences end on EOS mid-flight, and when a small cache forces preemptions."""
    prompts, params = prompts_and_params(10, seed=7)
    want = sequential(tiny, prompts, params)
    cfg = tiny.model.config
    per_block = 8 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    opts = EngineOptions(kv_dtype="fp32", block_size=8, max_step_tokens=48, pipeline=True,
                         kv_memory_bytes=(12 if small_cache else 200) * per_block)
    llm = LLM(loaded=tiny, options=opts)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert llm.engine.cache.allocator.num_used == 0 and not llm.engine.has_work
    # EOS: make a token that greedy decoding produces mid-sequence the end-of-sequence token
    eos = want[0][len(want[0]) // 2] if len(want[0]) > 2 else want[0][0]
    llm.engine.eos = {eos}
    p_eos = [SamplingParams(max_tokens=sp.max_tokens) for sp in params]
    outs = llm.generate(prompts, p_eos)
    for o, w in zip(outs, want):
        cut = w.index(eos) + 1 if eos in w else len(w)
        assert o.token_ids == w[:cut]
        assert o.finish_reason == ("stop" if eos in w else "length")
    assert llm.engine.cache.allocator.num_used == 0


def test_pipelined_abort_mid_flight(tiny):
    llm = LLM(loaded=tiny, options=EngineOptions(kv_dtype="fp32", block_size=4, pipeline=True))
    eng = llm.engine
    a = eng.add_request([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True))
    b = eng.add_request([8, 9], SamplingParams(max_tokens=6, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng._inflight is not None
    eng.abort(a)
    assert -1 not in a.output_ids and a.finish_reason == "abort"
    while eng.has_work:
        eng.step()
    assert len(b.output_ids) == 6 and eng.cache.allocator.num_used == 0
