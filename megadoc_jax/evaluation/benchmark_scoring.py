"""Our decoder as lm-eval's model side: the log-likelihoods of multiple-choice requests, in fixed-shape batches.

    model, cfg, max_length = hf.import_llama(hf_dir, mesh, compute_dtype="float32")   # fp32 for parity
    results = run_benchmarks(decoder_batch_scorer(model, mesh), tokenizer, data_dir, ["arc_easy", "piqa", "sciq"],
                             max_length=max_length, mesh=mesh)

`BatchedLoglikelihoods` implements benchmarks.Loglikelihoods. For each (context ids, continuation ids) the
model reads loglikelihood_requests.model_input(ctx, cont, max_length) (the window lm-eval's HF backend feeds,
cut from the left past max_length + 1 tokens), and the last len(cont) positions predict the continuation.
The requests are sorted as lm-eval sorts them (longest first, ties by the token ids), cut into batches of
`batch_size` rows, and each batch is right-padded to the shortest of a few bucket lengths (64, 128, 256, ...,
max_length) that holds its longest request; a short last batch gets padding rows. Every batch therefore has
one of a few fixed shapes [B, L] and only those few programs compile. Padding sits after each request's
tokens, so causal attention keeps it out of the scores. The continuation tokens' fp32 log-probabilities are
summed in float64 on the host; is_greedy is whether every one of them is the argmax. Results come back in
request order.

The seam to the model is a `BatchScorer`: fn(batch) -> {'log_prob': fp32 [B, L], 'is_greedy': bool [B, L]},
the batch being global [B, L] int32 arrays 'inputs', 'targets', 'positions', 'segment_ids' laid out rows over
('data', 'fsdp') and positions over 'context' (step.BATCH_AXES), the scores in the batch's positions. That
is what `jit_token_scores(..., greedy=True)` computes for one decoder (`decoder_batch_scorer`); an ensemble
plugs in as a BatchScorer that returns the ensemble's per-token log-probabilities and greedy hits (of its
mean logits or mean probabilities) for the same batch. Nothing else here changes.

Multi-host: every process plans the same batches from the same requests (a pure function of the request
list), gives each device its slice of every batch, and so scores the rows its devices hold: a deterministic
split of the requests by their index in lm-eval's order. Each process sums the continuations of its rows;
one process_allgather of fixed-size arrays ([n] float64 as int32 pairs, [n] greedy, [n] held) hands every
process, process 0 included, all results: the same numbers as one process.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from megadoc_jax import sharding
from megadoc_jax import step as step_lib
from megadoc_jax.config import Config, DataConfig, TrainConfig
from megadoc_jax.evaluation.benchmark_tasks import FEWSHOT_SEED
from megadoc_jax.evaluation.benchmarks import evaluate_benchmarks
from megadoc_jax.evaluation.loglikelihood_requests import model_input
from megadoc_jax.evaluation.token_scores import jit_ensemble_token_scores, jit_token_scores

Batch = dict[str, jax.Array]
BatchScorer = Callable[[Batch], dict[str, jax.Array]]  # batch -> {'log_prob', 'is_greedy'}, see the docstring
Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)

DEFAULT_BATCH_SIZE = 32
SMALLEST_BUCKET = 64
IN_FLIGHT = 2  # batches dispatched ahead of the one being read back: the host packs while the device computes


def row_multiple(mesh: jax.sharding.Mesh) -> int:
    """Batch rows must divide over the row axes ('data' x 'fsdp')."""
    return math.prod(mesh.shape[a] for a in sharding.RULES["batch"])


def length_multiple(mesh: jax.sharding.Mesh) -> int:
    """Bucket lengths divide over 'context' twice over (the zig-zag layout of ring / all_gather attention)."""
    context = math.prod(mesh.shape[a] for a in sharding.RULES["seq"])
    return 1 if context == 1 else 2 * context


def bucket_lengths(max_length: int, *, smallest: int = SMALLEST_BUCKET, multiple: int = 1) -> tuple[int, ...]:
    """The padded lengths a batch may have: smallest, 2 x smallest, ... below max_length, then max_length,
    each rounded up to `multiple`."""
    if max_length < 1 or smallest < 1 or multiple < 1:
        raise ValueError(f"bucket_lengths: max_length={max_length}, smallest={smallest}, multiple={multiple}")
    lengths, length = [], smallest
    while length < max_length:
        lengths.append(length)
        length *= 2
    lengths.append(max_length)
    return tuple(sorted({-(-n // multiple) * multiple for n in lengths}))


@dataclass(frozen=True)
class Window:
    """One request as the model reads it: input ids, target ids, and how many last positions score."""

    inputs: np.ndarray  # int32 [n] = model_input(ctx, cont, max_length)
    targets: np.ndarray  # int32 [n]: the next token at each position
    continuation: int  # the last `continuation` positions predict the continuation

    @classmethod
    def of(cls, context_ids: Sequence[int], continuation_ids: Sequence[int], max_length: int) -> Window:
        inputs = model_input(context_ids, continuation_ids, max_length)
        targets = (list(context_ids) + list(continuation_ids))[-(max_length + 1) :][1:]
        return cls(np.asarray(inputs, np.int32), np.asarray(targets, np.int32), len(continuation_ids))


@dataclass(frozen=True)
class PlannedBatch:
    rows: np.ndarray  # int64 [B]: the request index of each row, -1 for a padding row
    length: int  # L, the bucket


def lm_eval_order(requests: Sequence[Request]) -> list[int]:
    """lm-eval's Collator order for loglikelihood requests: longest (context + continuation) first, ties by ids."""
    return sorted(
        range(len(requests)),
        key=lambda i: (-(len(requests[i][0]) + len(requests[i][1])), tuple(requests[i][0]) + tuple(requests[i][1])),
    )


def plan_batches(
    windows: Sequence[Window], order: Sequence[int], batch_size: int, buckets: Sequence[int]
) -> list[PlannedBatch]:
    """Consecutive runs of `batch_size` requests in `order` (longest first), each padded to the shortest
    bucket that holds its longest (first) request; the last run is filled with padding rows.

    With fixed-shape batches this padding is the least any cut can have: the k-th batch of any cut into runs
    of at most batch_size starts at or before request k x batch_size, so its bucket is no shorter."""
    plan = []
    for start in range(0, len(order), batch_size):
        rows = np.full(batch_size, -1, np.int64)
        chunk = order[start : start + batch_size]
        rows[: len(chunk)] = chunk
        longest = max(len(windows[i].inputs) for i in chunk)
        fits = [b for b in buckets if b >= longest]
        if not fits:
            raise ValueError(f"a request of {longest} input tokens is longer than the largest bucket {max(buckets)}")
        plan.append(PlannedBatch(rows, fits[0]))
    return plan


def pack(batch: PlannedBatch, windows: Sequence[Window]) -> dict[str, np.ndarray]:
    """Host [B, L] int32 arrays of one planned batch, each row its request right-padded with token 0."""
    shape = (len(batch.rows), batch.length)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for r, i in enumerate(batch.rows):
        if i >= 0:
            w = windows[i]
            inputs[r, : len(w.inputs)] = w.inputs
            targets[r, : len(w.targets)] = w.targets
    positions = np.broadcast_to(np.arange(batch.length, dtype=np.int32), shape)
    # one segment per row: the same as no document masking for a backend that reads segment ids
    return {"inputs": inputs, "targets": targets, "positions": positions, "segment_ids": np.ones(shape, np.int32)}


def _to_devices(host: dict[str, np.ndarray], layout: jax.sharding.NamedSharding) -> Batch:
    """Global arrays from a batch that every process holds whole: each device takes its own slice."""
    return {k: jax.make_array_from_callback(v.shape, layout, lambda index, v=v: v[index]) for k, v in host.items()}


def _local_rows(x_BxL: jax.Array) -> dict[int, np.ndarray]:
    """This process's whole rows of an array sharded over rows only: {first row: block [rows, L]}."""
    blocks = {}
    for shard in x_BxL.addressable_shards:
        rows = shard.index[0]
        start = rows.start or 0
        if start not in blocks:  # replicas of the same rows on several devices: read one
            blocks[start] = np.asarray(shard.data)
    return blocks


@dataclass
class ScoringStats:
    """What the batches of all calls so far cost: counts, padding, seconds, and the shapes compiled."""

    requests: int = 0
    local_requests: int = 0  # those whose rows lie on this process's devices (all of them on one process)
    batches: int = 0
    tokens: int = 0  # request input tokens scored
    padded_tokens: int = 0  # B x L summed over batches
    seconds: float = 0.0
    shapes: collections.Counter = field(default_factory=collections.Counter)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "local_requests": self.local_requests,
            "batches": self.batches,
            "padding_fraction": 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0,
            "seconds": self.seconds,
            "shapes": {f"{b}x{length}": n for (b, length), n in sorted(self.shapes.items())},
        }


class BatchedLoglikelihoods:
    """benchmarks.Loglikelihoods over a BatchScorer on `mesh`: see the module docstring.

    batch_size is rounded up to a multiple of the mesh's row axes; buckets default to bucket_lengths(max_length)
    on the mesh's length multiple. Call it on every process with the same requests."""

    def __init__(
        self,
        batch_scorer: BatchScorer,
        mesh: jax.sharding.Mesh,
        *,
        max_length: int,
        batch_size: int = DEFAULT_BATCH_SIZE,
        buckets: Sequence[int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_scorer = batch_scorer
        self.mesh = mesh
        self.max_length = max_length
        rows = row_multiple(mesh)
        self.batch_size = -(-batch_size // rows) * rows
        multiple = length_multiple(mesh)
        self.buckets = tuple(buckets) if buckets else bucket_lengths(max_length, multiple=multiple)
        bad = [b for b in self.buckets if b % multiple]
        if bad:
            raise ValueError(f"buckets {bad} are not multiples of {multiple} (2 x the mesh's context axis)")
        if max(self.buckets) < max_length:
            raise ValueError(f"the largest bucket {max(self.buckets)} is shorter than max_length {max_length}")
        self.stats = ScoringStats()
        # the scores as whole rows per device (positions gathered over 'context'), for host reads; without a
        # context split the batch layout already is that
        rows_only = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", None)))
        self._to_rows = jax.jit(lambda scores: scores, out_shardings=rows_only) if multiple > 1 else (lambda x: x)

    def __call__(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        start = time.perf_counter()
        windows = [Window.of(ctx, cont, self.max_length) for ctx, cont in requests]
        plan = plan_batches(windows, lm_eval_order(requests), self.batch_size, self.buckets)
        n = len(requests)
        loglikelihood_N, greedy_N, held_N = np.zeros(n, np.float64), np.zeros(n, bool), np.zeros(n, bool)

        def read(batch: PlannedBatch, scores: dict[str, jax.Array]) -> None:
            log_prob, is_greedy = _local_rows(scores["log_prob"]), _local_rows(scores["is_greedy"])
            for first, block_RxL in log_prob.items():
                for r, i in enumerate(batch.rows[first : first + len(block_RxL)]):
                    if i < 0:
                        continue
                    w = windows[i]
                    span = slice(len(w.inputs) - w.continuation, len(w.inputs))
                    loglikelihood_N[i] = block_RxL[r, span].astype(np.float64).sum()
                    greedy_N[i] = bool(is_greedy[first][r, span].all())
                    held_N[i] = True

        pending: collections.deque = collections.deque()
        for batch in plan:
            layout = sharding.named_sharding(self.mesh, step_lib.BATCH_AXES, (self.batch_size, batch.length))
            scores = self.batch_scorer(_to_devices(pack(batch, windows), layout))
            pending.append((batch, self._to_rows({k: scores[k] for k in ("log_prob", "is_greedy")})))
            if len(pending) > IN_FLIGHT:
                read(*pending.popleft())
            self.stats.shapes[(self.batch_size, batch.length)] += 1
            self.stats.padded_tokens += self.batch_size * batch.length
        while pending:
            read(*pending.popleft())

        self.stats.local_requests += int(held_N.sum())
        loglikelihood_N, greedy_N, held_N = gather_results(loglikelihood_N, greedy_N, held_N)
        if not held_N.all():
            raise RuntimeError(f"{int((~held_N).sum())} of {n} requests were scored by no process")
        self.stats.requests += n
        self.stats.batches += len(plan)
        self.stats.tokens += sum(len(w.inputs) for w in windows)
        self.stats.seconds += time.perf_counter() - start
        return [(float(ll), bool(g)) for ll, g in zip(loglikelihood_N, greedy_N, strict=True)]


def gather_results(
    loglikelihood_N: np.ndarray, greedy_N: np.ndarray, held_N: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every process's results merged, on every process: each request from the first process that holds it.

    The float64 sums travel as int32 pairs (JAX without x64 would round them to float32)."""
    if jax.process_count() == 1:
        return loglikelihood_N, greedy_N, held_N
    gathered = multihost_utils.process_allgather(
        (loglikelihood_N.view(np.int32), greedy_N.astype(np.int32), held_N.astype(np.int32))
    )
    bits_PxN2, greedy_PxN, held_PxN = (np.asarray(x) for x in gathered)
    held_PxN = held_PxN.astype(bool)
    first = np.argmax(held_PxN, axis=0)  # the first process holding each request
    columns = np.arange(held_PxN.shape[1])
    values_PxN = np.ascontiguousarray(bits_PxN2, dtype=np.int32).view(np.float64)
    return values_PxN[first, columns], greedy_PxN[first, columns].astype(bool), held_PxN.any(axis=0)


def _layout_config(model_config: Any, mesh: jax.sharding.Mesh) -> Config:
    """The layout jit_token_scores derives from (train.batch_size, data.seq_len): the smallest shape that
    every planned batch's rows and bucket length are multiples of, so the spec is the batches' own."""
    return Config(
        model=model_config,
        data=DataConfig(seq_len=length_multiple(mesh), document_masking=False),
        train=TrainConfig(batch_size=row_multiple(mesh)),
    )


def decoder_batch_scorer(model: nnx.Module, mesh: jax.sharding.Mesh) -> BatchScorer:
    """The BatchScorer of one Decoder whose parameters lie on `mesh`: jit_token_scores with greedy, one
    compiled program per batch shape. Load the model with compute dtype float32 for lm-eval's numbers
    (hf.import_llama(..., compute_dtype="float32"), checkpoint.load_run(..., compute_dtype="float32"))."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    scores = jit_token_scores(graphdef, param_shardings, mesh, _layout_config(model.cfg, mesh), greedy=True)
    return lambda batch: scores(params, batch)


def ensemble_batch_scorer(
    graphdefs: Sequence[nnx.GraphDef],
    param_shardings: Sequence[Any],
    params: Sequence[Any],
    model_config: Any,
    mesh: jax.sharding.Mesh,
    *,
    ensemble: str = "mean_logits",
) -> BatchScorer:
    """The BatchScorer of an ensemble (jit_ensemble_token_scores: the members' logits or probabilities
    averaged chunk by chunk); is_greedy is the argmax of the combined distribution."""
    config = _layout_config(model_config, mesh)
    scores = jit_ensemble_token_scores(graphdefs, param_shardings, mesh, config, greedy=True, ensemble=ensemble)
    return lambda batch: scores(params, batch)


def run_benchmarks(
    batch_scorer: BatchScorer,
    tokenizer: Any,
    data_dir: str | Path,
    tasks: Sequence[str],
    *,
    max_length: int,
    mesh: jax.sharding.Mesh,
    num_fewshot: int = 0,
    seed: int = FEWSHOT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, Any]:
    """evaluate_benchmarks with our model side: {"tasks", "paper_average", "num_fewshot", "fewshot_seed"} as
    there, plus "scoring" (ScoringStats.summary). Call on every process; every process gets the figures."""
    loglikelihoods = BatchedLoglikelihoods(batch_scorer, mesh, max_length=max_length, batch_size=batch_size)
    results = evaluate_benchmarks(
        tasks, data_dir, tokenizer, loglikelihoods, max_length=max_length, num_fewshot=num_fewshot, seed=seed
    )
    results["scoring"] = loglikelihoods.stats.summary()
    return results
