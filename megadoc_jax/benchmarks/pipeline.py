"""Benchmark: the full input pipeline against bare window reads from the same stores.

    python -m megadoc_jax.benchmarks.pipeline [--seq-len 4096 --batch 64 --steps 50]

Writes two temporary stores (real and synthetic, random tokens, document lengths drawn like web text
and like stitched megadocs), then times
- bare: StoreReader.read_windows of the same B windows of L + 1 tokens that the concat pipeline
  reads at each step, one call per store (what any loader pays);
- pipeline: TrainData.batch(step): mixture, epoch shuffles, reads, segment ids, positions, batching,
  in 'concat' mode without document masking (the paper's headline runs) and with it, and in
  'document' mode (packed long-context rows);
in the reader's two modes: streaming (stores larger than its cache: every window is a direct read of
its bytes, store_direct.py, OS page cache warm) and resident (the store decoded in memory: reads are memory copies, so
the pipeline's own work shows most). Then the packing plan for millions of documents from their
offsets alone. Prints figures and ratios (bare and pipeline calls interleaved; each call timed as the
best of 5 passes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megadoc_jax.config import from_dict
from megadoc_jax.data.mixture import epoch_windows
from megadoc_jax.data.packing import pack_documents
from megadoc_jax.data.pipeline import TrainData
from megadoc_jax.data.store import Document, StoreReader, StoreWriter, TokenizerInfo
from megadoc_jax.data.store_reader import DEFAULT_CACHE_BYTES

VOCAB = 128_256
STREAMING_CACHE_BYTES = 16 << 20  # smaller than both stores: every window is read on its own (direct)
TOKENIZER = TokenizerInfo(name="benchmark", hash="sha256:benchmark", vocab_size=VOCAB, eos_id=VOCAB - 1)


def document_lengths(rng: np.random.Generator, total_tokens: int, mean_length: float) -> np.ndarray:
    """Log-normal lengths (sigma 1, as web text roughly is) with the given mean, summing to ~total."""
    lengths = rng.lognormal(np.log(mean_length) - 0.5, 1.0, size=int(total_tokens / mean_length * 1.1) + 1)
    lengths = np.maximum(lengths.astype(np.int64), 2)
    return lengths[: np.searchsorted(np.cumsum(lengths), total_tokens) + 1]


def write_random_store(path: Path, total_tokens: int, mean_length: float, seed: int) -> str:
    rng = np.random.default_rng(seed)
    with StoreWriter(path, TOKENIZER) as writer:
        for length in document_lengths(rng, total_tokens, mean_length):
            tokens = rng.integers(0, VOCAB - 1, size=length, dtype=np.int32)
            tokens[-1] = TOKENIZER.eos_id
            writer.append([Document(tokens, {})])
        writer.finish()
    return str(path)


def seconds_per_call(runs: dict[str, Callable[[int], object]], calls: int, passes: int = 5) -> dict[str, float]:
    """For each run: the mean over calls i < `calls` of the fastest of `passes` timings of run(i).

    The runs are interleaved call by call (bare(i), pipeline(i), ..., then i + 1), so that the load of
    the other jobs on this machine's cores falls on all of them alike and their ratios hold within one
    run; the best of several passes per call estimates the cost without that load. Every call still does
    its own, different work (another step's batch).
    """
    for run in runs.values():
        run(0)  # warm: permutations and plans computed
    best = {name: np.full(calls, np.inf) for name in runs}
    for _ in range(passes):
        for i in range(calls):
            for name, run in runs.items():
                start = time.perf_counter()
                run(i)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: float(times.mean()) for name, times in best.items()}


def batch_windows(data: TrainData, step: int) -> list[tuple[int, np.ndarray]]:
    """(stream, window ids) that TrainData.batch(step) reads, stream by stream."""
    stream_N, example_N = data.mixture.assign(step * data.global_batch + np.arange(data.global_batch))
    return [
        (k, epoch_windows(example_N[stream_N == k], len(data.sources[k]), data.config.data.seed, stream.name))
        for k, stream in enumerate(data.config.data.streams)
        if (stream_N == k).any()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--real-tokens", type=int, default=8_000_000)
    parser.add_argument("--synth-tokens", type=int, default=24_000_000)
    parser.add_argument("--pack-documents", type=int, default=5_000_000)
    args = parser.parse_args()
    length, batch = args.seq_len, args.batch

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        real = write_random_store(Path(tmp) / "real", args.real_tokens, 1243, seed=0)  # web documents
        synth = write_random_store(Path(tmp) / "synth", args.synth_tokens, 22_000, seed=1)  # G=32 megadocs
        seconds = time.perf_counter() - start
        print(f"stores: {args.real_tokens:,} + {args.synth_tokens:,} tokens written in {seconds:.1f} s")

        def config(windows: str, masking: bool):
            streams = [dict(name="real", store=real, weight=0.25), dict(name="synth", store=synth, weight=0.75)]
            return from_dict(
                dict(
                    model=dict(vocab_size=VOCAB),
                    data=dict(streams=streams, seq_len=length, windows=windows, document_masking=masking),
                    train=dict(batch_size=batch),
                )
            )

        pipelines = {
            "concat": TrainData(config("concat", masking=False)),  # the paper's headline runs
            "concat, masking": TrainData(config("concat", masking=True)),
            "document": TrainData(config("document", masking=True)),
        }
        sources = [source for data in pipelines.values() for source in data.sources]
        # Bare: the very windows the concat pipeline reads at each step, one read_windows call per store.
        bare_reads = [batch_windows(pipelines["concat"], step) for step in range(args.steps)]
        bare_stores: list[StoreReader] = []

        def read_bare(step: int) -> None:
            for k, windows in bare_reads[step]:
                bare_stores[k].read_windows(windows * length, length + 1)

        tokens = batch * length
        print(f"batch {batch} x {length} tokens, {args.steps} steps; ms per batch, M tokens/s, overhead over bare")
        for regime, cache_bytes in (
            ("streaming: stores larger than the reader cache", STREAMING_CACHE_BYTES),
            ("resident: stores decoded in the reader cache", DEFAULT_CACHE_BYTES),
        ):
            # Fresh readers of this cache size for both sides (the reader picks its mode when opened).
            bare_stores[:] = [StoreReader.open(path, cache_bytes=cache_bytes) for path in (real, synth)]
            for source in sources:
                source.store = StoreReader.open(source.store.path, cache_bytes=cache_bytes)
            for store in bare_stores + [source.store for source in sources]:
                store.read_windows(np.arange(0, store.num_tokens - length, length), length)  # warm caches
            seconds = seconds_per_call(
                {"bare": read_bare, **{name: data.batch for name, data in pipelines.items()}}, args.steps
            )
            bare = seconds.pop("bare")
            print(f"  [{regime}]")
            print(f"    {'bare read_windows':<26} {bare * 1e3:8.2f} ms  {tokens / bare / 1e6:8.1f} M tokens/s")
            for name, spent in seconds.items():
                print(
                    f"    {'pipeline ' + name:<26} {spent * 1e3:8.2f} ms  {tokens / spent / 1e6:8.1f} M tokens/s  "
                    f"{spent / bare - 1:+7.1%}"
                )
        padding = ", ".join(f"{s.name} {s.padding_fraction:.1%}" for s in pipelines["document"].plan.streams)
        print(f"  document rows padding: {padding} (goal for concat: < +20% over bare)")

    lengths = document_lengths(np.random.default_rng(2), args.pack_documents * 1243, 1243)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for seq_len in (4096, 65_536):
        start = time.perf_counter()
        plan = pack_documents(offsets, seq_len, (0,))
        print(
            f"packing plan: {offsets.size - 1:,} documents into {plan.num_rows:,} rows of {seq_len} in "
            f"{time.perf_counter() - start:.2f} s (padding {plan.padding_fraction:.1%})"
        )


if __name__ == "__main__":
    main()
