"""Save a (pruned) DecoderLM as an HF checkpoint whose sparse weights use compressed-tensors'
"sparse-bitmask" format, atomically, never touching the input checkpoint.

The directory holds an ordinary HF config.json (plus `quantization_config.sparsity_config`
for the compressed-tensors ecosystem and a `rarefy` key with rarefy's own metadata), one
or sharded safetensors files (+ index), and the tokenizer files. Layout and keys:
docs/formats.md. `rarefy.models.loader.load_model(out_dir)` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors.torch import save_file

import rarefy
from rarefy.errors import RarefyError
from rarefy.formats.sparse_bitmask import encode_bitmask, encoded_nbytes_estimate, part_names
from rarefy.models.safetensors_dir import read_rarefy_metadata

if TYPE_CHECKING:
    from rarefy.tokenizer import Tokenizer

__all__ = ["save_pruned", "read_rarefy_metadata", "file_sha256", "FORMAT_VERSION", "prepare_save", "SaveInputs",
           "ShardWriter", "base_config", "rarefy_header"]

FORMAT_VERSION = 1
# The sparse-bitmask layout is that of compressed-tensors <= 0.14.0.1, the last release
# that ships its compressor (0.15+ keeps only the config class); we label files with it.
COMPRESSED_TENSORS_VERSION = "0.14.0.1"
DEFAULT_SHARD_SIZE = 5_000_000_000  # transformers' default max_shard_size ("5GB")

# Copied verbatim from an HF source directory when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")

_PROJECTION = re.compile(r"^model\.layers\.\d+\..*_proj\.weight$")
_COMPONENT = re.compile(r"\.([a-z_]+_proj)\.weight$")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (for the calibration record in the metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class SaveInputs:
    """What every checkpoint saver resolves before writing: see `prepare_save`."""
    out: Path
    source: Path | None
    cfg: dict
    tok_src: "Path | Tokenizer | None"
    gguf: _GGUFCache
    meta: dict

    def write(self, write_weights: Callable[[Path], dict], make_config: Callable[[dict], dict]) -> dict:
        """Atomically fill `out`: stats = write_weights(tmp); config.json = make_config(stats)
        (kept as stats["cfg"]); the tokenizer files. Returns stats."""
        def fill(tmp: Path) -> dict:
            stats = write_weights(tmp)
            stats["cfg"] = make_config(stats)
            _write_json(tmp / "config.json", stats["cfg"])
            if self.tok_src is not None:
                _write_tokenizer(tmp, self.tok_src, self.gguf)
            return stats

        return write_dir_atomically(self.out, fill)


def prepare_save(out_dir: str | os.PathLike, source_path: str | os.PathLike | None, *, overwrite: bool,
                 shard_size_bytes: int, config_dict: dict | None, tokenizer_files_from, meta: dict | None,
                 meta_name: str) -> SaveInputs:
    """The savers' common prologue: resolve `out_dir` and `source_path`, refuse a destination
    that is or holds the source (or is non-empty without `overwrite`), check the shard size
    and that `meta` (called `meta_name` in errors) is JSON-serialisable, and find the config
    (`config_dict`, else the source's) and the tokenizer source (default: the source)."""
    out = Path(out_dir).expanduser().resolve()
    source = Path(source_path).expanduser().resolve() if source_path is not None else None
    _check_destination(out, source, overwrite)
    if shard_size_bytes <= 0:
        raise RarefyError("shard_size_bytes must be positive")
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise RarefyError(f"{meta_name} is not JSON-serialisable: {e}") from None
    tok_src = tokenizer_files_from if tokenizer_files_from is not None else source
    if isinstance(tok_src, (str, os.PathLike)):
        tok_src = Path(tok_src).expanduser().resolve()
    gguf = _GGUFCache()
    cfg = dict(config_dict) if config_dict is not None else _source_config(source, gguf)
    return SaveInputs(out, source, cfg, tok_src, gguf, meta)


def save_pruned(model, out_dir: str | os.PathLike, *, source_path: str | os.PathLike | None = None,
                config_dict: dict | None = None,
                tokenizer_files_from: "str | os.PathLike | Tokenizer | None" = None,
                rarefy_meta: dict | None = None,
                compress: Callable[[str], bool] | None = None,
                shard_size_bytes: int = DEFAULT_SHARD_SIZE,
                dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """Write `model` (a rarefy DecoderLM) to `out_dir`; returns a summary dict.

    source_path: the checkpoint the model came from (HF dir or .gguf); never written to.
    config_dict: the HF config to write; default: the source's config.json, or for a
        GGUF source `GGUFCheckpoint(source).config_dict`.
    tokenizer_files_from: an HF dir to copy tokenizer files from, a .gguf file or a rarefy
        `Tokenizer` to write tokenizer.json + tokenizer_config.json (+ generation_config.json)
        from; default: source_path.
    rarefy_meta: JSON-serialisable facts about the pruning (method, sparsity, pattern,
        block, component_sparsity, calibration {file, sha256, samples, length}, skip, ...),
        stored under config.json["rarefy"] next to what save_pruned measures itself.
    compress(name): which 2-D weights are bitmask-compressed. Default: decoder-layer
        projection weights (`*_proj.weight`) whose encoding is smaller than their dense
        bytes, i.e. the pruned ones.
    dtype: cast floating tensors to it before saving (default: keep the model's dtypes).
    overwrite: replace a non-empty `out_dir` (never allowed when it is or holds the source).
    """
    io = prepare_save(out_dir, source_path, overwrite=overwrite, shard_size_bytes=shard_size_bytes,
                      config_dict=config_dict, tokenizer_files_from=tokenizer_files_from, meta=rarefy_meta,
                      meta_name="rarefy_meta")
    tensors = _state_tensors(model)
    stats = io.write(lambda tmp: _write_weights(tmp, tensors, compress, shard_size_bytes, dtype),
                     lambda stats: _final_config(io.cfg, stats, tensors, io.source, io.meta))
    cfg = stats["cfg"]
    return {"out_dir": str(io.out), "files": stats["files"], "compressed": stats["compressed"],
            "bytes": stats["bytes"], "dense_bytes": stats["dense_bytes"],
            "measured": cfg["rarefy"]["measured"]}


def write_dir_atomically(out: Path, fill):
    """Run fill(tmp) in a fresh directory beside `out`, fsync it and move it into place;
    on any failure remove it, so nothing half-written is left. Returns fill's result."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise RarefyError(f"cannot create a directory next to {out}: {e}") from None
    try:
        result = fill(tmp)
        _fsync_dir(tmp)
        _move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise RarefyError(f"cannot write {out}: {e}") from None
        raise
    return result


# -- destination -----------------------------------------------------------------------

def check_destination(out_dir: str | os.PathLike, source_path: str | os.PathLike | None,
                      overwrite: bool = False) -> None:
    """What save_pruned refuses, checked up front (before a long prune), same rules."""
    source = Path(source_path).expanduser().resolve() if source_path is not None else None
    _check_destination(Path(out_dir).expanduser().resolve(), source, overwrite)


def _check_destination(out: Path, source: Path | None, overwrite: bool) -> None:
    """Refuse before anything is written: the source, a directory holding the source,
    a file, or a non-empty directory without `overwrite`."""
    if source is not None:
        if out == source:
            raise RarefyError(f"the output {out} is the input checkpoint; choose another directory")
        if source.is_relative_to(out):
            raise RarefyError(f"the output {out} contains the input checkpoint {source}; "
                              "choose another directory")
    if out.exists():
        if not out.is_dir():
            raise RarefyError(f"the output {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise RarefyError(f"the output directory {out} is not empty (use overwrite to replace it)")


def write_directory(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Build a directory atomically: `write(tmp)` fills a fresh temporary directory beside
    `out_dir`, which then replaces it (the old contents survive if anything fails)."""
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """rename(2) is atomic; an existing directory is renamed aside first, deleted after."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old)  # replaces the fresh empty dir `old`
        else:
            out.rmdir()
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the previous output back
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- tensors ---------------------------------------------------------------------------

def _state_tensors(model) -> dict[str, torch.Tensor]:
    """HF-named persistent tensors, tied lm_head once, checked against DecoderLM's names."""
    from rarefy.models.llama import DecoderLM
    cfg = model.config
    with torch.device("meta"):
        expected = set(DecoderLM(cfg).state_dict())
    tensors = {}
    for name, t in model.state_dict().items():  # non-persistent buffers are not in it
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[name] = t.detach()
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise RarefyError(f"the model's parameters do not have HF names (e.g. {odd[0]}); "
                          "save before fuse_projections() or other layer swaps")
    return tensors


def _default_compress(name: str, t: torch.Tensor, nonzeros: int) -> bool:
    if not _PROJECTION.match(name) or t.dim() != 2:
        return False
    dense = t.numel() * t.element_size()
    return encoded_nbytes_estimate(*t.shape, nonzeros, t.element_size()) < dense


def _write_weights(tmp: Path, tensors: dict[str, torch.Tensor], compress: Callable[[str], bool] | None,
                   shard_size: int, dtype: torch.dtype | None) -> dict:
    """Encode and write shards (the parts of one matrix stay in one shard); collect sparsity.
    Tensors are cast one at a time, so no second copy of the model is ever held."""
    shards = ShardWriter(tmp, shard_size, {"format": "pt", "rarefy_format_version": str(FORMAT_VERSION)})
    dtypes: set[str] = set()
    compressed: list[str] = []
    zeros_all = numel_all = dense_total = 0
    per_comp: dict[str, list[int]] = {}

    for name, t in tensors.items():
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if t.is_floating_point():
            dtypes.add(str(t.dtype).removeprefix("torch."))
        nonzeros = int(torch.count_nonzero(t)) if t.numel() else 0
        zeros_all += t.numel() - nonzeros
        numel_all += t.numel()
        dense_total += t.numel() * t.element_size()
        wanted = (compress(name) if compress is not None else _default_compress(name, t, nonzeros))
        if wanted and t.dim() == 2:
            parts = {part_names(name)[k]: v for k, v in encode_bitmask(t).items()}
            compressed.append(name)
            comp = _COMPONENT.search(name)
            c = per_comp.setdefault(comp.group(1) if comp else name, [0, 0])
            c[0] += t.numel() - nonzeros
            c[1] += t.numel()
        else:
            parts = {name: t.cpu().contiguous()}
        shards.add(parts)
    names = shards.finish()
    zc = sum(v[0] for v in per_comp.values())
    nc = sum(v[1] for v in per_comp.values())
    return {"files": names, "compressed": compressed, "bytes": shards.total, "dense_bytes": dense_total,
            "dtypes": dtypes,
            "global_sparsity": zeros_all / max(numel_all, 1),
            "compressed_sparsity": zc / nc if nc else 0.0,
            "per_component": {k: v[0] / v[1] for k, v in sorted(per_comp.items())}}


class ShardWriter:
    """safetensors shards in `tmp` of at most `shard_size` bytes (a group larger than that gets
    one to itself); the tensors of one `add` (the parts of one matrix) never split."""

    def __init__(self, tmp: Path, shard_size: int, metadata: dict[str, str]):
        self.tmp, self.shard_size, self.metadata = tmp, shard_size, metadata
        self.files: list[Path] = []
        self.keys: list[list[str]] = []
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.total = 0

    def add(self, parts: dict[str, torch.Tensor]) -> int:
        """Write `parts` (CPU, contiguous) into the current shard, or a new one; returns their bytes."""
        size = sum(v.numel() * v.element_size() for v in parts.values())
        if self.current and self.current_bytes + size > self.shard_size:
            self._flush()
        self.current.update(parts)
        self.current_bytes += size
        self.total += size
        return size

    def _flush(self) -> None:
        path = self.tmp / f"part-{len(self.files):05d}.safetensors"
        save_file(self.current, str(path), metadata=self.metadata)
        _fsync_file(path)
        self.files.append(path)
        self.keys.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give the shards their HF names (model.safetensors, or model-0000i-of-0000n +
        model.safetensors.index.json); returns the names."""
        if self.current or not self.files:
            self._flush()
        # Final names are known only now; renaming inside the temp dir keeps the write atomic.
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for path, final in zip(self.files, names):
            os.replace(path, self.tmp / final)
        if n > 1:
            weight_map = {k: final for final, ks in zip(names, self.keys) for k in ks}
            _write_json(self.tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": self.total}, "weight_map": weight_map})
        return names


# -- config and metadata ---------------------------------------------------------------

def base_config(cfg: dict, dtypes: set[str]) -> dict:
    """The source's HF config without its quantization / compression / rarefy keys, its dtype
    set to the saved floating tensors' one when they share one."""
    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "compression_config", "rarefy")}
    if len(dtypes) == 1:
        cfg["dtype" if "dtype" in cfg else "torch_dtype"] = next(iter(dtypes))
    return cfg


def rarefy_header(source: Path | None, weights_format: str) -> dict:
    """The first keys of config.json["rarefy"]: format version, writer, date, source, weights format."""
    return {"format_version": FORMAT_VERSION, "writer": f"rarefy {rarefy.__version__}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_model": str(source) if source is not None else None, "weights_format": weights_format}


def _final_config(cfg: dict, stats: dict, tensors: dict, source: Path | None, meta: dict) -> dict:
    cfg = base_config(cfg, stats["dtypes"])
    compressed = set(stats["compressed"])
    if compressed:
        # Linear modules in HF terms: the projections and lm_head (saved or tied).
        linears = {n[: -len(".weight")] for n in tensors if _PROJECTION.match(n)} | {"lm_head"}
        structure = meta.get("pattern") if isinstance(meta.get("pattern"), str) else "unstructured"
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "version": COMPRESSED_TENSORS_VERSION,
            "sparsity_config": {
                "format": "sparse-bitmask",
                # llm-compressor writes a percentage of all parameters here
                "global_sparsity": round(100.0 * stats["global_sparsity"], 4),
                "sparsity_structure": structure,
                "targets": ["Linear"],
                "ignore": sorted(linears - {n[: -len(".weight")] for n in compressed}),
                "registry_requires_subclass": False,
            },
            "transform_config": {},
        }
    cfg["rarefy"] = {
        **rarefy_header(source, "sparse-bitmask" if compressed else "dense"),
        **{k: v for k, v in meta.items() if k != "format_version"},
        "measured": {
            "compressed_tensors": len(compressed),
            "sparsity": round(stats["compressed_sparsity"], 6),
            "global_sparsity": round(stats["global_sparsity"], 6),
            "per_component": {k: round(v, 6) for k, v in stats["per_component"].items()},
            "bytes": stats["bytes"], "dense_bytes": stats["dense_bytes"],
        },
    }
    return cfg


class _GGUFCache:
    """Opens a GGUF file at most once (parsing one takes seconds)."""

    def __init__(self):
        self._ckpts = {}

    def get(self, path: Path):
        if path not in self._ckpts:
            from rarefy.models.gguf_file import GGUFCheckpoint
            self._ckpts[path] = GGUFCheckpoint(path)
        return self._ckpts[path]


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _source_config(source: Path | None, gguf: _GGUFCache) -> dict:
    if source is None:
        raise RarefyError("save_pruned needs config_dict or source_path")
    if source.is_dir():
        try:
            return json.loads((source / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise RarefyError(f"cannot read {source / 'config.json'}: {e}") from None
    if source.is_file() and _is_gguf(source):
        return dict(gguf.get(source).config_dict)
    raise RarefyError(f"source checkpoint not found or not readable: {source}")


def _write_tokenizer(tmp: Path, src, gguf: _GGUFCache) -> None:
    """Copy an HF directory's tokenizer files, or write them for a GGUF file or a rarefy
    Tokenizer, so that `Tokenizer.from_hf_dir` (and transformers) reload the same tokenizer."""
    from rarefy.tokenizer import Tokenizer
    if isinstance(src, Tokenizer):
        text = src.tk.to_str()
        bos, eos, add_bos, template = src.bos_token_id, src.eos_token_ids, src.add_bos, src.chat_template
        max_len = None
    elif src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                _fsync_file(tmp / name)
        return
    elif src.is_file() and _is_gguf(src):
        ckpt = gguf.get(src)
        text = ckpt.tokenizer_json()
        bos, add_bos, template = ckpt.bos_token_id, ckpt.add_bos_token, ckpt.chat_template
        eos = () if ckpt.eos_token_id is None else (ckpt.eos_token_id,)
        max_len = ckpt.config_dict.get("max_position_embeddings")
    else:
        raise RarefyError(f"tokenizer source is neither an HF directory nor a GGUF file: {src}")
    from tokenizers import Tokenizer as HFTokenizer
    (tmp / "tokenizer.json").write_text(text)
    _fsync_file(tmp / "tokenizer.json")
    tk = HFTokenizer.from_str(text)

    def token(i):
        return tk.id_to_token(i) if i is not None else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": token(bos), "eos_token": token(eos[0] if eos else None),
              "add_bos_token": bool(add_bos), "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "chat_template": template}
    if max_len:
        config["model_max_length"] = max_len
    _write_json(tmp / "tokenizer_config.json", config)
    gen = {"bos_token_id": bos, "eos_token_id": list(eos) if len(eos) > 1 else (eos[0] if eos else None)}
    _write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})


# -- durable writes ----------------------------------------------------------------------

def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def __getattr__(name: str):
    # the sparse + int8 saver lives in its own module (which imports this one)
    if name in ("save_sparse_int8", "SPARSE_INT8_FORMAT", "SPARSE_INT8_VERSION"):
        from rarefy.formats import sparse_int8_checkpoint
        return getattr(sparse_int8_checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
