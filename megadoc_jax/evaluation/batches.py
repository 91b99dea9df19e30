"""The training loop's held-out batches: the windows `python -m megadoc_jax.evaluate` scores, or their start.

    batches, whole = eval_batches(store_path, config, config.train.eval_batches)   # list[RowBatch], bool

The recipe is train.eval_recipe (default concat, the paper's: loss_windows.py), so that the loop's figure at
a step and the evaluate command's on the same checkpoint are the same number on the same targets.
train.eval_batches = 0 takes every batch of the store (whole = True); a positive count takes the first
ones, in store order (whole = True only when that is all of them).
"""

from __future__ import annotations

from megadoc_jax.config import Config, ConfigError
from megadoc_jax.data.pipeline import open_store, run_tokenizer
from megadoc_jax.data.store import TokenizerInfo
from megadoc_jax.evaluation.loss_windows import RowBatch, WindowError, make_plan, metric_prefix


def heldout_prefix(name: str, config: Config, whole: bool) -> str:
    """eval/<name> (concat over the whole store), eval/<name>/document, .../partial for the first batches."""
    prefix = metric_prefix(name, config.train.eval_recipe)
    return prefix if whole else f"{prefix}/partial"


def eval_batches(
    store_path: str,
    config: Config,
    num_batches: int,
    *,
    tokenizer: TokenizerInfo | None = None,
) -> tuple[list[RowBatch], bool]:
    """The first num_batches batches (0: all) of train.batch_size rows of the store's train.eval_recipe
    windows, every row (each process holds the whole batch), and whether they are the whole store.

    The store is checked like a training stream (tokenizer, vocabulary); a store without one window, or
    with fewer batches than asked for, is a ConfigError naming the key."""
    batch_size = config.train.batch_size
    names = [name for name, path in config.data.eval_stores.items() if path == store_path]
    key = f"data.eval_stores.{names[0]}" if names else "eval store"
    if num_batches < 0:
        raise ConfigError(f"train.eval_batches: must be 0 (the whole store) or positive, got {num_batches}")
    store = open_store(store_path, key, config, run_tokenizer(config, tokenizer))
    try:
        plan = make_plan(config.train.eval_recipe, store, config.data.seq_len, None)
    except WindowError as e:
        raise ConfigError(f"{key}: {e}") from None
    available = plan.num_batches(batch_size)
    if num_batches > available:
        raise ConfigError(
            f"train.eval_batches: {num_batches} batches of train.batch_size={batch_size} rows, but the store "
            f"{store_path} ({key}) has {plan.num_rows} rows of {config.train.eval_recipe} windows: {available} "
            "batches (0 takes them all)"
        )
    count = num_batches or available
    return [plan.read_batch(store, b, batch_size) for b in range(count)], count == available
