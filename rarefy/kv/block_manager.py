"""Which physical KV blocks each sequence owns: pure Python, no tensors.

The scheduler asks it whether a step fits (`blocks_needed`, `num_free`) and frees
preempted or finished sequences; PagedKVCache asks it for the slots and block
tables of a step. Every block but a sequence's last kept one is full; an evicting
policy (window) drops whole blocks nobody will read again, and positions are never
renumbered, so `logical` keeps each kept block's position // block_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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


class _PoolCounts:
    """What every manager reports about its allocator (`self.allocator`) and sequences."""

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def _check_new(self, seq_id) -> None:
        if seq_id in self.seqs:
            raise RarefyError(f"sequence {seq_id!r} is already in the KV cache")

    def _make_room(self, seq_ids: list, num_new: list[int], unit: str, capacity: str) -> None:
        """Evict what the sequences' policy lets go, then refuse the step (KVCacheFull, nothing
        taken) when the free blocks cannot hold it."""
        for i in seq_ids:
            if i not in self.seqs:
                raise RarefyError(f"sequence {i!r} is not in the KV cache (add it first)")
            self.evict(i)
        need = self.blocks_needed(seq_ids, num_new)
        if need > self.num_free:
            raise KVCacheFull(
                f"the KV cache is too small for this step: it needs {need} more {unit} of "
                f"{self.block_size} tokens but {self.num_free} of {self.num_blocks} are free "
                f"({capacity} in all); give the cache more memory or run fewer or shorter sequences")


class BlockManager(_PoolCounts):
    def __init__(self, num_blocks: int, block_size: int, evict_policy=None, allocator=None):
        if block_size < 1 or block_size & (block_size - 1):
            raise RarefyError(f"KV block size must be a power of two, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks) if allocator is None else allocator
        self.evict_policy = evict_policy
        self.seqs: dict = {}

    def add(self, seq_id) -> None:
        self._check_new(seq_id)
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
        self._make_room(seq_ids, num_new, "blocks", f"{self.num_blocks * self.block_size} tokens")
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


# ----------------------------------------------------------------------------- layer groups

class GroupAllocator:
    """One layer group's view of a shared pool of layer-blocks (one layer's keys and values
    for `block_size` tokens). A group block is `width` layer-blocks, one for each layer of
    the group; its id is its first layer-block's id. Same interface as BlockAllocator, so a
    BlockManager keeps the group's tables unchanged."""

    def __init__(self, pool: BlockAllocator, width: int):
        self.pool, self.width = pool, width
        self.units: dict[int, list[int]] = {}  # group block id -> its layer-blocks (one per layer)
        self._refs: dict[int, int] = {}
        # gid -> layer-blocks as a tensor, for building per-layer tables and slots with one index
        self.unit_map = torch.zeros((pool.num_blocks, width), dtype=torch.long)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks // self.width

    @property
    def num_free(self) -> int:
        return self.pool.num_free // self.width

    @property
    def num_used(self) -> int:
        return len(self.units)

    def allocate(self, n: int) -> list[int]:
        if n * self.width > self.pool.num_free:
            raise KVCacheFull(f"the KV cache needs {n * self.width} more layer-blocks but only "
                              f"{self.pool.num_free} of {self.pool.num_blocks} are free")
        out = []
        for _ in range(n):
            units = self.pool.allocate(self.width)
            gid = units[0]
            self.units[gid], self._refs[gid] = units, 1
            self.unit_map[gid] = torch.tensor(units)
            out.append(gid)
        return out

    def share(self, block: int) -> None:
        if self._refs.get(block, 0) <= 0:
            raise RuntimeError(f"block {block} is free; it cannot be shared")
        self._refs[block] += 1

    def release(self, block: int) -> None:
        if self._refs.get(block, 0) <= 0:
            raise RuntimeError(f"block {block} released more often than it was taken")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            del self._refs[block]
            for u in self.units.pop(block):
                self.pool.release(u)

    def refcount(self, block: int) -> int:
        return self._refs.get(block, 0)


def policy_groups(per_layer: list) -> list[tuple[list[int], object]]:
    """Layers grouped by their evicting policy: [(layers, policy or None)], where None holds
    every layer that keeps all its blocks (dense and masking policies). Ordered by first layer."""
    groups: dict = {}
    for i, p in enumerate(per_layer):
        key = p if p is not None and getattr(p, "evicts", False) else None
        groups.setdefault(key, []).append(i)
    return sorted(((layers, key) for key, layers in groups.items()), key=lambda g: g[0][0])


class GroupedBlockManager(_PoolCounts):
    """Block tables per group of layers that share an evicting policy, over ONE pool of
    layer-blocks, so that layers with a short window free their blocks early and the memory
    goes to any sequence and any layer (docs/kv-cache.md, "Layer groups").

    Counts the scheduler sees (`num_blocks`, `num_free`, `new_blocks`, `blocks_needed`) are
    in layer-blocks: a token block of a group with n layers costs n. Sequences, lengths and
    the all-or-nothing `append` behave as in BlockManager; `groups[g]` is a BlockManager with
    group g's tables (its ids are group block ids, see GroupAllocator.unit_map)."""

    grouped = True

    def __init__(self, num_layer_blocks: int, block_size: int, groups: list[tuple[list[int], object]]):
        if block_size < 1 or block_size & (block_size - 1):
            raise RarefyError(f"KV block size must be a power of two, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_layer_blocks)
        self.group_layers = [list(layers) for layers, _ in groups]
        self.groups = [BlockManager(1, block_size, policy, GroupAllocator(self.allocator, len(layers)))
                       for layers, policy in groups]
        self.layer_group: dict[int, tuple[int, int]] = {}  # layer -> (group, index within the group)
        for g, layers in enumerate(self.group_layers):
            for r, layer in enumerate(layers):
                self.layer_group[layer] = (g, r)
        evicting = [m.evict_policy for m in self.groups if m.evict_policy is not None]
        # the scheduler only refuses a request that could never fit when nothing evicts
        self.evict_policy = evicting[0] if len(evicting) == len(self.groups) else None

    @property
    def seqs(self) -> dict:
        """Sequence id -> group 0's SeqBlocks (every group has the same sequences and lengths)."""
        return self.groups[0].seqs

    def add(self, seq_id) -> None:
        self._check_new(seq_id)
        for m in self.groups:
            m.add(seq_id)

    def free(self, seq_id) -> None:
        for m in self.groups:
            m.free(seq_id)

    def fork(self, src, dst) -> list[tuple[list[int], list[int]]]:
        """Like BlockManager.fork; returns the (source, destination) layer-blocks to copy."""
        copies = []
        for m in self.groups:
            c = m.fork(src, dst)
            if c is not None:
                copies.append((m.allocator.units[c[0]], m.allocator.units[c[1]]))
        return copies

    def evict(self, seq_id) -> None:
        for m in self.groups:
            m.evict(seq_id)

    def new_blocks(self, seq_id, n: int) -> int:
        return sum(m.allocator.width * m.new_blocks(seq_id, n) for m in self.groups)

    def blocks_needed(self, seq_ids, num_new) -> int:
        return sum(self.new_blocks(i, n) for i, n in zip(seq_ids, num_new))

    def held(self, seq_id) -> int:
        """Layer-blocks a sequence holds now."""
        return sum(m.allocator.width * len(m.seqs[seq_id].blocks) for m in self.groups)

    def append(self, seq_ids: list, num_new: list[int]) -> list[list[list[int]]]:
        """All or nothing over every group. Returns, per group, each sequence's new slots in
        group-block ids (GroupAllocator.unit_map turns them into each layer's slots)."""
        per_layer = self.num_blocks // sum(map(len, self.group_layers)) * self.block_size
        self._make_room(seq_ids, num_new, "layer-blocks", f"{per_layer} tokens of every layer")
        return [m.append(seq_ids, num_new) for m in self.groups]
