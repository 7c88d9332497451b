"""A paged KV cache: fixed-size blocks, per-sequence block tables, quantized storage.

Layout, dtypes and the kernel contract are in docs/kv-cache.md. One PagedKVCache
serves every layer of a model; sequences are identified by any hashable id. A
forward pass over the cache is bracketed by `begin_step(seq_ids, num_new)`, which
reserves blocks for the step's new tokens (all or nothing) and builds the slot
mapping, block tables and lengths every layer then uses; the model calls
`attend(layer, q, k, v, ...)`, which stores k/v (quantizing on write) and attends.

Decode (one new token per sequence) runs rarefy's paged decode kernel (Triton on
CUDA, torch on CPU). Prefill and chunked prefill gather each sequence's cached
keys/values and run SDPA with a causal mask offset by what was cached before.
A sparse-attention policy (rarefy.kv.policies) either evicts blocks (window: the
kernel then reads only what is kept, and memory stays bounded) or masks the scores
of a gathered decode (top-k, threshold, entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rarefy.errors import RarefyError
from rarefy.kv import quant
from rarefy.kv.blocks import BlockAllocator, KVCacheFull

DEFAULT_BLOCK_SIZE = 16


@dataclass
class _Seq:
    blocks: list[int]  # physical blocks kept, in logical order
    logical: list[int]  # logical block index (position // block_size) of each kept block
    length: int = 0  # tokens appended so far = the next token's position

    def stored(self, block_size: int) -> int:
        """Tokens held in the kept blocks (every kept block but the last is full)."""
        if not self.blocks:
            return 0
        return (len(self.blocks) - 1) * block_size + self.length - self.logical[-1] * block_size


@dataclass
class StepMeta:
    seq_ids: list
    num_new: list[int]
    slot_mapping: torch.Tensor  # [B, T] int64, -1 for padding past a row's num_new
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: tokens stored after this step
    q_start: torch.Tensor  # [B] int64: stored index of each row's first new token
    key_positions: torch.Tensor | None  # [B, max_stored] int64 (for masking policies), lazily built


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_dtype: str = "bf16",
                 device: torch.device | str = "cpu", policy=None):
        """policy: None (dense), one policy for every layer, or a config with for_layer(i)."""
        if block_size < 1 or block_size & (block_size - 1):
            raise RarefyError(f"KV block size must be a power of two, got {block_size}")
        self.kv_dtype = quant.check_kv_dtype(kv_dtype)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.device = block_size, torch.device(device)
        self.allocator = BlockAllocator(num_blocks)
        store = quant.storage_dtype(kv_dtype)
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k_cache = [torch.zeros(shape, dtype=store, device=self.device) for _ in range(num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=store, device=self.device) for _ in range(num_layers)]
        if quant.is_quantized(kv_dtype):
            sshape = shape[:-1]
            self.k_scale = [torch.ones(sshape, dtype=quant.SCALE_DTYPE, device=self.device)
                            for _ in range(num_layers)]
            self.v_scale = [torch.ones(sshape, dtype=quant.SCALE_DTYPE, device=self.device)
                            for _ in range(num_layers)]
        else:
            self.k_scale = self.v_scale = [None] * num_layers
        self._seqs: dict = {}
        self.meta: StepMeta | None = None
        self._set_policy(policy)

    # ---- sizing -------------------------------------------------------------------------

    @classmethod
    def for_model(cls, cfg, *, device, kv_dtype: str = "bf16", block_size: int = DEFAULT_BLOCK_SIZE,
                  num_blocks: int | None = None, memory_bytes: int | None = None,
                  tokens: int | None = None, policy=None) -> "PagedKVCache":
        """Size by block count, by a memory budget, or to hold `tokens` tokens."""
        if sum(x is not None for x in (num_blocks, memory_bytes, tokens)) != 1:
            raise ValueError("give exactly one of num_blocks, memory_bytes, tokens")
        if memory_bytes is not None:
            per_block = block_size * quant.bytes_per_token(kv_dtype, cfg.num_layers, cfg.num_kv_heads,
                                                           cfg.head_dim)
            num_blocks = memory_bytes // per_block
            if num_blocks < 1:
                raise RarefyError(f"a KV-cache budget of {memory_bytes} bytes holds no block of "
                                  f"{block_size} tokens ({per_block} bytes each)")
        elif tokens is not None:
            num_blocks = -(-tokens // block_size)
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks, block_size, kv_dtype,
                   device, policy)

    @property
    def bytes_per_token(self) -> int:
        return quant.bytes_per_token(self.kv_dtype, self.num_layers, self.num_kv_heads, self.head_dim)

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.block_size

    def nbytes(self) -> int:
        ts = self.k_cache + self.v_cache + [s for s in self.k_scale + self.v_scale if s is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def usage(self) -> float:
        """Fraction of blocks in use."""
        return self.allocator.num_used / self.allocator.num_blocks

    # ---- policies -----------------------------------------------------------------------

    def _set_policy(self, policy) -> None:
        if policy is None:
            per_layer = [None] * self.num_layers
        elif hasattr(policy, "for_layer"):
            per_layer = [policy.for_layer(i) for i in range(self.num_layers)]
        else:
            per_layer = [policy] * self.num_layers
        per_layer = [None if p is None or getattr(p, "name", "") == "dense" else p for p in per_layer]
        self.layer_policy = per_layer
        evicting = [p for p in per_layer if p is not None and getattr(p, "evicts", False)]
        # Blocks are shared by all layers, so evicting needs one window for every layer;
        # otherwise window layers mask their scores and memory is not reduced.
        same = len(evicting) == self.num_layers and len({repr(p) for p in evicting}) == 1
        self.evict_policy = evicting[0] if same else None

    # ---- sequences ----------------------------------------------------------------------

    def add_sequence(self, seq_id) -> None:
        if seq_id in self._seqs:
            raise RarefyError(f"sequence {seq_id!r} is already in the KV cache")
        self._seqs[seq_id] = _Seq([], [])

    def has_sequence(self, seq_id) -> bool:
        return seq_id in self._seqs

    def free_sequence(self, seq_id) -> None:
        s = self._seqs.pop(seq_id)
        for b in s.blocks:
            self.allocator.release(b)

    def fork(self, src, dst) -> None:
        """dst starts as a copy of src: full blocks are shared, the partial last block is copied."""
        s = self._seqs[src]
        self.add_sequence(dst)
        d = self._seqs[dst]
        full = s.stored(self.block_size) % self.block_size == 0
        shared = s.blocks if full else s.blocks[:-1]
        for b in shared:
            self.allocator.share(b)
        d.blocks, d.logical, d.length = list(shared), list(s.logical[:len(shared)]), s.length
        if not full:
            (nb,) = self.allocator.allocate(1)
            for layer in range(self.num_layers):
                for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale):
                    if t[layer] is not None:
                        t[layer][nb].copy_(t[layer][s.blocks[-1]])
            d.blocks.append(nb)
            d.logical.append(s.logical[-1])

    def length(self, seq_id) -> int:
        return self._seqs[seq_id].length

    def stored_tokens(self, seq_id) -> int:
        return self._seqs[seq_id].stored(self.block_size)

    def block_ids(self, seq_id) -> list[int]:
        return list(self._seqs[seq_id].blocks)

    def _evict(self, s: _Seq) -> None:
        if self.evict_policy is None or not s.blocks:
            return
        keep = set(self.evict_policy.kept_blocks(s.length, self.block_size))
        keep.add(s.logical[-1])  # the partial last block is still being written
        blocks, logical = [], []
        for b, lb in zip(s.blocks, s.logical):
            if lb in keep:
                blocks.append(b)
                logical.append(lb)
            else:
                self.allocator.release(b)
        s.blocks, s.logical = blocks, logical

    def _new_blocks_needed(self, s: _Seq, n: int) -> int:
        bs = self.block_size
        last_logical = (s.length + n - 1) // bs if n else -1
        have = s.logical[-1] if s.blocks else -1
        return max(0, last_logical - have)

    def blocks_needed(self, seq_ids, num_new) -> int:
        return sum(self._new_blocks_needed(self._seqs[i], n) for i, n in zip(seq_ids, num_new))

    # ---- one forward step ---------------------------------------------------------------

    def begin_step(self, seq_ids: list, num_new: list[int]) -> StepMeta:
        """Reserve room for num_new[i] tokens of each sequence and build the step's metadata.

        Raises KVCacheFull (nothing reserved) when the free blocks do not suffice."""
        if len(seq_ids) != len(num_new) or not seq_ids:
            raise ValueError("begin_step needs one num_new per sequence")
        for i in seq_ids:
            if i not in self._seqs:
                raise RarefyError(f"sequence {i!r} is not in the KV cache (add_sequence first)")
            self._evict(self._seqs[i])
        need = self.blocks_needed(seq_ids, num_new)
        if need > self.allocator.num_free:
            raise KVCacheFull(
                f"the KV cache is too small for this step: it needs {need} more blocks of "
                f"{self.block_size} tokens but {self.allocator.num_free} of {self.allocator.num_blocks} "
                f"are free ({self.capacity_tokens} tokens in all); give the cache more memory or "
                "run fewer or shorter sequences")
        bs, B, T = self.block_size, len(seq_ids), max(num_new)
        slots = torch.full((B, T), -1, dtype=torch.long)
        starts, lens = [], []
        for row, (i, n) in enumerate(zip(seq_ids, num_new)):
            s = self._seqs[i]
            k = self._new_blocks_needed(s, n)
            first_new_logical = (s.logical[-1] + 1) if s.blocks else s.length // bs
            s.blocks += self.allocator.allocate(k)
            s.logical += list(range(first_new_logical, first_new_logical + k))
            starts.append(s.stored(bs))
            index = {lb: b for b, lb in zip(s.blocks, s.logical)}
            for t in range(n):
                p = s.length + t
                slots[row, t] = index[p // bs] * bs + p % bs
            s.length += n
            lens.append(s.stored(bs))
        width = max(len(self._seqs[i].blocks) for i in seq_ids)
        table = torch.zeros((B, width), dtype=torch.int32)
        for row, i in enumerate(seq_ids):
            blocks = self._seqs[i].blocks
            table[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        dev = self.device
        self.meta = StepMeta(list(seq_ids), list(num_new), slots.to(dev), table.to(dev),
                             torch.tensor(lens, dtype=torch.int32, device=dev),
                             torch.tensor(starts, dtype=torch.long, device=dev), None)
        return self.meta

    def make_mask(self, positions, kv_len):
        """The model builds no mask for a paged cache: attend() knows each row's lengths."""
        return None

    def attend(self, layer: int, q, k, v, positions=None, kv_len=None, mask=None):
        """q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] for the step's new tokens (after rotary).
        Stores k/v, then returns attention over each row's cached tokens: [B, Hq, T, D]."""
        from rarefy.kernels.paged_attention import paged_decode_attention, store_kv

        m = self.meta
        if m is None or q.shape[0] != len(m.seq_ids) or q.shape[2] != m.slot_mapping.shape[1]:
            raise RarefyError("PagedKVCache.attend: call begin_step with this batch's sequences first")
        B, Hq, T, D = q.shape
        flat = m.slot_mapping.reshape(-1)
        valid = flat >= 0
        kk = k.transpose(1, 2).reshape(B * T, self.num_kv_heads, D)
        vv = v.transpose(1, 2).reshape(B * T, self.num_kv_heads, D)
        if not bool(valid.all()):
            kk, vv, flat = kk[valid], vv[valid], flat[valid]
        store_kv(kk, vv, flat, self.k_cache[layer], self.v_cache[layer], self.k_scale[layer],
                 self.v_scale[layer], self.kv_dtype)
        policy = self.layer_policy[layer]
        sm_scale = 1.0 / math.sqrt(D)
        if T == 1 and (policy is None or policy is self.evict_policy):
            out = paged_decode_attention(q[:, :, 0], self.k_cache[layer], self.v_cache[layer],
                                         self.k_scale[layer], self.v_scale[layer], m.block_tables,
                                         m.seq_lens, self.kv_dtype, sm_scale)
            return out.unsqueeze(2)
        kg, vg = self.gather(layer, q.dtype)
        if T == 1:
            from rarefy.kv.simulate import decode_attention_with_policy
            out = decode_attention_with_policy(q[:, :, 0].float(), kg.float(), vg.float(), m.seq_lens,
                                               policy, sm_scale, k_pos=self.key_positions(),
                                               q_pos=self.query_positions()[:, 0])
            return out.to(q.dtype).unsqueeze(2)
        # Prefill: new token t of row b is stored at q_start[b] + t and sees stored keys <= that.
        L = kg.shape[2]
        j = torch.arange(L, device=q.device)
        qi = m.q_start[:, None] + torch.arange(T, device=q.device)[None, :]  # [B, T]
        allowed = (j[None, None, :] <= qi[:, :, None]) & (j[None, None, :] < m.seq_lens[:, None, None])
        out = F.scaled_dot_product_attention(q, kg, vg, attn_mask=allowed.unsqueeze(1),
                                             enable_gqa=Hq != self.num_kv_heads)
        return out

    def gather(self, layer: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's stored keys and values, dequantized: ([B, Hkv, L, D], same), L = the
        longest row rounded up to whole blocks; slots past a row's length hold garbage."""
        m = self.meta
        table = m.block_tables.long()
        B, nb = table.shape

        def one(cache, scale):
            x = cache[table]  # [B, nb, Hkv, bs, D]
            s = None if scale is None else scale[table]
            x = quant.dequantize(x, s, dtype)
            return x.permute(0, 2, 1, 3, 4).reshape(B, self.num_kv_heads, nb * self.block_size, -1)

        return one(self.k_cache[layer], self.k_scale[layer]), one(self.v_cache[layer], self.v_scale[layer])

    def key_positions(self) -> torch.Tensor:
        """[B, L] logical position of each gathered key slot (matches gather())."""
        m = self.meta
        if m.key_positions is None:
            rows = []
            width = m.block_tables.shape[1]
            for i in m.seq_ids:
                s = self._seqs[i]
                lg = s.logical + [s.logical[-1] + 1 + j for j in range(width - len(s.logical))]
                rows.append(torch.tensor(lg)[:, None] * self.block_size + torch.arange(self.block_size))
            m.key_positions = torch.stack(rows).reshape(len(rows), -1).to(self.device)
        return m.key_positions

    def query_positions(self) -> torch.Tensor:
        """[B, T] position of each of the step's new tokens."""
        m = self.meta
        ends = torch.tensor([self._seqs[i].length for i in m.seq_ids], device=self.device)
        T = m.slot_mapping.shape[1]
        return ends[:, None] - torch.tensor(m.num_new, device=self.device)[:, None] + torch.arange(
            T, device=self.device)[None, :]


__all__ = ["PagedKVCache", "KVCacheFull", "StepMeta", "DEFAULT_BLOCK_SIZE"]
