"""Launch configurations of the low-bit kernels and the heuristics that pick them.

Pure Python (no Triton import): the benchmark's sweep builds configs from here, the
launchers in ``triton_ternary`` / ``triton_int8`` turn them into grids.

The first defaults were chosen from sm_90 compiles (instruction counts per weight,
registers, no layout conversion in the loop; docs/lowbit-kernels.md). The rules below were
refitted to the H100 sweep of ``benchmarks/gpu_lowbit_gemv.py`` (2026-11-23, Llama-3-8B
shapes, docs/results/lowbit-gpu.md): batch 1 wants no split-K and 8-row ternary tiles where
the grid is already full, and register prefetch only when there are few tiles per SM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

#: Largest number of activation rows the Triton kernels take; larger M falls back to
#: dequantize + cuBLAS (compute bound there anyway).
MAX_M = 32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _pow2_divisor(v: int, cap: int) -> int:
    """Largest power of two <= cap that divides v."""
    d = 1
    while d * 2 <= cap and v % (d * 2) == 0:
        d *= 2
    return d


@dataclass(frozen=True)
class TernaryConfig:
    """``path``: "fma" (one x row per program) or "dot" (tensor cores, ``block_m`` rows).

    fma: ``block_n`` rows per program, ``block_u`` load units (int32 words of 16 weights, or
    bytes of 4 when K % 16 != 0) per row per step -- one unit per lane, so ``block_u`` =
    32 x ``num_warps`` keeps the tile one unit per thread per row; ``prefetch``: register
    double buffering of the next step's words.
    dot: ``block_n`` weight rows, ``block_u`` words per step (16 weights each), ``ppd``
    pair positions per dot (1: dot K = 2 x block_u; 2: 4 x block_u).
    ``split_k``: programs along K; ``pdl``: programmatic dependent launch (sm_90+: the
    weight loads of the first step overlap the previous kernel's tail); ``i8mma``: int8
    activations on int8 tensor cores (default: fp16 ones, also exact).
    """

    path: str
    block_n: int
    block_u: int
    split_k: int = 1
    block_m: int = 1
    ppd: int = 1
    num_warps: int = 4
    num_stages: int = 1
    prefetch: bool = False
    pdl: bool = False
    i8mma: bool = False

    def short(self) -> str:
        s = f"{self.path} n{self.block_n} u{self.block_u} s{self.split_k} w{self.num_warps}"
        if self.path == "dot":
            s += f" m{self.block_m} st{self.num_stages}" + (f" ppd{self.ppd}" if self.ppd != 1 else "")
            s += " i8mma" if self.i8mma else ""
        elif self.prefetch:
            s += " pf"
        return s + (" pdl" if self.pdl else "")


@dataclass(frozen=True)
class Int8Config:
    """``path``: "fma" (one x row per program; ``fold`` neighbours summed per thread) or
    "dot" (tensor cores, ``block_m`` rows). ``block_k`` elements of K per step."""

    path: str
    block_n: int
    block_k: int
    split_k: int = 1
    block_m: int = 1
    fold: int = 16
    num_warps: int = 4
    num_stages: int = 1
    prefetch: bool = False
    pdl: bool = False

    def short(self) -> str:
        s = f"{self.path} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps}"
        if self.path == "dot":
            s += f" m{self.block_m} st{self.num_stages}"
        elif self.prefetch:
            s += " pf"
        return s + (" pdl" if self.pdl else "")


def _split_for(tiles: int, steps: int, target: int, max_split: int = 16) -> int:
    """Smallest power-of-two split with tiles * split >= target, at least one step per split."""
    split = 1
    while tiles * split < target and 2 * split <= max_split and steps >= 2 * split:
        split *= 2
    return split


# ----------------------------------------------------------------------------- ternary


def ternary_word_path(k: int, group_size: int | None) -> bool:
    """Whether the packed rows can be read as int32 words (16 weights, one group)."""
    return k % 16 == 0 and (group_size is None or group_size % 16 == 0)


def ternary_dot_shape(k: int, group_size: int | None, act_int8: bool, block_u: int = 16) -> tuple[int, int] | None:
    """(block_u, ppd) for the tensor-core path, or None when the shape cannot take it:
    a step of ``16 * block_u`` weights must lie in one group and a dot needs K >= 16
    (>= 32 for int8)."""
    if k % 16:
        return None
    if group_size is None:
        bu = block_u
    else:
        if group_size % 16:
            return None
        bu = _pow2_divisor(group_size // 16, block_u)
    if 2 * bu >= 16:
        return bu, 1
    if 4 * bu >= 16:
        return bu, 2
    return None


@functools.lru_cache(maxsize=4096)
def pick_ternary_config(M: int, N: int, K: int, group_size: int | None, x_dtype: str, act_int8: bool = False,
                        num_sms: int = 132) -> TernaryConfig:
    """Default configuration for ``x [M, K] @ ternary [N, K]^T``.

    ``x_dtype``: "bf16", "fp16", "fp32" (or "int8" for pre-quantized activations).
    M = 1 with float activations -> fma (~2.6 instructions a weight on sm_90); M >= 2
    (bf16/fp16) and int8 activations -> dot (~2.2 a weight at block_n 128); fp32
    activations and shapes the dot path cannot take -> fma with one program per x row.
    """
    dot = ternary_dot_shape(K, group_size, act_int8, block_u=32)
    use_dot = dot is not None and (act_int8 or (M >= 2 and x_dtype in ("bf16", "fp16")))
    if use_dot:
        bu, ppd = dot
        block_m = 16 if M <= 16 else 32
        block_n = 128 if N >= 2048 else 64
        tiles = cdiv(N, block_n) * cdiv(M, block_m)
        steps = cdiv(K // 16, bu)
        # H100 sweep, M = 8: 32-word steps and ~2 programs per SM (4096x4096: 8.3 against 10.4 µs
        # with 16-word steps; 14336x4096: 4 splits 18.4 against 2 splits 23.0 µs)
        split = _split_for(tiles, steps, 2 * num_sms)
        if tiles * split < num_sms and bu > 16:  # short K: halve the step to split further (1024x4096)
            bu, ppd = ternary_dot_shape(K, group_size, act_int8, block_u=16)
            steps = cdiv(K // 16, bu)
            split = _split_for(tiles, steps, 2 * num_sms)
        return TernaryConfig("dot", block_n, bu, split, block_m, ppd, num_warps=4, num_stages=2)
    units = K // 16 if ternary_word_path(K, group_size) else cdiv(K, 4)
    num_warps = 4
    block_u = 32 * num_warps
    while block_u > 32 and block_u // 2 >= units:
        block_u //= 2
        num_warps = max(1, num_warps // 2)
    # H100 sweep, M = 1: 8 rows per program and no split wherever that gives at least half an
    # SM's worth of programs (4096x4096 5.8 against 7.0 µs; 1024x4096 4.0 against 4.4; 4096x14336
    # 13.0 against 14.5); 16 rows for very tall matrices (14336x4096: 12.0 against 13.0)
    block_n = 16 if N >= 8192 else 8
    steps = cdiv(units, block_u)
    tiles = cdiv(N, block_n)
    split = 1 if 2 * tiles >= num_sms else _split_for(tiles, steps, num_sms)
    prefetch = cdiv(steps, split) >= 2 and block_n == 8
    return TernaryConfig("fma", block_n, block_u, split, 1, 1, num_warps, 1, prefetch)


# ----------------------------------------------------------------------------- int8


@functools.lru_cache(maxsize=4096)
def pick_int8_config(M: int, N: int, K: int, group_size: int | None, x_dtype: str,
                     num_sms: int = 132) -> Int8Config:
    """Default configuration for ``x [M, K] @ int8 [N, K]^T``: fma for M = 1 (and fp32
    activations, and group sizes the dot path cannot step through), dot for M >= 2."""
    if M >= 2 and x_dtype in ("bf16", "fp16"):
        block_k = 128 if group_size is None else _pow2_divisor(group_size, 128)
        if block_k >= 16:
            block_m = 16 if M <= 16 else 32
            block_n = 64
            tiles = cdiv(N, block_n) * cdiv(M, block_m)
            # half a program per SM is enough (H100, M = 8, 1024x4096: 8 splits 6.6 against 16 splits 7.2 µs)
            split = _split_for(tiles, cdiv(K, block_k), (num_sms + 1) // 2)
            return Int8Config("dot", block_n, block_k, split, block_m, 1, num_warps=4, num_stages=4)
    num_warps = 4
    block_k = 16 * 32 * num_warps
    while block_k > 512 and block_k // 2 >= K:
        block_k //= 2
        num_warps = max(1, num_warps // 2)
    fold = 16 if group_size is None else _pow2_divisor(group_size, 16)
    # H100 sweeps, M = 1: no split, 4 rows per program (2 when that leaves under two programs
    # per SM), no register prefetch (4096x4096: 8.4 against 11.4 µs with it; 1024x4096: 2 rows
    # 4.1 against 4 rows + prefetch 5.4)
    block_n = 4 if cdiv(N, 4) >= 2 * num_sms else 2
    steps = cdiv(K, block_k)
    tiles = cdiv(N, block_n)
    split = _split_for(tiles, steps, num_sms)
    return Int8Config("fma", block_n, block_k, split, 1, fold, num_warps, 1, False)


def fit_int8_config(cfg: Int8Config, K: int, group_size: int | None) -> Int8Config:
    """Make a (hand-written or swept) config legal for a shape: the fold must divide the
    group size, a dot step must lie in one group."""
    from dataclasses import replace

    if cfg.path == "fma":
        fold = min(cfg.fold, cfg.block_k)
        if group_size is not None:
            fold = _pow2_divisor(group_size, fold)
        return replace(cfg, fold=fold, block_m=1)
    if group_size is not None and group_size % cfg.block_k:
        bk = _pow2_divisor(group_size, cfg.block_k)
        if bk < 16:
            raise ValueError(f"int8 dot path: group size {group_size} has no power-of-two step >= 16")
        return replace(cfg, block_k=bk)
    return cfg
