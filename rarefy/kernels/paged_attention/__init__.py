"""Paged KV-cache decode attention (see docs/kv-cache.md and docs/attention-kernels.md)."""

from rarefy.kernels.paged_attention.plan import DecodePlan, plan_decode

__all__ = ["DecodePlan", "plan_decode"]
