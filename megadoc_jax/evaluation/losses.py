"""Held-out loss figures from per-token scores: the one code path of the evaluate command and the training
loop's periodic evaluation (heldout.py).

    scorer = RowScorer(graphdefs, param_shardings, mesh, config, ensemble="mean_logits")
    sums = score_batches(scorer, params, batches, byte_lengths=table)   # batches: iterable of RowBatch
    sums.figures()   # {"tokens", "bytes", "loss", "bpb", "by_position", "by_segment"}

RowScorer compiles evaluation.jit_ensemble_token_scores for [train.batch_size, data.seq_len] rows on the
mesh (every process builds the whole global batch on the host and hands over its own rows), and returns
every target's log-probability on every process. score_batches keeps two batches in flight while the host
prepares the next and adds up, on the host in float64 and in a fixed order (batch by batch, then numpy's
summation over the fixed [B, L] array), the negative log-probabilities of the scored targets (weights:
loss_mask): so the figures do not depend on the device count or mesh beyond the fp32 scores themselves,
and a rerun gives the same numbers.

Figures (LossSums.figures): loss = summed loss / scored tokens (nats, token-weighted: the micro average);
bpb = summed loss / ln 2 / bytes of the scored tokens (token_bytes.py says which bytes); by_position: the
same per bucket of the target's index inside its document, [0, 1), [1, 2), [2, 4), ... powers of two up to
data.seq_len and [seq_len, inf) past it; by_segment: per megadoc segment of the target (original,
rephrase k, rationale k, separator; the store's segment runs). Every figure carries its token count.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from megadoc_jax import step as step_lib
from megadoc_jax.config import Config
from megadoc_jax.data.pipeline import local_rows
from megadoc_jax.data.store import SegmentKind
from megadoc_jax.evaluation.loss_windows import RowBatch
from megadoc_jax.evaluation.token_scores import jit_ensemble_token_scores

MODEL_KEYS = ("inputs", "targets", "positions", "segment_ids")  # what scoring reads of a batch


class RowScorer:
    """scorer(params of each member, global batch as host numpy [B, L]) -> device log-probs; scorer.fetch(x)
    -> fp32 host [B, L] on every process. One member is a single model."""

    def __init__(
        self,
        graphdefs: Sequence[nnx.GraphDef],
        param_shardings: Sequence[Any],
        mesh: jax.sharding.Mesh,
        config: Config,
        *,
        ensemble: str = "mean_logits",
    ) -> None:
        self.config = config
        self.layout = step_lib.batch_sharding(mesh, config)
        self.rows = local_rows(config.train.batch_size, jax.process_index(), jax.process_count())
        self._scores = jit_ensemble_token_scores(graphdefs, param_shardings, mesh, config, ensemble=ensemble)

    def __call__(self, params: Sequence[Any], batch: dict[str, np.ndarray]) -> jax.Array:
        lo, hi = self.rows
        local = {key: batch[key][lo:hi] for key in MODEL_KEYS}
        return self._scores(params, step_lib.global_batch(local, self.layout))["log_prob"]

    @staticmethod
    def fetch(log_prob_BxL: jax.Array) -> np.ndarray:
        if jax.process_count() > 1:
            return np.asarray(multihost_utils.process_allgather(log_prob_BxL, tiled=True))
        return np.asarray(jax.device_get(log_prob_BxL))


def position_edges(seq_len: int) -> np.ndarray:
    """Bucket starts 0, 1, 2, 4, ... (powers of two below seq_len), seq_len: the last bucket is [seq_len, inf)."""
    edges = [0] + [2**i for i in range(max(seq_len - 1, 1).bit_length()) if 2**i < seq_len] + [seq_len]
    return np.asarray(sorted(set(edges)), np.int64)


def segment_label(kind: int, index: int) -> str:
    name = SegmentKind(kind).name.lower()
    numbered = kind in (SegmentKind.REPHRASE, SegmentKind.RATIONALE) or index != 0  # one label per (kind, index)
    return f"{name}_{index}" if numbered else name


class LossSums:
    """float64 sums of the scored targets' losses, tokens and bytes: overall, by position, by segment."""

    def __init__(self, seq_len: int, byte_lengths: np.ndarray | None = None) -> None:
        self.edges = position_edges(seq_len)
        self.byte_lengths = byte_lengths
        self.loss = 0.0
        self.tokens = 0.0
        self.bytes = 0
        self.position_loss = np.zeros(self.edges.size, np.float64)
        self.position_tokens = np.zeros(self.edges.size, np.float64)
        self.segment_loss: dict[tuple[int, int], float] = {}
        self.segment_tokens: dict[tuple[int, int], float] = {}

    def add(self, log_prob_BxL: np.ndarray, rows: RowBatch) -> None:
        weight_BxL = rows.batch["loss_mask"].astype(np.float64)
        # Unscored positions (padding, a window's last column) add 0 even if their score is not finite.
        loss_BxL = np.where(weight_BxL > 0, -log_prob_BxL.astype(np.float64) * weight_BxL, 0.0)
        self.loss += float(np.sum(loss_BxL))
        self.tokens += float(np.sum(weight_BxL))
        if self.byte_lengths is not None:
            self.bytes += int(np.sum(self.byte_lengths[rows.batch["targets"]] * (weight_BxL > 0)))
        if rows.document_position_BxL is not None:
            scored = rows.document_position_BxL >= 0
            bucket_S = np.searchsorted(self.edges, rows.document_position_BxL[scored], side="right") - 1
            size = self.edges.size
            self.position_loss += np.bincount(bucket_S, weights=loss_BxL[scored], minlength=size)
            self.position_tokens += np.bincount(bucket_S, weights=weight_BxL[scored], minlength=size)
        if rows.segment_kind_BxL is not None:
            scored = rows.segment_kind_BxL >= 0
            key_S = rows.segment_kind_BxL[scored].astype(np.int64) * 65536 + rows.segment_index_BxL[scored]
            keys, inverse = np.unique(key_S, return_inverse=True)
            losses = np.bincount(inverse, weights=loss_BxL[scored], minlength=keys.size)
            tokens = np.bincount(inverse, weights=weight_BxL[scored], minlength=keys.size)
            for key, loss, count in zip(keys.tolist(), losses.tolist(), tokens.tolist()):
                kind_index = divmod(key, 65536)
                self.segment_loss[kind_index] = self.segment_loss.get(kind_index, 0.0) + loss
                self.segment_tokens[kind_index] = self.segment_tokens.get(kind_index, 0.0) + count

    @property
    def mean_loss(self) -> float:
        return self.loss / self.tokens if self.tokens else math.nan

    def figures(self) -> dict[str, Any]:
        ends = [*self.edges[1:].tolist(), None]
        by_position = [
            {"from": int(lo), "to": hi, "tokens": int(n), "loss": loss / n}
            for lo, hi, n, loss in zip(self.edges.tolist(), ends, self.position_tokens, self.position_loss)
            if n
        ]
        by_segment = [
            {
                "segment": segment_label(kind, index),
                "kind": SegmentKind(kind).name.lower(),
                "index": index,
                "tokens": int(self.segment_tokens[kind, index]),
                "loss": self.segment_loss[kind, index] / self.segment_tokens[kind, index],
            }
            for kind, index in sorted(self.segment_loss)
            if self.segment_tokens[kind, index]
        ]
        bpb = self.loss / math.log(2) / self.bytes if self.byte_lengths is not None and self.bytes else None
        return {
            "tokens": int(self.tokens),
            "bytes": int(self.bytes) if self.byte_lengths is not None else None,
            "loss": self.mean_loss,
            "bpb": bpb,
            "by_position": by_position,
            "by_segment": by_segment,
        }


def score_batches(
    scorer: RowScorer,
    params: Sequence[Any],
    batches: Iterable[RowBatch],
    sums: LossSums,
    *,
    progress: Callable[[int], None] | None = None,
    in_flight: int = 2,
) -> LossSums:
    """Scores every batch and adds it to `sums` in batch order, `in_flight` batches dispatched ahead of
    the one being added up, so that the host's reads and sums overlap the devices' work."""
    pending: collections.deque[tuple[jax.Array, RowBatch]] = collections.deque()
    for rows in batches:
        pending.append((scorer(params, rows.batch), rows))
        if len(pending) > in_flight:
            _add(scorer, sums, *pending.popleft(), progress)
    while pending:
        _add(scorer, sums, *pending.popleft(), progress)
    return sums


def _add(scorer: RowScorer, sums: LossSums, log_prob: jax.Array, rows: RowBatch, progress) -> None:
    sums.add(scorer.fetch(log_prob), rows)
    if progress is not None:
        progress(int(np.count_nonzero(rows.batch["loss_mask"])))
