"""Look at one pruned matrix's sparsity pattern: what the compiler needs to choose a format.

``analyze_pattern(w)`` -> PatternStats (density, per-row nonzeros and imbalance, empty rows,
empty and full 32-column words, the n:m patterns it satisfies, block fill for b = 16/32/64).
``pattern_hash(w)`` -> hex digest of the shape and the nonzero mask (not the values: speed
depends on where the nonzeros are, not on what they are).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

NM_CANDIDATES = ((2, 4), (4, 8))
BLOCK_CANDIDATES = (16, 32, 64)


@dataclass
class PatternStats:
    shape: tuple[int, int]
    density: float
    row_nnz_min: int
    row_nnz_mean: float
    row_nnz_max: int
    row_imbalance: float  # max / mean nonzeros per row (1.0 = perfectly even)
    empty_rows: int
    empty_words: float  # fraction of 32-column words with no nonzero
    full_words: float  # fraction of 32-column words with no zero
    nm: list[tuple[int, int]] = field(default_factory=list)  # n:m patterns the matrix satisfies
    block_fill: dict[int, float] = field(default_factory=dict)  # b -> stored blocks / all blocks

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_fill"] = {str(k): v for k, v in self.block_fill.items()}
        return d


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def analyze_pattern(w: torch.Tensor) -> PatternStats:
    """Statistics of ``w != 0`` for a 2-D weight [N, K] (any device; reduced on it)."""
    n, k = w.shape
    nz = w != 0
    row = nz.sum(1)
    total = int(row.sum())
    mean = total / max(1, n)
    kw = _ceil(k, 32)
    words = torch.nn.functional.pad(nz, (0, kw * 32 - k)).view(n, kw, 32).sum(-1)
    # a padded tail word can never be "full"; count it as full when its real columns are
    tail = k - (kw - 1) * 32
    full = (words == 32)
    full[:, -1] = words[:, -1] == tail
    nm = []
    for nn_, mm in NM_CANDIDATES:
        kp = _ceil(k, mm) * mm
        groups = torch.nn.functional.pad(nz, (0, kp - k)).view(n, -1, mm).sum(-1)
        if int(groups.max()) <= nn_:
            nm.append((nn_, mm))
    fill = {}
    for b in BLOCK_CANDIDATES:
        nb, kb = _ceil(n, b), _ceil(k, b)
        padded = torch.nn.functional.pad(nz, (0, kb * b - k, 0, nb * b - n))
        blocks = padded.view(nb, b, kb, b).any(3).any(1)
        fill[b] = float(blocks.float().mean())
    return PatternStats(
        shape=(n, k), density=total / max(1, n * k),
        row_nnz_min=int(row.min()) if n else 0, row_nnz_mean=mean, row_nnz_max=int(row.max()) if n else 0,
        row_imbalance=(int(row.max()) / mean) if mean else 1.0, empty_rows=int((row == 0).sum()),
        empty_words=float((words == 0).float().mean()), full_words=float(full.float().mean()),
        nm=nm, block_fill=fill,
    )


def pattern_hash(w: torch.Tensor) -> str:
    """sha256 of the shape and the packed nonzero mask; identical across processes and devices."""
    mask = (w != 0).cpu().numpy()
    h = hashlib.sha256()
    h.update(f"{tuple(w.shape)}".encode())
    h.update(np.packbits(mask, axis=-1, bitorder="little").tobytes())
    return h.hexdigest()
