"""Long-context windows ('document' mode): the packing plan and a Grain random-access source.

A window (row) has L input/target pairs. A document of n tokens contributes its n - 1 pairs
(inputs tokens[0:n-1], targets tokens[1:n]), so it fits a row when n <= L + 1 and then stays whole in
one row. No target crosses a document boundary; the first token of a document is context only.

Cutting rule for a document longer than that: it is cut from its start into pieces of exactly L pairs
(tokens [k*L, k*L + L + 1): consecutive pieces share one token, so every token but the first is a
target exactly once), each filling a row of its own, plus one remainder piece of the last
(n - 1) mod L pairs that is packed like a short document. Positions restart at 0 in every piece:
a piece is trained exactly like a concat window that starts inside a document (the model cannot
attend to the earlier pieces, so positions beyond L would only put it in a range it never trains on).

Packing: the documents and remainder pieces, in a seeded order, are packed greedily (next fit: fill
the current row until the next item does not fit, then open a new row). Only the offsets array is
needed; the work is vectorised numpy except a loop over rows (one step per row, not per document).
Rows are numbered by the store position of their first piece; a run shuffles them per epoch.
Each row's free tail is padding: segment id 0, loss mask 0, token 0. Pieces are numbered 1, 2, ...
inside a row (segment ids) and positions restart at 0 in each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from megadoc_jax.data.windows import Rows, RowSource, TokenStore, check_indices, ragged_ranges

MIN_READ_LENGTH = 256  # shortest read: tiny pieces are read in this bucket (one call per bucket)


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """Which pieces of which documents fill each row; a pure function of (offsets, L, seed)."""

    seq_len: int
    row_bounds: np.ndarray  # int64 [rows + 1]: row r holds pieces row_bounds[r]:row_bounds[r+1]
    piece_starts: np.ndarray  # int64 [pieces]: the piece's first token in the store
    piece_pairs: np.ndarray  # int64 [pieces]: input/target pairs of the piece (its tokens - 1)
    num_documents: int
    skipped_documents: int  # documents of a single token have no pair to train on
    cut_documents: int  # documents longer than L + 1 tokens, cut into pieces

    @property
    def num_rows(self) -> int:
        return self.row_bounds.size - 1

    @property
    def padding_fraction(self) -> float:
        """Share of the row positions that are padding."""
        capacity = self.num_rows * self.seq_len
        return 1.0 - float(self.piece_pairs.sum()) / capacity if capacity else 0.0


def pack_documents(offsets: np.ndarray, seq_len: int, seed: Sequence[int] | None) -> PackingPlan:
    """The packing plan for documents with the given offsets; `seed` None packs in store order."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    offsets = np.asarray(offsets, dtype=np.int64)
    pairs_D = np.diff(offsets) - 1
    trainable_D = pairs_D > 0
    full_pieces_D = np.where(trainable_D, pairs_D // seq_len, 0)
    remainder_D = np.where(trainable_D, pairs_D % seq_len, 0)

    # Full pieces: each one row.
    doc_F, k_F = ragged_ranges(full_pieces_D)
    full_starts_F = offsets[doc_F] + k_F * seq_len

    # Whole documents and remainder pieces, packed greedily in the seeded order.
    (doc_P,) = np.nonzero(remainder_D)
    if seed is not None:
        doc_P = np.random.default_rng(list(seed)).permutation(doc_P)
    packed_pairs_P = remainder_D[doc_P]
    packed_starts_P = offsets[doc_P] + full_pieces_D[doc_P] * seq_len
    first_P = _next_fit_rows(packed_pairs_P, seq_len)

    piece_starts = np.concatenate([full_starts_F, packed_starts_P])
    piece_pairs = np.concatenate([np.full(doc_F.size, seq_len, np.int64), packed_pairs_P])
    row_bounds = np.concatenate([np.arange(doc_F.size), doc_F.size + first_P, [piece_starts.size]])
    row_bounds, piece_starts, piece_pairs = _order_rows_by_store_position(row_bounds, piece_starts, piece_pairs)
    return PackingPlan(
        seq_len=seq_len,
        row_bounds=row_bounds,
        piece_starts=piece_starts,
        piece_pairs=piece_pairs,
        num_documents=int(pairs_D.size),
        skipped_documents=int((~trainable_D).sum()),
        cut_documents=int((pairs_D > seq_len).sum()),
    )


def _next_fit_rows(pairs_P: np.ndarray, capacity: int) -> np.ndarray:
    """Index of the first item of each row when items (each <= capacity) are packed by next fit."""
    end_P1 = np.concatenate([[0], np.cumsum(pairs_P)])
    # A row that starts at item i ends before item next[i]: the first item whose end passes capacity.
    next_first = (np.searchsorted(end_P1, end_P1[:-1] + capacity, side="right") - 1).tolist()
    firsts, i, count = [], 0, len(next_first)
    add = firsts.append
    while i < count:  # one step per row: the only sequential part of the plan
        add(i)
        i = next_first[i]
    return np.asarray(firsts, dtype=np.int64)


def _order_rows_by_store_position(
    row_bounds: np.ndarray, piece_starts: np.ndarray, piece_pairs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renumber rows by the store position of their first piece (pieces keep their order in a row)."""
    counts_R = np.diff(row_bounds)
    order_R = np.argsort(piece_starts[row_bounds[:-1]], kind="stable")
    row_T, k_T = ragged_ranges(counts_R[order_R])
    pieces_T = row_bounds[order_R][row_T] + k_T
    new_bounds = np.concatenate([[0], np.cumsum(counts_R[order_R])])
    return new_bounds, piece_starts[pieces_T], piece_pairs[pieces_T]


class PackedWindows(RowSource):
    """Grain random-access source (`grain.MapDataset.source(...)`) of packed long-context rows.

    `read_rows(ids)` reads the pieces of all rows of a batch with one `read_windows` call per length
    bucket (powers of two up to L + 1), so a batch costs a handful of batched, concurrent reads.
    """

    def __init__(self, store: TokenStore, plan: PackingPlan) -> None:
        self.store = store
        self.plan = plan
        self.seq_len = plan.seq_len

    def __len__(self) -> int:
        return self.plan.num_rows

    def __repr__(self) -> str:
        return f"PackedWindows({self.store.path}, seq_len={self.seq_len}, rows={len(self)})"

    def read(self, row_ids: Sequence[int]) -> Rows:
        """The given packed rows, in order."""
        ids_N = check_indices(row_ids, len(self), repr(self))
        plan, length, n = self.plan, self.seq_len, ids_N.size
        counts_N = plan.row_bounds[ids_N + 1] - plan.row_bounds[ids_N]
        row_I, rank_I = ragged_ranges(counts_N)
        piece_I = plan.row_bounds[ids_N][row_I] + rank_I
        pairs_I = plan.piece_pairs[piece_I]
        # Where each piece begins in its row: the pairs of the pieces before it in the same row.
        begin_I = np.cumsum(pairs_I) - pairs_I
        column_I = begin_I - begin_I[(np.cumsum(counts_N) - counts_N)[row_I]]
        fill_N = np.bincount(row_I, weights=pairs_I, minlength=n).astype(np.int64)
        tokens_T, source_I = self._read_pieces(plan.piece_starts[piece_I], pairs_I + 1)

        # Runs over the flattened rows: each row's pieces, then its padding tail (read from the zeros
        # that end tokens_T).
        (padded_P,) = np.nonzero(fill_N < length)
        run_starts_R = np.concatenate([row_I * length + column_I, padded_P * length + fill_N[padded_P]])
        run_segments_R = np.concatenate([rank_I + 1, np.zeros(padded_P.size, np.int64)])
        run_sources_R = np.concatenate([source_I, np.full(padded_P.size, tokens_T.size - length - 1)])
        order_R = np.argsort(run_starts_R, kind="stable")
        run_starts_R, run_segments_R = run_starts_R[order_R], run_segments_R[order_R]
        run_sources_R = run_sources_R[order_R]

        lengths_R = np.diff(run_starts_R, append=n * length)
        source_T = np.repeat(run_sources_R - run_starts_R, lengths_R) + np.arange(n * length)
        inputs_NxL = tokens_T[source_T].reshape(n, length)
        targets_NxL = tokens_T[source_T + 1].reshape(n, length)
        return Rows(inputs_NxL, targets_NxL, run_starts_R, run_segments_R, restart_positions=True, ids_read=(tokens_T,))

    def _read_pieces(self, starts_I: np.ndarray, lengths_I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All pieces' tokens in one flat buffer that ends with L + 1 zeros, and where each piece begins.

        One read_windows call per length bucket (powers of two from MIN_READ_LENGTH, capped at L + 1).
        """
        num_tokens = int(self.store.num_tokens)
        bucket_I = np.minimum(2 ** np.ceil(np.log2(np.maximum(lengths_I, MIN_READ_LENGTH))), self.seq_len + 1)
        bucket_I = np.minimum(bucket_I.astype(np.int64), num_tokens)
        parts, source_I, base = [], np.empty_like(starts_I), 0
        for bucket in np.unique(bucket_I):
            (pieces_K,) = np.nonzero(bucket_I == bucket)
            # A read never runs past the end of the store: the last ones start earlier and shift.
            read_starts_K = np.minimum(starts_I[pieces_K], num_tokens - bucket)
            parts.append(np.asarray(self.store.read_windows(read_starts_K, int(bucket)), dtype=np.int32).ravel())
            source_I[pieces_K] = base + np.arange(pieces_K.size) * bucket + starts_I[pieces_K] - read_starts_K
            base += parts[-1].size
        parts.append(np.zeros(self.seq_len + 1, np.int32))
        return np.concatenate(parts), source_I
