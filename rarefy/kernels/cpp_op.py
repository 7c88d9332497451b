"""Build-on-first-use for rarefy's C++ CPU ops (torch.utils.cpp_extension, cached on disk).

The source is compiled once and cached in torch's extensions directory
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later processes only load
the cached library. A machine without a working compiler gets ``available() == False`` and a
logged reason, never an exception at import.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

log = logging.getLogger(__name__)


class CppOp:
    """One C++ source registering ``torch.ops.<namespace>.<op>``."""

    def __init__(self, name: str, source: str, namespace: str, op: str, label: str, fakes: dict | None = None):
        """fakes: {op name: shape-only function} registered after the build (the C++ side registers
        its kernels for the CPU key only), so torch.compile traces around the ops."""
        self.name, self.source, self.namespace, self.op, self.label = name, source, namespace, op, label
        self.fakes = fakes or {}
        self.state: dict = {"tried": False, "op": None, "error": None, "seconds": None}
        self._lock = threading.Lock()

    def load(self):
        """Build (or load the cached build of) the extension; returns the op or None."""
        if self.state["tried"]:
            return self.state["op"]
        with self._lock:
            if self.state["tried"]:
                return self.state["op"]
            t0 = time.perf_counter()
            try:
                from torch.utils.cpp_extension import load

                load(name=self.name, sources=[self.source], extra_cflags=["-O3", "-fopenmp"],
                     extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
                self.state["op"] = getattr(getattr(torch.ops, self.namespace), self.op).default
                for op_name, fn in self.fakes.items():
                    torch.library.register_fake(f"{self.namespace}::{op_name}")(fn)
            except Exception as e:  # no compiler, no ninja, bad toolchain, ...
                self.state["error"] = f"{type(e).__name__}: {e}"
                log.warning("%s unavailable, build failed: %s", self.label, self.state["error"])
            self.state["seconds"] = time.perf_counter() - t0
            self.state["tried"] = True
            return self.state["op"]

    def available(self) -> bool:
        """True if the extension builds/loads on this machine. Never raises; logs the reason once."""
        try:
            return self.load() is not None
        except Exception as e:  # pragma: no cover - load already catches
            if not self.state["tried"]:
                self.state.update(tried=True, error=repr(e))
                log.warning("%s unavailable: %r", self.label, e)
            return False

    def build_seconds(self) -> float | None:
        """Seconds the first load took in this process (compile or cache load); None if not tried."""
        return self.state["seconds"]

    def best_isa(self) -> int:
        """The extension's fastest code path on this CPU (its ``best_isa`` op; ISA_NAMES of the
        module name the codes). RuntimeError if the extension is unavailable."""
        self.require()
        return int(getattr(torch.ops, self.namespace).best_isa())

    def require(self):
        """The op, or RuntimeError saying why it is unavailable."""
        op = self.state["op"] or self.load()
        if op is None:
            raise RuntimeError(f"{self.op} extension unavailable: {self.state['error']}")
        return op
