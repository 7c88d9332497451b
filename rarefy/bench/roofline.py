"""Napkin math for decoding one token: bytes read, and what they cost on a GPU.

Batch-1 decode reads every weight it uses once per token, so time/token >= bytes / bandwidth.
Counted per token, from the checkpoint's tensor names and shapes:

- matrices (every >= 2-D tensor but the embedding): read in full in the chosen format; MoE
  expert tensors (`.experts.` in the name) only for the active share
  (num_experts_per_tok / num_experts from config.json, when given);
- the embedding: one row (hidden_size values, bf16); when the checkpoint has no lm_head
  (tied embeddings), the embedding matrix is also read in full as the output projection;
- everything else (norms, biases, 1-D tensors): bf16;
- not at all: vision towers (`vision*.` / `visual.` in the name), which do not run per text token.

Formats (bits per matrix weight): bf16 = 16; int8 = 8 plus one bf16 scale per output row;
ternary (1.58-bit) = 2 bits packed (4 weights per byte) plus one bf16 scale per row. At
sparsity s the bitmap format stores 1 bit per weight (kept or not) plus the kept values:
bits = 1 + (1 - s) * value_bits, scales unchanged.

Compute-bound time = 2 FLOPs per kept matrix weight / the GPU's dense bf16 peak (sparse
formats are assumed to skip pruned weights perfectly: an optimistic bound); attention over the
KV cache is not counted in FLOPs. `crossover_batch` = bandwidth time / compute time: the batch
size at which a step stops being bandwidth-bound.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from rarefy.errors import RarefyError


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth_tbs: float  # TB/s (1e12 bytes per second)
    bf16_tflops: float | None  # dense bf16 tensor-core peak, TFLOP/s; None when unknown


GPUS = {
    "h100": GPU("H100 SXM", 3.35, 989.0),
    "h200": GPU("H200", 4.8, 989.0),
    "b200": GPU("B200", 8.0, 2250.0),
    "a100": GPU("A100", 2.0, 312.0),
}
VALUE_BITS = {"bf16": 16, "int8": 8, "ternary": 2}
SCALE_BYTES_PER_ROW = {"bf16": 0, "int8": 2, "ternary": 2}
SPARSITIES = (0.0, 0.5, 0.75, 0.9)

_LAYER = re.compile(r"\.(\d+)\.")
_VISION = re.compile(r"(^|\.)(vision\w*|visual)\.")


def pick_gpus(gpu: str | None, bandwidth: float | None, tflops: float | None = None) -> list[GPU]:
    """The GPUs to report: one by name, a custom bandwidth (TB/s), or the four defaults."""
    if gpu is not None and bandwidth is not None:
        raise RarefyError("give --gpu or --bandwidth, not both")
    if bandwidth is not None:
        if not bandwidth > 0 or math.isinf(bandwidth):
            raise RarefyError(f"--bandwidth must be a positive number of TB/s, got {bandwidth}")
        if tflops is not None and not tflops > 0:
            raise RarefyError(f"--tflops must be positive, got {tflops}")
        return [GPU(f"{bandwidth:g} TB/s", bandwidth, tflops)]
    if gpu is not None:
        key = gpu.lower().replace(" ", "").replace("-sxm", "").replace("sxm", "")
        if key not in GPUS:
            raise RarefyError(f"unknown GPU '{gpu}' (known: {', '.join(GPUS)}; or give --bandwidth)")
        g = GPUS[key]
        return [GPU(g.name, g.bandwidth_tbs, tflops or g.bf16_tflops)]
    return list(GPUS.values())


def matrix_bits(fmt: str, sparsity: float) -> float:
    """Storage bits per matrix weight (scales excluded) in `fmt` at `sparsity` (bitmap format)."""
    vb = VALUE_BITS[fmt]
    return vb if sparsity == 0 else 1 + (1 - sparsity) * vb


def _layer_of(name: str) -> tuple[str, int] | None:
    """(stack, index): `model.layers.3.mlp.up_proj.weight` -> ("model.layers", 3)."""
    m = _LAYER.search(name)
    return (name[:m.start()], int(m.group(1))) if m else None


def _module_after_layer(name: str) -> str:
    """`model.layers.3.linear_attn.in_proj_qkvz.weight` -> `linear_attn`."""
    return name[_LAYER.search(name).end():].split(".")[0]


def napkin(tensors: list[tuple[str, tuple[int, ...]]], hints: dict | None = None,
           gpus: list[GPU] | None = None, sparsities=SPARSITIES, context: int = 4096) -> dict:
    """Per-token parameters, bytes and time for each format x sparsity x GPU.

    tensors: (name, shape) of every floating-point tensor; hints: config.json keys (optional):
    tie_word_embeddings, num_experts_per_tok, num_experts / n_routed_experts.
    """
    hints = hints or {}
    gpus = gpus if gpus is not None else list(GPUS.values())
    experts = hints.get("num_experts") or hints.get("n_routed_experts") or hints.get("num_local_experts")
    active = (hints["num_experts_per_tok"] / experts
              if experts and hints.get("num_experts_per_tok") else 1.0)
    tied = not any(n.startswith("lm_head") for n, _ in tensors)
    mat_params = mat_rows = other = excluded = 0.0
    total = 0
    per_layer: dict[tuple[str, int], dict] = {}
    for name, shape in tensors:
        numel = math.prod(shape)
        total += numel
        if _VISION.search(name):  # a vision tower does not run while text tokens are decoded
            excluded += numel
            continue
        layer = _layer_of(name)
        is_embed = "embed_tokens" in name or (layer is None and "embed" in name and len(shape) == 2)
        share = active if ".experts." in name else 1.0
        if is_embed and len(shape) == 2:
            other += shape[1]  # one row per token
            if tied:
                mat_params += numel
                mat_rows += shape[0]
            continue
        if len(shape) >= 2:
            mat_params += numel * share
            mat_rows += shape[0] * share
        else:
            other += numel
        if layer is not None:
            d = per_layer.setdefault(layer, {"modules": set(), "params": 0.0, "matrix": 0.0,
                                             "rows": 0.0, "kv_dim": 0})
            if len(shape) >= 2:
                d["modules"].add(_module_after_layer(name))
                d["matrix"] += numel * share
                d["rows"] += shape[0] * share
            d["params"] += numel * share
            if re.search(r"\.(k_proj|v_proj)\.weight$", name):
                d["kv_dim"] += shape[0]

    rows = []
    for fmt in VALUE_BITS:
        for s in sparsities:
            mbytes = mat_params * matrix_bits(fmt, s) / 8 + mat_rows * SCALE_BYTES_PER_ROW[fmt]
            nbytes = mbytes + other * 2
            flops = 2 * mat_params * (1 - s)
            row = {"format": fmt, "sparsity": s, "bits_per_matrix_weight": matrix_bits(fmt, s),
                   "params_read": mat_params + other, "kept_params": mat_params * (1 - s) + other,
                   "bytes_per_token": nbytes, "gpus": {}}
            for g in gpus:
                ms_bw = nbytes / (g.bandwidth_tbs * 1e12) * 1e3
                ms_c = flops / (g.bf16_tflops * 1e12) * 1e3 if g.bf16_tflops else None
                row["gpus"][g.name] = {"ms_per_token": ms_bw, "tok_s": 1e3 / ms_bw if ms_bw else None,
                                       "compute_ms_per_token": ms_c,
                                       "crossover_batch": ms_bw / ms_c if ms_c else None}
            rows.append(row)

    types: dict[str, dict] = {}
    stacks = {stack for stack, _ in per_layer}
    for stack, layer in sorted(per_layer):
        d = per_layer[stack, layer]
        label = "+".join(sorted(d["modules"])) or "other"
        label = f"{stack}: {label}" if len(stacks) > 1 else label
        t = types.setdefault(label, {"type": label, "layers": [], "params": 0.0,
                                     "matrix_params": 0.0, "rows": 0.0, "kv_dim": 0})
        t["layers"].append(layer)
        for k in ("params", "matrix_params", "rows", "kv_dim"):
            t[k] += d[k if k != "matrix_params" else "matrix"]
    layer_types = []
    for t in types.values():
        nl = len(t["layers"])
        layer_types.append({
            "type": t["type"], "layers": t["layers"], "count": nl,
            "params_per_layer": t["params"] / nl, "params_read": t["params"],
            "bytes_per_token": {f"{fmt}@{s:g}": t["matrix_params"] * matrix_bits(fmt, s) / 8
                                + t["rows"] * SCALE_BYTES_PER_ROW[fmt]
                                + (t["params"] - t["matrix_params"]) * 2
                                for fmt in VALUE_BITS for s in sparsities},
            "kv_bytes_per_token": t["kv_dim"] * 2 * context,
        })
    return {"params_total": total, "params_per_token": mat_params + other, "params_not_read": excluded,
            "active_expert_share": active, "tied_embeddings": tied, "context": context,
            "gpus": [{"name": g.name, "bandwidth_tbs": g.bandwidth_tbs, "bf16_tflops": g.bf16_tflops}
                     for g in gpus],
            "rows": rows, "layer_types": layer_types}
