"""rarefy: make LLMs sparse and low-bit, then run them fast."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import rarefy` stays light (torch loads only when these are used).
    if name == "LLM":
        from rarefy.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from rarefy.layers.sampler import SamplingParams
        return SamplingParams
    if name == "EngineOptions":
        from rarefy.engine.llm_engine import EngineOptions
        return EngineOptions
    raise AttributeError(f"module 'rarefy' has no attribute {name!r}")
