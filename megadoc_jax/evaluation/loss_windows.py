"""The two window recipes of held-out losses: which tokens are scored, with which left context.

    plan = concat_plan(store, seq_len)                 # the paper's stack's recipe
    plan = document_plan(store, seq_len, stride)       # every document on its own
    rows = plan.read_batch(store, b, batch_size)       # batch b: a RowBatch of [batch_size, seq_len] rows

concat: the store's documents concatenated as the store holds them (each ends with its EOS), cut into
  windows of seq_len tokens at stride seq_len, the incomplete tail dropped; within a window token t
  predicts token t + 1 and the last position has no target (seq_len - 1 targets per window); one segment
  per window, so attention crosses document boundaries. The very first token of the store is never a
  target. This is the recipe of eval-notes.md ("Held-out losses in the paper's stack").
document: each document on its own, preceded by the EOS separator (what precedes every document of a
  concatenated stream), so all its n tokens are targets, its first one predicted from the separator alone.
  A document of up to seq_len tokens is one window; a longer one is scored in overlapping windows of
  seq_len targets whose ends advance by `stride`: window k ends at min(seq_len + k * stride, n) and scores
  only the targets after the previous window's end, so every token is scored exactly once, with at least
  seq_len - stride tokens of left context once past the first window (all there are before that).

Windows are placed into rows of seq_len positions: concat one window per row (its last column padding);
document windows packed in store order, a new row when the next window does not fit, each window its own
segment (document masking) with positions from 0. Masked attention never mixes segments, so a packed
window is scored exactly as it would be alone. Every row of a batch is built from one contiguous read of
the store. Numpy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from megadoc_jax.config import EVAL_RECIPES
from megadoc_jax.data.store import StoreReader
from megadoc_jax.data.windows import ragged_ranges

RECIPES = EVAL_RECIPES


class WindowError(ValueError):
    """A recipe that cannot be applied (window length, stride); the message names the option."""


@dataclasses.dataclass
class RowBatch:
    """Rows of the batch format plus, per target, where it sits: -1 (kind) / -1 (position) where unscored."""

    batch: dict[str, np.ndarray]  # inputs, targets, positions, segment_ids (int32), loss_mask (fp32), [B, L]
    document_position_BxL: np.ndarray | None = None  # int64: index of the target inside its document
    segment_kind_BxL: np.ndarray | None = None  # int16: SegmentKind of the target, -1 unscored
    segment_index_BxL: np.ndarray | None = None  # int16: k of rephrase k / rationale k
    target_index_BxL: np.ndarray | None = None  # int64: the target's index in the store's flat token array


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Windows of one recipe over one store, with their places in rows (module docstring).

    Window w scores targets [target_start_W[w] + skip_W[w], target_start_W[w] + length_W[w]) of the store's
    flat token array; its inputs are the tokens before each target (the EOS separator for the first one
    when eos_first_W[w])."""

    recipe: str
    seq_len: int
    stride: int | None
    target_start_W: np.ndarray  # int64
    length_W: np.ndarray  # int64: target slots (input positions) of the window, <= seq_len
    skip_W: np.ndarray  # int64: leading targets scored by an earlier window
    eos_first_W: np.ndarray  # bool
    row_W: np.ndarray  # int64, non-decreasing
    column_W: np.ndarray  # int64
    segment_W: np.ndarray  # int32: 1, 2, ... within a row
    num_rows: int

    @property
    def num_windows(self) -> int:
        return int(self.length_W.size)

    @property
    def scored_tokens(self) -> int:
        return int(np.sum(self.length_W - self.skip_W))

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_rows // batch_size)

    def read_batch(self, store: StoreReader, index: int, batch_size: int) -> RowBatch:
        """Rows [index * batch_size, (index + 1) * batch_size) (empty rows past the end: all padding)."""
        length = self.seq_len
        first, last = np.searchsorted(self.row_W, [index * batch_size, (index + 1) * batch_size])
        window = slice(int(first), int(last))
        batch = {
            key: np.zeros((batch_size, length), np.int32) for key in ("inputs", "targets", "positions", "segment_ids")
        }
        batch["loss_mask"] = np.zeros((batch_size, length), np.float32)
        position_BxL = np.full((batch_size, length), -1, np.int64)
        kind_BxL = np.full((batch_size, length), -1, np.int16)
        k_BxL = np.full((batch_size, length), -1, np.int16)
        target_BxL = np.full((batch_size, length), -1, np.int64)
        rows = RowBatch(batch, position_BxL, kind_BxL, k_BxL, target_BxL)
        if first == last:
            return rows
        starts_W, lengths_W = self.target_start_W[window], self.length_W[window]
        # One contiguous read covers every input and target of these windows.
        lo = int(np.min(starts_W - 1 + self.eos_first_W[window]))
        hi = int(np.max(starts_W + lengths_W))
        tokens_T = store.read_windows([lo], hi - lo)[0]
        kind_T, k_T = store.read_segments([lo], hi - lo)
        w_N, column_N = ragged_ranges(lengths_W)
        target_N = starts_W[w_N] + column_N  # flat store index of every target slot
        input_N = np.where(
            (column_N == 0) & self.eos_first_W[window][w_N],
            store.eos_id,
            tokens_T[np.maximum(target_N - 1 - lo, 0)],
        )
        row_N = self.row_W[window][w_N] - index * batch_size
        col_N = self.column_W[window][w_N] + column_N
        scored_N = column_N >= self.skip_W[window][w_N]
        batch["inputs"][row_N, col_N] = input_N
        batch["targets"][row_N, col_N] = tokens_T[target_N - lo]
        batch["positions"][row_N, col_N] = column_N
        batch["segment_ids"][row_N, col_N] = self.segment_W[window][w_N]
        batch["loss_mask"][row_N, col_N] = scored_N
        row_S, col_S, target_S = row_N[scored_N], col_N[scored_N], target_N[scored_N]
        document_S = np.searchsorted(store.offsets, target_S, side="right") - 1
        position_BxL[row_S, col_S] = target_S - store.offsets[document_S]
        kind_BxL[row_S, col_S] = kind_T[0, target_S - lo]
        k_BxL[row_S, col_S] = k_T[0, target_S - lo]
        target_BxL[row_S, col_S] = target_S
        return rows


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise WindowError(f"data.seq_len: a window needs at least 2 positions, got {seq_len}")


def concat_plan(store: StoreReader, seq_len: int) -> WindowPlan:
    """The paper's stack's windows (module docstring); WindowError if the store holds no whole window."""
    _check_seq_len(seq_len)
    windows = int(store.num_tokens) // seq_len
    if windows == 0:
        raise WindowError(
            f"data.seq_len: the store {store.path} holds {store.num_tokens} tokens, fewer than one concat window "
            f"of {seq_len}"
        )
    w_W = np.arange(windows, dtype=np.int64)
    return WindowPlan(
        recipe="concat",
        seq_len=seq_len,
        stride=None,
        target_start_W=w_W * seq_len + 1,
        length_W=np.full(windows, seq_len - 1, np.int64),
        skip_W=np.zeros(windows, np.int64),
        eos_first_W=np.zeros(windows, bool),
        row_W=w_W,
        column_W=np.zeros(windows, np.int64),
        segment_W=np.ones(windows, np.int32),
        num_rows=windows,
    )


def document_plan(store: StoreReader, seq_len: int, stride: int) -> WindowPlan:
    """Every document on its own, long ones in windows whose ends advance by `stride` (module docstring)."""
    _check_seq_len(seq_len)
    if not 0 < stride <= seq_len:
        raise WindowError(f"--stride: {stride} must lie in [1, data.seq_len={seq_len}]")
    offsets = np.asarray(store.offsets, np.int64)
    n_D = np.diff(offsets)
    count_D = np.where(n_D <= seq_len, 1, 1 + -(-(n_D - seq_len) // stride))
    d_W, k_W = ragged_ranges(count_D)
    n_W = n_D[d_W]
    end_W = np.minimum(seq_len + k_W * stride, n_W)
    start_W = np.maximum(end_W - seq_len, 0)
    previous_end_W = np.where(k_W == 0, 0, np.minimum(seq_len + (k_W - 1) * stride, n_W))
    length_W = end_W - start_W
    row_W, column_W, segment_W = _pack(length_W, seq_len)
    return WindowPlan(
        recipe="document",
        seq_len=seq_len,
        stride=stride,
        target_start_W=offsets[d_W] + start_W,
        length_W=length_W,
        skip_W=previous_end_W - start_W,
        eos_first_W=start_W == 0,
        row_W=row_W,
        column_W=column_W,
        segment_W=segment_W,
        num_rows=int(row_W[-1]) + 1 if row_W.size else 0,
    )


def _pack(length_W: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, segment id) of windows packed in order, a new row when the next does not fit."""
    row_W = np.empty(length_W.size, np.int64)
    column_W = np.empty(length_W.size, np.int64)
    segment_W = np.empty(length_W.size, np.int32)
    row, column, segment = 0, 0, 0
    for w, length in enumerate(length_W.tolist()):
        if column + length > seq_len:
            row, column, segment = row + 1, 0, 0
        row_W[w], column_W[w], segment_W[w] = row, column, segment + 1
        column, segment = column + length, segment + 1
    return row_W, column_W, segment_W


def metric_prefix(store: str, recipe: str) -> str:
    """The metric names' stem: eval/<store> for concat (the paper's stack's names), eval/<store>/<recipe>."""
    return f"eval/{store}" if recipe == "concat" else f"eval/{store}/{recipe}"


def make_plan(recipe: str, store: StoreReader, seq_len: int, stride: int | None) -> WindowPlan:
    if recipe == "concat":
        return concat_plan(store, seq_len)
    if recipe == "document":
        return document_plan(store, seq_len, stride if stride is not None else max(seq_len // 2, 1))
    raise WindowError(f"--recipe: {recipe!r} not in {RECIPES}")
