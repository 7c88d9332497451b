"""Low-bit weights composed with sparsity.

Sparse + int8: a pruned model's projections quantized to int8 per output row (symmetric,
from the kept values) and kept in the bitmap layout (``Int8TiledBitmap``), run by
``SparseLinear`` (C++ ``bitmap_matmul_int8`` on CPU, ``triton_bitmap_int8`` on CUDA).

    quantize_sparse_int8(model, skip)     DenseLinear projections -> SparseLinear(Int8TiledBitmap)
    save: rarefy.formats.sparse_int8_checkpoint.save_sparse_int8
    sparse_int8_plan(path)                 the checkpoint's "sparse_int8" metadata, or None
    load_sparse_int8(path, device, dtype)  -> LoadedModel (what load_model returns)

``rarefy.models.loader.load_model`` calls ``load_sparse_int8`` when ``sparse_int8_plan(path)``
finds this metadata (before it opens the checkpoint, whose quantization_config it would refuse).

Ternary + activation sparsity: ``use_ternary_activation_sparsity`` (rarefy/layers/
ternary_activation_sparse.py) and the transposed layout T1 below.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from rarefy.errors import RarefyError

__all__ = ["SparseInt8Report", "quantize_sparse_int8", "sparse_int8_plan", "load_sparse_int8",
           "SPARSE_MIN_SPARSITY"]

# Below this fraction of zeros a projection is still stored sparse, with a warning: the
# bitmap costs 1/8 B per weight on top of the values (dense int8 is 1 B).
SPARSE_MIN_SPARSITY = 0.125


@dataclass
class SparseInt8Report:
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    density: dict[str, float] = field(default_factory=dict)


def _projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from rarefy.layers.half_weight_linear import HalfWeightLinear
    from rarefy.layers.linear import DenseLinear
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (DenseLinear, HalfWeightLinear))]


def quantize_sparse_int8(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), progress: bool = False,
                         tile_k: int | None = None) -> SparseInt8Report:
    """Replace every projection not matching a `skip` fnmatch pattern by a SparseLinear over
    an Int8TiledBitmap of its weight (per-row symmetric int8 of the kept values), in place.
    The dense weight is freed as each layer is converted."""
    from rarefy.formats.sparse_weight import DEFAULT_TILE_K, Int8TiledBitmap
    from rarefy.layers.sparse_linear import SparseLinear

    cfg = getattr(model, "config", None)
    rep = SparseInt8Report()
    todo = []
    for name, m in _projections(model):
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            rep.skipped.append(name)
        elif name == "lm_head" and cfg is not None and cfg.tie_word_embeddings:
            rep.skipped.append(name)  # tied to the embeddings: stays dense
        else:
            todo.append((name, m))
    if not todo:
        raise RarefyError("no projection left to quantize (every one matches --skip)")
    it = todo
    if progress:
        from tqdm import tqdm
        it = tqdm(todo, desc="sparse int8", unit="matrix", leave=False)
    for name, m in it:
        w = m.weight.detach().float()
        q8 = Int8TiledBitmap.from_dense(w, tile_k or DEFAULT_TILE_K)
        sparsity = 1.0 - float((w != 0).sum()) / max(1, w.numel())
        if sparsity < SPARSE_MIN_SPARSITY:
            rep.warnings.append(f"{name} is only {100 * sparsity:.1f}% sparse; its bitmap int8 form "
                                f"({q8.nbytes} B) is larger than dense int8 ({q8.dense_nbytes} B)")
        rep.density[name] = q8.nnz / max(1, w.numel())
        bias = None if m.bias is None else m.bias.detach().float()
        new = SparseLinear(q8.to(w.device), bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        rep.quantized.append(name)
    return rep


# -- loading ---------------------------------------------------------------------------

def sparse_int8_plan(path: str | os.PathLike | None) -> dict | None:
    """config.json["rarefy"]["sparse_int8"] of a sparse + int8 checkpoint, else None."""
    from rarefy.formats.sparse_int8_checkpoint import SPARSE_INT8_FORMAT, SPARSE_INT8_VERSION
    from rarefy.models.safetensors_dir import read_rarefy_metadata
    if path is None or not os.path.isdir(os.fspath(path)):
        return None
    meta = read_rarefy_metadata(path)
    if not meta or meta.get("weights_format") != SPARSE_INT8_FORMAT:
        return None
    plan = meta.get("sparse_int8")
    if not isinstance(plan, dict) or not isinstance(plan.get("modules"), dict):
        raise RarefyError(f"{path}: config.json says sparse int8 weights but has no rarefy.sparse_int8.modules table")
    if int(plan.get("format_version", 0)) > SPARSE_INT8_VERSION:
        raise RarefyError(f"{path} was written by a newer rarefy (sparse int8 format {plan.get('format_version')}; "
                          f"this one reads {SPARSE_INT8_VERSION})")
    return plan


class _Tensors:
    """The stored tensors of a checkpoint directory (one file or shards + index), by stored name."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        try:
            if os.path.isfile(index):
                with open(index) as f:
                    self.file_of = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
            elif os.path.isfile(single):
                with safe_open(single, framework="pt") as f:
                    self.file_of = {k: single for k in f.keys()}
            else:
                raise RarefyError(f"no model.safetensors or model.safetensors.index.json in {path}")
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise RarefyError(f"cannot read the tensors of {path}: {e}") from None
        self._h = {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        try:
            if file not in self._h:
                self._h[file] = safe_open(file, framework="pt")
            return self._h[file].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise RarefyError(f"cannot read tensor {name} from {file}: {e}") from None


def load_sparse_int8(path: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype | None = "auto", with_tokenizer: bool = True,
                     progress: bool = False):
    """Load a checkpoint written by `save_sparse_int8`: its sparse int8 projections as
    SparseLinear(Int8TiledBitmap) on `device`, everything else in `dtype` (as load_model
    resolves it; on CPU the projections left dense, e.g. lm_head, are stored fp16 when
    rarefy's fp16-weight kernel builds, as load_model does). Returns a LoadedModel."""
    from rarefy.config import ModelConfig
    from rarefy.formats.sparse_bitmask import SUFFIXES, decode_bitmask
    from rarefy.formats.sparse_weight import Int8TiledBitmap
    from rarefy.layers.linear import DenseLinear
    from rarefy.layers.sparse_linear import SparseLinear
    from rarefy.models.llama import DecoderLM
    from rarefy.models.loader import LoadedModel, _set_parameter, resolve_device, resolve_dtype, wants_half_weights
    from rarefy.tokenizer import Tokenizer

    path = os.fspath(path)
    plan = sparse_int8_plan(path)
    if plan is None:
        raise RarefyError(f"{path} is not a sparse int8 checkpoint")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = ModelConfig.from_hf_dir(path)
    store = _Tensors(path)
    with torch.device("meta"):
        model = DecoderLM(cfg)
    mods = plan["modules"]
    for name, spec in mods.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            dense = None
        if not isinstance(dense, DenseLinear):
            raise RarefyError(f"{path}: sparse int8 module {name} is not a projection of this model")
        shape = [dense.out_features, dense.in_features]
        if list(spec.get("shape") or []) != shape:
            raise RarefyError(f"{path}: module {name} is {spec.get('shape')} in the metadata, the config expects {shape}")
    names = [n for n in model.state_dict() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if progress:
        from tqdm import tqdm
        names = tqdm(names, desc="loading", unit="tensor", leave=False)
    half = wants_half_weights(dtype, dev)
    for name in names:
        mod, _, leaf = name.rpartition(".")
        if mod in mods and leaf == "weight":
            parts = {}
            for s in SUFFIXES + ("weight_scale",):
                if f"{mod}.{s}" not in store:
                    raise RarefyError(f"{path} lacks tensor {mod}.{s}")
                parts[s] = store.get(f"{mod}.{s}")
            if parts["compressed"].dtype != torch.int8:
                raise RarefyError(f"{path}: {mod}.compressed is {parts['compressed'].dtype}, expected int8")
            q = decode_bitmask(parts, f"{mod}.weight")
            scale = parts["weight_scale"].to(torch.float32)
            if tuple(q.shape) != tuple(mods[mod]["shape"]) or scale.numel() != q.shape[0]:
                raise RarefyError(f"{path}: {mod} has Q {tuple(q.shape)} and {scale.numel()} scales, "
                                  f"expected {tuple(mods[mod]['shape'])}")
            if not bool(torch.isfinite(scale).all()):
                raise RarefyError(f"{path}: {mod}.weight_scale holds NaN or inf")
            w = Int8TiledBitmap.from_quantized(q, scale).to(dev)
            bias = None
            if f"{mod}.bias" in store:
                bias = store.get(f"{mod}.bias").to(dt).to(dev)
            new = SparseLinear(w, bias)
            parent, _, child = mod.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            continue
        if mod in mods and leaf == "bias":
            continue  # read with its module's weight
        if name not in store:
            raise RarefyError(f"{path} lacks tensor {name}")
        tdt = torch.float16 if half and (name.endswith("_proj.weight") or name == "lm_head.weight") else dt
        t = store.get(name).to(tdt)
        expected = model.get_parameter(name).shape if name in dict(model.named_parameters()) else None
        if expected is not None and tuple(t.shape) != tuple(expected):
            raise RarefyError(f"tensor {name} has shape {tuple(t.shape)}, config expects {tuple(expected)}")
        _set_parameter(model, name, t.to(dev))
    model.tie_weights()
    model.rotary.build(dev)
    if half:
        from rarefy.layers.half_weight_linear import use_half_weights
        use_half_weights(model)
    model.eval()
    tokenizer = Tokenizer.from_hf_dir(path, eos_token_ids=cfg.eos_token_ids) if with_tokenizer else None
    return LoadedModel(model, cfg, tokenizer, path, "hf")


# -- ternary + activation sparsity: the transposed layout (T1) --------------------------

def pack_ternary_t(codes: torch.Tensor) -> torch.Tensor:
    """int [N, K] in {-1, 0, 1} (HF layout [out, in]) -> uint8 [K, ceil(N/4)], layout T1:
    byte p of row i = c(4p, i) | c(4p+1, i) << 2 | c(4p+2, i) << 4 | c(4p+3, i) << 6 with
    c = value + 1 (0b00 = -1, 0b01 = 0, 0b10 = +1), i.e. layout v1 of the transposed matrix;
    padding outputs past N hold value 0 (code 0b01)."""
    from rarefy.lowbit.ternary import pack_ternary
    if codes.dim() != 2:
        raise RarefyError(f"pack_ternary_t packs 2-D tensors, got shape {tuple(codes.shape)}")
    return pack_ternary(codes.t())


def unpack_ternary_t(wt: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [K, ceil(N/4)] (layout T1) -> int8 [N, K] in {-1, 0, 1}."""
    from rarefy.lowbit.ternary import unpack_ternary
    return unpack_ternary(wt, n).t().contiguous()


def transpose_packed(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Layout v1 uint8 [N, ceil(K/4)] (TernaryLinear.weight_ternary) -> layout T1 [K, ceil(N/4)]."""
    from rarefy.lowbit.ternary import unpack_ternary
    return pack_ternary_t(unpack_ternary(packed.cpu(), k)).to(packed.device)
