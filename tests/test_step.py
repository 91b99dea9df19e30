"""The train step: gradient accumulation equals one big batch; sharded and unsharded steps agree."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megadoc_jax import config as config_lib
from megadoc_jax import model as model_lib
from megadoc_jax import optim, sharding
from megadoc_jax import step as step_lib


def tiny_config(*overrides: str) -> config_lib.Config:
    return config_lib.load(
        None,
        [
            "model.size=tiny",
            "model.compute_dtype=float32",
            "data.seq_len=16",
            "train.batch_size=8",
            "train.z_loss=1e-4",
            "data.document_masking=true",
            *overrides,
        ],
    )


def random_batch(config: config_lib.Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, length = config.train.batch_size, config.data.seq_len
    tokens = rng.integers(0, config.model.vocab_size, (b, length + 1), dtype=np.int32)
    segment_ids = np.cumsum(rng.random((b, length)) < 0.1, axis=1, dtype=np.int32) + 1
    loss_mask = (rng.random((b, length)) < 0.8).astype(np.float32)  # uneven token counts per microbatch
    positions = np.tile(np.arange(length, dtype=np.int32), (b, 1))
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": loss_mask,
    }


@functools.cache
def initial_model(model_config: config_lib.ModelConfig):
    """(graphdef, params) of a freshly initialised decoder; built once per model config (init compiles)."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, jax.devices()[:1])
    graphdef, params = nnx.split(model_lib.create_sharded_model(model_config, mesh, 0))
    return graphdef, nnx.to_pure_dict(params)


def one_step(config: config_lib.Config, batch):
    graphdef, params = initial_model(config.model)
    tx, schedule = optim.make_optimizer(config.optim, 10)
    train_step = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, config))
    state, metrics = train_step(step_lib.init_state(params, tx), jax.tree.map(jnp.asarray, batch))
    return params, state, metrics


def test_gradient_accumulation_equals_the_whole_batch():
    # eps=1 makes the first AdamW update about lr * gradient (instead of lr * sign(gradient)), so the
    # parameter updates compare the gradients themselves.
    linear = ("optim.eps=1.0", "optim.weight_decay=0.0")
    config = tiny_config(*linear)
    batch = random_batch(config)
    initial, whole_state, whole = one_step(config, batch)
    _, accumulated_state, accumulated = one_step(tiny_config("train.microbatches=4", *linear), batch)
    for key in ("loss", "z_loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(accumulated[key], whole[key], rtol=1e-5)
    assert float(whole["tokens"]) == batch["loss_mask"].sum()
    updates = [jax.tree.map(jnp.subtract, s["params"], initial) for s in (accumulated_state, whole_state)]
    for a, b in zip(*map(jax.tree.leaves, updates)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-8)  # atol: a few float32 ulps of the weights
        assert np.abs(b).max() > 0


def test_document_masking_changes_the_loss_only_when_enabled():
    batch = random_batch(tiny_config())
    *_, masked = one_step(tiny_config(), batch)
    *_, unmasked = one_step(tiny_config("data.document_masking=false"), batch)
    *_, unmasked_one_doc = one_step(
        tiny_config("data.document_masking=false"), {**batch, "segment_ids": np.ones_like(batch["segment_ids"])}
    )
    assert abs(float(masked["loss"]) - float(unmasked["loss"])) > 1e-6
    np.testing.assert_allclose(unmasked["loss"], unmasked_one_doc["loss"], rtol=1e-6)


def test_sharded_step_matches_one_device():
    config = tiny_config("train.microbatches=2")
    batch = random_batch(config, seed=1)
    *_, expected = one_step(config, batch)

    mesh = sharding.make_mesh(
        config_lib.validate_for_devices(config_lib.load(None, ["mesh.fsdp=2", "mesh.tensor=2"]), 8)
    )
    setup = step_lib.train_setup(config, mesh, 10)
    state = step_lib.initial_state(setup, config, mesh)
    layout = step_lib.batch_sharding(mesh, config)
    with jax.set_mesh(mesh):
        state, metrics = step_lib.jit_train_step(setup, config, layout)(state, step_lib.global_batch(batch, layout))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[key], expected[key], rtol=2e-5)
    assert state["params"]["lm_head"].sharding.spec == setup.state_shardings["params"]["lm_head"].spec
