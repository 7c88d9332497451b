"""User-facing KV-cache settings: memory sizes ("512MiB") and attention-policy specs."""

from __future__ import annotations

import os
import re

from rarefy.errors import RarefyError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(text: str) -> int:
    """'2GiB', '512MB', '1e9' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise RarefyError(f"cannot read {text!r} as a memory size (examples: 512MiB, 2GB, 1e9)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise RarefyError(f"memory size must be positive, got {text!r}")
    return n


def load_attention_policy(spec: str | None):
    """A policy spec ("window:sinks=16,window=496") or a policy config file → a policy
    (or a per-layer config); None or "dense" → None."""
    if spec is None or spec.strip() in ("", "dense"):
        return None
    from rarefy.kv.policies import load_policy_config, parse_policy
    if os.path.isfile(spec):
        return load_policy_config(spec)
    return parse_policy(spec)
