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
'context', the parameters as they lie, the scores laid out like the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
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
    model = nnx.merge(graphdef, params)

    def score(laid_out: Batch) -> Scores:
        x_BxLxD = model.hidden_states(*step_lib.model_inputs(laid_out, config.data.document_masking))
        return loss_lib.next_token_scores(x_BxLxD, model.unembed_DxV(), laid_out["targets"], greedy=greedy)

    return _in_original_order(score, batch, config)


def jit_token_scores(
    graphdef: nnx.GraphDef, param_shardings: Any, mesh: jax.sharding.Mesh, config: Config, *, greedy: bool = False
) -> Callable[[Any, Batch], Scores]:
    """token_scores compiled for [train.batch_size, data.seq_len] batches on the mesh: fn(params, batch) -> scores.

    The batch as step.global_batch places it (step.batch_sharding); the scores come back laid out the same way.
    """
    layout = step_lib.batch_sharding(mesh, config)
    jitted = jax.jit(
        functools.partial(token_scores, graphdef, config=config, greedy=greedy),
        in_shardings=(param_shardings, layout),
        out_shardings=layout,
    )

    def scores(params: Any, batch: Batch) -> Scores:
        with jax.set_mesh(mesh):  # the model's sharding constraints and the ring's shard_map read it
            return jitted(params, batch)

    return scores
