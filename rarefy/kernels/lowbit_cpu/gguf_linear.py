"""A GGUF Q4_0 / Q4_1 / Q8_0 matrix kept as the file's bytes, as a linear layer.

``GGUFLinear.forward(x) = gguf_gemv_cpu(x, blocks, qtype, (out, in)) (+ bias)``: the weights
never exist in a dense dtype. ``use_gguf_blocks(model, path)`` swaps the projections (and
``lm_head``, tied or not) of a model loaded from that GGUF file for such layers, reading the
blocks straight from the file; llama.cpp's q/k row interleave is undone by moving whole rows
(``gguf_blocks.undo_rope_permute``), bit for bit. This is the piece the loader integrates.
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


def use_gguf_blocks(model: nn.Module, path_or_ckpt, act_quant: str | None = None) -> int:
    """Replace every projection (and lm_head) whose GGUF tensor is Q4_0/Q4_1/Q8_0 by a
    GGUFLinear reading the file's blocks; returns how many were replaced. The model must have
    been loaded from that file (same names and shapes)."""
    from rarefy.models.gguf_file import GGUFCheckpoint

    ckpt = path_or_ckpt if isinstance(path_or_ckpt, GGUFCheckpoint) else GGUFCheckpoint(path_or_ckpt)
    names = set(ckpt.tensor_names())
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not hasattr(child, "in_features") or isinstance(child, GGUFLinear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
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
