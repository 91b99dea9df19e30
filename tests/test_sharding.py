"""Mesh, the logical-axis rule table, sharded and abstract model creation on 8 fake CPU devices."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from megadoc_jax import model as model_lib
from megadoc_jax import sharding
from megadoc_jax.config import MESH_AXES, MODEL_SIZES, ModelConfig
from megadoc_jax.model import Decoder

TINY = ModelConfig(compute_dtype="float32")
SIZES = {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "tests/conftest.py sets up 8 fake CPU devices"
    return sharding.make_mesh(SIZES)


def test_make_mesh_axes_and_errors(mesh):
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == SIZES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    small = sharding.make_mesh({"tensor": 2}, devices=jax.devices()[:2])  # missing axes have size 1
    assert dict(small.shape) == {"data": 1, "fsdp": 1, "tensor": 2, "context": 1}
    with pytest.raises(ValueError, match="multiply to 4 but there are 8 devices"):
        sharding.make_mesh({"data": 4})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})


def test_logical_to_spec_follows_the_rules_and_falls_back_on_indivisible_dims():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2, "context": 1}
    assert sharding.logical_to_spec(("batch", "seq", "act_embed")) == P(("data", "fsdp"), "context", None)
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 192), sizes) == P("fsdp", "tensor")
    # 6 rows: 'data' (2) divides, 'data' x 'fsdp' (8) does not -> only 'data'.
    assert sharding.logical_to_spec(("batch", None), (6, 3), sizes) == P("data", None)
    assert sharding.logical_to_spec(("vocab", "embed"), (509, 6), sizes) == P(None, None)
    # A mesh axis is used once per array: the second 'tensor' dimension stays whole.
    assert sharding.logical_to_spec(("heads", "mlp"), (4, 4), sizes) == P("tensor", None)
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        sharding.logical_to_spec(("hidden",))
    with pytest.raises(ValueError, match="do not match the shape"):
        sharding.logical_to_spec(("embed",), (2, 2), sizes)


# The rule table applied to the tiny model (stacked layers first), written out by hand.
EXPECTED_SPECS = {
    ("embed",): P("tensor", "fsdp"),  # [vocab, embed]
    ("lm_head",): P("fsdp", "tensor"),  # [embed, vocab]
    ("final_norm", "scale"): P(None),
    ("layers", "attn_norm", "scale"): P(None, None),
    ("layers", "attention", "wq"): P(None, "fsdp", "tensor", None),
    ("layers", "attention", "wk"): P(None, "fsdp", "tensor", None),
    ("layers", "attention", "wv"): P(None, "fsdp", "tensor", None),
    ("layers", "attention", "wo"): P(None, "tensor", None, "fsdp"),
    ("layers", "mlp", "w_gate"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "w_up"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "w_down"): P(None, "tensor", "fsdp"),
    ("layers", "mlp_norm", "scale"): P(None, None),
}


def _flat(state) -> dict:
    return {path: variable.get_value() for path, variable in nnx.to_flat_state(state)}


def test_sharded_init_has_the_rule_shardings_and_the_unsharded_values(mesh):
    model = model_lib.create_sharded_model(TINY, mesh, seed=3)
    params = _flat(nnx.state(model))
    assert {path: value.sharding.spec for path, value in params.items()} == EXPECTED_SPECS
    assert all(value.sharding.mesh == mesh for value in params.values())
    wq = params[("layers", "attention", "wq")]  # [layers, 64, 4, 16] over fsdp x tensor
    assert wq.addressable_shards[0].data.shape == (2, 32, 2, 16)
    reference = _flat(nnx.state(Decoder(TINY, rngs=nnx.Rngs(3))))
    for path, value in params.items():
        np.testing.assert_allclose(value, reference[path], rtol=1e-6, atol=1e-9, err_msg=str(path))

    # The sharded model runs under the mesh, with activation constraints active, to the same logits.
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, TINY.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), (4, 8))
    forward = nnx.jit(lambda m, t, p: m(t, p))
    with jax.set_mesh(mesh):
        logits = forward(model, tokens, positions)
    assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")  # context has size 1
    unsharded_model = Decoder(TINY, rngs=nnx.Rngs(3))
    np.testing.assert_allclose(logits, forward(unsharded_model, tokens, positions), atol=1e-5)


def test_abstract_model_of_a_1_5b_model_allocates_nothing(mesh):
    cfg = ModelConfig(size="1.5b", **MODEL_SIZES["1.5b"])
    abstract = model_lib.abstract_model(cfg, mesh)
    leaves = _flat(nnx.state(abstract))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves.values())
    assert leaves[("embed",)].shape == (128_256, 1536)
    assert leaves[("embed",)].sharding == NamedSharding(mesh, P("tensor", "fsdp"))
    # 16 heads, 8 kv heads: both split over tensor=2.
    assert leaves[("layers", "attention", "wk")].sharding.spec == P(None, "fsdp", "tensor", None)
    assert {path: v.sharding.spec for path, v in leaves.items()} == EXPECTED_SPECS


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) is not installed")
def test_mesh_over_abstract_tpu_devices_for_ahead_of_time_compiles():
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices=devices)
    assert mesh.devices.size == 4 and {d.platform for d in mesh.devices.flat} == {"tpu"}
    wq = _flat(nnx.state(model_lib.abstract_model(TINY, mesh)))[("layers", "attention", "wq")]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None) and wq.sharding.mesh == mesh


def test_indivisible_parameter_dims_fall_back_to_replication():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    cfg = ModelConfig(vocab_size=510, kv_heads=2)  # 510 % 4 != 0; 2 kv heads on tensor=4
    abstract = _flat(nnx.state(model_lib.abstract_model(cfg, mesh)))
    assert abstract[("embed",)].sharding.spec == P(None, "fsdp")
    assert abstract[("layers", "attention", "wk")].sharding.spec == P(None, "fsdp", None, None)
    assert abstract[("layers", "attention", "wq")].sharding.spec == P(None, "fsdp", "tensor", None)


def test_constrain_is_a_no_op_without_a_mesh_and_shards_under_one(mesh):
    x = jnp.ones((4, 8, 6))
    assert sharding.constrain(x, ("batch", "seq", "act_embed")) is x
    f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "seq", "vocab")))
    with jax.set_mesh(mesh):
        y = f(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="logical axes"):
        jax.jit(lambda x: sharding.constrain(x, ("batch",)))(x)
