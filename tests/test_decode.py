"""KV-cache decoding against the Decoder's full forward pass (no cache): logits at every step, tokens for
the same keys, right and left padding, batch independence, top-k / top-p, EOS, a 2-device mesh."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megadoc_jax import decode, sharding
from megadoc_jax import model as model_lib
from megadoc_jax.config import ModelConfig
from megadoc_jax.model import Decoder

# init_std 0.3: logits spread over several nats, so that sampling is far from uniform and a wrong
# position or mask shows in the logits.
CFG = ModelConfig(size="tiny", vocab_size=2048, compute_dtype="float32", init_std=0.3)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [300, 4, 5], [7]]


REFERENCE_WIDTH = 32


@pytest.fixture(scope="module")
def model() -> Decoder:
    return Decoder(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def compiled(model):
    """Jitted prefill, decode step and the reference forward pass, compiled once for the module."""
    graphdef, params = nnx.split(model)
    prefill = jax.jit(lambda *a: decode.prefill(nnx.merge(graphdef, params), *a))
    step = jax.jit(lambda *a: decode.decode_step(nnx.merge(graphdef, params), *a))
    positions = lambda tokens_BxL: jnp.zeros_like(tokens_BxL) + jnp.arange(tokens_BxL.shape[1])  # noqa: E731
    forward = jax.jit(lambda tokens_BxL: nnx.merge(graphdef, params)(tokens_BxL, positions(tokens_BxL)))
    sample = jax.jit(categorical_reference, static_argnames="sampling")
    return prefill, step, forward, sample


def categorical_reference(logits_BxV, keys_B, step, sampling: decode.SamplingConfig) -> jax.Array:
    """The draw decode.sample_tokens made before its own argmax (first_max_index): jax.random.categorical
    itself. Sampling against it pins a seed's tokens to what they were."""

    def one(logits_V, key):
        return jax.random.categorical(jax.random.fold_in(key, step), decode.filter_logits(logits_V, sampling))

    return jax.vmap(one)(logits_BxV, keys_B).astype(jnp.int32)


def full_forward_logits(forward, prefixes: list[list[int]]) -> np.ndarray:
    """The reference without cache: the Decoder over each whole prefix, logits [B, V] of its last token.
    Prefixes are right-padded to one width so one program serves all; causality keeps the padding out."""
    tokens_BxL = np.zeros((len(prefixes), REFERENCE_WIDTH), np.int32)
    for row, prefix in enumerate(prefixes):
        tokens_BxL[row, : len(prefix)] = prefix
    logits_BxLxV = np.asarray(forward(jnp.asarray(tokens_BxL)))
    return np.stack([logits_BxLxV[row, len(prefix) - 1] for row, prefix in enumerate(prefixes)])


def test_cached_logits_equal_the_full_forward_pass_at_every_step(compiled):
    prefill, step, forward, _ = compiled
    for padding in ("right", "left"):
        tokens_BxP, start_B, next_B = decode.pad_prompts(PROMPTS, 12, padding, pad_id=0)
        logits_BxV, cache = prefill(tokens_BxP, start_B, next_B, decode.init_cache(CFG, len(PROMPTS), 12 + 6))
        prefixes = [list(p) for p in PROMPTS]
        for _ in range(6):
            expected_BxV = full_forward_logits(forward, prefixes)
            np.testing.assert_allclose(np.asarray(logits_BxV), expected_BxV, atol=2e-5, rtol=1e-5)
            # Different tokens per row, as sampling would give.
            next_tokens = [(7 * len(p) + 31 * row) % CFG.vocab_size for row, p in enumerate(prefixes)]
            for prefix, token in zip(prefixes, next_tokens):
                prefix.append(token)
            logits_BxV, cache = step(jnp.asarray(next_tokens, jnp.int32), cache)
        assert logits_BxV.dtype == jnp.float32 and len(cache.keys_BxGxSxK) == CFG.layers
        assert cache.keys_BxGxSxK[0].shape == (len(PROMPTS), CFG.kv_heads, 12 + 6, CFG.head_size)
        assert {k.dtype for k in cache.keys_BxGxSxK + cache.values_BxGxSxK} == {jnp.dtype(jnp.float32)}


def reference_samples(compiled, prompts, seeds, sampling, max_new: int, eos: tuple[int, ...], forwards=None):
    """Sampling without a cache: the full forward pass over each prefix every step, the same keys. With
    `forwards` (one per ensemble member), the mean of their logits is sampled."""
    _, _, forward, sample = compiled
    forwards = forwards or [forward]
    keys_B = decode.seed_keys(seeds)
    prefixes = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    reasons = [decode.FINISH_LENGTH] * len(prompts)
    for step in range(max_new):
        logits_BxV = jnp.asarray(np.mean([full_forward_logits(f, prefixes) for f in forwards], axis=0))
        tokens_B = np.asarray(sample(logits_BxV, keys_B, jnp.int32(step), sampling=sampling))
        for row, token in enumerate(tokens_B.tolist()):
            if reasons[row] == decode.FINISH_STOP:
                continue
            prefixes[row].append(token)
            outputs[row].append(token)
            reasons[row] = decode.FINISH_STOP if token in eos else reasons[row]
    return [decode.Generated(tuple(out), reason) for out, reason in zip(outputs, reasons)]


def test_samples_equal_the_reference_decoding_without_cache(model, compiled):
    sampling = decode.SamplingConfig(temperature=1.0, top_k=200, top_p=0.95)
    eos = (17,)
    sampler = decode.Sampler(model, eos)
    seeds = [2**55 + 3, 11, 12]  # 56-bit seeds, as generate.py's document_seed gives
    generated = sampler.generate(PROMPTS, seeds, sampling, max_new_tokens=12, width=16)
    assert generated == reference_samples(compiled, PROMPTS, seeds, sampling, 12, eos)
    # The same key gives the same tokens whatever the batch: other batch mates, left padded.
    moved = sampler.generate(PROMPTS[::-1], [5, 6, seeds[0]], sampling, 12, width=16, padding="left")
    assert moved[2] == generated[0]
    # Different seeds for one prompt (the G samples of a document): different samples.
    same_prompt = sampler.generate([PROMPTS[1]] * 3, [100, 101, 102], sampling, 12, width=16)
    assert len({s.token_ids for s in same_prompt}) == 3


def test_eos_stops_a_row_and_is_kept(model):
    sampling = decode.SamplingConfig()
    half = tuple(range(0, CFG.vocab_size, 2))  # every even token ends a sample: most rows stop early
    generated = decode.Sampler(model, half).generate(PROMPTS * 3, list(range(9)), sampling, max_new_tokens=8, width=16)
    reasons = {s.finish_reason for s in generated}
    assert decode.FINISH_STOP in reasons
    for sample in generated:
        assert 1 <= len(sample.token_ids) <= 8
        assert all(t % 2 for t in sample.token_ids[:-1])  # no EOS before the last token
        if sample.finish_reason == decode.FINISH_STOP:
            assert sample.token_ids[-1] % 2 == 0
        else:
            assert len(sample.token_ids) == 8 and sample.token_ids[-1] % 2


def test_top_k_and_top_p_cut_the_right_tokens_and_sample_the_softmax():
    logits_V = jnp.log(jnp.asarray([0.5, 0.25, 0.15, 0.1]))

    def kept(**sampling) -> np.ndarray:
        return np.isfinite(np.asarray(decode.filter_logits(logits_V, decode.SamplingConfig(**sampling))))

    assert kept(top_k=2).tolist() == [True, True, False, False]
    assert kept(top_p=0.5).tolist() == [True, False, False, False]  # 0.5 alone reaches p
    assert kept(top_p=0.7).tolist() == [True, True, False, False]
    assert kept(top_p=0.76).tolist() == [True, True, True, False]
    assert kept(top_k=3, top_p=1.0).tolist() == [True, True, True, False]
    rows = 4000
    tokens = decode.sample_tokens(
        jnp.tile(logits_V, (rows, 1)),
        decode.seed_keys(range(rows)),
        jnp.int32(0),
        decode.SamplingConfig(temperature=2.0),
    )
    frequencies = np.bincount(np.asarray(tokens), minlength=4) / rows
    expected = np.asarray(jax.nn.softmax(logits_V / 2.0))
    assert np.all(np.abs(frequencies - expected) <= 4 * np.sqrt(expected * (1 - expected) / rows)), frequencies


def test_sampling_draws_what_jax_random_categorical_draws():
    """decode's Gumbel-max with first_max_index is jax.random.categorical, key for key, also with cut
    (-inf) tokens and ties; first_max_index is jnp.argmax, NaN and ties included."""
    rng = np.random.default_rng(0)
    logits_BxV = rng.normal(size=(512, 300)).astype(np.float32) * 3
    logits_BxV[:, ::3] = -np.inf  # cut tokens
    logits_BxV[::2, 1] = logits_BxV[::2, 2] = 40.0  # ties at the top
    keys_B = decode.seed_keys(range(512))
    for sampling in (decode.SamplingConfig(), decode.SamplingConfig(temperature=0.7, top_k=50, top_p=0.9)):
        for step in (0, 5):
            got = decode.sample_tokens(jnp.asarray(logits_BxV), keys_B, jnp.int32(step), sampling)
            expected = categorical_reference(jnp.asarray(logits_BxV), keys_B, jnp.int32(step), sampling)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    x_BxV = rng.integers(0, 4, size=(64, 9)).astype(np.float32)  # many ties
    x_BxV[3, [2, 5]] = np.nan
    x_BxV[4, :] = -np.inf
    np.testing.assert_array_equal(np.asarray(decode.first_max_index(jnp.asarray(x_BxV))), np.argmax(x_BxV, -1))


def test_bfloat16_cache_follows_the_model_config(model):
    bf16 = dataclasses.replace(CFG, compute_dtype="bfloat16")
    model_bf16 = nnx.merge(nnx.graphdef(Decoder(bf16, rngs=nnx.Rngs(0))), nnx.state(model))
    cache = decode.init_cache(bf16, 1, 8)
    tokens_BxP, start_B, next_B = decode.pad_prompts([PROMPTS[0][:5]], 5, "right", 0)
    logits_BxV, cache = decode.prefill(model_bf16, tokens_BxP, start_B, next_B, cache)
    assert {k.dtype for k in cache.keys_BxGxSxK + cache.values_BxGxSxK} == {jnp.dtype(jnp.bfloat16)}
    # bf16 rounds differently in the cached program (layers unrolled) than in the model's scanned
    # layers, where XLA keeps some intermediates in fp32 inside fusions: the two differ by about 0.05-0.07
    # here, and each is about 0.1 from the fp32 logits.
    reference = model_bf16(jnp.asarray(tokens_BxP), jnp.arange(5)[None])[0, -1]
    np.testing.assert_allclose(np.asarray(logits_BxV[0]), np.asarray(reference), atol=0.12)
    fp32 = model(jnp.asarray(tokens_BxP), jnp.arange(5)[None])[0, -1]
    np.testing.assert_allclose(np.asarray(logits_BxV[0]), np.asarray(fp32), atol=0.15)


def test_two_device_mesh_gives_the_single_device_samples(model):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py sets 8 fake CPU devices)")
    mesh = sharding.make_mesh({"data": 1, "tensor": 2}, jax.devices()[:2])
    sampled = decode.Sampler(model, (17,)).generate(PROMPTS, [1, 2, 3], decode.SamplingConfig(), 8)
    sharded = model_lib.create_sharded_model(CFG, mesh, seed=0)  # the same values as Decoder(rngs=Rngs(0))
    with jax.set_mesh(mesh):
        assert sharded.layers.attention.wq[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
        generated = decode.Sampler(sharded, (17,)).generate(PROMPTS, [1, 2, 3], decode.SamplingConfig(), 8)
    assert generated == sampled


def test_ensemble_samples_the_mean_of_its_members_logits(model, compiled):
    """Two independently seeded members of different depths: the cached ensemble sampler draws the same
    tokens as sampling the mean of the members' full-forward logits with the same keys."""
    other = Decoder(dataclasses.replace(CFG, layers=1), rngs=nnx.Rngs(7))
    graphdef, params = nnx.split(other)
    positions = lambda tokens_BxL: jnp.zeros_like(tokens_BxL) + jnp.arange(tokens_BxL.shape[1])  # noqa: E731
    other_forward = jax.jit(lambda tokens_BxL: nnx.merge(graphdef, params)(tokens_BxL, positions(tokens_BxL)))
    sampling = decode.SamplingConfig(temperature=1.0, top_k=200)
    eos, seeds = (17,), [3, 4, 5]
    ensemble = decode.Sampler([model, other], eos)
    generated = ensemble.generate(PROMPTS, seeds, sampling, max_new_tokens=10, width=16, padding="left")
    forwards = [compiled[2], other_forward]
    assert generated == reference_samples(compiled, PROMPTS, seeds, sampling, 10, eos, forwards=forwards)
    # Not either member alone: the average changes the draws.
    alone = decode.Sampler(model, eos).generate(PROMPTS, seeds, sampling, max_new_tokens=10, width=16)
    assert generated != alone and ensemble.ensemble_size == 2
    # An ensemble of one is the model itself.
    assert decode.Sampler([model], eos).generate(PROMPTS, seeds, sampling, 10, width=16) == alone


def test_ensemble_members_must_share_the_vocabulary(model):
    other = Decoder(dataclasses.replace(CFG, vocab_size=1024), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"different vocabulary sizes \[1024, 2048\]"):
        decode.Sampler([model, other], (17,))
    with pytest.raises(ValueError, match="at least one model"):
        decode.Sampler([], (17,))
