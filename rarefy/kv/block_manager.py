"""Which physical KV blocks each sequence owns: pure Python, no tensors.

The scheduler asks it whether a step fits (`blocks_needed`, `num_free`) and frees
preempted or finished sequences; PagedKVCache asks it for the slots and block
tables of a step. Every block but a sequence's last kept one is full; an evicting
policy (window) drops whole blocks nobody will read again, and positions are never
renumbered, so `logical` keeps each kept block's position // block_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rarefy.errors import RarefyError
from rarefy.kv.blocks import BlockAllocator, KVCacheFull


@dataclass
class SeqBlocks:
    blocks: list[int] = field(default_factory=list)  # physical blocks kept, in logical order
    logical: list[int] = field(default_factory=list)  # position // block_size of each kept block
    length: int = 0  # tokens appended so far = the next token's position

    def stored(self, block_size: int) -> int:
        """Tokens held in the kept blocks."""
        if not self.blocks:
            return 0
        return (len(self.blocks) - 1) * block_size + self.length - self.logical[-1] * block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, evict_policy=None):
        if block_size < 1 or block_size & (block_size - 1):
            raise RarefyError(f"KV block size must be a power of two, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.evict_policy = evict_policy
        self.seqs: dict = {}

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def add(self, seq_id) -> None:
        if seq_id in self.seqs:
            raise RarefyError(f"sequence {seq_id!r} is already in the KV cache")
        self.seqs[seq_id] = SeqBlocks()

    def free(self, seq_id) -> None:
        for b in self.seqs.pop(seq_id).blocks:
            self.allocator.release(b)

    def fork(self, src, dst) -> tuple[int, int] | None:
        """dst shares src's full blocks; returns (src_block, dst_block) to copy when src's
        last block is partial (the caller copies the data), else None."""
        s = self.seqs[src]
        self.add(dst)
        d = self.seqs[dst]
        partial = s.stored(self.block_size) % self.block_size != 0
        shared = s.blocks[:-1] if partial else s.blocks
        for b in shared:
            self.allocator.share(b)
        d.blocks, d.logical, d.length = list(shared), s.logical[:len(shared)], s.length
        if not partial:
            return None
        (nb,) = self.allocator.allocate(1)
        d.blocks.append(nb)
        d.logical.append(s.logical[-1])
        return s.blocks[-1], nb

    def evict(self, seq_id) -> None:
        """Release the blocks the evicting policy says no future query reads."""
        s = self.seqs[seq_id]
        if self.evict_policy is None or not s.blocks:
            return
        # called before appending: the step's first query is at position s.length, and
        # kept_blocks(n) keeps what the query at n - 1 and every later one reads
        keep = set(self.evict_policy.kept_blocks(s.length + 1, self.block_size))
        keep.add(s.logical[-1])  # the partial last block is still being written
        kept = [(b, lb) for b, lb in zip(s.blocks, s.logical) if lb in keep]
        for b, lb in zip(s.blocks, s.logical):
            if lb not in keep:
                self.allocator.release(b)
        s.blocks, s.logical = [b for b, _ in kept], [lb for _, lb in kept]

    def new_blocks(self, seq_id, n: int) -> int:
        """Blocks sequence seq_id must take to append n tokens (one not yet added counts as empty)."""
        s = self.seqs.get(seq_id)
        length, last = (0, -1) if s is None else (s.length, s.logical[-1] if s.blocks else -1)
        if n <= 0:
            return 0
        return max(0, (length + n - 1) // self.block_size - last)

    def blocks_needed(self, seq_ids, num_new) -> int:
        return sum(self.new_blocks(i, n) for i, n in zip(seq_ids, num_new))

    def append(self, seq_ids: list, num_new: list[int]) -> list[list[int]]:
        """Reserve room and advance each sequence by num_new tokens (all or nothing: raises
        KVCacheFull having taken nothing). Returns each new token's slot, per sequence."""
        for i in seq_ids:
            if i not in self.seqs:
                raise RarefyError(f"sequence {i!r} is not in the KV cache (add it first)")
            self.evict(i)
        need = self.blocks_needed(seq_ids, num_new)
        if need > self.num_free:
            raise KVCacheFull(
                f"the KV cache is too small for this step: it needs {need} more blocks of "
                f"{self.block_size} tokens but {self.num_free} of {self.num_blocks} are free "
                f"({self.num_blocks * self.block_size} tokens in all); give the cache more memory or "
                "run fewer or shorter sequences")
        bs, out = self.block_size, []
        for i, n in zip(seq_ids, num_new):
            s = self.seqs[i]
            k = self.new_blocks(i, n)
            first = (s.logical[-1] + 1) if s.blocks else s.length // bs
            s.blocks += self.allocator.allocate(k)
            s.logical += range(first, first + k)
            where = dict(zip(s.logical[-(k + 1):], s.blocks[-(k + 1):]))
            out.append([where[p // bs] * bs + p % bs for p in range(s.length, s.length + n)])
            s.length += n
        return out
