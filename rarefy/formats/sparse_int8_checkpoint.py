"""Save a sparse + int8 model as an HF checkpoint (the saver for rarefy.lowbit.composed).

A pruned model whose projections are Int8TiledBitmap (SparseLinear): each such projection P
is stored as compressed-tensors' sparse-bitmask parts of its int8 matrix Q plus its scale,

    P.shape int64 [2], P.compressed int8 [nnz], P.bitmask uint8 [N, ceil(K/8)],
    P.row_offsets int64 [N], P.weight_scale float32 [N, 1]      (W ~= weight_scale * Q)

(+ P.bias), everything else dense as in the source. config.json says so under
"rarefy" -> "sparse_int8" (weights_format "sparse-int8"); quantization_config declares int8
channel-wise weights (config_groups) next to the sparse-bitmask sparsity_config, so a reader
that does not know the composition refuses the checkpoint instead of reading Q unscaled.
Loaded by rarefy.lowbit.composed.load_sparse_int8. Layout: docs/sparse-kernels.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rarefy.errors import RarefyError
from rarefy.formats.checkpoint import (COMPRESSED_TENSORS_VERSION, DEFAULT_SHARD_SIZE, FORMAT_VERSION, ShardWriter,
                                       base_config, prepare_save, rarefy_header)
from rarefy.formats.sparse_bitmask import encode_bitmask

__all__ = ["save_sparse_int8", "SPARSE_INT8_FORMAT", "SPARSE_INT8_VERSION"]

SPARSE_INT8_FORMAT = "sparse-int8"
SPARSE_INT8_VERSION = 1


def save_sparse_int8(model, out_dir: str | os.PathLike, *, source_path: str | os.PathLike | None = None,
                     config_dict: dict | None = None, tokenizer_files_from=None, meta: dict | None = None,
                     dtype: torch.dtype | None = None, overwrite: bool = False,
                     shard_size_bytes: int = DEFAULT_SHARD_SIZE) -> dict:
    """Write `model` (a DecoderLM whose pruned projections are SparseLinear over an
    Int8TiledBitmap) to `out_dir`, atomically; returns a summary dict.

    Arguments as `save_pruned`; `meta` goes to config.json["rarefy"]["sparse_int8"];
    `dtype` casts the dense floating tensors (int8 values and fp32 scales are kept).
    """
    from rarefy.formats.sparse_weight import Int8TiledBitmap
    from rarefy.layers.sparse_linear import DirectWeight, SparseLinear
    from rarefy.models.llama import DecoderLM

    io = prepare_save(out_dir, source_path, overwrite=overwrite, shard_size_bytes=shard_size_bytes,
                      config_dict=config_dict, tokenizer_files_from=tokenizer_files_from, meta=meta,
                      meta_name="meta")
    cfg_model = model.config
    sparse = {name: m for name, m in model.named_modules()
              if isinstance(m, SparseLinear) and isinstance(m.compiled, DirectWeight)
              and isinstance(m.compiled.weight, Int8TiledBitmap)}
    if not sparse:
        raise RarefyError("the model has no sparse int8 projections to save")
    with torch.device("meta"):
        order = list(DecoderLM(cfg_model).state_dict())
    expected = set(order)
    if cfg_model.tie_word_embeddings:
        expected.discard("lm_head.weight")
    for name in sparse:
        if f"{name}.weight" not in expected:
            raise RarefyError(f"sparse int8 module {name} has no HF name; save before fuse_projections()")
        expected.discard(f"{name}.weight")
    dense = {n: t.detach() for n, t in model.state_dict().items()
             if not (cfg_model.tie_word_embeddings and n == "lm_head.weight")}
    if set(dense) != expected:
        odd = sorted(set(dense) ^ expected)
        raise RarefyError(f"the model's tensors do not have HF names (e.g. {odd[0]}); "
                          "save before fuse_projections() or other layer swaps")

    modules = {}
    for name, m in sparse.items():
        w = m.compiled.weight
        modules[name] = {"shape": list(w.shape), "density": round(w.nnz / max(1, w.shape[0] * w.shape[1]), 6)}
    # write in the model's own order: a sparse module's parts where its weight would be
    groups = []
    for name in order:
        mod = name.rpartition(".")[0]
        key = mod if (mod in sparse and name == f"{mod}.weight") else name
        if key in sparse or key in dense:
            groups.append(key)

    def parts_of(key: str) -> dict[str, torch.Tensor]:
        if key in sparse:
            w = sparse[key].compiled.weight.to("cpu")
            enc = encode_bitmask(w.quantized())
            p = {f"{key}.{s}": v for s, v in enc.items()}
            p[f"{key}.weight_scale"] = w.scale.reshape(-1, 1).contiguous()
            return p
        t = dense[key]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return {key: t.cpu().contiguous()}

    def write_weights(tmp: Path) -> dict:
        shards = ShardWriter(tmp, shard_size_bytes, {"format": "pt", "rarefy_format_version": str(FORMAT_VERSION)})
        stats = {"sparse_int8_bytes": 0, "dense_bf16_bytes": 0, "dtypes": set()}
        for key in groups:
            part = parts_of(key)
            size = shards.add(part)
            if key in sparse:
                n, k = modules[key]["shape"]
                stats["sparse_int8_bytes"] += size
                stats["dense_bf16_bytes"] += 2 * n * k
            else:
                for v in part.values():
                    if v.is_floating_point():
                        stats["dtypes"].add(str(v.dtype).removeprefix("torch."))
        stats["files"] = shards.finish()
        stats["bytes"] = shards.total
        return stats

    stats = io.write(write_weights, lambda stats: _sparse_int8_config(io.cfg, stats, modules, io.source, io.meta))
    return {"out_dir": str(io.out), "files": stats["files"], "bytes": stats["bytes"],
            "sparse_int8_bytes": stats["sparse_int8_bytes"], "dense_bf16_bytes": stats["dense_bf16_bytes"],
            "modules": len(modules)}


def _sparse_int8_config(cfg: dict, stats: dict, modules: dict, source: Path | None, meta: dict) -> dict:
    cfg = base_config(cfg, stats["dtypes"])
    targets = sorted(modules)
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": COMPRESSED_TENSORS_VERSION,
        "format": "int-quantized",
        "config_groups": {"group_0": {
            "targets": targets,
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                        "dynamic": False},
            "input_activations": None, "output_activations": None}},
        "sparsity_config": {"format": "sparse-bitmask", "sparsity_structure": "unstructured",
                            "targets": targets, "ignore": [], "registry_requires_subclass": False},
        "transform_config": {},
    }
    n_w = sum(s[0] * s[1] for s in (m["shape"] for m in modules.values()))
    nnz = sum(m["density"] * m["shape"][0] * m["shape"][1] for m in modules.values())
    cfg["rarefy"] = {
        **rarefy_header(source, SPARSE_INT8_FORMAT),
        "sparse_int8": {"format_version": SPARSE_INT8_VERSION, "scale": "per output row, symmetric, fp32",
                        **{k: v for k, v in meta.items() if k not in ("format_version", "modules")},
                        "modules": modules},
        "measured": {"sparse_int8_modules": len(modules), "density": round(nnz / max(1, n_w), 6),
                     "bytes": stats["bytes"], "sparse_int8_bytes": stats["sparse_int8_bytes"],
                     "dense_bf16_bytes": stats["dense_bf16_bytes"]},
    }
    return cfg
