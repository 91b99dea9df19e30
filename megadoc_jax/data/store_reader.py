"""StoreReader: opens a finished token store and reads documents, token windows and segment info.

Token windows are read in one of two ways, chosen at open by the store's size (docs/store.md has the
measurements behind it):
  resident   the token array fits in `cache_bytes`: decoded blocks of RESIDENT_READ_CHUNKS chunks are
             kept in memory as they are first read (the missing blocks of a batch with tensorstore
             futures issued together, one ts.Batch), and every window is then a numpy slice.
  streaming  a larger store: each window is read on its own, on top of the OS page cache. A local,
             uncompressed array (the default layout) is read directly, one `os.preadv` of the window's
             bytes per chunk it spans, once tensorstore has checked that chunk whole (store_direct.py);
             any other array reads each window through tensorstore, all of a batch issued together,
             with a tensorstore cache pool of `cache_bytes`.
Offsets and segment runs are small and kept in memory. Reads may come from several threads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from megadoc_jax import storage
from megadoc_jax.data import store_checks
from megadoc_jax.data import store_format as fmt
from megadoc_jax.data.store_direct import DirectReads
from megadoc_jax.data.store_format import StoreError
from megadoc_jax.data.store_types import (
    Document,
    Segment,
    SegmentKind,
    TokenizerInfo,
    check_format_version,
    check_tokenizer,
)

DEFAULT_CACHE_BYTES = 1 << 30  # per reader: stores of up to 256M tokens are read resident
# Chunks per resident read. 4 read a first pass 1.1x to 1.8x faster with the page cache cold, but warm
# runs were mixed (0.7x to 2x) on the loaded machine: not a clear win, so 1 stays (docs/store.md).
RESIDENT_READ_CHUNKS = 1


class StoreReader:
    """A finished store, read-only. Build it with `StoreReader.open(path, tokenizer)`."""

    def __init__(
        self, path: storage.AnyPath, manifest: dict[str, Any], cache_bytes: int, direct_reads: bool = True
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.tokenizer = TokenizerInfo.from_dict(manifest["tokenizer"])
        self.num_documents: int = manifest["num_documents"]
        self.num_tokens: int = manifest["num_tokens"]
        self.num_segments: int = manifest["num_segments"]
        self.vocab_size: int = manifest["vocab_size"]
        self.eos_id: int = manifest["eos_id"]
        self.cache_bytes = cache_bytes
        self.direct_reads = direct_reads
        self.resident = self.num_tokens * np.dtype(np.int32).itemsize <= cache_bytes
        # Resident readers keep decoded chunks themselves; a tensorstore cache would only hold a copy.
        cache = {"cache_pool": {"total_bytes_limit": 0 if self.resident else cache_bytes}}
        context = storage.tensorstore_context(path, cache)
        self._arrays = {key: fmt.open_array_for_read(path, key, context) for key, _ in fmt.array_keys()}
        self._check_shapes()
        self._tokens = self._arrays["input_ids/data"]
        # Resident mode reads and keeps blocks of RESIDENT_READ_CHUNKS chunks (docs/store.md, "Where a cold
        # read goes"); the benchmark's --read-unit compares block sizes.
        self._block: int = self._tokens.chunk_layout.read_chunk.shape[0] * RESIDENT_READ_CHUNKS
        self._direct = None
        if direct_reads and not self.resident:
            dtype = self._tokens.dtype.numpy_dtype
            self._direct = DirectReads.for_array(path, "input_ids/data", self.num_tokens, dtype)

        self.offsets = self._read_offsets(fmt.TOKENS.name)  # int64 [num_documents + 1], offsets[0] = 0
        self._metadata_offsets = self._read_offsets(fmt.METADATA.name)
        self._document_runs = self._read_offsets(fmt.SEGMENTS.name)  # document i: runs [r[i], r[i+1])
        self._run_kinds = self._read_all("segments/kind")
        self._run_indices = self._read_all("segments/index")
        self._run_ends = np.cumsum(self._read_all("segments/length"), dtype=np.int64)
        if self.offsets[-1] != self.num_tokens or (self._run_ends.size and self._run_ends[-1] != self.num_tokens):
            raise StoreError(f"{path}: offsets or segment runs do not end at num_tokens={self.num_tokens}")

        self._block_cache: dict[int, np.ndarray] = {}  # resident mode: block id -> its tokens

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        tokenizer: TokenizerInfo | None = None,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        direct_reads: bool = True,
    ) -> StoreReader:
        """Open a finished store; refuse an unfinished one, another tokenizer's, or a newer format.

        direct_reads=False reads every streaming window through tensorstore (for comparison)."""
        path = storage.location(path, "token store")
        manifest_path = path / fmt.MANIFEST_FILE
        if not storage.is_file(manifest_path):
            raise StoreError(f"{path}: not a token store (no {fmt.MANIFEST_FILE})")
        manifest = storage.read_json(manifest_path, fmt.MANIFEST_FILE, StoreError)
        check_format_version(path, manifest)
        if manifest.get("finished") is not True:
            raise StoreError(
                f"{path}: manifest.json finished is false: the store is unfinished (its writer was interrupted "
                "or did not call finish); resume it with StoreWriter and finish it"
            )
        if tokenizer is not None:
            check_tokenizer(path, TokenizerInfo.from_dict(manifest["tokenizer"]), tokenizer)
        return cls(path, manifest, cache_bytes, direct_reads)

    def __reduce__(self) -> tuple[Any, ...]:
        # Grain worker processes get a fresh reader (own cache) instead of pickled tensorstore handles.
        return (StoreReader, (self.path, self.manifest, self.cache_bytes, self.direct_reads))

    def __len__(self) -> int:
        return self.num_documents

    @property
    def window_reads(self) -> str:
        """How windows are read (see the module docstring): 'resident', 'direct' or 'tensorstore'."""
        return "resident" if self.resident else "direct" if self._direct is not None else "tensorstore"

    # ---- documents ----------------------------------------------------------------------------

    def document(self, i: int) -> Document:
        """Document i with its tokens, metadata and segments (always explicit, never None)."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"{self.path}: document {i} out of range [0, {self.num_documents})")
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        tokens = self.read_windows([start], stop - start)[0]
        first_run, last_run = int(self._document_runs[i]), int(self._document_runs[i + 1])
        run_starts = np.concatenate(([start], self._run_ends[first_run : last_run - 1]))
        segments = tuple(
            Segment(SegmentKind(int(kind)), int(index), int(end - begin))
            for kind, index, begin, end in zip(
                self._run_kinds[first_run:last_run],
                self._run_indices[first_run:last_run],
                run_starts,
                self._run_ends[first_run:last_run],
            )
        )
        meta_start, meta_stop = int(self._metadata_offsets[i]), int(self._metadata_offsets[i + 1])
        metadata_bytes = fmt.read_elements(
            self.path, "metadata/data", self._arrays["metadata/data"], meta_start, meta_stop
        )
        return Document(tokens, json.loads(metadata_bytes.tobytes()), segments)

    # ---- windows ------------------------------------------------------------------------------

    def read_windows(self, starts: Sequence[int], length: int) -> np.ndarray:
        """Tokens [start, start + length) for every start: int32 [len(starts), length]."""
        starts_N = self._check_windows(starts, length)
        out_NxL = np.empty((starts_N.size, length), np.int32)
        if self.resident:
            self._slice_cached_blocks(starts_N, out_NxL)
        elif self._direct is not None:
            self._direct.read_windows(starts_N, out_NxL, self._read_chunks)
        else:
            with ts.Batch() as batch:
                reads = [self._read_tokens(start, start + length, batch) for start in starts_N.tolist()]
            for row, pending in enumerate(reads):
                out_NxL[row] = pending.result()
        return out_NxL

    def read_segments(self, starts: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-token (kind uint8 [n, length], index int16 [n, length]) for the same windows."""
        starts_N = self._check_windows(starts, length)
        first_run_N = np.searchsorted(self._run_ends, starts_N, side="right")
        last_run_N = np.searchsorted(self._run_ends, starts_N + length - 1, side="right")
        kind_NxL = np.empty((starts_N.size, length), np.uint8)
        index_NxL = np.empty((starts_N.size, length), np.int16)
        for row, (start, first, last) in enumerate(zip(starts_N, first_run_N, last_run_N)):
            ends = np.minimum(self._run_ends[first : last + 1], start + length)
            lengths = np.diff(ends, prepend=start)
            kind_NxL[row] = np.repeat(self._run_kinds[first : last + 1], lengths)
            index_NxL[row] = np.repeat(self._run_indices[first : last + 1], lengths)
        return kind_NxL, index_NxL

    def verify(self, progress: bool = False) -> str:
        """Every check of store_checks.CHECKS (manifest, arrays, offsets, segments, the content hash, the
        token ids); StoreError at the first that fails. Returns the content hash."""
        view = store_checks.StoreView(self.path, self.manifest, dict(self._arrays), progress)
        for result in store_checks.run_checks(view):
            if result.status != "ok":
                raise StoreError(f"verify: the {result.name} check failed: {result.detail}")
        return view.scan()[0]

    # ---- internals ----------------------------------------------------------------------------

    def _check_windows(self, starts: Sequence[int], length: int) -> np.ndarray:
        if length <= 0:
            raise StoreError(f"{self.path}: window length must be positive, got {length}")
        starts_N = np.asarray(starts)
        if starts_N.ndim != 1 or starts_N.size == 0 or not np.issubdtype(starts_N.dtype, np.integer):
            raise StoreError(f"{self.path}: window starts must be a non-empty 1-D sequence of integers")
        starts_N = starts_N.astype(np.int64, copy=False)
        bad = (starts_N < 0) | (starts_N + length > self.num_tokens)
        if bad.any():
            start = int(starts_N[bad][0])
            raise StoreError(
                f"{self.path}: window [{start}, {start + length}) lies outside the store's tokens "
                f"[0, {self.num_tokens})"
            )
        return starts_N

    def _slice_cached_blocks(self, starts_N: np.ndarray, out_NxL: np.ndarray) -> None:
        """Resident mode: fill each row of out_NxL with slices of the (cached) blocks it spans."""
        length, block = out_NxL.shape[1], self._block
        first_block_N = starts_N // block
        last_block_N = (starts_N + length - 1) // block
        if length <= block:  # a window touches at most two blocks
            needed = np.unique(np.concatenate([first_block_N, last_block_N]))
        else:
            spans = [np.arange(first, last + 1) for first, last in zip(first_block_N, last_block_N)]
            needed = np.unique(np.concatenate(spans))
        blocks = self._blocks(needed.tolist())
        rows = zip(starts_N.tolist(), first_block_N.tolist(), last_block_N.tolist())
        for row, (start, first, last) in enumerate(rows):
            if first == last:  # the common case: the window lies inside one block
                begin = start - first * block
                out_NxL[row] = blocks[first][begin : begin + length]
                continue
            filled = 0
            for block_id in range(first, last + 1):
                begin = max(start, block_id * block) - block_id * block
                end = min(start + length, (block_id + 1) * block) - block_id * block
                out_NxL[row, filled : filled + end - begin] = blocks[block_id][begin:end]
                filled += end - begin

    def _blocks(self, block_ids: list[int]) -> dict[int, np.ndarray]:
        """Decoded token blocks by id: cached ones, and the missing ones read together in one batch."""
        found = {c: self._block_cache[c] for c in block_ids if c in self._block_cache}
        missing = [c for c in block_ids if c not in found]
        for block_id, tokens in zip(missing, self._read_spans(missing, self._block)):
            found[block_id] = self._block_cache[block_id] = tokens
        return found

    def _read_chunks(self, chunk_ids: Sequence[int]) -> list[np.ndarray]:
        """Whole token chunks through tensorstore (checksums checked): what direct reads check against."""
        return self._read_spans(chunk_ids, self._tokens.chunk_layout.read_chunk.shape[0])

    def _read_spans(self, span_ids: Sequence[int], span: int) -> list[np.ndarray]:
        """Tokens [i * span, (i + 1) * span) for each id i (the last span ends at num_tokens), through
        tensorstore, all read together in one batch."""
        with ts.Batch() as batch:
            reads = [self._read_tokens(i * span, min((i + 1) * span, self.num_tokens), batch) for i in span_ids]
        return [pending.result() for pending in reads]

    def _read_tokens(self, start: int, stop: int, batch: ts.Batch) -> fmt.PendingRead:
        return fmt.PendingRead(self.path, "input_ids/data", self._tokens, start, stop, batch)

    def _read_all(self, key: str) -> np.ndarray:
        return fmt.read_elements(self.path, key, self._arrays[key], 0, self._arrays[key].shape[0])

    def _read_offsets(self, group: str) -> np.ndarray:
        offsets = self._read_all(f"{group}/offsets")
        offsets[0] = 0  # cell 0 holds Levanter's row count; the first row starts at 0
        return offsets

    def _check_shapes(self) -> None:
        sizes = {
            fmt.TOKENS.name: self.num_tokens,
            fmt.SEGMENTS.name: self.num_segments,
            fmt.METADATA.name: self.manifest["num_metadata_bytes"],
        }
        for key, length in fmt.array_lengths(self.num_documents, sizes).items():
            if self._arrays[key].shape[0] != length:
                raise StoreError(
                    f"{self.path}: array {key} has {self._arrays[key].shape[0]} elements, manifest.json "
                    f"says {length}: the store is damaged"
                )
