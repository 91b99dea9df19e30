"""The jitted train step: a pure function of (state, batch).

The train state is a plain dict of arrays, {'step', 'params', 'opt_state'}, with params as the decoder's
pure parameter dict, so that it checkpoints and reshards like any pytree. The model's structure (the NNX
graphdef) is closed over and never travels through jit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from megadoc_jax import attention, optim, sharding
from megadoc_jax import loss as loss_lib
from megadoc_jax import model as model_lib
from megadoc_jax.config import Config

Batch = dict[str, jax.Array]
State = dict[str, Any]

BATCH_AXES = ("batch", "seq")  # logical axes of every [B, L] batch array


def init_state(params: Any, tx: optax.GradientTransformation) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a run needs besides the state's values: built abstractly, so nothing is allocated."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: dict[str, Any]
    abstract_state: State  # ShapeDtypeStructs with shardings: the target of a restore, or of an AOT compile

    @property
    def num_parameters(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.abstract_state["params"]))


def train_setup(config: Config, mesh: jax.sharding.Mesh, total_steps: int) -> TrainSetup:
    """Raises config.ConfigError where model.attention does not fit the mesh (attention.check_mesh): every
    path (train, dry run, AOT compiles) builds its setup here before compiling anything."""
    attention.check_mesh(config.model.attention, config.data.seq_len, dict(mesh.shape))
    graphdef, params = nnx.split(model_lib.abstract_model(config.model, mesh, config.train.seed))
    params = nnx.to_pure_dict(params)
    tx, schedule = optim.make_optimizer(config.optim, total_steps)
    shardings = state_shardings(params, tx)
    abstract_state = jax.tree.map(
        lambda s, layout: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=layout),
        jax.eval_shape(lambda p: init_state(p, tx), params),
        shardings,
    )
    return TrainSetup(graphdef, tx, schedule, shardings, abstract_state)


def initial_state(setup: TrainSetup, config: Config, mesh: jax.sharding.Mesh) -> State:
    """Freshly initialised parameters and optimizer state, each device creating only its shards."""
    params = nnx.to_pure_dict(nnx.state(model_lib.create_sharded_model(config.model, mesh, config.train.seed)))
    return jax.jit(lambda p: init_state(p, setup.tx), out_shardings=setup.state_shardings)(params)


def jit_train_step(setup: TrainSetup, config: Config, batch_layout: jax.sharding.Sharding) -> Callable:
    """The train step with explicit shardings in and out, the old state's buffers donated."""
    return jax.jit(
        make_train_step(setup.graphdef, setup.tx, setup.schedule, config),
        in_shardings=(setup.state_shardings, batch_layout),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=(0,),
    )


def model_inputs(batch: Batch, document_masking: bool) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    segment_ids = batch["segment_ids"] if document_masking else None
    return batch["inputs"], batch["positions"], segment_ids


def context_layout(batch: Batch, config: Config) -> Batch:
    """The batch in the token layout that the attention backend declares (attention.token_order): the
    zig-zag layout of ring / all_gather when context > 1, else the batch as it is.

    One permutation of the sequence axis for every [B, L] array (tokens, positions, segment ids, targets,
    loss mask), so each token keeps its target and mask. The loss is a sum over tokens and is not
    un-permuted; per-token outputs go back to the original order with attention.inverse_token_order.
    """
    order = attention.token_order(config.model.attention, batch["inputs"].shape[-1])
    if order is None:
        return batch
    order_L = jnp.asarray(order)
    permute = lambda x_BxL: sharding.constrain(jnp.take(x_BxL, order_L, axis=-1), BATCH_AXES)
    return jax.tree.map(permute, batch)


def loss_sums(graphdef: nnx.GraphDef, params: Any, batch: Batch, config: Config) -> dict[str, jax.Array]:
    """Summed (not averaged) losses of one microbatch, so microbatches add up exactly."""
    model = nnx.merge(graphdef, params)
    batch = context_layout(batch, config)
    x_BxLxD = model.hidden_states(*model_inputs(batch, config.data.document_masking))
    return loss_lib.next_token_loss(
        x_BxLxD,
        model.unembed_DxV(),
        batch["targets"],
        batch["loss_mask"],
        z_loss=config.train.z_loss,
    )


def _split_microbatches(batch: Batch, microbatches: int) -> Batch:
    """[B, L] -> [M, B/M, L], taking rows i*M + m into microbatch m so each device keeps its own rows."""

    def split(x_BxL: jax.Array) -> jax.Array:
        b = x_BxL.shape[0]
        x_NxMxL = x_BxL.reshape(b // microbatches, microbatches, *x_BxL.shape[1:])
        x_MxNxL = jnp.swapaxes(x_NxMxL, 0, 1)
        return sharding.constrain(x_MxNxL, (None, *BATCH_AXES))

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule, config: Config
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """Returns train_step(state, batch) -> (state, metrics); jit it with shardings in the caller."""
    microbatches = config.train.microbatches

    def total_loss(params: Any, micro: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        sums = loss_sums(graphdef, params, micro, config)
        return sums["loss_sum"] + sums["z_loss_sum"], sums

    grad_fn = jax.grad(total_loss, has_aux=True)

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        params = state["params"]

        def accumulate(carry: tuple[Any, dict], micro: Batch) -> tuple[tuple[Any, dict], None]:
            grads_sum, sums = carry
            grads, micro_sums = grad_fn(params, micro)
            return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, sums, micro_sums)), None

        zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "z_loss_sum", "weight_sum")}
        zero_grads = jax.tree.map(jnp.zeros_like, params)
        if microbatches == 1:
            (grads, sums), _ = accumulate((zero_grads, zero_sums), batch)
        else:
            micro_batches = _split_microbatches(batch, microbatches)
            (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), micro_batches)

        # The token-weighted mean over the whole batch, however it was split into microbatches.
        weight = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = sums["loss_sum"] / weight
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite step leaves the state untouched: the host sees `finite` and stops the run, and the
        # last good state is what remains (and what the last checkpoint holds).
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "step": state["step"] + finite.astype(jnp.int32),
            "params": keep(new_params, params),
            "opt_state": keep(new_opt_state, state["opt_state"]),
        }
        metrics = {
            "loss": loss,
            "z_loss": sums["z_loss_sum"] / weight,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "tokens": sums["weight_sum"],
            "finite": finite,
        }
        return new_state, metrics

    return train_step


def state_shardings(params: Any, tx: optax.GradientTransformation) -> dict[str, Any]:
    """Shardings of the whole train state: optimizer moments follow their parameters, scalars replicate.

    `params` may be concrete sharded arrays or abstract ShapeDtypeStructs with shardings (dry run).
    """
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding_of_param: sharding_of_param,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}


def global_batch(local_batch: dict[str, Any], batch_sharding: jax.sharding.Sharding) -> Batch:
    """Assembles each process's rows into the global [B, L] arrays that the step expects."""
    return {
        key: jax.make_array_from_process_local_data(batch_sharding, np_array) for key, np_array in local_batch.items()
    }


def batch_sharding(mesh: jax.sharding.Mesh, config: Config) -> jax.sharding.NamedSharding:
    """How every [B, L] batch array is laid out: rows over the data axes, positions over context."""
    return sharding.named_sharding(mesh, BATCH_AXES, (config.train.batch_size, config.data.seq_len))


def abstract_batch(mesh: jax.sharding.Mesh, config: Config) -> Batch:
    """ShapeDtypeStructs of one global batch (Contract 2 of docs/architecture.md), for AOT compiles."""
    shape, layout = (config.train.batch_size, config.data.seq_len), batch_sharding(mesh, config)
    dtypes = {
        "inputs": jnp.int32,
        "targets": jnp.int32,
        "positions": jnp.int32,
        "segment_ids": jnp.int32,
        "loss_mask": jnp.float32,
    }
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=layout) for key, dtype in dtypes.items()}
