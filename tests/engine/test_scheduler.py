"""The scheduler alone: token budgets, chunked prefill, admission, preemption, fairness."""

from __future__ import annotations

import random

import pytest

from rarefy.engine.scheduler import Scheduler
from rarefy.engine.sequence import Sequence, SequenceStatus
from rarefy.errors import RarefyError
from rarefy.kv.block_manager import BlockManager
from rarefy.layers.sampler import SamplingParams


def seq(n_prompt, max_tokens=8, t=0.0):
    s = Sequence(list(range(3, 3 + n_prompt)), SamplingParams(max_tokens=max_tokens))
    s.arrival = t
    return s


def fake_run(sched: Scheduler, step, finish_at=None):
    """What the runner + engine do to the sequences: advance, sample a token, finish."""
    sched.blocks.append([s.seq_id for s in step.seqs], step.num_new)
    for s, n in zip(step.seqs, step.num_new):
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.output_ids.append(7)
            if len(s.output_ids) >= (finish_at or s.params.max_tokens):
                sched.finish(s, "length")


def test_chunked_prefill_and_decode_share_a_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_step_tokens=10)
    a, b = seq(3, t=0), seq(25, t=1)
    sched.add(a)
    sched.add(b)
    st = sched.schedule()
    assert [x is a for x in st.seqs] == [True, False] and st.num_new == [3, 7]
    fake_run(sched, st)
    st = sched.schedule()  # a decodes (1 token), b continues its prompt with the rest of the budget
    assert st.num_new == [1, 9] and st.seqs == [a, b]
    fake_run(sched, st)
    st = sched.schedule()
    assert st.num_new == [1, 9]
    fake_run(sched, st)
    assert b.num_computed == 25 and len(b.output_ids) == 1


def test_max_num_seqs_and_budget_limit_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_step_tokens=100)
    ss = [seq(5, t=i) for i in range(4)]
    for s in ss:
        sched.add(s)
    st = sched.schedule()
    assert st.seqs == ss[:2]
    assert [s.status for s in ss] == [SequenceStatus.RUNNING] * 2 + [SequenceStatus.WAITING] * 2


def test_preemption_frees_newest_and_recomputes_later():
    bm = BlockManager(6, 4)  # 24 tokens in all
    sched = Scheduler(bm, max_num_seqs=4, max_step_tokens=64)
    old, new = seq(8, max_tokens=12, t=0), seq(8, max_tokens=12, t=1)
    sched.add(old)
    sched.add(new)
    preempted = []
    for _ in range(200):
        if not sched.has_work:
            break
        st = sched.schedule()
        preempted += st.preempted
        assert st or not sched.running
        fake_run(sched, st)
        assert bm.allocator.num_used <= 6
    assert not sched.has_work
    assert preempted and preempted[0] is new  # the newest goes first
    assert old.num_preemptions == 0
    assert len(old.output_ids) == 12 and len(new.output_ids) == 12
    assert bm.num_free == 6


def test_request_that_can_never_fit_is_refused():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_step_tokens=64)
    with pytest.raises(RarefyError, match="KV blocks"):
        sched.add(seq(10, max_tokens=10))


def test_random_workload_completes_in_fair_order_and_frees_everything():
    rng = random.Random(1)
    bm = BlockManager(24, 4)
    sched = Scheduler(bm, max_num_seqs=6, max_step_tokens=32)
    ss = []
    for i in range(30):
        s = seq(rng.randint(1, 30), max_tokens=rng.randint(1, 20), t=i)
        ss.append(s)
        sched.add(s)
    steps = 0
    while sched.has_work:
        st = sched.schedule()
        assert st, "no progress"
        assert st.num_tokens <= 32 and len(sched.running) <= 6
        fake_run(sched, st)
        steps += 1
        assert steps < 5000
    assert all(s.is_finished and len(s.output_ids) == s.params.max_tokens for s in ss)
    assert bm.num_free == 24 and not bm.seqs


def test_finish_while_waiting_and_abort():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=1, max_step_tokens=64)
    a, b = seq(4, t=0), seq(4, t=1)
    sched.add(a)
    sched.add(b)
    fake_run(sched, sched.schedule())
    sched.finish(b, "abort")  # still waiting
    sched.finish(a, "abort")  # running, holds blocks
    assert not sched.has_work and bm.num_free == 16
