"""Roofline of one decode step: FLOPs, bytes and time bounds per operation, and the GPU launch.

`rarefy roofline` (rarefy/commands/roofline.py) prints what `decode_roofline(...)` returns; the
model is described in docs/roofline.md. In short, for a step that decodes one token for each of
`batch` sequences, every one `ctx` tokens into its context:

- every operation of a decoder layer (norms, q/k/v/o projections, q/k norms, rotary, the KV-cache
  write, attention QK^T and PV over the paged cache, the split reduction, SiLU*up and the
  gate/up/down MLP) and of the step (embedding row, final norm, LM head) gets its FLOPs and the
  bytes it must move to or from HBM: weights once per step (all sequences share them), the KV cache
  once per sequence, activations in bf16;
- arithmetic intensity = FLOPs / bytes; an operation is compute-bound when it is above the GPU's
  ridge point (dense bf16 tensor peak / bandwidth), memory-bound otherwise;
- its time lower bound is max(bytes / bandwidth, FLOPs / peak); a layer's and the step's bounds are
  the sums over their operations (kernels run one after another), and tokens/s = batch / step time.

A projection `[N, K]` (nn.Linear layout) at batch B costs 2*B*N*K FLOPs and reads its weight
(N*K*bits/8 plus one bf16 scale per row for int8 and ternary, as in rarefy.bench.roofline) plus
B*K activations in and B*N out. Attention over the cache costs 2*B*Hq*ctx*D FLOPs for QK^T and as
much for PV, and reads ctx * bytes_per_token(kv_dtype, 1, Hkv, D) / 2 bytes of K (and of V) per
sequence, rarefy.kv.quant's count, scales included. Weight-only formats (int8, ternary) are
dequantized in the kernel and multiplied in bf16, so the bf16 peak applies to every operation.

The GPU mapping: projections use the tiling of rarefy's Triton GEMV (rarefy.kernels.gemv.triton:
pick_config and the launch plan it makes) for batch <= 32, and cuBLAS above (modelled as 128x128
output tiles); attention uses rarefy.kernels.paged_attention.plan.plan_decode, the launch the
paged decode kernel makes.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, is_dataclass

from rarefy.bench.roofline import GPU, SCALE_BYTES_PER_ROW, VALUE_BITS, lookup_gpu
from rarefy.config import ModelConfig
from rarefy.errors import RarefyError

ACT_BYTES = 2  # activations, norm weights and the embedding table are bf16
BLOCK_SIZE = 16  # tokens per KV-cache page (docs/kv-cache.md)
WEIGHT_FORMATS = tuple(VALUE_BITS)  # bf16, int8, ternary
GEMV_MAX_M = 32  # rarefy.kernels.gemv.MAX_M: larger batches go to cuBLAS
CUBLAS_TILE = (128, 128)  # modelled cuBLAS output tile (rows of x, rows of w)
REGS_PER_THREAD = 128  # register budget assumed for occupancy (as plan_decode does)
REGS_PER_SM = 65536

# Published shapes (the models' config.json on the Hugging Face Hub), so napkin math needs no
# download: name -> (config.json fields, note shown with the result).
_LLAMA3 = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
               tie_word_embeddings=False)
PRESETS: dict[str, tuple[dict, str | None]] = {
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": (_LLAMA3, None),
    # meta-llama/Meta-Llama-3-70B
    "llama3-70b": (_LLAMA3 | dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64), None),
    # Qwen/Qwen3-8B
    "qwen3-8b": (dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                      num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                      tie_word_embeddings=False), None),
    # Qwen/Qwen3.5-27B text model (hidden 5120, FFN 17408, 64 layers, 24 query / 4 KV heads of 256,
    # vocab 248320, untied). Its layers are 3 Gated DeltaNet (linear attention) : 1 full attention.
    "qwen3.5-27b": (dict(model_type="qwen3", vocab_size=248320, hidden_size=5120, intermediate_size=17408,
                         num_hidden_layers=64, num_attention_heads=24, num_key_value_heads=4, head_dim=256,
                         rms_norm_eps=1e-6, rope_theta=10000000.0, max_position_embeddings=262144,
                         tie_word_embeddings=False),
                    "dense-attention approximation: Qwen3.5-27B runs Gated DeltaNet (linear attention, "
                    "a fixed-size state) in 48 of its 64 layers and gated full attention in 16; here all "
                    "64 are full attention with a 6144-wide q projection (the output gate's extra "
                    "6144 rows are not counted), so KV bytes and attention time are ~4x the real model's"),
    # HuggingFaceTB/SmolLM2-135M (the embedded default model's shapes)
    "smollm2-135m": (dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                          tie_word_embeddings=True), None),
}


@dataclass(frozen=True)
class ModelSpec:
    config: ModelConfig
    source: str  # preset name or path
    kind: str  # "preset", "config" (config.json only), "checkpoint" (GGUF / HF directory)
    note: str | None = None


def resolve_model(model: str | None) -> ModelSpec:
    """A model's shapes from a preset name, a directory with config.json (no weights needed), a
    config.json file, or a GGUF file; None = the embedded default model."""
    if model is None:
        from rarefy.models.default_model import default_model_path
        model = default_model_path()
    if os.path.isdir(model):
        return ModelSpec(ModelConfig.from_hf_dir(model), model, "config")
    if os.path.isfile(model):
        if os.path.basename(model).endswith(".json"):
            return ModelSpec(ModelConfig.from_hf_dir(os.path.dirname(model) or "."), model, "config")
        from rarefy.models.loader import open_checkpoint
        _, cfg, _ = open_checkpoint(model)
        return ModelSpec(cfg, model, "checkpoint")
    key = model.lower()
    if key in PRESETS:
        fields, note = PRESETS[key]
        return ModelSpec(ModelConfig.from_hf(fields), key, "preset", note)
    raise RarefyError(f"model not found: {model} (give an HF directory with config.json, a GGUF file, "
                      f"or a preset: {', '.join(PRESETS)})")


# ------------------------------------------------------------------------------------ operations

def _op(name: str, kind: str, flops: float, nbytes: float, gpu: GPU, **extra) -> dict:
    bw = gpu.bandwidth_tbs * 1e12
    peak = gpu.bf16_tflops * 1e12
    mem_s, comp_s = nbytes / bw, flops / peak
    intensity = flops / nbytes if nbytes else math.inf
    return {"name": name, "kind": kind, "flops": flops, "bytes": nbytes, "intensity": intensity,
            "bound": "compute" if intensity > peak / bw else "memory",
            "memory_time_s": mem_s, "compute_time_s": comp_s, "time_s": max(mem_s, comp_s), **extra}


def weight_bytes(n: int, k: int, weights: str) -> float:
    """Bytes of an [n, k] matrix in `weights` (bf16, int8, ternary): values plus per-row scales."""
    return n * k * VALUE_BITS[weights] / 8 + n * SCALE_BYTES_PER_ROW[weights]


def _linear(name, n, k, batch, weights, gpu, bias=False) -> dict:
    wb = weight_bytes(n, k, weights) + (n * ACT_BYTES if bias else 0)
    ab = batch * (n + k) * ACT_BYTES
    return _op(name, "gemv", 2 * batch * n * k + (batch * n if bias else 0), wb + ab, gpu,
               n=n, k=k, weight_bytes=wb, activation_bytes=ab)


def _elementwise(name, flops, nbytes, gpu) -> dict:
    return _op(name, "elementwise", flops, nbytes, gpu, activation_bytes=nbytes)


def _norm(name, rows, width, batch, gpu) -> dict:
    """RMSNorm of batch*rows vectors of `width`: ~4 FLOPs per value (square, sum, scale, weight)."""
    return _elementwise(name, 4 * batch * rows * width,
                        (2 * batch * rows * width + width) * ACT_BYTES, gpu)


def layer_ops(cfg: ModelConfig, batch: int, ctx: int, kv_dtype: str, weights: str, gpu: GPU,
              plan=None) -> list[dict]:
    """The operations of one decoder layer for one decode step (per layer, not x num_layers)."""
    from rarefy.kv.quant import bytes_per_token, is_quantized
    h, hq, hkv, d, inter = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    b = batch
    kv_token = bytes_per_token(kv_dtype, 1, hkv, d)  # K and V of one token in one layer, scales included
    ops = [_norm("input_norm", 1, h, b, gpu),
           _linear("q_proj", hq * d, h, b, weights, gpu, cfg.attention_bias),
           _linear("k_proj", hkv * d, h, b, weights, gpu, cfg.attention_bias),
           _linear("v_proj", hkv * d, h, b, weights, gpu, cfg.attention_bias)]
    if cfg.qk_norm:
        ops.append(_norm("qk_norm", hq + hkv, d, b, gpu))
    # rotary on q and k: 3 FLOPs per value (two products, one sum); reads q, k and a cos/sin row
    ops.append(_elementwise("rope", 3 * b * (hq + hkv) * d, (2 * (hq + hkv) * d + 2 * d) * b * ACT_BYTES, gpu))
    # the new token's K and V go into the cache (quantized on write: ~3 FLOPs per value + amax)
    ops.append(_elementwise("kv_store", (4 if is_quantized(kv_dtype) else 0) * 2 * b * hkv * d,
                            b * (2 * hkv * d * ACT_BYTES + kv_token), gpu))
    ops[-1]["kv_bytes"] = b * kv_token
    # attention: K for QK^T (+ softmax, ~5 FLOPs per score), V for PV; q read, output written
    k_bytes = b * ctx * kv_token / 2
    q_bytes = b * hq * d * ACT_BYTES
    splits = getattr(plan, "num_splits", 1) if plan is not None else 1
    workspace = getattr(plan, "workspace_bytes", 0) if splits > 1 else 0
    ops.append(_op("attn_qk", "attention", 2 * b * hq * ctx * d + 5 * b * hq * ctx, k_bytes + q_bytes, gpu,
                   kv_bytes=k_bytes, activation_bytes=q_bytes))
    out_bytes = workspace if splits > 1 else q_bytes  # split partials (fp32 + LSE), else the output
    ops.append(_op("attn_pv", "attention", 2 * b * hq * ctx * d, k_bytes + out_bytes, gpu,
                   kv_bytes=k_bytes, activation_bytes=out_bytes))
    if splits > 1:  # the reduction kernel reads every split's partial and writes the output
        ops.append(_op("attn_reduce", "attention", 4 * b * hq * splits * (d + 1), workspace + q_bytes, gpu,
                       activation_bytes=workspace + q_bytes))
    ops += [_linear("o_proj", h, hq * d, b, weights, gpu),
            _norm("post_attn_norm", 1, h, b, gpu),
            _linear("gate_proj", inter, h, b, weights, gpu),
            _linear("up_proj", inter, h, b, weights, gpu),
            # SiLU(gate) * up: ~5 FLOPs per value (exp, add, divide, two products)
            _elementwise("silu_mul", 5 * b * inter, 3 * b * inter * ACT_BYTES, gpu),
            _linear("down_proj", h, inter, b, weights, gpu)]
    return ops


def step_ops(cfg: ModelConfig, batch: int, weights: str, gpu: GPU) -> list[dict]:
    """The operations outside the layers, once per step: embedding lookup, final norm, LM head."""
    h = cfg.hidden_size
    emb = _op("embedding", "lookup", 0, 2 * batch * h * ACT_BYTES, gpu, activation_bytes=2 * batch * h * ACT_BYTES)
    head = _linear("lm_head", cfg.vocab_size, h, batch, weights, gpu)
    head["tied"] = cfg.tie_word_embeddings
    return [emb, _norm("final_norm", 1, h, batch, gpu), head]


def _total(ops: list[dict], gpu: GPU, times: float = 1) -> dict:
    flops = sum(o["flops"] for o in ops) * times
    nbytes = sum(o["bytes"] for o in ops) * times
    t = sum(o["time_s"] for o in ops) * times
    roof = max(nbytes / (gpu.bandwidth_tbs * 1e12), flops / (gpu.bf16_tflops * 1e12))
    return {"flops": flops, "bytes": nbytes, "time_s": t, "roofline_time_s": roof,
            "weight_bytes": sum(o.get("weight_bytes", 0) for o in ops) * times,
            "kv_bytes": sum(o.get("kv_bytes", 0) for o in ops) * times,
            "intensity": flops / nbytes if nbytes else math.inf}


# ------------------------------------------------------------------------------------ GPU mapping

def _residency(gpu: GPU, programs: int, warps: int, smem: int) -> dict:
    """Programs per SM (shared memory, warps, blocks, a 128-register-per-thread budget) and waves."""
    limits = {"blocks": gpu.max_blocks_per_sm, "warps": gpu.max_warps_per_sm // warps,
              "registers": REGS_PER_SM // (REGS_PER_THREAD * 32 * warps)}
    if smem and gpu.smem_per_sm_kib:
        limits["shared_memory"] = gpu.smem_per_sm_kib * 1024 // (smem + 1024)  # 1 KiB reserved per block
    per_sm = max(1, min(limits.values()))
    slots = per_sm * gpu.sm_count
    waves = programs / slots
    return {"programs": programs, "programs_per_sm": per_sm, "limited_by": min(limits, key=limits.get),
            "waves": waves, "full_waves": math.ceil(waves),
            "sm_busy": min(1.0, programs / gpu.sm_count),
            "last_wave_fill": (programs - (math.ceil(waves) - 1) * slots) / slots if programs else 0.0,
            "fits_smem_per_block": smem <= (gpu.smem_per_block_kib or math.inf) * 1024}


def gemv_launch(m: int, n: int, k: int, gpu: GPU) -> dict:
    """How a projection [n, k] at batch m launches: rarefy's Triton GEMV (m <= 32) or cuBLAS."""
    if m > GEMV_MAX_M:
        tiles = math.ceil(m / CUBLAS_TILE[0]) * math.ceil(n / CUBLAS_TILE[1])
        return {"kernel": "cuBLAS (torch.nn.functional.linear)", "model": "128x128 output tiles (modelled)",
                "tile": list(CUBLAS_TILE), "grid": [tiles], **_residency(gpu, tiles, 8, 0)}
    try:
        import torch

        from rarefy.kernels.gemv.triton import _fit_config, pick_config
    except Exception as e:  # Triton missing or broken: say so instead of failing the whole report
        return {"kernel": "rarefy Triton gemv", "error": f"cannot import rarefy.kernels.gemv.triton: {e}"}
    cfg = _fit_config(pick_config(m, n, k, torch.bfloat16, gpu.sm_count), m, n, k)
    n_tiles, m_tiles = math.ceil(n / cfg.block_n), math.ceil(m / cfg.block_m)
    # recount splits as the launcher does (whole BLOCK_K steps, none empty)
    k_per_split = math.ceil(math.ceil(k / cfg.block_k) / cfg.split_k) * cfg.block_k
    split = math.ceil(k / k_per_split)
    # Shared memory: the tl.dot path stages num_stages (w + x) tiles (Triton 3.6 compiled for sm_90
    # reports exactly num_stages * (BLOCK_N + BLOCK_M) * BLOCK_K * 2 bytes); the FMA path needs none.
    smem = cfg.num_stages * (cfg.block_n + cfg.block_m) * cfg.block_k * 2 if cfg.use_dot else 0
    programs = n_tiles * split * m_tiles
    return {"kernel": "rarefy Triton gemv", "path": "tl.dot (tensor cores)" if cfg.use_dot else "FMA",
            "tile": [cfg.block_m, cfg.block_n, cfg.block_k], "split_k": split,
            "grid": [n_tiles, split, m_tiles], "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "smem_bytes": smem, **_residency(gpu, programs, cfg.num_warps, smem)}


def attention_plan(cfg: ModelConfig, batch: int, ctx: int, kv_dtype: str, gpu: GPU):
    """(plan, error): rarefy's paged decode launch for this shape, or why there is none."""
    try:
        from rarefy.kernels.paged_attention.plan import plan_decode
    except ImportError as e:
        return None, f"rarefy.kernels.paged_attention.plan is not available ({e})"
    import inspect
    kw = {}
    if gpu.smem_per_sm_kib and "smem_per_sm" in inspect.signature(plan_decode).parameters:
        kw["smem_per_sm"] = gpu.smem_per_sm_kib * 1024  # this GPU's, not the H100 default
    try:
        from rarefy.kv.paged import stores_v_dim_major
        kw["v_dim_major"] = stores_v_dim_major(kv_dtype, "cuda")  # the layout the GPU cache keeps
    except ImportError:
        pass
    try:
        plan = plan_decode(batch, ctx, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kv_dtype,
                           BLOCK_SIZE, gpu.sm_count, **kw)
    except RarefyError as e:
        return None, f"the paged decode kernel does not take this shape: {e}"
    return plan, None


def _plan_dict(plan, gpu: GPU) -> dict:
    d = asdict(plan) if is_dataclass(plan) else dict(vars(plan))
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    grid = d.get("grid") or [1]
    programs = math.prod(grid)
    d["programs"] = programs
    occ = d.get("occupancy")
    if occ:
        slots = occ * gpu.sm_count
        d["waves"] = programs / slots
        d["sm_busy"] = min(1.0, programs / gpu.sm_count)
    if hasattr(plan, "describe"):
        d["describe"] = plan.describe()
    return d


# ------------------------------------------------------------------------------------ the report

def check_inputs(gpu: str, ctx: int, batch: int, kv_dtype: str, weights: str) -> GPU:
    from rarefy.kv.quant import check_kv_dtype
    g = lookup_gpu(gpu)
    if ctx <= 0:
        raise RarefyError(f"--ctx must be a positive number of tokens, got {ctx}")
    if batch <= 0:
        raise RarefyError(f"--batch must be a positive number of sequences, got {batch}")
    check_kv_dtype(kv_dtype)
    if weights not in VALUE_BITS:
        raise RarefyError(f"unknown weight format {weights!r}; choose one of {', '.join(VALUE_BITS)}")
    if not (g.bf16_tflops and g.sm_count):
        raise RarefyError(f"the GPU table lacks the peak or SM count of {g.name}")
    return g


def decode_roofline(model: str | ModelSpec | None = None, gpu: str = "h100", ctx: int = 4096,
                    batch: int = 1, kv_dtype: str = "bf16", weights: str = "bf16") -> dict:
    """The whole report as a JSON-able dict (see the module doc and docs/roofline.md)."""
    g = check_inputs(gpu, ctx, batch, kv_dtype, weights)
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    cfg = spec.config
    from rarefy.kv.quant import bytes_per_token

    plan, plan_error = attention_plan(cfg, batch, ctx, kv_dtype, g)
    lops = layer_ops(cfg, batch, ctx, kv_dtype, weights, g, plan)
    sops = step_ops(cfg, batch, weights, g)
    nl = cfg.num_layers
    layer_total = _total(lops, g)
    layers_total = _total(lops, g, nl)
    outside = _total(sops, g)
    step = {k: layers_total[k] + outside[k] for k in ("flops", "bytes", "time_s", "weight_bytes", "kv_bytes")}
    step["roofline_time_s"] = max(step["bytes"] / (g.bandwidth_tbs * 1e12), step["flops"] / (g.bf16_tflops * 1e12))
    step["activation_bytes"] = step["bytes"] - step["weight_bytes"] - step["kv_bytes"]
    step["intensity"] = step["flops"] / step["bytes"]
    step["tokens_per_s"] = batch / step["time_s"]
    step["tokens_per_s_per_sequence"] = 1 / step["time_s"]
    step["ms_per_step"] = step["time_s"] * 1e3
    compute_bound = [o["name"] for o in lops + sops if o["bound"] == "compute"]

    # memory the step needs resident: every weight once, the embedding table (bf16) and the cache
    h = cfg.hidden_size
    per_layer_w = sum(o.get("weight_bytes", 0) for o in lops) + 2 * h * ACT_BYTES + (
        2 * cfg.head_dim * ACT_BYTES if cfg.qk_norm else 0)
    embed = cfg.vocab_size * h * ACT_BYTES
    head = 0 if cfg.tie_word_embeddings else weight_bytes(cfg.vocab_size, h, weights)
    weights_resident = nl * per_layer_w + embed + head + h * ACT_BYTES
    kv_resident = batch * ctx * bytes_per_token(kv_dtype, nl, cfg.num_kv_heads, cfg.head_dim)
    gpu_bytes = g.memory_gb * 1e9 if g.memory_gb else None

    projections = {}
    for o in lops + sops:
        if o["kind"] == "gemv":
            projections[o["name"]] = {"n": o["n"], "k": o["k"], **gemv_launch(batch, o["n"], o["k"], g)}

    notes = []
    if spec.note:
        notes.append(spec.note)
    if ctx > cfg.max_position_embeddings:
        notes.append(f"--ctx {ctx} is past the model's max_position_embeddings ({cfg.max_position_embeddings})")
    if gpu_bytes and weights_resident + kv_resident > gpu_bytes:
        notes.append(f"weights + KV cache ({(weights_resident + kv_resident) / 1e9:.1f} GB) exceed the "
                     f"{g.name}'s {g.memory_gb:g} GB")
    if weights != "bf16":
        notes.append(f"{weights} weights: bytes counted in {weights} (+ a bf16 scale per row); the tiling "
                     "shown is the bf16 Triton GEMV's; math at the bf16 peak (weight-only quantization)")
    if plan_error:
        notes.append(f"attention launch not shown: {plan_error}")
    if cfg.tie_word_embeddings:
        notes.append("tied embeddings: the LM head reads the embedding matrix")
    if g.l2_mb and step["weight_bytes"] > g.l2_mb * 1e6:
        notes.append(f"the step streams {step['weight_bytes'] / 1e9:.2f} GB of weights through a "
                     f"{g.l2_mb:g} MB L2: nothing stays cached from one step to the next")

    return {
        "model": {"source": spec.source, "kind": spec.kind, "note": spec.note,
                  "architecture": cfg.model_type, "num_layers": nl, "hidden_size": h,
                  "intermediate_size": cfg.intermediate_size, "num_heads": cfg.num_heads,
                  "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                  "tie_word_embeddings": cfg.tie_word_embeddings, "qk_norm": cfg.qk_norm,
                  "attention_bias": cfg.attention_bias,
                  "max_position_embeddings": cfg.max_position_embeddings},
        "gpu": {"name": g.name, "bandwidth_tbs": g.bandwidth_tbs, "bf16_tflops": g.bf16_tflops,
                "fp8_tflops": g.fp8_tflops, "int8_tops": g.int8_tops, "sm_count": g.sm_count,
                "smem_per_sm_kib": g.smem_per_sm_kib, "smem_per_block_kib": g.smem_per_block_kib,
                "l2_mb": g.l2_mb, "memory_gb": g.memory_gb,
                "ridge_flop_per_byte": g.bf16_tflops * 1e12 / (g.bandwidth_tbs * 1e12),
                "ridge_fp8_flop_per_byte": g.fp8_tflops / g.bandwidth_tbs if g.fp8_tflops else None},
        "settings": {"ctx": ctx, "batch": batch, "kv_dtype": kv_dtype, "weights": weights,
                     "activation_bytes": ACT_BYTES, "kv_block_size": BLOCK_SIZE,
                     "kv_bytes_per_token": bytes_per_token(kv_dtype, nl, cfg.num_kv_heads, cfg.head_dim)},
        "layer": {"count": nl, "ops": lops, "total": layer_total, "all_layers": layers_total},
        "step_ops": sops,
        "step": step,
        "compute_bound_ops": compute_bound,
        "memory": {"weights_bytes": weights_resident, "kv_cache_bytes": kv_resident,
                   "total_bytes": weights_resident + kv_resident, "gpu_bytes": gpu_bytes,
                   "fits": None if gpu_bytes is None else weights_resident + kv_resident <= gpu_bytes},
        "mapping": {"projections": projections,
                    "attention": _plan_dict(plan, g) if plan is not None else {"error": plan_error}},
        "notes": notes,
    }


# ------------------------------------------------------------------------------------ text output

def _si(v: float, unit: str = "", sep: str = "") -> str:
    """3 significant digits with a decimal prefix: 33.6M, 4.29 GB (sep=" ")."""
    for p, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            x = v / div
            return f"{x:.3g}{sep}{p}{unit}" if x < 100 else f"{x:.0f}{sep}{p}{unit}"
    return f"{v:.3g}{sep}{unit}"


def _ai(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _us(s: float) -> str:
    us = s * 1e6
    return f"{us:.3f}" if us < 1 else f"{us:.2f}" if us < 100 else f"{us:.1f}"


def _op_rows(ops: list[dict], total_t: float) -> list[str]:
    out = []
    for o in ops:
        shape = f"{o['n']}x{o['k']}" if "n" in o else ""
        out.append(f"  {o['name']:<15}{shape:>12}{_si(o['flops']):>9}{_si(o['bytes'], 'B'):>9}{_ai(o['intensity']):>8}"
                   f"  {o['bound']:<8}{_us(o['time_s']):>9}{100 * o['time_s'] / total_t:>6.1f}%")
    return out


def _header(title: str) -> str:
    return f"{title:<27}{'FLOP':>9}{'bytes':>9}{'FLOP/B':>8}  {'bound':<8}{'time µs':>9}{'share':>7}"


def format_roofline(r: dict) -> str:
    m, g, s, st = r["model"], r["gpu"], r["settings"], r["step"]
    lt = r["layer"]["total"]
    desc = {"preset": "preset, published shapes", "config": "config.json", "checkpoint": "checkpoint"}[m["kind"]]
    out = [f"{m['source']} ({desc}): {m['architecture']}, {m['num_layers']} layers, hidden {m['hidden_size']}, "
           f"ffn {m['intermediate_size']}, heads {m['num_heads']} (kv {m['num_kv_heads']}, dim {m['head_dim']}), "
           f"vocab {m['vocab_size']}" + (", tied embeddings" if m["tie_word_embeddings"] else "")
           + (", q/k norm" if m["qk_norm"] else "") + (", qkv bias" if m["attention_bias"] else ""),
           f"{g['name']}: {g['bandwidth_tbs']:g} TB/s, {g['bf16_tflops']:g} TFLOP/s bf16 dense"
           + (f" ({g['fp8_tflops']:g} fp8)" if g["fp8_tflops"] else "")
           + f", ridge {g['ridge_flop_per_byte']:.0f} FLOP/B; {g['sm_count']} SMs, "
           f"{g['smem_per_sm_kib']} KiB smem/SM, {g['l2_mb']:g} MB L2, {g['memory_gb']:g} GB",
           f"decode step: batch {s['batch']}, context {s['ctx']}, KV {s['kv_dtype']} "
           f"({_si(s['kv_bytes_per_token'], 'B', ' ')}/token), weights {s['weights']}, activations bf16",
           "", _header(f"one layer (x {r['layer']['count']})")]
    out += _op_rows(r["layer"]["ops"], lt["time_s"])
    out.append(f"  {'layer total':<27}{_si(lt['flops']):>9}{_si(lt['bytes'], 'B'):>9}{_ai(lt['intensity']):>8}"
               f"  {'':<8}{_us(lt['time_s']):>9}")
    out += ["", _header("once per step")]
    out += _op_rows(r["step_ops"], st["time_s"])
    al = r["layer"]["all_layers"]
    out += ["",
            f"step: {_si(st['flops'], 'FLOP', ' ')}, {_si(st['bytes'], 'B', ' ')} "
            f"(weights {_si(st['weight_bytes'], 'B', ' ')}, KV cache {_si(st['kv_bytes'], 'B', ' ')}, "
            f"activations {_si(st['activation_bytes'], 'B', ' ')}); layers {100 * al['time_s'] / st['time_s']:.1f}% of the time",
            f"  >= {st['ms_per_step']:.3f} ms/step (sum of per-op bounds; whole-step roofline "
            f"{st['roofline_time_s'] * 1e3:.3f} ms) -> <= {st['tokens_per_s']:,.0f} tok/s"
            + (f" ({st['tokens_per_s_per_sequence']:,.1f} per sequence)" if s["batch"] > 1 else ""),
            f"  compute-bound ops: {', '.join(r['compute_bound_ops']) or 'none'}",
            f"  resident: weights {_si(r['memory']['weights_bytes'], 'B', ' ')} + KV cache "
            f"{_si(r['memory']['kv_cache_bytes'], 'B', ' ')} = {_si(r['memory']['total_bytes'], 'B', ' ')}"
            + ("" if r["memory"]["fits"] is None else f" of {g['memory_gb']:g} GB"
               + ("" if r["memory"]["fits"] else " (does NOT fit)"))]
    out += ["", f"GPU mapping ({g['name']}, {g['sm_count']} SMs)"]
    seen: dict[tuple, list[str]] = {}
    for name, p in r["mapping"]["projections"].items():
        seen.setdefault((p["n"], p["k"]), []).append(name)
    for (n, k), names in seen.items():
        p = r["mapping"]["projections"][names[0]]
        label = f"{'/'.join(names)} {n}x{k}"
        if "error" in p:
            out.append(f"  {label}: {p['error']}")
        elif p["kernel"].startswith("cuBLAS"):
            out.append(f"  {label}: {p['kernel']}, {p['model']}: {p['programs']} tiles, "
                       f"{p['waves']:.2f} waves")
        else:
            out.append(f"  {label}: gemv {p['path']}, tile {'x'.join(map(str, p['tile']))} (MxNxK), "
                       f"split-K {p['split_k']}, grid {'x'.join(map(str, p['grid']))} = {p['programs']} programs, "
                       f"{p['num_warps']} warps, smem {p['smem_bytes'] // 1024} KiB, "
                       f"{p['programs_per_sm']}/SM (by {p['limited_by']}) -> {p['waves']:.2f} waves")
    a = r["mapping"]["attention"]
    if "error" in a:
        out.append(f"  attention: {a['error']}")
    else:
        out.append(f"  attention (paged decode): {a.get('describe') or a}")
        if "waves" in a:
            out.append(f"    {a['programs']} programs on {g['sm_count']} SMs x {a['occupancy']}/SM -> "
                       f"{a['waves']:.2f} waves; splits {a.get('num_splits')}, "
                       f"workspace {_si(a.get('workspace_bytes', 0), 'B', ' ')}")
    if r["notes"]:
        out += ["", *[f"note: {n}" for n in r["notes"]]]
    return "\n".join(out)
