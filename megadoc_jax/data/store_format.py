"""On-disk layout of a token store: zarr3 arrays, chunking, the content hash.

A store is a directory of three *jagged groups*, each laid out like Levanter's JaggedArrayStore:
one int64 `offsets` array whose cell 0 holds the number of rows and whose cell i+1 holds the end
(exclusive, in elements) of row i, plus one or more parallel 1-D data columns.

    input_ids/  data int32 (tokens)                           rows = documents
    segments/   kind uint8, index int16, length int32 (runs)   rows = documents
    metadata/   data uint8 (canonical JSON bytes)              rows = documents
    manifest.json   written when the store is created and rewritten, finished, by StoreWriter.finish
    commit.json     the durable commit record: how many rows of every group are complete

While a store is being written every array has the unbounded shape [2**54] (as in Levanter), so
appends never rewrite array metadata; `finish` shrinks each array to its exact length.

This module is the storage layer only (numpy + tensorstore + stdlib), private to megadoc_jax/data; its
small JSON files are written with megadoc_jax/storage.py (local paths and URLs). store.py holds the public API.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorstore as ts

from megadoc_jax import storage

FORMAT_NAME = "megadoc-token-store"
# 2: every chunk carries a crc32c checksum (StoreLayout.checksum); 1: none (docs/store.md says what
# that loses). Both are read.
FORMAT_VERSION = 2
# The content hash's header. It stays at 1 through format 2: the checksums are encoding, like
# compression, so a store's content hash depends on its content only, whatever its format version.
CONTENT_HASH_HEADER = f"{FORMAT_NAME}/1"
MANIFEST_FILE = "manifest.json"
COMMIT_FILE = "commit.json"
LOCK_FILE = ".writer.lock"
UNBOUNDED = 2**54  # the shape of every array while writing (Levanter uses the same)
HASH_BLOCK_ELEMENTS = 1 << 22  # read size when hashing; the hash does not depend on it

CODECS = ("none", "zstd", "blosc")


class StoreError(ValueError):
    """Every refusal of the token store; the message names the store path and the field."""


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Chunking and compression of the arrays (chosen by measurement: see docs/store.md).

    tokens_*: the input_ids group (tokens, read in random windows during training, and their offsets).
      tokens_chunk is the unit of reading and decoding; tokens_shard > 0 packs that many elements
      per file (zarr3 sharding: fewer files, chunks still read alone); 0 stores one file per chunk.
    aux_*: every other array (segment runs, metadata bytes and their offsets), read whole or per document.
    checksum: a crc32c codec on every chunk of every array (format 2), so that a damaged or truncated
      chunk fails its read instead of decoding to wrong values. The index of a shard file carries one
      in every layout (tensorstore's default index codecs).
    """

    tokens_chunk: int = 1 << 14
    tokens_shard: int = 1 << 22
    tokens_codec: str = "none"
    aux_chunk: int = 1 << 17
    aux_codec: str = "zstd"
    codec_level: int = 3
    checksum: bool = True

    def __post_init__(self) -> None:
        for name in ("tokens_chunk", "aux_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StoreLayout.{name} must be positive, got {getattr(self, name)}")
        if self.tokens_shard < 0 or self.tokens_shard % self.tokens_chunk:
            raise ValueError(f"StoreLayout.tokens_shard: {self.tokens_shard} is not 0 or a multiple of tokens_chunk")
        for name in ("tokens_codec", "aux_codec"):
            if getattr(self, name) not in CODECS:
                raise ValueError(f"StoreLayout.{name}: {getattr(self, name)!r} not in {CODECS}")

    @classmethod
    def levanter(cls) -> StoreLayout:
        """Levanter's own JaggedArrayStore chunking, so that its JaggedArrayStore.open accepts input_ids/.

        Without chunk checksums: Levanter's open asks for its codec chain exactly, and tensorstore refuses
        an array whose chain has a crc32c more ("Mismatch in number of bytes -> bytes codecs").
        """
        return cls(tokens_chunk=1 << 18, tokens_shard=1 << 27, tokens_codec="blosc", codec_level=5, checksum=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StoreLayout:
        # A format-1 manifest has no `checksum`: its chunks have none.
        return cls(**{"checksum": False, **raw})


@dataclasses.dataclass(frozen=True)
class JaggedGroup:
    """Rows of variable length stored as parallel data columns plus one offsets array."""

    name: str
    columns: tuple[tuple[str, str], ...]  # (column name, numpy dtype name)


TOKENS = JaggedGroup("input_ids", (("data", "int32"),))
SEGMENTS = JaggedGroup("segments", (("kind", "uint8"), ("index", "int16"), ("length", "int32")))
METADATA = JaggedGroup("metadata", (("data", "uint8"),))
GROUPS = (TOKENS, SEGMENTS, METADATA)


def _codecs(codec: str, level: int, itemsize: int, checksum: bool) -> list[dict[str, Any]]:
    chain: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec == "zstd":
        chain.append({"name": "zstd", "configuration": {"level": level}})
    elif codec == "blosc":
        chain.append(
            {
                "name": "blosc",
                "configuration": {"cname": "zstd", "clevel": level, "shuffle": "shuffle", "typesize": itemsize},
            }
        )
    if checksum:  # last, so that it covers the stored (compressed) bytes
        chain.append({"name": "crc32c"})
    return chain


def array_spec(root: storage.AnyPath, key: str, dtype: str, layout: StoreLayout) -> dict[str, Any]:
    """The zarr3 spec that creates array `key` (e.g. 'input_ids/data') under store `root`."""
    itemsize = np.dtype(dtype).itemsize
    if key.startswith(f"{TOKENS.name}/"):
        chunk, shard = layout.tokens_chunk, layout.tokens_shard
        codecs = _codecs(layout.tokens_codec, layout.codec_level, itemsize, layout.checksum)
    else:
        chunk, shard = layout.aux_chunk, 0
        codecs = _codecs(layout.aux_codec, layout.codec_level, itemsize, layout.checksum)
    if shard:
        # The shard index carries a crc32c in every layout (tensorstore's default, written out here).
        index = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
        codecs = [
            {
                "name": "sharding_indexed",
                "configuration": {"chunk_shape": [chunk], "codecs": codecs, "index_codecs": index},
            }
        ]
    return {
        "driver": "zarr3",
        "kvstore": storage.kvstore_spec(root / key),
        "metadata": {
            "shape": [UNBOUNDED],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard or chunk]}},
            "codecs": codecs,
        },
    }


# Writes return only once tensorstore has fsynced the chunk files (explicit, though it is the default).
WRITE_CONTEXT = {"file_io_sync": True}


def open_array_for_write(root: storage.AnyPath, key: str, dtype: str, layout: StoreLayout) -> ts.TensorStore:
    """Create the array, or open it as it is (re-expanded to the unbounded shape after a finish)."""
    context = storage.tensorstore_context(root, WRITE_CONTEXT)
    array = ts.open(array_spec(root, key, dtype, layout), create=True, open=True, context=context).result()
    if array.shape[0] < UNBOUNDED:
        array = array.resize(exclusive_max=[UNBOUNDED], expand_only=True, resize_metadata_only=True).result()
    return array


def shrink_array(root: storage.AnyPath, key: str, array: ts.TensorStore, length: int) -> ts.TensorStore:
    """Set the array's shape to its exact length and delete chunk files wholly past the end.

    The resize is metadata-only: tensorstore's own deletion would visit every chunk of the unbounded
    shape. Chunk files past the end, and tensorstore's temporary `<chunk>.__lock` files, exist only
    after a crash or kill during a flush.
    """
    array = array.resize(exclusive_max=[length], shrink_only=True, resize_metadata_only=True).result()
    file_elements = array.chunk_layout.write_chunk.shape[0]  # a chunk, or a shard of chunks
    chunks_needed = -(-length // file_elements)
    chunk_dir = root / key / "c"  # zarr3 default chunk key encoding: c/<index>
    if storage.is_dir(chunk_dir):
        for name in storage.list_names(chunk_dir):
            past_end = name.isdigit() and int(name) >= chunks_needed
            if past_end or name.endswith(".__lock"):  # the file driver's temporary files, left by a kill
                storage.delete(chunk_dir / name)
    return array


def open_array_for_read(root: storage.AnyPath, key: str, context: ts.Context) -> ts.TensorStore:
    """Open a finished (immutable) array: no revalidation of cached chunks on every read."""
    spec = {
        "driver": "zarr3",
        "kvstore": storage.kvstore_spec(root / key),
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }
    return ts.open(spec, read=True, context=context).result()


def has_chunk_checksums(array: ts.TensorStore) -> bool:
    """Whether the array's chunks (a sharded array's inner chunks) carry a crc32c codec."""
    codecs = array.codec.to_json()["codecs"]
    if codecs and codecs[0]["name"] == "sharding_indexed":
        codecs = codecs[0]["configuration"]["codecs"]
    return any(codec["name"] == "crc32c" for codec in codecs)


# --------------------------------------------------------------------------------------------------
# Reads that name the damage: tensorstore reports a failed checksum, a truncated file or an undecodable
# chunk as a ValueError (DATA_LOSS, FAILED_PRECONDITION) naming the file; these re-raise it as a
# StoreError naming the store, the array and the chunk.
# --------------------------------------------------------------------------------------------------

READ_ERRORS = (ValueError, OSError, RuntimeError)


class PendingRead:
    """A tensorstore read of elements [start, stop) of array `key`, issued at construction."""

    def __init__(
        self,
        root: storage.AnyPath,
        key: str,
        array: ts.TensorStore,
        start: int,
        stop: int,
        batch: ts.Batch | None = None,
    ) -> None:
        self.root, self.key, self.array, self.start, self.stop = root, key, array, start, stop
        self._future = array[start:stop].read(batch=batch)

    def result(self) -> np.ndarray:
        try:
            return self._future.result()
        except READ_ERRORS as error:
            raise damage_error(self.root, self.key, self.array, self.start, self.stop, error) from error


def read_elements(root: storage.AnyPath, key: str, array: ts.TensorStore, start: int, stop: int) -> np.ndarray:
    return PendingRead(root, key, array, start, stop).result()


def damage_error(
    root: storage.AnyPath, key: str, array: ts.TensorStore, start: int, stop: int, error: Exception
) -> StoreError:
    """The StoreError for a failed read of [start, stop): finds the chunk that fails on its own (a rare
    path, so re-reading the range chunk by chunk costs nothing in normal reads)."""
    chunk = array.chunk_layout.read_chunk.shape[0]
    file_elements = array.chunk_layout.write_chunk.shape[0]  # a chunk, or a shard of chunks
    for chunk_id in range(start // chunk, -(-stop // chunk)):
        begin, end = chunk_id * chunk, min((chunk_id + 1) * chunk, array.shape[0])
        try:
            array[begin:end].read().result()
        except READ_ERRORS as chunk_error:
            file = root / key / "c" / str(begin // file_elements)
            return StoreError(
                f"{root}: array {key}, chunk {chunk_id} (elements [{begin}, {end}) in file {file}) cannot be "
                f"read: the store is damaged ({chunk_error})"
            )
    return StoreError(f"{root}: array {key}, elements [{start}, {stop}) cannot be read ({error})")


def array_keys() -> list[tuple[str, str]]:
    """(key, dtype) of every array in the store, in the fixed order the content hash uses."""
    keys = []
    for group in GROUPS:
        keys.append((f"{group.name}/offsets", "int64"))
        keys.extend((f"{group.name}/{column}", dtype) for column, dtype in group.columns)
    return keys


# --------------------------------------------------------------------------------------------------
# Content hash: sha256 over every array's logical content, in a fixed order. Independent of how the
# writes were split into flushes (and of chunking and compression), since only content enters it.
# --------------------------------------------------------------------------------------------------


def content_hash(
    root: storage.AnyPath,
    arrays: dict[str, ts.TensorStore],
    lengths: dict[str, int],
    on_block: Callable[[str, np.ndarray], None] | None = None,
) -> str:
    """The hash; `on_block(key, values)` sees every block read (verify's token range and progress)."""
    digest = hashlib.sha256(CONTENT_HASH_HEADER.encode())
    for key, dtype in array_keys():
        length = lengths[key]
        digest.update(f"\n{key} {dtype} {length}\n".encode())
        array = arrays[key]
        for start in range(0, length, HASH_BLOCK_ELEMENTS):
            block = read_elements(root, key, array, start, min(start + HASH_BLOCK_ELEMENTS, length))
            if on_block is not None:
                on_block(key, block)
            digest.update(np.ascontiguousarray(block, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    return "sha256:" + digest.hexdigest()


def array_lengths(num_documents: int, group_sizes: dict[str, int]) -> dict[str, int]:
    """Element count of every array, given the number of rows and each group's data size."""
    lengths = {}
    for group in GROUPS:
        lengths[f"{group.name}/offsets"] = num_documents + 1
        for column, _ in group.columns:
            lengths[f"{group.name}/{column}"] = group_sizes[group.name]
    return lengths
