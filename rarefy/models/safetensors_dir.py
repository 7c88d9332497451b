"""Stream tensors from an HF checkpoint directory (one file or sharded with an index).

Weights stored in compressed-tensors' "sparse-bitmask" format (`<prefix>.shape`,
`.compressed`, `.bitmask`, `.row_offsets`; see docs/formats.md) are listed under their
logical name `<prefix>.weight` and rebuilt densely on `load()`.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from rarefy.errors import RarefyError
from rarefy.formats.sparse_bitmask import SUFFIXES, decode_bitmask

# Formats of compressed-tensors' sparsity_config that this reader understands.
_SPARSITY_FORMATS = (None, "dense", "sparse-bitmask")


def _read_config(path: str) -> dict | None:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise RarefyError(f"cannot read {file}: {e}") from None
    return cfg if isinstance(cfg, dict) else None


def read_rarefy_metadata(path: str | os.PathLike) -> dict | None:
    """config.json["rarefy"] of a checkpoint written by rarefy (method, sparsity,
    calibration, measured sparsity, ...), or None for any other checkpoint."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    meta = (_read_config(path) or {}).get("rarefy")
    return meta if isinstance(meta, dict) else None


def _check_compression_config(path: str) -> None:
    """Fail clearly on compressed-tensors encodings this reader cannot rebuild."""
    cfg = _read_config(path) or {}
    qc = cfg.get("quantization_config") or cfg.get("compression_config")
    if not isinstance(qc, dict) or qc.get("quant_method", "compressed-tensors") != "compressed-tensors":
        return
    fmt = (qc.get("sparsity_config") or {}).get("format")
    if fmt not in _SPARSITY_FORMATS:
        raise RarefyError(f"{path}: compressed-tensors sparsity format '{fmt}' is not supported "
                          "(rarefy reads 'sparse-bitmask')")
    if qc.get("config_groups"):
        raise RarefyError(f"{path}: quantized compressed-tensors checkpoints are not supported yet")


class SafetensorsCheckpoint:
    """Memory-mapped view of `model.safetensors` or `model.safetensors.index.json` shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        single = os.path.join(self.path, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise RarefyError(f"cannot read {index}: {e}") from None
            self._file_of = {k: os.path.join(self.path, v) for k, v in weight_map.items()}
        elif os.path.isfile(single):
            self._file_of = {k: single for k in self._keys(single)}
        else:
            raise RarefyError(f"no model.safetensors or model.safetensors.index.json in {self.path}")
        for f in set(self._file_of.values()):
            if not os.path.isfile(f):
                raise RarefyError(f"checkpoint shard is missing: {f}")
        self._handles: dict[str, object] = {}
        _check_compression_config(self.path)
        self._compressed = self._find_compressed()
        hidden = {part for parts in self._compressed.values() for part in parts.values()}
        names = []
        for k in self._file_of:  # file order; a compressed weight sits where its bitmask is
            if k not in hidden:
                names.append(k)
            elif k.endswith(".bitmask"):
                names.append(k[: -len(".bitmask")] + ".weight")
        self._names = names

    def _find_compressed(self) -> dict[str, dict[str, str]]:
        """logical weight name -> {part suffix: stored tensor name}, for complete groups."""
        groups = {}
        for k in self._file_of:
            if not k.endswith(".bitmask"):
                continue
            prefix = k[: -len(".bitmask")]
            parts = {s: f"{prefix}.{s}" for s in SUFFIXES}
            if all(p in self._file_of for p in parts.values()):
                if f"{prefix}.weight" in self._file_of:
                    raise RarefyError(f"{self.path}: {prefix}.weight is stored both dense and compressed")
                groups[f"{prefix}.weight"] = parts
        return groups

    @staticmethod
    def _keys(file: str) -> list[str]:
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise RarefyError(f"corrupt safetensors file {file}: {e}") from None

    def tensor_names(self) -> list[str]:
        """Logical names: compressed weights appear once, as `<prefix>.weight`."""
        return list(self._names)

    def is_compressed(self, name: str) -> bool:
        return name in self._compressed

    def tensor_dtype_name(self, name: str) -> str:
        stored = self._compressed[name]["compressed"] if name in self._compressed else name
        return str(self._handle(self._file_of[stored]).get_slice(stored).get_dtype())

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise RarefyError(f"corrupt safetensors file {file}: {e}") from None
        return self._handles[file]

    def load_compressed(self, name: str) -> dict[str, torch.Tensor]:
        """The stored parts of a compressed weight, keyed shape/compressed/bitmask/row_offsets."""
        return {s: self._load_stored(stored) for s, stored in self._compressed[name].items()}

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if name in self._compressed:
            return decode_bitmask(self.load_compressed(name), name).to(dtype)
        return self._load_stored(name).to(dtype)

    def _load_stored(self, name: str) -> torch.Tensor:
        file = self._file_of[name]
        try:
            t = self._handle(file).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise RarefyError(f"cannot read tensor {name} from {file}: {e}") from None
        return t
