"""The held-out loss of a run: the mean next-token loss on each named eval store, {"eval/<name>/loss": x}.

Built once per run: the first train.eval_batches batches of every store of data.eval_stores are read and
checked at construction (before anything compiles), then placed on the mesh; each call evaluates the
given parameters on all of them. The loss is the train step's own (step.loss_sums: same layout, same
chunked loss), summed over the batches and divided once by the number of target tokens, so it is the
token-weighted mean however the batches fall.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from megadoc_jax import step as step_lib
from megadoc_jax.config import Config
from megadoc_jax.data.store import TokenizerInfo
from megadoc_jax.evaluation.batches import eval_batches

log = logging.getLogger(__name__)


def _loss_step(graphdef: nnx.GraphDef, config: Config) -> Callable[[Any, step_lib.Batch], dict[str, jax.Array]]:
    """eval_step(params, batch) -> {'loss_sum', 'weight_sum'} (fp32 scalars): sum over batches, then divide."""

    def eval_step(params: Any, batch: step_lib.Batch) -> dict[str, jax.Array]:
        sums = step_lib.loss_sums(graphdef, params, batch, config)
        return {"loss_sum": sums["loss_sum"], "weight_sum": sums["weight_sum"]}

    return eval_step


class HeldOutLoss:
    """losses = HeldOutLoss(config, graphdef, param_shardings, mesh)(params): {"eval/<name>/loss": float}.

    One entry per store of data.eval_stores (an empty dict without any). Each process reads only its rows;
    every process gets the same numbers. Raises ConfigError / StoreError at construction for a store that
    does not fit the run (tokenizer, vocabulary, fewer than train.eval_batches x train.batch_size windows).
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
        local_sets = {  # small and fixed: read once, checked here
            name: eval_batches(
                path,
                config,
                config.train.eval_batches,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                tokenizer=tokenizer,
            )
            for name, path in config.data.eval_stores.items()
        }
        layout = step_lib.batch_sharding(mesh, config)
        self.mesh = mesh
        self.sets = {name: [step_lib.global_batch(b, layout) for b in batches] for name, batches in local_sets.items()}
        self._step = jax.jit(_loss_step(graphdef, config), in_shardings=(param_shardings, layout))

    def __call__(self, params: Any) -> dict[str, float]:
        losses = {}
        with jax.set_mesh(self.mesh):
            for name, batches in self.sets.items():
                sums = jax.device_get([self._step(params, batch) for batch in batches])
                loss_sum, weight_sum = (sum(float(s[k]) for s in sums) for k in ("loss_sum", "weight_sum"))
                losses[f"eval/{name}/loss"] = loss_sum / max(weight_sum, 1.0)
                log.info("eval/%s/loss: %.4f", name, losses[f"eval/{name}/loss"])
        return losses
