"""Paged KV cache bookkeeping: blocks, slots, tables, fork, eviction, errors, sizing."""

from __future__ import annotations

import random

import pytest
import torch

from rarefy.errors import RarefyError
from rarefy.kv import quant
from rarefy.kv.blocks import BlockAllocator, KVCacheFull
from rarefy.kv.paged import PagedKVCache


def make(num_blocks=8, block_size=4, kv_dtype="fp16", policy=None, layers=2):
    return PagedKVCache(layers, 2, 8, num_blocks, block_size, kv_dtype, "cpu", policy)


def test_allocator_refcounts():
    a = BlockAllocator(3)
    b = a.allocate(2)
    assert a.num_free == 1
    a.share(b[0])
    a.release(b[0])
    assert a.num_free == 1  # still referenced once
    a.release(b[0])
    assert a.num_free == 2
    with pytest.raises(KVCacheFull):
        a.allocate(3)
    assert a.num_free == 2  # nothing taken by the failed call
    with pytest.raises(RuntimeError):
        a.release(b[0])


def test_slots_tables_and_lengths():
    c = make()
    c.add_sequence("a")
    c.add_sequence("b")
    m = c.begin_step(["a", "b"], [5, 2])
    ta, tb = c.block_ids("a"), c.block_ids("b")
    assert len(ta) == 2 and len(tb) == 1
    want_a = [ta[p // 4] * 4 + p % 4 for p in range(5)]
    assert m.slot_mapping[0].tolist() == want_a
    assert m.slot_mapping[1].tolist() == [tb[0] * 4, tb[0] * 4 + 1, -1, -1, -1]
    assert m.seq_lens.tolist() == [5, 2]
    assert m.q_start.tolist() == [0, 0]
    assert m.block_tables[0].tolist() == ta
    m = c.begin_step(["a", "b"], [1, 1])
    assert m.q_start.tolist() == [5, 2]
    assert m.seq_lens.tolist() == [6, 3]
    assert m.slot_mapping[:, 0].tolist() == [ta[1] * 4 + 1, tb[0] * 4 + 2]
    assert c.decode_positions().tolist() == [5, 2]
    c.free_sequence("a")
    c.free_sequence("b")
    assert c.allocator.num_free == 8


def test_full_cache_is_atomic_and_clear():
    c = make(num_blocks=3)
    c.add_sequence(0)
    c.add_sequence(1)
    c.begin_step([0], [8])  # 2 blocks
    with pytest.raises(KVCacheFull, match="too small"):
        c.begin_step([0, 1], [1, 8])  # needs 1 + 2 > 1 free
    assert c.allocator.num_free == 1 and c.length(0) == 8 and c.length(1) == 0


def test_fork_shares_full_blocks_and_copies_partial():
    c = make()
    c.add_sequence("p")
    c.begin_step(["p"], [6])
    pb = c.block_ids("p")
    c.k_cache[0][pb[1]].fill_(3.0)
    c.fork("p", "q")
    qb = c.block_ids("q")
    assert qb[0] == pb[0] and qb[1] != pb[1]
    assert c.allocator.refcount(pb[0]) == 2
    assert torch.equal(c.k_cache[0][qb[1]], c.k_cache[0][pb[1]])
    assert c.length("q") == 6
    c.free_sequence("p")
    assert c.allocator.refcount(pb[0]) == 1  # q still holds it
    c.free_sequence("q")
    assert c.allocator.num_free == 8


class _Window:
    """A block-granular window policy: first `sink` blocks + blocks touching the last `w` tokens."""
    name, evicts = "window", True

    def __init__(self, sink_blocks, w):
        self.sink_blocks, self.w = sink_blocks, w

    def kept_blocks(self, num_tokens, block_size):
        first_window = max(0, num_tokens - self.w) // block_size
        last = max(0, num_tokens - 1) // block_size
        return sorted(set(range(min(self.sink_blocks, last + 1))) | set(range(first_window, last + 1)))

    def __repr__(self):
        return f"_Window({self.sink_blocks}, {self.w})"


def test_window_eviction_bounds_memory_and_keeps_positions():
    c = make(num_blocks=5, block_size=4, policy=_Window(1, 8))
    c.add_sequence(0)
    c.begin_step([0], [3])
    for _ in range(60):  # far beyond 5 blocks × 4 tokens without eviction
        c.begin_step([0], [1])
        assert c.allocator.num_used <= 5
        s = c.blocks.seqs[0]
        assert s.logical[0] == 0  # the sink block survives
        assert s.logical == sorted(s.logical)
        assert c.stored_tokens(0) == (len(s.blocks) - 1) * 4 + s.length - s.logical[-1] * 4
    kp = c.key_positions()[0].tolist()
    assert kp[:4] == [0, 1, 2, 3]
    assert c.length(0) == 63


def test_shared_block_survives_eviction_of_one_owner():
    c = make(num_blocks=8, block_size=4, policy=_Window(0, 4))
    c.add_sequence("a")
    c.begin_step(["a"], [8])
    c.fork("a", "b")
    first = c.block_ids("a")[0]
    for _ in range(6):
        c.begin_step(["a"], [1])
    assert first not in c.block_ids("a")
    assert c.allocator.refcount(first) == 1 and first in c.block_ids("b")


def test_sizing_and_accounting():
    from rarefy.config import ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    for name in quant.KV_DTYPES:
        per_tok = quant.bytes_per_token(name, 3, 2, 16)
        c = PagedKVCache.for_model(cfg, device="cpu", kv_dtype=name, block_size=16,
                                   memory_bytes=per_tok * 16 * 10 + 5)
        assert c.allocator.num_blocks == 10
        assert c.nbytes() == per_tok * 16 * 10
        assert c.bytes_per_token == per_tok
    assert quant.bytes_per_token("int8", 1, 1, 128) / quant.bytes_per_token("bf16", 1, 1, 128) == 130 / 256
    with pytest.raises(RarefyError, match="holds no block"):
        PagedKVCache.for_model(cfg, device="cpu", memory_bytes=100)


def test_bad_input():
    with pytest.raises(RarefyError, match="power of two"):
        make(block_size=6)
    with pytest.raises(RarefyError, match="unknown KV-cache dtype"):
        make(kv_dtype="int4")
    c = make()
    with pytest.raises(RarefyError, match="not in the KV cache"):
        c.begin_step([7], [1])
    c.add_sequence(7)
    with pytest.raises(RarefyError, match="already"):
        c.add_sequence(7)


def test_random_workload_never_leaks():
    rng = random.Random(0)
    c = make(num_blocks=20, block_size=4)
    live = {}
    for step in range(300):
        op = rng.random()
        if op < 0.2 and len(live) < 5:
            c.add_sequence(step)
            live[step] = 0
        elif op < 0.3 and live:
            sid = rng.choice(list(live))
            c.free_sequence(sid)
            del live[sid]
        elif live:
            ids = list(live)
            nums = [rng.randint(1, 6) for _ in ids]
            try:
                c.begin_step(ids, nums)
            except KVCacheFull:
                continue
            for i, n in zip(ids, nums):
                live[i] += n
        used = sum(-(-n // 4) for n in live.values())
        assert c.allocator.num_used == used
    for sid in list(live):
        c.free_sequence(sid)
    assert c.allocator.num_free == 20
