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
from rarefy.kv.block_manager import BlockManager
from rarefy.kv.blocks import KVCacheFull

DEFAULT_BLOCK_SIZE = 16


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


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_dtype: str = "bf16",
                 device: torch.device | str = "cpu", policy=None):
        """policy: None (dense), one policy for every layer, or a config with for_layer(i)."""
        self.kv_dtype = quant.check_kv_dtype(kv_dtype)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.device = block_size, torch.device(device)
        self.blocks = BlockManager(num_blocks, block_size)
        self.allocator = self.blocks.allocator
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
        self.blocks.evict_policy = self.evict_policy

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

    def make_mask(self, positions, kv_len):
        """The model builds no mask for a paged cache: attend() knows each row's lengths."""
        return None

    def attend(self, layer: int, q, k, v, positions=None, kv_len=None, mask=None):
        """Store the step's new keys/values (quantizing on write), then attend over each row's
        cached tokens. Padded: q [B, Hq, T, D], k/v [B, Hkv, T, D]; packed: B = 1, T = N.
        Returns [B, Hq, T, D] (padding positions hold garbage)."""
        from rarefy.kernels.paged_attention import store_kv

        m = self.meta
        if m is None or q.shape[2] != m.slot_mapping.shape[1] or q.shape[0] != m.slot_mapping.shape[0]:
            raise RarefyError("PagedKVCache.attend: call begin_step with this batch's sequences first")
        B, Hq, T, D = q.shape
        flat = m.slot_mapping.reshape(-1)
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
        exact = not quant.is_quantized(self.kv_dtype) and quant.storage_dtype(self.kv_dtype) == k.dtype
        for r, n in enumerate(m.num_new):
            if n == 1:
                continue
            if exact and m.q_start_host[r] == 0:
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

        m, policy = self.meta, self.layer_policy[layer]
        table, lens = m.block_tables, m.seq_lens
        if rows is not None:
            table, lens = table[rows], lens[rows]
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
        if policy is None or policy is self.evict_policy:
            return paged_decode_attention(q, self.k_cache[layer], self.v_cache[layer], self.k_scale[layer],
                                          self.v_scale[layer], table, lens, self.kv_dtype, sm_scale,
                                          max_seq_len=m.max_len)
        from rarefy.kv.simulate import decode_attention_with_policy
        kg, vg = self.gather(layer, torch.float32, rows)
        k_pos = self.key_positions() if rows is None else self.key_positions()[rows]
        q_pos = self.decode_positions() if rows is None else self.decode_positions()[rows]
        out = decode_attention_with_policy(q.float(), kg, vg, lens, policy, sm_scale, k_pos=k_pos, q_pos=q_pos)
        return out.to(q.dtype)

    def _prefill(self, layer: int, q, rows):
        """q: [R, Hq, T, D] (or [1, Hq, T, D] for one packed row); token t of a row is stored at
        q_start + t and sees the stored keys up to it."""
        m = self.meta
        kg, vg = self.gather(layer, q.dtype, rows)
        starts, lens = (m.q_start, m.seq_lens) if rows is None else (m.q_start[rows], m.seq_lens[rows])
        T, L = q.shape[2], kg.shape[2]
        j = torch.arange(L, device=q.device)
        qi = starts[:, None] + torch.arange(T, device=q.device)[None, :]  # [R, T]
        allowed = (j[None, None, :] <= qi[:, :, None]) & (j[None, None, :] < lens[:, None, None])
        return F.scaled_dot_product_attention(q, kg, vg, attn_mask=allowed.unsqueeze(1),
                                              enable_gqa=q.shape[1] != self.num_kv_heads)

    def gather(self, layer: int, dtype, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values of the step's rows (all, or a tensor of row indices),
        dequantized: ([R, Hkv, L, D], same), L = the widest row in whole blocks; slots past
        a row's length hold garbage."""
        table = self.meta.block_tables.long()
        if rows is not None:
            table = table[rows]
        R, nb = table.shape

        def one(cache, scale):
            x = cache[table]  # [R, nb, Hkv, bs, D]
            x = quant.dequantize(x, None if scale is None else scale[table], dtype)
            return x.permute(0, 2, 1, 3, 4).reshape(R, self.num_kv_heads, nb * self.block_size, -1)

        return one(self.k_cache[layer], self.k_scale[layer]), one(self.v_cache[layer], self.v_scale[layer])

    def key_positions(self) -> torch.Tensor:
        """[B, L] logical position of each gathered key slot (matches gather())."""
        m = self.meta
        if m.key_positions is None:
            rows = []
            width = m.block_tables.shape[1]
            for i in m.seq_ids:
                s = self.blocks.seqs[i]
                lg = s.logical + [s.logical[-1] + 1 + j for j in range(width - len(s.logical))]
                rows.append(torch.tensor(lg)[:, None] * self.block_size + torch.arange(self.block_size))
            m.key_positions = torch.stack(rows).reshape(len(rows), -1).to(self.device)
        return m.key_positions

    def decode_positions(self) -> torch.Tensor:
        """[B] position of each row's last new token (the decode query)."""
        return torch.tensor([self.length(i) - 1 for i in self.meta.seq_ids], device=self.device)


__all__ = ["PagedKVCache", "KVCacheFull", "StepMeta", "DEFAULT_BLOCK_SIZE"]
