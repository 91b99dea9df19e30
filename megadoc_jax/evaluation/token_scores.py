"""Per-token scores of a decoder on a batch: log-probability of every target, and whether it is the argmax.

    scores = token_scores(graphdef, params, batch, config, greedy=True)
    scores["log_prob"]   # fp32 [B, L]: log softmax(logits at position t)[targets[t]]
    scores["is_greedy"]  # bool [B, L]: argmax(logits at position t) == targets[t] (lm-eval's is_greedy)

Positions are those of the batch, whatever token layout the attention backend computes in (ring and
all_gather permute the sequence into a zig-zag layout when the mesh's context axis is > 1): the batch is
put into that layout as the train step does and the scores are put back (`_in_original_order`, the one
place where evaluation handles layouts). No mask is applied: callers weight or select the tokens
(loss_mask, continuation spans, positions, segments). The logits go through loss.next_token_scores,
chunked over positions, so the full [B, L, V] logits never exist.

`jit_token_scores` compiles it sharded like the train step: rows over ('data', 'fsdp'), positions over
'context', the parameters as they lie, the scores laid out like the batch. `ensemble_token_scores` /
`jit_ensemble_token_scores` do the same for an ensemble of decoders (mean of logits or of probabilities,
combined inside loss.next_token_scores); token_scores is an ensemble of one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megadoc_jax import attention, sharding
from megadoc_jax import loss as loss_lib
from megadoc_jax import step as step_lib
from megadoc_jax.config import Config

Batch = step_lib.Batch
Scores = dict[str, jax.Array]  # per-token [B, L] arrays by name


def _in_original_order(score_fn: Callable[[Batch], Scores], batch: Batch, config: Config) -> Scores:
    """score_fn run on the batch in the attention backend's token layout, its [B, L] outputs in batch order."""
    scores = score_fn(step_lib.context_layout(batch, config))  # the layout the train step feeds the model
    inverse = attention.inverse_token_order(config.model.attention, batch["inputs"].shape[-1])
    if inverse is None:
        return scores
    original_L = jnp.asarray(inverse)

    def restore(x_BxL: jax.Array) -> jax.Array:
        return sharding.constrain(jnp.take(x_BxL, original_L, axis=-1), step_lib.BATCH_AXES)

    return jax.tree.map(restore, scores)


def token_scores(graphdef: nnx.GraphDef, params: Any, batch: Batch, config: Config, *, greedy: bool = False) -> Scores:
    """{'log_prob': fp32 [B, L]} (+ {'is_greedy': bool [B, L]} with greedy) of every target of the batch.

    batch holds 'inputs', 'targets', 'positions' and, with data.document_masking, 'segment_ids' ([B, L]);
    other [B, L] arrays (loss_mask, ...) may be there and are ignored. Call under the mesh (jax.set_mesh).
    """
    return ensemble_token_scores((graphdef,), (params,), batch, config, greedy=greedy)


def ensemble_token_scores(
    graphdefs: Sequence[nnx.GraphDef],
    params: Sequence[Any],
    batch: Batch,
    config: Config,
    *,
    greedy: bool = False,
    ensemble: str = "mean_logits",
) -> Scores:
    """token_scores of an ensemble: K decoders (any widths, one vocabulary) whose next-token distributions
    combine per `ensemble` (loss.ENSEMBLE_MODES: mean_logits, the paper's, or mean_probs) inside the chunked
    loss. Every member reads the batch in config.model.attention's token layout, so each member's own
    attention backend must declare the same layout (checked)."""
    models = [nnx.merge(g, p) for g, p in zip(graphdefs, params, strict=True)]
    length = batch["inputs"].shape[-1]
    want = attention.token_order(config.model.attention, length)
    for k, model in enumerate(models):
        order = attention.token_order(model.cfg.attention, length)
        if (order is None) != (want is None) or (order is not None and not np.array_equal(order, want)):
            raise ValueError(
                f"ensemble member {k}: attention {model.cfg.attention!r} lays tokens out unlike "
                f"model.attention={config.model.attention!r}; give all members one backend"
            )

    def score(laid_out: Batch) -> Scores:
        inputs = step_lib.model_inputs(laid_out, config.data.document_masking)
        xs = [model.hidden_states(*inputs) for model in models]
        unembeds = [model.unembed_DxV() for model in models]
        return loss_lib.next_token_scores(xs, unembeds, laid_out["targets"], greedy=greedy, ensemble=ensemble)

    return _in_original_order(score, batch, config)


def jit_token_scores(
    graphdef: nnx.GraphDef, param_shardings: Any, mesh: jax.sharding.Mesh, config: Config, *, greedy: bool = False
) -> Callable[[Any, Batch], Scores]:
    """token_scores compiled for [train.batch_size, data.seq_len] batches on the mesh: fn(params, batch) -> scores.

    The batch as step.global_batch places it (step.batch_sharding); the scores come back laid out the same way.
    """
    scores = jit_ensemble_token_scores((graphdef,), (param_shardings,), mesh, config, greedy=greedy)
    return lambda params, batch: scores((params,), batch)


def jit_ensemble_token_scores(
    graphdefs: Sequence[nnx.GraphDef],
    param_shardings: Sequence[Any],
    mesh: jax.sharding.Mesh,
    config: Config,
    *,
    greedy: bool = False,
    ensemble: str = "mean_logits",
) -> Callable[[Sequence[Any], Batch], Scores]:
    """ensemble_token_scores compiled like jit_token_scores: fn(params of each member, batch) -> scores."""
    layout = step_lib.batch_sharding(mesh, config)
    jitted = jax.jit(
        functools.partial(ensemble_token_scores, tuple(graphdefs), config=config, greedy=greedy, ensemble=ensemble),
        in_shardings=(tuple(param_shardings), layout),
        out_shardings=layout,
    )

    def scores(params: Sequence[Any], batch: Batch) -> Scores:
        with jax.set_mesh(mesh):  # the model's sharding constraints and the ring's shard_map read it
            return jitted(tuple(params), batch)

    return scores
