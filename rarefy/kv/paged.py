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

Layer groups: when layers have different evicting policies (per-layer windows from
`rarefy calibrate-attention`), each group of layers sharing a policy gets its own
block tables over ONE pool of layer-blocks (GroupedBlockManager), so a layer with a
short window frees its blocks while a layer with a long one keeps its own; every layer
reads the pool through its own block table and slot mapping (docs/kv-cache.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rarefy.errors import RarefyError
from rarefy.kv import quant
from rarefy.kv.block_manager import BlockManager, GroupedBlockManager, policy_groups
from rarefy.kv.blocks import KVCacheFull

DEFAULT_BLOCK_SIZE = 16


def stores_v_dim_major(kv_dtype: str, device) -> bool:
    """Whether the paged cache keeps V as a view of dim-major storage [blocks, heads, head_dim,
    block_size] (docs/kv-cache.md): the tokens, the reduction axis of P @ V, are then
    contiguous, which the swapped-product decode kernel needs. 8-bit caches always (it feeds
    8-bit V to the tensor cores without byte loads); bf16/fp16 on a GPU, where that kernel is
    also the faster one (H100, seventh session: 1.02-1.25x the token-major kernel from 1k x 1 to
    128k x 1 and batch 64; docs/results/attention.md). The CPU's torch path keeps 16-bit V
    token-major."""
    if quant.is_quantized(kv_dtype):
        return True
    return kv_dtype in ("bf16", "fp16") and torch.device(device).type == "cuda"


@dataclass
class StepMeta:
    seq_ids: list
    num_new: list[int]
    packed: bool  # tokens laid out as [1, sum(num_new)] instead of [B, max(num_new)]
    slot_mapping: torch.Tensor  # [B, T] (padded; -1 past a row's num_new) or [1, N] (packed) int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: tokens stored after this step
    q_start: torch.Tensor  # [B] int64: stored index of each row's first new token
    q_start_host: list[int]  # the same, on the host
    token_start: list[int]  # packed: index of each row's first token in the step
    max_len: int  # max(seq_lens), known on the host (spares the kernel a device sync)
    key_positions: torch.Tensor | None = None  # [B, L] int64, built on demand for masking policies
    layers: list | None = None  # grouped cache: one LayerMeta per layer (its own tables and slots)


@dataclass
class LayerMeta:
    """A grouped cache's step metadata for one layer (fields as in StepMeta, for its group)."""
    group: int
    slot_mapping: torch.Tensor  # layer-block slots of the step's tokens (-1 = padding)
    block_tables: torch.Tensor  # [B, max_blocks] int32, layer-block ids
    seq_lens: torch.Tensor  # [B] int32: tokens this group's kept blocks hold after the step
    q_start: torch.Tensor
    q_start_host: list[int]
    max_len: int
    shared: dict  # per group: key_positions, built on demand


class PagedKVCache:
    def __new__(cls, *args, **kwargs):
        # a policy with per-KV-head windows makes a head-grouped cache (HeadGroupedKVCache)
        kind = cls
        if cls is PagedKVCache and _has_per_head(kwargs.get("policy", args[7] if len(args) > 7 else None)):
            kind = HeadGroupedKVCache
        return object.__new__(kind)

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int | None,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_dtype: str = "bf16",
                 device: torch.device | str = "cpu", policy=None, num_layer_blocks: int | None = None):
        """policy: None (dense), one policy for every layer, or a config with for_layer(i).

        num_blocks: blocks of `block_size` tokens of every layer. A policy whose layers evict
        differently makes a grouped cache: a pool of num_blocks · num_layers layer-blocks
        (or `num_layer_blocks` exactly), the same memory, shared by the layer groups."""
        self.kv_dtype = quant.check_kv_dtype(kv_dtype)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.device = block_size, torch.device(device)
        self._set_policy(policy)
        store = quant.storage_dtype(kv_dtype)
        if self.grouped:
            units = num_layer_blocks if num_layer_blocks is not None else num_blocks * num_layers
            if units < 1:
                raise RarefyError("a KV cache needs at least one block")
            self.blocks = GroupedBlockManager(units, block_size, self.groups)
            shape = (units, num_kv_heads, block_size, head_dim)
            # one pool for every layer: each layer addresses it through its own block table
            pool = [torch.zeros(shape, dtype=store, device=self.device), self._v_storage(shape, store)]
            self.k_cache, self.v_cache = [pool[0]] * num_layers, [pool[1]] * num_layers
            if quant.is_quantized(kv_dtype):
                sp = [torch.ones(shape[:-1], dtype=quant.SCALE_DTYPE, device=self.device) for _ in range(2)]
                self.k_scale, self.v_scale = [sp[0]] * num_layers, [sp[1]] * num_layers
            else:
                self.k_scale = self.v_scale = [None] * num_layers
        else:
            if num_blocks is None:
                num_blocks = -(-num_layer_blocks // num_layers)
            self.blocks = BlockManager(num_blocks, block_size, self.evict_policy)
            shape = (num_blocks, num_kv_heads, block_size, head_dim)
            self.k_cache = [torch.zeros(shape, dtype=store, device=self.device) for _ in range(num_layers)]
            self.v_cache = [self._v_storage(shape, store) for _ in range(num_layers)]
            if quant.is_quantized(kv_dtype):
                sshape = shape[:-1]
                self.k_scale = [torch.ones(sshape, dtype=quant.SCALE_DTYPE, device=self.device)
                                for _ in range(num_layers)]
                self.v_scale = [torch.ones(sshape, dtype=quant.SCALE_DTYPE, device=self.device)
                                for _ in range(num_layers)]
            else:
                self.k_scale = self.v_scale = [None] * num_layers
        self.allocator = self.blocks.allocator
        self.meta: StepMeta | None = None

    def _v_storage(self, shape, store) -> torch.Tensor:
        """A zeroed V cache [blocks, heads, block_size, head_dim], as a view of dim-major storage
        [blocks, heads, head_dim, block_size] where :func:`stores_v_dim_major` says so."""
        if stores_v_dim_major(self.kv_dtype, self.device):
            b, h, bs, d = shape
            return torch.zeros((b, h, d, bs), dtype=store, device=self.device).transpose(2, 3)
        return torch.zeros(shape, dtype=store, device=self.device)

    # ---- sizing -------------------------------------------------------------------------

    @classmethod
    def for_model(cls, cfg, *, device, kv_dtype: str = "bf16", block_size: int = DEFAULT_BLOCK_SIZE,
                  num_blocks: int | None = None, memory_bytes: int | None = None,
                  tokens: int | None = None, policy=None) -> PagedKVCache:
        """Size by block count, by a memory budget, or to hold `tokens` tokens."""
        if sum(x is not None for x in (num_blocks, memory_bytes, tokens)) != 1:
            raise ValueError("give exactly one of num_blocks, memory_bytes, tokens")
        L = cfg.num_layers
        units = None
        if memory_bytes is not None:
            per_block = block_size * quant.bytes_per_token(kv_dtype, L, cfg.num_kv_heads, cfg.head_dim)
            num_blocks = memory_bytes // per_block
            # a grouped cache uses every whole layer-block (head-block when split per KV head)
            units = memory_bytes // (per_block // (L * (cfg.num_kv_heads if _has_per_head(policy) else 1)))
            if num_blocks < 1:
                raise RarefyError(f"a KV-cache budget of {memory_bytes} bytes holds no block of "
                                  f"{block_size} tokens ({per_block} bytes each)")
        elif tokens is not None:
            num_blocks = -(-tokens // block_size)  # `tokens` in every layer, nothing evicted
        return cls(L, cfg.num_kv_heads, cfg.head_dim, num_blocks, block_size, kv_dtype, device, policy,
                   num_layer_blocks=units)

    @property
    def bytes_per_token(self) -> int:
        return quant.bytes_per_token(self.kv_dtype, self.num_layers, self.num_kv_heads, self.head_dim)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds when nothing is evicted (in every layer)."""
        if self.grouped:
            return self.allocator.num_blocks // self.num_layers * self.block_size
        return self.allocator.num_blocks * self.block_size

    @property
    def num_layer_blocks(self) -> int:
        """Blocks of one layer the memory holds (layer-blocks): num_blocks · num_layers."""
        return self.allocator.num_blocks * (1 if self.grouped else self.num_layers)

    def layer_blocks_for(self, length: int) -> int:
        """Peak layer-blocks one sequence holds while decoding up to `length` tokens (evicting
        layers hold their window, the others every block). Prefill steps longer than a window
        hold more for that step: eviction runs between steps."""
        return layer_blocks_for(self.layer_policy_all, length, self.block_size)

    def sequences_that_fit(self, length: int) -> int:
        """How many sequences of `length` tokens fit at once (at their peak)."""
        return self.num_layer_blocks // max(1, self.layer_blocks_for(length))

    def effective_bytes_per_token(self, length: int) -> float:
        """bytes_per_token × peak blocks held for a `length`-token sequence over a dense cache's."""
        dense = self.num_layers * -(-length // self.block_size)
        return self.bytes_per_token * self.layer_blocks_for(length) / dense

    def nbytes(self) -> int:
        ts = self.k_cache + self.v_cache + [s for s in self.k_scale + self.v_scale if s is not None]
        unique = {id(t): t for t in ts}.values()  # a grouped cache lists its pool once per layer
        return sum(t.numel() * t.element_size() for t in unique)

    def usage(self) -> float:
        """Fraction of blocks in use."""
        return self.allocator.num_used / self.allocator.num_blocks

    # ---- policies -----------------------------------------------------------------------

    def _set_policy(self, policy) -> None:
        per_layer = _per_layer(policy, self.num_layers)
        self.layer_policy = per_layer
        self.layer_policy_all = per_layer
        self.groups = policy_groups(per_layer)
        evicting = [p for p in per_layer if p is not None and getattr(p, "evicts", False)]
        # One window for every layer: the blocks are shared by all layers (one table). Layers
        # that evict differently (or some not at all): one table per group of layers over a
        # pool of layer-blocks. Either way every evicting layer's policy is its eviction.
        same = len(evicting) == self.num_layers and len({repr(p) for p in evicting}) == 1
        self.evict_policy = evicting[0] if same else None
        self.grouped = bool(evicting) and not same
        # (a grouped cache has evict_policy None: the engine's runner then treats its window
        # layers like masking layers and runs decode eagerly, without a captured graph, which
        # builds one table per layer group)

    # ---- sequences (bookkeeping lives in self.blocks) --------------------------------

    def add_sequence(self, seq_id) -> None:
        self.blocks.add(seq_id)

    def has_sequence(self, seq_id) -> bool:
        return seq_id in self.blocks.seqs

    def free_sequence(self, seq_id) -> None:
        self.blocks.free(seq_id)

    def fork(self, src, dst) -> None:
        """dst starts as a copy of src: full blocks are shared, the partial last block is copied."""
        copy = self.blocks.fork(src, dst)
        if self.grouped:
            for a_units, b_units in copy:
                a, b = torch.tensor(a_units, device=self.device), torch.tensor(b_units, device=self.device)
                for t in {id(x): x for x in (self.k_cache[0], self.v_cache[0], self.k_scale[0], self.v_scale[0])
                          if x is not None}.values():
                    t[b] = t[a]
            return
        if copy is not None:
            a, b = copy
            for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale):
                for layer in range(self.num_layers):
                    if t[layer] is not None:
                        t[layer][b].copy_(t[layer][a])

    def length(self, seq_id) -> int:
        return self.blocks.seqs[seq_id].length

    def stored_tokens(self, seq_id) -> int:
        return self.blocks.seqs[seq_id].stored(self.block_size)

    def block_ids(self, seq_id) -> list[int]:
        return list(self.blocks.seqs[seq_id].blocks)

    # ---- one forward step ---------------------------------------------------------------

    def begin_step(self, seq_ids: list, num_new: list[int], packed: bool = False) -> StepMeta:
        """Reserve room for num_new[i] tokens of each sequence and build the step's metadata.

        Padded (default): the model's input is [B, max(num_new)], row i's tokens first.
        Packed: the input is [1, sum(num_new)], the rows' tokens one after another; this
        is how the serving engine mixes prefill chunks with decodes without padding.
        Raises KVCacheFull, reserving nothing, when the free blocks do not suffice."""
        if len(seq_ids) != len(num_new) or not seq_ids or min(num_new) < 1:
            raise ValueError("begin_step needs one num_new >= 1 per sequence")
        if self.grouped:
            return self._begin_grouped(seq_ids, num_new, packed)
        slots = self.blocks.append(seq_ids, num_new)
        if packed:
            mapping = torch.tensor([[x for sl in slots for x in sl]], dtype=torch.long)
        else:
            mapping = torch.full((len(seq_ids), max(num_new)), -1, dtype=torch.long)
            for row, sl in enumerate(slots):
                mapping[row, :len(sl)] = torch.tensor(sl, dtype=torch.long)
        seqs = [self.blocks.seqs[i] for i in seq_ids]
        lens = [s.stored(self.block_size) for s in seqs]
        table = torch.zeros((len(seqs), max(len(s.blocks) for s in seqs)), dtype=torch.int32)
        for row, s in enumerate(seqs):
            table[row, :len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        token_start = [0]
        for n in num_new[:-1]:
            token_start.append(token_start[-1] + n)
        dev = self.device
        self.meta = StepMeta(list(seq_ids), list(num_new), packed, mapping.to(dev), table.to(dev),
                             torch.tensor(lens, dtype=torch.int32, device=dev),
                             torch.tensor([n - k for n, k in zip(lens, num_new)], dtype=torch.long, device=dev),
                             [n - k for n, k in zip(lens, num_new)], token_start, max(lens))
        return self.meta

    def _tables(self, slots, seqs, num_new, packed):
        """(slot mapping, block table, lengths) of one table set, as tensors on the host."""
        if packed:
            mapping = torch.tensor([[x for sl in slots for x in sl]], dtype=torch.long)
        else:
            mapping = torch.full((len(seqs), max(num_new)), -1, dtype=torch.long)
            for row, sl in enumerate(slots):
                mapping[row, :len(sl)] = torch.tensor(sl, dtype=torch.long)
        lens = [s.stored(self.block_size) for s in seqs]
        table = torch.zeros((len(seqs), max(len(s.blocks) for s in seqs)), dtype=torch.long)
        for row, s in enumerate(seqs):
            table[row, :len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.long)
        return mapping, table, lens

    def _begin_grouped(self, seq_ids, num_new, packed) -> StepMeta:
        per_group = self.blocks.append(seq_ids, num_new)
        bs, dev = self.block_size, self.device
        layers: list = [None] * self.num_layers
        for g, (m, slots) in enumerate(zip(self.blocks.groups, per_group)):
            seqs = [m.seqs[i] for i in seq_ids]
            mapping, table, lens = self._tables(slots, seqs, num_new, packed)
            umap = m.allocator.unit_map
            pad = mapping < 0
            units = umap[(mapping // bs).clamp_min(0)]  # [B, T, width]
            offs = mapping % bs
            tab_units = umap[table]  # [B, nb, width]
            lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
            q_host = [n - k for n, k in zip(lens, num_new)]
            q_start = torch.tensor(q_host, dtype=torch.long, device=dev)
            shared: dict = {}
            for r, layer in enumerate(self.blocks.group_layers[g]):
                # fresh row-major copies (a [1, 1] view keeps its stride, which kernels check)
                slot = torch.empty(mapping.shape, dtype=torch.long).copy_(
                    (units[..., r] * bs + offs).masked_fill(pad, -1))
                table_r = torch.empty(table.shape, dtype=torch.int32).copy_(tab_units[..., r])
                layers[layer] = LayerMeta(g, slot.to(dev), table_r.to(dev), lens_t, q_start, q_host, max(lens),
                                          shared)
        token_start = [0]
        for n in num_new[:-1]:
            token_start.append(token_start[-1] + n)
        first = layers[0]
        self.meta = StepMeta(list(seq_ids), list(num_new), packed, first.slot_mapping, first.block_tables,
                             first.seq_lens, first.q_start, first.q_start_host, token_start, first.max_len,
                             layers=layers)
        return self.meta

    def _lm(self, layer: int):
        """The step metadata a layer reads: the StepMeta, or its LayerMeta in a grouped cache."""
        return self.meta if self.meta.layers is None else self.meta.layers[layer]

    def make_mask(self, positions, kv_len):
        """The model builds no mask for a paged cache: attend() knows each row's lengths."""
        return

    def attend(self, layer: int, q, k, v, positions=None, kv_len=None, mask=None):
        """Store the step's new keys/values (quantizing on write), then attend over each row's
        cached tokens. Padded: q [B, Hq, T, D], k/v [B, Hkv, T, D]; packed: B = 1, T = N.
        Returns [B, Hq, T, D] (padding positions hold garbage)."""
        from rarefy.kernels.paged_attention import store_kv

        m = self.meta
        if m is None or q.shape[2] != m.slot_mapping.shape[1] or q.shape[0] != m.slot_mapping.shape[0]:
            raise RarefyError("PagedKVCache.attend: call begin_step with this batch's sequences first")
        B, Hq, T, D = q.shape
        lm = self._lm(layer)
        flat = lm.slot_mapping.reshape(-1)
        kk = k.transpose(1, 2).reshape(B * T, self.num_kv_heads, D)
        vv = v.transpose(1, 2).reshape(B * T, self.num_kv_heads, D)
        if not m.packed and min(m.num_new) < T:
            valid = flat >= 0
            kk, vv, flat = kk[valid], vv[valid], flat[valid]
        store_kv(kk, vv, flat, self.k_cache[layer], self.v_cache[layer], self.k_scale[layer],
                 self.v_scale[layer], self.kv_dtype)
        if not m.packed:
            if T == 1:
                return self._decode(layer, q[:, :, 0], None).unsqueeze(2)
            return self._prefill(layer, q, None)
        if max(m.num_new) == 1:  # all decodes: the token order is the row order
            return self._decode(layer, q[0].transpose(0, 1), None).transpose(0, 1).unsqueeze(0)
        out = torch.empty_like(q)
        dec = [r for r, n in enumerate(m.num_new) if n == 1]
        if dec:
            idx = torch.tensor([m.token_start[r] for r in dec], device=q.device)
            rows = torch.tensor(dec, device=q.device)
            out[0, :, idx] = self._decode(layer, q[0, :, idx].transpose(0, 1), rows).transpose(0, 1)
        # Fresh prompts (nothing cached before) of equal length attend among themselves in one
        # batched causal SDPA over their own keys/values, instead of one gather per row. Only
        # where the cache stores the values exactly (unquantized, same dtype as the model).
        fresh: dict[int, list[int]] = {}
        exact = (not quant.is_quantized(self.kv_dtype) and quant.storage_dtype(self.kv_dtype) == k.dtype
                 and not self._evicts(layer))  # a window layer's prompt is masked by its window
        for r, n in enumerate(m.num_new):
            if n == 1:
                continue
            if exact and lm.q_start_host[r] == 0:
                fresh.setdefault(n, []).append(r)
            else:
                a = m.token_start[r]
                out[:, :, a:a + n] = self._prefill(layer, q[:, :, a:a + n], torch.tensor([r], device=q.device))
        for n, rows in fresh.items():
            seg = [slice(m.token_start[r], m.token_start[r] + n) for r in rows]
            qs, ks, vs = (torch.stack([t[0, :, sl] for sl in seg]) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=Hq != self.num_kv_heads)
            for i, sl in enumerate(seg):
                out[0, :, sl] = o[i]
        return out

    def _decode(self, layer: int, q, rows):
        """q: [R, Hq, D], one query per row (rows: tensor of row indices, None = all)."""
        from rarefy.kernels.paged_attention import paged_decode_attention

        m, policy = self._lm(layer), self.layer_policy[layer]
        table, lens = m.block_tables, m.seq_lens
        if rows is not None:
            table, lens = table[rows], lens[rows]
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
        if policy is None or self._evicts(layer):  # eviction left exactly the blocks the policy reads
            return paged_decode_attention(q, self.k_cache[layer], self.v_cache[layer], self.k_scale[layer],
                                          self.v_scale[layer], table, lens, self.kv_dtype, sm_scale,
                                          max_seq_len=m.max_len)
        from rarefy.kv.simulate import decode_attention_with_policy
        kg, vg = self.gather(layer, torch.float32, rows)
        k_pos = self.key_positions(layer) if rows is None else self.key_positions(layer)[rows]
        q_pos = self.decode_positions() if rows is None else self.decode_positions()[rows]
        out = decode_attention_with_policy(q.float(), kg, vg, lens, policy, sm_scale, k_pos=k_pos, q_pos=q_pos)
        return out.to(q.dtype)

    def _prefill(self, layer: int, q, rows):
        """q: [R, Hq, T, D] (or [1, Hq, T, D] for one packed row); token t of a row is stored at
        q_start + t and sees the stored keys up to it."""
        m = self._lm(layer)
        kg, vg = self.gather(layer, q.dtype, rows)
        starts, lens = (m.q_start, m.seq_lens) if rows is None else (m.q_start[rows], m.seq_lens[rows])
        T, L = q.shape[2], kg.shape[2]
        j = torch.arange(L, device=q.device)
        qi = starts[:, None] + torch.arange(T, device=q.device)[None, :]  # [R, T]
        allowed = ((j[None, None, :] <= qi[:, :, None]) & (j[None, None, :] < lens[:, None, None])).unsqueeze(1)
        if self._evicts(layer):
            # the kept blocks are what the chunk's FIRST query reads; later queries of a long
            # chunk read less (blocks leaving their window): mask by the policy, as evaluation does
            k_pos = self.key_positions(layer)
            first_pos = torch.tensor([self.length(i) - n for i, n in zip(self.meta.seq_ids, self.meta.num_new)],
                                     device=q.device)
            if rows is not None:
                k_pos, first_pos = k_pos[rows], first_pos[rows]
            q_pos = first_pos[:, None] + torch.arange(T, device=q.device)[None, :]
            allowed = allowed & self.layer_policy[layer].keep_mask(q_pos, k_pos[:, :L])
        return F.scaled_dot_product_attention(q, kg, vg, attn_mask=allowed,
                                              enable_gqa=q.shape[1] != self.num_kv_heads)

    def _evicts(self, layer: int) -> bool:
        p = self.layer_policy[layer]
        return p is not None and getattr(p, "evicts", False)

    def gather(self, layer: int, dtype, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values of the step's rows (all, or a tensor of row indices),
        dequantized: ([R, Hkv, L, D], same), L = the widest row in whole blocks; slots past
        a row's length hold garbage."""
        table = self._lm(layer).block_tables.long()
        if rows is not None:
            table = table[rows]
        R, nb = table.shape

        def one(cache, scale):
            x = cache[table]  # [R, nb, Hkv, bs, D]
            x = quant.dequantize(x, None if scale is None else scale[table], dtype)
            return x.permute(0, 2, 1, 3, 4).reshape(R, self.num_kv_heads, nb * self.block_size, -1)

        return one(self.k_cache[layer], self.k_scale[layer]), one(self.v_cache[layer], self.v_scale[layer])

    def key_positions(self, layer: int | None = None) -> torch.Tensor:
        """[B, L] logical position of each gathered key slot of `layer` (matches gather())."""
        m = self.meta
        if m.layers is not None and layer is not None:
            lm = m.layers[layer]
            if "key_positions" not in lm.shared:
                lm.shared["key_positions"] = self._key_positions(self.blocks.groups[lm.group].seqs,
                                                                 lm.block_tables.shape[1])
            return lm.shared["key_positions"]
        if m.key_positions is None:
            m.key_positions = self._key_positions(self.blocks.seqs, m.block_tables.shape[1])
        return m.key_positions

    def _key_positions(self, seqs, width) -> torch.Tensor:
        rows = []
        for i in self.meta.seq_ids:
            s = seqs[i]
            lg = s.logical + [s.logical[-1] + 1 + j for j in range(width - len(s.logical))]
            rows.append(torch.tensor(lg)[:, None] * self.block_size + torch.arange(self.block_size))
        return torch.stack(rows).reshape(len(rows), -1).to(self.device)

    def decode_positions(self) -> torch.Tensor:
        """[B] position of each row's last new token (the decode query)."""
        return torch.tensor([self.length(i) - 1 for i in self.meta.seq_ids], device=self.device)


def _has_per_head(policy) -> bool:
    from rarefy.kv.policies import PerHead
    return isinstance(policy, PerHead) or bool(getattr(policy, "per_head", False))


class _HeadPolicies:
    """Virtual layer layer · num_kv_heads + h → KV head h's policy in layer `layer`."""

    def __init__(self, policy, num_layers: int, num_kv_heads: int):
        from rarefy.kv.policies import PerHead
        self.policies = []
        for i in range(num_layers):
            p = policy.for_layer(i) if hasattr(policy, "for_layer") else policy
            if isinstance(p, PerHead):
                p.check_heads(num_kv_heads, f"layer {i}: ")
                self.policies += list(p.heads)
            else:
                self.policies += [p] * num_kv_heads

    def for_layer(self, i: int):
        return self.policies[i]


class HeadGroupedKVCache(PagedKVCache):
    """A paged cache whose block tables are per (layer, KV head): for per-head windows
    (`PerHead` policies, DuoAttention-style), where the heads of one layer keep different
    blocks. Built by PagedKVCache(...) / for_model when the policy has per-head windows.

    Internally every (layer, KV head) is a virtual layer with one KV head: virtual layer
    layer · num_kv_heads + h, grouped by policy over ONE pool of head-blocks (one KV head's
    keys and values for block_size tokens), so `num_layers` / `num_kv_heads` here count
    virtual layers (model_num_layers / model_num_kv_heads are the model's). attend() runs
    each KV head with its query heads through its own table; a head that keeps few blocks
    frees them while a "retrieval" head of the same layer keeps its whole context. Counts
    (num_layer_blocks, layer_blocks_for, ...) are in head-blocks."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int | None,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_dtype: str = "bf16",
                 device: torch.device | str = "cpu", policy=None, num_layer_blocks: int | None = None):
        """num_blocks: blocks of every (layer, KV head) (the memory of num_blocks dense blocks);
        num_layer_blocks: the pool in head-blocks exactly (for_model passes it)."""
        self.model_num_layers, self.model_num_kv_heads = num_layers, num_kv_heads
        virtual = _HeadPolicies(policy, num_layers, num_kv_heads)
        super().__init__(num_layers * num_kv_heads, 1, head_dim, num_blocks, block_size, kv_dtype, device,
                         virtual, num_layer_blocks=num_layer_blocks)

    def attend(self, layer: int, q, k, v, positions=None, kv_len=None, mask=None):
        H = self.model_num_kv_heads
        if k.shape[1] != H or q.shape[1] % H:
            raise RarefyError(f"HeadGroupedKVCache.attend: expected {H} KV heads and a multiple of them as query "
                              f"heads, got {k.shape[1]} and {q.shape[1]}")
        G = q.shape[1] // H
        one = super().attend  # (a comprehension has no zero-argument super())
        outs = [one(layer * H + h, q[:, h * G:(h + 1) * G].contiguous(), k[:, h:h + 1], v[:, h:h + 1])
                for h in range(H)]
        return torch.cat(outs, dim=1)


def _per_layer(policy, num_layers: int) -> list:
    """Each layer's policy, None for dense."""
    if policy is None:
        per_layer = [None] * num_layers
    elif hasattr(policy, "for_layer"):
        per_layer = [policy.for_layer(i) for i in range(num_layers)]
    else:
        per_layer = [policy] * num_layers
    return [None if p is None or getattr(p, "name", "") == "dense" else p for p in per_layer]


def layer_blocks_for(per_layer: list, length: int, block_size: int) -> int:
    """Peak layer-blocks (summed over layers) one sequence holds while decoding up to `length`
    tokens: max over n ≤ length of Σ_layer held_blocks(n)."""
    if length <= 0:
        return 0
    evicting = [p for p in per_layer if p is not None and getattr(p, "evicts", False)]
    n_dense = len(per_layer) - len(evicting)
    return max(n_dense * -(-n // block_size) + sum(p.held_blocks(n, block_size) for p in evicting)
               for n in range(1, length + 1))


__all__ = ["DEFAULT_BLOCK_SIZE", "HeadGroupedKVCache", "KVCacheFull", "LayerMeta", "PagedKVCache", "StepMeta",
           "layer_blocks_for"]
