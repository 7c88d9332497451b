"""Swap a model's dense projections for TernaryLinear / Int8Linear, in place."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from rarefy.errors import RarefyError
from rarefy.layers.linear import DenseLinear
from rarefy.layers.lowbit_linear import LOWBIT_CLASSES, is_lowbit

FORMATS = tuple(LOWBIT_CLASSES)
# Embeddings are not linear layers and are never quantized; lm_head is skipped by default.
DEFAULT_SKIP = ("lm_head",)
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class QuantizeReport:
    fmt: str
    group_size: int | None
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # dense projections left dense by `skip`
    kept: list[str] = field(default_factory=list)  # already low-bit: left as they are
    warnings: list[str] = field(default_factory=list)
    bytes_before: int = 0  # dense bytes of the quantized projections
    bytes_after: int = 0  # their packed weights + scales


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise RarefyError(f"unknown --to {fmt!r}: use {' or '.join(FORMATS)}")
    return fmt


def scale_dtype_of(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.float16):
            raise RarefyError(f"scales are stored as fp32 or fp16, not {name}")
        return name
    if name not in DTYPE_NAMES:
        raise RarefyError(f"unsupported scale dtype {name!r} (use fp32 or fp16)")
    return DTYPE_NAMES[name]


def _linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Projections by HF module name: dense ones and those already low-bit."""
    from rarefy.layers.half_weight_linear import HalfWeightLinear
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (DenseLinear, HalfWeightLinear)) or is_lowbit(m)]


def plan_quantization(model: nn.Module, fmt: str, group_size: int | None,
                      skip: tuple[str, ...] = DEFAULT_SKIP) -> QuantizeReport:
    """Check everything (format, group size against every target's in-features, skip
    patterns) before any weight is touched; returns the report with the targets."""
    check_format(fmt)
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise RarefyError(f"--group-size must be a positive integer, got {group_size!r}")
    if any(not isinstance(p, str) or not p for p in skip):
        raise RarefyError("--skip patterns must be non-empty strings")
    rep = QuantizeReport(fmt, group_size)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, mod in _linears(model):
        if is_lowbit(mod):
            rep.kept.append(name)
        elif any(fnmatch.fnmatchcase(name, p) for p in skip):
            rep.skipped.append(name)
        elif name == "lm_head" and tied:
            rep.skipped.append(name)
            rep.warnings.append("lm_head shares its matrix with the token embeddings (tied); it stays dense")
        else:
            rep.quantized.append(name)
    if not _linears(model):
        raise RarefyError("the model has no linear projections to quantize")
    for p in skip:
        if not any(fnmatch.fnmatchcase(n, p) for n, _ in _linears(model)):
            rep.warnings.append(f"--skip {p} matches no linear module (names look like "
                                "model.layers.0.self_attn.q_proj, model.layers.*.mlp.down_proj, lm_head)")
    if rep.kept:
        rep.warnings.append(f"{len(rep.kept)} projection(s) are already low-bit and are kept as they are")
    if group_size is not None:
        mods = dict(model.named_modules())
        for name in rep.quantized:
            k = mods[name].in_features
            if k % group_size:
                raise RarefyError(f"--group-size {group_size} does not divide the in-features {k} of {name}")
        if fmt == "ternary" and group_size % 4:
            raise RarefyError(f"ternary --group-size {group_size} is not a multiple of 4 "
                              "(each packed byte must lie in one group)")
    if not rep.quantized:
        rep.warnings.append("nothing to quantize: every projection is skipped or already low-bit")
    return rep


def quantize_model(model: nn.Module, fmt: str, group_size: int | None = None,
                   skip: tuple[str, ...] = DEFAULT_SKIP, scale_dtype: str | torch.dtype = "fp32",
                   progress: bool = False) -> QuantizeReport:
    """Replace each targeted projection by a TernaryLinear / Int8Linear (reference mode).

    fmt: "ternary" (BitNet b1.58 absmean; group_size None = per tensor) or "int8"
    (symmetric; group_size None = per output channel). skip: fnmatch patterns on module
    names left dense. A tied lm_head always stays dense."""
    sd = scale_dtype_of(scale_dtype)
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    rep = plan_quantization(model, fmt, group_size, skip)
    cls = LOWBIT_CLASSES[fmt]
    names = rep.quantized
    if progress and names:
        from tqdm import tqdm
        names = tqdm(names, desc=f"quantizing to {fmt}", unit="matrix", leave=False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, child)
        w = dense.weight
        rep.bytes_before += w.numel() * w.element_size()
        new = cls.from_dense(dense, group_size, sd)
        rep.bytes_after += sum(b.numel() * b.element_size() for n, b in new.named_buffers()
                               if n != "weight_cache")
        setattr(parent, child, new)
    return rep
