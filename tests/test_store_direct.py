"""Direct window reads of uncompressed local token arrays (megadoc_jax/data/store_direct.py): which
arrays get them, the check of every chunk through tensorstore at its first use, damage, files never
written, open files and threads. test_store.py's window tests also run every layout through them."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_store import SMALL_CHUNKS, SMALL_RAW_SHARDS, flat_tokens, make_documents, write_store

from megadoc_jax.data import store_direct
from megadoc_jax.data.store import Document, StoreError, StoreLayout, StoreReader

CHUNK = 64  # SMALL_CHUNKS and SMALL_RAW_SHARDS


def token_file(store: Path, index: int) -> Path:
    return store / "input_ids" / "data" / "c" / str(index)


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, np.ndarray]:
    documents = make_documents(60, seed=7)
    write_store(tmp_path / "s", documents, layout=SMALL_RAW_SHARDS)
    return tmp_path / "s", flat_tokens(documents)


def expected_windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return np.stack([tokens[s : s + length] for s in starts])


@pytest.mark.parametrize(
    ("layout", "reads"),
    [
        (StoreLayout(), "direct"),
        (StoreLayout(checksum=False), "direct"),
        (SMALL_CHUNKS, "direct"),  # one file per chunk
        (StoreLayout(tokens_codec="zstd"), "tensorstore"),
        (StoreLayout(tokens_codec="blosc"), "tensorstore"),
        (StoreLayout.levanter(), "tensorstore"),
    ],
    ids=["default", "no-checksum", "file-per-chunk", "zstd", "blosc", "levanter"],
)
def test_streaming_readers_read_uncompressed_local_arrays_directly(
    tmp_path: Path, layout: StoreLayout, reads: str
) -> None:
    documents = make_documents(30, seed=1)
    write_store(tmp_path / "s", documents, layout=layout)
    assert StoreReader.open(tmp_path / "s", cache_bytes=0).window_reads == reads
    assert StoreReader.open(tmp_path / "s", cache_bytes=0, direct_reads=False).window_reads == "tensorstore"
    assert StoreReader.open(tmp_path / "s").window_reads == "resident"
    reader = StoreReader.open(tmp_path / "s", cache_bytes=0)
    starts = np.arange(0, flat_tokens(documents).size - 50, 97)
    np.testing.assert_array_equal(reader.read_windows(starts, 50), expected_windows(flat_tokens(documents), starts, 50))


def test_layouts_it_does_not_read_are_left_to_tensorstore() -> None:
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    sharded = {
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [256]}},
        "codecs": [
            {"name": "sharding_indexed", "configuration": {"chunk_shape": [64], "codecs": raw, "index_codecs": raw}}
        ],
    }
    assert store_direct.chunk_codecs(sharded) == (64, 4, True)
    index_first = {**sharded, "codecs": [{**sharded["codecs"][0]}]}
    index_first["codecs"][0]["configuration"] = {**sharded["codecs"][0]["configuration"], "index_location": "start"}
    assert store_direct.chunk_codecs(index_first) is None
    dotted = {**sharded, "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}}}
    assert store_direct.chunk_codecs(dotted) is None
    big_endian = {**sharded, "codecs": [{"name": "bytes", "configuration": {"endian": "big"}}]}
    assert store_direct.chunk_codecs(big_endian) is None


def test_each_chunk_is_checked_whole_through_tensorstore_once_then_read_directly(
    store: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, tokens = store
    reader = StoreReader.open(path, cache_bytes=0)
    checked: list[list[int]] = []
    read_chunks = reader._read_chunks
    monkeypatch.setattr(reader, "_read_chunks", lambda ids: checked.append(list(ids)) or read_chunks(ids))

    starts = np.array([10, 60, 300, 10])  # chunk 0; chunks 0-1; chunks 4-5
    np.testing.assert_array_equal(reader.read_windows(starts, 30), expected_windows(tokens, starts, 30))
    assert checked == [[0, 1, 4, 5]]
    np.testing.assert_array_equal(reader.read_windows(starts[::-1], 30), expected_windows(tokens, starts[::-1], 30))
    assert checked == [[0, 1, 4, 5]]  # all checked already: no tensorstore read
    np.testing.assert_array_equal(reader.read_windows([70, 600], 30), expected_windows(tokens, [70, 600], 30))
    assert checked == [[0, 1, 4, 5], [9]]  # only the new chunk


def test_a_direct_read_that_differs_from_the_checked_read_raises(
    store: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = store
    reader = StoreReader.open(path, cache_bytes=0)
    read_chunks = reader._read_chunks
    monkeypatch.setattr(reader, "_read_chunks", lambda ids: [chunk + 1 for chunk in read_chunks(ids)])
    with pytest.raises(
        StoreError, match=rf"{path}: array input_ids/data, chunk 5: a direct read of file .*c/1 at byte"
    ):
        reader.read_windows([5 * CHUNK + 3], 10)


def test_a_file_truncated_after_its_chunks_were_checked_raises_naming_it(store: tuple[Path, np.ndarray]) -> None:
    path, tokens = store
    reader = StoreReader.open(path, cache_bytes=0)
    start = 256 + 3 * CHUNK  # shard file 1, its last chunk
    np.testing.assert_array_equal(reader.read_windows([start], 20)[0], tokens[start : start + 20])
    shard = token_file(path, 1)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match=rf"chunk 7: file {shard} ends at byte 100, .* the store is truncated"):
        reader.read_windows([start], 20)


def test_a_shard_index_with_a_wrong_chunk_size_is_refused(store: tuple[Path, np.ndarray]) -> None:
    path, _ = store
    shard = token_file(path, 1)
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(data[-(4 * 16 + 4) : -4], "<u8").reshape(4, 2).copy()
    index[2, 1] += 8
    data[-(4 * 16 + 4) : -4] = index.tobytes()  # the index's crc32c is now wrong too: tensorstore refuses it
    shard.write_bytes(bytes(data))
    reader = StoreReader.open(path, cache_bytes=0)
    with pytest.raises(StoreError, match=rf"{path}: array input_ids/data, chunk \d+ .*c/1\) cannot be read"):
        reader.read_windows([256 + 2 * CHUNK], 10)
    # Read directly without tensorstore's check (its cache of checked chunks filled by hand), the wrong
    # size itself is named.
    direct = store_direct.DirectReads.for_array(path, "input_ids/data", reader.num_tokens, np.int32)
    direct._checked_C[:] = True
    with pytest.raises(StoreError, match=r"chunk 6: .*c/1 stores it in 268 bytes, not 260"):
        direct.read_windows(np.array([256 + 2 * CHUNK]), np.empty((1, 10), np.int32), reader._read_chunks)


@pytest.mark.parametrize("layout", [SMALL_CHUNKS, SMALL_RAW_SHARDS], ids=["file-per-chunk", "shards"])
def test_chunks_never_written_read_as_zeros(tmp_path: Path, layout: StoreLayout) -> None:
    tokens = np.arange(1, 9 * CHUNK + 1, dtype=np.int32) % 900
    tokens[CHUNK : 3 * CHUNK] = 0  # chunks 1 and 2: all the fill value, which tensorstore does not store
    write_store(tmp_path / "s", [Document(tokens, {"source_id": "zeros"})], layout=layout)
    if layout.tokens_shard:
        index = np.frombuffer(token_file(tmp_path / "s", 0).read_bytes()[-(4 * 16 + 4) : -4], "<u8").reshape(4, 2)
        assert (index[1:3] == np.uint64(2**64 - 1)).all() and (index[[0, 3]] != np.uint64(2**64 - 1)).all()
    else:
        assert not token_file(tmp_path / "s", 1).exists() and token_file(tmp_path / "s", 3).exists()
    reader = StoreReader.open(tmp_path / "s", cache_bytes=0)
    assert reader.window_reads == "direct"
    starts = np.array([0, CHUNK - 5, CHUNK + 7, 3 * CHUNK - 1])
    np.testing.assert_array_equal(reader.read_windows(starts, 100), expected_windows(tokens, starts, 100))


def test_threads_read_right_and_evicted_files_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_direct, "MAX_OPEN_FILES", 2)  # one file per chunk: files are evicted all the time
    documents = make_documents(80, seed=3)
    write_store(tmp_path / "s", documents, layout=SMALL_CHUNKS)
    tokens = flat_tokens(documents)
    reader = StoreReader.open(tmp_path / "s", cache_bytes=0)
    direct, threads, windows = reader._direct, 4, 8
    most_open = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(40):
            starts = rng.integers(0, tokens.size - 90, windows)
            np.testing.assert_array_equal(reader.read_windows(starts, 90), expected_windows(tokens, starts, 90))
            most_open.append(len(direct._files) + len(direct._retired))

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))  # raises what a thread raised
    # Open at any time: the LRU's 2 and what the reads in progress hold (at most 3 chunk files a window).
    assert max(most_open) <= 2 + threads * windows * 3
    assert len(direct._files) <= 2 and not direct._retired and not any(direct._users.values())


def test_close_leaves_a_file_that_a_read_holds_open_until_it_lets_go(store: tuple[Path, np.ndarray]) -> None:
    path, tokens = store
    reader = StoreReader.open(path, cache_bytes=0)
    reader.read_windows([5], 9)
    direct = reader._direct
    held = direct._acquire([0])  # what a read in progress in another thread holds
    direct.close()
    os.fstat(held[0])  # still open: the read can finish
    direct._release(held.values())
    with pytest.raises(OSError):
        os.fstat(held[0])
    np.testing.assert_array_equal(reader.read_windows([5], 9)[0], tokens[5:14])  # reopened


def test_pickled_readers_keep_their_read_path(store: tuple[Path, np.ndarray]) -> None:
    path, tokens = store
    for direct_reads, reads in [(True, "direct"), (False, "tensorstore")]:
        clone = pickle.loads(pickle.dumps(StoreReader.open(path, cache_bytes=0, direct_reads=direct_reads)))
        assert clone.window_reads == reads
        np.testing.assert_array_equal(clone.read_windows([5], 9)[0], tokens[5:14])


def test_windows_not_in_the_page_cache_are_asked_of_the_kernel_together_then_read(
    store: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, tokens = store
    reader = StoreReader.open(path, cache_bytes=0)
    starts = np.arange(0, tokens.size - 40, 61)
    reader.read_windows(starts, 40)  # every chunk checked
    for file in (path / "input_ids" / "data" / "c").iterdir():  # evict the files from the page cache
        fd = os.open(file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    np.testing.assert_array_equal(reader.read_windows(starts, 40), expected_windows(tokens, starts, 40))

    advised: list[int] = []  # the same, with every piece taken as not cached (whatever this file system did)
    real_advise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, a: advised.append(n) or real_advise(fd, o, n, a))
    reader._direct._nowait = 0
    np.testing.assert_array_equal(reader.read_windows(starts, 40), expected_windows(tokens, starts, 40))
    assert len(advised) >= starts.size and sum(advised) == starts.size * 40 * 4


def test_a_file_system_without_rwf_nowait_reads_every_window_after_asking_for_it(
    store: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, tokens = store
    real_preadv = os.preadv

    def preadv(fd: int, buffers: list, offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    reader = StoreReader.open(path, cache_bytes=0)
    starts = np.array([3, 500, 1000])
    np.testing.assert_array_equal(reader.read_windows(starts, 90), expected_windows(tokens, starts, 90))
    assert reader._direct._nowait == 0  # asked once, then never again


def test_the_store_read_benchmark_compares_every_read_path_cold_and_warm(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "megadoc_jax.benchmarks.store_read", "--tokens", "300000", "--windows", "64"]
    done = subprocess.run([*command, "--repeats", "1", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for cache in ("cold", "warm"):
        section = done.stdout.split(f"page cache {cache}: memmap")[1]
        for row in ("streaming direct, 1st", "streaming direct, 2nd", "streaming tensorstore", "resident, 2nd"):
            speed, ratio = re.search(rf"{row} +([0-9.]+) M tokens/s +([0-9.]+)x memmap", section).groups()
            assert float(speed) > 0 and float(ratio) > 0
