"""The "sparse-bitmask" layout of compressed-tensors, written and read by rarefy's own code.

A weight `<prefix>.weight` of shape [rows, cols] is stored as four tensors (the
`.weight` suffix is dropped from their names, as compressed-tensors does):

    <prefix>.shape        int64 [2]                   the dense shape
    <prefix>.compressed   weight dtype [nnz]          the nonzero values, row-major order
    <prefix>.bitmask      uint8 [rows, ceil(cols/8)]  bit j of byte k in a row = column 8k+j
                                                      (LSB first, numpy packbits bitorder="little")
    <prefix>.row_offsets  int64 [rows]                index in `compressed` of each row's first value

"Nonzero" means `value != 0`, so -0.0 is dropped and decodes as +0.0 (the same
value; only the sign bit of a zero can differ), while NaN and inf are kept.
This is the encoding compressed-tensors' BitmaskCompressor (<= 0.14) writes; see
docs/formats.md.
"""

from __future__ import annotations

import numpy as np
import torch

from rarefy.errors import RarefyError

SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")

def prefix_of(weight_name: str) -> str:
    """"a.b.weight" -> "a.b": compressed-tensors names the parts after the module, not the weight."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def part_names(weight_name: str) -> dict[str, str]:
    """The stored tensor name of each part, e.g. {"bitmask": "a.b.bitmask", ...}."""
    prefix = prefix_of(weight_name)
    return {s: f"{prefix}.{s}" for s in SUFFIXES}


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], LSB-first within each byte."""
    return torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))


def unpack_mask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, nbytes] -> bool [rows, cols]; the padding bits of the last byte are ignored."""
    bits = np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))


def _raw(t: torch.Tensor) -> torch.Tensor:
    """An integer view of the same bytes: indexing copies bits exactly for every dtype
    (float8 types cannot be indexed by a mask in every torch build)."""
    if t.dtype.is_floating_point and t.element_size() in (1, 2, 4, 8):
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Set bits per row, int64 (numpy's count is ~10x faster than torch's bool sum)."""
    return torch.from_numpy(np.count_nonzero(mask.numpy(), axis=-1).astype(np.int64))


def encode_bitmask(dense: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compress a 2-D tensor [out, in] of any dtype.

    Returns {"shape", "compressed", "bitmask", "row_offsets"} (unprefixed; see
    `part_names` for the names they take in a checkpoint), all contiguous on the CPU.
    """
    if dense.dim() != 2:
        raise ValueError(f"sparse-bitmask encodes 2-D weights, got shape {tuple(dense.shape)}")
    dense = dense.detach().cpu().contiguous()
    mask = dense != 0
    counts = _row_counts(mask)
    # nonzero + index_select is several times faster than boolean indexing on big matrices
    where = mask.view(-1).nonzero().squeeze(1)
    values = _raw(dense).view(-1).index_select(0, where).view(dense.dtype)
    return {
        "shape": torch.tensor(list(dense.shape), dtype=torch.int64),
        "compressed": values.contiguous(),
        "bitmask": pack_mask(mask),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def decode_bitmask(tensors: dict[str, torch.Tensor], name: str = "tensor") -> torch.Tensor:
    """Rebuild the dense tensor from `encode_bitmask`'s four parts (unprefixed keys).

    Checks that the parts agree with each other (shape vs bitmask, number of set bits
    vs values, row offsets), so a damaged checkpoint fails with a RarefyError naming
    `name` instead of producing a silently wrong matrix.
    """
    try:
        shape, values = tensors["shape"], tensors["compressed"]
        bitmask, offsets = tensors["bitmask"], tensors["row_offsets"]
    except KeyError as e:
        raise RarefyError(f"compressed weight {name} lacks its '{e.args[0]}' part") from None
    dims = [int(d) for d in shape.reshape(-1).tolist()]
    if len(dims) != 2 or min(dims) < 0:
        raise RarefyError(f"compressed weight {name}: shape {dims} is not a 2-D shape")
    rows, cols = dims
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise RarefyError(f"compressed weight {name}: bitmask {bitmask.dtype} {tuple(bitmask.shape)} "
                          f"does not fit shape {dims}")
    mask = unpack_mask(bitmask.cpu().contiguous(), cols)
    counts = _row_counts(mask)
    if values.dim() != 1 or values.numel() != int(counts.sum()):
        raise RarefyError(f"compressed weight {name}: {values.numel()} values for "
                          f"{int(counts.sum())} set bits in the bitmask")
    if offsets.numel() != rows or not torch.equal(offsets.reshape(-1).to(torch.int64).cpu(),
                                                   torch.cumsum(counts, 0) - counts):
        raise RarefyError(f"compressed weight {name}: row_offsets disagree with the bitmask")
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    # masked_scatter fills the set bits in row-major order: the order the values were stored.
    _raw(dense).masked_scatter_(mask, _raw(values.cpu().contiguous()))
    return dense


def encoded_nbytes(parts: dict[str, torch.Tensor]) -> int:
    """Bytes the parts take on disk (tensor data only)."""
    return sum(t.numel() * t.element_size() for t in parts.values())


def encoded_nbytes_estimate(rows: int, cols: int, nonzeros: int, itemsize: int) -> int:
    """What `encoded_nbytes(encode_bitmask(w))` will be, without encoding w."""
    return 16 + nonzeros * itemsize + rows * ((cols + 7) // 8) + rows * 8
