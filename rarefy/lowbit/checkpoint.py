"""Save and load models with TernaryLinear / Int8Linear projections.

A low-bit checkpoint is an HF-style directory (config.json, model.safetensors or
shards + index, tokenizer files) in which each quantized projection `P` is stored as

    ternary: P.weight_ternary uint8 [out, ceil(in/4)] + P.weight_scale float [1, 1] / [out, in/G]
    int8:    P.weight_int8    int8  [out, in]          + P.weight_scale float [out, 1] / [out, in/G]

(+ P.bias when the layer has one), everything else as in the source. What each
module is — format, shape, group size, activation quantization — is written in
config.json under "rarefy" -> "lowbit"; the loader reads it from there, never from
tensor or file names. Writes are atomic (a temp directory renamed into place) and
never touch the input. Layout and keys: docs/lowbit-formats.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rarefy.errors import RarefyError
from rarefy.formats.checkpoint import DEFAULT_SHARD_SIZE, ShardWriter, base_config, prepare_save, rarefy_header
from rarefy.layers.lowbit_linear import LOWBIT_CLASSES, MODES, is_lowbit, set_lowbit_mode
from rarefy.lowbit import ternary
from rarefy.models.safetensors_dir import read_rarefy_metadata

__all__ = ["save_lowbit", "lowbit_plan", "build_lowbit_model", "read_lowbit_metadata",
           "LOWBIT_FORMAT_VERSION", "default_mode"]

LOWBIT_FORMAT_VERSION = 1  # the "lowbit" metadata block
WEIGHTS_FORMAT = "lowbit"
_PART_DTYPES = {"weight_ternary": torch.uint8, "weight_int8": torch.int8}
MODE_ENV = "RAREFY_LOWBIT_MODE"


def default_mode() -> str:
    """The mode low-bit layers load in: $RAREFY_LOWBIT_MODE, else "cache"."""
    mode = os.environ.get(MODE_ENV, "cache")
    if mode not in MODES:
        raise RarefyError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


# -- saving ----------------------------------------------------------------------------

def module_specs(model: nn.Module) -> dict[str, dict]:
    """{module name: {format, shape, group_size, act_quant, scale_dtype}} of the low-bit layers."""
    specs = {}
    for name, m in model.named_modules():
        if is_lowbit(m):
            specs[name] = {"format": m.fmt, "shape": [m.out_features, m.in_features],
                           "group_size": m.group_size, "act_quant": m.act_quant,
                           "scale_dtype": str(m.weight_scale.dtype).removeprefix("torch.")}
    return specs


def _state_tensors(model: nn.Module, specs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Persistent tensors by HF name (tied lm_head once), checked against DecoderLM's names."""
    from rarefy.models.llama import DecoderLM
    cfg = model.config
    with torch.device("meta"):
        expected = set(DecoderLM(cfg).state_dict())
    for name, spec in specs.items():
        if f"{name}.weight" not in expected:
            raise RarefyError(f"low-bit module {name} has no HF name; save before fuse_projections()")
        expected.discard(f"{name}.weight")
        expected |= {f"{name}.weight_scale", f"{name}.{'weight_ternary' if spec['format'] == 'ternary' else 'weight_int8'}"}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    tensors = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[name] = t.detach()
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise RarefyError(f"the model's tensors do not have HF names (e.g. {odd[0]}); "
                          "save before fuse_projections() or other layer swaps")
    return tensors


def save_lowbit(model: nn.Module, out_dir: str | os.PathLike, *,
                source_path: str | os.PathLike | None = None, config_dict: dict | None = None,
                tokenizer_files_from=None, lowbit_meta: dict | None = None,
                dtype: torch.dtype | None = None, overwrite: bool = False,
                shard_size_bytes: int = DEFAULT_SHARD_SIZE) -> dict:
    """Write `model` (a DecoderLM with low-bit projections) to `out_dir`; returns a summary.

    source_path: the checkpoint it came from (HF dir or .gguf), never written to; it
        gives the config and tokenizer unless config_dict / tokenizer_files_from do.
    lowbit_meta: facts about the quantization (format, group_size, skip patterns,
        skipped modules, ...) stored under config.json["rarefy"]["lowbit"].
    dtype: cast the dense floating tensors (embeddings, norms, skipped projections) to
        it; packed weights and scales are saved as they are.
    overwrite: replace a non-empty out_dir (never when it is or holds the source).
    """
    io = prepare_save(out_dir, source_path, overwrite=overwrite, shard_size_bytes=shard_size_bytes,
                      config_dict=config_dict, tokenizer_files_from=tokenizer_files_from, meta=lowbit_meta,
                      meta_name="lowbit_meta")
    specs = module_specs(model)
    tensors = _state_tensors(model, specs)
    stats = io.write(lambda tmp: _write_weights(tmp, tensors, specs, shard_size_bytes, dtype),
                     lambda stats: _final_config(io.cfg, stats, specs, io.source, io.meta))
    return {"out_dir": str(io.out), "files": stats["files"], "bytes": stats["bytes"],
            "lowbit_bytes": stats["lowbit_bytes"], "lowbit_bf16_bytes": stats["lowbit_bf16_bytes"],
            "lowbit_modules": len(specs)}


def _low_bit_part(name: str, specs: dict) -> bool:
    mod, _, leaf = name.rpartition(".")
    return mod in specs and leaf in ("weight_ternary", "weight_int8", "weight_scale")


def _write_weights(tmp: Path, tensors: dict[str, torch.Tensor], specs: dict, shard_size: int,
                   dtype: torch.dtype | None) -> dict:
    """Shards with the parts of one module together; dense floats cast one at a time."""
    groups: dict[str, list[str]] = {}
    for name in tensors:  # group by module, in state_dict order
        mod = name.rpartition(".")[0] if _low_bit_part(name, specs) or name.rpartition(".")[0] in specs else name
        groups.setdefault(mod, []).append(name)
    shards = ShardWriter(tmp, shard_size, {"format": "pt", "rarefy_lowbit_layout": str(ternary.LAYOUT_VERSION)})
    dtypes: set[str] = set()
    lowbit_bytes = lowbit_bf16 = 0

    for mod, names in groups.items():
        part = {}
        for name in names:
            t = tensors[name]
            if not _low_bit_part(name, specs) and t.is_floating_point():
                if dtype is not None:
                    t = t.to(dtype)
                dtypes.add(str(t.dtype).removeprefix("torch."))
            part[name] = t.cpu().contiguous()
        if mod in specs:
            out_f, in_f = specs[mod]["shape"]
            lowbit_bf16 += out_f * in_f * 2  # what the matrix would cost in bf16
            lowbit_bytes += sum(v.numel() * v.element_size() for k, v in part.items() if _low_bit_part(k, specs))
        shards.add(part)
    names = shards.finish()
    return {"files": names, "bytes": shards.total, "lowbit_bytes": lowbit_bytes, "lowbit_bf16_bytes": lowbit_bf16,
            "dtypes": dtypes}


def _final_config(cfg: dict, stats: dict, specs: dict, source: Path | None, meta: dict) -> dict:
    cfg = base_config(cfg, stats["dtypes"])
    formats = sorted({s["format"] for s in specs.values()})
    lowbit = {
        "format_version": LOWBIT_FORMAT_VERSION,
        "layout_version": ternary.LAYOUT_VERSION,
        "format": formats[0] if len(formats) == 1 else ("mixed" if formats else None),
        **{k: v for k, v in meta.items() if k not in ("format_version", "layout_version", "modules")},
        "modules": specs,
    }
    cfg["rarefy"] = {
        **rarefy_header(source, WEIGHTS_FORMAT),
        "lowbit": lowbit,
        "measured": {"lowbit_modules": len(specs), "bytes": stats["bytes"],
                     "lowbit_bytes": stats["lowbit_bytes"], "lowbit_bf16_bytes": stats["lowbit_bf16_bytes"]},
    }
    return cfg


# -- loading ---------------------------------------------------------------------------

def read_lowbit_metadata(path: str | os.PathLike) -> dict | None:
    """config.json["rarefy"]["lowbit"] of a rarefy low-bit checkpoint, else None."""
    meta = read_rarefy_metadata(path)
    if not meta or meta.get("weights_format") != WEIGHTS_FORMAT:
        return None
    lowbit = meta.get("lowbit")
    if not isinstance(lowbit, dict) or not isinstance(lowbit.get("modules"), dict):
        raise RarefyError(f"{path}: config.json says low-bit weights but has no rarefy.lowbit.modules table")
    if int(lowbit.get("format_version", 0)) > LOWBIT_FORMAT_VERSION or \
            int(lowbit.get("layout_version", 0)) > ternary.LAYOUT_VERSION:
        raise RarefyError(f"{path} was written by a newer rarefy (low-bit format "
                          f"{lowbit.get('format_version')}, layout {lowbit.get('layout_version')}); "
                          f"this one reads format {LOWBIT_FORMAT_VERSION}, layout {ternary.LAYOUT_VERSION}")
    return lowbit


def lowbit_plan(path: str | os.PathLike) -> dict | None:
    """What `load_model` needs to know about a low-bit checkpoint directory — a rarefy one
    or one in BitNet's packed format — or None for anything else. Reads config.json only."""
    if not os.path.isdir(os.fspath(path)):
        return None
    lowbit = read_lowbit_metadata(path)
    if lowbit is not None:
        return {"source": "rarefy", "modules": lowbit["modules"], "meta": lowbit}
    from rarefy.lowbit.bitnet_import import read_bitnet_config
    if read_bitnet_config(path) is not None:
        return {"source": "bitnet"}  # modules are found once the tensors are open
    return None


def _check_spec(name: str, spec: dict, dense: nn.Module, source: str) -> None:
    fmt = spec.get("format") if isinstance(spec, dict) else None
    if fmt not in LOWBIT_CLASSES:
        raise RarefyError(f"{source}: module {name} has unknown low-bit format {fmt!r}")
    shape = [dense.out_features, dense.in_features]
    if list(spec.get("shape") or []) != shape:
        raise RarefyError(f"{source}: module {name} is {spec.get('shape')} in the metadata, "
                          f"the config expects {shape}")
    g = spec.get("group_size")
    if g is not None:
        if not isinstance(g, int) or g <= 0 or shape[1] % g or (fmt == "ternary" and g % 4):
            raise RarefyError(f"{source}: module {name} has an invalid group size {g!r}")
    if spec.get("act_quant") not in (None, "int8"):
        raise RarefyError(f"{source}: module {name} has unknown act_quant {spec.get('act_quant')!r}")


def build_lowbit_model(cfg, ckpt, device: torch.device, dtype: torch.dtype, plan: dict,
                       progress: bool = False, source: str = "checkpoint", mode: str | None = None):
    """A DecoderLM whose projections listed in `plan` are TernaryLinear / Int8Linear,
    streamed from `ckpt` one tensor at a time; packed weights keep their integer dtype,
    scales fp32, everything else `dtype`. `mode` (default `default_mode()`)."""
    from rarefy.layers.linear import DenseLinear
    from rarefy.models.llama import DecoderLM
    from rarefy.models.loader import _set_parameter

    mode = mode or default_mode()
    if plan["source"] == "bitnet":
        from rarefy.lowbit.bitnet_import import BitNetTensors, bitnet_plan
        plan = bitnet_plan(source, ckpt, cfg)
        ckpt = BitNetTensors(ckpt, plan)
    with torch.device("meta"):
        model = DecoderLM(cfg)
    for name, spec in plan["modules"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            dense = None
        if not isinstance(dense, DenseLinear):
            raise RarefyError(f"{source}: low-bit module {name} is not a projection of this model")
        if name == "lm_head" and cfg.tie_word_embeddings:
            raise RarefyError(f"{source}: lm_head is low-bit but tied to the embeddings")
        _check_spec(name, spec, dense, source)
        with torch.device("meta"):
            new = LOWBIT_CLASSES[spec["format"]](dense.in_features, dense.out_features, spec.get("group_size"),
                                                 dense.bias is not None, spec.get("act_quant"))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)

    params = dict(model.named_parameters())
    expected = [n for n in model.state_dict() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    available = set(ckpt.tensor_names())
    missing = [n for n in expected if n not in available]
    if missing:
        raise RarefyError(f"{source} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    shapes = model.state_dict()
    names = expected
    if progress:
        from tqdm import tqdm
        names = tqdm(names, desc="loading", unit="tensor", leave=False)
    for name in names:
        mod, _, leaf = name.rpartition(".")
        lowbit = mod in plan["modules"]
        if lowbit and leaf in _PART_DTYPES:
            t = ckpt.load(name, _PART_DTYPES[leaf])
            if t.dtype != _PART_DTYPES[leaf]:
                raise RarefyError(f"{source}: {name} is {t.dtype}, expected {_PART_DTYPES[leaf]}")
            if leaf == "weight_ternary":
                ternary.check_codes(t, name)
        elif lowbit and leaf == "weight_scale":
            t = ckpt.load(name, torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise RarefyError(f"{source}: {name} holds NaN or inf")
        else:
            t = ckpt.load(name, dtype)
        if tuple(t.shape) != tuple(shapes[name].shape):
            raise RarefyError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shapes[name].shape)}")
        if name in params:
            _set_parameter(model, name, t.to(device))
        else:
            model.get_submodule(mod).register_buffer(leaf, t.to(device))
        del t
    model.tie_weights()
    model.rotary.build(device)
    set_lowbit_mode(model, mode, dtype)
    return model.eval()
