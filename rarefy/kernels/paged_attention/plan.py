"""Launch plan of the paged decode-attention kernel (flash-decoding), computed on the host.

:func:`plan_decode` is the single source of truth for how
:func:`rarefy.kernels.paged_attention.triton_decode.paged_decode_attention_triton` launches
(it calls this function and launches exactly what it returns), and what ``rarefy roofline``
reports. It needs no GPU and no Triton.

The kernel
----------
Main kernel grid ``(batch, num_kv_heads, num_splits)``. Program ``(b, h, s)`` owns the
tokens ``[s * tokens_per_split, (s + 1) * tokens_per_split)`` of sequence ``b`` (cut at
``seq_lens[b]``; the last split also takes anything past ``num_splits * tokens_per_split``,
so a plan made for a too-small ``max_seq_len`` is slow, never wrong). It walks them
``tile_n`` tokens (``tile_n / block_size`` pages, found through the block table) per
iteration, loads each K and V tile once for all ``group = num_heads // num_kv_heads`` query
heads of the KV head (padded to ``group_pad`` rows), and keeps an fp32 online softmax.
With ``num_splits == 1`` it writes the output directly; otherwise it writes each split's
normalised partial output and log-sum-exp (fp32 workspace, ``workspace_bytes``) and they are
combined by the LSE weights either

* in the same launch (``fused_reduce=True``): the last split of each
  (sequence, KV head) to finish, found with an arrival counter (one int32 atomic per
  program, reset by that last program, so CUDA graphs can replay it), combines the
  partials of its ``group`` query heads; or
* by a second kernel with grid ``reduce_grid = (batch, num_heads)`` (``fused_reduce=False``,
  the default; ``reduce_grid`` is None otherwise). Measured on the H100 at 32k x 1, bf16:
  54.4 µs with two kernels against 66.0 µs fused (82% against 69% of the copy bandwidth).

Choosing the split count
------------------------
Decode attention is a stream over the KV cache, so the plan only has to (a) spread the
stream over every SM and (b) keep enough bytes in flight per SM. For (a) it minimises a
small cost model over ``num_splits = 1 .. max_splits``::

    programs  = batch * num_kv_heads * num_splits
    per_sm    = max(min_programs_per_sm, ceil(programs / sm_count))
    tps       = round_up(ceil(max_seq_len / num_splits), tile_n)
    cost      = per_sm * (tps + tile_n)            # tokens on the busiest SM + per-split overhead

(ties go to fewer splits). ``min_programs_per_sm = 2`` makes one program per SM look as
slow as two, so the plan prefers two resident programs per SM, which overlap each other's
softmax with loads. E.g. (132 SMs, 8 KV heads, D = 128 bf16, tile 64): 32k context at
batch 1 -> 32 splits of 1024 tokens (256 programs); 4k at batch 32 -> 1 split (256
programs, no reduction kernel); 1k at batch 1 -> 16 splits of 64 tokens.

For (b), ``tile_n`` is chosen so one K tile holds 16 KiB (64 tokens at D = 128 for bf16/fp16,
128 for int8/fp8, whose time per tile hardly depends on its bytes; 16..128 tokens; an 8-bit
cache drops to 64 when 128-token tiles leave SMs without a program), and
Triton's software pipeliner stages the K and V tiles through shared memory with cp.async.
Each iteration's K/V addresses come from a block-table load in the same iteration (an
indirect load), and Triton 3.6 gives the pipeline ``buffers = max(1, (num_stages - 1) // 2)``
K and V buffers (``num_stages`` 3 or 4: one buffer, i.e. no prefetch; 5: two, so the next
tile is in flight while one is computed; 7: three; observed in sm_90 TTGIR). The plan takes
enough buffers for ``IN_FLIGHT_BYTES`` (32 KiB) of K+V to be in flight per program while it
computes on one tile: ``buffers = 1 + ceil(32 KiB / tile bytes)`` (at most 4), ``num_stages
= 2 * buffers + 1``: 5 at D 128 (32 KiB bf16/fp16 tiles, 33 KiB int8/fp8 tiles).
Two resident programs per SM then keep 64 KiB per SM in flight, about 2.5 µs of an
H100 SM's share of DRAM bandwidth, well above the ~1 µs loaded latency. With the FMA path
the loads are not staged (register loads; latency is hidden by resident programs).

Quantized caches
----------------
``dot_dtype`` (default: the cache's for bf16/fp16, fp16 for int8/fp8, fp32 for an fp32 query
or cache), ``convert`` ("bits": packed inline-PTX conversions for int8 and e4m3, the default
on the fp16 dot path; "plain": Triton's casts) and ``qk_int8`` (int8 query, q.K^T as an int8
MMA; off by default: 9x the output error for 1.05x) only change how an 8-bit tile reaches the
tensor cores. On the H100 none of them moved the time by more than a few percent; the 8-bit
kernel is latency-bound per tile (docs/results/attention.md).

Shared memory estimate (``smem_bytes``, per program)
----------------------------------------------------
``tl.dot`` path (``use_dot``, the default for every group size: the query group is padded
to ``group_pad >= 16`` rows and both products run on tensor cores; K and V tiles are staged
through shared memory by the pipeliner)::

    smem = buffers * tile_n * (2 * head_dim * kv_bytes + 4)   # K and V tiles + the tile's block ids (int32)
         + group_pad * head_dim * 2                           # q, the first dot's A operand
         + group_pad * tile_n * 2                             # P, converted for the second dot

FMA path (``use_dot=False``: broadcast multiply-add in registers, ``group_pad =
next_pow2(group)``; nothing staged)::

    smem = max(4096, group_pad * tile_n * 4)                  # cross-warp reduction scratch

``kv_bytes`` = 4 (fp32), 2 (bf16/fp16) or 1 (int8/fp8); the float16 scales are loaded into
registers, not staged. Checked against Triton 3.6's sm_90 compilation (``metadata.shared``
of the default plans, compiled ahead of time without a GPU): 70 KiB both (bf16/fp16, D 128,
tile 64, 5 stages), 54 KiB both (int8/fp8, D 128, tile 64, 7 stages), 55 / 57 KiB (D 64 /
256); fp32-dot plans are up to 5 KiB above the estimate and the GQA-64 case 16 KiB.
``rarefy bench attention`` prints the compiled kernel's figure next to this one.
``occupancy`` estimates resident programs per SM from ``smem_per_sm`` and a 128-register per
thread budget (those compiles: 96-128 registers at 32k x 1, 128-166 at 4k x 32, no spills).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rarefy.errors import RarefyError

__all__ = ["DecodePlan", "plan_decode", "kv_storage_bytes", "MAX_SPLITS"]

#: Most splits per sequence (bounds the partial-output workspace and the reduction).
MAX_SPLITS = 256
#: Target bf16-equivalent values (tile_n * head_dim * kv_bytes / 2) of one K tile: 16 KiB.
TILE_VALUES = 8192
#: K+V bytes each program keeps in flight (sets the pipeline depth).
IN_FLIGHT_BYTES = 32 * 1024
#: Most tokens per loop iteration.
MAX_TILE_N = 128
#: Shared memory an SM can give to resident programs (H100: 228 KiB, 1 KiB reserved per block).
SMEM_PER_SM = 228 * 1024

_KV_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1}


def kv_storage_bytes(kv_dtype: str) -> int:
    """Bytes of one stored K or V value."""
    try:
        return _KV_BYTES[kv_dtype]
    except KeyError:
        raise RarefyError(f"unknown KV-cache dtype {kv_dtype!r}; choose one of {', '.join(_KV_BYTES)}") from None


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _pow2_floor(v: int) -> int:
    return 1 << (int(v).bit_length() - 1)


@dataclass(frozen=True)
class DecodePlan:
    """How the Triton decode kernel launches for one shape (see the module doc)."""

    grid: tuple[int, int, int]          # (batch, num_kv_heads, num_splits)
    num_splits: int
    tokens_per_split: int               # multiple of tile_n
    tile_n: int                         # tokens per inner iteration (pages_per_tile * block_size, or one page)
    pages_per_tile: int                 # tile_n / block_size, rounded up (a page larger than tile_n: 1)
    group: int                          # query heads per KV head
    group_pad: int                      # query rows per program (>= 16 on the base tl.dot path)
    use_dot: bool                       # tensor-core tl.dot products, else broadcast FMA
    num_warps: int
    num_stages: int
    smem_bytes: int                     # estimated shared memory per program (module doc formula)
    occupancy: int                      # estimated resident programs per SM
    fused_reduce: bool                  # splits combined by the last program of each (b, kv head)
    reduce_grid: tuple[int, int] | None  # (batch, num_heads): the separate reduction kernel, if any
    workspace_bytes: int                # fp32 partial outputs + LSEs (0 with one split)
    sm_count: int
    dot_dtype: str = "bf16"             # tensor-core operand dtype: bf16, fp16 or fp32 (module doc)
    convert: str = "plain"              # int8/fp8 -> dot dtype: "plain" (.to), "bits" (packed bit tricks),
                                        # "bias_k" / "bias" (int8, swap kernel: K / K and V as x + 1152);
                                        # "bias_u8": "bias" over offset-binary bytes (x + 128)
    qk_int8: bool = False               # q quantized per head to int8, q.K^T as an int8 MMA (int8 caches)
    max_regs: int | None = None         # ptxas register cap per thread (more resident programs per SM)
    kernel: str = "base"                # "base" (_decode_kernel) or "swap" (triton_decode_warpsplit.py)
    prefetch_pages: int = 0             # PDL launches: first pages of each split asked of L2 before the wait

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def describe(self) -> str:
        red = f", reduce {self.reduce_grid[0]}x{self.reduce_grid[1]}" if self.reduce_grid else \
            (", fused reduce" if self.fused_reduce else "")
        kind = f"dot {self.dot_dtype}" if self.use_dot else "fma"
        if self.convert != "plain":
            kind += f" {self.convert}"
        if self.qk_int8:
            kind += " qk-int8"
        if self.max_regs:
            kind += f" regs<={self.max_regs}"
        if self.prefetch_pages:
            kind += f" prefetch {self.prefetch_pages}"
        if self.kernel != "base":
            kind = f"{self.kernel} kernel, " + kind
        return (f"grid {self.grid[0]}x{self.grid[1]}x{self.grid[2]} ({self.programs} programs), "
                f"{self.tokens_per_split} tok/split, tile {self.tile_n}, {kind} g{self.group}->{self.group_pad}, "
                f"warps {self.num_warps}, stages {self.num_stages}, smem~{self.smem_bytes // 1024} KiB{red}")


def _validate(batch, max_seq_len, num_heads, num_kv_heads, head_dim, block_size, sm_count):
    for name, v in (("batch", batch), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("block_size", block_size), ("sm_count", sm_count)):
        if int(v) != v or v < 1:
            raise RarefyError(f"{name} must be a positive integer, got {v}")
    if max_seq_len < 0:
        raise RarefyError(f"max_seq_len must not be negative, got {max_seq_len}")
    if num_heads % num_kv_heads:
        raise RarefyError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise RarefyError(f"head_dim must be a power of two in 16..256, got {head_dim}")


def choose_splits(batch: int, num_kv_heads: int, max_seq_len: int, tile_n: int, sm_count: int,
                  min_programs_per_sm: int = 2, max_splits: int = MAX_SPLITS) -> tuple[int, int]:
    """(num_splits, tokens_per_split) minimising the module doc's cost model."""
    pairs = batch * num_kv_heads
    length = max(1, max_seq_len)
    best = None
    for s in range(1, min(max_splits, math.ceil(length / tile_n)) + 1):
        tps = math.ceil(math.ceil(length / s) / tile_n) * tile_n
        if s > 1 and (s - 1) * tps >= length:  # the last split would be empty: same as fewer splits
            continue
        per_sm = max(min_programs_per_sm, math.ceil(pairs * s / sm_count))
        cost = per_sm * (tps + tile_n)
        if best is None or cost < best[0]:
            best = (cost, s, tps)
    return best[1], best[2]


def plan_decode(batch: int, max_seq_len: int, num_heads: int, num_kv_heads: int, head_dim: int,
                kv_dtype: str, block_size: int, sm_count: int, *, num_splits: int | None = None,
                use_dot: bool | None = None, tile_n: int | None = None, num_stages: int | None = None,
                num_warps: int | None = None, fused_reduce: bool = False, min_programs_per_sm: int = 2,
                smem_per_sm: int = SMEM_PER_SM, q_dtype: str = "bf16", dot_dtype: str | None = None,
                convert: str | None = None, qk_int8: bool = False, max_regs: int | None = None,
                v_dim_major: bool = False, kernel: str | None = None,
                prefetch_pages: int | None = None) -> DecodePlan:
    """The launch of the Triton decode kernel for this shape (see the module doc).

    ``max_seq_len`` is the longest context in the batch (the block-table capacity when it is
    not known on the host). Keyword overrides (``num_splits``, ``use_dot``, ``tile_n``,
    ``num_stages``, ``num_warps``, ``fused_reduce``) replace the heuristic's choice; the kernel launches with
    whatever plan it is given, so benchmarks can sweep them. ``q_dtype`` ("bf16", "fp16" or
    "fp32"): a float32 query (or an fp32 cache) makes the products fp32 (IEEE) dots, which
    need 16-token tiles (and 8 warps for an fp32 query) to stay out of local memory.
    ``dot_dtype``, ``convert`` and ``qk_int8`` choose how int8/fp8 tiles reach the tensor cores
    (module doc, "Quantized caches"); the defaults are the measured best. ``v_dim_major``: V is
    stored dim-major (8-bit caches, docs/kv-cache.md), which lets ``kernel`` "swap" (the
    default then, "Swapped products" in the module doc) run; "base" forces _decode_kernel.
    ``prefetch_pages``: with PDL launches, the first pages of every split are asked of L2 before
    the wait for the kernel before (triton_splits.py, ``_prefetch_first_pages``).
    """
    _validate(batch, max_seq_len, num_heads, num_kv_heads, head_dim, block_size, sm_count)
    kv_bytes = kv_storage_bytes(kv_dtype)
    group = num_heads // num_kv_heads

    if q_dtype not in ("bf16", "fp16", "fp32"):
        raise RarefyError(f"q_dtype must be bf16, fp16 or fp32, got {q_dtype!r}")
    fp32_dot = q_dtype == "fp32" or kv_dtype == "fp32"
    if use_dot is None:
        use_dot = True  # even at group 1: the FMA path is not pipelined (see the module doc)
    if not use_dot and group > 8:
        raise RarefyError(f"the FMA path takes at most 8 query heads per KV head (registers), got {group}")
    group_pad = max(16, _next_pow2(group)) if use_dot else _next_pow2(group)
    quant = kv_dtype in ("int8", "fp8_e4m3", "fp8_e5m2")
    if dot_dtype is None:
        dot_dtype = "fp32" if fp32_dot else ("fp16" if quant else kv_dtype)
    if dot_dtype not in ("bf16", "fp16", "fp32"):
        raise RarefyError(f"dot_dtype must be bf16, fp16 or fp32, got {dot_dtype!r}")
    if kernel not in (None, "base", "swap"):
        raise RarefyError(f"kernel must be base or swap, got {kernel!r}")
    # the swap kernel wherever V is stored dim-major: 8-bit caches through fp16 products, 16-bit
    # caches in their own dtype (H100: 1.02-1.25x the base kernel on token-major V)
    swap_ok = (use_dot and not qk_int8 and group <= 8 and v_dim_major and 32 % block_size == 0
               and ((quant and dot_dtype == "fp16") or (kv_dtype in ("bf16", "fp16") and dot_dtype == kv_dtype)))
    if kernel == "swap" and not (use_dot and dot_dtype in ("bf16", "fp16") and not qk_int8):
        raise RarefyError("the swap kernel needs the tl.dot path in bf16 or fp16 and no qk_int8")
    if kernel is None:
        kernel = "swap" if swap_ok else "base"
    if kernel == "swap":  # the group sits on the MMA's column side: padded to a power of two only
        group_pad = max(2, _next_pow2(group))
    swap_auto_tile = kernel == "swap" and tile_n is None
    if kernel == "swap":
        # measured on the H100 (docs/results/attention.md, "Swapped products"): 64-token tiles
        # over 2 warps (32 tokens each), two tiles in flight; e4m3 through the hardware
        # conversion (cvt.f16x2.e4m3x2), int8 through the bit trick
        tile_n = 64 if tile_n is None else tile_n
        num_warps = 2 if num_warps is None else num_warps
        num_stages = 5 if num_stages is None else num_stages
    if convert is None:
        bit_tricks = ("int8",) if kernel == "swap" else ("int8", "fp8_e4m3")
        convert = "bits" if use_dot and dot_dtype == "fp16" and kv_dtype in bit_tricks else "plain"
        if convert == "bits" and kernel == "swap" and kv_dtype == "int8":
            # K and V enter the MMA as x + 1152, the bias taken back out of the products
            # (H100, seventh session: 32k x 1 33.1 against 33.5 µs, 128k 104.3 against 107.0;
            # docs/results/attention.md, "int8 without the subtraction")
            convert = "bias"
    if convert not in ("plain", "bits", "bias_k", "bias", "bias_u8"):
        raise RarefyError(f"convert must be plain, bits, bias_k, bias or bias_u8, got {convert!r}")
    if convert in ("bias_k", "bias", "bias_u8") and (kernel != "swap" or kv_dtype != "int8" or dot_dtype != "fp16"):
        raise RarefyError(f"convert={convert!r} needs an int8 cache on the swap kernel with fp16 products")
    if convert == "bits" and (not use_dot or dot_dtype != "fp16" or kv_dtype not in ("int8", "fp8_e4m3")):
        raise RarefyError("convert='bits' needs an int8 or fp8_e4m3 cache and the tl.dot path in fp16")
    if qk_int8 and (kv_dtype != "int8" or not use_dot):
        raise RarefyError("qk_int8 needs an int8 cache and the tl.dot path")

    auto_tile = tile_n is None
    if tile_n is None:
        # 16 KiB of K per tile: 64 bf16 tokens or 128 int8/fp8 tokens at D = 128 (an 8-bit
        # cache at 64 tokens ran 17% slower: its time per tile barely depends on the bytes)
        tile_n = max(16, min(MAX_TILE_N, _pow2_floor(TILE_VALUES * 2 // (head_dim * kv_bytes))))
        if fp32_dot and use_dot:
            tile_n = 16
        if not use_dot:  # the FMA path holds group_pad x tile_n x head_dim products in registers
            tile_n = max(16, min(tile_n, _pow2_floor(max(1, 4096 // (group_pad * head_dim)))))
    if tile_n & (tile_n - 1) or tile_n < 1:
        raise RarefyError(f"tile_n must be a power of two, got {tile_n}")
    if use_dot and tile_n < 16:
        raise RarefyError("the tl.dot path needs tile_n >= 16")
    pages_per_tile = max(1, tile_n // block_size)

    if num_splits is None:
        num_splits, tps = choose_splits(batch, num_kv_heads, max_seq_len, tile_n, sm_count, min_programs_per_sm)
        if auto_tile and kv_bytes == 1 and tile_n > 64 and batch * num_kv_heads * num_splits < sm_count:
            # a short context cannot fill the GPU with 128-token tiles: 64 gives twice the programs
            # (H100, 1k x 1: 9.4 µs against 10.2 µs)
            tile_n = 64
            pages_per_tile = max(1, tile_n // block_size)
            num_splits, tps = choose_splits(batch, num_kv_heads, max_seq_len, tile_n, sm_count, min_programs_per_sm)
        if (swap_auto_tile and tps <= tile_n and batch * num_kv_heads * num_splits < min_programs_per_sm * sm_count
                and (tile_n // 2) % (num_warps * block_size) == 0):
            # one tile per split and the GPU still not full: half tiles give twice the programs
            # (H100, 1k x 1, seventh session: 6.3-7.1 against 8.2-8.7 µs; at 32k x 1, where
            # splits hold 16 tiles, 32-token tiles lose: 39.7 against 32.3 µs for int8)
            half = choose_splits(batch, num_kv_heads, max_seq_len, tile_n // 2, sm_count, min_programs_per_sm)
            if half[0] > num_splits:
                tile_n //= 2
                pages_per_tile = max(1, tile_n // block_size)
                num_splits, tps = half
    else:
        if num_splits < 1 or int(num_splits) != num_splits:
            raise RarefyError(f"num_splits must be a positive integer, got {num_splits}")
        num_splits = int(num_splits)
        tps = max(tile_n, math.ceil(math.ceil(max(1, max_seq_len) / num_splits) / tile_n) * tile_n)

    if num_stages is None:
        if use_dot:
            tile_bytes = tile_n * (2 * head_dim * kv_bytes + (4 if kv_bytes == 1 else 0))
            num_stages = 2 * min(4, 1 + math.ceil(IN_FLIGHT_BYTES / tile_bytes)) + 1
        else:
            num_stages = 2
    if num_warps is None:
        num_warps = 8 if use_dot and (group_pad >= 64 or q_dtype == "fp32") else 4

    if use_dot:
        buffers = max(1, (num_stages - 1) // 2)
        smem = buffers * tile_n * (2 * head_dim * kv_bytes + 4) + group_pad * head_dim * 2 + group_pad * tile_n * 2
    else:
        smem = max(4096, group_pad * tile_n * 4)
    by_smem = smem_per_sm // (smem + 1024)
    if max_regs is not None and not (isinstance(max_regs, int) and 24 <= max_regs <= 255):
        raise RarefyError(f"max_regs must be an integer in 24..255, got {max_regs!r}")
    by_regs = 65536 // ((max_regs or 128) * 32 * num_warps)
    occupancy = max(1, min(by_smem, by_regs))

    if prefetch_pages is None:
        # a tile's worth of pages asked of L2 before the PDL wait (H100, seventh session: 0.5-1.3
        # µs off every decode call, most at short contexts; docs/results/attention.md, "L2 prefetch")
        prefetch_pages = max(1, min(8, pages_per_tile))
    if int(prefetch_pages) != prefetch_pages or prefetch_pages < 0 or prefetch_pages & (prefetch_pages - 1):
        raise RarefyError(f"prefetch_pages must be 0 or a power of two, got {prefetch_pages!r}")
    fused = bool(fused_reduce) and num_splits > 1
    reduce_grid = (batch, num_heads) if num_splits > 1 and not fused else None
    workspace = batch * num_heads * num_splits * (head_dim + 1) * 4 if num_splits > 1 else 0
    return DecodePlan(grid=(batch, num_kv_heads, num_splits), num_splits=num_splits, tokens_per_split=tps,
                      tile_n=tile_n, pages_per_tile=pages_per_tile, group=group, group_pad=group_pad,
                      use_dot=use_dot, num_warps=num_warps, num_stages=num_stages, smem_bytes=smem,
                      occupancy=occupancy, fused_reduce=fused, reduce_grid=reduce_grid, workspace_bytes=workspace,
                      sm_count=sm_count, dot_dtype=dot_dtype, convert=convert, qk_int8=bool(qk_int8),
                      max_regs=max_regs, kernel=kernel, prefetch_pages=prefetch_pages)
