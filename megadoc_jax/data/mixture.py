"""The mixture of streams, per-epoch shuffles and the run-length accounting.

Example g of the run (row g mod B of step g // B) is assigned to a stream and to a window of that
stream by pure functions of (seed, g), so that any process can compute any row without state:

1. Blocks (Levanter-style): the examples are cut into blocks of K = BLOCK_SIZE. Every block holds
   exactly count_k examples of stream k (the weights rounded by largest remainder, summing to K), in an
   order that is a seeded permutation of the block. Proportions are exact per block, so they never
   drift, and the variance inside a batch is that of drawing without replacement.
2. Epochs: the n-th example of stream k is in epoch e = n // N_k (N_k = windows of the stream) and is
   window perm_{k,e}(n mod N_k), where perm_{k,e} is a seeded permutation that is new every epoch.

Permutations are numpy's (seeded by the run seed, a tag, the stream name's hash and the block or
epoch), computed once and cached: 4 bytes per window for each cached epoch. (Grain's index_shuffle
would need no table, but took 15-100 us per index here and, at 4 rounds, gave visibly non-uniform
block orders.)

Accounting (the paper's): S_epoch = N_real / B steps per real epoch, total steps
T = ceil(S_epoch * E / w_real) with E = data.real_epochs and w_real = 1 - r the real stream's weight;
train.steps > 0 overrides T. Each stream's epochs are then the examples it gets in T * B, over N_k.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Sequence

import numpy as np

BLOCK_SIZE = 1000  # the paper's weights (r = 0.5, 0.75, 0.9) are exact in blocks of 1000
_MIX_TAG, _EPOCH_TAG, _PACK_TAG = 1, 2, 3


def stream_key(name: str) -> int:
    """A stable integer for a stream name, so that renaming or reordering other streams changes nothing."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


@functools.lru_cache(maxsize=16)
def _permutation(size: int, *entropy: int) -> np.ndarray:
    """A seeded permutation of [0, size), read-only (shared through the cache)."""
    dtype = np.int32 if size < 2**31 else np.int64
    permutation = np.random.default_rng(list(entropy)).permutation(size).astype(dtype)
    permutation.flags.writeable = False
    return permutation


def _span(values_N: np.ndarray) -> range:
    """min..max of a few nearby integers (the blocks or epochs a batch touches: usually 1 or 2)."""
    return range(int(values_N.min()), int(values_N.max()) + 1) if values_N.size else range(0)


def packing_seed(seed: int, name: str) -> tuple[int, ...]:
    """Seed of the document order that a stream's packing plan uses ('document' windows)."""
    return (seed, _PACK_TAG, stream_key(name))


def block_counts(weights: Sequence[float], block_size: int) -> np.ndarray:
    """Examples of each stream per block: weights x K rounded by largest remainder (sum is K)."""
    exact = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * block_size
    counts = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - counts), kind="stable")
    counts[by_remainder[: block_size - int(counts.sum())]] += 1
    return counts


class BlockMixture:
    """Assigns each example of the run to (stream, the stream's n-th example)."""

    def __init__(self, weights: Sequence[float], seed: int, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.seed = seed
        self.counts = block_counts(weights, block_size)
        if (self.counts == 0).any():
            k = int(np.argmin(self.counts))
            raise ValueError(f"stream {k}: weight {weights[k]} gets no example in a block of {block_size}")

    def assign(self, examples_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stream index, the stream's example number) of each global example number."""
        examples_N = np.asarray(examples_N, dtype=np.int64)
        block_N, slot_N = np.divmod(examples_N, self.block_size)
        stream_N, rank_N = np.empty_like(slot_N), np.empty_like(slot_N)
        for block in _span(block_N):
            here = block_N == block
            block_streams, block_ranks = _block_layout(tuple(self.counts.tolist()), self.seed, int(block))
            stream_N[here], rank_N[here] = block_streams[slot_N[here]], block_ranks[slot_N[here]]
        return stream_N, block_N * self.counts[stream_N] + rank_N

    def examples_per_stream(self, num_examples: int) -> np.ndarray:
        """How many of the first `num_examples` examples each stream gets (exact)."""
        full_blocks, rest = divmod(num_examples, self.block_size)
        streams, _ = self.assign(np.arange(full_blocks * self.block_size, num_examples))
        return full_blocks * self.counts + np.bincount(streams, minlength=self.counts.size)


@functools.lru_cache(maxsize=8)
def _block_layout(counts: tuple[int, ...], seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream of each slot of a block (a seeded permutation of the labels [0]*c0 + [1]*c1 + ...), and
    the slot's rank among the block's slots of that stream: streams consume their examples in order."""
    size = sum(counts)
    streams_K = np.repeat(np.arange(len(counts)), counts)[_permutation(size, seed, _MIX_TAG, block)]
    ranks_K = np.empty(size, np.int64)
    for stream, count in enumerate(counts):
        ranks_K[streams_K == stream] = np.arange(count)
    return streams_K, ranks_K


def epoch_windows(examples_N: np.ndarray, num_windows: int, seed: int, name: str) -> np.ndarray:
    """Window of each of a stream's example numbers: a fresh seeded permutation every epoch."""
    epoch_N, index_N = np.divmod(np.asarray(examples_N, dtype=np.int64), num_windows)
    windows_N = np.empty_like(index_N)
    for epoch in _span(epoch_N):
        here = epoch_N == epoch
        windows_N[here] = _permutation(num_windows, seed, _EPOCH_TAG, stream_key(name), int(epoch))[index_N[here]]
    return windows_N


# --------------------------------------------------------------------------------------------------
# The plan: run length and each stream's share, with a readable report
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    name: str
    store: str
    weight: float
    per_block: int  # examples of this stream in each block of BLOCK_SIZE
    windows: int  # N_k: windows (rows) in one epoch of the stream
    examples: int  # windows the run reads from the stream, repeats included
    tokens: int  # tokens in the store
    unused_tokens: int  # in no window: the concat tail, or single-token documents ('document')
    cut_documents: int  # documents longer than a window, cut into pieces ('document')
    padding_fraction: float  # of the stream's rows ('document'; 0 for concat)

    @property
    def epochs(self) -> float:
        return self.examples / self.windows


@dataclasses.dataclass(frozen=True)
class DataPlan:
    global_batch: int
    seq_len: int
    windows_mode: str
    block_size: int
    real_stream: str
    real_epochs: float  # E asked for (data.real_epochs)
    steps_per_real_epoch: float  # S_epoch = N_real / B
    derived_steps: int  # ceil(S_epoch * E / w_real)
    total_steps: int  # train.steps when > 0, else derived_steps
    streams: tuple[StreamPlan, ...]

    @property
    def steps_overridden(self) -> bool:
        return self.total_steps != self.derived_steps

    def stream(self, name: str) -> StreamPlan:
        return next(s for s in self.streams if s.name == name)

    def __str__(self) -> str:
        real = self.stream(self.real_stream)
        source = "train.steps (overrides the derived count)" if self.steps_overridden else "derived"
        lines = [
            f"data plan: {self.windows_mode} windows of {self.seq_len} tokens, global batch {self.global_batch}",
            f"  S_epoch = {real.windows} {self.real_stream} windows / {self.global_batch} = "
            f"{self.steps_per_real_epoch:.2f} steps per real epoch",
            f"  T = ceil(S_epoch x E / w_real) = ceil({self.steps_per_real_epoch:.2f} x {self.real_epochs:g} / "
            f"{real.weight:g}) = {self.derived_steps} steps",
            f"  total steps: {self.total_steps} ({source}); {self.total_steps * self.global_batch} windows, "
            f"{self.total_steps * self.global_batch * self.seq_len:,} token positions",
            f"  {'stream':<12} {'weight':>7} {'per ' + str(self.block_size):>9} {'windows':>10} "
            f"{'examples':>11} {'epochs':>8} {'tokens':>13} {'unused':>7} {'cut docs':>8} {'padding':>8}  store",
        ]
        for s in self.streams:
            lines.append(
                f"  {s.name:<12} {s.weight:>7.4g} {s.per_block:>9} {s.windows:>10} {s.examples:>11} "
                f"{s.epochs:>8.3f} {s.tokens:>13,} {s.unused_tokens:>7} {s.cut_documents:>8} "
                f"{s.padding_fraction:>7.1%}  {s.store}"
            )
        return "\n".join(lines)


def steps_for_epochs(real_windows: int, global_batch: int, real_epochs: float, real_weight: float) -> int:
    """T = ceil(S_epoch * E / w_real), S_epoch = real_windows / B (a hair of float error tolerated)."""
    return max(1, math.ceil(real_windows / global_batch * real_epochs / real_weight - 1e-9))
