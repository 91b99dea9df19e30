"""Block mixture, per-epoch shuffles and the run-length accounting (no stores needed)."""

from __future__ import annotations

import numpy as np
import pytest

from megadoc_jax.data.mixture import (
    BLOCK_SIZE,
    BlockMixture,
    DataPlan,
    StreamPlan,
    block_counts,
    epoch_windows,
    steps_for_epochs,
)


def test_block_counts_round_by_largest_remainder():
    assert block_counts([0.25, 0.75], 1000).tolist() == [250, 750]
    assert block_counts([0.1, 0.9], 1000).tolist() == [100, 900]
    assert block_counts([1 / 3, 1 / 3, 1 / 3], 1000).tolist() == [334, 333, 333]
    assert block_counts([0.5, 0.3, 0.2], 7).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4: remainders .5 > .4 > .1
    assert block_counts([1.0], 1000).tolist() == [1000]


def test_tiny_weight_is_refused():
    with pytest.raises(ValueError, match="weight 0.0001 gets no example"):
        BlockMixture([0.9999, 0.0001], seed=0)


def test_every_block_has_exact_counts_and_streams_consume_examples_in_order():
    weights = [0.1, 0.6, 0.3]
    mix = BlockMixture(weights, seed=3, block_size=100)
    blocks = 7
    stream_N, example_N = mix.assign(np.arange(blocks * 100))
    for block in range(blocks):
        counts = np.bincount(stream_N[block * 100 : (block + 1) * 100], minlength=3)
        assert counts.tolist() == [10, 60, 30]
    for k, count in enumerate([10, 60, 30]):
        # Each stream consumes its examples 0, 1, 2, ... in order: no window skipped or repeated, and
        # epoch boundaries are exact.
        assert example_N[stream_N == k].tolist() == list(range(blocks * count))
    # The order inside blocks is shuffled, not stream after stream.
    assert len(np.unique(stream_N[:100][:20])) > 1


def test_batch_proportions_are_within_hypergeometric_bounds():
    weight, batch = 0.25, 64
    mix = BlockMixture([weight, 1 - weight], seed=11)
    stream_N, _ = mix.assign(np.arange(batch * 500))
    real_per_batch = (stream_N.reshape(500, batch) == 0).sum(axis=1)
    # Drawing 64 of a block of 1000 without replacement: sd = sqrt(n w (1-w) (K-n)/(K-1)) ~ 3.35.
    sd = np.sqrt(batch * weight * (1 - weight) * (BLOCK_SIZE - batch) / (BLOCK_SIZE - 1))
    assert np.abs(real_per_batch - batch * weight).max() < 6 * sd
    assert abs(real_per_batch.std() - sd) < 0.25 * sd  # the spread really is the hypergeometric one
    # Over whole blocks the proportion is exact; 500 batches = 32 blocks.
    assert real_per_batch.sum() == 500 * batch * weight


def test_assignment_is_a_pure_function_of_seed_and_example():
    mix = BlockMixture([0.5, 0.5], seed=1)
    everything = mix.assign(np.arange(5000))
    some = np.array([4999, 17, 1000, 2500])
    again = BlockMixture([0.5, 0.5], seed=1).assign(some)
    for full, part in zip(everything, again):
        np.testing.assert_array_equal(full[some], part)
    other_seed = BlockMixture([0.5, 0.5], seed=2).assign(np.arange(5000))
    assert not np.array_equal(everything[0], other_seed[0])


def test_examples_per_stream_counts_exactly():
    mix = BlockMixture([0.3, 0.7], seed=5)
    for n in (0, 1, 999, 1000, 2345):
        streams, _ = mix.assign(np.arange(n))
        assert mix.examples_per_stream(n).tolist() == np.bincount(streams, minlength=2).tolist()


def test_each_epoch_is_a_new_permutation_of_the_windows():
    windows = 37
    shuffled = epoch_windows(np.arange(3 * windows), windows, seed=0, name="real").reshape(3, windows)
    for epoch in shuffled:
        assert sorted(epoch.tolist()) == list(range(windows))
    assert not np.array_equal(shuffled[0], shuffled[1])
    assert not np.array_equal(shuffled[0], np.arange(windows))
    # Another stream name, or another seed, shuffles differently; the same arguments give the same.
    assert not np.array_equal(shuffled[0], epoch_windows(np.arange(windows), windows, seed=0, name="synth"))
    assert not np.array_equal(shuffled[0], epoch_windows(np.arange(windows), windows, seed=1, name="real"))
    np.testing.assert_array_equal(shuffled[2], epoch_windows(np.arange(74, 111), windows, seed=0, name="real"))


def test_steps_follow_the_papers_formula():
    # S_epoch = 1000 / 10 = 100; E = 4; w_real = 0.25 -> 1600.
    assert steps_for_epochs(1000, 10, 4.0, 0.25) == 1600
    # r = 0.9 written as 1 - 0.9 is 0.09999999999999998: still 16000, not 16001.
    assert steps_for_epochs(1000, 10, 16.0, 1 - 0.9) == 16000
    # A fractional epoch rounds up to whole steps: 1005 / 10 * 1 / 1 = 100.5 -> 101.
    assert steps_for_epochs(1005, 10, 1.0, 1.0) == 101
    assert steps_for_epochs(3, 64, 0.5, 1.0) == 1


def test_plan_report_shows_formula_and_streams():
    streams = tuple(
        StreamPlan(name, f"/stores/{name}", w, int(w * 1000), n, int(w * 6400), n * 10, 3, 0, 0.0)
        for name, w, n in (("real", 0.25, 400), ("synth", 0.75, 900))
    )
    plan = DataPlan(64, 128, "concat", 1000, "real", 4.0, 400 / 64, 100, 100, streams)
    report = str(plan)
    assert "S_epoch = 400 real windows / 64 = 6.25 steps per real epoch" in report
    assert "ceil(6.25 x 4 / 0.25) = 100 steps" in report
    assert "(derived)" in report and "/stores/synth" in report
    assert plan.stream("real").epochs == 1600 / 400
    overridden = DataPlan(64, 128, "concat", 1000, "real", 4.0, 400 / 64, 100, 50, streams)
    assert overridden.steps_overridden and "train.steps" in str(overridden)
