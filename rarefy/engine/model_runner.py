"""The part of the engine that owns the device: the model, the paged KV cache, sampling.

One step is one forward pass over a packed batch ([1, N] tokens: prefill chunks and
decodes one after another, no padding), then one sampled token for every sequence
whose uncomputed tokens all ran in this step.

On CUDA a step made only of decodes replays a CUDA graph captured for the smallest
batch bucket that holds it (rows past the batch are padding: slot -1, length 0), so
the hundreds of small launches of a decode step cost one. Graphs read the step's
metadata from static buffers that each replay refills.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rarefy.engine.scheduler import ScheduledStep
from rarefy.engine.sequence import PENDING, Sequence
from rarefy.kv.paged import PagedKVCache, StepMeta
from rarefy.layers.sampler import sample

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class InFlight:
    """A launched step's sampled tokens: on the device, and (once `done`) on the host."""
    seqs: list[Sequence]
    tokens: torch.Tensor  # [B] on the device
    host: torch.Tensor  # [B] pinned host copy, valid after `done`
    done: object  # torch.cuda.Event, or None on the CPU

    def read(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class _DecodeGraph:
    """A decode step of `batch` rows captured once; static inputs refilled per replay."""

    def __init__(self, model, cache: PagedKVCache, batch: int, max_blocks: int, compile: bool = False):
        dev = model.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.meta = StepMeta(
            seq_ids=list(range(batch)), num_new=[1] * batch, packed=False,
            slot_mapping=torch.full((batch, 1), -1, dtype=torch.long, device=dev),
            block_tables=torch.zeros(batch, max_blocks, dtype=torch.int32, device=dev),
            seq_lens=torch.zeros(batch, dtype=torch.int32, device=dev),
            q_start=torch.zeros(batch, dtype=torch.long, device=dev), q_start_host=[0] * batch,
            token_start=list(range(batch)), max_len=max_blocks * cache.block_size)
        cache.meta = self.meta
        if compile:  # fuse the step's small element-wise kernels before capturing
            model = torch.compile(model, dynamic=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile/autotune the kernels outside the capture
            for _ in range(2):
                model(self.ids, self.positions, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.ids, self.positions, cache)[:, -1]


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, use_cuda_graph: bool = True, max_model_len: int | None = None,
                 compile: bool = False):
        self.model, self.cache = model, cache
        self.compile = compile
        self.device = model.device
        # masking policies (top-k, threshold, entropy) gather with data-dependent shapes
        maskers = [p for p in cache.layer_policy if p is not None and p is not cache.evict_policy]
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda" and not maskers
        max_len = max_model_len or model.config.max_position_embeddings
        self.max_blocks = -(-max_len // cache.block_size)
        self._graphs: dict[int, _DecodeGraph] = {}
        if self.device.type == "cuda":
            model.fuse_projections()

    @staticmethod
    def decode_only(step: ScheduledStep) -> bool:
        return all(n == 1 and s.num_uncomputed == 1 for s, n in zip(step.seqs, step.num_new))

    def graphable(self, step: ScheduledStep) -> bool:
        """A decode-only step that a captured graph can run."""
        return self.use_cuda_graph and len(step.seqs) <= GRAPH_BUCKETS[-1] and self.decode_only(step)

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> list[int | None]:
        """Run the step; returns the sampled token of each scheduled sequence (None for a
        prefill chunk that leaves part of its prompt for a later step)."""
        if self.graphable(step):
            return self.launch_decode(step).read()
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
        tokens = self._sample(logits, sampling).tolist()
        by_seq = dict(zip((s.seq_id for s in sampling), tokens))
        return [by_seq.get(s.seq_id) for s in step.seqs]

    @torch.inference_mode()
    def launch_decode(self, step: ScheduledStep, prev=None) -> torch.Tensor:
        """Queue a decode-only step on the GPU as a graph replay; returns its sampled tokens
        as an InFlight without waiting for them. A sequence whose last token is still
        PENDING takes it from `prev` (the InFlight of the step before) on the device, so
        the host can prepare this step while the GPU still runs that one."""
        B = len(step.seqs)
        if not self.graphable(step):  # eager (CPU, or no graph for this size): same inputs
            return self._eager_decode(step, prev)
        bucket = next(b for b in GRAPH_BUCKETS if b >= B)
        g = self._graphs.get(bucket)
        if g is None:
            g = self._graphs[bucket] = _DecodeGraph(self.model, self.cache, bucket, self.max_blocks, self.compile)
        blocks = self.cache.blocks
        slots = blocks.append([s.seq_id for s in step.seqs], [1] * B)
        pad = bucket - B
        bs, width = blocks.block_size, self.max_blocks
        rows, lens = [], []
        for s in step.seqs:
            sb = blocks.seqs[s.seq_id]
            rows.append(sb.blocks + [0] * (width - len(sb.blocks)))
            lens.append(sb.stored(bs))
        table = torch.tensor(rows, dtype=torch.int32)
        last = [s.last_token for s in step.seqs]
        # One host tensor, one non-blocking copy: a blocking one (torch.tensor(..., device=))
        # would wait for the step still running on the GPU and undo the pipelining.
        host = torch.tensor([last + [0] * pad,
                             [s.num_tokens - 1 for s in step.seqs] + [0] * pad,
                             [sl[0] for sl in slots] + [-1] * pad,
                             lens + [0] * pad,
                             self._pending_rows(step.seqs, last, prev) + [-1] * pad],
                            dtype=torch.long).to(self.device, non_blocking=True)
        g.ids.copy_(self._resolve_ids(host[0], host[4], prev)[:, None])
        g.positions.copy_(host[1, :, None])
        g.meta.slot_mapping.copy_(host[2, :, None])
        g.meta.seq_lens.copy_(host[3])
        g.meta.block_tables[:B].copy_(table, non_blocking=True)
        if pad:
            g.meta.block_tables[B:].zero_()
        self.cache.meta = g.meta
        g.graph.replay()
        for s in step.seqs:
            s.num_computed += 1
        return self._in_flight(step.seqs, self._sample(g.logits[:B], step.seqs))

    def _in_flight(self, seqs, tokens: torch.Tensor) -> "InFlight":
        """Start copying the sampled tokens to the host now, ahead of the next step in the
        stream: reading them later with .tolist() would wait for that next step too."""
        if tokens.device.type != "cuda":
            return InFlight(seqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return InFlight(seqs, tokens, host, done)

    @staticmethod
    def _pending_rows(seqs, last, prev) -> list[int]:
        """For each row, the row of the previous step holding its PENDING last token, else -1."""
        if prev is None or PENDING not in last:
            return [-1] * len(seqs)
        prev_row = {s.seq_id: r for r, s in enumerate(prev.seqs)}
        return [prev_row[s.seq_id] if t == PENDING else -1 for s, t in zip(seqs, last)]

    @staticmethod
    def _resolve_ids(ids, src, prev):
        """Input ids on the device, PENDING ones read from the previous step's samples."""
        if prev is None:
            return ids
        return torch.where(src >= 0, prev.tokens[src.clamp_min(0)], ids)

    def _eager_decode(self, step: ScheduledStep, prev) -> torch.Tensor:
        seqs = step.seqs
        self.cache.begin_step([s.seq_id for s in seqs], [1] * len(seqs))
        last = [s.last_token for s in seqs]
        host = torch.tensor([last, self._pending_rows(seqs, last, prev)]).to(self.device, non_blocking=True)
        ids = self._resolve_ids(host[0], host[1], prev)
        positions = torch.tensor([[s.num_tokens - 1] for s in seqs], device=self.device)
        logits = self.model(ids[:, None], positions, self.cache)[:, -1]
        for s in seqs:
            s.num_computed += 1
        return self._in_flight(seqs, self._sample(logits, seqs))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits: [R, vocab] → tokens [R] on the device; each sequence samples with its own
        parameters and seed."""
        out = logits.argmax(dim=-1)
        for i, s in enumerate(seqs):
            if s.params.temperature == 0.0:
                continue
            if s.generator is None and s.params.seed is not None:
                s.generator = torch.Generator(device=self.device).manual_seed(s.params.seed)
            out[i] = sample(logits[i:i + 1], s.params, s.generator)[0]
        return out
