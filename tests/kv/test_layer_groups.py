"""Per-layer windows in the paged cache: layer groups over one pool of layer-blocks.

Eviction per group never frees a block a later query reads, memory accounting follows the
groups, and decode/prefill through the grouped cache equals the simulated policy."""

from __future__ import annotations

import random

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.kv import quant
from rarefy.kv.blocks import KVCacheFull
from rarefy.kv.paged import PagedKVCache, layer_blocks_for
from rarefy.kv.policies import Dense, PolicyConfig, TopK, Window

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def W(sinks, window, stride=0, block=4):
    return Window(sinks, window, stride, block)


# 5 layers, 3 groups: two window sizes and one dense layer
MIXED = PolicyConfig(W(4, 6), {1: W(4, 13), 3: Dense(), 4: W(4, 13)})


def make(policy=MIXED, num_blocks=12, layers=5, kv_dtype="fp32", **kw):
    return PagedKVCache(layers, 2, 8, num_blocks, 4, kv_dtype, "cpu", policy, **kw)


def _reads(policy, pos: int, block: int) -> set[int]:
    """Logical blocks the query at `pos` reads under `policy` (None = dense)."""
    blocks = range(pos // block + 1)
    if policy is None or not policy.evicts:
        return set(blocks)
    return {b for b in blocks if bool(policy.block_keep(torch.tensor(b), torch.tensor(pos)))}


def test_grouping_and_uniform_cases():
    c = make()
    assert c.grouped and c.evict_policy is None
    assert c.blocks.group_layers == [[0, 2], [1, 4], [3]]
    assert c.num_layer_blocks == 60 and c.capacity_tokens == 12 * 4
    # one window for every layer, or no window: the classic shared tables
    assert not make(W(4, 6)).grouped and make(W(4, 6)).evict_policy == W(4, 6)
    assert not make(None).grouped and not make(PolicyConfig(Dense(), {1: TopK(k=3)})).grouped
    # a masking layer next to a window layer: grouped, the masking layer keeps every block
    c = make(PolicyConfig(W(4, 6), {2: TopK(k=3)}))
    assert c.grouped and c.blocks.group_layers == [[0, 1, 3, 4], [2]]


@pytest.mark.parametrize("seed", range(4))
def test_eviction_never_frees_a_block_still_read(seed):
    rng = random.Random(seed)
    c = make(num_blocks=40)
    per_layer = [MIXED.for_layer(i) for i in range(5)]
    live: dict = {}
    for step in range(120):
        if len(live) < 3 and rng.random() < 0.3:
            c.add_sequence(step)
            live[step] = 0
        if not live:
            continue
        if rng.random() < 0.05:
            sid = rng.choice(list(live))
            c.free_sequence(sid)
            del live[sid]
            continue
        ids = list(live)
        nums = [rng.choice([1, 1, 1, 2, 5, 9]) for _ in ids]
        try:
            meta = c.begin_step(ids, nums)
        except KVCacheFull:
            continue
        used = set()
        for row, (sid, n) in enumerate(zip(ids, nums)):
            start = live[sid]
            live[sid] += n
            for layer in range(5):
                g, _ = c.blocks.layer_group[layer]
                s = c.blocks.groups[g].seqs[sid]
                kept = set(s.logical)
                # every query of this step, and every later one, finds its blocks
                for pos in range(start, start + n):
                    assert _reads(per_layer[layer], pos, 4) <= kept
                # and the table has exactly the kept blocks, each an allocated layer-block
                table = meta.layers[layer].block_tables[row, :len(s.blocks)].tolist()
                assert all(c.allocator.refcount(u) == 1 for u in table)
                used.update(table)
                assert int(meta.layers[layer].seq_lens[row]) == s.stored(4)
                # the new tokens' slots are in this layer's own blocks
                slots = meta.layers[layer].slot_mapping[row, :n].tolist()
                assert {x // 4 for x in slots} <= set(table)
        # no layer-block is in two tables, and the pool counts what the tables hold
        held = sum(c.blocks.held(i) for i in live)
        assert c.allocator.num_used == held
        assert held == sum(len(c.blocks.groups[g].seqs[i].blocks) * len(ls)
                           for i in live for g, ls in enumerate(c.blocks.group_layers))
    for sid in list(live):
        c.free_sequence(sid)
    assert c.allocator.num_free == c.num_layer_blocks


def test_decode_holds_what_the_accounting_says():
    """One sequence decoding token by token holds exactly Σ_layer held_blocks(n) layer-blocks."""
    c = make(num_blocks=40)
    per_layer = [MIXED.for_layer(i) for i in range(5)]
    c.add_sequence(0)
    peak = 0
    for n in range(1, 60):
        c.begin_step([0], [1])
        want = sum((p if p is not None else Dense()).held_blocks(n, 4) if p is None or p.evicts
                   else -(-n // 4) for p in per_layer)
        assert c.blocks.held(0) == want
        peak = max(peak, want)
        assert layer_blocks_for(c.layer_policy, n, 4) == peak
    assert MIXED.memory_fraction(5, 59, 4) == pytest.approx(peak / (5 * 15))


def test_capacity_accounting():
    from rarefy.config import ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=5,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    per_layer_block = quant.bytes_per_token("bf16", 1, 2, 16) * 4
    # sized to hold one sequence decoding 64 tokens: far fewer layer-blocks than dense
    want = layer_blocks_for([MIXED.for_layer(i) for i in range(5)], 64, 4)
    c = PagedKVCache(5, 2, 16, None, 4, "bf16", "cpu", MIXED, num_layer_blocks=want)
    assert c.num_layer_blocks == want < 5 * 16
    assert c.nbytes() == want * per_layer_block
    assert c.sequences_that_fit(64) == 1
    assert c.effective_bytes_per_token(64) == pytest.approx(c.bytes_per_token * want / (5 * 16))
    c.add_sequence(0)
    for _ in range(64):
        c.begin_step([0], [1])
    c.add_sequence(1)
    with pytest.raises(KVCacheFull, match="layer-blocks"):
        for _ in range(64):
            c.begin_step([1], [1])
    # a byte budget buys whole layer-blocks
    c = PagedKVCache.for_model(cfg, device="cpu", block_size=4, memory_bytes=per_layer_block * 23 + 7,
                               policy=MIXED)
    assert c.num_layer_blocks == 23 and c.nbytes() == 23 * per_layer_block
    # sized by tokens: that many tokens in every layer, as without groups
    assert PagedKVCache.for_model(cfg, device="cpu", block_size=4, tokens=64, policy=MIXED).num_layer_blocks == 80
    # the scheduler's counts are layer-blocks: a token block of a 2-layer group costs 2
    c = make(num_blocks=10)
    c.add_sequence(0)
    assert c.blocks.new_blocks(0, 1) == 5 and c.blocks.new_blocks(0, 5) == 10
    with pytest.raises(RarefyError, match="at least one block"):
        make(num_blocks=0)


def test_fork_copies_each_layers_partial_block():
    c = make(num_blocks=20)
    c.add_sequence("a")
    meta = c.begin_step(["a"], [6])
    k = torch.randn(1, 2, 6, 8)
    for layer in range(5):
        c.attend(layer, torch.randn(1, 4, 6, 8), k + layer, k - layer)
    c.fork("a", "b")
    for g, layers in enumerate(c.blocks.group_layers):
        sa, sb = c.blocks.groups[g].seqs["a"], c.blocks.groups[g].seqs["b"]
        assert sa.blocks[0] == sb.blocks[0] and sa.blocks[1] != sb.blocks[1]  # shared full, copied partial
    meta = c.begin_step(["b"], [1])
    for layer in range(5):
        kg, _ = c.gather(layer, torch.float32)
        torch.testing.assert_close(kg[0, :, :6], (k + layer)[0])
    assert meta.layers[0].block_tables.shape[1] == 2


def _tiny(tiny_model_dir):
    from rarefy.models.loader import load_model
    return load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)


TINY_CONFIGS = [PolicyConfig(W(4, 6), {1: W(4, 17)}),  # two window groups
                PolicyConfig(Dense(), {0: W(0, 9, 2)}),  # a strided window next to a dense layer
                PolicyConfig(W(8, 5), {1: TopK(k=6)})]  # a window next to a masking layer


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=["windows", "window+dense", "window+topk"])
def test_grouped_cache_equals_simulated_policy(tiny_model_dir, config):
    """Prefill chunks and decodes through the grouped cache give the logits of a full-context
    forward with the same per-layer policy simulated (rarefy.kv.simulate)."""
    from rarefy.kv.simulate import eval_attention

    model = _tiny(tiny_model_dir).model
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), eval_attention(model, "fp32", config):
        want = model(ids)
    cache = PagedKVCache.for_model(cfg, device="cpu", kv_dtype="fp32", block_size=4, tokens=2 * 64, policy=config)
    assert cache.grouped
    for r in (0, 1):
        cache.add_sequence(r)
    outs, start = [], 0
    with torch.no_grad():
        for n in (13, 1, 1, 7, 1, 1, 1, 20):
            cache.begin_step([0, 1], [n, n])
            pos = torch.arange(start, start + n).expand(2, n)
            outs.append(model(ids[:, start:start + n], pos, cache))
            start += n
    got = torch.cat(outs, dim=1)
    if any(not p.evicts and p.name != "dense" for p in config.layers.values()):
        # masking policies (top-k) mask decode only; prompt chunks attend densely (docs/kv-cache.md)
        rows = [13, 14, 22, 23, 24]
        got, want = got[:, rows], want[:, rows]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", TINY_CONFIGS[:2], ids=["windows", "window+dense"])
def test_generate_greedy_equals_simulated_policy(tiny_model_dir, config):
    """Greedy tokens through Generator with a per-layer window config equal greedy decoding by
    full forwards with the policy simulated; the cache frees the short windows' blocks."""
    from rarefy.engine.generate import Generator, KVOptions
    from rarefy.kv.simulate import eval_attention
    from rarefy.layers.sampler import SamplingParams

    loaded = _tiny(tiny_model_dir)
    model = loaded.model
    prompt = torch.randint(3, model.config.vocab_size, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    want = list(prompt)
    with torch.no_grad(), eval_attention(model, "fp32", config):
        for _ in range(30):
            want.append(int(model(torch.tensor([want]))[0, -1].argmax()))
    gen = Generator(model, loaded.tokenizer, kv=KVOptions(kv_dtype="fp32", block_size=4, policy=config))
    out, _ = gen.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))
    assert out[0].token_ids == want[len(prompt):]


def test_engine_with_per_layer_windows_and_a_small_cache(tiny_model_dir):
    """Continuous batching (chunked prefill, preemption) over a grouped cache gives each request
    the tokens Generator gives it alone with the same policy; all layer-blocks come back."""
    import random as _random

    from rarefy.engine.generate import Generator, KVOptions
    from rarefy.engine.llm import LLM
    from rarefy.engine.llm_engine import EngineOptions
    from rarefy.layers.sampler import SamplingParams

    tiny = _tiny(tiny_model_dir)
    config = TINY_CONFIGS[0]
    rng = _random.Random(5)
    prompts = [[rng.randint(3, 300) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    params = [SamplingParams(max_tokens=rng.randint(8, 30), ignore_eos=True) for _ in prompts]
    gen = Generator(tiny.model, tiny.tokenizer, kv=KVOptions(kv_dtype="fp32", block_size=4, policy=config))
    want = [gen.generate([p], sp)[0][0].token_ids for p, sp in zip(prompts, params)]
    cfg = tiny.model.config
    per_layer_block = 4 * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    llm = LLM(loaded=tiny, options=EngineOptions(kv_dtype="fp32", block_size=4, max_step_tokens=16,
                                                 kv_memory_bytes=40 * per_layer_block, attention_policy=config))
    cache = llm.engine.cache
    assert cache.grouped and cache.num_layer_blocks == 40
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert cache.allocator.num_free == cache.allocator.num_blocks


def test_per_layer_tables_are_row_major():
    """Kernels check the tables' strides: a [1, 1] slice of a wider tensor must not leak through."""
    c = make()
    c.add_sequence(0)
    for n in (1, 1, 3):
        meta = c.begin_step([0], [n])
        for lm in meta.layers:
            assert lm.block_tables.stride() == (lm.block_tables.shape[1], 1)
            assert lm.slot_mapping.stride() == (lm.slot_mapping.shape[1], 1)
        q = torch.randn(1, 4, n, 8)
        for layer in range(5):
            assert torch.isfinite(c.attend(layer, q, torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8))).all()
