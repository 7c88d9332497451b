"""Perplexity over non-overlapping chunks of a text file.

Each chunk of `ctx` tokens is scored on every token after its first (the
first has no context), or with `score_second_half` only on its second half, so
every scored token sees at least ctx/2 tokens of context (as llama.cpp's
perplexity tool does). The text is tokenized without BOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rarefy.errors import RarefyError


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float  # standard error of ppl, from the per-token NLL spread (delta method)
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    chunks: int
    ctx: int

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "stderr": self.stderr, "nll": self.nll, "tokens": self.tokens,
                "chunks": self.chunks, "ctx": self.ctx}


def chunk_tokens(token_ids: list[int], ctx: int, max_chunks: int | None) -> torch.Tensor:
    """[n_chunks, ctx] int64 of non-overlapping chunks (a trailing remainder is dropped)."""
    n = len(token_ids) // ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise RarefyError(f"the text has {len(token_ids)} tokens, fewer than one chunk of --ctx {ctx}")
    return torch.tensor(token_ids[: n * ctx], dtype=torch.long).view(n, ctx)


@torch.inference_mode()
def token_nlls(model, chunks: torch.Tensor, score_second_half: bool = False,
               batch_size: int = 1, progress: bool = False) -> torch.Tensor:
    """Per-token NLLs (float64, 1-D) of all scored tokens, chunk by chunk."""
    ctx = chunks.shape[1]
    first = ctx // 2 if score_second_half else 1  # index of the first scored target
    out = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=chunks.shape[0], desc="perplexity", unit="chunk")
    for start in range(0, chunks.shape[0], batch_size):
        batch = chunks[start:start + batch_size].to(model.device)
        logits = model(batch)  # [b, ctx, V]
        # logits at t predict token t+1; score targets first..ctx-1
        pred = logits[:, first - 1:-1].float()
        target = batch[:, first:]
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
        out.append(nll.double().cpu())
        if bar is not None:
            bar.update(batch.shape[0])
            bar.set_postfix(ppl=f"{math.exp(torch.cat(out).mean().item()):.3f}")
    if bar is not None:
        bar.close()
    return torch.cat(out)


def perplexity(model, token_ids: list[int], ctx: int = 512, max_chunks: int | None = None,
               score_second_half: bool = False, batch_size: int = 1,
               progress: bool = False) -> PerplexityResult:
    if ctx < 2:
        raise RarefyError("--ctx must be at least 2")
    if ctx > model.config.max_position_embeddings:
        raise RarefyError(f"--ctx {ctx} exceeds the model's context of "
                          f"{model.config.max_position_embeddings} tokens")
    if max_chunks is not None and max_chunks < 1:
        raise RarefyError("--chunks must be at least 1")
    chunks = chunk_tokens(token_ids, ctx, max_chunks)
    nlls = token_nlls(model, chunks, score_second_half, batch_size, progress)
    mean = nlls.mean().item()
    se_nll = (nlls.std(unbiased=True).item() / math.sqrt(len(nlls))) if len(nlls) > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl=ppl, stderr=ppl * se_nll, nll=mean, tokens=len(nlls),
                            chunks=chunks.shape[0], ctx=ctx)
