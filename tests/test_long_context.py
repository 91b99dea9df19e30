"""Long-context training: a ring-attention train step on a (data 2, context 4) mesh against the same
step on one device; the long-context configs; the 300m model at 32,768 tokens compiled for TPU."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from megadoc_jax import config as config_lib
from megadoc_jax import sharding
from megadoc_jax import step as step_lib
from megadoc_jax.model import Decoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LR = 0.5  # plain SGD: the parameter change is exactly -LR x gradient


def _tiny_config(attention: str) -> config_lib.Config:
    return config_lib.load(None, [
        "model.size=tiny", "model.compute_dtype=float32", f"model.attention={attention}",
        "data.seq_len=32", "data.document_masking=true", "train.batch_size=4",
    ])  # fmt: skip


def _batch(cfg: config_lib.Config) -> dict[str, np.ndarray]:
    """Documents that cross shard boundaries, positions restarting per document, padding at the end."""
    rng = np.random.default_rng(0)
    b, length = cfg.train.batch_size, cfg.data.seq_len
    tokens = rng.integers(1, cfg.model.vocab_size, (b, length + 1), dtype=np.int32)
    segment_ids = np.zeros((b, length), np.int32)
    positions = np.zeros((b, length), np.int32)
    for row in range(b):
        bounds = np.sort(rng.choice(np.arange(1, length - 4), 2, replace=False))
        end = length - 3 * row  # rows end in 0, 3, 6, 9 padding tokens
        for doc, (start, stop) in enumerate(zip([0, *bounds], [*bounds, end])):
            segment_ids[row, start:stop] = doc + 1
            positions[row, start:stop] = np.arange(stop - start)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "segment_ids": segment_ids, "loss_mask": (segment_ids > 0).astype(np.float32)}  # fmt: skip


def _one_step(cfg, mesh):
    model = Decoder(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = optax.sgd(LR)
    step = step_lib.make_train_step(graphdef, tx, optax.constant_schedule(LR), cfg)
    state = step_lib.init_state(params, tx)
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg).items()}
    if mesh is None:
        new_state, metrics = jax.jit(step)(state, batch)
    else:
        with jax.set_mesh(mesh):
            batch = jax.device_put(batch, step_lib.batch_sharding(mesh, cfg))
            new_state, metrics = jax.jit(step)(state, batch)
    grads = jax.tree.map(lambda old, new: (old - new) / LR, params, new_state["params"])
    return metrics, grads


def test_ring_train_step_on_data2_context4_equals_one_device():
    metrics_1, grads_1 = _one_step(_tiny_config("xla"), None)
    mesh = sharding.make_mesh({"data": 2, "context": 4})
    metrics_r, grads_r = _one_step(_tiny_config("ring"), mesh)
    np.testing.assert_allclose(metrics_r["loss"], metrics_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_r["tokens"], metrics_1["tokens"])
    np.testing.assert_allclose(metrics_r["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
    for path, g1 in nnx.traversals.flatten_mapping(grads_1).items():
        g_r = nnx.traversals.flatten_mapping(grads_r)[path]
        scale = max(float(np.abs(g1).max()), 1e-12)
        assert float(np.abs(np.asarray(g_r) - g1).max()) <= 1e-4 * scale, path


@pytest.mark.parametrize("name, length", [("300m_32k", 32_768), ("300m_64k", 65_536)])
def test_long_context_configs(name, length):
    cfg = config_lib.load(CONFIGS / f"{name}.yaml")
    assert cfg.data.seq_len == length and cfg.data.windows == "document"
    assert cfg.model.attention == "ring" and cfg.mesh.context > 1
    assert cfg.model.rope_base == 500_000 and cfg.model.size == "300m"
    assert cfg.data.seq_len % (2 * cfg.mesh.context) == 0  # the zig-zag layout's chunks


@pytest.mark.slow  # TPU compiles of the 300m step: minutes each on a loaded 2-core machine
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) is not installed")
@pytest.mark.parametrize("attention, context", [("splash", 1), ("ring", 4)])
def test_300m_at_32k_compiles_for_tpu_and_fits(attention, context):
    from megadoc_jax import aot

    cfg = config_lib.load(CONFIGS / "300m_32k.yaml", [
        f"model.attention={attention}", f"mesh.context={context}", f"mesh.fsdp={4 // context}",
        "mesh.data=1", "train.batch_size=1",
    ])  # fmt: skip
    mesh = sharding.make_mesh(cfg.mesh.sizes(4), devices=aot.tpu_topology_devices("v5p:2x2x1"))
    start = time.perf_counter()
    model = sharding.abstract_model(cfg.model, mesh)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(1e-3)
    state_shardings = step_lib.state_shardings(params, tx)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, state_shardings)
    step = step_lib.make_train_step(graphdef, tx, optax.constant_schedule(1e-3), cfg)
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, in_shardings=(state_shardings, step_lib.batch_sharding(mesh, cfg)),
                           donate_argnums=(0,)).lower(state, step_lib.abstract_batch(mesh, cfg)).compile()
    memory = compiled.memory_analysis()
    per_device = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    print(f"{attention} C={context}: temp {memory.temp_size_in_bytes / 2**30:.2f} GiB, "
          f"total {per_device / 2**30:.2f} GiB per device, {time.perf_counter() - start:.0f} s")  # fmt: skip
    assert {d.platform for d in mesh.devices.flat} == {"tpu"}
    # Fits a v5p chip's 95 GiB of HBM. (On v5e's 16 GiB the ring step at C=4 does not fit yet:
    # docs/attention.md, "Open issue".)
    assert 0 < per_device < 95 * 2**30
