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
from dataclasses import dataclass, replace

from rarefy.errors import RarefyError


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth_tbs: float  # TB/s (1e12 bytes per second)
    bf16_tflops: float | None  # dense bf16 tensor-core peak, TFLOP/s; None when unknown
    # The rest is used by `rarefy roofline` (rarefy/bench/decode_roofline.py); None when unknown.
    fp8_tflops: float | None = None  # dense FP8 tensor-core peak, TFLOP/s (None: no FP8 tensor cores)
    int8_tops: float | None = None  # dense INT8 tensor-core peak, TOP/s
    sm_count: int | None = None
    smem_per_sm_kib: int | None = None  # shared memory per SM (largest carve-out), KiB
    smem_per_block_kib: int | None = None  # largest (opt-in) shared memory one block may use, KiB
    l2_mb: float | None = None  # L2 cache, MB
    memory_gb: float | None = None  # HBM capacity, GB
    max_warps_per_sm: int = 64  # resident warps per SM (compute capability 8.0, 9.0, 10.0)
    max_blocks_per_sm: int = 32  # resident blocks per SM (8.0, 9.0, 10.0)


# Sources. Vendor peaks are quoted "with sparsity" (2:4); the dense figures below are half of those.
# - H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): 3.35 TB/s,
#   80 GB, BF16 1,979 / FP8 3,958 TFLOPS and INT8 3,958 TOPS with sparsity; NVIDIA H100 Tensor Core
#   GPU Architecture whitepaper: 132 SMs (SXM5), 50 MB L2.
# - H200 SXM: NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): 141 GB, 4.8 TB/s, the same
#   tensor peaks as H100 SXM; same GH100 chip (132 SMs, 50 MB L2).
# - B200: NVIDIA HGX B200 / DGX B200 datasheets: 8 TB/s, 180 GB per GPU, FP8 and INT8 9 PFLOPS/POPS and
#   BF16 4.5 PFLOPS per GPU with sparsity; 148 SMs (2 dies x 74) and 126 MB L2 as reported by Chips and
#   Cheese, "Nvidia's B200: Keeping the CUDA Juggernaut Rolling" (NVIDIA publishes no L2 figure).
# - A100 SXM4 80 GB: NVIDIA A100 datasheet (BF16 312 TFLOPS, INT8 624 TOPS dense; no FP8) and A100
#   Tensor Core GPU Architecture whitepaper (108 SMs, 40 MB L2); bandwidth kept at the 2.0 TB/s
#   napkin value (the datasheet says 2,039 GB/s for 80 GB SXM).
# - Shared memory, warps and blocks per SM: CUDA C++ Programming Guide, "Technical Specifications per
#   Compute Capability": 8.0 (A100) 164 KB per SM, 163 KB per block; 9.0 (H100/H200) and 10.0 (B200)
#   228 KB per SM, 227 KB per block; 64 warps and 32 blocks per SM on all three.
GPUS = {
    "h100": GPU("H100 SXM", 3.35, 989.0, fp8_tflops=1979.0, int8_tops=1979.0, sm_count=132,
                smem_per_sm_kib=228, smem_per_block_kib=227, l2_mb=50.0, memory_gb=80.0),
    "h200": GPU("H200", 4.8, 989.0, fp8_tflops=1979.0, int8_tops=1979.0, sm_count=132,
                smem_per_sm_kib=228, smem_per_block_kib=227, l2_mb=50.0, memory_gb=141.0),
    "b200": GPU("B200", 8.0, 2250.0, fp8_tflops=4500.0, int8_tops=4500.0, sm_count=148,
                smem_per_sm_kib=228, smem_per_block_kib=227, l2_mb=126.0, memory_gb=180.0),
    "a100": GPU("A100", 2.0, 312.0, fp8_tflops=None, int8_tops=624.0, sm_count=108,
                smem_per_sm_kib=164, smem_per_block_kib=163, l2_mb=40.0, memory_gb=80.0),
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
        g = lookup_gpu(gpu, "; or give --bandwidth")
        return [replace(g, bf16_tflops=tflops or g.bf16_tflops)]
    return list(GPUS.values())


def lookup_gpu(gpu: str, hint: str = "") -> GPU:
    """A GPU of the table by name: "h100", "H100-SXM", "H100 SXM", "h200", ... (case-insensitive)."""
    key = gpu.lower().replace(" ", "").replace("-sxm", "").replace("sxm", "")
    if key not in GPUS:
        raise RarefyError(f"unknown GPU '{gpu}' (known: {', '.join(GPUS)}{hint})")
    return GPUS[key]


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
