"""The held-out loss of a run: the mean next-token loss on each named eval store, {"eval/<name>/loss": x}.

Built once per run: the first train.eval_batches batches of every store of data.eval_stores, in the run's
own window layout (data.windows, as in training: eval_batches), are read and checked at construction
(before anything compiles); each call evaluates the given parameters on all of them. The scoring and the
sums are those of the evaluate command (losses.py: per-token scores, float64 sums on the host over the
loss_mask's targets, divided once), so the loss is the token-weighted mean however the batches fall.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
from flax import nnx

from megadoc_jax.config import Config
from megadoc_jax.data.store import TokenizerInfo
from megadoc_jax.evaluation.batches import eval_batches
from megadoc_jax.evaluation.loss_windows import RowBatch
from megadoc_jax.evaluation.losses import LossSums, RowScorer, score_batches

log = logging.getLogger(__name__)


class HeldOutLoss:
    """losses = HeldOutLoss(config, graphdef, param_shardings, mesh)(params): {"eval/<name>/loss": float}.

    One entry per store of data.eval_stores (an empty dict without any); every process gets the same numbers.
    Raises ConfigError / StoreError at construction for a store that does not fit the run (tokenizer,
    vocabulary, fewer than train.eval_batches x train.batch_size windows).
    """

    def __init__(
        self,
        config: Config,
        graphdef: nnx.GraphDef,
        param_shardings: Any,
        mesh: jax.sharding.Mesh,
        *,
        tokenizer: TokenizerInfo | None = None,
    ) -> None:
        # Small and fixed: read once, checked here. Every process holds the whole batches (the scorer hands
        # over its own rows and gathers the scores), so every process adds up the same numbers.
        self.sets = {
            name: [RowBatch(b) for b in eval_batches(path, config, config.train.eval_batches, tokenizer=tokenizer)]
            for name, path in config.data.eval_stores.items()
        }
        self.seq_len = config.data.seq_len
        self._scorer = RowScorer((graphdef,), (param_shardings,), mesh, config)

    def __call__(self, params: Any) -> dict[str, float]:
        losses = {}
        for name, batches in self.sets.items():
            sums = score_batches(self._scorer, (params,), batches, LossSums(self.seq_len))
            losses[f"eval/{name}/loss"] = sums.mean_loss
            log.info("eval/%s/loss: %.4f", name, losses[f"eval/{name}/loss"])
        return losses
