"""Concatenated windows ('concat' mode): the index math and a Grain random-access source.

The documents of a store are read as one token stream in store order (EOS ends each document) and cut
into windows of L+1 tokens with stride L: window i holds tokens [i*L, i*L + L + 1). Its inputs are
the first L tokens and its targets the last L, so every token but the very first is a target exactly
once per epoch. The stream has (num_tokens - 1) // L windows; the tail that does not fill one is left
out of every epoch (at most L tokens).

Segment ids number the documents inside a window 1, 2, ... (by the document of each input token).
Positions are 0..L-1, or restart at 0 at each document boundary when documents are masked. The first
document of a window starts at position 0 even when it began in an earlier window: the model never
sees that earlier part, and positions stay inside the trained range [0, L).

Sources read `Rows`: tokens plus the runs of segments, which become the per-token arrays of the
batch format (docs/architecture.md, Contract 2) once per batch, after the rows of all streams are
merged. This module is numpy only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class TokenStore(Protocol):
    """What the pipeline needs from megadoc_jax.data.store.StoreReader."""

    path: Any
    offsets: np.ndarray  # int64 [num_documents + 1]
    num_tokens: int

    def read_windows(self, starts: Sequence[int], length: int) -> np.ndarray: ...


def ragged_ranges(lengths_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs of the given lengths: (run of each element, index of the element inside its run).

    ragged_ranges([2, 0, 3]) == ([0, 0, 2, 2, 2], [0, 1, 0, 1, 2]); the vectorised form of
    `for run, n in enumerate(lengths): for j in range(n): ...`.
    """
    lengths_N = np.asarray(lengths_N, dtype=np.int64)
    run_T = np.repeat(np.arange(lengths_N.size), lengths_N)
    run_first_N = np.cumsum(lengths_N) - lengths_N
    return run_T, np.arange(run_T.size, dtype=np.int64) - run_first_N[run_T]


def rows_from_runs(
    run_starts_R: np.ndarray, run_segments_R: np.ndarray, shape: tuple[int, int], *, restart_positions: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions) int32 [N, L] from runs that tile the flattened rows in order.

    Run r covers flat positions [run_starts_R[r], run_starts_R[r+1]) (the last one up to N * L) and has
    segment id run_segments_R[r] (0: padding). Every row must begin a run. Positions count from 0 in
    each run when restart_positions, else they are the column; padding positions are 0.
    Built with np.repeat over a few runs per row: a handful of memory passes, no per-token loop.
    """
    n, length = shape
    lengths_R = np.diff(run_starts_R, append=n * length)
    segment_ids_NxL = np.repeat(run_segments_R.astype(np.int32), lengths_R).reshape(n, length)
    has_padding = bool((run_segments_R == 0).any())
    if restart_positions:  # column minus the column where the token's run starts
        positions_NxL = np.repeat((run_starts_R % length).astype(np.int32), lengths_R).reshape(n, length)
        np.subtract(np.arange(length, dtype=np.int32), positions_NxL, out=positions_NxL)
    elif not has_padding:  # the shared read-only columns: nothing to build
        return segment_ids_NxL, column_positions(shape)
    else:
        positions_NxL = column_positions(shape).copy()
    if has_padding:
        positions_NxL[segment_ids_NxL == 0] = 0
    return segment_ids_NxL, positions_NxL


@functools.lru_cache(maxsize=8)
def column_positions(shape: tuple[int, int]) -> np.ndarray:
    """Positions 0..L-1 in every row, read-only: built once per shape and shared by every batch of it."""
    positions_NxL = np.empty(shape, np.int32)
    positions_NxL[:] = np.arange(shape[1], dtype=np.int32)
    positions_NxL.flags.writeable = False
    return positions_NxL


@functools.lru_cache(maxsize=8)
def full_loss_mask(shape: tuple[int, int]) -> np.ndarray:
    """A loss mask of ones, read-only: the mask of every batch without padding, built once per shape."""
    mask_NxL = np.ones(shape, np.float32)
    mask_NxL.flags.writeable = False
    return mask_NxL


def concat_runs(offsets: np.ndarray, starts_N: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs (flat start, segment id) of the documents inside windows [start, start + L) of the inputs."""
    starts_N = np.asarray(starts_N, dtype=np.int64)
    # Document starts strictly inside the inputs of each window: offsets in (start, start + L - 1].
    first_N = np.searchsorted(offsets, starts_N, side="right")
    count_N = np.searchsorted(offsets, starts_N + seq_len - 1, side="right") - first_N
    # Each window: one run at column 0, then one per document start inside it.
    window_R, k_R = ragged_ranges(count_N + 1)
    column_R = np.where(k_R == 0, 0, offsets[first_N[window_R] + k_R - 1] - starts_N[window_R])
    return window_R * seq_len + column_R, k_R + 1


@dataclasses.dataclass
class Rows:
    """N rows of L input/target pairs, with their segments given as runs over the flattened rows."""

    inputs_NxL: np.ndarray  # int32
    targets_NxL: np.ndarray  # int32
    run_starts_R: np.ndarray  # flat positions (row * L + column) where runs begin; increasing; each row begins one
    run_segments_R: np.ndarray  # segment id of each run: 1, 2, ... within a row; 0 is padding
    restart_positions: bool  # positions restart at every run, else they are the column
    # Every id read from the store (the buffers inputs and targets are cut from), contiguous: one pass
    # over them checks all ids (pipeline.check_token_ids).
    ids_read: tuple[np.ndarray, ...] = ()

    def to_batch(self) -> dict[str, np.ndarray]:
        """The batch format: inputs, targets, positions, segment_ids, loss_mask."""
        shape = self.inputs_NxL.shape
        segment_ids_NxL, positions_NxL = rows_from_runs(
            self.run_starts_R, self.run_segments_R, shape, restart_positions=self.restart_positions
        )
        has_padding = bool((self.run_segments_R == 0).any())
        # C-contiguous, made here in the prefetch thread: placing a strided view on the devices copies it
        # in the training thread, at about 3x the cost (one stream's concat rows are views of one buffer).
        return {
            "inputs": np.ascontiguousarray(self.inputs_NxL),
            "targets": np.ascontiguousarray(self.targets_NxL),
            "positions": positions_NxL,
            "segment_ids": segment_ids_NxL,
            "loss_mask": (segment_ids_NxL != 0).astype(np.float32) if has_padding else full_loss_mask(shape),
        }

    @classmethod
    def merge(cls, parts: Sequence[tuple[np.ndarray, Rows]], num_rows: int) -> Rows:
        """One Rows from parts that each fill the given rows (a partition of range(num_rows))."""
        if len(parts) == 1:  # one stream: its rows are all rows, in order
            return parts[0][1]
        length = parts[0][1].inputs_NxL.shape[1]
        inputs_NxL = np.empty((num_rows, length), np.int32)
        targets_NxL = np.empty((num_rows, length), np.int32)
        run_starts, run_segments = [], []
        for rows_P, part in parts:
            inputs_NxL[rows_P] = part.inputs_NxL
            targets_NxL[rows_P] = part.targets_NxL
            part_row_R, column_R = np.divmod(part.run_starts_R, length)
            run_starts.append(rows_P[part_row_R] * length + column_R)
            run_segments.append(part.run_segments_R)
        run_starts_R = np.concatenate(run_starts)
        order_R = np.argsort(run_starts_R, kind="stable")
        return cls(
            inputs_NxL,
            targets_NxL,
            run_starts_R[order_R],
            np.concatenate(run_segments)[order_R],
            parts[0][1].restart_positions,
            tuple(ids for _, part in parts for ids in part.ids_read),
        )


def split_rows(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A batch dict of [N, L] arrays -> N row dicts of [L] arrays (Grain's one-record-per-index view)."""
    n = len(next(iter(batch.values())))
    return [{key: value[i] for key, value in batch.items()} for i in range(n)]


def check_indices(ids_N: Sequence[int], size: int, source: str) -> np.ndarray:
    ids_N = np.asarray(ids_N, dtype=np.int64).reshape(-1)
    if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= size):
        bad = int(ids_N.min() if ids_N.min() < 0 else ids_N.max())
        raise IndexError(f"{source}: window {bad} outside [0, {size})")
    return ids_N


class RowSource:
    """Grain's per-record view (`__getitem__`, `_getitems`) and the batch view (`read_rows`) of a source
    whose `read(ids) -> Rows` reads many rows at once."""

    def read(self, row_ids: Sequence[int]) -> Rows:
        raise NotImplementedError

    def read_rows(self, row_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The batch rows of the given row ids, in order."""
        return self.read(row_ids).to_batch()

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return split_rows(self.read_rows([index]))[0]

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return split_rows(self.read_rows(indices))


class ConcatWindows(RowSource):
    """Grain random-access source (`grain.MapDataset.source(...)`) of concatenated windows.

    `read_rows(ids)` reads all windows of a batch with one batched, concurrent `read_windows` call;
    `__getitem__` / `_getitems` give Grain its per-record view of the same rows.
    """

    def __init__(self, store: TokenStore, seq_len: int, *, document_masking: bool) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.store = store
        self.seq_len = seq_len
        self.document_masking = document_masking
        self._offsets = np.asarray(store.offsets, dtype=np.int64)
        self._num_windows = max(int(store.num_tokens) - 1, 0) // seq_len

    def __len__(self) -> int:
        return self._num_windows

    def __repr__(self) -> str:
        return f"ConcatWindows({self.store.path}, seq_len={self.seq_len}, masking={self.document_masking})"

    def read(self, window_ids: Sequence[int]) -> Rows:
        """The given windows, in order, read with one batched read_windows call."""
        ids_N = check_indices(window_ids, len(self), repr(self))
        length = self.seq_len
        starts_N = ids_N * length
        tokens_NxL1 = np.asarray(self.store.read_windows(starts_N, length + 1), dtype=np.int32)
        run_starts_R, run_segments_R = concat_runs(self._offsets, starts_N, length)
        return Rows(
            tokens_NxL1[:, :-1], tokens_NxL1[:, 1:], run_starts_R, run_segments_R, self.document_masking, (tokens_NxL1,)
        )
