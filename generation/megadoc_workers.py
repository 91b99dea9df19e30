"""Worker processes of the megadoc export: tokenize the pieces of a batch of documents and assemble them.

Each task is a batch of documents of one stream, given as texts (UTF-8) with their sample numbers; the
worker tokenizes all of a batch's texts in one batched call (no special tokens), assembles each document
with megadocs.build_document (separators, EOS, segments) and returns the tokens back to back with the
documents' segments. WorkerPool runs the tasks in N spawned processes (or in this one) and gives the
results back in task order, so that the store's order is the plan's.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from generation import megadocs
from generation.worker_pool import WorkerPool  # noqa: F401  (re-exported for megadoc_export)
from megadoc_jax.data.store import Segment, SegmentKind

_worker: dict[str, Any] = {}


def init_worker(tokenizer_json: str, eos_id: int, separators: dict[str, str], single_threaded: bool = True) -> None:
    """Load the tokenizer and tokenize the separators once per process (one process per core)."""
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    _worker.update(tokenizer=tokenizer, eos_id=eos_id, separator_ids=tokenize_separators(tokenizer, separators))


def tokenize_separators(tokenizer: Any, separators: dict[str, str]) -> dict[str, np.ndarray]:
    """Token ids of each separator; ValueError for a non-empty one that gives no tokens (it would vanish).

    Call it in the main process before starting workers: a pool whose initializer fails restarts it forever.
    """
    ids = {name: _ids(tokenizer.encode(text, add_special_tokens=False).ids) for name, text in separators.items()}
    for name, text in separators.items():
        if text and not ids[name].size:
            raise ValueError(f"separator {name}={text!r} gives no tokens with this tokenizer; choose another or ''")
    return ids


def _ids(ids: list[int]) -> np.ndarray:
    return np.array(ids, dtype=np.int32)


# (original text or None, [(number, generation text, split character or -1)]), texts as UTF-8
Unit = tuple[bytes | None, list[tuple[int, bytes, int]]]


class BatchResult(NamedTuple):
    tokens: np.ndarray  # int32 [T]: the documents back to back
    lengths: np.ndarray  # int64 [D]
    segments: list[tuple[Segment, ...]]  # built here, where it is parallel: the main process only unpickles
    tokens_by_kind: np.ndarray  # int64 [len(SegmentKind)]
    misplaced: np.ndarray  # int64 [D]: rationales made at another split point (stretched)


def build_batch(task: tuple[str, int, list[Unit]]) -> BatchResult:
    """Tokenize and assemble a batch of documents of one stream."""
    method, G, units = task
    split_points = megadocs.method_spec(method).split_points
    tokenizer = _worker["tokenizer"]
    originals = [original.decode() for original, _ in units if original is not None]
    generations = [text.decode() for _, pieces in units for _, text, _ in pieces]
    # Rationales at split points need the originals' token offsets to check where the generator split them.
    encode_originals = tokenizer.encode_batch if split_points else tokenizer.encode_batch_fast
    original_encodings = iter(encode_originals(originals, add_special_tokens=False))
    original_texts = iter(originals)
    generation_encodings = iter(tokenizer.encode_batch_fast(generations, add_special_tokens=False))
    all_tokens, all_segments, all_runs, misplaced = [], [], [], []
    for original, pieces in units:
        encoding = next(original_encodings) if original is not None else None
        original_ids = _ids(encoding.ids) if encoding is not None else None
        generation_ids = [(number, _ids(next(generation_encodings).ids)) for number, _, _ in pieces]
        tokens, runs = megadocs.build_document(
            method, original_ids, generation_ids, G, _worker["separator_ids"], _worker["eos_id"]
        )
        all_tokens.append(tokens)
        all_segments.append(megadocs.segments_of(runs))
        all_runs.append(runs)
        misplaced.append(0)
        if split_points:
            mine = megadocs.split_characters(
                lambda token: encoding.token_to_chars(token)[0], len(encoding.ids), len(next(original_texts)), G
            )
            misplaced[-1] = megadocs.misplaced_rationales(mine, [(number, char) for number, _, char in pieces])
    lengths = np.array([t.size for t in all_tokens], dtype=np.int64)
    runs_Rx3 = np.concatenate(all_runs)
    tokens_by_kind = np.bincount(runs_Rx3[:, 0], weights=runs_Rx3[:, 2], minlength=len(SegmentKind)).astype(np.int64)
    return BatchResult(np.concatenate(all_tokens), lengths, all_segments, tokens_by_kind, np.array(misplaced, np.int64))
