"""Concat windows and packed long-context rows against plain Python reference implementations."""

from __future__ import annotations

import grain
import numpy as np
import pytest
from pipeline_stores import EOS, random_documents, write_store

from megadoc_jax.data.packing import PackedWindows, pack_documents
from megadoc_jax.data.store import StoreReader
from megadoc_jax.data.windows import ConcatWindows, ragged_ranges, rows_from_runs

# --------------------------------------------------------------------------------------------------
# References: one token at a time, no numpy tricks
# --------------------------------------------------------------------------------------------------


def reference_concat_window(documents, seq_len, index, masking):
    stream = [(int(token), d) for d, doc in enumerate(documents) for token in doc]
    window = stream[index * seq_len : index * seq_len + seq_len + 1]
    row = {"inputs": [], "targets": [], "positions": [], "segment_ids": [], "loss_mask": []}
    first_doc = window[0][1]
    segment_start = 0
    for j in range(seq_len):
        token, doc = window[j]
        if j > 0 and doc != window[j - 1][1]:
            segment_start = j
        row["inputs"].append(token)
        row["targets"].append(window[j + 1][0])
        row["positions"].append(j - segment_start if masking else j)
        row["segment_ids"].append(doc - first_doc + 1)
        row["loss_mask"].append(1.0)
    return row


def reference_packed_rows(documents, seq_len, order):
    """Cut long documents into L-pair pieces (one row each), next-fit the rest in `order`."""
    rows, current = [], []
    for doc in range(len(documents)):
        pairs = len(documents[doc]) - 1
        for k in range(pairs // seq_len):
            rows.append([(doc, k * seq_len, seq_len)])
    for doc in order:
        pairs = len(documents[doc]) - 1
        if pairs % seq_len == 0:
            continue
        piece = (doc, pairs // seq_len * seq_len, pairs % seq_len)
        if sum(p[2] for p in current) + piece[2] > seq_len:
            rows.append(current)
            current = []
        current.append(piece)
    if current:
        rows.append(current)
    doc_start = np.concatenate([[0], np.cumsum([len(d) for d in documents])])
    rows.sort(key=lambda pieces: doc_start[pieces[0][0]] + pieces[0][1])

    out = []
    for pieces in rows:
        row = {key: [0] * seq_len for key in ("inputs", "targets", "positions", "segment_ids")}
        row["loss_mask"] = [0.0] * seq_len
        column = 0
        for rank, (doc, start, pairs) in enumerate(pieces):
            for j in range(pairs):
                row["inputs"][column] = int(documents[doc][start + j])
                row["targets"][column] = int(documents[doc][start + j + 1])
                row["positions"][column] = j
                row["segment_ids"][column] = rank + 1
                row["loss_mask"][column] = 1.0
                column += 1
        out.append(row)
    return out


def assert_rows_equal(batch, index, expected):
    for key, values in expected.items():
        np.testing.assert_array_equal(batch[key][index], np.asarray(values), err_msg=f"{key} of row {index}")


def open_store(tmp_path, documents):
    return StoreReader.open(write_store(tmp_path / "store", documents))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def test_ragged_ranges():
    run, within = ragged_ranges(np.array([2, 0, 3]))
    assert run.tolist() == [0, 0, 2, 2, 2]
    assert within.tolist() == [0, 1, 0, 1, 2]


def test_rows_from_runs():
    # Row 0: segments 1, 2, 3 from columns 0, 2, 5; row 1: segment 1 from 0, padding from 3.
    starts, segments = np.array([0, 2, 5, 6, 9]), np.array([1, 2, 3, 1, 0])
    segment_ids, positions = rows_from_runs(starts, segments, (2, 6), restart_positions=True)
    assert segment_ids.tolist() == [[1, 1, 2, 2, 2, 3], [1, 1, 1, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 0, 0]]
    _, columns = rows_from_runs(starts, segments, (2, 6), restart_positions=False)
    assert columns.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 0, 0]]


# --------------------------------------------------------------------------------------------------
# Concat windows
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masking", [False, True])
def test_concat_windows_match_reference(tmp_path, masking):
    # Single-token documents (EOS only) make boundaries at consecutive positions.
    documents = random_documents(120, seed=1, max_len=30) + [np.array([EOS], np.int32)] * 3
    store = open_store(tmp_path, documents)
    source = ConcatWindows(store, 16, document_masking=masking)
    assert len(source) == (store.num_tokens - 1) // 16
    ids = np.arange(len(source))[::-1]  # any order
    batch = source.read_rows(ids)
    for row, index in enumerate(ids):
        assert_rows_equal(batch, row, reference_concat_window(documents, 16, int(index), masking))


def test_concat_window_count_and_bounds(tmp_path):
    documents = [np.arange(1, 11, dtype=np.int32)]  # 10 tokens: windows of 4 + 1 -> (10 - 1) // 4 = 2
    source = ConcatWindows(open_store(tmp_path, documents), 4, document_masking=False)
    assert len(source) == 2
    assert source.read_rows([1])["targets"].tolist() == [[6, 7, 8, 9]]
    with pytest.raises(IndexError, match="window 2 outside"):
        source.read_rows([2])


@pytest.mark.parametrize("windows", ["concat", "document"])
def test_sources_work_as_grain_sources(tmp_path, windows):
    store = open_store(tmp_path, random_documents(50, seed=2))
    if windows == "concat":
        source = ConcatWindows(store, 8, document_masking=True)
    else:
        source = PackedWindows(store, pack_documents(store.offsets, 8, (0,)))
    dataset = grain.MapDataset.source(source)
    assert len(dataset) == len(source)
    expected = source.read_rows([5, 3])
    for row, index in enumerate([5, 3]):
        for key, value in dataset[index].items():
            np.testing.assert_array_equal(value, expected[key][row])
    batched = list(dataset.batch(4)[0:1])[0]  # Grain's batched read path (_getitems)
    for key, value in source.read_rows([0, 1, 2, 3]).items():
        np.testing.assert_array_equal(batched[key], value)


# --------------------------------------------------------------------------------------------------
# Packed long-context rows
# --------------------------------------------------------------------------------------------------


def packed_documents(seed):
    lengths = [1, 2, 17, 16, 40, 5, 33, 49, 3, 9, 1, 64, 12, 8, 100, 7]  # around L = 16: fits, exact, cut
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, 100, size=n - 1), EOS).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("seeded", [False, True])
def test_packed_rows_match_reference(tmp_path, seeded):
    documents = packed_documents(0) + random_documents(60, seed=3, max_len=20)
    store = open_store(tmp_path, documents)
    seed = (7, 3) if seeded else None
    plan = pack_documents(store.offsets, 16, seed)
    remainder_docs = [d for d, doc in enumerate(documents) if len(doc) > 1 and (len(doc) - 1) % 16]
    order = np.random.default_rng(list(seed)).permutation(remainder_docs) if seeded else remainder_docs
    expected = reference_packed_rows(documents, 16, order)
    source = PackedWindows(store, plan)
    assert len(source) == len(expected)
    batch = source.read_rows(np.arange(len(source)))
    for row, values in enumerate(expected):
        assert_rows_equal(batch, row, values)
    assert plan.skipped_documents == sum(len(d) == 1 for d in documents)
    assert plan.cut_documents == sum(len(d) > 17 for d in documents)


def test_packing_covers_every_target_once():
    rng = np.random.default_rng(0)
    lengths = np.maximum(1, rng.lognormal(5, 1.5, size=5_000).astype(np.int64))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    seq_len = 512
    plan = pack_documents(offsets, seq_len, (1,))
    fill_R = np.add.reduceat(plan.piece_pairs, plan.row_bounds[:-1])
    assert (fill_R <= seq_len).all() and (plan.piece_pairs > 0).all()
    # Every token but the first of each document is the target of exactly one pair.
    piece_T, j_T = ragged_ranges(plan.piece_pairs)
    targets = np.bincount(plan.piece_starts[piece_T] + j_T + 1, minlength=offsets[-1])
    expected = np.ones(offsets[-1], np.int64)
    expected[offsets[:-1]] = 0
    np.testing.assert_array_equal(targets, expected)
    # Next fit in random order leaves well under a fifth of the rows empty on this length mix.
    assert plan.padding_fraction < 0.2
    assert plan.cut_documents == int((lengths - 1 > seq_len).sum())


def test_long_context_window_of_65536(tmp_path):
    seq_len = 65_536
    rng = np.random.default_rng(5)
    documents = [rng.integers(1, 100, size=n).astype(np.int32) for n in (70_000, 30_000, 20_000, 65_537, 5)]
    store = open_store(tmp_path, documents)
    plan = pack_documents(store.offsets, seq_len, (0,))
    remainder_docs = [d for d, doc in enumerate(documents) if (len(doc) - 1) % seq_len]
    order = np.random.default_rng([0]).permutation(remainder_docs)
    expected = reference_packed_rows(documents, seq_len, order)
    batch = PackedWindows(store, plan).read_rows(np.arange(plan.num_rows))
    assert plan.num_rows == len(expected)
    for row, values in enumerate(expected):
        assert_rows_equal(batch, row, values)
    # Two full rows (the first piece of the 70,000-token document; the 65,537-token document whole),
    # and one row with the four short items: 4,463 + 29,999 + 19,999 + 4 pairs.
    assert plan.num_rows == 3
    assert (batch["segment_ids"] == 1).all(axis=1).sum() == 2
    assert batch["loss_mask"].sum() == sum(len(d) - 1 for d in documents)
