"""Cosine similarity of the same component across layers, in bounded memory.

A *series* is one parameter name with its layer index replaced by `*`
(`model.layers.*.self_attn.q_proj.weight`). For every series present in at least two layers,
the cosine similarity of all layer pairs is computed:

- exactly, from copies of the matrices (in their stored 16-bit dtype, else float32), when the
  series' copies fit what is left of a memory budget (decided in tensor order, at the series'
  first tensor, so the result does not depend on thread timing);
- otherwise from a sketch: a fixed random linear map S (the same for every layer of the series)
  with E[<Sx, Sy>] = <x, y>. cos ~ <Sx,Sy> / (|Sx| |Sy|), whose error has standard deviation
  about (1 - cos^2) / sqrt(k) for k sketch coordinates (k = 65536 by default: +-0.0004 at
  cos = 0.95, +-0.004 at cos = 0).

The sketch is a count sketch with a separable hash: row i goes to row bucket i mod kr with a
random sign, column j to a random column bucket with a random sign (kr = 16, kc = 4096). Rows
are folded as they stream in (one multiply-add per weight into a [kr, cols] accumulator); the
column hash is applied once per matrix on that small accumulator.
"""

from __future__ import annotations

import math

import torch

SKETCH_ROWS = 16
SKETCH_COLS = 4096


class Sketcher:
    """The sketch map of one matrix shape [rows, cols]: deterministic given (seed, shape)."""

    def __init__(self, rows: int, cols: int, seed: int = 0, k_rows: int = SKETCH_ROWS,
                 k_cols: int = SKETCH_COLS):
        self.rows, self.cols = rows, cols
        self.kr, self.kc = min(rows, k_rows), min(cols, k_cols)
        g = torch.Generator().manual_seed(seed * 1_000_003 + rows * 7919 + cols)
        self.row_sign = torch.randint(0, 2, (rows,), generator=g).float().mul_(2).sub_(1)
        slabs = -(-rows // self.kr)
        self.slab_shift = (torch.randint(0, cols, (slabs,), generator=g) if slabs > 1
                           else torch.zeros(1, dtype=torch.int64))
        if cols > k_cols:
            self.col_bucket = torch.randint(0, self.kc, (cols,), generator=g)
            self.col_sign = torch.randint(0, 2, (cols,), generator=g).float().mul_(2).sub_(1)
        else:  # no column folding: the identity in that dimension
            self.col_bucket = self.col_sign = None

    @property
    def dim(self) -> int:
        return self.kr * self.kc

    @property
    def lossless(self) -> bool:
        return self.rows <= self.kr and self.cols <= self.kc

    def new_accumulator(self) -> torch.Tensor:
        return torch.zeros(self.kr, self.cols)

    def add_rows(self, acc: torch.Tensor, row0: int, x: torch.Tensor) -> None:
        """Fold rows row0..row0+R of x (float32 [R, cols], modified in place) into acc."""
        x.mul_(self.row_sign[row0:row0 + x.shape[0], None])
        j = 0
        while j < x.shape[0]:
            b = (row0 + j) % self.kr
            m = min(self.kr - b, x.shape[0] - j)
            # Each slab of kr rows is rolled by its own random column shift, so the rows of one
            # heavy column do not all meet in the same bucket.
            sh = int(self.slab_shift[(row0 + j) // self.kr])
            src, dst = x[j:j + m], acc[b:b + m]
            if sh == 0:
                dst += src
            else:
                dst[:, sh:] += src[:, :self.cols - sh]
                dst[:, :sh] += src[:, self.cols - sh:]
            j += m

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """[kr, cols] accumulator -> the sketch, float64 [kr * kc]."""
        if self.col_bucket is None:
            return acc.reshape(-1).double()
        z = torch.zeros(self.kr, self.kc)
        z.index_add_(1, self.col_bucket, acc * self.col_sign)
        return z.reshape(-1).double()

    def sketch(self, w: torch.Tensor) -> torch.Tensor:
        """Sketch of a whole matrix [rows, cols] (tests and small tensors)."""
        acc = self.new_accumulator()
        self.add_rows(acc, 0, w.reshape(self.rows, self.cols).float().clone())
        return self.finish(acc)


class Slot:
    """Where one layer's matrix goes: a row of the series' exact store, or a sketch accumulator.

    Callers stream row chunks with `add_rows(row0, x)`: x [R, cols] in the series dtype (exact
    mode) or float32 (sketch mode, see `wants_float`; x may be modified), then call `finish()`.
    """

    def __init__(self, series: "_Series", layer: int):
        self.series, self.layer = series, layer
        self.wants_float = series.sketcher is not None
        if self.wants_float:
            self.acc = series.sketcher.new_accumulator()
        else:
            self.index = len(series.layers)
            self.copy = series.store[self.index]
        series.layers.append(layer)

    def add_rows(self, row0: int, x: torch.Tensor) -> None:
        """x: [R, cols], rows row0..row0+R of this layer's matrix."""
        if self.wants_float:
            self.series.sketcher.add_rows(self.acc, row0, x)
        else:
            self.copy[row0:row0 + x.shape[0]] = x

    def finish(self) -> None:
        if self.wants_float:
            self.series.sketches[self.layer] = self.series.sketcher.finish(self.acc)
            del self.acc


class _Series:
    """One series: exact copies in `store` [count, rows, cols] (row i = i-th layer to arrive),
    or per-layer sketches."""

    def __init__(self, name: str, count: int, rows: int, cols: int, dtype: torch.dtype, sketcher):
        self.name, self.rows, self.cols, self.dtype, self.sketcher = name, rows, cols, dtype, sketcher
        self.layers: list[int] = []
        self.sketches: dict[int, torch.Tensor] = {}
        self.store = torch.empty(count, rows, cols, dtype=dtype) if sketcher is None else None

    def vectors(self) -> tuple[list[int], torch.Tensor]:
        """(layers in arrival order, [L, k] matrix whose rows are their vectors)."""
        if self.sketcher is not None:
            return self.layers, torch.stack([self.sketches[l] for l in self.layers])
        return self.layers, self.store[: len(self.layers)].view(len(self.layers), -1)


class SimilarityTracker:
    """Plans and collects per-layer vectors; `results()` gives cosines and spans.

    series_counts: tensors per series (from the names, known before streaming);
    budget_bytes: memory for exact copies across all series.
    """

    def __init__(self, series_counts: dict[str, int], budget_bytes: int, seed: int = 0,
                 sketch_rows: int = SKETCH_ROWS, sketch_cols: int = SKETCH_COLS):
        self.counts, self.budget, self.seed = series_counts, budget_bytes, seed
        self.sketch_rows, self.sketch_cols = sketch_rows, sketch_cols
        self.committed = 0
        self.series: dict[str, _Series] = {}
        self.skipped: list[str] = []

    def slot(self, series: str, layer: int, shape: tuple[int, ...], dtype: torch.dtype) -> Slot | None:
        """Called in tensor order (one thread). dtype: the dtype chunks will arrive in."""
        if self.counts.get(series, 0) < 2:
            return None
        rows = shape[0] if len(shape) >= 2 else 1
        cols = math.prod(shape) // max(rows, 1)
        s = self.series.get(series)
        if s is None:
            need = self.counts[series] * rows * cols * dtype.itemsize
            sketcher = None
            if len(shape) >= 2 and self.committed + need > self.budget:
                sketcher = Sketcher(rows, cols, self.seed, self.sketch_rows, self.sketch_cols)
            else:
                self.committed += need
            s = self.series[series] = _Series(series, self.counts[series], rows, cols, dtype, sketcher)
        if (rows, cols) != (s.rows, s.cols) or (s.sketcher is None and dtype != s.dtype):
            self.skipped.append(f"{series} layer {layer}: shape {tuple(shape)} differs")
            return None
        return Slot(s, layer)

    def results(self, threshold: float) -> list[dict]:
        out = []
        for name, s in self.series.items():
            if len(s.layers) < 2:
                continue
            layers, vecs = s.vectors()
            order = sorted(range(len(layers)), key=layers.__getitem__)
            gram = _gram(vecs)[order][:, order]
            layers = [layers[i] for i in order]
            norms = gram.diagonal().sqrt()
            cos = gram / (norms[:, None] * norms[None, :])
            entry = {"series": name, "layers": layers,
                     "mode": "exact" if s.sketcher is None or s.sketcher.lossless else "sketch",
                     "cosine": [[_num(v) for v in row] for row in cos.tolist()]}
            if entry["mode"] == "sketch":
                entry["sketch_dim"] = s.sketcher.dim
                entry["expected_error_at_threshold"] = (1 - threshold ** 2) / math.sqrt(s.sketcher.dim)
            entry["adjacent"] = [_num(float(cos[i, i + 1])) for i in range(len(layers) - 1)]
            entry["spans"] = find_spans(cos, layers, threshold)
            out.append(entry)
        return out


def _gram(vecs: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """G = V V^T in float64 for V [L, n] (rows contiguous); 16-bit rows widened on the fly."""
    if vecs.dtype == torch.float64:
        return vecs @ vecs.T
    from rarefy.sparsity.block_density import _FP16_LUT, native
    lib, L = native(), vecs.shape[0]
    g = torch.zeros(L, L, dtype=torch.float64)
    if lib is not None and vecs.stride(1) == 1:
        kind = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[vecs.dtype]
        buf = torch.empty(L, 1024)  # held here: a temporary's pointer would dangle
        lib.gram(vecs.data_ptr(), L, vecs.shape[1], vecs.stride(0), kind, _FP16_LUT.data_ptr(),
                 g.data_ptr(), buf.data_ptr())
        return g
    for c0 in range(0, vecs.shape[1], chunk):
        a = vecs[:, c0:c0 + chunk].float()
        g += (a @ a.T).double()
    return g


def _num(v: float) -> float | None:
    return None if v != v else round(v, 6)


def find_spans(cos: torch.Tensor, layers: list[int], threshold: float) -> list[dict]:
    """Maximal runs of consecutive series entries whose every adjacent pair has cos >= threshold.

    cos: [L, L] cosines of the series entries `layers` (ascending). Each span reports its first
    and last layer, its length, and the smallest adjacent and all-pairs cosine inside it.
    """
    spans, i, n = [], 0, len(layers)
    while i < n - 1:
        j = i
        while j < n - 1 and bool(cos[j, j + 1] >= threshold):
            j += 1
        if j > i:
            sub = cos[i:j + 1, i:j + 1]
            spans.append({"start": layers[i], "end": layers[j], "layers": j - i + 1,
                          "min_adjacent": round(float(torch.diagonal(sub, 1).min()), 6),
                          "min_pairwise": round(float(sub.min()), 6)})
        i = j + 1
    return spans
