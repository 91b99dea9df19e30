"""Backend declarations: a toy backend registered from outside the package (tests/toy_attention.py), and
the config check and the train step's token layout, which read the declarations instead of names."""

import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_step import one_step, random_batch, tiny_config

from megadoc_jax import attention, sharding, train
from megadoc_jax import config as config_lib
from megadoc_jax import step as step_lib
from megadoc_jax.attention import registry
from megadoc_jax.config import ConfigError
from megadoc_jax.model import Decoder


@pytest.fixture(scope="module", autouse=True)
def toy_attention():
    """Imports tests/toy_attention.py, which registers "toy"; unregistered afterwards, since other test
    files check the exact set of built-in backends."""
    yield importlib.import_module("toy_attention")
    registry._BACKENDS.pop("toy")
    del sys.modules["toy_attention"]


def test_builtin_backends_declare_what_they_need():
    declared = {
        name: (spec.context_parallel, spec.zigzag_layout)
        for name in attention.backends()
        if (spec := attention.get_backend(name)).name != "toy"
    }
    assert declared == {
        "xla": (True, False),
        "ring": (True, True),
        "all_gather": (True, True),
        "splash": (False, False),
        "cudnn": (False, False),
    }
    with pytest.raises(ValueError, match="zigzag_layout needs context_parallel"):
        attention.register_backend("bad", context_parallel=False, zigzag_layout=True)
    assert "bad" not in attention.backends()


def test_toy_backend_from_one_file_runs_in_the_decoder_and_matches_xla(toy_attention):
    spec = attention.get_backend("toy")
    assert (spec.fn, spec.context_parallel, spec.zigzag_layout) == (toy_attention.toy_attention, True, True)
    config = tiny_config()
    batch = jax.tree.map(jnp.asarray, random_batch(config))
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    reference = Decoder(config.model, rngs=nnx.Rngs(0))(*args)
    toy = Decoder(tiny_config("model.attention=toy").model, rngs=nnx.Rngs(0))
    assert toy.layers.attention.impl == "toy"
    np.testing.assert_allclose(toy(*args), reference, rtol=1e-5, atol=1e-5)


def test_a_layout_backend_gets_the_zigzag_batch_in_the_train_step_on_a_context_mesh():
    config = tiny_config("model.attention=toy")
    batch = random_batch(config, seed=2)
    *_, expected = one_step(tiny_config(), batch)  # xla on one device, tokens in their order

    mesh = sharding.make_mesh({"data": 4, "context": 2})
    setup = step_lib.train_setup(config, mesh, 10)
    state = step_lib.initial_state(setup, config, mesh)
    layout = step_lib.batch_sharding(mesh, config)
    global_batch = step_lib.global_batch(batch, layout)
    with jax.set_mesh(mesh):
        _, metrics = step_lib.jit_train_step(setup, config, layout)(state, global_batch)
        permuted = jax.jit(lambda b: step_lib.context_layout(b, config))(global_batch)
        unchanged = step_lib.context_layout(global_batch, tiny_config())  # xla declares no layout
    # toy undoes the layout inside: had the step not permuted the batch, its attention would scramble.
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[key], expected[key], rtol=2e-5)
    order = attention.zigzag_order(config.data.seq_len, 2)
    for key, x_BxL in batch.items():
        np.testing.assert_array_equal(permuted[key], x_BxL[:, order])
    assert unchanged is global_batch


def test_token_order_and_its_inverse():
    length = 16
    order = attention.token_order("ring", length, context=2)
    inverse = attention.inverse_token_order("ring", length, context=2)
    np.testing.assert_array_equal(order, attention.zigzag_order(length, 2))
    x_BxL = np.arange(2 * length).reshape(2, length)
    np.testing.assert_array_equal(x_BxL[:, order][:, inverse], x_BxL)  # per-token outputs back in order
    assert attention.token_order("xla", length, context=2) is None
    assert attention.inverse_token_order("ring", length, context=1) is None
    with jax.set_mesh(sharding.make_mesh({"data": 2, "context": 4})):  # default: the mesh's context axis
        np.testing.assert_array_equal(attention.token_order("all_gather", length), attention.zigzag_order(length, 4))
    assert attention.token_order("ring", length) is None  # no mesh


@pytest.mark.parametrize(
    "impl, seq_len, context, message",
    [
        (
            "ring",
            36,
            4,
            r"data.seq_len: 36 is not divisible by 2 \* mesh.context = 8, which model.attention='ring' "
            r"needs for its load-balanced \(zig-zag\) layout",
        ),
        ("toy", 36, 4, r"data.seq_len: .*model.attention='toy'.*zig-zag"),
        (
            "splash",
            64,
            2,
            r"mesh.context: 2, but attention backend 'splash' does not split the sequence; with "
            r"mesh.context > 1 use model.attention=ring",
        ),
        ("cudnn", 64, 2, r"mesh.context: .*'cudnn' does not split"),
        ("flash", 64, 1, r"model.attention: unknown attention backend 'flash'"),
    ],
)
def test_check_mesh_names_the_key(impl, seq_len, context, message):
    with pytest.raises(ConfigError, match=message):
        attention.check_mesh(impl, seq_len, {"data": 8 // context, "context": context})


@pytest.mark.parametrize(
    "impl, seq_len, context", [("ring", 40, 4), ("xla", 36, 4), ("splash", 36, 1), ("ring", 36, 1)]
)
def test_check_mesh_accepts_what_the_backend_declares(impl, seq_len, context):
    attention.check_mesh(impl, seq_len, {"data": 8 // context, "context": context})


def test_train_setup_and_the_dry_run_report_the_layout_as_a_config_error(capsys):
    overrides = ["mesh.data=2", "mesh.context=4", "model.attention=ring", "data.seq_len=36"]
    config = config_lib.load("configs/tiny.yaml", overrides)
    mesh = sharding.make_mesh(config_lib.validate_for_devices(config, 8))  # the mesh itself is fine
    with pytest.raises(ConfigError, match="zig-zag"):
        step_lib.train_setup(config, mesh, 10)
    assert train.main(["--config", "configs/tiny.yaml", "--dry-run", *overrides]) == 2
    assert "config error: data.seq_len: 36 is not divisible by 2 * mesh.context = 8" in capsys.readouterr().err


def test_backends_are_refused_on_a_context_mesh_by_their_declaration():
    q = jnp.zeros((2, 16, 2, 8))
    with jax.set_mesh(sharding.make_mesh({"data": 2, "context": 4})):
        with pytest.raises(ValueError, match="'cudnn' does not split the sequence"):
            attention.attention(q, q, q, impl="cudnn")
