"""Which sequences run in the next step, and how many of their tokens: pure Python.

Each step has a token budget. Running sequences go first, oldest first: a decode
costs one token, a prefill the rest of its prompt or as much as the budget leaves
(chunked prefill), so long prompts never stall the decodes around them. Waiting
sequences are then admitted first come, first served while the budget, the
sequence limit and the KV blocks allow. When the running sequences need more KV
blocks than are free, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed (prompt plus
what it generated) when there is room again. Oldest-first service and
newest-first preemption make the order fair: no request can be overtaken forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rarefy.engine.sequence import Sequence, SequenceStatus
from rarefy.errors import RarefyError
from rarefy.kv.block_manager import BlockManager


@dataclass
class ScheduledStep:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens of each sequence run this step
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 64, max_step_tokens: int = 2048):
        if max_num_seqs < 1 or max_step_tokens < 1:
            raise RarefyError("max_num_seqs and max_step_tokens must be at least 1")
        self.blocks = blocks
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a request; one that could never fit the KV cache on its own is refused."""
        bs = self.blocks.block_size
        worst = seq.num_tokens + seq.params.max_tokens - len(seq.output_ids)
        if self.blocks.evict_policy is None and -(-worst // bs) > self.blocks.num_blocks:
            raise RarefyError(
                f"the prompt ({len(seq.prompt_ids)} tokens) plus max_tokens ({seq.params.max_tokens}) "
                f"needs {-(-worst // bs)} KV blocks but the cache has {self.blocks.num_blocks} in all")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished (stop, length or abort) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.seq_id in self.blocks.seqs:
            self.blocks.free(seq.seq_id)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget, need = self.max_step_tokens, 0
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if len(seq.output_ids) >= seq.params.max_tokens:
                continue  # its last token is in flight (pipelined decode); it finishes on read-back
            n = min(seq.num_uncomputed, budget)
            extra = self.blocks.new_blocks(seq.seq_id, n)
            while need + extra > self.blocks.num_free:
                victims = [s for s in self.running if s not in step.seqs]
                victim = max(victims, key=lambda s: s.arrival)
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                step.seqs.append(seq)
                step.num_new.append(n)
                budget -= n
                need += extra
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            extra = self.blocks.new_blocks(seq.seq_id, n)
            if need + extra > self.blocks.num_free:
                break
            self.waiting.popleft()
            self.blocks.add(seq.seq_id)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.seqs.append(seq)
            step.num_new.append(n)
            budget -= n
            need += extra
        return step
