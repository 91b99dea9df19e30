"""Token store: round trips, crash and resume, refusals, validation, window reads (megadoc_jax/data/store.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megadoc_jax.data import store_reader
from megadoc_jax.data.store import (
    FORMAT_VERSION,
    Document,
    Segment,
    SegmentKind,
    StoreError,
    StoreLayout,
    StoreReader,
    StoreWriter,
    TokenizerInfo,
    finished_manifest,
)

TOKENIZER = TokenizerInfo(name="test-bpe", hash="sha256:" + "ab" * 32, vocab_size=1000, eos_id=999)
OTHER_TOKENIZER = TokenizerInfo(name="test-bpe", hash="sha256:" + "cd" * 32, vocab_size=1000, eos_id=999)
# Tiny chunks so that small stores span many chunks and windows cross chunk boundaries.
SMALL_CHUNKS = StoreLayout(tokens_chunk=64, tokens_shard=0, aux_chunk=32)
SMALL_SHARDS = StoreLayout(tokens_chunk=64, tokens_shard=256, tokens_codec="zstd", aux_chunk=32)
SMALL_RAW_SHARDS = StoreLayout(tokens_chunk=64, tokens_shard=256, aux_chunk=32)  # uncompressed, like the default


def make_documents(count: int, seed: int) -> list[Document]:
    """Deterministic documents: plain ones (segments None) and megadocs with every segment kind."""
    rng = np.random.default_rng(seed)
    documents = []
    for i in range(count):
        if i % 3 == 0:
            n = int(rng.integers(1, 90))
            tokens = rng.integers(0, TOKENIZER.vocab_size - 1, n).astype(np.int32)
            tokens[-1] = TOKENIZER.eos_id
            documents.append(Document(tokens, {"source_id": f"web-{i}", "method": "original", "G": 0}))
            continue
        G = int(rng.integers(1, 4))
        segments = [Segment(SegmentKind.ORIGINAL, 0, int(rng.integers(1, 40)))]
        for k in range(1, G + 1):
            kind = SegmentKind.REPHRASE if i % 3 == 1 else SegmentKind.RATIONALE
            segments += [Segment(SegmentKind.SEPARATOR, 0, 1), Segment(kind, k, int(rng.integers(1, 50)))]
        segments.append(Segment(SegmentKind.SEPARATOR, 0, 1))  # EOS
        n = sum(s.length for s in segments)
        tokens = rng.integers(0, TOKENIZER.vocab_size, n).astype(np.int64 if i % 2 else np.int32)
        metadata = {
            "source_id": f"web-{i // 3}",
            "method": "stitched" if i % 3 == 1 else "stretched",
            "G": G,
            "generator": "llama-3.1-8b-instruct",
            "prompt_version": "wrap-wiki-v1",
            "finish_reason": ["stop", "length"][i % 2],
            "note": {"nested": [1, 2.5, None], "unicode": "é→∞"},
        }
        documents.append(Document(tokens, metadata, tuple(segments)))
    return documents


def write_store(path: Path, documents: list[Document], **kwargs) -> dict:
    writer = StoreWriter(path, TOKENIZER, **kwargs)
    writer.append(documents)
    return writer.finish()


def flat_tokens(documents: list[Document]) -> np.ndarray:
    return np.concatenate([d.tokens for d in documents]).astype(np.int32)


def flat_segments(documents: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (kind, index) expected for the concatenated documents."""
    kinds, indices = [], []
    for d in documents:
        segments = d.segments or (Segment(SegmentKind.ORIGINAL, 0, d.tokens.size),)
        kinds += [np.full(s.length, int(s.kind), np.uint8) for s in segments]
        indices += [np.full(s.length, s.index, np.int16) for s in segments]
    return np.concatenate(kinds), np.concatenate(indices)


def assert_same_documents(reader: StoreReader, documents: list[Document]) -> None:
    assert reader.num_documents == len(documents)
    for i, expected in enumerate(documents):
        got = reader.document(i)
        assert got.tokens.dtype == np.int32
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        assert got.metadata == expected.metadata
        assert got.segments == (expected.segments or (Segment(SegmentKind.ORIGINAL, 0, expected.tokens.size),))


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


def test_round_trip_of_every_field(tmp_path: Path) -> None:
    documents = make_documents(40, seed=0)
    manifest = write_store(tmp_path / "s", documents, flush_tokens=500, layout=SMALL_CHUNKS)
    reader = StoreReader.open(tmp_path / "s", TOKENIZER)

    tokens = flat_tokens(documents)
    assert manifest == reader.manifest == json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["finished"] is True and manifest["format_version"] == FORMAT_VERSION
    assert manifest["tokenizer"] == TOKENIZER.to_dict()
    assert (manifest["vocab_size"], manifest["eos_id"]) == (TOKENIZER.vocab_size, TOKENIZER.eos_id)
    assert (manifest["num_documents"], manifest["num_tokens"]) == (40, tokens.size)
    assert manifest["num_segments"] == sum(len(d.segments or (0,)) for d in documents)
    assert manifest["layout"] == SMALL_CHUNKS.to_dict()
    assert manifest["content_hash"].startswith("sha256:") and manifest["flushes"] > 3
    assert (reader.vocab_size, reader.eos_id, reader.tokenizer) == (1000, 999, TOKENIZER)

    lengths = [d.tokens.size for d in documents]
    np.testing.assert_array_equal(reader.offsets, np.concatenate([[0], np.cumsum(lengths)]))
    assert reader.offsets.dtype == np.int64
    assert_same_documents(reader, documents)

    kind_T, index_T = flat_segments(documents)
    starts = [0, 1, 63, 64, 100, tokens.size - 200]
    kind_NxL, index_NxL = reader.read_segments(starts, 200)
    assert kind_NxL.dtype == np.uint8 and index_NxL.dtype == np.int16
    np.testing.assert_array_equal(kind_NxL, np.stack([kind_T[s : s + 200] for s in starts]))
    np.testing.assert_array_equal(index_NxL, np.stack([index_T[s : s + 200] for s in starts]))
    assert reader.verify() == manifest["content_hash"]


def levanter_spec(path: Path) -> dict:
    """What Levanter's JaggedArrayStore.open asks tensorstore for (levanter/store/jagged_array.py)."""
    inner = {"chunk_shape": [256 * 1024], "codecs": [{"name": "blosc", "configuration": {"clevel": 5}}]}
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [256 * 1024 * 512]}},
            "codecs": [{"name": "sharding_indexed", "configuration": inner}],
        },
    }


def test_levanter_layout_opens_as_levanter_jagged_arrays(tmp_path: Path) -> None:
    """input_ids/{data,offsets} follow Levanter's JaggedArrayStore: offsets[0] = rows, then row ends."""
    import tensorstore as ts

    documents = make_documents(7, seed=1)
    write_store(tmp_path / "s", documents, layout=StoreLayout.levanter())
    offsets = ts.open(levanter_spec(tmp_path / "s/input_ids/offsets"), open=True).result().read().result()
    data = ts.open(levanter_spec(tmp_path / "s/input_ids/data"), open=True).result()
    assert offsets[0] == 7 and offsets.size == 8
    for i, d in enumerate(documents):
        start = 0 if i == 0 else offsets[i]
        np.testing.assert_array_equal(data[start : offsets[i + 1]].read().result(), d.tokens)


def test_content_hash_ignores_flush_splits_and_layout(tmp_path: Path) -> None:
    documents = make_documents(30, seed=2)
    one_flush = write_store(tmp_path / "a", documents, flush_tokens=1 << 20)
    many_flushes = write_store(tmp_path / "b", documents, flush_tokens=7, layout=SMALL_CHUNKS)
    blosc = StoreLayout(tokens_chunk=100, tokens_shard=0, tokens_codec="blosc")
    compressed = write_store(tmp_path / "c", documents, layout=blosc)
    assert one_flush["flushes"] == 1 and many_flushes["flushes"] == 30
    assert one_flush["content_hash"] == many_flushes["content_hash"] == compressed["content_hash"]
    changed = make_documents(30, seed=2)
    changed[17].metadata["finish_reason"] = "abort"
    assert write_store(tmp_path / "d", changed)["content_hash"] != one_flush["content_hash"]


@pytest.mark.parametrize(
    "checksum, message",
    [
        (True, r"content hash check failed: .*array input_ids/data, chunk 1 \(elements \[64, 128\) .*Digest mismatch"),
        (False, r"content hash .* differs from manifest.json content_hash"),  # no crc32c: only the hash sees it
    ],
)
def test_verify_detects_damaged_chunk(tmp_path: Path, checksum: bool, message: str) -> None:
    layout = dataclasses.replace(SMALL_CHUNKS, checksum=checksum)
    write_store(tmp_path / "s", make_documents(10, seed=3), layout=layout)
    chunk = tmp_path / "s" / "input_ids" / "data" / "c" / "1"
    raw = bytearray(chunk.read_bytes())
    raw[8] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=message):
        StoreReader.open(tmp_path / "s").verify()


def test_empty_store(tmp_path: Path) -> None:
    manifest = StoreWriter(tmp_path / "s", TOKENIZER).finish()
    reader = StoreReader.open(tmp_path / "s", TOKENIZER)
    assert (manifest["num_documents"], reader.num_tokens, reader.offsets.tolist()) == (0, 0, [0])
    with pytest.raises(StoreError, match="outside the store's tokens"):
        reader.read_windows([0], 1)


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("read_chunks", [1, 3], ids=["chunk-blocks", "3-chunk-blocks"])
@pytest.mark.parametrize(
    "layout", [SMALL_CHUNKS, SMALL_RAW_SHARDS, SMALL_SHARDS], ids=["chunks", "raw-shards", "zstd-shards"]
)
@pytest.mark.parametrize("cache_bytes", [0, 1000, 1 << 20], ids=["streaming", "streaming-cached", "resident"])
def test_windows_match_numpy_slicing(
    tmp_path: Path, cache_bytes: int, layout: StoreLayout, read_chunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_reader, "RESIDENT_READ_CHUNKS", read_chunks)  # blocks the resident mode reads
    documents = make_documents(60, seed=4)
    write_store(tmp_path / "s", documents, flush_tokens=333, layout=layout)
    reader = StoreReader.open(tmp_path / "s", cache_bytes=cache_bytes)
    streaming = "tensorstore" if layout.tokens_codec != "none" else "direct"  # compressed chunks need decoding
    assert reader.window_reads == ("resident" if cache_bytes == 1 << 20 else streaming)
    tokens = flat_tokens(documents)
    rng = np.random.default_rng(0)
    for length in (1, 17, 64, 65, 200):  # inside one chunk, exactly one chunk, across 2 and 4+ chunks
        starts = np.concatenate([rng.integers(0, tokens.size - length + 1, 20), [0, 63, 64, tokens.size - length]])
        expected = np.stack([tokens[s : s + length] for s in starts])
        np.testing.assert_array_equal(reader.read_windows(starts, length), expected)
    whole = reader.read_windows([0], tokens.size)[0]
    np.testing.assert_array_equal(whole, tokens)


def test_window_errors_name_the_store(tmp_path: Path) -> None:
    documents = make_documents(5, seed=5)
    write_store(tmp_path / "s", documents)
    reader = StoreReader.open(tmp_path / "s")
    n = reader.num_tokens
    with pytest.raises(StoreError, match=rf"{tmp_path}/s: window \[{n - 9}, {n + 1}\) lies outside .* \[0, {n}\)"):
        reader.read_windows([0, n - 9], 10)
    with pytest.raises(StoreError, match="outside"):
        reader.read_segments([-1], 4)
    with pytest.raises(StoreError, match="window length must be positive"):
        reader.read_windows([0], 0)
    with pytest.raises(StoreError, match="1-D sequence of integers"):
        reader.read_windows([0.5], 2)
    with pytest.raises(IndexError, match=r"document 5 out of range \[0, 5\)"):
        reader.document(5)


def test_reader_pickles_for_worker_processes(tmp_path: Path) -> None:
    documents = make_documents(8, seed=6)
    write_store(tmp_path / "s", documents)
    clone = pickle.loads(pickle.dumps(StoreReader.open(tmp_path / "s")))
    assert_same_documents(clone, documents)


# --------------------------------------------------------------------------------------------------
# Crash and resume
# --------------------------------------------------------------------------------------------------

CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_store import TOKENIZER, SMALL_CHUNKS, make_documents
from megadoc_jax.data.store import StoreWriter

documents = make_documents({count}, seed=7)
writer = StoreWriter({path!r}, TOKENIZER, flush_tokens=150, layout=SMALL_CHUNKS)
committed = writer.num_committed
for document in documents:
    writer.append([document])
    if writer.num_committed != committed:
        committed = writer.num_committed
        print("committed", committed, flush=True)
print("done", flush=True)
"""


def test_writer_resumes_after_sigkill(tmp_path: Path) -> None:
    count = 600  # far more than the child writes before the kill
    script = CHILD.format(tests=str(Path(__file__).parent), count=count, path=str(tmp_path / "killed"))
    python_path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    for _ in range(8):  # let it commit 8 flushes, then kill it while it keeps writing
        line = child.stdout.readline()
        if not line.startswith("committed"):
            child.kill()
            pytest.fail(f"the writer process ended early: {line!r}")
        last_committed = int(line.split()[1])
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()

    with pytest.raises(StoreError, match="unfinished"):
        StoreReader.open(tmp_path / "killed", TOKENIZER)
    documents = make_documents(count, seed=7)
    writer = StoreWriter(tmp_path / "killed", TOKENIZER)
    assert last_committed <= writer.num_committed < count
    writer.append(documents[writer.num_committed :])
    resumed = writer.finish()

    uninterrupted = write_store(tmp_path / "clean", documents, flush_tokens=1 << 20)
    assert resumed["content_hash"] == uninterrupted["content_hash"]
    reader = StoreReader.open(tmp_path / "killed", TOKENIZER)
    np.testing.assert_array_equal(reader.read_windows([0], reader.num_tokens)[0], flat_tokens(documents))
    assert_same_documents(reader, documents)
    np.testing.assert_array_equal(reader.offsets, StoreReader.open(tmp_path / "clean").offsets)


@pytest.mark.parametrize("layout", [SMALL_CHUNKS, SMALL_SHARDS], ids=["chunks", "shards"])
def test_data_written_past_the_commit_record_is_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: StoreLayout
) -> None:
    """A crash after a flush's arrays are written but before its commit record: the flush never happened."""
    documents = make_documents(30, seed=8)
    writer = StoreWriter(tmp_path / "s", TOKENIZER, layout=layout)
    writer.append(documents[:10])
    writer.flush()

    def crash() -> None:
        raise KeyboardInterrupt("killed before the commit record")

    monkeypatch.setattr(writer, "_write_commit", crash)
    writer.append(documents[10:25])
    with pytest.raises(KeyboardInterrupt):
        writer.flush()
    writer._lock.release()  # what a killed process leaves: the kernel drops its lock

    resumed = StoreWriter(tmp_path / "s", TOKENIZER)
    assert resumed.num_committed == 10 and resumed.num_documents == 10
    resumed.append(documents[10:12])  # fewer than the lost flush: its leftover chunks must not survive
    manifest = resumed.finish()
    assert manifest["content_hash"] == write_store(tmp_path / "clean", documents[:12])["content_hash"]
    assert_same_documents(StoreReader.open(tmp_path / "s"), documents[:12])
    chunk_files = sorted(int(p.name) for p in (tmp_path / "s" / "input_ids" / "data" / "c").iterdir())
    assert chunk_files[-1] == (manifest["num_tokens"] - 1) // (layout.tokens_shard or layout.tokens_chunk)


def test_exception_in_with_block_drops_buffer_and_resume_continues(tmp_path: Path) -> None:
    documents = make_documents(12, seed=9)
    with pytest.raises(RuntimeError), StoreWriter(tmp_path / "s", TOKENIZER) as writer:
        writer.append(documents[:5])
        writer.flush()
        writer.append(documents[5:8])
        raise RuntimeError("input broke")
    with StoreWriter(tmp_path / "s", TOKENIZER) as writer:
        assert writer.num_committed == 5
        writer.append(documents[5:])
    writer = StoreWriter(tmp_path / "s", TOKENIZER)  # a clean exit flushed; finish after reopening
    assert writer.num_committed == 12
    writer.finish()
    assert_same_documents(StoreReader.open(tmp_path / "s"), documents)


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


def test_reader_refusals(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=rf"{tmp_path}/none: not a token store"):
        StoreReader.open(tmp_path / "none")

    writer = StoreWriter(tmp_path / "s", TOKENIZER)
    writer.append(make_documents(3, seed=10))
    writer.flush()
    with pytest.raises(StoreError, match=rf"{tmp_path}/s: manifest.json finished is false: the store is unfinished"):
        StoreReader.open(tmp_path / "s", TOKENIZER)
    writer.finish()

    hashes = rf"{tmp_path}/s: manifest.json tokenizer .*{'ab' * 32}.* differs .*{'cd' * 32}"
    with pytest.raises(StoreError, match=hashes):
        StoreReader.open(tmp_path / "s", OTHER_TOKENIZER)

    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"{tmp_path}/s: manifest.json format_version {FORMAT_VERSION + 1} is newer"):
        StoreReader.open(tmp_path / "s", TOKENIZER)


def test_writer_refusals(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", TOKENIZER, layout=SMALL_CHUNKS)
    with pytest.raises(StoreError, match="another StoreWriter holds"):
        StoreWriter(tmp_path / "s", TOKENIZER)
    writer.close()
    with pytest.raises(StoreError, match="manifest.json tokenizer .* differs"):
        StoreWriter(tmp_path / "s", OTHER_TOKENIZER)
    with pytest.raises(StoreError, match="manifest.json layout .* differs from the requested"):
        StoreWriter(tmp_path / "s", TOKENIZER, layout=StoreLayout())
    writer = StoreWriter(tmp_path / "s", TOKENIZER)
    writer.finish()
    with pytest.raises(StoreError, match="is finished"):
        writer.append(make_documents(1, seed=0))
    with pytest.raises(StoreError, match="is finished; delete it"):
        StoreWriter(tmp_path / "s", TOKENIZER)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="is not a token store .* not empty"):
        StoreWriter(tmp_path / "other", TOKENIZER)


# --------------------------------------------------------------------------------------------------
# Invalid documents
# --------------------------------------------------------------------------------------------------

GOOD = np.array([5, 6, 999], np.int32)


@pytest.mark.parametrize(
    "document, message",
    [
        (Document(np.array([[1, 2]], np.int32), {}), r"document 1\.tokens: must be a 1-D integer numpy array"),
        (Document(np.array([1.0, 2.0]), {}), "must be a 1-D integer numpy array"),
        (Document([1, 2], {}), "must be a 1-D integer numpy array, got list"),
        (Document(np.array([], np.int32), {}), "is empty"),
        (Document(np.array([3, 1000]), {}), r"id 1000 outside \[0, vocab_size=1000\)"),
        (Document(np.array([-1, 3]), {}), r"id -1 outside"),
        (Document(GOOD, {}, (Segment(SegmentKind.ORIGINAL, 0, 2),)), "lengths sum to 2, but the document has 3 tokens"),
        (Document(GOOD, {}, ()), "must be None or a non-empty tuple of Segment"),
        (Document(GOOD, {"G": "4"}), r"metadata\['G'\]: '4' is not of type"),
        (Document(GOOD, {"when": object()}), "metadata: not JSON-serializable"),
        (Document(GOOD, ["not", "a", "dict"]), "metadata: must be a dict"),
        ("not a document", "expected a Document, got str"),
    ],
)
def test_invalid_documents_are_refused_and_add_nothing(tmp_path: Path, document: object, message: str) -> None:
    writer = StoreWriter(tmp_path / "s", TOKENIZER)
    with pytest.raises(StoreError, match=message):
        writer.append([Document(GOOD, {}), document])
    assert writer.num_documents == 0
    writer.close()


def test_invalid_segments_are_refused() -> None:
    with pytest.raises(ValueError, match="Segment.kind: 7 is not one of"):
        Segment(7, 0, 3)
    with pytest.raises(ValueError, match="Segment.length: must be positive"):
        Segment(SegmentKind.REPHRASE, 1, 0)
    with pytest.raises(ValueError, match="Segment.index"):
        Segment(SegmentKind.REPHRASE, -1, 2)
    assert Segment(2, 3, 4).kind is SegmentKind.RATIONALE


# --------------------------------------------------------------------------------------------------
# Tokenizer identity, imports
# --------------------------------------------------------------------------------------------------


def save_tokenizer(path: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(["<unk>", *words, "</s>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))


def test_tokenizer_info_from_directory(tmp_path: Path) -> None:
    save_tokenizer(tmp_path / "a", ["hello", "world"])
    save_tokenizer(tmp_path / "b", ["hello", "there"])
    (tmp_path / "a" / "model.safetensors").write_bytes(b"weights do not enter the hash")
    info = TokenizerInfo.from_directory(tmp_path / "a")
    assert (info.name, info.vocab_size, info.eos_id) == ("a", 4, 3)
    assert info == TokenizerInfo.from_directory(tmp_path / "a")
    assert info.hash != TokenizerInfo.from_directory(tmp_path / "b").hash
    with pytest.raises(StoreError, match="no tokenizer.json"):
        TokenizerInfo.from_directory(tmp_path)


def test_store_module_imports_without_jax() -> None:
    code = "import sys, megadoc_jax.data.store; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_layout_validation() -> None:
    with pytest.raises(ValueError, match="tokens_shard: 100 is not 0 or a multiple of tokens_chunk"):
        StoreLayout(tokens_chunk=64, tokens_shard=100)
    with pytest.raises(ValueError, match="tokens_codec: 'lz4' not in"):
        StoreLayout(tokens_codec="lz4")
    with pytest.raises(ValueError, match="aux_chunk must be positive"):
        StoreLayout(aux_chunk=0)


def test_finished_manifest_is_none_until_the_store_is_finished(tmp_path):
    assert finished_manifest(tmp_path / "s") is None  # absent
    writer = StoreWriter(tmp_path / "s", TOKENIZER)
    writer.append(make_documents(4, seed=3))
    writer.flush()
    assert finished_manifest(tmp_path / "s") is None  # being written
    manifest = writer.finish()
    assert finished_manifest(tmp_path / "s") == manifest and manifest["finished"] is True
    (tmp_path / "s" / "manifest.json").write_text("{")
    with pytest.raises(StoreError, match="manifest.json is not valid JSON"):
        finished_manifest(tmp_path / "s")
