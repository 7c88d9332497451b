"""GGUF's Q4_0, Q4_1 and Q8_0 block formats, kept as the file's bytes.

A GGUF tensor of shape ``[N, K]`` (HF layout ``[out, in]``; GGUF lists the dimensions the
other way round, ``ne = [K, N]``) is ``N`` rows of ``K / 32`` blocks, each block 32
consecutive weights of one row, rows back to back, no padding:

=======  =====  =================================================  ======================
type     bytes  layout (little endian)                             weight j (0..31)
=======  =====  =================================================  ======================
Q4_0     18     ``d: fp16``, ``qs: 16 x uint8``                    ``d * (q_j - 8)``
Q4_1     20     ``d: fp16``, ``m: fp16``, ``qs: 16 x uint8``       ``d * q_j + m``
Q8_0     34     ``d: fp16``, ``qs: 32 x int8``                     ``d * qs[j]``
=======  =====  =================================================  ======================

For the 4-bit types ``q_j = qs[j] & 0xF`` for ``j < 16`` and ``q_j = qs[j - 16] >> 4`` for
``j >= 16`` (low nibbles hold the first half of the block). Bits per weight: 4.5 / 5 / 8.5.

This module is the reference (``dequantize``: exactly gguf-py's arithmetic, fp16 scales
widened to fp32, one fp32 multiply (+ add)), a quantizer with llama.cpp's reference rounding
(``quantize``: for tests and synthetic files), and lossless row permutations. The CPU kernel
(``rarefy.kernels.lowbit_cpu.gguf_gemv_cpu``) reads these bytes in place (one ``vpermt2b``
gathers the quants of 4 blocks into a register), so no kernel-friendly copy is made
(docs/lowbit-kernels.md, CPU part, says why); the one repack the engine needs is the row
permutation that undoes llama.cpp's q/k rope interleave (``undo_rope_permute``), which moves
whole rows and so whole blocks, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rarefy.errors import RarefyError

BLOCK = 32  # weights per block, all three types


@dataclass(frozen=True)
class BlockType:
    name: str
    nbytes: int        # bytes per block
    header: int        # bytes of fp16 scale(s) before the quants
    ggml_type: int     # GGMLQuantizationType value


QTYPES: dict[str, BlockType] = {
    "Q4_0": BlockType("Q4_0", 18, 2, 2),
    "Q4_1": BlockType("Q4_1", 20, 4, 3),
    "Q8_0": BlockType("Q8_0", 34, 2, 8),
}


def block_type(qtype: str) -> BlockType:
    try:
        return QTYPES[qtype]
    except (KeyError, TypeError):
        raise RarefyError(f"unsupported GGUF block type {qtype!r} (supported: {', '.join(QTYPES)})") from None


def check_shape(qtype: str, shape) -> tuple[int, int]:
    """``(N, K)`` from a 2-item shape; K must be a multiple of 32."""
    block_type(qtype)
    try:
        n, k = (int(d) for d in shape)
    except (TypeError, ValueError):
        raise RarefyError(f"GGUF tensor shape must be (out_features, in_features), got {shape!r}") from None
    if n < 0 or k < 0:
        raise RarefyError(f"GGUF tensor shape must be non-negative, got {shape!r}")
    if k % BLOCK:
        raise RarefyError(f"{qtype} rows hold blocks of {BLOCK} weights; in_features {k} is not a multiple of {BLOCK}")
    return n, k


def row_nbytes(qtype: str, k: int) -> int:
    return (k // BLOCK) * block_type(qtype).nbytes


def tensor_nbytes(qtype: str, shape) -> int:
    n, k = check_shape(qtype, shape)
    return n * row_nbytes(qtype, k)


def check_blocks(blocks: torch.Tensor, qtype: str, shape) -> tuple[int, int]:
    """Validate raw bytes for a ``[N, K]`` tensor of ``qtype``; returns ``(N, K)``."""
    n, k = check_shape(qtype, shape)
    if not isinstance(blocks, torch.Tensor):
        raise RarefyError(f"GGUF blocks must be a torch.Tensor of bytes, got {type(blocks).__name__}")
    if blocks.dtype != torch.uint8:
        raise RarefyError(f"GGUF blocks must be uint8 (the file's raw bytes), got {blocks.dtype}")
    want = n * row_nbytes(qtype, k)
    if blocks.numel() != want:
        raise RarefyError(f"{qtype} [{n}, {k}] takes {want} bytes, the blocks tensor has {blocks.numel()}")
    return n, k


def _blocks(blocks: torch.Tensor, qtype: str, shape) -> tuple[torch.Tensor, int, int]:
    n, k = check_blocks(blocks, qtype, shape)
    bt = QTYPES[qtype]
    return blocks.reshape(n * (k // BLOCK), bt.nbytes), n, k


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [..., 1] float32 (fp16 bits, little endian)."""
    return b.contiguous().view(torch.float16).float()


def dequantize(blocks: torch.Tensor, qtype: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, K]`` weights from the raw bytes (fp32 arithmetic as gguf-py / ggml, then cast)."""
    b, n, k = _blocks(blocks, qtype, shape)
    bt = QTYPES[qtype]
    d = _f16(b[:, 0:2])
    if qtype == "Q8_0":
        w = d * b[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = b[:, bt.header:]
        q = torch.cat([qs & 0xF, qs >> 4], dim=1).float()
        w = d * (q - 8.0) if qtype == "Q4_0" else d * q + _f16(b[:, 2:4])
    return w.reshape(n, k).to(dtype)


def quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """Quantize a float ``[N, K]`` matrix (K a multiple of 32) to raw blocks, uint8 ``[N * row bytes]``.

    llama.cpp's reference rounding (``quantize_row_*_ref``, as gguf-py's quantizers):
    Q4_0 ``d = v / -8`` with ``v`` the block's value of largest magnitude,
    ``q = min(15, trunc(x / d + 8.5))``; Q4_1 ``d = (max - min) / 15``, ``m = min``,
    ``q = min(15, trunc((x - min) / d + 0.5))``; Q8_0 ``d = amax / 127``, ``q = round(x / d)``.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise RarefyError(f"quantize takes a float [N, K] matrix, got {w.dtype} {tuple(w.shape)}")
    n, k = check_shape(qtype, w.shape)
    x = w.detach().float().reshape(-1, BLOCK)
    if qtype == "Q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.round(x * inv).to(torch.int8).view(torch.uint8)
        out = torch.cat([d.half().view(torch.uint8), q], dim=1)
    else:
        if qtype == "Q4_0":
            idx = x.abs().argmax(-1, keepdim=True)
            d = x.gather(-1, idx) / -8
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.trunc(x * inv + 8.5).clamp(max=15)
            head = d.half().view(torch.uint8)
        else:
            mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
            d = (mx - mn) / 15
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.trunc((x - mn) * inv + 0.5).clamp(0, 15)
            head = torch.cat([d.half().view(torch.uint8), mn.half().view(torch.uint8)], dim=1)
        q = q.to(torch.uint8)
        out = torch.cat([head, q[:, :16] | (q[:, 16:] << 4)], dim=1)
    return out.reshape(n * row_nbytes(qtype, k)).contiguous()


def permute_rows(blocks: torch.Tensor, qtype: str, shape, perm: torch.Tensor) -> torch.Tensor:
    """Rows reordered, ``new[i] = old[perm[i]]``: lossless (rows are whole blocks)."""
    n, _ = check_blocks(blocks, qtype, shape)
    perm = torch.as_tensor(perm, dtype=torch.long)
    if perm.shape != (n,) or not torch.equal(torch.sort(perm).values, torch.arange(n)):
        raise RarefyError(f"permute_rows needs a permutation of {n} rows")
    return blocks.reshape(n, -1)[perm].reshape(-1).contiguous()


def rope_unpermute_index(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k interleave (see gguf_file._undo_rope_permute):
    GGUF row ``(h, i, half)`` goes back to HF row ``(h, half, i)``."""
    if n_head <= 0 or n_rows % (2 * n_head):
        raise RarefyError(f"{n_rows} rows are not a multiple of 2 x {n_head} heads")
    half = n_rows // n_head // 2
    return torch.arange(n_rows).reshape(n_head, half, 2).transpose(1, 2).reshape(-1)


def undo_rope_permute(blocks: torch.Tensor, qtype: str, shape, n_head: int) -> torch.Tensor:
    """The q/k projection's rows in HF order, still as blocks (bit-exact)."""
    n, _ = check_blocks(blocks, qtype, shape)
    return permute_rows(blocks, qtype, shape, rope_unpermute_index(n, n_head))


def from_reader_tensor(tensor) -> tuple[torch.Tensor, str, tuple[int, int]]:
    """``(blocks, qtype, (N, K))`` of a ``gguf.GGUFReader`` tensor (bytes copied out of the map)."""
    import numpy as np

    qtype = tensor.tensor_type.name
    block_type(qtype)
    dims = [int(d) for d in tensor.shape.tolist()]
    if len(dims) != 2:
        raise RarefyError(f"tensor {tensor.name!r} is {len(dims)}-D; GGUF blocks here are 2-D matrices")
    shape = (dims[1], dims[0])
    raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1).copy()
    blocks = torch.from_numpy(raw)
    check_blocks(blocks, qtype, shape)
    return blocks, qtype, shape
