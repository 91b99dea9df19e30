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
from typing import Any

import numpy as np
import tensorstore as ts

from megadoc_jax import storage

FORMAT_NAME = "megadoc-token-store"
FORMAT_VERSION = 1
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
    """

    tokens_chunk: int = 1 << 14
    tokens_shard: int = 1 << 22
    tokens_codec: str = "none"
    aux_chunk: int = 1 << 17
    aux_codec: str = "zstd"
    codec_level: int = 3

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
        """Levanter's own JaggedArrayStore chunking, so that its JaggedArrayStore.open accepts input_ids/."""
        return cls(tokens_chunk=1 << 18, tokens_shard=1 << 27, tokens_codec="blosc", codec_level=5)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StoreLayout:
        return cls(**raw)


@dataclasses.dataclass(frozen=True)
class JaggedGroup:
    """Rows of variable length stored as parallel data columns plus one offsets array."""

    name: str
    columns: tuple[tuple[str, str], ...]  # (column name, numpy dtype name)


TOKENS = JaggedGroup("input_ids", (("data", "int32"),))
SEGMENTS = JaggedGroup("segments", (("kind", "uint8"), ("index", "int16"), ("length", "int32")))
METADATA = JaggedGroup("metadata", (("data", "uint8"),))
GROUPS = (TOKENS, SEGMENTS, METADATA)


def _codecs(codec: str, level: int, itemsize: int) -> list[dict[str, Any]]:
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
    return chain


def array_spec(root: storage.AnyPath, key: str, dtype: str, layout: StoreLayout) -> dict[str, Any]:
    """The zarr3 spec that creates array `key` (e.g. 'input_ids/data') under store `root`."""
    itemsize = np.dtype(dtype).itemsize
    if key.startswith(f"{TOKENS.name}/"):
        chunk, shard = layout.tokens_chunk, layout.tokens_shard
        codecs = _codecs(layout.tokens_codec, layout.codec_level, itemsize)
    else:
        chunk, shard = layout.aux_chunk, 0
        codecs = _codecs(layout.aux_codec, layout.codec_level, itemsize)
    if shard:
        codecs = [{"name": "sharding_indexed", "configuration": {"chunk_shape": [chunk], "codecs": codecs}}]
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


def content_hash(arrays: dict[str, ts.TensorStore], lengths: dict[str, int]) -> str:
    digest = hashlib.sha256(f"{FORMAT_NAME}/{FORMAT_VERSION}".encode())
    for key, dtype in array_keys():
        length = lengths[key]
        digest.update(f"\n{key} {dtype} {length}\n".encode())
        array = arrays[key]
        for start in range(0, length, HASH_BLOCK_ELEMENTS):
            block = array[start : min(start + HASH_BLOCK_ELEMENTS, length)].read().result()
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
