"""The token store: the contract between generation/export and training (docs/store.md).

A store is one directory of tensorstore zarr3 arrays (the layout is in store_format.py): the flat token
array with document offsets (Levanter's JaggedArrayStore layout), per-document segment runs (original,
rephrase k, rationale k, separator), per-document metadata, and a manifest. StoreWriter appends
documents and can resume after a crash; StoreReader refuses unfinished stores, stores of another
tokenizer and newer formats, and reads token windows with batched, concurrent tensorstore reads.

Imports no JAX, so the generation stage can use it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from megadoc_jax import storage
from megadoc_jax.data import store_format as fmt
from megadoc_jax.data.store_format import FORMAT_VERSION, StoreError, StoreLayout
from megadoc_jax.data.store_reader import StoreReader
from megadoc_jax.data.store_types import (
    FINISH_LENGTH,
    FINISH_STOP,
    METADATA_FIELDS,
    Document,
    EncodedDocument,
    Segment,
    SegmentKind,
    TokenizerInfo,
    check_format_version,
    check_tokenizer,
    encode_document,
)

__all__ = [
    "FORMAT_VERSION",
    "StoreError",
    "StoreLayout",
    "SegmentKind",
    "Segment",
    "Document",
    "TokenizerInfo",
    "StoreWriter",
    "StoreReader",
    "METADATA_FIELDS",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "finished_manifest",
]

DEFAULT_FLUSH_TOKENS = 1 << 22


def finished_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of the finished store at `path` (its counts, content_hash, tokenizer, layout), or None
    when `path` holds no finished store (absent, empty, or still being written). Opens no arrays."""
    manifest_path = storage.location(path) / fmt.MANIFEST_FILE
    if not storage.is_file(manifest_path):
        return None
    manifest = storage.read_json(manifest_path, fmt.MANIFEST_FILE, StoreError)
    return manifest if manifest.get("finished") is True else None


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class StoreWriter:
    """Appends documents; every flush is a durable commit point; reopening an unfinished store resumes.

    After a crash or kill, `StoreWriter(path, tokenizer)` continues after the last committed document:
    the caller skips its first `num_committed` inputs and appends the rest.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: TokenizerInfo,
        *,
        flush_tokens: int = DEFAULT_FLUSH_TOKENS,
        layout: StoreLayout | None = None,
    ) -> None:
        if flush_tokens <= 0:
            raise ValueError(f"flush_tokens must be positive, got {flush_tokens}")
        self.path = storage.location(path, "token store")
        self.tokenizer = tokenizer
        self.flush_tokens = flush_tokens
        self._finished = False
        storage.makedirs(self.path)
        # Two writers on one store would corrupt it (a lease object on a URL: docs/cloud.md).
        self._lock = storage.lock_exclusive(self.path / fmt.LOCK_FILE, holder="another StoreWriter", error=StoreError)
        try:
            self.manifest = self._open_manifest(layout)
            self.layout = StoreLayout.from_dict(self.manifest["layout"])
            self._arrays = {
                key: fmt.open_array_for_write(self.path, key, dtype, self.layout) for key, dtype in fmt.array_keys()
            }
            commit = self._read_commit()
        except BaseException:
            self._lock.release()
            raise
        self.num_committed: int = commit["num_documents"]
        self._group_sizes: dict[str, int] = dict(commit["group_sizes"])
        self._flushes: int = commit["flushes"]
        self._buffer: list[EncodedDocument] = []
        self._buffered_tokens = 0

    # ---- public API ---------------------------------------------------------------------------

    @property
    def num_documents(self) -> int:
        """Committed + buffered documents."""
        return self.num_committed + len(self._buffer)

    @property
    def num_committed_tokens(self) -> int:
        return self._group_sizes[fmt.TOKENS.name]

    def append(self, documents: Iterable[Document]) -> None:
        """Validate all documents first (a bad batch adds nothing), buffer them, flush when full."""
        self._check_open()
        batch = list(documents)
        rows = [
            encode_document(doc, f"{self.path}: document {self.num_documents + i}", self.tokenizer.vocab_size)
            for i, doc in enumerate(batch)
        ]
        for row in rows:
            self._buffer.append(row)
            self._buffered_tokens += row.num_tokens
            if self._buffered_tokens >= self.flush_tokens:
                self.flush()

    def flush(self) -> None:
        """Write the buffered documents, wait until they are durable, then write the commit record."""
        self._check_open()
        if not self._buffer:
            return
        first_row, rows = self.num_committed, self._buffer
        futures = []
        new_sizes = {}
        for group in fmt.GROUPS:  # all writes of all arrays issued together, then awaited
            columns = {name: [row.columns[group.name][name] for row in rows] for name, _ in group.columns}
            row_sizes = [values.size for values in next(iter(columns.values()))]
            start = self._group_sizes[group.name]
            ends = start + np.cumsum(row_sizes, dtype=np.int64)
            new_sizes[group.name] = int(ends[-1])
            offsets = self._arrays[f"{group.name}/offsets"]
            futures.append(offsets[first_row + 1 : first_row + 1 + len(rows)].write(ends))
            for name, dtype in group.columns:
                values = np.concatenate(columns[name]).astype(dtype, copy=False)
                futures.append(self._arrays[f"{group.name}/{name}"][start : start + values.size].write(values))
        for future in futures:  # each returns once tensorstore has fsynced its chunk files (file_io_sync)
            future.result()
        self.num_committed = first_row + len(rows)
        self._group_sizes = new_sizes
        self._flushes += 1
        self._write_commit()
        self._buffer = []
        self._buffered_tokens = 0

    def finish(self) -> dict[str, Any]:
        """Flush, hash the content, shrink arrays to their exact lengths, write the finished manifest."""
        self.flush()
        lengths = fmt.array_lengths(self.num_committed, self._group_sizes)
        # Levanter's row count lives in offsets[0].
        for group in fmt.GROUPS:
            self._arrays[f"{group.name}/offsets"][0:1].write(np.array([self.num_committed], np.int64)).result()
        digest = fmt.content_hash(self.path, self._arrays, lengths)
        for key, length in lengths.items():
            self._arrays[key] = fmt.shrink_array(self.path, key, self._arrays[key], length)
        self.manifest.update(
            finished=True,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            num_documents=self.num_committed,
            num_tokens=self._group_sizes[fmt.TOKENS.name],
            num_segments=self._group_sizes[fmt.SEGMENTS.name],
            num_metadata_bytes=self._group_sizes[fmt.METADATA.name],
            content_hash=digest,
            flushes=self._flushes,
        )
        storage.write_json_atomic(self.path / fmt.MANIFEST_FILE, self.manifest)  # the finished flag, last
        self._finished = True
        storage.delete(self.path / fmt.LOCK_FILE)
        self._lock.release()
        return dict(self.manifest)

    def close(self) -> None:
        """Flush what is buffered and release the store without finishing it (resume later)."""
        if not self._finished and self._lock.held:
            self.flush()
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # like a crash: the buffered (uncommitted) documents are dropped; num_committed says where to resume
            self._lock.release()

    # ---- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._finished:
            raise StoreError(f"{self.path}: the store is finished; nothing more can be written")
        if not self._lock.held:
            raise StoreError(f"{self.path}: the writer is closed (or lost its lease on the store to another writer)")

    def _open_manifest(self, layout: StoreLayout | None) -> dict[str, Any]:
        manifest_path = self.path / fmt.MANIFEST_FILE
        if not storage.is_file(manifest_path):
            stray = [n for n in storage.list_names(self.path) if n != fmt.LOCK_FILE and not n.endswith(".tmp")]
            if stray:
                raise StoreError(f"{self.path}: exists, is not a token store (no manifest.json) and is not empty")
            manifest = {
                "format": fmt.FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "finished": False,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tokenizer": self.tokenizer.to_dict(),
                "vocab_size": self.tokenizer.vocab_size,
                "eos_id": self.tokenizer.eos_id,
                "layout": (layout or StoreLayout()).to_dict(),
                "arrays": {key: dtype for key, dtype in fmt.array_keys()},
                "levanter": "input_ids/ is a Levanter JaggedArrayStore (data, offsets; offsets[0] = rows)",
            }
            storage.write_json_atomic(manifest_path, manifest)
            return manifest
        manifest = storage.read_json(manifest_path, fmt.MANIFEST_FILE, StoreError)
        check_format_version(self.path, manifest)
        if manifest.get("finished"):
            raise StoreError(f"{self.path}: the store is finished; delete it to write it again")
        check_tokenizer(self.path, TokenizerInfo.from_dict(manifest["tokenizer"]), self.tokenizer)
        if layout is not None and layout != StoreLayout.from_dict(manifest["layout"]):
            raise StoreError(
                f"{self.path}: manifest.json layout {manifest['layout']} differs from the requested {layout.to_dict()}"
            )
        return manifest

    def _read_commit(self) -> dict[str, Any]:
        """The last commit record, checked against the durable offsets it describes."""
        commit_path = self.path / fmt.COMMIT_FILE
        if not storage.is_file(commit_path):
            return {"num_documents": 0, "group_sizes": {g.name: 0 for g in fmt.GROUPS}, "flushes": 0}
        commit = storage.read_json(commit_path, fmt.COMMIT_FILE, StoreError)
        documents = commit.get("num_documents")
        sizes = commit.get("group_sizes")
        if not isinstance(documents, int) or not isinstance(sizes, dict) or set(sizes) != {g.name for g in fmt.GROUPS}:
            raise StoreError(f"{commit_path}: malformed commit record {commit}")
        if documents > 0:
            for group in fmt.GROUPS:
                key = f"{group.name}/offsets"
                end = int(fmt.read_elements(self.path, key, self._arrays[key], documents, documents + 1)[0])
                if end != sizes[group.name]:
                    raise StoreError(
                        f"{commit_path}: {group.name}/offsets[{documents}] is {end} but the commit record says "
                        f"{sizes[group.name]}: the store is damaged"
                    )
        return commit

    def _write_commit(self) -> None:
        record = {"num_documents": self.num_committed, "group_sizes": self._group_sizes, "flushes": self._flushes}
        storage.write_json_atomic(self.path / fmt.COMMIT_FILE, record)
