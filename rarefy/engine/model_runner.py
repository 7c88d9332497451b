"""The part of the engine that owns the device: the model, the paged KV cache, sampling.

One step is one forward pass over a packed batch ([1, N] tokens: prefill chunks and
decodes one after another, no padding), then one sampled token for every sequence
whose uncomputed tokens all ran in this step.
"""

from __future__ import annotations

import torch

from rarefy.engine.scheduler import ScheduledStep
from rarefy.engine.sequence import Sequence
from rarefy.kv.paged import PagedKVCache
from rarefy.layers.sampler import sample


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.device = model.device

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> list[int | None]:
        """Run the step; returns the sampled token of each scheduled sequence (None for a
        prefill chunk that leaves part of its prompt for a later step)."""
        ids, pos, last, sampling = [], [], [], []
        start = 0
        for seq, n in zip(step.seqs, step.num_new):
            a = seq.num_computed
            ids += seq.token_ids[a:a + n]
            pos += range(a, a + n)
            start += n
            if a + n == seq.num_tokens:
                last.append(start - 1)
                sampling.append(seq)
        self.cache.begin_step([s.seq_id for s in step.seqs], step.num_new, packed=True)
        dev = self.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        positions = torch.tensor([pos], dtype=torch.long, device=dev)
        for seq, n in zip(step.seqs, step.num_new):
            seq.num_computed += n
        if not sampling:
            self.model(input_ids, positions, self.cache, last_index=torch.tensor([start - 1], device=dev))
            return [None] * len(step.seqs)
        logits = self.model(input_ids, positions, self.cache, last_index=torch.tensor(last, device=dev))
        tokens = self._sample(logits, sampling)
        by_seq = dict(zip((s.seq_id for s in sampling), tokens))
        return [by_seq.get(s.seq_id) for s in step.seqs]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits: [R, vocab]; each sequence samples with its own parameters and seed."""
        out = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0.0]
        if greedy:
            picked = logits[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, picked):
                out[i] = t
        for i, s in enumerate(seqs):
            if s.params.temperature == 0.0:
                continue
            if s.generator is None and s.params.seed is not None:
                s.generator = torch.Generator(device=self.device).manual_seed(s.params.seed)
            out[i] = int(sample(logits[i:i + 1], s.params, s.generator)[0])
        return out
