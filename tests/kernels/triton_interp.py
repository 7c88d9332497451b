"""Run Triton kernels on a machine without a GPU: the interpreter, plus one NumPy shim."""

from __future__ import annotations

import importlib
import os

import torch

CUDA = torch.cuda.is_available()


def numpy_int_shim() -> None:
    """Triton 3.6's interpreter turns loop bounds into Python ints with
    ``int(array_of_shape_[1])``, which NumPy >= 2.4 rejects. Patch that one
    conversion (interpreter only; compiled kernels are unaffected)."""
    import numpy as np

    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    import triton.runtime.interpreter as interp

    orig = interp._patch_lang_tensor
    if getattr(orig, "_rarefy_shim", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._rarefy_shim = True
    interp._patch_lang_tensor = patched


def kernel_module(name: str, kernel_attr: str):
    """Import module `name`; without a GPU make sure its `kernel_attr` runs interpreted
    (re-importing it if it was decorated before TRITON_INTERPRET was set)."""
    mod = importlib.import_module(name)
    if not CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(getattr(mod, kernel_attr), InterpretedFunction):
            os.environ["TRITON_INTERPRET"] = "1"
            mod = importlib.reload(mod)
        numpy_int_shim()
    return mod
