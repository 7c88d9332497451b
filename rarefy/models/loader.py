"""Load a model and its tokenizer from an HF directory or a GGUF file.

Parameters are created on the meta device and filled one tensor at a time from
memory-mapped files, already cast to the target dtype and device, so peak
memory stays near the model's size in that dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rarefy.config import ModelConfig
from rarefy.errors import RarefyError
from rarefy.models.default_model import default_model_path
from rarefy.models.llama import DecoderLM
from rarefy.tokenizer import Tokenizer

# "fp16w": fp32 compute with fp16-stored linear weights (CPU decode kernel).
DTYPES = {"fp16w": torch.float32, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: DecoderLM
    config: ModelConfig
    tokenizer: Tokenizer | None
    source: str
    checkpoint_format: str  # "hf" or "gguf"


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RarefyError("CUDA was asked for, but no CUDA device is available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise RarefyError(f"unsupported device '{device}' (use cpu or cuda)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise RarefyError(f"unsupported dtype '{dtype}' (use auto, fp32, fp16w, bf16 or fp16)")
    return DTYPES[dtype]


def wants_half_weights(dtype: str | torch.dtype | None, device: torch.device) -> bool:
    """fp16-stored weights: asked for with "fp16w", or the CPU default when the kernel builds."""
    if dtype == "fp16w":
        if device.type != "cpu":
            raise RarefyError("--dtype fp16w is a CPU mode; use bf16 or fp16 on CUDA")
        from rarefy.kernels.gemv_cpu import available
        if not available():
            raise RarefyError("--dtype fp16w needs rarefy's C++ CPU kernel, which could not be "
                              "built here (is a C++ compiler installed?)")
        return True
    if dtype in (None, "auto") and device.type == "cpu":
        from rarefy.kernels.gemv_cpu import available
        return available()
    return False


def wants_gguf_blocks(gguf_blocks: bool | None, fmt: str, dtype, device: torch.device, sparse: str) -> bool:
    """GGUF Q4_0/Q4_1/Q8_0 projections kept as the file's blocks (GGUFLinear): asked for with
    gguf_blocks=True, or (None) the CPU default for GGUF files when dtype is auto and the
    kernel builds. gguf_blocks=False, or dtype="fp16w" / "fp32", gives the dense paths."""
    if gguf_blocks is False or fmt != "gguf":
        return False
    if gguf_blocks is None and (dtype not in (None, "auto") or device.type != "cpu" or sparse in ("on", "force")):
        return False
    if device.type != "cpu":
        raise RarefyError("GGUF blocks kept quantized run on the CPU only; use --dtype bf16 or fp16 on CUDA")
    from rarefy.kernels.lowbit_cpu import available
    if available():
        return True
    if gguf_blocks:
        raise RarefyError("GGUF blocks kept quantized need rarefy's C++ CPU kernels, which could not be "
                          "built here (is a C++ compiler installed?)")
    return False


def is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def open_checkpoint(path: str):
    """Returns (format, config, checkpoint) where checkpoint has tensor_names() and load()."""
    if os.path.isdir(path):
        from rarefy.models.safetensors_dir import SafetensorsCheckpoint
        return "hf", ModelConfig.from_hf_dir(path), SafetensorsCheckpoint(path)
    if not os.path.exists(path):
        raise RarefyError(f"model not found: {path}")
    if not is_gguf(path):
        raise RarefyError(f"{path} is neither an HF checkpoint directory nor a GGUF file")
    from rarefy.models.gguf_file import GGUFCheckpoint
    ckpt = GGUFCheckpoint(path)
    return "gguf", ModelConfig.from_hf(ckpt.config_dict), ckpt


def load_model(path: str | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = "auto", with_tokenizer: bool = True,
               progress: bool = False, sparse: str = "off", gguf_blocks: bool | None = None) -> LoadedModel:
    """Load a checkpoint (HF directory, rarefy-pruned directory or GGUF file; None = the
    embedded model). ``sparse``: "off" (the default here; the CLI passes "auto") keeps every
    layer dense; "auto" runs the projections of a checkpoint written by
    ``rarefy prune`` through SparseLinear (compiled and autotuned per matrix, dense where
    sparse measured slower); "on" does so for any checkpoint; "force" makes every sparse
    enough projection sparse without timing (fewest bytes wins). Low-bit
    checkpoints (`rarefy quantize`, BitNet-packed) load as TernaryLinear / Int8Linear; sparse
    int8 ones (`rarefy quantize --to int8` of a pruned model) as SparseLinear(Int8TiledBitmap).

    GGUF files on the CPU with dtype "auto" keep their Q4_0/Q4_1/Q8_0 projections (and lm_head)
    as the file's blocks (GGUFLinear, the C++ kernels on the raw bytes; q/k/v and gate/up
    stacked): ``gguf_blocks`` None = that default, False = the dense paths (dtype "auto" then
    means fp16w, as before), True = insist. dtype "fp16w" or "fp32" also gives the dense path."""
    if sparse not in ("auto", "on", "force", "off"):
        raise RarefyError(f"--sparse must be auto, on, force or off, got {sparse!r}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = str(path) if path is not None else default_model_path()
    from rarefy.lowbit.composed import load_sparse_int8, sparse_int8_plan
    if sparse_int8_plan(path) is not None:  # before open_checkpoint, which refuses its quantization_config
        return load_sparse_int8(path, dev, dtype, with_tokenizer=with_tokenizer, progress=progress)
    from rarefy.lowbit.checkpoint import lowbit_plan
    lowbit = lowbit_plan(path)  # config.json's metadata: rarefy low-bit or BitNet-packed weights
    fmt, cfg, ckpt = open_checkpoint(path)

    if lowbit is not None:
        from rarefy.lowbit.checkpoint import build_lowbit_model
        model = build_lowbit_model(cfg, ckpt, dev, dt, lowbit, progress, source=path)
        if wants_half_weights(dtype, dev):  # the projections left dense (lm_head, skipped)
            from rarefy.layers.half_weight_linear import use_half_weights
            use_half_weights(model)
    elif wants_gguf_blocks(gguf_blocks, fmt, dtype, dev, sparse) and has_gguf_blocks(ckpt):
        model = build_gguf_blocks_model(cfg, ckpt, dev, dt, progress, source=path)
    elif wants_half_weights(dtype, dev):
        from rarefy.layers.half_weight_linear import is_projection_weight, use_half_weights
        # projections are read straight into fp16, so no fp32 copy of them ever exists
        model = build_model(cfg, ckpt, dev, dt, progress, source=path,
                            dtype_of=lambda n: torch.float16 if is_projection_weight(n) else dt)
        use_half_weights(model)
    else:
        model = build_model(cfg, ckpt, dev, dt, progress, source=path)
    if sparse in ("on", "force") or (sparse == "auto" and is_pruned_checkpoint(path)):
        from rarefy.layers.sparse_linear import use_sparse_weights
        use_sparse_weights(model, progress=progress, autotune=sparse != "force")
    tokenizer = load_tokenizer(path, fmt, cfg, ckpt) if with_tokenizer else None
    return LoadedModel(model, cfg, tokenizer, path, fmt)


def is_pruned_checkpoint(path: str) -> bool:
    """Whether `path` was written by ``rarefy prune`` with compressed (sparse) weights."""
    from rarefy.models.safetensors_dir import read_rarefy_metadata
    meta = read_rarefy_metadata(path)
    return bool(meta) and meta.get("weights_format") == "sparse-bitmask"


def build_gguf_blocks_model(cfg: ModelConfig, ckpt, device: torch.device, dtype: torch.dtype,
                            progress: bool = False, source: str = "checkpoint") -> DecoderLM:
    """A DecoderLM from a GGUF checkpoint whose block-quantized projections (and lm_head) are
    GGUFLinear layers on the file's bytes, q/k/v and gate/up stacked; their weights are never
    dequantized (the other tensors load as `build_model` loads them)."""
    from rarefy.kernels.lowbit_cpu import QTYPES
    from rarefy.kernels.lowbit_cpu.gguf_linear import fuse_gguf_projections, use_gguf_blocks

    def blocks(name: str) -> bool:
        return name.endswith("_proj.weight") and ckpt._tensor(name).tensor_type.name in QTYPES

    model = build_model(cfg, ckpt, device, dtype, progress, source, skip=blocks)
    use_gguf_blocks(model, ckpt)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # cannot happen: every skipped weight is a block type use_gguf_blocks takes
        raise RarefyError(f"{source}: {left[0]} was neither loaded nor kept as GGUF blocks")
    fuse_gguf_projections(model)
    return model


def has_gguf_blocks(ckpt) -> bool:
    """Whether a GGUF checkpoint stores any projection as Q4_0/Q4_1/Q8_0 blocks."""
    from rarefy.kernels.lowbit_cpu import QTYPES
    return any(n.endswith("_proj.weight") and ckpt._tensor(n).tensor_type.name in QTYPES
               for n in ckpt.tensor_names())


def build_model(cfg: ModelConfig, ckpt, device: torch.device, dtype: torch.dtype,
                progress: bool = False, source: str = "checkpoint",
                dtype_of: Callable[[str], torch.dtype] | None = None,
                skip: Callable[[str], bool] | None = None) -> DecoderLM:
    """A DecoderLM whose parameters are streamed from `ckpt` (anything with
    tensor_names() and load(name, dtype)), one tensor at a time; `dtype_of(name)`
    overrides `dtype` per tensor; parameters for which `skip(name)` is true stay on the
    meta device (the caller replaces their modules)."""
    with torch.device("meta"):
        model = DecoderLM(cfg)
    expected = dict(model.named_parameters())  # tied weights appear once
    available = set(ckpt.tensor_names())
    missing = [n for n in expected if n not in available]
    if missing:
        raise RarefyError(f"{source} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    names = list(expected)
    if progress:
        from tqdm import tqdm
        names = tqdm(names, desc="loading", unit="tensor", leave=False)
    for name in names:
        if skip is not None and skip(name):
            continue
        t = ckpt.load(name, dtype_of(name) if dtype_of else dtype)
        if tuple(t.shape) != tuple(expected[name].shape):
            raise RarefyError(f"tensor {name} has shape {tuple(t.shape)}, "
                              f"config expects {tuple(expected[name].shape)}")
        _set_parameter(model, name, t.to(device))
        del t
    model.tie_weights()
    model.rotary.build(device)
    return model.eval()


class StateDictCheckpoint:
    """An in-memory state dict seen as a checkpoint (benchmarks, tests)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.tensors[name].to(dtype)


def load_tokenizer(path: str, fmt: str, cfg: ModelConfig, ckpt) -> Tokenizer:
    if fmt == "hf":
        return Tokenizer.from_hf_dir(path, eos_token_ids=cfg.eos_token_ids)
    from tokenizers import Tokenizer as HFTokenizer
    eos = ckpt.eos_token_id
    return Tokenizer(HFTokenizer.from_str(ckpt.tokenizer_json()), bos_token_id=ckpt.bos_token_id,
                     eos_token_ids=cfg.eos_token_ids or (() if eos is None else (eos,)),
                     add_bos=ckpt.add_bos_token, chat_template=ckpt.chat_template)


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    setattr(module, leaf, nn.Parameter(value, requires_grad=False))
