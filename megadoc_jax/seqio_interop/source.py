"""A seqio DataSource over token stores: one store per split, each example one document of the store.

Sharding is by document ranges and arbitrary: shard i of n reads documents [i N // n, (i + 1) N // n), so
any host count gets disjoint shards that together hold every document once (supports_arbitrary_sharding).
Examples are the store's ids unchanged (the Task's preprocessors shift them, tasks.py), with the per-token
segment information the store keeps for every document (one ORIGINAL run unless the writer gave runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from megadoc_jax.data.store import StoreReader, TokenizerInfo

TARGETS = "targets"
SEGMENT_KIND = "targets_segment_kind"  # SegmentKind per token (ORIGINAL 0, REPHRASE 1, RATIONALE 2, SEPARATOR 3)
SEGMENT_INDEX = "targets_segment_index"  # k of rephrase k / rationale k per token; 0 otherwise
DOCUMENT_FEATURES = (TARGETS, SEGMENT_KIND, SEGMENT_INDEX)
DEFAULT_DOCUMENTS_PER_SHARD = 65536  # the granularity list_shards reports (seqio's cache job parallelises on it)


def document_range(num_documents: int, shard_index: int, num_shards: int) -> range:
    """Documents of shard `shard_index` of `num_shards`: contiguous, disjoint, covering [0, num_documents)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_info: index {shard_index} of {num_shards} shards is not a valid shard")
    return range(shard_index * num_documents // num_shards, (shard_index + 1) * num_documents // num_shards)


class StoreDataSource(seqio.DataSource):
    """splits: split name -> store path (a finished store; another tokenizer's is refused when `tokenizer`
    is given). Every store is opened once here, so a missing or unfinished one fails at registration."""

    def __init__(
        self,
        splits: Mapping[str, str | os.PathLike],
        tokenizer: TokenizerInfo | None = None,
        *,
        documents_per_shard: int = DEFAULT_DOCUMENTS_PER_SHARD,
        cache_bytes: int | None = None,
    ) -> None:
        if not splits:
            raise ValueError("StoreDataSource: splits is empty (give split name -> store path)")
        if documents_per_shard < 1:
            raise ValueError(f"documents_per_shard: must be positive, got {documents_per_shard}")
        options = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
        self.readers = {split: StoreReader.open(path, tokenizer, **options) for split, path in splits.items()}
        self.documents_per_shard = documents_per_shard
        super().__init__(
            splits=tuple(self.readers),
            num_input_examples={split: reader.num_documents for split, reader in self.readers.items()},
        )

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    @property
    def output_signature(self) -> dict[str, tf.TensorSpec]:
        return {name: tf.TensorSpec([None], tf.int32) for name in DOCUMENT_FEATURES}

    def list_shards(self, split: str) -> list[str]:
        """Names of document ranges of documents_per_shard each, e.g. 'STORE[0:65536]'."""
        reader = self._reader(split)
        size = self.documents_per_shard
        return [
            f"{reader.path}[{a}:{min(a + size, reader.num_documents)}]" for a in range(0, reader.num_documents, size)
        ]

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        """The documents of the shard, in store order, or in a seeded order of the shard when shuffle (seed
        None: a fresh order each pass). seqio's Task repeats the dataset itself (its num_epochs)."""
        del sequence_length, use_cached, num_epochs  # documents are whole here; the Task cuts them (tasks.py)
        reader = self._reader(split)
        index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        documents = document_range(reader.num_documents, index, count)
        order_seed = None if seed is None else int(seed)

        def generate() -> Iterator[dict[str, np.ndarray]]:
            order = np.random.default_rng(order_seed).permutation(len(documents)) if shuffle else range(len(documents))
            for i in order:
                yield document_features(reader, documents[int(i)])

        return tf.data.Dataset.from_generator(generate, output_signature=self.output_signature)

    def _reader(self, split: str) -> StoreReader:
        if split not in self.readers:
            raise ValueError(f"split {split!r} is not one of this source's splits {sorted(self.readers)}")
        return self.readers[split]


def document_features(reader: StoreReader, i: int) -> dict[str, np.ndarray]:
    """Document i as int32 features: its tokens and each token's segment kind and index."""
    start, stop = int(reader.offsets[i]), int(reader.offsets[i + 1])
    tokens = reader.read_windows([start], stop - start)[0]
    kind, index = reader.read_segments([start], stop - start)
    return {TARGETS: tokens, SEGMENT_KIND: kind[0].astype(np.int32), SEGMENT_INDEX: index[0].astype(np.int32)}
