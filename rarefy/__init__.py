"""rarefy: make LLMs sparse and low-bit, then run them fast."""

__version__ = "0.1.0"
