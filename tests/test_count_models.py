"""Count-model baselines: add-one unigram and Witten-Bell bigram, on the evaluation's own targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pipeline_stores import VOCAB, make_config, random_documents, write_store

from megadoc_jax.config import ConfigError
from megadoc_jax.evaluation import count_models
from megadoc_jax.evaluation.batches import eval_batches
from megadoc_jax.evaluation.count_models import CountModels


def test_losses_equal_a_hand_computation():
    # Training stream 0 1 0 1 2, V = 4. Unigram counts (2, 2, 1, 0), N = 5: p = (3, 3, 2, 1) / 9.
    # Pairs 01 10 01 12: c(0) = 2, T(0) = 1 (only 1 follows 0); c(1) = 2, T(1) = 2 (0 and 2); c(2) = 0.
    models = CountModels.fit(np.array([0, 1, 0, 1, 2]), vocab_size=4)
    np.testing.assert_allclose(models.unigram_V, np.array([3, 3, 2, 1]) / 9)
    batch = {
        "inputs": np.array([[0, 1, 2, 3]]),
        "targets": np.array([[1, 2, 0, 0]]),
        "loss_mask": np.array([[1.0, 1.0, 1.0, 0.0]]),  # the last target is not scored
    }
    p_1_after_0 = (2 + 1 * 3 / 9) / (2 + 1)  # = 7/9
    p_2_after_1 = (1 + 2 * 2 / 9) / (2 + 2)  # = 13/36
    p_0_after_2 = 3 / 9  # context never seen: the unigram
    expected = {
        "unigram": -(math.log(3 / 9) + math.log(2 / 9) + math.log(3 / 9)) / 3,
        "bigram": -(math.log(p_1_after_0) + math.log(p_2_after_1) + math.log(p_0_after_2)) / 3,
    }
    got = models.losses([batch])
    assert got == pytest.approx(expected, rel=1e-12)
    # Batches add up token-weighted: the same targets split over two batches give the same means.
    halves = [{k: v[:, :2] for k, v in batch.items()}, {k: v[:, 2:] for k, v in batch.items()}]
    assert models.losses(halves) == pytest.approx(expected, rel=1e-12)


def test_every_context_is_a_distribution_over_the_vocabulary():
    rng = np.random.default_rng(0)
    vocab = 12
    tokens = rng.integers(0, vocab - 2, size=300)  # the last two ids never occur: unseen contexts and targets
    models = CountModels.fit(tokens, vocab)
    assert math.isclose(np.exp(models.unigram_log_prob(np.arange(vocab))).sum(), 1.0, rel_tol=1e-12)
    targets = np.arange(vocab)
    for a in range(vocab):
        probabilities = np.exp(models.bigram_log_prob(np.full(vocab, a), targets))
        assert math.isclose(probabilities.sum(), 1.0, rel_tol=1e-12), a
        assert (probabilities > 0).all()  # smoothing: nothing is impossible, no loss is infinite


def test_out_of_range_and_empty_inputs_are_refused():
    models = CountModels.fit(np.array([0, 1, 2]), vocab_size=3)
    with pytest.raises(ValueError, match="token id 3 outside the vocabulary"):
        models.bigram_log_prob(np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="training tokens: token id -1"):
        CountModels.fit(np.array([0, -1]), vocab_size=3)
    empty = {"inputs": np.zeros((1, 2)), "targets": np.zeros((1, 2)), "loss_mask": np.zeros((1, 2))}
    with pytest.raises(ValueError, match="no target token"):
        models.losses([empty])


@pytest.mark.parametrize("recipe", ["concat", "document"])
def test_heldout_baselines_score_the_evaluation_targets(tmp_path, recipe):
    train = write_store(tmp_path / "train", random_documents(30, seed=1))
    heldout = write_store(tmp_path / "heldout", random_documents(30, seed=2))
    config = make_config(
        {"real": (train, 1.0)},
        data={"seq_len": 16, "eval_stores": {"held": heldout}},
        train={"batch_size": 4, "eval_batches": 2, "eval_recipe": recipe},
    )
    got = count_models.heldout_baselines(config)
    # The same figures from first principles: counts of the whole train stream, the pairs of the
    # evaluation batches (input at a position -> its target), unscored positions left out.
    stream = np.concatenate(random_documents(30, seed=1))
    models = CountModels.fit(stream, VOCAB)
    batches = [rows.batch for rows in eval_batches(heldout, config, 2)[0]]
    mask = np.concatenate([b["loss_mask"].reshape(-1) for b in batches]) == 1
    previous = np.concatenate([b["inputs"].reshape(-1) for b in batches])[mask]
    targets = np.concatenate([b["targets"].reshape(-1) for b in batches])[mask]
    if recipe == "concat":  # the 15 targets of each of the first 2 x 4 windows, each after its store predecessor
        held_stream = np.concatenate(random_documents(30, seed=2))
        assert mask.sum() == 2 * 4 * 15
        starts = np.arange(2 * 4) * 16
        np.testing.assert_array_equal(previous, np.concatenate([held_stream[s : s + 15] for s in starts]))
        np.testing.assert_array_equal(targets, np.concatenate([held_stream[s + 1 : s + 16] for s in starts]))
    prefix = "eval/held/partial" if recipe == "concat" else "eval/held/document/partial"
    assert got == pytest.approx(
        {
            f"{prefix}/unigram_loss": -models.unigram_log_prob(targets).mean(),
            f"{prefix}/bigram_loss": -models.bigram_log_prob(previous, targets).mean(),
        },
        rel=1e-12,
    )


def test_baselines_need_the_real_stream(tmp_path):
    store = write_store(tmp_path / "s", random_documents(10, seed=0))
    config = make_config({"synthetic": (store, 1.0)}, data={"seq_len": 8, "eval_stores": {"held": store}})
    with pytest.raises(ConfigError, match="data.real_stream: no stream named 'real'"):
        count_models.heldout_baselines(config)


def test_baselines_need_eval_stores():
    with pytest.raises(ConfigError, match="train.baselines: needs data.eval_stores"):
        make_config({"real": ("unused", 1.0)}, train={"baselines": True})


@pytest.mark.slow  # compiles a train step and an eval step
def test_training_ends_with_the_baselines_next_to_the_heldout_loss(tmp_path, caplog):
    import logging

    import jax

    from megadoc_jax import train

    train_store = write_store(tmp_path / "train", random_documents(30, seed=1))
    heldout = write_store(tmp_path / "heldout", random_documents(30, seed=2))
    config = make_config(
        {"real": (train_store, 1.0)},
        model={"size": "tiny", "vocab_size": VOCAB, "compute_dtype": "float32"},
        data={"seq_len": 16, "eval_stores": {"held": heldout}},
        train={
            "run_dir": str(tmp_path / "run"),
            "steps": 1,
            "batch_size": 4,
            "checkpoints": False,
            "baselines": True,
        },
    )
    package_log = logging.getLogger("megadoc_jax")  # train.log_to_console may have stopped its propagation
    package_log.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="megadoc_jax"):
            result = train.run(config, devices=jax.devices()[:1])
    finally:
        package_log.removeHandler(caplog.handler)
    final = result.history[-1]
    assert {k: final[k] for k in ("eval/held/unigram_loss", "eval/held/bigram_loss")} == (
        count_models.heldout_baselines(config)
    )
    # In order, each once (a record may reach caplog's handler both directly and through the root).
    lines = list(dict.fromkeys(r.getMessage() for r in caplog.records if r.getMessage().startswith("eval/held")))
    assert lines[0].startswith("eval/held/loss: ")
    assert lines[1] == (
        f"eval/held: count models of the training tokens: unigram {final['eval/held/unigram_loss']:.4f}, "
        f"bigram {final['eval/held/bigram_loss']:.4f} (nats/token, same targets)"
    )
