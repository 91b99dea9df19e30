"""next_token_loss and next_token_scores: equal to full-logits cross-entropy and log-softmax, without full logits."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from megadoc_jax.loss import next_token_loss, next_token_scores

B, L, D, V = 2, 12, 16, 40


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, size=(B, L)), jnp.int32)
    mask = jnp.asarray(rng.random((B, L)) > 0.3, jnp.float32)
    return x, w, targets, mask


def _naive(x, w, targets, mask, z_loss):
    """Full [B, L, V] logits, plain log-softmax."""
    logits = jnp.einsum("bld,dv->blv", x, w)
    lse = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - lse[..., None]
    ce = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return {
        "loss_sum": jnp.sum(mask * ce),
        "z_loss_sum": z_loss * jnp.sum(mask * lse**2),
        "weight_sum": jnp.sum(mask),
    }


def _sums_and_grads(sums_fn, x, w, targets, mask):
    """The sums and the gradients of the objective (loss_sum + z_loss_sum) / weight_sum, in one jit."""

    def objective(x, w):
        sums = sums_fn(x, w, targets, mask)
        return (sums["loss_sum"] + sums["z_loss_sum"]) / sums["weight_sum"], sums

    (_, sums), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(x, w)
    return sums, grads


# chunk 4 divides L, 5 pads L, 64 is one chunk; each case switches the mask and z-loss differently.
@pytest.mark.parametrize("chunk_tokens, masked, z_loss", [(4, False, 0.0), (5, True, 1e-2), (64, True, 0.0)])
def test_values_and_gradients_match_full_logits(chunk_tokens, masked, z_loss):
    x, w, targets, mask = _data()
    mask = mask if masked else None
    chunked = lambda x, w, t, m: next_token_loss(x, w, t, m, z_loss=z_loss, chunk_tokens=chunk_tokens)
    naive = lambda x, w, t, m: _naive(x, w, t, jnp.ones((B, L)) if m is None else m, z_loss)

    got, (gx, gw) = _sums_and_grads(chunked, x, w, targets, mask)
    want, (nx, nw) = _sums_and_grads(naive, x, w, targets, mask)
    assert set(got) == {"loss_sum", "z_loss_sum", "weight_sum"}
    for key in want:
        assert got[key].dtype == jnp.float32 and got[key].shape == ()
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    assert (float(got["z_loss_sum"]) > 0) == (z_loss > 0)
    np.testing.assert_allclose(gx, nx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gw, nw, rtol=1e-4, atol=1e-6)
    if masked:  # masked positions get no gradient
        assert np.all(np.asarray(gx)[np.asarray(mask) == 0] == 0)


def test_bf16_hidden_states_are_promoted_to_fp32():
    x, w, targets, mask = _data(1)
    x_bf16 = x.astype(jnp.bfloat16)
    loss = lambda x: next_token_loss(x, w, targets, mask, chunk_tokens=4)["loss_sum"]
    got, gx = jax.jit(jax.value_and_grad(loss))(x_bf16)
    want = _naive(x_bf16.astype(jnp.float32), w, targets, mask, 0.0)["loss_sum"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got.dtype == jnp.float32 and gx.dtype == jnp.bfloat16


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest value produced anywhere in a jaxpr, sub-jaxprs included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            largest = max(largest, _largest_intermediate(sub))
    return largest


@pytest.mark.parametrize("reduction", ["loss", "scores"])
def test_full_logits_are_never_materialised_forward_or_backward(reduction):
    b, length, d, v, chunk = 2, 64, 8, 1000, 8
    x = jnp.ones((b, length, d))
    w = jnp.ones((d, v))
    targets = jnp.zeros((b, length), jnp.int32)
    if reduction == "loss":
        loss = lambda x, w: next_token_loss(x, w, targets, chunk_tokens=chunk)["loss_sum"]
    else:
        loss = lambda x, w: -next_token_scores(x, w, targets, greedy=True, chunk_tokens=chunk)["log_prob"].sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr
    # Nothing bigger than one chunk of logits (b * chunk * v), far below the full b * length * v.
    assert _largest_intermediate(jaxpr) == b * chunk * v
    naive_jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: _naive(x, w, targets, 1.0, 0.0)["loss_sum"]))(x, w).jaxpr
    assert _largest_intermediate(naive_jaxpr) == b * length * v  # the measure does see full logits


def test_bad_shapes_are_refused():
    x, w, targets, mask = _data()
    with pytest.raises(ValueError, match="unembed"):
        next_token_loss(x, w.T, targets)
    with pytest.raises(ValueError, match="targets"):
        next_token_loss(x, w, targets[:, 1:])
    with pytest.raises(ValueError, match="loss_mask"):
        next_token_loss(x, w, targets, mask[:1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        next_token_loss(x, w, targets, chunk_tokens=0)
    with pytest.raises(ValueError, match="next_token_scores: targets"):
        next_token_scores(x, w, targets[:, 1:])
    with pytest.raises(ValueError, match="next_token_scores: x must be"):
        next_token_scores(x[0], w, targets)


# chunk 4 divides L, 5 pads L (the padded positions are dropped), 64 is one chunk.
@pytest.mark.parametrize("chunk_tokens", [4, 5, 64])
def test_token_scores_match_full_log_softmax_and_sum_to_the_loss(chunk_tokens):
    x, w, targets, mask = _data(2)
    got = jax.jit(lambda x: next_token_scores(x, w, targets, greedy=True, chunk_tokens=chunk_tokens))(x)
    logits = jnp.einsum("bld,dv->blv", x, w)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    assert got["log_prob"].dtype == jnp.float32 and got["log_prob"].shape == (B, L)
    np.testing.assert_allclose(got["log_prob"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["is_greedy"], jnp.argmax(logits, axis=-1) == targets)
    assert 0 < int(got["is_greedy"].sum()) < B * L  # the check above sees both values
    sums = next_token_loss(x, w, targets, mask, chunk_tokens=chunk_tokens)
    np.testing.assert_allclose(-jnp.sum(mask * got["log_prob"]), sums["loss_sum"], rtol=1e-6)
    assert set(next_token_scores(x, w, targets, chunk_tokens=chunk_tokens)) == {"log_prob"}


def test_is_greedy_breaks_ties_towards_the_first_maximum():
    # Vocabulary entries 3 and 7 have the same (largest) logit everywhere: like torch.argmax, 3 wins.
    x = jnp.ones((1, 4, D))
    w = jnp.zeros((D, V)).at[:, 3].set(1.0).at[:, 7].set(1.0)
    targets = jnp.asarray([[3, 7, 0, 3]], jnp.int32)
    got = next_token_scores(x, w, targets, greedy=True, chunk_tokens=2)
    np.testing.assert_array_equal(got["is_greedy"], [[True, False, False, True]])


# --------------------------------------------------------------------------------------------------
# Ensembles: K members' hidden states and unembeddings, combined chunk by chunk
# --------------------------------------------------------------------------------------------------


def _members(seed: int = 3):
    """Two members of different widths over one vocabulary, sharp enough that they disagree."""
    rng = np.random.default_rng(seed)
    xs = [jnp.asarray(rng.normal(size=(B, L, d)), jnp.float32) for d in (D, 24)]
    ws = [jnp.asarray(rng.normal(size=(d, V)), jnp.float32) for d in (D, 24)]
    return xs, ws, jnp.asarray(rng.integers(0, V, size=(B, L)), jnp.int32)


def _reference(xs, ws, targets, mode):
    """log p(target) of the ensemble from every member's full [B, L, V] logits, in float64."""
    logits = [np.einsum("bld,dv->blv", np.float64(x), np.float64(w)) for x, w in zip(xs, ws)]
    if mode == "mean_logits":
        combined = np.mean(logits, axis=0)
        log_probs = combined - np.asarray(jax.scipy.special.logsumexp(combined, axis=-1, keepdims=True))
    else:
        probs = [np.exp(lg - np.asarray(jax.scipy.special.logsumexp(lg, axis=-1, keepdims=True))) for lg in logits]
        log_probs = np.log(np.mean(probs, axis=0))
    picked = np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return picked, np.argmax(log_probs, axis=-1) == np.asarray(targets)


@pytest.mark.parametrize("mode", ["mean_logits", "mean_probs"])
@pytest.mark.parametrize("chunk_tokens", [5, 64])
def test_an_ensemble_of_two_matches_the_reference_from_full_logits(mode, chunk_tokens):
    xs, ws, targets = _members()
    scores = jax.jit(
        lambda xs, ws: next_token_scores(xs, ws, targets, greedy=True, ensemble=mode, chunk_tokens=chunk_tokens)
    )
    got = scores(xs, ws)
    want_log_prob, want_greedy = _reference(xs, ws, targets, mode)
    np.testing.assert_allclose(got["log_prob"], want_log_prob, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["is_greedy"], want_greedy)
    # Neither member alone, and the two modes differ: a real combination.
    for x, w in zip(xs, ws):
        assert np.abs(next_token_scores(x, w, targets)["log_prob"] - got["log_prob"]).max() > 1e-2
    other = "mean_probs" if mode == "mean_logits" else "mean_logits"
    assert np.abs(_reference(xs, ws, targets, other)[0] - want_log_prob).max() > 1e-2


@pytest.mark.parametrize("mode", ["mean_logits", "mean_probs"])
def test_an_ensemble_of_one_is_the_model(mode):
    x, w, targets, _ = _data(4)
    alone = next_token_scores(x, w, targets, greedy=True)
    one = next_token_scores([x], [w], targets, greedy=True, ensemble=mode)
    for key in alone:
        np.testing.assert_array_equal(one[key], alone[key])


def test_an_ensemble_keeps_at_most_two_chunks_of_logits_and_refuses_bad_members():
    b, length, v, chunk = 2, 64, 1000, 8
    xs = [jnp.ones((b, length, d)) for d in (8, 4, 6)]
    ws = [jnp.ones((d, v)) for d in (8, 4, 6)]
    targets = jnp.zeros((b, length), jnp.int32)
    for mode in ("mean_logits", "mean_probs"):
        jaxpr = jax.make_jaxpr(lambda xs, ws: next_token_scores(xs, ws, targets, ensemble=mode, chunk_tokens=chunk))
        assert _largest_intermediate(jaxpr(xs, ws).jaxpr) == b * chunk * v
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        next_token_scores(xs[:2], [ws[0], jnp.ones((4, v + 1))], targets)
    with pytest.raises(ValueError, match="2 hidden states for 3 unembeddings"):
        next_token_scores(xs[:2], ws, targets)
    with pytest.raises(ValueError, match="ensemble 'max'"):
        next_token_scores(xs, ws, targets, ensemble="max")


# z-loss 0.1: each chunk's gradient in the backward pass (_chunk_sums_backward, logits recomputed);
# z-loss 0: the gradient computed in the forward pass and scaled in the backward (_fused_sums).
@pytest.mark.parametrize("z_loss", [0.1, 0.0])
def test_the_written_out_gradient_matches_autodiff_of_full_logits_for_every_float_input(z_loss):
    """The written-out gradients against jax.grad of the naive loss, mask included (fractional weights,
    and a weight_sum term with its own coefficient, so that every entry of the sums' cotangent differs)."""
    x, w, targets, mask = _data(3)
    mask = mask * 0.7 + 0.1

    def objective(sums_fn):
        def total(x, w, mask):
            sums = sums_fn(x, w, mask)
            return 1.5 * sums["loss_sum"] + sums["z_loss_sum"] + 0.5 * sums["weight_sum"]

        return jax.jit(jax.grad(total, argnums=(0, 1, 2)))(x, w, mask)

    got = objective(lambda x, w, m: next_token_loss(x, w, targets, m, z_loss=z_loss, chunk_tokens=5))
    want = objective(lambda x, w, m: _naive(x, w, targets, m, z_loss))
    for name, g, n in zip(("x", "unembed", "mask"), got, want):
        np.testing.assert_allclose(g, n, rtol=1e-4, atol=1e-5, err_msg=name)
