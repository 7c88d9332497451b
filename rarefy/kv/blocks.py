"""Physical KV blocks: a free list with reference counts.

A block can be referenced by several sequences (a forked sequence shares its
parent's full blocks; the serving engine's prefix cache shares prompt blocks), so a
block returns to the free list only when its last reference is dropped.
"""

from __future__ import annotations

from collections import deque

from rarefy.errors import RarefyError


class KVCacheFull(RarefyError):
    """Not enough free blocks for a request; nothing was allocated."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise RarefyError(f"a KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (refcount 1), or KVCacheFull with nothing taken."""
        if n > len(self._free):
            raise KVCacheFull(f"the KV cache needs {n} more blocks but only {len(self._free)} of "
                              f"{self.num_blocks} are free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, block: int) -> None:
        if self._refs[block] <= 0:
            raise RuntimeError(f"block {block} is free; it cannot be shared")
        self._refs[block] += 1

    def release(self, block: int) -> None:
        if self._refs[block] <= 0:
            raise RuntimeError(f"block {block} released more often than it was taken")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def refcount(self, block: int) -> int:
        return self._refs[block]
