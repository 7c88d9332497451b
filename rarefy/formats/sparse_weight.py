"""In-memory formats for pruned weight matrices, laid out for sparse GEMV/GEMM kernels.

All three hold a weight ``W`` of shape ``[N, K]`` (``nn.Linear`` layout, row n = output n)
and rebuild it exactly with ``to_dense()``. "Nonzero" means ``value != 0``.

TiledBitmap (unstructured)
    bitmask       int32 [N, Kw]        Kw = ceil(K/32); bit j of word w <-> column 32w + j
    values        dtype [nnz]          the nonzeros, row-major order
    tile_offsets  int32 [N, T]         T = ceil(Kw*32 / tile_k): index in ``values`` of the
                                       first nonzero of each tile of ``tile_k`` columns
    word_offsets  int16 [N, Kw] | None (optional, K <= 32768) index of each word's first value
                                       relative to its row's first: lets a GPU kernel find any
                                       column's value without a scan (+1/16 byte per weight)
    Bytes per weight at density d: d*itemsize + 1/8 (+ 4/tile_k). bf16 at 50%: 1.125 B vs 2.
    The tile offsets let a kernel start anywhere on a tile boundary (split-K) without a
    prefix scan over the row; inside a tile the offset of column c is a popcount of the
    bits before it.

NMSparse (n:m, e.g. 2:4, 4:8)
    bitmask       int32 [N, Kw]        which columns hold a stored value
    values        dtype [N, Kg*n]      Kg = Kw*32/m groups; exactly n values per group
    A group with fewer than n nonzeros stores explicit zeros at its first free columns,
    so every group has n set bits and value offsets are implicit (no offset table):
    index of column c = (c // m) * n + popcount(bits of c's group below c).

BlockSparse (BSR, square blocks of b = 16/32/64)
    row_ptr       int32 [Nb + 1]       Nb = ceil(N/b); blocks of block-row i are
                                       row_ptr[i] .. row_ptr[i+1]-1
    col_idx       int32 [nblocks]      block column of each stored block
    blocks        dtype [nblocks, b, b] the dense blocks, row-major inside
    order         int32 [Nb]           block-rows by stored blocks, most first: the kernel's
                                       launch order (an LPT schedule; the compiler may reorder)
    A block is stored when any of its weights is nonzero.

Int8TiledBitmap (unstructured, int8 values: sparse + int8)
    bitmask, tile_offsets              as TiledBitmap, over the nonzeros of Q
    values        int8 [nnz]           Q's nonzeros, row-major order
    scale         float32 [N]          per output row: W[n] ~= scale[n] * Q[n]
    Q = clamp(round(W / s), -127, 127) with s = max|W[n]| / 127 (symmetric, per row, from the
    kept values of a pruned W; an all-zero row gets s = 1). A kept weight that rounds to 0 is
    dropped from the mask (the quantized matrix is unchanged). Bytes per weight at density d:
    d + 1/8 (+ 4/tile_k + 4/K): 0.625 B at 50% against 1.125 for bf16 values, 1 for dense int8.

Build them with ``TiledBitmap.from_dense(w)`` etc. (on CPU or CUDA; the result lives on
``w``'s device), move them with ``.to(device)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from rarefy.errors import RarefyError

WORD = 32
DEFAULT_TILE_K = 512


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _pack_words(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, Kw*32] -> int32 [N, Kw]; bit j of word w = column 32w + j (two's complement)."""
    n, k = mask.shape
    bits = mask.view(n, k // WORD, WORD).to(torch.int64)
    shifts = torch.arange(WORD, device=mask.device, dtype=torch.int64)
    words = (bits << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_words(words: torch.Tensor) -> torch.Tensor:
    """int32 [N, Kw] -> bool [N, Kw*32]."""
    shifts = torch.arange(WORD, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64)[..., None] >> shifts) & 1
    return bits.view(words.shape[0], -1).bool()


def _pad_cols(w: torch.Tensor, k: int) -> torch.Tensor:
    if w.shape[1] == k:
        return w
    return torch.nn.functional.pad(w, (0, k - w.shape[1]))


def _check_2d(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise RarefyError(f"{what} takes a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise RarefyError(f"{what} takes a floating-point weight, got {w.dtype}")


class _SparseWeight:
    """Shared helpers: device moves, byte counts, density."""

    shape: tuple[int, int]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device=None, dtype: torch.dtype | None = None):
        """Copy to `device`; `dtype` converts the stored values (metadata is untouched)."""
        changes = {}
        for name, t in self.tensors().items():
            if dtype is not None and t.dtype.is_floating_point:
                t = t.to(dtype)
            changes[name] = t.to(device) if device is not None else t
        return replace(self, **changes)

    def clone(self):
        return replace(self, **{name: t.clone() for name, t in self.tensors().items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    @property
    def nbytes(self) -> int:
        """Bytes a kernel streams: every stored tensor, metadata included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        """Stored values that are not zero (the zeros n:m and delta store as fillers do not count)."""
        return int((self.values != 0).sum())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])


@dataclass(frozen=True)
class TiledBitmap(_SparseWeight):
    shape: tuple[int, int]
    tile_k: int
    bitmask: torch.Tensor
    values: torch.Tensor
    tile_offsets: torch.Tensor
    word_offsets: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, w: torch.Tensor, tile_k: int = DEFAULT_TILE_K, word_offsets: bool = False) -> "TiledBitmap":
        _check_2d(w, "TiledBitmap")
        if tile_k <= 0 or tile_k % WORD:
            raise RarefyError(f"tile_k must be a positive multiple of {WORD}, got {tile_k}")
        n, k = w.shape
        kw = _ceil(k, WORD)
        wp = _pad_cols(w.detach().contiguous(), kw * WORD)
        mask = wp != 0
        values = wp[mask]  # row-major order
        tiles = _ceil(kw * WORD, tile_k)
        per_tile = _pad_cols(mask, tiles * tile_k).view(n, tiles, tile_k).sum(-1, dtype=torch.int64).view(-1)
        if values.numel() >= 2**31:
            raise RarefyError(f"TiledBitmap: {values.numel()} nonzeros exceed int32 offsets")
        offsets = (torch.cumsum(per_tile, 0) - per_tile).to(torch.int32).view(n, tiles)
        woff = None
        if word_offsets:
            if kw * WORD > 32768:
                raise RarefyError(f"word offsets need K <= 32768, got {k}")
            per_word = mask.view(n, kw, WORD).sum(-1, dtype=torch.int32)
            woff = (torch.cumsum(per_word, 1, dtype=torch.int32) - per_word).to(torch.int16)
        return cls((n, k), tile_k, _pack_words(mask), values.contiguous(), offsets, woff)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def mask(self) -> torch.Tensor:
        return _unpack_words(self.bitmask)[:, : self.shape[1]]

    def to_dense(self) -> torch.Tensor:
        n, k = self.shape
        mask = _unpack_words(self.bitmask)
        dense = torch.zeros(mask.shape, dtype=self.values.dtype, device=self.values.device)
        dense[mask] = self.values
        return dense[:, :k].contiguous()


@dataclass(frozen=True)
class NMSparse(_SparseWeight):
    shape: tuple[int, int]
    n: int
    m: int
    bitmask: torch.Tensor
    values: torch.Tensor

    @classmethod
    def from_dense(cls, w: torch.Tensor, n: int, m: int) -> "NMSparse":
        _check_2d(w, "NMSparse")
        if not (0 < n < m) or WORD % m:
            raise RarefyError(f"n:m needs 0 < n < m and m dividing {WORD}, got {n}:{m}")
        rows, k = w.shape
        kw = _ceil(k, WORD)
        wp = _pad_cols(w.detach().contiguous(), kw * WORD)
        groups = wp.view(rows, -1, m)
        nonzero = groups != 0
        per_group = nonzero.sum(-1)
        if int(per_group.max()) > n if per_group.numel() else False:
            bad = int((per_group > n).sum())
            raise RarefyError(f"weight is not {n}:{m} sparse: {bad} groups of {m} hold more than {n} nonzeros")
        # Keep every nonzero, then fill up to n with the first zero columns: rank each
        # column with nonzeros first (stable), take the first n, restore column order.
        order = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :n]
        chosen = torch.sort(order, dim=-1).values
        keep = torch.zeros_like(nonzero).scatter_(-1, chosen, True)
        values = torch.gather(groups, -1, chosen).reshape(rows, -1)
        return cls((rows, k), n, m, _pack_words(keep.view(rows, -1)), values.contiguous())

    def to_dense(self) -> torch.Tensor:
        rows, k = self.shape
        keep = _unpack_words(self.bitmask)
        dense = torch.zeros(keep.shape, dtype=self.values.dtype, device=self.values.device)
        dense[keep] = self.values.reshape(-1)
        return dense[:, :k].contiguous()


@dataclass(frozen=True)
class BlockSparse(_SparseWeight):
    shape: tuple[int, int]
    block: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    blocks: torch.Tensor
    order: torch.Tensor

    @classmethod
    def from_dense(cls, w: torch.Tensor, block: int) -> "BlockSparse":
        _check_2d(w, "BlockSparse")
        if block <= 0:
            raise RarefyError(f"block size must be positive, got {block}")
        rows, k = w.shape
        nb, kb = _ceil(rows, block), _ceil(k, block)
        wp = torch.nn.functional.pad(w.detach(), (0, kb * block - k, 0, nb * block - rows))
        tiles = wp.view(nb, block, kb, block).transpose(1, 2)  # [nb, kb, b, b]
        keep = (tiles != 0).flatten(2).any(-1)  # [nb, kb]
        counts = keep.sum(-1, dtype=torch.int64)
        row_ptr = torch.zeros(nb + 1, dtype=torch.int64, device=w.device)
        row_ptr[1:] = torch.cumsum(counts, 0)
        where = keep.nonzero()  # row-major: block-row, then block column
        blocks = tiles[where[:, 0], where[:, 1]].contiguous()
        order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
        return cls((rows, k), block, row_ptr.to(torch.int32), where[:, 1].to(torch.int32).contiguous(), blocks, order)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    @property
    def nnz(self) -> int:
        return int((self.blocks != 0).sum())

    @property
    def num_blocks(self) -> int:
        return self.col_idx.numel()

    def to_dense(self) -> torch.Tensor:
        rows, k = self.shape
        b = self.block
        nb, kb = _ceil(rows, b), _ceil(k, b)
        tiles = torch.zeros(nb, kb, b, b, dtype=self.blocks.dtype, device=self.blocks.device)
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        block_rows = torch.repeat_interleave(torch.arange(nb, device=counts.device), counts)
        tiles[block_rows, self.col_idx.to(torch.int64)] = self.blocks
        return tiles.transpose(1, 2).reshape(nb * b, kb * b)[:rows, :k].contiguous()


GAP_BITS = 4
MAX_GAP = (1 << GAP_BITS) - 1
ROW_ALIGN = 16  # values per row padded to a multiple of this (16-byte aligned bf16 runs)


@dataclass(frozen=True)
class DeltaSparse(_SparseWeight):
    """Values with 4-bit column gaps: a per-nonzero layout (decode cost per stored value,
    not per column).

    row_ptr  int32 [N + 1]     start of each row's entries (multiples of ROW_ALIGN)
    values   dtype [T]         entries in row order
    gaps     uint8 [T / 2]     entry e's gap in the low (even e) or high (odd e) nibble:
                               its column = previous entry's column + 1 + gap (the first
                               entry's previous column is -1)
    A run of more than 15 zero columns is bridged by explicit zero entries with gap 15; a
    row's tail is padded with zero entries of gap 0 (their columns may pass K, and are
    never read). At 50% density: 2.5 bytes per nonzero, 1.25 per weight (bf16).
    """

    shape: tuple[int, int]
    row_ptr: torch.Tensor
    values: torch.Tensor
    gaps: torch.Tensor

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "DeltaSparse":
        _check_2d(w, "DeltaSparse")
        n, k = w.shape
        dev = w.device
        nz = (w != 0).nonzero()  # row-major
        r, c = nz[:, 0], nz[:, 1]
        prev = torch.full_like(c, -1)
        same_row = torch.zeros_like(r, dtype=torch.bool)
        if c.numel() > 1:
            same_row[1:] = r[1:] == r[:-1]
            prev[1:] = torch.where(same_row[1:], c[:-1], prev[1:])
        d = c - prev - 1
        fill = d // (MAX_GAP + 1)  # zero entries needed before this nonzero
        per = fill + 1
        ent_src = torch.repeat_interleave(torch.arange(c.numel(), device=dev), per)  # entry -> nonzero
        first = torch.cumsum(per, 0) - per
        k_in = torch.arange(ent_src.numel(), device=dev) - first[ent_src]  # 0..fill
        is_real = k_in == fill[ent_src]
        ent_gap = torch.where(is_real, d[ent_src] - (MAX_GAP + 1) * fill[ent_src], torch.full_like(k_in, MAX_GAP))
        ent_val = torch.where(is_real, w[r, c][ent_src], torch.zeros((), dtype=w.dtype, device=dev))
        ent_row = r[ent_src]
        counts = torch.bincount(ent_row, minlength=n)
        padded = (counts + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN
        row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
        row_ptr[1:] = torch.cumsum(padded, 0)
        total = int(row_ptr[-1])
        if total >= 2**31:
            raise RarefyError(f"DeltaSparse: {total} entries exceed int32 offsets")
        ent_start = torch.cumsum(counts, 0) - counts
        pos = row_ptr[ent_row] + (torch.arange(ent_row.numel(), device=dev) - ent_start[ent_row])
        values = torch.zeros(total, dtype=w.dtype, device=dev)
        values[pos] = ent_val
        g = torch.zeros(total, dtype=torch.int64, device=dev)
        g[pos] = ent_gap
        gaps = (g[0::2] | (g[1::2] << GAP_BITS)).to(torch.uint8)
        return cls((n, k), row_ptr.to(torch.int32), values, gaps.contiguous())

    def columns(self) -> torch.Tensor:
        """int64 [T]: the column of every entry (padding entries may exceed K)."""
        g = torch.stack([self.gaps & MAX_GAP, self.gaps >> GAP_BITS], 1).reshape(-1).to(torch.int64)
        if g.numel() == 0:
            return g
        step = g + 1
        cum = torch.cumsum(step, 0)
        starts = self.row_ptr[:-1].to(torch.int64)
        lens = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        before = torch.where(starts > 0, cum[(starts - 1).clamp_min(0)], torch.zeros_like(starts))
        row_of = torch.repeat_interleave(torch.arange(lens.numel(), device=g.device), lens)
        return cum - before[row_of] - 1

    def to_dense(self) -> torch.Tensor:
        n, k = self.shape
        lens = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(n, device=lens.device), lens)
        cols = self.columns()
        keep = (self.values != 0) & (cols < k)
        dense = torch.zeros(n, k, dtype=self.values.dtype, device=self.values.device)
        dense[rows[keep], cols[keep]] = self.values[keep]
        return dense


INT8_QMAX = 127


@dataclass(frozen=True)
class Int8TiledBitmap(_SparseWeight):
    """TiledBitmap whose values are int8 with one fp32 scale per output row (sparse + int8)."""

    shape: tuple[int, int]
    tile_k: int
    bitmask: torch.Tensor
    values: torch.Tensor
    tile_offsets: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_dense(cls, w: torch.Tensor, tile_k: int = DEFAULT_TILE_K) -> "Int8TiledBitmap":
        """Quantize a (pruned) float weight per output row, symmetric, and keep its nonzeros."""
        _check_2d(w, "Int8TiledBitmap")
        if not bool(torch.isfinite(w).all()):
            raise RarefyError("Int8TiledBitmap: the weight holds NaN or inf; it cannot be quantized")
        wf = w.detach().float()
        amax = wf.abs().amax(1) if wf.shape[1] else torch.zeros(wf.shape[0], device=wf.device)
        scale = torch.where(amax > 0, amax / INT8_QMAX, torch.ones_like(amax))
        q = (wf / scale[:, None]).round().clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
        return cls.from_quantized(q, scale, tile_k)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, tile_k: int = DEFAULT_TILE_K) -> "Int8TiledBitmap":
        """From an int8 matrix Q [N, K] (zeros are not stored) and its scales [N] (or [N, 1])."""
        if q.dim() != 2 or q.dtype != torch.int8:
            raise RarefyError(f"Int8TiledBitmap takes an int8 [N, K] matrix, got {q.dtype} {tuple(q.shape)}")
        scale = scale.detach().reshape(-1)
        if scale.numel() != q.shape[0] or not scale.dtype.is_floating_point:
            raise RarefyError(f"Int8TiledBitmap needs one float scale per row ({q.shape[0]}), "
                              f"got {scale.dtype} {tuple(scale.shape)}")
        if bool((q == -128).any()):
            raise RarefyError("Int8TiledBitmap: -128 is outside the symmetric range [-127, 127]")
        tb = TiledBitmap.from_dense(q.float(), tile_k)  # exact: |q| <= 127
        return cls(tb.shape, tile_k, tb.bitmask, tb.values.to(torch.int8), tb.tile_offsets,
                   scale.to(torch.float32).contiguous())

    def to(self, device=None, dtype: torch.dtype | None = None):
        """Copy to `device`; values stay int8 and scales fp32 (`dtype` is accepted and ignored)."""
        return replace(self, **{name: t.to(device) if device is not None else t for name, t in self.tensors().items()})

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def dense_nbytes(self) -> int:
        """Dense int8 weight + per-row scales (what Int8Linear streams)."""
        return self.shape[0] * self.shape[1] + 4 * self.shape[0]

    def mask(self) -> torch.Tensor:
        return _unpack_words(self.bitmask)[:, : self.shape[1]]

    def quantized(self) -> torch.Tensor:
        """Q as a dense int8 [N, K]."""
        mask = _unpack_words(self.bitmask)
        q = torch.zeros(mask.shape, dtype=torch.int8, device=self.values.device)
        q[mask] = self.values
        return q[:, : self.shape[1]].contiguous()

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale[:, None] * Q in fp32, cast to `dtype` (the reference the kernels compute)."""
        return (self.quantized().float() * self.scale.float()[:, None]).to(dtype)


SparseWeight = TiledBitmap | NMSparse | BlockSparse | DeltaSparse | Int8TiledBitmap
