"""Stream tensors from an HF checkpoint directory (one file or sharded with an index)."""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from rarefy.errors import RarefyError


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

    @staticmethod
    def _keys(file: str) -> list[str]:
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise RarefyError(f"corrupt safetensors file {file}: {e}") from None

    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def tensor_dtype_name(self, name: str) -> str:
        return str(self._handle(self._file_of[name]).get_slice(name).get_dtype())

    def _handle(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise RarefyError(f"corrupt safetensors file {file}: {e}") from None
        return self._handles[file]

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        file = self._file_of[name]
        try:
            t = self._handle(file).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise RarefyError(f"cannot read tensor {name} from {file}: {e}") from None
        return t.to(dtype)
