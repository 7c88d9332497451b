"""Token sampling: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from rarefy.errors import RarefyError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise RarefyError("--max-tokens must be at least 1")
        if self.temperature < 0:
            raise RarefyError("--temperature must be >= 0")
        if self.top_k < 0:
            raise RarefyError("--top-k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise RarefyError("--top-p must be in (0, 1]")


ARGMAX_CHUNK = 512  # two-stage argmax: logits per first-stage row


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for [B, V] logits (the first index among equal maxima). On the GPU
    large vocabularies take :func:`argmax_two_stage`: a one-row reduction over 128k logits runs
    in one thread block (H100 profile: 37 µs a step for Llama-3's vocabulary)."""
    if not logits.is_cuda or logits.shape[0] == 0 or logits.shape[-1] < 8 * ARGMAX_CHUNK:
        return logits.argmax(dim=-1)
    return argmax_two_stage(logits)


def argmax_two_stage(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last axis of [B, V] in two stages: the max and its first index per chunk of
    about ARGMAX_CHUNK logits (many rows reduced in parallel), then the first chunk that holds the
    overall max. Same index as ``argmax``, ties included (any padding is -inf, never chosen over a
    logit)."""
    b, v = logits.shape
    c = _chunk_for(v)
    pad = -v % c
    x = logits if not pad else torch.nn.functional.pad(logits, (0, pad), value=float("-inf"))
    vals, idx = x.view(b, -1, c).max(dim=-1)
    chunk = vals.argmax(dim=-1, keepdim=True)
    return (chunk * c + idx.gather(-1, chunk)).squeeze(-1)


@functools.lru_cache(maxsize=None)  # called every decode step: search once per vocabulary size
def _chunk_for(v: int) -> int:
    """A chunk length that divides ``v`` near ARGMAX_CHUNK (no padding copy: 501 for Llama-3's
    128,256), else ARGMAX_CHUNK itself."""
    for d in range(ARGMAX_CHUNK, ARGMAX_CHUNK // 2 - 1, -1):
        if v % d == 0:
            return d
    return ARGMAX_CHUNK


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] -> token ids [B] int64."""
    if params.temperature == 0.0:
        return greedy_tokens(logits)
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
