"""seqio Tasks over token stores and Mixtures over the streams of a megadoc_jax config.

A store's Task yields its documents: "targets" (the store's ids + the vocabulary's id_offset, so that no
real token is seqio's pad id 0; vocabulary.py), and per token "targets_segment_kind" and
"targets_segment_index", the store's SegmentKind and index + 1 (SEGMENT_SHIFT: 0 is padding there too,
which seqio's packing requires). Documents already end with EOS (the export appends it), so no EOS is added.
Given a sequence length, a document longer than it is cut into pieces of at most that length (as the
pipeline's 'document' windows do), because seqio's feature converters would otherwise truncate it and
drop its tail. A config's Mixture gives each stream the rate our Grain mixture realises: its
examples per block of mixture.BLOCK_SIZE (the weights rounded by largest remainder), over the block size.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import seqio
import tensorflow as tf

from megadoc_jax import config as config_lib
from megadoc_jax.data import demo, mixture
from megadoc_jax.data.store import SegmentKind
from megadoc_jax.data.store_types import MAX_SEGMENT_INDEX
from megadoc_jax.seqio_interop.source import (
    DEFAULT_DOCUMENTS_PER_SHARD,
    DOCUMENT_FEATURES,
    SEGMENT_INDEX,
    SEGMENT_KIND,
    TARGETS,
    StoreDataSource,
)
from megadoc_jax.seqio_interop.vocabulary import HFVocabulary

SEGMENT_SHIFT = 1  # a Task's targets_segment_kind / _index are the store's + 1: 0 is padding
DEFAULT_SHUFFLE_BUFFER = 1000  # documents; the source already reads its shard in a seeded order


def output_features(vocabulary: HFVocabulary) -> dict[str, seqio.Feature]:
    """targets over the tokenizer; the segment features as pass-through ids (kept by Mixtures, which keep
    only declared output features)."""
    return {
        TARGETS: seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        SEGMENT_KIND: seqio.Feature(
            seqio.PassThroughVocabulary(len(SegmentKind) + SEGMENT_SHIFT), add_eos=False, required=False, dtype=tf.int32
        ),
        SEGMENT_INDEX: seqio.Feature(
            seqio.PassThroughVocabulary(MAX_SEGMENT_INDEX + 1 + SEGMENT_SHIFT),
            add_eos=False,
            required=False,
            dtype=tf.int32,
        ),
    }


def shift_ids(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    """Make 0 mean padding in every per-token feature: targets + the vocabulary's id_offset, segment kind and
    index + SEGMENT_SHIFT. seqio's packing needs it of every packed feature: it takes an example's length
    to be its count of non-zero values (utils._pack_with_tf_ops), so a 0 inside (ORIGINAL is kind 0) cuts it."""
    offset = output_features[TARGETS].vocabulary.id_offset

    def shift(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        shifted = {TARGETS: example[TARGETS] + offset}
        shifted.update({k: example[k] + SEGMENT_SHIFT for k in (SEGMENT_KIND, SEGMENT_INDEX) if k in example})
        return {**example, **shifted}

    return dataset.map(shift, num_parallel_calls=tf.data.AUTOTUNE)


def cut_documents(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
    """Each example whose targets are longer than sequence_length['targets'] becomes pieces of at most that
    length (the last one shorter), per-token features cut alike; unchanged without a targets length."""
    length = (sequence_length or {}).get(TARGETS)
    if length is None:
        return dataset
    per_token = [k for k in DOCUMENT_FEATURES if k in dataset.element_spec]

    def pieces(example: dict[str, tf.Tensor]) -> tf.data.Dataset:
        n = tf.shape(example[TARGETS], out_type=tf.int64)[0]
        full, rest = n // length, n % length
        row_lengths = tf.concat([tf.fill([full], tf.cast(length, tf.int64)), tf.reshape(rest, [1])], 0)
        row_lengths = row_lengths[: full + tf.cast(rest > 0, tf.int64)]
        rows = {k: tf.RaggedTensor.from_row_lengths(example[k], row_lengths) for k in per_token}
        count = tf.size(row_lengths)
        for k, v in example.items():  # anything else (e.g. an id a user preprocessor added): one copy per piece
            if k not in rows:
                rows[k] = tf.repeat(v[None], count, axis=0)
        return tf.data.Dataset.from_tensor_slices(rows)

    return dataset.flat_map(pieces)


def task_name(name: str) -> str:
    """A seqio-legal registry name (letters, digits, _, ., :) for a stream or store name."""
    return re.sub(r"[^\w.:]", "_", name)


def register_store_task(
    name: str,
    stores: str | os.PathLike | Mapping[str, str | os.PathLike],
    tokenizer_dir: str | Path,
    *,
    id_offset: int = 1,
    shuffle_buffer_size: int | None = DEFAULT_SHUFFLE_BUFFER,
    documents_per_shard: int = DEFAULT_DOCUMENTS_PER_SHARD,
    replace: bool = False,
) -> seqio.Task:
    """Register (and return) a Task over token stores: `stores` is one store (split 'train') or split name ->
    store. The stores must be of the tokenizer in tokenizer_dir (StoreError otherwise, from the store's open).
    replace: first remove a task of that name (re-registering otherwise raises seqio's error)."""
    splits = {"train": stores} if isinstance(stores, (str, os.PathLike)) else dict(stores)
    vocabulary = HFVocabulary(tokenizer_dir, id_offset)
    source = StoreDataSource(splits, vocabulary.info, documents_per_shard=documents_per_shard)
    if replace:
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        output_features=output_features(vocabulary),
        preprocessors=[shift_ids, cut_documents],
        shuffle_buffer_size=shuffle_buffer_size,
    )


def mixture_rates(weights: Sequence[float]) -> list[float]:
    """The share of each stream in our Grain mixture: examples per block over the block size."""
    return (mixture.block_counts(weights, mixture.BLOCK_SIZE) / mixture.BLOCK_SIZE).tolist()


def register_config_mixture(
    config: config_lib.Config | str | os.PathLike,
    name: str,
    *,
    tokenizer_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    id_offset: int = 1,
    replace: bool = False,
    **task_options,
) -> seqio.Mixture:
    """Register a Task per stream of config.data.streams (named NAME_STREAM) and a Mixture NAME over them with
    mixture_rates of the streams' weights, and a Task NAME_eval_KEY with split 'validation' per held-out store
    of data.eval_stores. config: a Config or a YAML config path (with overrides); `demo:` store paths resolve
    as in training. The tokenizer is tokenizer_dir, else data.tokenizer."""
    if not isinstance(config, config_lib.Config):
        config = config_lib.load(config, list(overrides))
    config = demo.resolve_demo_paths(config)
    streams = config.data.streams
    if not streams:
        raise config_lib.ConfigError("data.streams: is empty, so there is no mixture to register")
    tokenizer_dir = tokenizer_dir or config.data.tokenizer
    if not tokenizer_dir:
        raise config_lib.ConfigError("data.tokenizer: is empty; set it or pass tokenizer_dir")
    tasks = [
        register_store_task(
            task_name(f"{name}_{stream.name}"),
            stream.store,
            tokenizer_dir,
            id_offset=id_offset,
            replace=replace,
            **task_options,
        )
        for stream in streams
    ]
    for key, store in config.data.eval_stores.items():
        options = {**task_options, "shuffle_buffer_size": None}  # evaluation reads in store order
        register_store_task(
            task_name(f"{name}_eval_{key}"),
            {"validation": store},
            tokenizer_dir,
            id_offset=id_offset,
            replace=replace,
            **options,
        )
    rates = mixture_rates([stream.weight for stream in streams])
    if replace:
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, [(task.name, rate) for task, rate in zip(tasks, rates)])
