"""`rarefy analyze`: stream a checkpoint one tensor at a time and measure how prunable it is.

Works on any checkpoint made of named tensors (no model code involved, so hybrid or unknown
architectures are fine). Per tensor, one pass over row chunks of ~256K weights gives:

- an exact histogram of |w| (bf16/fp16: one bin per 16-bit pattern, so threshold counts, the
  k-th smallest |w| and sums follow from it without a sort; other dtypes are loaded whole as
  float32 and refined exactly where the histogram is coarse);
- per-4x4-block max |w| and L1 sums for block density (block_density.py);
- a copy or a sketch of the matrix for cross-layer similarity (similarity.py).

bf16/fp16 safetensors are memory-mapped and analysed in place, and the pages of each row chunk
are unmapped once it is done (mapped pages count towards RSS), so peak memory is independent
of shard and tensor sizes. Tensors are spread over threads.
"""

from __future__ import annotations

import collections
import json
import math
import mmap
import os
import re
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from rarefy.errors import RarefyError
from rarefy.sparsity.block_density import _FP16_LUT, BINS, BlockGrid, prune_count, scan_chunk16
from rarefy.sparsity.similarity import SKETCH_COLS, SKETCH_ROWS, SimilarityTracker

CHUNK_ELEMS = 1 << 20  # weights per row chunk (2 MiB of bf16): few Python round trips
LOG_EDGES = np.linspace(-8.0, 1.0, 181)  # log10|w| histogram bins for the plots (0.05 decades)
_LAYER = re.compile(r"\.(\d+)\.")
_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                 "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CANONICAL = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
             "down_proj", "lm_head"]


@dataclass
class AnalyzeOptions:
    """What to measure (defaults = the command's) and how (threads, exact-similarity budget)."""
    thresholds: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02)
    rel_thresholds: tuple[float, ...] = (0.1, 0.25, 0.5)
    sparsities: tuple[float, ...] = (0.5, 0.75)
    blocks: tuple[int, ...] = (4, 16, 32, 64)
    similarity_threshold: float = 0.95
    similarity_budget: int = 512 << 20  # bytes of exact copies for layer similarity
    sketch_rows: int = SKETCH_ROWS
    sketch_cols: int = SKETCH_COLS
    threads: int = 0  # 0: one per available CPU
    progress: bool = False
    gpus: list | None = None  # roofline.GPU list for the napkin math; None: the four defaults
    context: int = 4096  # tokens of context for the KV-cache line of the napkin math


def component_of(name: str) -> str:
    """Group key: the module name before `.weight` (`...self_attn.q_proj.weight` -> `q_proj`),
    `<module>.bias` for biases, else the parameter's own name (`linear_attn.A_log` -> `A_log`)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight":
        return parts[-2]
    if len(parts) >= 2 and parts[-1] == "bias":
        return parts[-2] + ".bias"
    return parts[-1]


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def series_of(name: str) -> str | None:
    """`model.layers.7.mlp.up_proj.weight` -> `model.layers.*.mlp.up_proj.weight`."""
    m = _LAYER.search(name)
    return None if m is None else name[:m.start()] + ".*." + name[m.end():]


# -- checkpoint sources -----------------------------------------------------------------------

@dataclass
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str = ""
    offset: int = 0


class SafetensorsSource:
    """Names, shapes and positioned reads of an HF checkpoint directory's safetensors files."""
    format = "safetensors"

    def __init__(self, path: str):
        from rarefy.models.safetensors_dir import SafetensorsCheckpoint
        ckpt = SafetensorsCheckpoint(path)  # validates the layout and that every shard exists
        index = os.path.join(path, "model.safetensors.index.json")
        files = [os.path.join(path, "model.safetensors")]
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
        self.entries: dict[str, _Entry] = {}
        for f in files:
            for e in _read_header(f):
                dt = _FLOAT_DTYPES.get(e.dtype)
                if dt is not None and e.nbytes != math.prod(e.shape) * dt.itemsize:
                    raise RarefyError(f"corrupt safetensors file {f}: tensor {e.name} has "
                                      f"{e.nbytes} bytes for shape {list(e.shape)} of {e.dtype}")
                self.entries.setdefault(e.name, e)
        missing = [n for n in ckpt.tensor_names() if n not in self.entries]
        if missing:
            raise RarefyError(f"tensor {missing[0]} is listed in the index but not in its shard")
        self._fds = {f: os.open(f, os.O_RDONLY) for f in files}
        # Private (copy-on-write) maps give torch writable buffers without copying; nothing writes.
        self._maps = {f: mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) for f, fd in self._fds.items()
                      if os.path.getsize(f)}
        for m in self._maps.values():
            m.madvise(mmap.MADV_SEQUENTIAL)

    def order(self) -> list[_Entry]:
        return sorted(self.entries.values(), key=lambda e: (e.file, e.offset))

    def torch_dtype(self, e: _Entry) -> torch.dtype | None:
        return _FLOAT_DTYPES.get(e.dtype)

    def prefetch(self, e: _Entry) -> None:
        """Start reading a tensor into the page cache (asynchronously) before it is analysed."""
        os.posix_fadvise(self._fds[e.file], e.offset, e.nbytes, os.POSIX_FADV_WILLNEED)

    def read_rows(self, e: _Entry, row0: int, nrows: int) -> torch.Tensor:
        """Rows row0..row0+nrows of a 16-bit tensor as [nrows, cols]: a view of the mapped file."""
        cols = _row_elems(e)
        return torch.frombuffer(self._maps[e.file], dtype=self.torch_dtype(e), count=nrows * cols,
                                offset=e.offset + row0 * 2 * cols).view(nrows, cols)

    def release(self, e: _Entry, row0: int, nrows: int) -> None:
        """Unmap the pages of rows already analysed: mapped pages count towards RSS until then
        (they stay in the page cache). The range starts 128 KiB early because a page fault also
        maps its neighbours ("fault-around", 64 KiB), some before the chunk; pages shared with a
        tensor still being read are simply faulted in again."""
        row = _row_elems(e) * self.torch_dtype(e).itemsize
        start = max(e.offset + row0 * row - (128 << 10), 0)
        start -= start % mmap.PAGESIZE
        self._maps[e.file].madvise(mmap.MADV_DONTNEED, start, e.offset + (row0 + nrows) * row - start)

    def load(self, e: _Entry) -> torch.Tensor:
        """A whole tensor of another float dtype, as a float32 copy."""
        t = torch.frombuffer(self._maps[e.file], dtype=self.torch_dtype(e), count=math.prod(e.shape),
                             offset=e.offset).reshape(e.shape).to(torch.float32, copy=True)
        self.release(e, 0, e.shape[0] if len(e.shape) > 1 else 1)
        return t

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it: the map goes with that tensor
                pass
        for fd in self._fds.values():
            os.close(fd)
        self._maps, self._fds = {}, {}


def _row_elems(e: _Entry) -> int:
    """Elements per row of the [rows, cols] view (a 1-D or 0-d tensor is one row)."""
    return math.prod(e.shape[1:]) if len(e.shape) > 1 else max(math.prod(e.shape), 1)


def _read_header(file: str) -> list[_Entry]:
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
        out = []
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            b, end = meta["data_offsets"]
            if 8 + n + end > size:
                raise ValueError(f"tensor {name} lies past the end of the file")
            out.append(_Entry(name, meta["dtype"], tuple(meta["shape"]), end - b, file, 8 + n + b))
        return out
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise RarefyError(f"corrupt safetensors file {file}: {exc}") from None


class GGUFSource:
    """A GGUF file through rarefy's GGUF reader (HF names; tensors dequantized whole to float32)."""
    format = "gguf"

    def __init__(self, path: str):
        from rarefy.models.gguf_file import GGUFCheckpoint
        self.ckpt = GGUFCheckpoint(path)
        self.entries = {n: _Entry(n, self.ckpt.tensor_dtype_name(n), (), 0) for n in self.ckpt.tensor_names()}

    def order(self) -> list[_Entry]:
        return list(self.entries.values())

    def torch_dtype(self, e: _Entry) -> torch.dtype:
        return torch.float32

    def load(self, e: _Entry) -> torch.Tensor:
        from rarefy.models.info import stored_bytes
        t = self.ckpt.load(e.name, torch.float32)
        e.shape, e.nbytes = tuple(t.shape), stored_bytes(e.dtype, t.numel()) or 0
        return t

    def prefetch(self, e: _Entry) -> None:
        pass

    def close(self) -> None:
        pass


def open_source(path: str | None):
    if path is None:
        from rarefy.models.default_model import default_model_path
        path = default_model_path()
    if os.path.isdir(path):
        return path, SafetensorsSource(path)
    if os.path.isfile(path):
        return path, GGUFSource(path)
    raise RarefyError(f"no such checkpoint: {path}")


def config_hints(path: str, source) -> dict:
    """config.json keys the napkin math can use (nested text_config included); {} if none."""
    if isinstance(source, GGUFSource):
        return dict(source.ckpt.config_dict)
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    return {**cfg, **cfg.get("text_config", {})} if isinstance(cfg.get("text_config"), dict) else cfg


# -- per-tensor statistics --------------------------------------------------------------------

def _value_table(dtype: torch.dtype) -> np.ndarray:
    """float64 |value| of each 15-bit pattern (inf for inf/nan). For float32 the pattern is the
    top 16 bits, so the value is the lower edge of its bin."""
    k = np.arange(BINS, dtype=np.int64)
    with np.errstate(invalid="ignore"):  # nan patterns
        if dtype == torch.float16:
            v = k.astype(np.uint16).view(np.float16).astype(np.float64)
        else:
            v = (k << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    v[~np.isfinite(v)] = np.inf
    return v


_TABLES = {d: _value_table(d) for d in (torch.bfloat16, torch.float16, torch.float32)}


def _log_hist(hist: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Counts of nonzero |w| per LOG_EDGES bin (values outside the range clipped into it)."""
    nz = (hist > 0) & (vals > 0) & np.isfinite(vals)
    x = np.clip(np.log10(vals[nz]), LOG_EDGES[0], LOG_EDGES[-1] - 1e-9)
    return np.histogram(x, bins=LOG_EDGES, weights=hist[nz])[0].astype(np.int64)


def _stats_16bit(hist: torch.Tensor, dtype: torch.dtype, n: int, opts: AnalyzeOptions) -> dict:
    """Every figure from an exact histogram of 15-bit |w| patterns."""
    h, vals = hist.numpy(), _TABLES[dtype]
    fin = np.isfinite(vals)
    hf, vf = h[fin], vals[fin]  # finite patterns are a prefix, ascending in value
    cum = np.cumsum(h)
    sumsq, sum_abs = float((hf * vf * vf).sum()), float((hf * vf).sum())
    rms = math.sqrt(sumsq / n) if n else 0.0

    def below(t):
        i = int(np.searchsorted(vf, t, side="left"))
        return int(cum[i - 1]) if i > 0 else 0

    prune = []
    for s in opts.sparsities:
        k = prune_count(s, n)
        kb = int(np.searchsorted(cum, k, side="left"))
        prune.append({"sparsity": s, "tau": float(vals[kb]), "tau_key": kb, "pruned": int(cum[kb]),
                      "removed_mass": float((hf[:kb + 1] * vf[:kb + 1]).sum())})
    return {"sumsq": sumsq, "sum_abs": sum_abs, "rms": rms, "zeros": int(h[0]),
            "max_abs": float(vf[np.nonzero(hf)[0][-1]]) if hf.any() else 0.0,
            "nonfinite": int(h[~fin].sum()),
            "below_abs": [below(t) for t in opts.thresholds],
            "below_rel": [below(f * rms) for f in opts.rel_thresholds], "prune": prune}


def _stats_f32(a: torch.Tensor, hist: torch.Tensor, key: torch.Tensor, opts: AnalyzeOptions) -> dict:
    """Exact figures for float32 |w|: a and key (its top 16 bits, int16) flat, hist of key.

    The k-th smallest |w| is found in the histogram bin that holds it (only that bin's weights
    are selected and ranked); thresholds act as exact reals (see `below`).
    """
    n, bin_sum, sumsq = a.numel(), torch.zeros(BINS, dtype=torch.float64), 0.0
    for ac, kc in zip(a.split(1 << 22), key.split(1 << 22)):
        ad = ac.double().nan_to_num_(nan=0.0, posinf=0.0)  # non-finite weights stay out of sums
        bin_sum += torch.bincount(kc.long(), weights=ad, minlength=BINS)
        sumsq += float(ad.square_().sum())
    cum, cum_sum = torch.cumsum(hist, 0), torch.cumsum(bin_sum, 0)
    rms = math.sqrt(sumsq / n) if n else 0.0

    def below(t: float) -> int:
        # For float32 a: a < t  <=>  a < the smallest float32 >= t (exact, unlike casting t).
        t32 = np.float32(t)
        if float(t32) < t:
            t32 = np.nextafter(t32, np.float32(np.inf))
        return int(torch.count_nonzero(a < float(t32)))

    prune = []
    for s in opts.sparsities:
        k = prune_count(s, n)
        kb = int(torch.searchsorted(cum, torch.tensor([k]), side="left"))
        sub = a[key == kb].double()
        tau = float(torch.kthvalue(sub, k - (int(cum[kb - 1]) if kb > 0 else 0)).values)
        low = sub[sub <= tau]
        prune.append({"sparsity": s, "tau": tau, "tau_key": tau,
                      "pruned": (int(cum[kb - 1]) if kb > 0 else 0) + low.numel(),
                      "removed_mass": (float(cum_sum[kb - 1]) if kb > 0 else 0.0) + float(low.sum())})
    top = float(a.max()) if n else 0.0
    nonfinite = 0 if math.isfinite(top) else int(torch.count_nonzero(~torch.isfinite(a)))
    if not math.isfinite(top):
        top = float(a[torch.isfinite(a)].max())
    return {"sumsq": sumsq, "sum_abs": float(cum_sum[-1]), "rms": rms,
            "zeros": int(torch.count_nonzero(a == 0)), "max_abs": top, "nonfinite": nonfinite,
            "below_abs": [below(t) for t in opts.thresholds],
            "below_rel": [below(f * rms) for f in opts.rel_thresholds], "prune": prune}


def analyze_tensor(source, e: _Entry, opts: AnalyzeOptions, slot, full: torch.Tensor | None) -> dict:
    """All per-tensor figures. full: the tensor as float32 when not streamed as 16-bit rows."""
    shape, n = e.shape, math.prod(e.shape)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = n // rows if rows else 0
    grid = (BlockGrid(rows, cols, torch.int16 if full is None else torch.float32)
            if len(shape) >= 2 and opts.blocks and n else None)
    R = max(16, CHUNK_ELEMS // max(cols, 1) // 16 * 16)  # multiple of 16: block and sketch rows
    sketcher = slot.series.sketcher if slot is not None and slot.wants_float else None
    if full is None:  # bf16 / fp16: stream row chunks through one fused pass
        dtype = source.torch_dtype(e)
        hist = torch.zeros(BINS, dtype=torch.int64)
        lut = _FP16_LUT if dtype == torch.float16 else None
        for row0 in range(0, rows, R):
            m = min(R, rows - row0)
            x = source.read_rows(e, row0, m)
            scan_chunk16(x, row0, hist, grid, sketcher, slot.acc if sketcher else None, lut)
            if slot is not None and sketcher is None:
                slot.add_rows(row0, x)
            del x
            source.release(e, row0, m)
        stats = _stats_16bit(hist, dtype, n, opts)
        loghist = _log_hist(hist.numpy(), _TABLES[dtype])
    else:
        w = full.reshape(rows, cols)
        a = w.abs()
        key = (a.view(torch.int32) >> 16).to(torch.int16).reshape(-1)
        hist = torch.bincount(key, minlength=BINS)
        stats = _stats_f32(a.reshape(-1), hist, key, opts)
        loghist = _log_hist(hist.numpy(), _TABLES[torch.float32])
        for row0 in range(0, rows, R):
            if grid is not None:
                grid.add_chunk(row0, a[row0:row0 + R], a[row0:row0 + R])
            if slot is not None:
                slot.add_rows(row0, w[row0:row0 + R].clone() if sketcher else w[row0:row0 + R])
    if slot is not None:
        slot.finish()
    blocks = None
    if grid is not None:
        blocks = grid.finalize(list(opts.blocks), [p["tau_key"] for p in stats["prune"]],
                               [p["removed_mass"] for p in stats["prune"]])
    for p in stats["prune"]:
        del p["tau_key"]
    return {"name": e.name, "component": component_of(e.name), "layer": layer_of(e.name),
            "shape": list(shape), "dtype": e.dtype, "numel": n, "bytes": e.nbytes,
            **stats, "log_hist": loghist, "blocks": blocks}


# -- the driver -------------------------------------------------------------------------------

def analyze_checkpoint(path: str | None, opts: AnalyzeOptions | None = None) -> dict:
    """Analyse every floating-point tensor of a checkpoint; returns a JSON-ready dict.

    Tensors are read in file order; up to `threads` are analysed at once (torch ops release the
    GIL; each op runs single-threaded so two tensors proceed side by side).
    """
    from tqdm import tqdm
    opts = opts or AnalyzeOptions()
    path, source = open_source(path)
    entries = source.order()
    counts = collections.Counter(series_of(e.name) for e in entries)
    tracker = SimilarityTracker(counts, opts.similarity_budget, sketch_rows=opts.sketch_rows,
                                sketch_cols=opts.sketch_cols)
    threads = opts.threads or len(os.sched_getaffinity(0))
    results, skipped, t0, c0 = [], [], time.perf_counter(), time.process_time()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bar = tqdm(total=len(entries), unit="tensor", disable=not opts.progress, leave=False)
    try:
        with ThreadPoolExecutor(threads) as pool:
            pending = collections.deque()
            for e in entries:
                dtype = source.torch_dtype(e)
                if dtype is None or (e.shape and math.prod(e.shape) == 0):
                    skipped.append(e.name)
                    bar.update(1)
                    continue
                full = None
                if isinstance(source, GGUFSource) or dtype not in (torch.bfloat16, torch.float16):
                    full = source.load(e)  # small or unusual: whole, as float32
                    dtype = torch.float32
                else:
                    source.prefetch(e)
                series = series_of(e.name)
                slot = tracker.slot(series, layer_of(e.name), e.shape, dtype) if series else None
                pending.append(pool.submit(analyze_tensor, source, e, opts, slot, full))
                while len(pending) > threads:
                    results.append(pending.popleft().result())
                    bar.update(1)
            while pending:
                results.append(pending.popleft().result())
                bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(torch_threads)
        source.close()
    stream_s, stream_cpu = time.perf_counter() - t0, time.process_time() - c0
    similarity = tracker.results(opts.similarity_threshold)
    from rarefy.bench.roofline import napkin
    read = sum(r["bytes"] for r in results)
    return {
        "source": path, "format": source.format, "tensors": len(results), "skipped": skipped,
        "params": sum(r["numel"] for r in results), "bytes_read": read,
        "seconds": time.perf_counter() - t0, "stream_seconds": stream_s, "stream_cpu_seconds": stream_cpu,
        "read_gb_s": read / stream_s / 1e9 if stream_s else None,
        "options": {k: v for k, v in vars(opts).items() if k not in ("progress", "gpus")},
        "components": aggregate(results, opts), "tensor_stats": _compact(results),
        "similarity": similarity, "similarity_skipped": tracker.skipped,
        "napkin": napkin([(r["name"], tuple(r["shape"])) for r in results],
                         config_hints(path, source), opts.gpus, context=opts.context),
    }


def aggregate(results: list[dict], opts: AnalyzeOptions) -> dict:
    """Per component (and "all"): counts summed over tensors, turned into shares."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["component"], []).append(r)
    names = [c for c in CANONICAL if c in groups] + [c for c in groups if c not in CANONICAL]
    out = {name: _aggregate_group(groups[name], opts) for name in names}
    out["all"] = _aggregate_group(results, opts)
    return out


def _aggregate_group(rs: list[dict], opts: AnalyzeOptions) -> dict:
    n = sum(r["numel"] for r in rs)
    mats = [r for r in rs if r["blocks"] is not None]
    n2 = sum(r["numel"] for r in mats)
    g = {"tensors": len(rs), "params": n, "bytes": sum(r["bytes"] for r in rs),
         "rms": math.sqrt(sum(r["sumsq"] for r in rs) / n) if n else 0.0,
         "mean_abs": sum(r["sum_abs"] for r in rs) / n if n else 0.0,
         "max_abs": max((r["max_abs"] for r in rs), default=0.0),
         "zeros": sum(r["zeros"] for r in rs) / n if n else 0.0,
         "below_abs": {f"{t:g}": sum(r["below_abs"][i] for r in rs) / n if n else 0.0
                       for i, t in enumerate(opts.thresholds)},
         "below_rel": {f"{f:g}": sum(r["below_rel"][i] for r in rs) / n if n else 0.0
                       for i, f in enumerate(opts.rel_thresholds)},
         "log_hist": sum((r["log_hist"] for r in rs), np.zeros(len(LOG_EDGES) - 1, np.int64)).tolist(),
         "block_density": []}
    for i, s in enumerate(opts.sparsities):
        entry = {"sparsity": s, "matrix_params": n2,
                 "achieved": sum(r["prune"][i]["pruned"] for r in mats) / n2 if n2 else None,
                 "zero_block_share": {}, "block_sparsity": {}}
        for b in opts.blocks:
            blocks = sum(r["blocks"][i][b]["blocks"] for r in mats)
            entry["zero_block_share"][str(b)] = (
                sum(r["blocks"][i][b]["zero_blocks"] for r in mats) / blocks if blocks else None)
            entry["block_sparsity"][str(b)] = (
                sum(r["blocks"][i][b]["block_pruned_weights"] for r in mats) / n2 if n2 else None)
        g["block_density"].append(entry)
    return g


def _compact(results: list[dict]) -> list[dict]:
    """Per-tensor figures for the JSON output (histograms and block counts left out)."""
    keep = ("name", "component", "layer", "shape", "dtype", "numel", "rms", "max_abs")
    return [{k: r[k] for k in keep} | {"prune": r["prune"]} for r in results]
