"""Helpers for the low-bit tests: a synthetic checkpoint in BitNet's packed format."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from rarefy.lowbit.bitnet_import import pack_bitnet
from rarefy.lowbit.ternary import quantize_ternary_values


def write_bitnet_checkpoint(src, dst, linear_class="autobitlinear", scale_dtype=torch.bfloat16,
                            mode="offline", model_type=None):
    """Copy the HF checkpoint `src` to `dst` with every decoder projection ternarized
    (per-tensor absmean) and stored as microsoft/bitnet-b1.58-2B-4T stores them:
    `P.weight` uint8 [out/4, in] packed along the rows, `P.weight_scale` one value
    (the multiplier for autobitlinear, its inverse for bitlinear).
    Returns {module name: (int8 values, multiplier as stored-and-read-back)}."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    out, truth = {}, {}
    for name, t in tensors.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            mod = name[: -len(".weight")]
            q, s = quantize_ternary_values(t)
            if mode == "online":
                out[name] = (q.float() * s).to(torch.bfloat16)
                continue
            stored = (s if linear_class == "autobitlinear" else 1.0 / s).reshape(1).to(scale_dtype)
            out[name] = pack_bitnet(q)
            out[f"{mod}.weight_scale"] = stored
            mult = stored.float() if linear_class == "autobitlinear" else 1.0 / stored.float()
            truth[mod] = (q, float(mult))
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                  "quantization_mode": mode}
    if model_type:
        cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg))
    return truth
