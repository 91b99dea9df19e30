"""Value types of the token store: segments, documents, tokenizer identity, and their validation.

Imported by store.py (the writer and the public names) and store_reader.py. Imports no JAX.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from megadoc_jax import storage
from megadoc_jax.data import store_format as fmt
from megadoc_jax.data.store_format import FORMAT_VERSION, StoreError

MAX_SEGMENT_INDEX = int(np.iinfo(np.int16).max)
# The values of the metadata field finish_reason, as vLLM names them; every generation backend and the
# JAX sampler (megadoc_jax/decode.py) report these, and anything else counts as an aborted sample.
FINISH_STOP = "stop"  # an EOS (or stop) token was sampled; it is kept in the output
FINISH_LENGTH = "length"  # max_new_tokens reached
# The per-document metadata fields the pipeline knows, with their JSON types; others may be added.
METADATA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "source_id": (str, int),
    "method": str,
    "G": int,
    "generator": str,
    "prompt_version": str,
    "finish_reason": str,
}


class SegmentKind(enum.IntEnum):
    """Which part of a megadoc a token belongs to."""

    ORIGINAL = 0
    REPHRASE = 1
    RATIONALE = 2
    SEPARATOR = 3


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of tokens inside one document, in order."""

    kind: SegmentKind
    index: int  # k of "rephrase k" / "rationale k"; 0 for the original
    length: int  # tokens

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", SegmentKind(self.kind))
        except ValueError:
            raise ValueError(f"Segment.kind: {self.kind!r} is not one of {[k.name for k in SegmentKind]}") from None
        if not 0 <= self.index <= MAX_SEGMENT_INDEX:
            raise ValueError(f"Segment.index: {self.index} not in [0, {MAX_SEGMENT_INDEX}]")
        if self.length <= 0:
            raise ValueError(f"Segment.length: must be positive, got {self.length}")


@dataclasses.dataclass
class Document:
    tokens: np.ndarray  # int32 [n], EOS already appended by the caller
    metadata: dict[str, Any]  # source_id, method, G, generator, prompt_version, finish_reason (METADATA_FIELDS)
    segments: tuple[Segment, ...] | None = None  # None: one ORIGINAL segment over all tokens


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """Identity of the tokenizer that made a store; stores are compared by `hash`."""

    name: str
    hash: str
    vocab_size: int
    eos_id: int

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise ValueError(f"TokenizerInfo.vocab_size: must be positive, got {self.vocab_size}")
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"TokenizerInfo.eos_id: {self.eos_id} not in [0, vocab_size={self.vocab_size})")

    # Files that define a Hugging Face tokenizer; model weights next to them do not enter the hash.
    FILES = (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "tokenizer.model",
    )

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> TokenizerInfo:
        """Identity of a Hugging Face tokenizer directory: sha256 over its tokenizer files' bytes."""
        if storage.is_url(path):  # the tokenizers library reads local files only (docs/cloud.md)
            raise StoreError(
                f"{path}: a tokenizer directory must be local (the tokenizers library reads files); copy it first, "
                "e.g. gcloud storage cp -r URL DIR"
            )
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise StoreError(f"{root}: no tokenizer.json (a fast Hugging Face tokenizer directory is needed)")
        digest = hashlib.sha256()
        for name in cls.FILES:
            if (root / name).is_file():
                digest.update(f"{name}\n".encode())
                digest.update((root / name).read_bytes())
        from tokenizers import Tokenizer  # lazily: only this constructor needs it

        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        eos_token = _eos_token(root)
        eos_id = tokenizer.token_to_id(eos_token) if eos_token is not None else None
        if eos_id is None:
            raise StoreError(f"{root}/tokenizer_config.json: eos_token {eos_token!r} is not in the vocabulary")
        return cls(
            name=root.resolve().name,
            hash="sha256:" + digest.hexdigest(),
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
            eos_id=eos_id,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TokenizerInfo:
        return cls(name=raw["name"], hash=raw["hash"], vocab_size=raw["vocab_size"], eos_id=raw["eos_id"])


def _eos_token(root: Path) -> str | None:
    config_path = root / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    eos = json.loads(config_path.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def check_tokenizer(path: Path, stored: TokenizerInfo, expected: TokenizerInfo) -> None:
    """StoreError unless the store's tokenizer is the run's (same hash, vocabulary and EOS)."""
    if (stored.hash, stored.vocab_size, stored.eos_id) != (expected.hash, expected.vocab_size, expected.eos_id):
        raise StoreError(
            f"{path}: manifest.json tokenizer {stored.name!r} (hash {stored.hash}, vocab {stored.vocab_size}, "
            f"eos {stored.eos_id}) differs from this run's tokenizer {expected.name!r} (hash {expected.hash}, "
            f"vocab {expected.vocab_size}, eos {expected.eos_id})"
        )


# --------------------------------------------------------------------------------------------------
# Validation: a document becomes one row of every jagged group, or a StoreError naming what is wrong
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EncodedDocument:
    """A validated document as one row of every jagged group: group name -> column name -> values."""

    num_tokens: int
    columns: dict[str, dict[str, np.ndarray]]


def encode_document(document: Any, where: str, vocab_size: int) -> EncodedDocument:
    if not isinstance(document, Document):
        raise StoreError(f"{where}: expected a Document, got {type(document).__name__}")
    tokens = document.tokens
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        shape = getattr(tokens, "shape", None)
        raise StoreError(f"{where}.tokens: must be a 1-D integer numpy array, got {type(tokens).__name__} {shape}")
    if tokens.size == 0:
        raise StoreError(f"{where}.tokens: is empty (documents end with EOS, so they have a token at least)")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise StoreError(f"{where}.tokens: id {bad} outside [0, vocab_size={vocab_size})")
    segments = document.segments
    if segments is None:
        runs = np.array([(int(SegmentKind.ORIGINAL), 0, tokens.size)], dtype=np.int64)
    elif not isinstance(segments, (tuple, list)) or not segments or not all(isinstance(s, Segment) for s in segments):
        raise StoreError(f"{where}.segments: must be None or a non-empty tuple of Segment")
    else:
        runs = np.array([(int(s.kind), s.index, s.length) for s in segments], dtype=np.int64)
        if runs[:, 2].sum() != tokens.size:
            raise StoreError(
                f"{where}.segments: lengths sum to {runs[:, 2].sum()}, but the document has {tokens.size} tokens"
            )
    if not isinstance(document.metadata, dict):
        raise StoreError(f"{where}.metadata: must be a dict, got {type(document.metadata).__name__}")
    for field, types in METADATA_FIELDS.items():
        value = document.metadata.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise StoreError(f"{where}.metadata[{field!r}]: {value!r} is not of type {types}")
    try:
        text = json.dumps(document.metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{where}.metadata: not JSON-serializable ({e})") from None
    columns = {
        fmt.TOKENS.name: {"data": tokens.astype(np.int32, copy=False)},
        fmt.SEGMENTS.name: {"kind": runs[:, 0], "index": runs[:, 1], "length": runs[:, 2]},
        fmt.METADATA.name: {"data": np.frombuffer(text.encode(), dtype=np.uint8)},
    }
    return EncodedDocument(int(tokens.size), columns)


def check_format_version(path: Path, manifest: dict[str, Any]) -> None:
    if manifest.get("format") != fmt.FORMAT_NAME:
        raise StoreError(f"{path}: manifest.json format is {manifest.get('format')!r}, not {fmt.FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path}: manifest.json format_version {version!r} is newer than this code's {FORMAT_VERSION}; "
            "update megadoc_jax to read it"
        )
