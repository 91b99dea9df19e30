"""Tokenizers and stores for the seqio tests: text from the demo corpus, tokenized as the export does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megadoc_jax.data import demo
from megadoc_jax.data.store import Document, Segment, SegmentKind, StoreReader, StoreWriter, TokenizerInfo


def corpus(count: int, skip: int = 0) -> list[str]:
    """`count` demo documents' texts, from document `skip` on (deterministic)."""
    texts = [d["text"] for d in demo.demo_documents()[skip : skip + count]]
    if len(texts) != count:
        raise ValueError(f"the demo corpus has no {count} documents after {skip}")
    return texts


def train_bang_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE whose id 0 is '!' (the first byte of the byte-level alphabet, as in Llama 3) and
    whose EOS is the last id."""
    return demo.train_tokenizer(texts, out_dir, vocab_size, eos_last=True)


def segments_for(i: int, n: int) -> tuple[Segment, ...] | None:
    """Some documents as one ORIGINAL run (None), others as original / rationale / rephrase runs."""
    if i % 3 == 0 or n < 3:
        return None
    a, b = n // 3, n // 3
    return (
        Segment(SegmentKind.ORIGINAL, 0, a),
        Segment(SegmentKind.RATIONALE, 1 + i % 2, b),
        Segment(SegmentKind.REPHRASE, 1, n - a - b),
    )


def write_store(path: Path, tokenizer_dir: Path, texts: list[str]) -> Path:
    """Each text as a document, tokenized as generation/export.py does (no special tokens, then EOS)."""
    from tokenizers import Tokenizer

    info = TokenizerInfo.from_directory(tokenizer_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    documents = []
    for i, text in enumerate(texts):
        ids = np.array([*tokenizer.encode(text, add_special_tokens=False).ids, info.eos_id], np.int32)
        documents.append(Document(ids, {"source_id": str(i)}, segments_for(i, ids.size)))
    with StoreWriter(path, info, flush_tokens=1 << 14) as writer:
        writer.append(documents)
        writer.finish()
    return path


def store_documents(path: Path) -> list[dict[str, np.ndarray]]:
    """Every document of a store, read with StoreReader: tokens and per-token kind and index."""
    reader = StoreReader.open(path)
    out = []
    for i in range(reader.num_documents):
        document = reader.document(i)
        kinds = np.concatenate([np.full(s.length, int(s.kind)) for s in document.segments])
        indices = np.concatenate([np.full(s.length, s.index) for s in document.segments])
        out.append({"targets": document.tokens, "targets_segment_kind": kinds, "targets_segment_index": indices})
    return out
