"""The CPU decode step through torch.compile, with inductor's C++ wrapper.

Inductor normally calls its generated kernels from a Python wrapper; with ``cpp_wrapper`` the
wrapper is C++ too, so a decode step of the embedded model no longer pays Python for each of
its ~200 kernel and op calls. Measured on the 2-core Xeon, GGUF blocks, 128-token greedy
decodes paired in one process (docs/engine.md, "C++ wrapper"): 1.10-1.13x tokens/s at 2
threads, 1.14x at 1 thread, same tokens; the first compile takes about a minute instead of
~35 s (cached on disk after). If the C++ wrapper cannot be built, the step falls back to the
Python wrapper once, with a warning.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

#: inductor options of the CPU decode step
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True}


class CompiledCpuStep:
    """``step(*args, **kw)`` = ``model(*args, **kw)`` through torch.compile (static shapes)."""

    def __init__(self, model: torch.nn.Module, options: dict | None = None):
        self.model = model
        self.options = dict(CPU_COMPILE_OPTIONS if options is None else options)
        self._fn = torch.compile(model, dynamic=False, options=self.options or None)
        self._ok = False

    @property
    def built(self) -> bool:
        """Whether a call has compiled the step already (the first call builds it: seconds to
        minutes, a warm-up rather than decode time)."""
        return self._ok

    def __call__(self, *args, **kw):
        if self._ok:
            return self._fn(*args, **kw)
        try:
            out = self._fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - a wrapper that does not build: plain inductor
            if not self.options:
                raise
            log.warning("CPU decode step: inductor with %s failed (%s: %s); using the Python wrapper",
                        self.options, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            torch._dynamo.reset()
            self.options = {}
            self._fn = torch.compile(self.model, dynamic=False)
            out = self._fn(*args, **kw)
        self._ok = True
        return out
