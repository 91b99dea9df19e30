"""Bytes of text per token id, for bits per byte: a table built once from a tokenizer's tokenizer.json.

    table = token_byte_lengths("TOKENIZER_DIR", vocab_size)   # int64 [vocab_size]

The count is the number of UTF-8 bytes of the text each token stands for, its own leading space included:
- byte-level BPE (GPT-2, Llama 3, the demo tokenizer): every character of the token string stands for one
  byte (the GPT-2 byte-to-unicode table), so a token's bytes are exactly its characters;
- SentencePiece-style vocabularies (Metaspace / Replace decoders, Llama 2): '▁' stands for the space byte,
  a byte-fallback token '<0xNN>' for one byte, other characters for their UTF-8 bytes;
- special tokens (EOS, BOS, pad: the added tokens marked special) and ids past the tokenizer's
  vocabulary: 0 bytes. Their loss still counts in bits per byte (as in Levanter): bpb is the summed loss
  of all scored tokens in bits divided by the summed bytes of all scored tokens.
So the bytes of a text's tokens add up to the UTF-8 length of the text (what a lossless tokenizer
decodes them to), counted without decoding token by token (which would turn a token holding part of a
multi-byte character into a replacement character).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np


class TokenBytesError(ValueError):
    """A tokenizer whose tokens' bytes cannot be counted; the message names the file."""


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _decoder_types(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return set().union(*(_decoder_types(d) for d in decoder.get("decoders", [])))
    return {decoder.get("type", "")}


def _byte_level_length(token: str, table: dict[str, int], where: str) -> int:
    missing = next((c for c in token if c not in table), None)
    if missing is not None:
        raise TokenBytesError(f"{where}: token {token!r} has {missing!r}, not a byte-level character")
    return len(token)


def _sentencepiece_length(token: str) -> int:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return 1  # byte fallback
    return len(token.replace("▁", " ").encode("utf-8"))


def token_byte_lengths(tokenizer_dir: str | Path, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: UTF-8 bytes of each token id's text (module docstring); 0 for special tokens."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise TokenBytesError(f"{path} does not exist: bits per byte needs the tokenizer (a tokenizer.json)")
    try:
        spec = json.loads(path.read_text())
        vocab: dict[str, int] = spec["model"]["vocab"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TokenBytesError(f"{path}: not a tokenizers file with model.vocab ({e})") from None
    if isinstance(vocab, list):  # Unigram models: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    decoders = _decoder_types(spec.get("decoder"))
    byte_level = "ByteLevel" in decoders
    if not byte_level and not decoders & {"Metaspace", "Replace", "ByteFallback"}:
        raise TokenBytesError(
            f"{path}: decoder {sorted(decoders) or 'none'}: bytes per token are known for byte-level and "
            "SentencePiece-style (Metaspace, byte fallback) tokenizers only"
        )
    table = _unicode_to_byte()
    lengths = np.zeros(vocab_size, np.int64)
    for token, token_id in vocab.items():
        if 0 <= token_id < vocab_size:
            lengths[token_id] = (
                _byte_level_length(token, table, str(path)) if byte_level else _sentencepiece_length(token)
            )
    for added in spec.get("added_tokens", []):
        token_id = added.get("id")
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            lengths[token_id] = 0 if added.get("special") else len(added["content"].encode("utf-8"))
    return lengths
