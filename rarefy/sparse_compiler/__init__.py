"""The sparse compiler: per-matrix format, kernel config and schedule, autotuned and cached.

    from rarefy.sparse_compiler import compile_matrix, analyze_pattern, pattern_hash
"""

from .compile import CompiledMatrix, Plan, compile_matrix, default_cache_dir
from .pattern import PatternStats, analyze_pattern, pattern_hash

__all__ = ["CompiledMatrix", "Plan", "PatternStats", "analyze_pattern", "compile_matrix",
           "default_cache_dir", "pattern_hash"]
