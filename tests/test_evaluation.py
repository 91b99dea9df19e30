"""megadoc_jax.evaluation: per-token scores against full logits, in the original order on every layout,
and the held-out loss against an independent computation, on 1 and on 8 fake CPU devices."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from pipeline_stores import make_config, random_documents, write_store

from megadoc_jax import config as config_lib
from megadoc_jax import model as model_lib
from megadoc_jax import sharding
from megadoc_jax import step as step_lib
from megadoc_jax.data.store import StoreReader
from megadoc_jax.evaluation import HeldOutLoss, eval_batches, jit_token_scores, token_scores
from megadoc_jax.evaluation.loss_windows import concat_plan
from megadoc_jax.evaluation.losses import LossSums, RowScorer, score_batches

SEQ_LEN, BATCH, VOCAB = 32, 8, 128


@pytest.fixture(scope="module")
def heldout_store(tmp_path_factory) -> str:
    return write_store(tmp_path_factory.mktemp("eval") / "heldout", random_documents(200, seed=3))


def make_eval_config(
    store: str,
    attention: str = "xla",
    *,
    windows: str = "concat",
    eval_stores: bool = True,
    eval_batches: int = 2,
    **mesh: int,
) -> config_lib.Config:
    return make_config(
        {"real": (store, 1.0)},
        model=dict(size="tiny", vocab_size=VOCAB, compute_dtype="float32", attention=attention),
        data=dict(
            seq_len=SEQ_LEN,
            windows=windows,
            document_masking=True,
            eval_stores={"heldout": store} if eval_stores else {},
        ),
        train=dict(batch_size=BATCH, eval_batches=eval_batches),
        mesh={"data": 1, **mesh},
    )


@functools.cache
def initial_params(model_config: config_lib.ModelConfig):
    """Freshly initialised parameters (host arrays), built once per model config."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "context": 1}, jax.devices()[:1])
    params = nnx.to_pure_dict(nnx.state(model_lib.create_sharded_model(model_config, mesh, 0)))
    return jax.device_get(params)


def on_mesh(config: config_lib.Config, devices: int):
    """(graphdef, parameter shardings, mesh, params placed on it) for the config's mesh."""
    mesh = sharding.make_mesh(config_lib.validate_for_devices(config, devices), jax.devices()[:devices])
    setup = step_lib.train_setup(config, mesh, 10)
    shardings = setup.state_shardings["params"]
    params = jax.device_put(initial_params(dataclasses.replace(config.model, attention="xla")), shardings)
    return setup.graphdef, shardings, mesh, params


def full_logits_log_probs(config: config_lib.Config, batch) -> tuple[np.ndarray, np.ndarray]:
    """(log softmax at the targets, argmax == target), [B, L], from Decoder.__call__'s full fp32 logits."""
    graphdef, _, _, params = on_mesh(config, 1)
    model = nnx.merge(graphdef, params)
    logits_BxLxV = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    assert logits_BxLxV.dtype == jnp.float32
    log_probs_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    targets = np.asarray(batch["targets"])
    picked = np.take_along_axis(np.asarray(log_probs_BxLxV), targets[..., None], axis=-1)[..., 0]
    return picked, np.asarray(jnp.argmax(logits_BxLxV, axis=-1)) == targets


@pytest.fixture(scope="module")
def batch(heldout_store):
    """The first eval batch: [B, L] windows of several documents each."""
    return eval_batches(heldout_store, make_eval_config(heldout_store), 1)[0][0].batch


def test_token_scores_equal_log_softmax_of_the_full_logits(heldout_store, batch):
    config = make_eval_config(heldout_store)
    want_log_prob, want_greedy = full_logits_log_probs(config, batch)
    graphdef, _, _, params = on_mesh(config, 1)
    got = jax.jit(lambda p, b: token_scores(graphdef, p, b, config, greedy=True))(params, batch)
    assert set(got) == {"log_prob", "is_greedy"}
    assert got["log_prob"].dtype == jnp.float32 and got["log_prob"].shape == (BATCH, SEQ_LEN)
    assert got["is_greedy"].dtype == jnp.bool_
    np.testing.assert_allclose(got["log_prob"], want_log_prob, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["is_greedy"], want_greedy)
    assert np.all(np.asarray(got["log_prob"]) < 0)
    # Without greedy, only the log-probabilities.
    assert set(jax.jit(lambda p, b: token_scores(graphdef, p, b, config))(params, batch)) == {"log_prob"}


def test_masked_sum_of_token_scores_is_the_loss_sum(heldout_store):
    config = make_eval_config(heldout_store, windows="document")
    batch = eval_batches(heldout_store, config, 1)[0][0].batch
    graphdef, _, _, params = on_mesh(config, 1)
    log_prob = jax.jit(lambda p, b: token_scores(graphdef, p, b, config)["log_prob"])(params, batch)
    sums = jax.jit(lambda p, b: step_lib.loss_sums(graphdef, p, b, config))(params, batch)
    mask = np.asarray(batch["loss_mask"])
    assert 0 < mask.sum() < mask.size  # packed rows end in masked padding
    np.testing.assert_allclose(-np.sum(mask * np.asarray(log_prob)), sums["loss_sum"], rtol=1e-6)
    np.testing.assert_allclose(mask.sum(), sums["weight_sum"])


# Context-parallel layouts (zig-zag when context > 1) and plain sharding, all on the 8 fake devices.
MESHES = [
    ("ring", dict(data=2, fsdp=2, context=2)),
    ("ring", dict(data=2, context=4)),
    ("all_gather", dict(data=2, tensor=2, context=2)),
    ("xla", dict(data=2, fsdp=2, tensor=2)),
]


@pytest.mark.parametrize("attention, mesh", MESHES, ids=[f"{a}-{'-'.join(map(str, m.values()))}" for a, m in MESHES])
def test_sharded_token_scores_come_back_in_the_original_order(heldout_store, batch, attention, mesh):
    reference = make_eval_config(heldout_store)
    graphdef, _, _, params = on_mesh(reference, 1)
    want = jax.jit(lambda p, b: token_scores(graphdef, p, b, reference, greedy=True))(params, batch)

    config = make_eval_config(heldout_store, attention, **mesh)
    graphdef, shardings, mesh_, params = on_mesh(config, 8)
    layout = step_lib.batch_sharding(mesh_, config)
    score = jit_token_scores(graphdef, shardings, mesh_, config, greedy=True)
    got = score(params, step_lib.global_batch(batch, layout))
    assert got["log_prob"].sharding.is_equivalent_to(layout, 2)
    # Scores differ from position to position, so a permuted result could not pass.
    assert np.unique(np.asarray(want["log_prob"])).size > SEQ_LEN
    np.testing.assert_allclose(got["log_prob"], want["log_prob"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["is_greedy"], want["is_greedy"])


def test_held_out_loss_equals_the_mean_over_target_tokens(heldout_store):
    config = make_eval_config(heldout_store)
    rows = [r.batch for r in eval_batches(heldout_store, config, config.train.eval_batches)[0]]
    log_probs_and_masks = [(full_logits_log_probs(config, b)[0], b["loss_mask"]) for b in rows]
    want = -sum(np.sum(m * lp) for lp, m in log_probs_and_masks) / sum(m.sum() for _, m in log_probs_and_masks)

    one = HeldOutLoss(config, *on_mesh(config, 1)[:3])(on_mesh(config, 1)[3])
    assert set(one) == {"eval/heldout/partial/loss"}  # the first 2 batches, no tokenizer: no bpb
    np.testing.assert_allclose(one["eval/heldout/partial/loss"], want, rtol=1e-5)

    ring = make_eval_config(heldout_store, "ring", data=2, context=4)
    graphdef, shardings, mesh, params = on_mesh(ring, 8)
    eight = HeldOutLoss(ring, graphdef, shardings, mesh)(params)
    np.testing.assert_allclose(eight["eval/heldout/partial/loss"], one["eval/heldout/partial/loss"], rtol=1e-5)


def test_held_out_loss_over_the_whole_store_is_the_evaluate_commands_concat_loss(heldout_store):
    config = make_eval_config(heldout_store, eval_batches=0)
    graphdef, shardings, mesh, params = on_mesh(config, 1)
    loop = HeldOutLoss(config, graphdef, shardings, mesh)(params)
    store = StoreReader.open(heldout_store)
    plan = concat_plan(store, SEQ_LEN)
    scorer = RowScorer((graphdef,), (shardings,), mesh, config)
    batches = (plan.read_batch(store, b, BATCH) for b in range(plan.num_batches(BATCH)))
    sums = score_batches(scorer, (params,), batches, LossSums(SEQ_LEN))
    assert set(loop) == {"eval/heldout/loss"} and sums.tokens == plan.scored_tokens
    assert loop["eval/heldout/loss"] == sums.mean_loss


def test_held_out_loss_without_eval_stores_is_empty_and_bad_stores_fail_at_construction(heldout_store):
    config = make_eval_config(heldout_store)
    graphdef, shardings, mesh, params = on_mesh(config, 1)
    assert HeldOutLoss(make_eval_config(heldout_store, eval_stores=False), graphdef, shardings, mesh)(params) == {}
    too_many = make_eval_config(heldout_store, eval_batches=1000)
    with pytest.raises(
        config_lib.ConfigError, match=r"train.eval_batches: 1000 batches .*\(data.eval_stores.heldout\)"
    ):
        HeldOutLoss(too_many, graphdef, shardings, mesh)
