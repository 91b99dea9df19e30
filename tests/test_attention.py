"""attention(): the xla reference against numpy, GQA, masking, the backend registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megadoc_jax import attention as attention_lib
from megadoc_jax.attention import attention, registry

B, L, H, G, K = 2, 12, 4, 2, 8

# One compile per call signature instead of one per operation.
attend = jax.jit(attention, static_argnames=("causal", "impl"))


def _qkv(seed: int, kv_heads: int = G, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, L, H, K)).astype(np.float32)
    k = rng.normal(size=(B, L, kv_heads, K)).astype(np.float32)
    v = rng.normal(size=(B, L, kv_heads, K)).astype(np.float32)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _numpy_attention(q, k, v, segment_ids, causal):
    """Per head, per query: an explicit softmax over the allowed keys, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros_like(q)
    group = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            for i in range(q.shape[1]):
                allowed = [
                    j
                    for j in range(k.shape[1])
                    if (not causal or j <= i) and (segment_ids is None or segment_ids[b, j] == segment_ids[b, i])
                ]
                scores = np.array([q[b, i, h] @ k[b, j, h // group] for j in allowed]) / np.sqrt(q.shape[3])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, i, h] = sum(w * v[b, j, h // group] for w, j in zip(weights, allowed))
    return out


SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]], np.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segment_ids", [None, SEGMENTS])
def test_matches_numpy_softmax_reference(causal, segment_ids):
    q, k, v = _qkv(0)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    out = attend(q, k, v, segment_ids_BxL=seg, causal=causal)
    assert out.shape == (B, L, H, K) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, segment_ids, causal), rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
    q, k, v = _qkv(1)
    repeat = lambda a: jnp.repeat(a, H // G, axis=2)  # kv head g serves query heads g*R ... g*R + R-1
    seg = jnp.asarray(SEGMENTS)
    np.testing.assert_allclose(
        attend(q, k, v, segment_ids_BxL=seg), attend(q, repeat(k), repeat(v), segment_ids_BxL=seg), atol=1e-6
    )


def test_causal_future_keys_do_not_matter():
    q, k, v = _qkv(2)
    out = attend(q, k, v)
    k2, v2 = k.at[:, 7:].set(5.0), v.at[:, 7:].set(-3.0)
    out2 = attend(q, k2, v2)
    np.testing.assert_array_equal(out[:, :7], out2[:, :7])
    assert not np.allclose(out[:, 7:], out2[:, 7:])


def test_document_mask_isolates_segments():
    q, k, v = _qkv(3)
    seg = jnp.asarray(SEGMENTS)
    out = attend(q, k, v, segment_ids_BxL=seg, causal=False)
    # Change keys and values of segment 1 of row 0: other segments (and padding) must not move.
    in_segment_1 = jnp.asarray(SEGMENTS == 1)[:, :, None, None] & (jnp.arange(B) == 0)[:, None, None, None]
    k2, v2 = jnp.where(in_segment_1, 9.0, k), jnp.where(in_segment_1, 9.0, v)
    out2 = attend(q, k2, v2, segment_ids_BxL=seg, causal=False)
    changed = np.any(np.asarray(out) != np.asarray(out2), axis=(2, 3))
    np.testing.assert_array_equal(changed, np.asarray(in_segment_1[:, :, 0, 0]))


def test_padding_rows_are_finite_and_bf16_keeps_dtype():
    q, k, v = _qkv(4, dtype=jnp.bfloat16)
    seg = jnp.zeros((B, L), jnp.int32)  # all padding
    out = attend(q, k, v, segment_ids_BxL=seg)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))
    np.testing.assert_allclose(out.astype(jnp.float32), _numpy_attention(q32, k32, v32, None, True), atol=3e-2)


def _autodiff_reference(q, k, v, mask_BxTxS):
    """The same attention through jax.nn.dot_product_attention (XLA), differentiated by autodiff."""
    repeat = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(a, repeat, axis=2) for a in (k, v))
    mask = None if mask_BxTxS is None else mask_BxTxS[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


@pytest.mark.parametrize("kv_heads", [G, H], ids=["gqa", "mha"])
@pytest.mark.parametrize("segment_ids", [None, SEGMENTS], ids=["causal", "documents"])
def test_the_written_out_backward_matches_autodiff(kv_heads, segment_ids):
    """masked_attention's hand-written VJP against autodiff of an independent formulation, under a readout
    whose cotangent differs per element; with a fully masked query row (its keys all hidden: a uniform
    distribution whose masked scores get no gradient)."""
    q, k, v = _qkv(6, kv_heads)
    mask = attention_lib.attention_mask(L, None if segment_ids is None else jnp.asarray(segment_ids), True)
    mask = jnp.broadcast_to(mask, (B, L, L)).at[1, 5].set(False)
    readout = lambda f: lambda q, k, v: jnp.sum(jnp.sin(3.0 * f(q, k, v)))
    ours = jax.jit(
        jax.value_and_grad(readout(lambda q, k, v: attention_lib.masked_attention(q, k, v, mask)), (0, 1, 2))
    )
    reference = jax.jit(jax.value_and_grad(readout(lambda q, k, v: _autodiff_reference(q, k, v, mask)), (0, 1, 2)))
    (value, grads), (ref_value, ref_grads) = ours(q, k, v), reference(q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5)
    bf16 = [a.astype(jnp.bfloat16) for a in (q, k, v)]  # bf16 inputs: the products in bf16, the softmax in fp32
    for grad, ref_grad in zip(ours(*bf16)[1], reference(*bf16)[1]):
        assert grad.dtype == jnp.bfloat16
        np.testing.assert_allclose(grad.astype(jnp.float32), ref_grad.astype(jnp.float32), atol=0.1, rtol=0.05)


def test_unknown_backend_lists_registered_ones():
    q, k, v = _qkv(5)
    with pytest.raises(
        ValueError, match=r"unknown attention backend 'flash'.*\['all_gather', 'cudnn', 'ring', 'splash', 'xla'\]"
    ):
        attention(q, k, v, impl="flash")
    assert {"xla", "ring", "all_gather", "splash", "cudnn"} <= set(attention_lib.backends())


def test_registered_backend_receives_checked_arguments():
    calls = []

    @attention_lib.register_backend("test_recording", context_parallel=True, zigzag_layout=False)
    def recording(q, k, v, *, segment_ids_BxL, causal):
        calls.append((q.shape, k.shape, segment_ids_BxL is None, causal))
        return attention_lib.xla_attention(q, k, v, segment_ids_BxL=segment_ids_BxL, causal=causal)

    try:
        q, k, v = _qkv(6)
        np.testing.assert_array_equal(attend(q, k, v, impl="test_recording"), attend(q, k, v))
        assert calls == [((B, L, H, K), (B, L, G, K), True, True)]
        with pytest.raises(ValueError, match="already registered"):
            attention_lib.register_backend("test_recording", context_parallel=True, zigzag_layout=False)(recording)
    finally:
        registry._BACKENDS.pop("test_recording")


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((B, L, H, K), (B, L, 3, K), (B, L, 3, K)), "do not divide"),
        (((B, L, H, K), (B, L, G, K), (B, L, G, 4)), "differ"),
        (((B, L, H, K), (B, L + 1, G, K), (B, L + 1, G, K)), "differ in batch, length"),
    ],
)
def test_bad_shapes_are_refused(shapes, message):
    q, k, v = (jnp.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v)
    with pytest.raises(ValueError, match="segment_ids"):
        good = (jnp.zeros(s) for s in ((B, L, H, K), (B, L, G, K), (B, L, G, K)))
        attention(*good, segment_ids_BxL=jnp.zeros((B, L + 1)))
