"""The fused-kernel backends behind attention(): splash (Pallas interpret mode on CPU) and cudnn's
fallbacks; ring and all_gather are covered in test_ring_attention.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megadoc_jax import attention as attention_lib
from megadoc_jax import sharding
from megadoc_jax.attention import splash

B, L, H, G, K = 2, 128, 4, 2, 16  # 128: the smallest splash block


def _inputs():
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (B, L, H, K))
    k = jax.random.normal(keys[1], (B, L, G, K))
    v = jax.random.normal(keys[2], (B, L, G, K))
    segment_ids = jnp.asarray(np.repeat([[1, 1, 2, 3], [1, 2, 2, 0]], L // 4, axis=1), jnp.int32)
    return q, k, v, segment_ids


def _value_and_grads(impl, segment_ids, causal=True):
    def loss(q, k, v):
        out = attention_lib.attention(q, k, v, segment_ids_BxL=segment_ids, causal=causal, impl=impl)
        return jnp.sum(jnp.sin(out))  # a nonlinear readout: gradients differ per element

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _assert_close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= rtol * np.abs(np.asarray(y)).max()


def test_all_backends_are_registered():
    assert set(attention_lib.backends()) == {"xla", "ring", "all_gather", "splash", "cudnn"}


@pytest.mark.parametrize("segments, causal", [(True, True), (False, False)])
def test_splash_interpret_matches_reference(segments, causal):
    q, k, v, segment_ids = _inputs()
    segment_ids = segment_ids if segments else None
    reference = _value_and_grads("xla", segment_ids, causal)(q, k, v)
    _assert_close(_value_and_grads("splash", segment_ids, causal)(q, k, v), reference)


def test_splash_under_a_mesh_runs_per_device_and_refuses_context():
    q, k, v, segment_ids = _inputs()
    reference = _value_and_grads("xla", segment_ids)(q, k, v)
    with jax.set_mesh(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        _assert_close(_value_and_grads("splash", segment_ids)(q, k, v), reference)
    with jax.set_mesh(sharding.make_mesh({"data": 2, "context": 4})):
        with pytest.raises(ValueError, match="model.attention=ring"):
            _value_and_grads("splash", segment_ids)(q, k, v)


def test_splash_needs_whole_blocks():
    q, k, v, _ = _inputs()
    with pytest.raises(
        ValueError, match=r"lengths 600 \(queries\) and 600 \(keys\) must be at most 512 or multiples of 128"
    ):
        attention_lib.attention(*(jnp.concatenate([x] * 5, axis=1)[:, :600] for x in (q, k, v)), impl="splash")
    # Longer sequences take the largest block of 512, 256, 128 that divides them (ring blocks of
    # 2c and c tokens: 768 and 384 for chunks of 384).
    sizes = splash.block_sizes(768, 384)
    assert (sizes.block_q, sizes.block_kv, sizes.block_q_dkv, sizes.block_kv_dq) == (256, 384, 256, 384)
    assert splash.block_sizes(1536).block_q == 512


def test_cudnn_with_segment_ids_warns_and_falls_back_to_reference():
    q, k, v, segment_ids = _inputs()
    with pytest.warns(UserWarning, match="no segment ids"):
        out = attention_lib.attention(q, k, v, segment_ids_BxL=segment_ids, impl="cudnn")
    _assert_close(out, attention_lib.attention(q, k, v, segment_ids_BxL=segment_ids, impl="xla"), rtol=0)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal on machines without a GPU")
def test_cudnn_without_a_gpu_is_a_clear_error():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        attention_lib.attention(q, k, v, impl="cudnn")
