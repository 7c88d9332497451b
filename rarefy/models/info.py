"""`rarefy info`: architecture, parameter counts and bytes per component."""

from __future__ import annotations

from collections import defaultdict

import torch

from rarefy.models.default_model import default_model_path
from rarefy.models.llama import DecoderLM
from rarefy.models.loader import open_checkpoint, resolve_dtype

SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1,
                     "F8_E4M3": 1, "F8_E5M2": 1, "I32": 4, "I64": 8}


def component_of(name: str) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norms"


def stored_bytes(dtype_name: str, numel: int) -> int | None:
    """Bytes a tensor takes in its checkpoint (GGUF block formats included)."""
    key = dtype_name.upper().removeprefix("TORCH.")
    key = {"FLOAT32": "F32", "FLOAT16": "F16", "BFLOAT16": "BF16"}.get(key, key)
    if key in SAFETENSORS_BYTES:
        return numel * SAFETENSORS_BYTES[key]
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[key]]
        return numel // block * size
    except (ImportError, KeyError):
        return None


def describe(path: str | None, dtype: str = "bf16") -> dict:
    path = path or default_model_path()
    fmt, cfg, ckpt = open_checkpoint(path)
    dt = resolve_dtype(dtype, torch.device("cpu"))
    half_linears = dtype == "fp16w"  # linear weights stored as fp16, the rest fp32
    with torch.device("meta"):
        model = DecoderLM(cfg)
    comps = defaultdict(lambda: {"params": 0, "bytes": 0, "stored_bytes": 0, "stored_dtypes": set()})
    for name, p in model.named_parameters():
        c = comps[component_of(name)]
        c["params"] += p.numel()
        itemsize = 2 if half_linears and p.dim() == 2 and "embed_tokens" not in name else dt.itemsize
        c["bytes"] += p.numel() * itemsize
        stored = ckpt.tensor_dtype_name(name) if name in set(ckpt.tensor_names()) else "missing"
        c["stored_dtypes"].add(stored)
        c["stored_bytes"] += stored_bytes(stored, p.numel()) or 0
    if cfg.tie_word_embeddings:
        comps["lm_head"] = {"params": 0, "bytes": 0, "stored_bytes": 0,
                            "stored_dtypes": {"tied to embedding"}}
    components = {k: {**v, "stored_dtypes": sorted(v["stored_dtypes"])} for k, v in comps.items()}
    return {
        "source": path, "format": fmt, "architecture": cfg.model_type,
        "config": {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "max_position_embeddings", "rope_theta",
            "tie_word_embeddings", "attention_bias", "qk_norm")} | {"rope_scaling": cfg.rope_scaling},
        "dtype": dtype if dtype == "fp16w" else str(dt).removeprefix("torch."),
        "params": sum(v["params"] for v in components.values()),
        "bytes": sum(v["bytes"] for v in components.values()),
        "stored_bytes": sum(v["stored_bytes"] for v in components.values()),
        "components": components,
    }


def format_description(d: dict) -> str:
    c = d["config"]
    lines = [
        f"{d['source']} ({d['format']})",
        f"architecture {d['architecture']}: {c['num_layers']} layers, hidden {c['hidden_size']}, "
        f"ffn {c['intermediate_size']}, heads {c['num_heads']} (kv {c['num_kv_heads']}, dim {c['head_dim']}), "
        f"vocab {c['vocab_size']}, context {c['max_position_embeddings']}, rope theta {c['rope_theta']:g}"
        + (f", rope scaling {c['rope_scaling']}" if c["rope_scaling"] else "")
        + (", tied embeddings" if c["tie_word_embeddings"] else "")
        + (", qkv bias" if c["attention_bias"] else "") + (", q/k norm" if c["qk_norm"] else ""),
        f"{d['params'] / 1e6:.1f}M parameters: {_mb(d['bytes'])} in {d['dtype']}, "
        f"{_mb(d['stored_bytes'])} as stored",
        f"{'component':<11} {'params':>12} {d['dtype']:>10} {'stored':>10}  stored as",
    ]
    for name, v in d["components"].items():
        lines.append(f"{name:<11} {v['params']:>12,} {_mb(v['bytes']):>10} {_mb(v['stored_bytes']):>10}"
                     f"  {', '.join(v['stored_dtypes'])}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
