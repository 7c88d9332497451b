"""Build a `tokenizers` tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file.

A GGUF carries no tokenizer.json: only the vocabulary, the merges, a type per token and
the name of the pre-tokenizer llama.cpp should use (`tokenizer.ggml.pre`). For byte-level
BPE vocabularies we rebuild the pipeline the model's own HF tokenizer.json describes;
sentencepiece ("llama") vocabularies are handed to transformers' converter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from rarefy.errors import RarefyError

# llama.cpp token types (tokenizer.ggml.token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Qwen2's split pattern: like GPT-2's but single digits and newline-aware.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's pattern differs from Qwen2's only in grouping digits by up to three.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> pre-tokenizer family. The families mirror the HF tokenizer.json of
# the models llama.cpp gave those names to:
#   gpt2   - ByteLevel with GPT-2's built-in regex
#   digits - Digits(individual) then GPT-2's regex (StarCoder, SmolLM); llama.cpp's
#            "\p{N}" pre-split does the same
#   qwen2  - NFC normalizer, Qwen2 split regex, ByteLevel without its own regex
#   llama3 - Llama 3 split regex, ByteLevel without regex, BPE with ignore_merges
_PRE_TOKENIZER_FAMILIES = {
    None: "gpt2",
    "default": "gpt2",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "codeshell": "digits",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "smaug-bpe": "llama3",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_CHARS.values())


def _byte_spelling(token: str) -> str:
    return "".join(_BYTE_CHARS[b] for b in token.encode("utf-8"))


def build_tokenizer_json(meta: Callable[[str], Any], path: str) -> str:
    """Tokenizer JSON for the GGUF whose metadata `meta(key)` returns (None when absent)."""
    kind = meta("tokenizer.ggml.model")
    if kind is None:
        raise RarefyError(f"{path}: GGUF file has no tokenizer metadata (tokenizer.ggml.model)")
    if kind == "gpt2":
        return _byte_level_bpe(meta, path).to_str()
    if kind == "llama":
        tokenizer = _sentencepiece_via_transformers(path)
        # llama.cpp prepends BOS to sentencepiece input unless the file says otherwise.
        template = _post_processor(meta, meta("tokenizer.ggml.tokens") or [], bos_default=True)
        tokenizer.post_processor = template or processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
        return tokenizer.to_str()
    raise RarefyError(f"tokenizer model '{kind}' from GGUF is not supported yet")


def _byte_level_bpe(meta: Callable[[str], Any], path: str) -> Tokenizer:
    pre = meta("tokenizer.ggml.pre")
    family = _PRE_TOKENIZER_FAMILIES.get(pre)
    if family is None:
        # A wrong split regex tokenizes plausibly but differently from training, so refuse.
        raise RarefyError(f"tokenizer pre-tokenizer '{pre}' from GGUF is not supported yet")

    tokens: Sequence[str] = meta("tokenizer.ggml.tokens") or []
    merges_raw: Sequence[str] = meta("tokenizer.ggml.merges") or []
    types: Sequence[int] = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or not merges_raw:
        raise RarefyError(f"{path}: GGUF byte-level BPE tokenizer lacks tokens or merges")
    if len(types) != len(tokens):
        raise RarefyError(f"{path}: GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")

    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for index, (token, token_type) in enumerate(zip(tokens, types)):
        is_added = token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        # llama.cpp stores added tokens as plain text but ordinary ones in the byte alphabet;
        # an ordinary token outside that alphabet could never be produced by the merges.
        if not is_added and not set(token) <= _BYTE_ALPHABET:
            token = _byte_spelling(token)
        vocab.setdefault(token, index)  # duplicates keep their first id, as HF does
        if is_added:
            added.append(
                AddedToken(token, special=token_type == TOKEN_TYPE_CONTROL, normalized=False)
            )

    merges = []
    for merge in merges_raw:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise RarefyError(f"{path}: malformed GGUF tokenizer merge {merge!r}")
        merges.append((parts[0], parts[1]))

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=family == "llama3")
    )
    if family == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif family == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        split = _QWEN2_SPLIT if family == "qwen2" else _LLAMA3_SPLIT
        if family == "qwen2":
            tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=family != "qwen2", use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    # Specials are matched in the raw text before pre-tokenization, so they never get split.
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    tokenizer.post_processor = _post_processor(meta, tokens) or processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _post_processor(
    meta: Callable[[str], Any], tokens: Sequence[str], bos_default: bool = False
) -> processors.TemplateProcessing | None:
    """Adds BOS/EOS on `encode(..., add_special_tokens=True)` exactly when the GGUF asks for it."""

    def wanted(flag: str, id_key: str, default: bool = False) -> tuple[str, int] | None:
        token_id = meta(id_key)
        on = meta(flag)
        if (default if on is None else on) and token_id is not None and 0 <= token_id < len(tokens):
            return tokens[token_id], int(token_id)
        return None

    bos = wanted("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id", bos_default)
    eos = wanted("tokenizer.ggml.add_eos_token", "tokenizer.ggml.eos_token_id")
    if bos is None and eos is None:
        return None
    single = ([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else [])
    pair = single + ([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos else [])
    specials = sorted({t for t in (bos, eos) if t is not None}, key=lambda t: t[1])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _sentencepiece_via_transformers(path: str) -> Tokenizer:
    """Sentencepiece GGUF vocabularies need score-ordered merges and Metaspace handling that
    transformers already reconstructs; we reuse it rather than duplicate that logic."""
    unsupported = RarefyError("tokenizer model 'llama' from GGUF is not supported yet")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )
    except ImportError:
        raise unsupported from None
    try:
        architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except Exception as exc:
        raise RarefyError(f"{path}: cannot build sentencepiece tokenizer from GGUF: {exc}") from exc
    return backend
