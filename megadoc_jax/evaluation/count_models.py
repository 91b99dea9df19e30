"""Count-model baselines: the held-out loss of a unigram and a bigram model of the training tokens.

A number such as `eval/heldout/loss: 4.2` means little on its own; next to what counting does on the same
targets it says whether the model learned more than token frequencies (unigram) and pairs (bigram).

The models (numpy only, no JAX, no tuning on the held-out set):
- training tokens: the whole store of the real stream (data.real_stream) read as one stream in store
  order, each document with its EOS as the store holds it; N tokens, N - 1 consecutive pairs (the pair
  across a document boundary included: concat windows predict a document's first token from the EOS
  before it too).
- unigram, add-one (Laplace) over the model's V = model.vocab_size outcomes: p(b) = (c(b) + 1) / (N + V).
- bigram, Witten-Bell interpolation with that unigram: p(b | a) = (c(a, b) + T(a) p(b)) / (c(a) + T(a)),
  where c(a) counts the pairs starting with a and T(a) the distinct tokens that follow a; a context
  never seen (c(a) = 0) gets the unigram. No constant: the weight of the unigram is set by the counts.

The scored targets are exactly the training loop's held-out targets (evaluation/batches.py, eval_batches):
each eval store's train.eval_recipe windows (the whole store, or its first train.eval_batches batches),
every target whose loss_mask is 1, each predicted from the input token at its position (its predecessor
in the store). The loss is the mean of -ln p over them, in nats/token, like `eval/<name>/loss`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np

from megadoc_jax.config import Config, ConfigError
from megadoc_jax.data.pipeline import Batch, open_store, run_tokenizer
from megadoc_jax.data.store import TokenizerInfo
from megadoc_jax.evaluation.batches import eval_batches, heldout_prefix

log = logging.getLogger(__name__)

UNIGRAM_ADD = 1.0  # add-one: every one of the V outcomes gets one pseudo-count


@dataclasses.dataclass(frozen=True)
class CountModels:
    """Unigram and bigram counts of one token stream; `fit` builds them, the log_prob methods score."""

    vocab_size: int  # V
    unigram_V: np.ndarray  # float64 [V]: add-one probabilities
    pair_keys_P: np.ndarray  # int64 [P]: a * V + b of every distinct pair seen, sorted
    pair_counts_P: np.ndarray  # int64 [P]: c(a, b)
    context_counts_V: np.ndarray  # int64 [V]: c(a), pairs starting with a
    context_types_V: np.ndarray  # int64 [V]: T(a), distinct tokens following a

    @classmethod
    def fit(cls, tokens_T: np.ndarray, vocab_size: int) -> CountModels:
        tokens_T = np.asarray(tokens_T, dtype=np.int64).reshape(-1)
        _check_range(tokens_T, vocab_size, "training tokens")
        unigram_V = (np.bincount(tokens_T, minlength=vocab_size) + UNIGRAM_ADD) / (
            tokens_T.size + UNIGRAM_ADD * vocab_size
        )
        pair_keys_P, pair_counts_P = np.unique(tokens_T[:-1] * vocab_size + tokens_T[1:], return_counts=True)
        first_P = pair_keys_P // vocab_size
        return cls(
            vocab_size=vocab_size,
            unigram_V=unigram_V,
            pair_keys_P=pair_keys_P,
            pair_counts_P=pair_counts_P.astype(np.int64),
            context_counts_V=np.bincount(first_P, weights=pair_counts_P, minlength=vocab_size).astype(np.int64),
            context_types_V=np.bincount(first_P, minlength=vocab_size).astype(np.int64),
        )

    def unigram_log_prob(self, targets_N: np.ndarray) -> np.ndarray:
        """ln p(b) of each target: float64 [N]."""
        targets_N = np.asarray(targets_N, dtype=np.int64)
        _check_range(targets_N, self.vocab_size, "targets")
        return np.log(self.unigram_V[targets_N])

    def bigram_log_prob(self, previous_N: np.ndarray, targets_N: np.ndarray) -> np.ndarray:
        """ln p(b | a) of each target b after its previous token a: float64 [N]."""
        previous_N = np.asarray(previous_N, dtype=np.int64)
        targets_N = np.asarray(targets_N, dtype=np.int64)
        _check_range(previous_N, self.vocab_size, "previous tokens")
        _check_range(targets_N, self.vocab_size, "targets")
        keys_N = previous_N * self.vocab_size + targets_N
        # c(a, b) by binary search; one sentinel past the end (key -1 matches nothing) for keys beyond all.
        at_N = np.searchsorted(self.pair_keys_P, keys_N)
        found_N = np.append(self.pair_keys_P, -1)[at_N] == keys_N
        pair_N = np.where(found_N, np.append(self.pair_counts_P, 0)[at_N], 0)
        count_N, types_N = self.context_counts_V[previous_N], self.context_types_V[previous_N]
        unigram_N = self.unigram_V[targets_N]
        # T(a) = 0 exactly when c(a) = 0: the unseen context gets the unigram (the max avoids 0 / 0).
        probability_N = np.where(
            count_N > 0, (pair_N + types_N * unigram_N) / np.maximum(count_N + types_N, 1), unigram_N
        )
        return np.log(probability_N)

    def losses(self, batches: Iterable[Batch]) -> dict[str, float]:
        """{"unigram", "bigram"}: the mean -ln p (nats/token) over the targets with loss_mask 1."""
        sums = {"unigram": 0.0, "bigram": 0.0}
        weight = 0.0
        for batch in batches:
            mask_N = np.asarray(batch["loss_mask"]).reshape(-1)
            if not np.isin(mask_N, (0.0, 1.0)).all():
                raise ValueError("loss_mask: count models score whole targets; expected weights 0 or 1")
            keep_N = mask_N == 1.0
            previous_N = np.asarray(batch["inputs"]).reshape(-1)[keep_N]
            targets_N = np.asarray(batch["targets"]).reshape(-1)[keep_N]
            sums["unigram"] -= float(self.unigram_log_prob(targets_N).sum())
            sums["bigram"] -= float(self.bigram_log_prob(previous_N, targets_N).sum())
            weight += float(keep_N.sum())
        if not weight:
            raise ValueError("no target token to score (every loss_mask is 0)")
        return {name: total / weight for name, total in sums.items()}


def _check_range(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = int(tokens.min() if tokens.min() < 0 else tokens.max())
        raise ValueError(f"{what}: token id {bad} outside the vocabulary [0, {vocab_size})")


def training_tokens(config: Config, tokenizer: TokenizerInfo | None = None) -> np.ndarray:
    """All tokens of the real stream's store (data.real_stream), in store order: int32 [N]."""
    for i, stream in enumerate(config.data.streams):
        if stream.name == config.data.real_stream:
            key = f"data.streams[{i}].store"
            store = open_store(stream.store, key, config, run_tokenizer(config, tokenizer))
            return store.read_windows([0], store.num_tokens)[0]
    raise ConfigError(
        f"data.real_stream: no stream named {config.data.real_stream!r} in data.streams "
        f"({[s.name for s in config.data.streams]}): count-model baselines need the real training tokens"
    )


def heldout_baselines(config: Config, tokenizer: TokenizerInfo | None = None) -> dict[str, float]:
    """{"eval/<name>/unigram_loss", "eval/<name>/bigram_loss"} for every store of data.eval_stores, on the
    targets HeldOutLoss scores there, from count models of the real stream's store (logged as well)."""
    models = CountModels.fit(training_tokens(config, tokenizer), config.model.vocab_size)
    baselines = {}
    for name, path in config.data.eval_stores.items():
        batches, whole = eval_batches(path, config, config.train.eval_batches, tokenizer=tokenizer)  # all rows
        prefix = heldout_prefix(name, config, whole)
        for model, loss in models.losses(rows.batch for rows in batches).items():
            baselines[f"{prefix}/{model}_loss"] = loss
        log.info(
            "%s: count models of the training tokens: unigram %.4f, bigram %.4f (nats/token, same targets)",
            prefix,
            baselines[f"{prefix}/unigram_loss"],
            baselines[f"{prefix}/bigram_loss"],
        )
    return baselines
