"""Sparsity patterns and keep-masks from score matrices.

Every function takes a score matrix [out, in] (any float dtype; higher = more
important, keep) and returns a bool keep-mask of the same shape (True = keep).
Counts are exact: the k lowest scores are selected by index (torch.topk), never
by a threshold that could keep or drop a whole run of equal scores.

Patterns (`Pattern`):
- unstructured, sparsity s: exactly round(s * numel) zeros per matrix, or with
  `per_row=True` exactly round(s * in) zeros in every output row (Wanda's
  comparison group).
- N:M: exactly N kept (nonzero) weights in every group of M consecutive input
  weights of a row ("2:4" = 2 nonzeros of every 4, 50% sparse; "4:8" likewise).
  0 < N < M is required: N == M would prune nothing and is refused as a likely
  mistake. `in` must be a multiple of M.
- block RxC, sparsity s: the matrix is tiled into R x C blocks (R rows, C input
  columns); exactly round(s * num_blocks) whole blocks are zeroed, those with the
  lowest summed score. A block shape that does not divide the matrix is refused
  (no padding: a padded edge block would be a different size from the others,
  and sparse kernels expect a full tiling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rarefy.errors import RarefyError


@dataclass(frozen=True)
class Pattern:
    """What shape of sparsity to produce. kind: "unstructured" | "nm" | "block"."""

    kind: str = "unstructured"
    n: int = 0  # N:M: kept weights per group
    m: int = 0  # N:M: group size
    r: int = 0  # block rows
    c: int = 0  # block columns (input dimension)

    @property
    def nm_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def describe(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block {self.r}x{self.c}"
        return "unstructured"

    def check_shape(self, name: str, shape: tuple[int, int]) -> None:
        """Raise RarefyError if matrix `name` of `shape` [out, in] cannot take this pattern."""
        out_f, in_f = shape
        if self.kind == "nm" and in_f % self.m:
            raise RarefyError(f"{name} has {in_f} input columns, not a multiple of M={self.m} "
                              f"for the {self.n}:{self.m} pattern")
        if self.kind == "block" and (out_f % self.r or in_f % self.c):
            raise RarefyError(f"block {self.r}x{self.c} does not divide {name} of shape "
                              f"{out_f}x{in_f} (blocks are not padded; pick a block shape "
                              f"that divides every pruned matrix, or --skip this one)")


def parse_pattern(value) -> Pattern | None:
    """N:M from "2:4", (2, 4) or None. Requires 0 < N < M."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            n_s, m_s = value.strip().split(":")
            n, m = int(n_s), int(m_s)
        else:
            n, m = (int(v) for v in value)
    except (ValueError, TypeError):
        raise RarefyError(f"bad N:M pattern {value!r} (expected e.g. 2:4)") from None
    if m < 1 or n < 1:
        raise RarefyError(f"bad N:M pattern {n}:{m}: N and M must be positive")
    if n > m:
        raise RarefyError(f"bad N:M pattern {n}:{m}: N (weights kept) cannot exceed M (group size)")
    if n == m:
        raise RarefyError(f"N:M pattern {n}:{m} keeps every weight (prunes nothing); use N < M")
    return Pattern("nm", n=n, m=m)


def parse_block(value) -> Pattern | None:
    """Block RxC from "4x4", (4, 4) or None. Both sides must be positive."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            r_s, c_s = value.lower().strip().split("x")
            r, c = int(r_s), int(c_s)
        else:
            r, c = (int(v) for v in value)
    except (ValueError, TypeError):
        raise RarefyError(f"bad block shape {value!r} (expected RxC, e.g. 4x4)") from None
    if r < 1 or c < 1:
        raise RarefyError(f"bad block shape {r}x{c}: both sides must be positive")
    return Pattern("block", r=r, c=c)


def check_sparsity(s, what: str = "sparsity") -> float:
    """A float in [0, 1) or RarefyError (1.0 would zero the whole matrix)."""
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise RarefyError(f"{what} must be a number in [0, 1), got {s!r}") from None
    if not 0.0 <= s < 1.0:  # also rejects NaN
        raise RarefyError(f"{what} must be in [0, 1), got {s}")
    return s


def lowest_k(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Bool mask shaped like `scores`: True at the k lowest entries along `dim`."""
    drop = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:  # topk (a selection, not a sort): ~9x faster than argsort at k = numel/2
        idx = torch.topk(scores, k, dim=dim, largest=False, sorted=False).indices
        drop.scatter_(dim, idx, True)
    return drop


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """score [out, in] -> keep [out, in] bool with round(s*numel) zeros (per_row: round(s*in) per row)."""
    if per_row:
        return ~lowest_k(score, round(sparsity * score.shape[1]))
    k = round(sparsity * score.numel())
    return ~lowest_k(score.reshape(1, -1), k).view(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score [out, in] -> keep [out, in] bool with exactly n kept in each m consecutive columns."""
    out_f, in_f = score.shape
    groups = score.reshape(out_f, in_f // m, m)
    return ~lowest_k(groups, m - n).view(out_f, in_f)


def block_scores(score: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """score [out, in] -> [out/r, in/c]: the sum of the scores inside each r x c block."""
    out_f, in_f = score.shape
    return score.reshape(out_f // r, r, in_f // c, c).sum(dim=(1, 3))


def expand_blocks(block_keep: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """[out/r, in/c] -> [out, in]: each block's value repeated over its r x c elements."""
    return block_keep.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)


def block_mask(score: torch.Tensor, sparsity: float, r: int, c: int) -> torch.Tensor:
    """score [out, in] -> keep [out, in] with round(s * num_blocks) whole r x c blocks dropped."""
    bs = block_scores(score.float(), r, c)
    return expand_blocks(unstructured_mask(bs, sparsity), r, c)


def keep_mask(score: torch.Tensor, sparsity: float, pattern: Pattern,
              per_row: bool = False) -> torch.Tensor:
    """Dispatch on `pattern`; `sparsity` is ignored for N:M (it is 1 - N/M)."""
    if pattern.kind == "nm":
        return nm_mask(score, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(score, sparsity, pattern.r, pattern.c)
    return unstructured_mask(score, sparsity, per_row)


def budget(sparsity: float, units_before: int, units_after: int) -> int:
    """Zeros due among units [units_before, units_after) so every prefix is round(s * prefix).

    Used to spread an exact per-matrix count over column blocks (SparseGPT): the
    budgets of consecutive ranges always sum to round(s * total).
    """
    return round(sparsity * units_after) - round(sparsity * units_before)
