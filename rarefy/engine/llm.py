"""The offline API: `rarefy.LLM(model).generate(prompts, params)`, results in order.

    from rarefy import LLM, SamplingParams
    llm = LLM()                                 # the embedded model, CPU
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(max_tokens=32))
    print(outs[0].text)

All prompts are queued at once and run with continuous batching over the paged KV
cache (rarefy.engine.llm_engine).
"""

from __future__ import annotations

from dataclasses import dataclass

from rarefy.engine.llm_engine import EngineOptions, LLMEngine
from rarefy.errors import RarefyError
from rarefy.layers.sampler import SamplingParams


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


class LLM:
    def __init__(self, model: str | None = None, device: str = "cpu", dtype: str = "auto",
                 sparse: str = "auto", options: EngineOptions | None = None, loaded=None):
        """model: checkpoint path (default: the embedded model); or pass an already
        `loaded` model (rarefy.models.loader.load_model's result)."""
        if loaded is None:
            from rarefy.models.loader import load_model
            loaded = load_model(model, device=device, dtype=dtype, sparse=sparse)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.engine = LLMEngine(loaded.model, loaded.tokenizer, options)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RarefyError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise RarefyError("this model has no tokenizer: give token ids")
                p = self.tokenizer.encode(p)
            ids.append(list(p))
        seqs = [self.engine.add_request(i, sp) for i, sp in zip(ids, plist)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(seqs), desc="generate", unit="req")
        try:
            while self.engine.has_work:
                for out in self.engine.step():
                    if out.finished and bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for s in seqs:  # an exception mid-way must not leave blocks taken
                self.engine.abort(s)
        return [RequestOutput(s.prompt_ids, s.output_ids, s.text, s.finish_reason) for s in seqs]
