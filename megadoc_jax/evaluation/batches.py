"""Held-out batches: the first windows of an eval store, in store order, as this process's rows."""

from __future__ import annotations

import numpy as np

from megadoc_jax.config import Config, ConfigError
from megadoc_jax.data.pipeline import Batch, local_rows, make_source, open_store, run_tokenizer
from megadoc_jax.data.store import TokenizerInfo


def eval_batches(
    store_path: str,
    config: Config,
    num_batches: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer: TokenizerInfo | None = None,
) -> list[Batch]:
    """The first num_batches * B windows of an eval store, in store order, as this process's rows.

    Windows as in training (data.windows); 'document' windows are packed in store order (no shuffle), so
    they too are the store's beginning. The store is checked like a training stream (tokenizer,
    vocabulary, at least one window) and must hold num_batches * train.batch_size windows.
    """
    batch_size = config.train.batch_size
    lo, hi = local_rows(batch_size, process_index, process_count)
    names = [name for name, path in config.data.eval_stores.items() if path == store_path]
    key = f"data.eval_stores.{names[0]}" if names else "eval store"
    if num_batches <= 0:
        raise ConfigError(f"train.eval_batches: must be positive, got {num_batches}")
    store = open_store(store_path, key, config, run_tokenizer(config, tokenizer))
    source = make_source(store, key, config, packing_seed=None)
    if len(source) < num_batches * batch_size:
        raise ConfigError(
            f"train.eval_batches: {num_batches} batches of train.batch_size={batch_size} need "
            f"{num_batches * batch_size} windows, but the store {store_path} ({key}) has {len(source)}"
        )
    return [source.read_rows(np.arange(b * batch_size + lo, b * batch_size + hi)) for b in range(num_batches)]
