"""`rarefy bench kernels`: what is benchmarked. Weight shapes (the Llama-3-8B, Qwen3.5-27B and
SmolLM2-135M sets), sparsity patterns, and the parsers of --shapes, --patterns and --batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rarefy.errors import RarefyError

# ------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """A weight matrix [N, K] (nn.Linear layout: N outputs, K inputs)."""

    name: str
    n: int
    k: int

    @property
    def dims(self) -> str:
        return f"{self.n}x{self.k}"


LLAMA3_8B_SHAPES = (
    Shape("llama3-8b q/o", 4096, 4096),
    Shape("llama3-8b k/v", 1024, 4096),
    Shape("llama3-8b gate/up", 14336, 4096),
    Shape("llama3-8b down", 4096, 14336),
)
QWEN35_27B_SHAPES = (  # hidden 5120, FFN 17408, q projection 6144
    Shape("qwen3.5-27b 5120x5120", 5120, 5120),
    Shape("qwen3.5-27b gate/up", 17408, 5120),
    Shape("qwen3.5-27b down", 5120, 17408),
    Shape("qwen3.5-27b q_proj", 6144, 5120),
)
SMOLLM2_SHAPES = (  # the embedded SmolLM2-135M: hidden 576, MLP 1536, 3 KV heads of 64
    Shape("smollm2 q/o", 576, 576),
    Shape("smollm2 k/v", 192, 576),
    Shape("smollm2 gate/up", 1536, 576),
    Shape("smollm2 down", 576, 1536),
)
SHAPE_SETS = {"llama3-8b": LLAMA3_8B_SHAPES, "qwen3.5-27b": QWEN35_27B_SHAPES, "smollm2": SMOLLM2_SHAPES}
SUMMARY_PREFIX = "llama3-8b"  # the summary's medians are over these shapes


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """"llama3-8b,qwen3.5-27b" (set names), "4096x4096,64x96" (N x K) or a mix."""
    out: list[Shape] = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item.lower() in SHAPE_SETS:
            out.extend(SHAPE_SETS[item.lower()])
            continue
        try:
            n_s, k_s = item.lower().split("x")
            n, k = int(n_s), int(k_s)
        except ValueError:
            raise RarefyError(f"--shapes: '{item}' is neither NxK (e.g. 4096x4096) nor one of "
                              f"{', '.join(SHAPE_SETS)}") from None
        if n < 1 or k < 1:
            raise RarefyError(f"--shapes: {item} has a non-positive side")
        known = [s for group in SHAPE_SETS.values() for s in group if (s.n, s.k) == (n, k)]
        out.append(known[0] if known else Shape(f"{n}x{k}", n, k))
    if not out:
        raise RarefyError("--shapes: give at least one shape")
    seen, uniq = set(), []
    for s in out:
        if (s.n, s.k) not in seen:
            seen.add((s.n, s.k))
            uniq.append(s)
    return tuple(uniq)


# ----------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class BenchPattern:
    """A sparsity pattern: unstructured at `sparsity`, n:m, or square blocks at `sparsity`."""

    kind: str  # "unstructured" | "nm" | "block"
    sparsity: float
    n: int = 0
    m: int = 0
    block: int = 0

    @property
    def label(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block} {self.sparsity:.0%}"
        return f"unstr {self.sparsity:.0%}"

    @property
    def spec(self) -> str:
        """The --patterns text that gives this pattern."""
        pct = f"{100 * self.sparsity:g}"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"b{self.block}@{pct}"
        return pct

    @property
    def format(self) -> str:
        """The explicit rarefy format for this pattern."""
        return {"unstructured": "bitmap", "nm": "nm", "block": "bsr"}[self.kind]

    def unfit_reason(self, n: int, k: int) -> Optional[str]:
        if self.kind == "nm" and k % self.m:
            return f"K={k} is not a multiple of {self.m}"
        if self.kind == "block" and (n % self.block or k % self.block):
            return f"block {self.block} does not divide {n}x{k}"
        return None

    def keep_mask(self, score: torch.Tensor) -> torch.Tensor:
        from rarefy.sparsity.masks import block_mask, nm_mask, unstructured_mask

        if self.kind == "nm":
            return nm_mask(score, self.n, self.m)
        if self.kind == "block":
            return block_mask(score, self.sparsity, self.block, self.block)
        return unstructured_mask(score, self.sparsity)

    def to_format(self, w: torch.Tensor):
        from rarefy.formats.sparse_weight import BlockSparse, NMSparse, TiledBitmap

        if self.kind == "nm":
            return NMSparse.from_dense(w, self.n, self.m)
        if self.kind == "block":
            return BlockSparse.from_dense(w, self.block)
        return TiledBitmap.from_dense(w)


# Block patterns at both 50% and 75% of the blocks removed: 50% is the sparsity where the
# unstructured/2:4 comparison is made, 75% is where block sparsity has a quality budget to
# spend (whole blocks hurt more than single weights at the same count).
DEFAULT_PATTERNS = "50,70,75,90,2:4,4:8,b16@50,b32@50,b64@50,b16@75,b32@75,b64@75"


def parse_patterns(text: str) -> tuple[BenchPattern, ...]:
    """"50,90" unstructured %, "2:4" n:m, "b16@50" blocks of 16x16 with 50% of blocks removed."""
    out: list[BenchPattern] = []
    for item in (v.strip().lower().rstrip("%") for v in text.split(",")):
        if not item:
            continue
        try:
            if ":" in item:
                n_s, m_s = item.split(":")
                n, m = int(n_s), int(m_s)
                if not (0 < n < m) or 32 % m:
                    raise RarefyError(f"--patterns: {item} needs 0 < n < m and m dividing 32")
                out.append(BenchPattern("nm", 1 - n / m, n=n, m=m))
            elif item.startswith("b"):
                b_s, _, s_s = item.removeprefix("block").removeprefix("b").partition("@")
                b, s = int(b_s), float(s_s or 50)
                if b < 1:
                    raise RarefyError(f"--patterns: block size must be positive in {item}")
                out.append(BenchPattern("block", _pct(s, item), block=b))
            else:
                out.append(BenchPattern("unstructured", _pct(float(item.removeprefix("u")), item)))
        except ValueError:
            raise RarefyError(f"--patterns: cannot read '{item}' (expected e.g. 50, 2:4, b16@50)") from None
    if not out:
        raise RarefyError("--patterns: give at least one pattern")
    return tuple(dict.fromkeys(out))


def _pct(v: float, item: str) -> float:
    if not 0 < v < 100:
        raise RarefyError(f"--patterns: sparsity in '{item}' must be a percentage in (0, 100)")
    return v / 100


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        vals = sorted({int(v) for v in text.replace(" ", "").split(",") if v})
    except ValueError:
        raise RarefyError(f"--batches: expected comma-separated integers, got '{text}'") from None
    if not vals or vals[0] < 1:
        raise RarefyError(f"--batches: batches must be positive integers, got '{text}'")
    return tuple(vals)
