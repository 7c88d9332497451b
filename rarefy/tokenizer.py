"""Tokenizer: a `tokenizers.Tokenizer` plus BOS/EOS handling and the chat template."""

from __future__ import annotations

import json
import os
from datetime import date

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from rarefy.errors import RarefyError


class Tokenizer:
    def __init__(self, tk: HFTokenizer, bos_token_id: int | None = None,
                 eos_token_ids: tuple[int, ...] = (), add_bos: bool = False,
                 chat_template: str | None = None):
        self.tk = tk
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        return self.tk.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise RarefyError("this model has no chat template; run without --chat")

        def raise_exception(msg):
            raise RarefyError(f"chat template error: {msg}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._token_str(self.bos_token_id),
                eos_token=self._token_str(self.eos_token_ids[0] if self.eos_token_ids else None))
        except jinja2.TemplateError as e:
            raise RarefyError(f"chat template error: {e}") from None

    def _token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tk.id_to_token(token_id) or "")

    @classmethod
    def from_hf_dir(cls, path: str, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        tk_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tk_file):
            raise RarefyError(f"no tokenizer.json in {path}")
        try:
            tk = HFTokenizer.from_file(tk_file)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise RarefyError(f"cannot read {tk_file}: {e}") from None
        cfg = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file) as f:
                    cfg = json.load(f)
            except (OSError, ValueError) as e:
                raise RarefyError(f"cannot read {cfg_file}: {e}") from None
        template = cfg.get("chat_template")
        tmpl_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(tmpl_file):
            with open(tmpl_file) as f:
                template = f.read()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_id(key):
            tok = cfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return tk.token_to_id(tok) if tok else None

        eos = token_id("eos_token")
        eos_ids = tuple(eos_token_ids) or (() if eos is None else (eos,))
        return cls(tk, bos_token_id=token_id("bos_token"), eos_token_ids=eos_ids,
                   add_bos=bool(cfg.get("add_bos_token", False)), chat_template=template)
