"""The decoder: causality, document masking, rotary positions, scan/remat equivalence, parameter count."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megadoc_jax.config import MODEL_SIZES, ModelConfig
from megadoc_jax.model import Decoder, apply_rope, count_parameters, rope_angles

# fp32 compute so that equalities hold to float rounding; one bf16 test checks the dtypes.
TINY = ModelConfig(compute_dtype="float32")
B, L = 2, 16


def _inputs(seed: int = 0):
    tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, TINY.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    return tokens, positions


@functools.cache
def _model(**overrides) -> Decoder:
    return Decoder(dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(0))


@nnx.jit
def _logits(model, tokens, positions, segment_ids=None):
    return model(tokens, positions, segment_ids)


def test_logits_shape_and_dtypes_with_bf16_compute():
    model = Decoder(ModelConfig(), rngs=nnx.Rngs(0))  # bf16 compute, fp32 params
    tokens, positions = _inputs()
    x, logits = nnx.jit(lambda m, t, p: (m.hidden_states(t, p), m(t, p)))(model, tokens, positions)
    assert x.shape == (B, L, TINY.hidden) and x.dtype == jnp.bfloat16
    assert logits.shape == (B, L, TINY.vocab_size) and logits.dtype == jnp.float32
    assert model.unembed_DxV().shape == (TINY.hidden, TINY.vocab_size)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    # bf16 compute stays close to the fp32 computation of the same parameters.
    np.testing.assert_allclose(logits, _logits(_model(), tokens, positions), atol=0.05)


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = _model()
    tokens, positions = _inputs(1)
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % TINY.vocab_size)
    before, after = _logits(model, tokens, positions), _logits(model, changed, positions)
    np.testing.assert_allclose(before[:, :9], after[:, :9], atol=1e-6)
    assert not np.allclose(before[:, 9:], after[:, 9:], atol=1e-3)


def test_document_mask_isolates_documents():
    model = _model()
    tokens, _ = _inputs(2)
    # Row 0: two documents of 10 and 6 tokens, positions restart at the boundary.
    segment_ids = jnp.asarray([[1] * 10 + [2] * 6, [1] * 16], jnp.int32)
    positions = jnp.asarray([list(range(10)) + list(range(6)), list(range(16))], jnp.int32)
    changed = tokens.at[0, :10].set((tokens[0, :10] + 3) % TINY.vocab_size)
    before = _logits(model, tokens, positions, segment_ids)
    after = _logits(model, changed, positions, segment_ids)
    np.testing.assert_allclose(before[0, 10:], after[0, 10:], atol=1e-6)  # document 2 sees nothing of 1
    np.testing.assert_allclose(before[1], after[1], atol=1e-6)
    # Document 2 alone, at the start of a window, gives the same logits.
    alone = _logits(model, tokens[:1, 10:], positions[:1, 10:], segment_ids[:1, 10:])
    np.testing.assert_allclose(before[0, 10:], alone[0], atol=1e-5)
    # Without segment ids, document 2 does attend to document 1.
    unmasked = _logits(model, tokens, positions), _logits(model, changed, positions)
    assert not np.allclose(unmasked[0][0, 10:], unmasked[1][0, 10:], atol=1e-3)


def test_rotary_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(query_position: int, key_position: int) -> float:
        rope = lambda x, p: apply_rope(x, *rope_angles(jnp.full((1, 1), p), 16, TINY.rope_base))
        return float(jnp.sum(rope(q, query_position) * rope(k, key_position)))

    np.testing.assert_allclose(score(5, 2), score(105, 102), rtol=1e-4)
    np.testing.assert_allclose(score(3, 3), float(jnp.sum(q * k)), rtol=1e-5)  # rotation preserves dot
    assert abs(score(5, 2) - score(5, 4)) > 1e-3
    # The base is configurable and matters.
    angles = lambda base: rope_angles(jnp.full((1, 1), 7), 16, base)[0]
    assert not np.allclose(angles(10_000.0), angles(500_000.0))


def test_model_is_invariant_to_shifting_all_positions():
    model = _model()
    tokens, positions = _inputs(3)
    np.testing.assert_allclose(_logits(model, tokens, positions), _logits(model, tokens, positions + 11), atol=2e-5)


@functools.cache
def _loss_and_grads(**overrides):
    tokens, positions = _inputs(4)

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(tokens, positions))[..., 0])

    return nnx.jit(nnx.value_and_grad(loss))(_model(**overrides))


# Each variant against the reference (scanned, no remat): unrolled with full remat; scanned with 'dots'.
@pytest.mark.parametrize("overrides", [dict(scan_layers=False, remat="full"), dict(remat="dots")])
def test_scan_and_remat_variants_match_the_reference(overrides):
    params = lambda m: nnx.state(m, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, params(_model()), params(_model(**overrides)))  # same init
    (loss_ref, grads_ref), (loss_var, grads_var) = _loss_and_grads(), _loss_and_grads(**overrides)
    np.testing.assert_allclose(loss_ref, loss_var, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_ref, grads_var)


def _actual_parameter_count(model_or_abstract) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model_or_abstract, nnx.Param)))


def test_count_parameters_matches_the_tree():
    assert count_parameters(TINY) == _actual_parameter_count(_model())
    odd = dataclasses.replace(TINY, head_dim=24, heads=6, kv_heads=3, mlp=100)  # head_dim != hidden/heads
    assert count_parameters(odd) == _actual_parameter_count(nnx.eval_shape(lambda: Decoder(odd, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("size, approx", [("300m", 0.3e9), ("1.5b", 1.5e9)])
def test_count_parameters_of_paper_sizes_abstractly(size, approx):
    cfg = ModelConfig(size=size, **MODEL_SIZES[size])
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))  # no allocation
    assert count_parameters(cfg) == _actual_parameter_count(abstract)
    assert abs(count_parameters(cfg) - approx) / approx < 0.1


def test_bad_inputs_are_refused():
    model = _model()
    tokens, positions = _inputs()
    with pytest.raises(ValueError, match="positions"):
        model(tokens, positions[:, :-1])
    with pytest.raises(ValueError, match="segment_ids"):
        model(tokens, positions, jnp.ones((B, L + 1), jnp.int32))
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        Decoder(dataclasses.replace(TINY, attention="nope"), rngs=nnx.Rngs(0))
