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
    return config_lib.load(
        None,
        [
            "model.size=tiny",
            "model.compute_dtype=float32",
            f"model.attention={attention}",
            "data.seq_len=32",
            "data.document_masking=true",
            "train.batch_size=4",
        ],
    )


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
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


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


@pytest.mark.slow  # TPU compiles of the 300m step: about a minute each on a 2-core machine
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) is not installed")
@pytest.mark.parametrize("attention, context", [("splash", 1), ("ring", 4)])
def test_300m_at_32k_compiles_for_tpu_and_fits_a_v5e(attention, context):
    from megadoc_jax import aot

    cfg = config_lib.load(
        CONFIGS / "300m_32k.yaml",
        [
            f"model.attention={attention}",
            f"mesh.context={context}",
            f"mesh.fsdp={4 // context}",
            "mesh.data=1",
            "train.batch_size=1",
        ],
    )
    mesh = sharding.make_mesh(cfg.mesh.sizes(4), devices=aot.tpu_topology_devices("v5e:2x2"))
    start = time.perf_counter()
    setup = step_lib.train_setup(cfg, mesh, total_steps=1000)
    step = step_lib.jit_train_step(setup, cfg, step_lib.batch_sharding(mesh, cfg))
    with jax.set_mesh(mesh):
        compiled = step.lower(setup.abstract_state, step_lib.abstract_batch(mesh, cfg)).compile()
    memory = compiled.memory_analysis()
    # Donated state: the outputs reuse the arguments' buffers (alias), so they count once.
    per_device = (
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )
    print(
        f"{attention} C={context}: temp {memory.temp_size_in_bytes / 2**30:.2f} GiB, "
        f"with arguments {per_device / 2**30:.2f} GiB per device, {time.perf_counter() - start:.0f} s"
    )
    assert {d.platform for d in mesh.devices.flat} == {"tpu"}
    assert 0 < per_device < 15 * 2**30  # a v5e chip has 16 GiB of HBM (15.75 usable)
    # Both compile to Pallas kernels: splash alone, and splash as ring attention's block kernel.
    assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) is not installed")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v4:2x2x1"])
def test_ring_with_splash_blocks_compiles_for_tpu_topologies(topology):
    """Ring attention alone (fwd + bwd) at the 300m model's attention shapes, 32,768 tokens over context 4,
    with document masking: on TPU its blocks are splash kernels, and its temporaries stay local."""
    from megadoc_jax import aot
    from megadoc_jax.attention import attention

    mesh = sharding.make_mesh({"context": 4}, devices=aot.tpu_topology_devices(topology))
    shape = (1, 32_768, 12, 64)
    layout = sharding.named_sharding(mesh, ("batch", "seq", "heads", "head_dim"), shape)
    qkv = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=layout)
    seg_layout = sharding.named_sharding(mesh, ("batch", "seq"), shape[:2])
    seg = jax.ShapeDtypeStruct(shape[:2], jnp.int32, sharding=seg_layout)

    def loss(q, k, v, seg):
        return attention(q, k, v, segment_ids_BxL=seg, impl="ring").astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, seg).compile()
    assert "tpu_custom_call" in compiled.as_text()  # the splash kernels
    # Local tensors only: a [L/C, L] score strip per head in fp32 alone would be 12 GiB.
    assert compiled.memory_analysis().temp_size_in_bytes < 2 * 2**30
