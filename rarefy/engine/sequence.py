"""One request's state as it moves through the engine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

from rarefy.layers.sampler import SamplingParams

_next_id = itertools.count()
PENDING = -1  # an output token sampled on the GPU that the host has not read yet


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str | None = None
    seq_id: int = field(default_factory=lambda: next(_next_id))
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose keys/values are in the KV cache
    finish_reason: str | None = None  # "stop", "length" or "abort"
    num_preemptions: int = 0
    text: str = ""  # detokenized output, maintained by the engine
    generator: object = None  # torch.Generator for a seeded request, made by the runner

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model: the prompt (or its rest) during prefill,
        the last sampled token during decode, everything after a preemption."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
