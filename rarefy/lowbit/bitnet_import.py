"""Checkpoints in BitNet's published packed format, read into TernaryLinear.

The layout is the one of microsoft/bitnet-b1.58-2B-4T's `model.safetensors` and of
transformers' BitNet integration (`transformers/integrations/bitnet.py`, which
reads and writes it), for each quantized projection `P`:

    P.weight        uint8 [ceil(out/4), in]   packed along the *output* dimension:
                    with R = ceil(out/4), bits 2i..2i+1 of byte [r, c] hold the weight
                    of row i*R + r, column c (i = 0..3), as code = value + 1
                    (0 = -1, 1 = 0, 2 = +1)
    P.weight_scale  one value (shape [1], bf16 in the published files)

and config.json carries `"quantization_config": {"quant_method": "bitnet",
"linear_class": ..., "quantization_mode": ...}`. What `weight_scale` means depends on
`linear_class`: transformers' `AutoBitLinear` (used by bitnet-b1.58-2B-4T) multiplies
the output by it (W = Q * weight_scale), its older `BitLinear` (the default class,
used e.g. by HF1BitLLM/Llama3-8B-1.58-100B-tokens) divides by it (W = Q / weight_scale).
Both quantize activations per token to int8 (absmax), so the imported layers run with
`act_quant="int8"`. With `quantization_mode: "online"` the file holds bf16 master
weights that are ternarized on the fly (per-tensor absmean), which rarefy does once
at load.

rarefy's decoder covers Llama-family architectures: a checkpoint with this weight
format and model_type llama/mistral/qwen2/qwen3 loads (`load_model`, `rarefy generate`,
`rarefy quantize --to ternary` to repack it losslessly into rarefy's layout). The
BitNet b1.58 2B4T *architecture* (model_type "bitnet": ReLU² MLP, attention and MLP
sub-norms) is not in rarefy's decoder yet; its projections can still be read with
`unpack_bitnet` / `read_bitnet_projection`.
"""

from __future__ import annotations

import json
import os
import re

import torch

from rarefy.errors import RarefyError
from rarefy.lowbit.ternary import check_codes, pack_ternary, quantize_ternary, unpack_ternary

VALUES_PER_BYTE = 4
LINEAR_CLASSES = ("autobitlinear", "bitlinear")
_PROJ = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj$")


def pack_bitnet(values: torch.Tensor) -> torch.Tensor:
    """int [out, in] in {-1, 0, 1} -> uint8 [ceil(out/4), in] in BitNet's layout
    (missing rows of the last group are written as 0)."""
    if values.dim() != 2:
        raise ValueError(f"pack_bitnet packs 2-D tensors, got {tuple(values.shape)}")
    out, cols = values.shape
    r = (out + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE
    codes = torch.ones(VALUES_PER_BYTE * r, cols, dtype=torch.uint8)
    codes[:out] = (values.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros(r, cols, dtype=torch.uint8)
    for i in range(VALUES_PER_BYTE):
        packed |= codes[i * r:(i + 1) * r] << (2 * i)
    return packed


def unpack_bitnet(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """uint8 [R, in] in BitNet's layout -> int8 [out, in] in {-1, 0, 1} (out = 4R by default)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise RarefyError(f"a BitNet packed weight is 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    r = packed.shape[0]
    out = VALUES_PER_BYTE * r if out_features is None else out_features
    if (out + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE != r:
        raise RarefyError(f"a BitNet packed weight of {r} rows cannot hold {out} output rows")
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)], dim=0)[:out]
    if bool((codes == 3).any()):
        raise RarefyError("BitNet packed weight holds the invalid 2-bit code 0b11")
    return codes.view(torch.int8) - 1


def bitnet_multiplier(weight_scale: torch.Tensor, linear_class: str) -> float:
    """The factor s with W = Q * s, from a stored `weight_scale` and the linear class."""
    if weight_scale.numel() != 1:
        raise RarefyError(f"BitNet weight_scale has {weight_scale.numel()} values; one per tensor is supported")
    v = float(weight_scale.float().reshape(-1)[0])
    if not (v > 0 and v == v and v != float("inf")):
        raise RarefyError(f"BitNet weight_scale {v} is not a positive finite number")
    if linear_class == "autobitlinear":
        return v
    if linear_class == "bitlinear":
        return 1.0 / v
    raise RarefyError(f"unknown BitNet linear_class {linear_class!r} (known: {', '.join(LINEAR_CLASSES)})")


def read_bitnet_config(path: str | os.PathLike) -> dict | None:
    """config.json's quantization_config when it is BitNet's (quant_method "bitnet"), else None."""
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None  # the regular loader reports unreadable configs
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitnet":
        return None
    if cfg.get("model_type") == "bitnet":
        raise RarefyError(f"{path} is a BitNet b1.58 model (model_type 'bitnet': ReLU² MLP and sub-norms), an "
                          "architecture rarefy's decoder does not run yet; its packed projections can be read "
                          "with rarefy.lowbit.bitnet_import.read_bitnet_projection")
    linear_class = qc.get("linear_class", "bitlinear")
    if linear_class not in LINEAR_CLASSES:
        raise RarefyError(f"{path}: unknown BitNet linear_class {linear_class!r}")
    mode = qc.get("quantization_mode", "offline")
    if mode not in ("offline", "online"):
        raise RarefyError(f"{path}: unknown BitNet quantization_mode {mode!r}")
    if qc.get("use_rms_norm"):
        raise RarefyError(f"{path}: BitNet layers with use_rms_norm (a norm inside each linear) are not supported")
    return {"linear_class": linear_class, "quantization_mode": mode,
            "modules_to_not_convert": list(qc.get("modules_to_not_convert") or [])}


def read_bitnet_projection(ckpt, name: str, out_features: int, linear_class: str) -> tuple[torch.Tensor, float]:
    """(int8 values [out, in], multiplier s) of module `name` stored in BitNet's packed format."""
    packed = ckpt.load(f"{name}.weight", torch.uint8)
    values = unpack_bitnet(packed, out_features)
    return values, bitnet_multiplier(ckpt.load(f"{name}.weight_scale", torch.float32), linear_class)


def bitnet_plan(path: str | os.PathLike, ckpt, config) -> dict | None:
    """Which projections of a BitNet-format checkpoint are ternary, as a low-bit plan
    (see rarefy.lowbit.checkpoint.build_lowbit_model); None if it is not one."""
    qc = read_bitnet_config(path)
    if qc is None:
        return None
    names = set(ckpt.tensor_names())
    with torch.device("meta"):
        from rarefy.models.llama import DecoderLM
        model = DecoderLM(config)
    modules = {}
    for mod_name, mod in model.named_modules():
        if not _PROJ.match(mod_name) or any(p in mod_name for p in qc["modules_to_not_convert"]):
            continue
        if f"{mod_name}.weight" not in names:
            continue  # the regular missing-tensor check reports it
        if qc["quantization_mode"] == "offline" and f"{mod_name}.weight_scale" not in names:
            raise RarefyError(f"{path}: {mod_name}.weight_scale is missing (BitNet offline checkpoint)")
        modules[mod_name] = {"format": "ternary", "shape": [mod.out_features, mod.in_features],
                             "group_size": None, "act_quant": "int8"}
    if not modules:
        raise RarefyError(f"{path}: quantization_config says BitNet, but no projection is stored packed")
    return {"source": "bitnet", "modules": modules, "bitnet": qc,
            "meta": {"format": "ternary", "group_size": None, "imported_from": "bitnet",
                     "linear_class": qc["linear_class"], "quantization_mode": qc["quantization_mode"]}}


class BitNetTensors:
    """A BitNet-format checkpoint seen with rarefy's tensor names: each ternary module
    `P` exposes `P.weight_ternary` (repacked, lossless) and `P.weight_scale` ([1, 1] fp32
    multiplier) instead of `P.weight` + BitNet's `P.weight_scale`."""

    def __init__(self, ckpt, plan: dict):
        self.ckpt = ckpt
        self.modules = plan["modules"]
        self.linear_class = plan["bitnet"]["linear_class"]
        self.online = plan["bitnet"]["quantization_mode"] == "online"
        self._names = []
        for n in ckpt.tensor_names():
            mod = n.rpartition(".")[0]
            if mod in self.modules:
                if n == f"{mod}.weight":
                    self._names += [f"{mod}.weight_ternary", f"{mod}.weight_scale"]
            else:
                self._names.append(n)
        self._done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._read: dict[str, set] = {}

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def _convert(self, mod: str) -> tuple[torch.Tensor, torch.Tensor]:
        if mod not in self._done:
            out, cols = self.modules[mod]["shape"]
            if self.online:
                tw = quantize_ternary(self.ckpt.load(f"{mod}.weight", torch.float32), None)
                self._done[mod] = (tw.packed, tw.scale)
            else:
                values, s = read_bitnet_projection(self.ckpt, mod, out, self.linear_class)
                if values.shape[1] != cols:
                    raise RarefyError(f"{mod}: BitNet packed weight has {values.shape[1]} columns, "
                                      f"the config expects {cols}")
                self._done[mod] = (pack_ternary(values), torch.tensor([[s]], dtype=torch.float32))
        return self._done[mod]

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        mod, _, leaf = name.rpartition(".")
        if mod in self.modules and leaf in ("weight_ternary", "weight_scale"):
            packed, scale = self._convert(mod)
            read = self._read.setdefault(mod, set())
            read.add(leaf)
            if len(read) == 2:  # both parts handed out: drop the converted copy
                self._done.pop(mod, None)
                self._read.pop(mod)
            return packed if leaf == "weight_ternary" else scale
        return self.ckpt.load(name, dtype)


def codes_equal(packed_rarefy: torch.Tensor, packed_bitnet: torch.Tensor, in_features: int,
                out_features: int) -> bool:
    """Whether a rarefy-layout and a BitNet-layout packed weight hold the same values."""
    check_codes(packed_rarefy)
    return torch.equal(unpack_ternary(packed_rarefy, in_features), unpack_bitnet(packed_bitnet, out_features))
