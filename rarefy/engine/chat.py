"""The interactive chat loop behind `rarefy chat`."""

from __future__ import annotations

import sys

from rarefy.engine.generate import Generator
from rarefy.errors import RarefyError
from rarefy.layers.sampler import SamplingParams


def run_chat(loaded, params: SamplingParams, system: str | None = None, compile: bool = False,
             read=input, write=sys.stdout.write) -> None:
    tk = loaded.tokenizer
    if not tk.chat_template:
        raise RarefyError("this model has no chat template")
    gen = Generator(loaded.model, tk, compile=compile)
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    write("chat with the model: /reset starts over, /exit or Ctrl-D quits\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = list(base)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tk.encode(tk.apply_chat_template(messages))
        room = loaded.config.max_position_embeddings - len(ids)
        if room < 1:
            write("[the conversation is longer than the model's context; /reset to start over]\n")
            messages.pop()
            continue
        turn = SamplingParams(**{**params.__dict__, "max_tokens": min(params.max_tokens, room)})
        completions, stats = gen.generate([ids], turn, lambda _, d: (write(d), sys.stdout.flush()))
        write(f"\n[{stats.decode_tok_s:.1f} tok/s]\n")
        messages.append({"role": "assistant", "content": completions[0].text})
