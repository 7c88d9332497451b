"""Block structure of magnitude-pruned matrices, and the one-pass chunk scan that feeds it.

For a matrix W [rows, cols] pruned to sparsity s by magnitude (every |w| <= tau_s is zeroed,
tau_s = the k-th smallest |w|, k = ceil(s * n)), two figures per block size b (b x b blocks,
the matrix padded with zeros to multiples of b):

- zero-block share: the fraction of blocks (edge blocks included) whose weights are all pruned,
  i.e. whose max |w| <= tau_s;
- reachable block sparsity: rank blocks by their L1 norm (sum |w|, ascending) and remove whole
  blocks while the removed L1 mass stays <= the mass unstructured pruning removes at s
  (sum of |w| <= tau_s); the share of the matrix's real (non-padding) weights removed.

Both come from a per-4x4-block grid of max |w| and L1 sums; larger sizes (multiples of 4) are
reductions of it. For bf16/fp16 tensors `scan_chunk16` fills, in one pass over a row chunk,
the |w| histogram, that grid and a similarity sketch. torch ops cost ~6 ns per weight for all
of it on one core of the dev machine, so a small C kernel (compiled on first use with the
system C compiler, loaded with ctypes: ~0.8 ns per weight) does it when available; the torch
code is the fallback and the reference it is tested against. RAREFY_NATIVE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import threading

import torch

BASE = 4  # finest block edge: every block size must be a multiple of it
BINS = 1 << 15  # |w| histogram bins: one per 15-bit pattern of a 16-bit float
_FP16_LUT = torch.arange(BINS, dtype=torch.int16).view(torch.float16).float()  # |w| per fp16 pattern

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
static inline float f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline float absval(uint16_t k, const float *lut) { return lut ? lut[k] : f32((uint32_t)k << 16); }

/* One row chunk of a bf16 (lut == 0) or fp16 (lut: |value| of each 15-bit pattern) matrix:
   hist[|w| pattern]++, 4x4 block max pattern / L1 sum (grid rows start at this chunk),
   and the sketch fold acc[(row0+i) % kr][(j + shift) % cols] += sign * w. */
void scan16(const uint16_t *x, int64_t rows, int64_t cols, const float *lut, int64_t *hist,
            uint16_t *gmax, float *gl1, int64_t gcols, float *acc, int64_t kr,
            const float *sign, const int64_t *shift, int64_t row0) {
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xr = x + i * cols;
        for (int64_t j = 0; j < cols; j++) hist[xr[j] & 0x7fff]++;
        if (gmax) {
            uint16_t *gm = gmax + (i >> 2) * gcols;
            float *gs = gl1 + (i >> 2) * gcols;
            int64_t full = cols >> 2;
            for (int64_t g = 0; g < full; g++) {
                const uint16_t *p = xr + 4 * g;
                uint16_t k0 = p[0] & 0x7fff, k1 = p[1] & 0x7fff, k2 = p[2] & 0x7fff, k3 = p[3] & 0x7fff;
                uint16_t a = k0 > k1 ? k0 : k1, b = k2 > k3 ? k2 : k3, m = a > b ? a : b;
                if (m > gm[g]) gm[g] = m;
                gs[g] += (absval(k0, lut) + absval(k1, lut)) + (absval(k2, lut) + absval(k3, lut));
            }
            for (int64_t j = 4 * full; j < cols; j++) {
                uint16_t k = xr[j] & 0x7fff;
                if (k > gm[full]) gm[full] = k;
                gs[full] += absval(k, lut);
            }
        }
        if (acc) {  /* two straight runs (no wrap test inside), so the compiler vectorizes */
            int64_t r = row0 + i, sh = shift[r / kr];
            float *ar = acc + (r % kr) * cols, s = sign[r];
            if (lut) {
                for (int64_t j = 0; j < cols; j++) {
                    uint16_t b = xr[j];
                    float v = (b & 0x8000) ? -lut[b & 0x7fff] : lut[b & 0x7fff];
                    ar[j + sh < cols ? j + sh : j + sh - cols] += s * v;
                }
            } else {
                float *a1 = ar + sh;  /* columns j < cols - sh land at j + sh */
                for (int64_t j = 0; j < cols - sh; j++) a1[j] += s * f32((uint32_t)xr[j] << 16);
                const uint16_t *x2 = xr + cols - sh;  /* the rest wrap around to 0.. */
                for (int64_t j = 0; j < sh; j++) ar[j] += s * f32((uint32_t)x2[j] << 16);
            }
        }
    }
}

/* Bin non-negative floats by their top 16 bits (sign dropped): counts and float64 sums. */
void mass_hist(const float *v, int64_t n, int64_t *count, double *mass) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u; memcpy(&u, v + i, 4);
        uint32_t k = (u >> 16) & 0x7fff;
        count[k]++;
        mass[k] += v[i];
    }
}

/* G[i*L+j] += <row i, row j> for L rows of n values, rows `stride` elements apart: bf16
   (kind 0), fp16 (kind 1, lut = |value| per 15-bit pattern) or float32 (kind 2). Float partial
   sums over 1024-element blocks (16 lanes, so the compiler vectorizes), then double. */
void gram(const void *v, int64_t L, int64_t n, int64_t stride, int64_t kind, const float *lut,
          double *g, float *buf) {
    for (int64_t c0 = 0; c0 < n; c0 += 1024) {
        int64_t m = n - c0 < 1024 ? n - c0 : 1024;
        for (int64_t i = 0; i < L; i++) {
            float *d = buf + i * 1024;
            if (kind == 2) { memcpy(d, (const float *)v + i * stride + c0, m * 4); }
            else {
                const uint16_t *s = (const uint16_t *)v + i * stride + c0;
                for (int64_t k = 0; k < m; k++) {
                    uint16_t b = s[k];
                    d[k] = kind == 0 ? f32((uint32_t)b << 16)
                                     : ((b & 0x8000) ? -lut[b & 0x7fff] : lut[b & 0x7fff]);
                }
            }
            for (int64_t k = m; k < 1024; k++) d[k] = 0.0f;
        }
        for (int64_t i = 0; i < L; i++)
            for (int64_t j = i; j < L; j++) {
                const float *a = buf + i * 1024, *b = buf + j * 1024;
                float acc[16] = {0};
                for (int64_t k = 0; k < 1024; k += 16)
                    for (int t = 0; t < 16; t++) acc[t] += a[k + t] * b[k + t];
                double s = 0;
                for (int t = 0; t < 16; t++) s += acc[t];
                g[i * L + j] += s;
            }
    }
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < i; j++) g[i * L + j] = g[j * L + i];
}

/* Values and indices of the entries whose bin is flagged in want[32768]; returns how many. */
int64_t collect_bins(const float *v, int64_t n, const uint8_t *want, float *vals, int64_t *idx) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u; memcpy(&u, v + i, 4);
        if (want[(u >> 16) & 0x7fff]) { vals[m] = v[i]; idx[m] = i; m++; }
    }
    return m;
}
"""

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "error": None}


def native():
    """The compiled kernel (ctypes library), or None when it cannot be built or is disabled."""
    if os.environ.get("RAREFY_NATIVE", "1") == "0":
        return None
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _state["lib"] = _build()
            except (OSError, subprocess.SubprocessError) as e:
                _state["error"] = str(e)
        return _state["lib"]


def _build():
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    # The cache key covers source, flags and machine: -march=native code is CPU-specific.
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l for l in f if l.startswith("flags")), "")
    tag = hashlib.sha256("\0".join([_C_SOURCE, *flags, platform.machine(), cpu]).encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rarefy")
    lib_path = os.path.join(cache, f"analyze_scan_{tag}.so")
    if not os.path.exists(lib_path):
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = os.path.join(tmp, "scan.c"), os.path.join(tmp, "scan.so")
            with open(src, "w") as f:
                f.write(_C_SOURCE)
            subprocess.run([os.environ.get("CC", "cc"), *flags, "-o", out, src], check=True,
                           capture_output=True, timeout=120)
            os.replace(out, lib_path)  # atomic: concurrent builders do not see half a file
    lib = ctypes.CDLL(lib_path)
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.scan16.argtypes, lib.scan16.restype = [P, I, I, P, P, P, P, I, P, I, P, P, I], None
    lib.mass_hist.argtypes, lib.mass_hist.restype = [P, I, P, P], None
    lib.collect_bins.argtypes, lib.collect_bins.restype = [P, I, P, P, P], I
    lib.gram.argtypes, lib.gram.restype = [P, I, I, I, I, P, P, P], None
    return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def scan_chunk16(x: torch.Tensor, row0: int, hist: torch.Tensor, grid: "BlockGrid | None",
                 sketcher=None, acc: torch.Tensor | None = None, lut: torch.Tensor | None = None) -> None:
    """Add rows row0..row0+R of a 16-bit matrix to its statistics, in one pass.

    x: [R, cols] bf16 or fp16, contiguous (row0 a multiple of 16 unless it is the last chunk).
    hist: int64 [32768] counts of |w| bit patterns. grid: the matrix's BlockGrid (int16 keys)
    or None. sketcher/acc: a similarity.Sketcher and its [kr, cols] float32 accumulator, or
    None. lut: float32 [32768] |value| per fp16 pattern (None for bf16).
    """
    lib = native()
    if lib is not None:
        assert x.is_contiguous() and x.dtype in (torch.bfloat16, torch.float16)
        rows, cols = x.shape
        g0 = row0 // BASE
        lib.scan16(_ptr(x), rows, cols, _ptr(lut), _ptr(hist),
                   _ptr(grid.max_key[g0:]) if grid else None, _ptr(grid.l1[g0:]) if grid else None,
                   grid.grid_cols if grid else 0, _ptr(acc), sketcher.kr if acc is not None else 1,
                   _ptr(sketcher.row_sign) if acc is not None else None,
                   _ptr(sketcher.slab_shift) if acc is not None else None, row0)
        return
    step = max(4, (1 << 16) // max(x.shape[1], 1) // 4 * 4)  # small pieces: small temporaries
    for r in range(0, x.shape[0], step):
        xs = x[r:r + step]
        key = xs.view(torch.int16) & 0x7FFF
        hist += torch.bincount(key.view(-1), minlength=BINS)
        if grid is not None:
            grid.add_chunk(row0 + r, key, key.view(x.dtype).float())
        if acc is not None:
            sketcher.add_rows(acc, row0 + r, xs.float())


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape[0] == rows and t.shape[1] == cols:
        return t
    out = torch.zeros(rows, cols, dtype=t.dtype)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _reduce_blocks(t: torch.Tensor, m: int, op: str) -> torch.Tensor:
    """[R, C] -> [ceil(R/m), ceil(C/m)]: max or sum over m x m tiles (zero padding)."""
    r, c = -(-t.shape[0] // m) * m, -(-t.shape[1] // m) * m
    v = _pad_to(t, r, c).view(r // m, m, c // m, m)
    # Rows first (a reduction over a middle dim vectorizes along the columns), then columns.
    return v.amax(1).amax(-1) if op == "max" else v.sum(1).sum(-1)


class BlockGrid:
    """Per-4x4-block max |w| key and L1 sum of one matrix, filled one row chunk at a time.

    rows, cols: the matrix shape. key_dtype: int16 (|w| bit patterns of bf16/fp16 weights, which
    order like the values) or float32 (|w| itself). Grids are [ceil(rows/4), ceil(cols/4)]:
    `max_key` (key_dtype) and `l1` (float32), zero where only padding.
    """

    def __init__(self, rows: int, cols: int, key_dtype: torch.dtype):
        self.rows, self.cols = rows, cols
        self.grid_rows, self.grid_cols = -(-rows // BASE), -(-cols // BASE)
        self.max_key = torch.zeros(self.grid_rows, self.grid_cols, dtype=key_dtype)
        self.l1 = torch.zeros(self.grid_rows, self.grid_cols, dtype=torch.float32)

    def add_chunk(self, row0: int, key: torch.Tensor, absw: torch.Tensor) -> None:
        """key, absw: [R, cols] for rows row0..row0+R (row0 a multiple of 4); torch path."""
        r, c = -(-key.shape[0] // BASE) * BASE, self.grid_cols * BASE
        key, absw = _pad_to(key, r, c), _pad_to(absw, r, c)
        kv, av = key.view(r // BASE, BASE, c), absw.view(r // BASE, BASE, c)
        # 4 rows -> 1 by element-wise max/add of strided slices (cheaper than a generic reduction).
        km = torch.maximum(torch.maximum(kv[:, 0], kv[:, 1]), torch.maximum(kv[:, 2], kv[:, 3]))
        asum = (av[:, 0] + av[:, 1]) + (av[:, 2] + av[:, 3])
        km, asum = km.view(-1, c // BASE, BASE), asum.view(-1, c // BASE, BASE)
        g0, g1 = row0 // BASE, row0 // BASE + r // BASE
        torch.maximum(torch.maximum(km[..., 0], km[..., 1]), torch.maximum(km[..., 2], km[..., 3]),
                      out=self.max_key[g0:g1])
        torch.add(asum[..., 0] + asum[..., 1], asum[..., 2] + asum[..., 3], out=self.l1[g0:g1])

    def finalize(self, sizes: list[int], taus: list, removed_mass: list[float]) -> list[dict]:
        """Figures per sparsity (one tau / removed mass each) and block size.

        taus: the pruning threshold per sparsity in the key's units (bit pattern or float);
        removed_mass: sum of |w| <= tau per sparsity. Returns per sparsity
        {b: {"zero_blocks", "blocks", "block_pruned_weights"}} (integer counts).
        """
        out = [dict() for _ in taus]
        grids = {BASE: (self.max_key, self.l1)}
        for b in sorted(sizes):
            src = max(s for s in grids if b % s == 0)  # reuse the largest finished divisor
            if b != src:
                grids[b] = (_reduce_blocks(grids[src][0], b // src, "max"),
                            _reduce_blocks(grids[src][1], b // src, "sum"))
            mx, l1 = grids[b]
            pruned = _MassOrder(l1, self.rows, self.cols, b).weights_within(removed_mass)
            for i, tau in enumerate(taus):
                out[i][b] = {"zero_blocks": int(torch.count_nonzero(mx <= tau)), "blocks": mx.numel(),
                             "block_pruned_weights": pruned[i]}
        return out


class _MassOrder:
    """Blocks ranked by L1 sum: how many real weights the lowest blocks hold within a mass.

    Sorting millions of 4x4 block sums would cost more than the whole scan, so blocks are
    binned by the top 16 bits of their float32 sum (monotone in the value); only the bin where
    the budget runs out is sorted. Edge blocks (padding) are corrected for their missing weights.
    """

    def __init__(self, l1: torch.Tensor, rows: int, cols: int, b: int):
        self.l1, self.full = l1.contiguous().view(-1), b * b
        lib = native()
        if lib is not None:
            self.count = torch.zeros(BINS, dtype=torch.int64)
            mass = torch.zeros(BINS, dtype=torch.float64)
            lib.mass_hist(_ptr(self.l1), self.l1.numel(), _ptr(self.count), _ptr(mass))
        else:
            key = (self.l1.view(torch.int32) >> 16) & 0x7FFF
            self.count = torch.bincount(key, minlength=BINS)
            mass = torch.bincount(key, weights=self.l1.double(), minlength=BINS)
        self.cum_n, self.cum_mass = torch.cumsum(self.count, 0), torch.cumsum(mass, 0)
        # Edge blocks (last block row / column) hold fewer real weights when the shape is padded.
        gr, gc = l1.shape
        edge = []
        if rows % b:
            edge.append(torch.arange((gr - 1) * gc, gr * gc))
        if cols % b:
            edge.append(torch.arange(gc - 1, gr * gc, gc))
        self.edge_idx = torch.cat(edge).unique() if edge else torch.zeros(0, dtype=torch.int64)
        er, ec = self.edge_idx // gc, self.edge_idx % gc
        real = (torch.clamp(rows - er * b, max=b) * torch.clamp(cols - ec * b, max=b))
        self.edge_deficit = self.full - real
        self.edge_key = (self.l1[self.edge_idx].view(torch.int32) >> 16) & 0x7FFF

    def _bins(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and indices (ascending) of the blocks in the given bins."""
        lib = native()
        if lib is None:
            key = (self.l1.view(torch.int32) >> 16) & 0x7FFF
            idx = torch.nonzero(torch.isin(key, torch.tensor(keys, dtype=key.dtype))).view(-1)
            return self.l1[idx], idx
        want = torch.zeros(BINS, dtype=torch.uint8)
        want[keys] = 1
        n = int(self.count[keys].sum())
        vals, idx = torch.empty(n), torch.empty(n, dtype=torch.int64)
        lib.collect_bins(_ptr(self.l1), self.l1.numel(), _ptr(want), _ptr(vals), _ptr(idx))
        return vals, idx

    def weights_within(self, masses: list[float]) -> list[int]:
        """Per mass: real weights in the largest set of lowest-L1 blocks whose L1 total <= mass."""
        kbs = [int(k) for k in torch.searchsorted(self.cum_mass, torch.tensor(masses, dtype=torch.float64),
                                                  right=True)]
        inside = sorted({k for k in kbs if k < BINS})
        vals, idx = self._bins(inside) if inside else (torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        vkey = (vals.view(torch.int32) >> 16) & 0x7FFF
        out = []
        for mass, kb in zip(masses, kbs):
            if kb >= BINS:  # every block fits
                out.append(int(self.cum_n[-1]) * self.full - int(self.edge_deficit.sum()))
                continue
            before = int(self.cum_n[kb - 1]) if kb > 0 else 0
            weights = before * self.full - int(self.edge_deficit[self.edge_key < kb].sum())
            sel = vkey == kb
            v, order = torch.sort(vals[sel].double(), stable=True)
            budget = mass - (float(self.cum_mass[kb - 1]) if kb > 0 else 0.0)
            fits = int(torch.searchsorted(torch.cumsum(v, 0), torch.tensor([budget], dtype=torch.float64),
                                          right=True))
            weights += fits * self.full
            if self.edge_idx.numel():
                weights -= int(self.edge_deficit[torch.isin(self.edge_idx, idx[sel][order[:fits]])].sum())
            out.append(weights)
        return out


def prune_count(sparsity: float, n: int) -> int:
    """k = ceil(s * n) weights pruned (a tiny guard keeps 0.3 * 10 from rounding up to 4)."""
    if sparsity <= 0:
        return 0
    return min(n, max(1, math.ceil(sparsity * n - 1e-9)))
