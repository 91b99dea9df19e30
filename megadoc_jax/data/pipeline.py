"""The training input pipeline: batch(step) over a mixture of token stores, and the store checks.

The global batch of step s is a pure function of (data.seed, s): row i is example g = s * B + i of
the run, which mixture.py maps to a stream and to one of its windows (concat windows, windows.py, or
packed long-context rows, packing.py). Nothing is stateful, so resuming at step s needs no iterator
state and gives exactly the batches of an uninterrupted run, for any number of processes; process p
of P computes only its rows [p * B / P, (p + 1) * B / P). All rows of one stream in a batch are read
with one batched store read. `iterate` keeps batches s+1, s+2, ... coming from a background thread.

Stores are checked against the run config when they are opened: tokenizer (hash), vocabulary size,
enough tokens for a window, one tokenizer across all streams; each error names the config key and
the store path. Held-out batches (megadoc_jax/evaluation/batches.py) open their stores with the same
checks. docs/pipeline.md has the formulas and the reasons.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from megadoc_jax.config import Config, ConfigError
from megadoc_jax.data import mixture
from megadoc_jax.data.mixture import BlockMixture, DataPlan, StreamPlan
from megadoc_jax.data.packing import PackedWindows, pack_documents
from megadoc_jax.data.store import StoreError, StoreReader, TokenizerInfo
from megadoc_jax.data.windows import ConcatWindows, Rows

Batch = dict[str, np.ndarray]
Source = ConcatWindows | PackedWindows


# --------------------------------------------------------------------------------------------------
# Opening and checking stores
# --------------------------------------------------------------------------------------------------


def run_tokenizer(config: Config, tokenizer: TokenizerInfo | None) -> TokenizerInfo | None:
    """The tokenizer stores must match: the given one, else data.tokenizer's directory, else none."""
    if tokenizer is None and config.data.tokenizer:
        tokenizer = TokenizerInfo.from_directory(config.data.tokenizer)
    return tokenizer


def open_store(path: str, key: str, config: Config, tokenizer: TokenizerInfo | None) -> StoreReader:
    """StoreReader.open with the config key in every refusal, and the vocabulary checked."""
    try:
        store = StoreReader.open(path, tokenizer)
    except StoreError as e:
        raise StoreError(f"{key}: {e}") from e
    if store.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {config.model.vocab_size} is smaller than the vocabulary of {store.vocab_size} "
            f"of the store {path} ({key})"
        )
    return store


def make_source(store: StoreReader, key: str, config: Config, packing_seed: tuple[int, ...] | None) -> Source:
    """The windows of a store in the configured mode; ConfigError if not even one window fits."""
    d = config.data
    if d.windows == "document":
        source: Source = PackedWindows(store, pack_documents(store.offsets, d.seq_len, packing_seed))
        need = "a document of at least 2 tokens"
    else:
        source = ConcatWindows(store, d.seq_len, document_masking=d.document_masking)
        need = f"data.seq_len + 1 = {d.seq_len + 1} tokens"
    if len(source) == 0:
        raise ConfigError(
            f"data.seq_len: the store {store.path} ({key}) holds {store.num_tokens} tokens in "
            f"{store.num_documents} documents, too few for one {d.windows} window (needs {need})"
        )
    return source


def check_same_tokenizer(stores: dict[str, StoreReader]) -> None:
    """All stores of a run must come from one tokenizer (checked even when the run names none)."""
    identities = {key: (s.manifest["tokenizer"]["hash"], s.vocab_size, s.eos_id) for key, s in stores.items()}
    first_key, first = next(iter(identities.items()))
    for key, identity in identities.items():
        if identity != first:
            raise ConfigError(
                f"{key}: the store {stores[key].path} has tokenizer (hash, vocab, eos) {identity}, but "
                f"{first_key} ({stores[first_key].path}) has {first}; set data.tokenizer to check against the run's"
            )


def check_token_ids(rows: Rows, windows_P: np.ndarray, store: StoreReader, where: str) -> None:
    """StoreError unless every id read lies in [0, the store's vocabulary): a damaged chunk (a bad disk, a
    cut copy) reads as ids in the billions, which the model's embedding would take without a word. Cheap:
    one max over the contiguous buffers the rows were read into, as uint32 (a negative id wraps to above
    any vocabulary); the offending window is looked for only when that fails."""
    vocab = store.vocab_size
    buffers = rows.ids_read or (rows.inputs_NxL, rows.targets_NxL)
    if all(ids.size == 0 or int(ids.view(np.uint32).max()) < vocab for ids in buffers):
        return
    for ids_NxL in (rows.inputs_NxL, rows.targets_NxL):
        bad_NxL = (ids_NxL < 0) | (ids_NxL >= vocab)
        if bad_NxL.any():
            row = int(np.argmax(bad_NxL.any(axis=1)))
            value = int(ids_NxL[row][bad_NxL[row]][0])
            raise StoreError(
                f"{store.path}: window {int(windows_P[row])} ({where}) holds token id {value}, outside the "
                f"vocabulary of {vocab}: the store is damaged; check it against its content hash "
                "(python -m megadoc_jax.data.verify) and export it again"
            )


def local_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """This process's rows [lo, hi) of a global batch."""
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ConfigError(f"train.batch_size: {batch_size} is not divisible by the process count {process_count}")
    rows = batch_size // process_count
    return process_index * rows, (process_index + 1) * rows


# --------------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------------


class TrainData:
    """Batches of the configured stream mixture; `batch(step)` holds this process's rows."""

    def __init__(
        self,
        config: Config,
        *,
        process_index: int = 0,
        process_count: int = 1,
        tokenizer: TokenizerInfo | None = None,
    ) -> None:
        d, t = config.data, config.train
        if not d.streams:
            raise ConfigError("data.streams: no training streams are configured")
        names = [s.name for s in d.streams]
        if d.real_stream not in names:
            raise ConfigError(f"data.real_stream: {d.real_stream!r} is not one of the stream names {names}")
        if d.seed < 0:
            raise ConfigError(f"data.seed: must be >= 0, got {d.seed}")
        self.config = config
        self.global_batch = t.batch_size
        self.rows = local_rows(t.batch_size, process_index, process_count)
        tokenizer = run_tokenizer(config, tokenizer)
        keys = [f"data.streams[{i}].store" for i in range(len(d.streams))]
        stores = {key: open_store(s.store, key, config, tokenizer) for key, s in zip(keys, d.streams)}
        check_same_tokenizer(stores)
        self.sources: list[Source] = [
            make_source(stores[key], key, config, mixture.packing_seed(d.seed, s.name))
            for key, s in zip(keys, d.streams)
        ]
        try:
            self.mixture = BlockMixture([s.weight for s in d.streams], d.seed)
        except ValueError as e:
            raise ConfigError(f"data.streams: {e}") from None
        self.plan = self._make_plan()

    def _make_plan(self) -> DataPlan:
        d, t = self.config.data, self.config.train
        real = [s.name for s in d.streams].index(d.real_stream)
        windows = [len(source) for source in self.sources]
        derived = mixture.steps_for_epochs(windows[real], t.batch_size, d.real_epochs, d.streams[real].weight)
        total = t.steps or derived
        examples = self.mixture.examples_per_stream(total * t.batch_size)
        streams = []
        for k, (stream, source) in enumerate(zip(d.streams, self.sources)):
            packing = source.plan if isinstance(source, PackedWindows) else None
            tokens = int(source.store.num_tokens)
            streams.append(
                StreamPlan(
                    name=stream.name,
                    store=stream.store,
                    weight=stream.weight,
                    per_block=int(self.mixture.counts[k]),
                    windows=windows[k],
                    examples=int(examples[k]),
                    tokens=tokens,
                    unused_tokens=packing.skipped_documents if packing else tokens - 1 - windows[k] * d.seq_len,
                    cut_documents=packing.cut_documents if packing else 0,
                    padding_fraction=packing.padding_fraction if packing else 0.0,
                )
            )
        return DataPlan(
            global_batch=t.batch_size,
            seq_len=d.seq_len,
            windows_mode=d.windows,
            block_size=self.mixture.block_size,
            real_stream=d.real_stream,
            real_epochs=d.real_epochs,
            steps_per_real_epoch=windows[real] / t.batch_size,
            derived_steps=derived,
            total_steps=total,
            streams=tuple(streams),
        )

    def batch(self, step: int) -> Batch:
        """This process's rows of the global batch of `step` (Contract 2)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        lo, hi = self.rows
        stream_N, example_N = self.mixture.assign(step * self.global_batch + np.arange(lo, hi))
        parts = []
        for k in range(len(self.sources)):
            (rows_P,) = np.nonzero(stream_N == k)
            if not rows_P.size:
                continue
            source, name = self.sources[k], self.config.data.streams[k].name
            windows_P = mixture.epoch_windows(example_N[rows_P], len(source), self.config.data.seed, name)
            rows = source.read(windows_P)
            check_token_ids(rows, windows_P, source.store, f"step {step}, stream {name!r}")
            parts.append((rows_P, rows))
        return Rows.merge(parts, hi - lo).to_batch()

    def iterate(self, start_step: int, prefetch: int = 2) -> Iterator[tuple[int, Batch]]:
        """(step, batch) for start_step .. plan.total_steps - 1, `prefetch` batches made ahead in a thread."""
        return prefetched(self.batch, range(start_step, self.plan.total_steps), prefetch)


# --------------------------------------------------------------------------------------------------
# Prefetching
# --------------------------------------------------------------------------------------------------


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def prefetched(produce: Callable[[int], Batch], steps: range, depth: int) -> Iterator[tuple[int, Batch]]:
    """Yields (step, produce(step)) in order; a thread runs up to `depth` steps ahead (0: no thread).

    An error in the thread is raised here, at the step it belongs to. Closing the generator early
    stops the thread.
    """
    if depth <= 0:
        for step in steps:
            yield step, produce(step)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for step in steps:
                if not put((step, produce(step))):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failed(e))

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
