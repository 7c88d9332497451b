"""A GGUF Q4_0 / Q4_1 / Q8_0 matrix kept as the file's bytes, as a linear layer.

``GGUFLinear.forward(x) = gguf_gemv_cpu(x, blocks, qtype, (out, in)) (+ bias)``: the weights
never exist in a dense dtype. ``use_gguf_blocks(model, path)`` swaps the projections (and
``lm_head``, tied or not) of a model loaded from that GGUF file for such layers, reading the
blocks straight from the file; llama.cpp's q/k row interleave is undone by moving whole rows
(``gguf_blocks.undo_rope_permute``), bit for bit. ``fuse_gguf`` stacks layers that read the
same input (q/k/v, gate/up) into one, also bit for bit (whole rows of blocks), and
``fuse_gguf_projections(model)`` does that for a whole model: a decode step then makes 4 calls
per layer instead of 7 (each call has a fixed cost of a few µs). These are the pieces the
loader integrates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rarefy.errors import RarefyError
from rarefy.formats import gguf_blocks

from . import QTYPES, gguf_gemv_cpu

# Past this many rows of x a dense GEMM on the dequantized weight wins (prefill).
MAX_KERNEL_ROWS = 64


class GGUFLinear(nn.Module):
    """y = x @ W^T (+ b), W given by GGUF blocks (uint8 buffer ``blocks``); x, b, y float32."""

    def __init__(self, blocks: torch.Tensor, qtype: str, shape, bias: torch.Tensor | None = None,
                 act_quant: str | None = None):
        super().__init__()
        n, k = gguf_blocks.check_blocks(blocks, qtype, shape)
        if qtype not in QTYPES:
            raise RarefyError(f"GGUFLinear: unsupported block type {qtype!r}")
        self.qtype, self.out_features, self.in_features = qtype, n, k
        self.shape = (n, k)
        self.act_quant = act_quant  # None: 16-bit activations per block; "int8": llama.cpp's Q8
        self.register_buffer("blocks", blocks.contiguous())
        self.bias = nn.Parameter(bias.detach().float().contiguous(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode calls this ~200 times a token: the common case goes straight to the op
        if x.dtype == torch.float32 and x.numel() <= MAX_KERNEL_ROWS * self.in_features:
            return gguf_gemv_cpu(x, self.blocks, self.qtype, self.shape, act_quant=self.act_quant, bias=self.bias)
        dt = x.dtype
        x = x.float()
        if x.numel() // self.in_features > MAX_KERNEL_ROWS:
            y = F.linear(x, gguf_blocks.dequantize(self.blocks, self.qtype, self.shape), self.bias)
        else:
            y = gguf_gemv_cpu(x, self.blocks, self.qtype, self.shape, act_quant=self.act_quant, bias=self.bias)
        return y.to(dt)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return gguf_blocks.dequantize(self.blocks, self.qtype, self.shape, dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, weight={self.qtype}, "
                f"act={'int8' if self.act_quant else '16-bit'}")


def _blocks_in_hf_order(ckpt, hf_name: str):
    """(blocks, qtype, shape) of a GGUF tensor, q/k rows un-interleaved; None if not a block type."""
    tensor = ckpt._tensor(hf_name)
    if tensor.tensor_type.name not in QTYPES:
        return None
    blocks, qtype, shape = gguf_blocks.from_reader_tensor(tensor)
    if ckpt.architecture == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
        heads = ckpt.config_dict["num_attention_heads" if ".q_proj." in hf_name else "num_key_value_heads"]
        blocks = gguf_blocks.undo_rope_permute(blocks, qtype, shape, heads)
    return blocks, qtype, shape


def use_gguf_blocks(model: nn.Module, path_or_ckpt, act_quant: str | None = None,
                    only: tuple[str, ...] | None = None) -> int:
    """Replace every projection (and lm_head) whose GGUF tensor is Q4_0/Q4_1/Q8_0 by a
    GGUFLinear reading the file's blocks; returns how many were replaced. The model must have
    been loaded from that file (same names and shapes). `only`: module names to consider
    (e.g. ``("lm_head",)`` for a model whose projections are already low-bit); others are kept.
    Layers that are not dense (low-bit, sparse, GGUF) are never replaced."""
    from rarefy.models.gguf_file import GGUFCheckpoint

    ckpt = path_or_ckpt if isinstance(path_or_ckpt, GGUFCheckpoint) else GGUFCheckpoint(path_or_ckpt)
    names = set(ckpt.tensor_names())
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not hasattr(child, "in_features") or isinstance(child, GGUFLinear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if only is not None and name not in only:
                continue
            if not isinstance(getattr(child, "weight", None), torch.Tensor):
                continue  # a low-bit / packed layer: not the file's dense tensor any more
            wname = f"{name}.weight"
            if wname not in names and name == "lm_head" and "model.embed_tokens.weight" in names:
                wname = "model.embed_tokens.weight"  # tied output projection
            if wname not in names:
                continue
            got = _blocks_in_hf_order(ckpt, wname)
            if got is None:
                continue
            blocks, qtype, shape = got
            if shape != (child.out_features, child.in_features):
                raise RarefyError(f"{wname}: GGUF shape {shape} does not match the layer's "
                                  f"({child.out_features}, {child.in_features})")
            bias = getattr(child, "bias", None)
            setattr(parent, child_name, GGUFLinear(blocks, qtype, shape, bias, act_quant))
            count += 1
    return count


def fuse_gguf(layers: list[GGUFLinear]) -> GGUFLinear:
    """One GGUFLinear whose output is the concatenation of `layers`' outputs (same input, same
    block type and activation mode): the blocks are stacked row-wise, a lossless copy."""
    first = layers[0]
    for m in layers:
        if not isinstance(m, GGUFLinear) or (m.qtype, m.in_features, m.act_quant) != (
                first.qtype, first.in_features, first.act_quant):
            raise RarefyError("fuse_gguf needs GGUFLinear layers of one block type, input size and activation mode")
        if (m.bias is None) != (first.bias is None):
            raise RarefyError("fuse_gguf: either all layers have a bias or none")
    blocks = torch.cat([m.blocks for m in layers])
    bias = torch.cat([m.bias for m in layers]) if first.bias is not None else None
    return GGUFLinear(blocks, first.qtype, (sum(m.out_features for m in layers), first.in_features), bias,
                      first.act_quant)


def fuse_gguf_projections(model: nn.Module) -> int:
    """Stack q/k/v (into ``qkv_proj``) and gate/up (into ``gate_up_proj``) wherever they are all
    GGUFLinear of one block type; returns how many fused layers were made."""
    count = 0
    for mod in model.modules():
        groups = [("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))]
        for fused_name, names in groups:
            if getattr(mod, fused_name, "missing") is not None or not all(hasattr(mod, n) for n in names):
                continue
            parts = [getattr(mod, n) for n in names]
            if not all(isinstance(p, GGUFLinear) for p in parts):
                continue
            if len({(p.qtype, p.in_features, p.act_quant, p.bias is None) for p in parts}) != 1:
                continue
            setattr(mod, fused_name, fuse_gguf(parts))
            for n in names:
                delattr(mod, n)
            count += 1
    return count
