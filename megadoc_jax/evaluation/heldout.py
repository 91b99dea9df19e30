"""The training loop's held-out figures: {"eval/<name>/loss": x, "eval/<name>/bpb": y} per eval store.

Built once per run: the batches of every store of data.eval_stores (batches.py: train.eval_recipe windows,
the first train.eval_batches batches or, with 0, the whole store) are read and checked at construction
(before anything compiles); each call evaluates the given parameters on all of them. Scoring, sums and
names are the evaluate command's (losses.py, loss_windows.metric_prefix), so over the whole store the loop's
`eval/<name>/loss` at a step is the number `python -m megadoc_jax.evaluate` gives for that checkpoint.
Over a part of the store the names say so: `eval/<name>/partial/loss` (the first batches only).
Bits per byte need the run's tokenizer directory (data.tokenizer); without one only the loss is logged.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
from flax import nnx

from megadoc_jax.config import Config
from megadoc_jax.data.store import TokenizerInfo
from megadoc_jax.evaluation.batches import eval_batches, heldout_prefix
from megadoc_jax.evaluation.losses import LossSums, RowScorer, score_batches
from megadoc_jax.evaluation.token_bytes import token_byte_lengths

log = logging.getLogger(__name__)


class HeldOutLoss:
    """figures = HeldOutLoss(config, graphdef, param_shardings, mesh)(params): {"<prefix>/loss", "<prefix>/bpb"}.

    One prefix per store of data.eval_stores (an empty dict without any); every process gets the same
    numbers. Raises ConfigError / StoreError at construction for a store that does not fit the run
    (tokenizer, vocabulary, fewer batches than train.eval_batches).
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
        self.sets = {}
        for name, path in config.data.eval_stores.items():
            batches, whole = eval_batches(path, config, config.train.eval_batches, tokenizer=tokenizer)
            self.sets[heldout_prefix(name, config, whole)] = batches
        self.seq_len = config.data.seq_len
        self.byte_lengths = None
        if config.data.tokenizer and self.sets:
            self.byte_lengths = token_byte_lengths(config.data.tokenizer, config.model.vocab_size)
        elif self.sets:
            log.info("held-out bits per byte: no data.tokenizer directory, only the loss is logged")
        self._scorer = RowScorer((graphdef,), (param_shardings,), mesh, config)

    def __call__(self, params: Any) -> dict[str, float]:
        figures = {}
        for prefix, batches in self.sets.items():
            sums = score_batches(self._scorer, (params,), batches, LossSums(self.seq_len, self.byte_lengths))
            values = sums.figures()
            figures[f"{prefix}/loss"] = values["loss"]
            line = f"{prefix}/loss: {values['loss']:.4f} ({values['tokens']:,} tokens)"
            if values["bpb"] is not None:
                figures[f"{prefix}/bpb"] = values["bpb"]
                line += f", {prefix}/bpb: {values['bpb']:.4f}"
            log.info("%s", line)
        return figures
