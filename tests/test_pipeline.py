"""TrainData and evaluation.eval_batches: determinism, resume, hosts, mixture, accounting, validation."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from pipeline_stores import TOKENIZER, VOCAB, make_config, random_documents, write_store

from megadoc_jax.config import ConfigError
from megadoc_jax.data import pipeline
from megadoc_jax.data.store import StoreError, StoreLayout, StoreReader, TokenizerInfo
from megadoc_jax.evaluation import eval_batches
from megadoc_jax.evaluation.loss_windows import concat_plan

SEQ_LEN = 16
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
# Real tokens lie in [1, 50), synthetic ones in [50, 100): a row's stream shows in its tokens.
REAL_TOKENS, SYNTH_TOKENS = (1, 50), (50, VOCAB)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {
        "real": write_store(root / "real", random_documents(150, seed=0, token_range=REAL_TOKENS)),
        "synth": write_store(root / "synth", random_documents(400, seed=1, token_range=SYNTH_TOKENS)),
        "heldout": write_store(root / "heldout", random_documents(80, seed=2)),
    }


def config_for(stores, *, windows="concat", masking=False, batch=8, steps=0, epochs=2.0, r=0.75, seed=7, **data):
    return make_config(
        {"real": (stores["real"], 1 - r), "synth": (stores["synth"], r)},
        data=dict(seq_len=SEQ_LEN, windows=windows, document_masking=masking, real_epochs=epochs, seed=seed, **data),
        train=dict(batch_size=batch, steps=steps),
    )


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def assert_positions_restart_per_segment(batch):
    segments, positions = batch["segment_ids"], batch["positions"]
    continues = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)  # column j goes on from j - 1
    assert (positions[:, 0] == 0).all()
    assert (positions[:, 1:][continues] == positions[:, :-1][continues] + 1).all()
    assert (positions[:, 1:][~continues] == 0).all()


@pytest.mark.parametrize("windows", ["concat", "document"])
def test_batch_format_and_row_consistency(stores, windows):
    data = pipeline.TrainData(config_for(stores, windows=windows))
    batches = [data.batch(step) for step in range(6)]
    batch = {key: np.concatenate([b[key] for b in batches]) for key in BATCH_KEYS}
    assert all(b.keys() == set(BATCH_KEYS) for b in batches)
    dtypes = {"inputs": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32}
    for key, dtype in {**dtypes, "loss_mask": np.float32}.items():
        assert batch[key].dtype == dtype and batch[key].shape == (6 * 8, SEQ_LEN), key
    segments = batch["segment_ids"]
    assert ((segments == 0) == (batch["loss_mask"] == 0)).all()
    if windows == "document":  # positions restart at every document, masked or not
        assert_positions_restart_per_segment(batch)
        assert (segments == 0).any()  # some rows are padded
    else:
        assert (batch["positions"] == np.arange(SEQ_LEN)).all()
        assert (segments[:, 0] == 1).all() and (np.diff(segments, axis=1) >= 0).all()


@pytest.mark.parametrize("streams", [("real",), ("real", "synth")])  # one stream's rows are views of one read
@pytest.mark.parametrize("windows", ["concat", "document"])
def test_batch_arrays_are_contiguous_and_shared_constants_read_only(stores, windows, streams):
    # Strided arrays would be copied when placed on the devices, in the training thread.
    config = make_config(
        {name: (stores[name], 1 / len(streams)) for name in streams},
        data=dict(seq_len=SEQ_LEN, windows=windows),
        train=dict(batch_size=8),
    )
    data = pipeline.TrainData(config)
    first, second = data.batch(0), data.batch(1)
    assert all(array.flags.c_contiguous for array in first.values())
    for key in BATCH_KEYS:  # an array shared between batches (positions 0..L-1, a mask of ones) can't be written
        if np.shares_memory(first[key], second[key]):
            assert not first[key].flags.writeable, key
            with pytest.raises(ValueError, match="read-only"):
                first[key][0, 0] = 1


def test_document_masking_restarts_positions(stores):
    batch = pipeline.TrainData(config_for(stores, masking=True)).batch(0)
    assert_positions_restart_per_segment(batch)
    assert (batch["segment_ids"] > 1).any()  # the windows do hold several documents


def test_resume_gives_the_batches_of_an_uninterrupted_run(stores):
    config = config_for(stores, steps=12)
    uninterrupted = list(pipeline.TrainData(config).iterate(0))
    assert [step for step, _ in uninterrupted] == list(range(12))
    resumed = list(pipeline.TrainData(config).iterate(7, prefetch=1))  # a fresh process, no saved state
    assert [step for step, _ in resumed] == list(range(7, 12))
    for (_, a), (_, b) in zip(uninterrupted[7:], resumed):
        assert_batches_equal(a, b)


@pytest.mark.parametrize("windows", ["concat", "document"])
def test_process_rows_concatenate_to_the_single_process_batch(stores, windows):
    config = config_for(stores, windows=windows)
    whole = pipeline.TrainData(config)
    for hosts in (2, 4):
        parts = [pipeline.TrainData(config, process_index=p, process_count=hosts) for p in range(hosts)]
        for step in (0, 5, 31):
            expected = whole.batch(step)
            pieces = [part.batch(step) for part in parts]
            assert all(piece["inputs"].shape[0] == 8 // hosts for piece in pieces)
            assert_batches_equal(expected, {key: np.concatenate([p[key] for p in pieces]) for key in expected})


def test_batches_depend_on_seed_and_step(stores):
    data = pipeline.TrainData(config_for(stores))
    assert not np.array_equal(data.batch(0)["inputs"], data.batch(1)["inputs"])
    other_seed = pipeline.TrainData(config_for(stores, seed=8))
    assert not np.array_equal(data.batch(0)["inputs"], other_seed.batch(0)["inputs"])


def test_mixture_and_epochs_in_real_batches(stores):
    data = pipeline.TrainData(config_for(stores))
    plan = data.plan
    real_rows = 0
    for _, batch in data.iterate(0):
        real_rows += int((batch["inputs"] < SYNTH_TOKENS[0]).all(axis=1).sum())
    assert real_rows == plan.stream("real").examples
    assert plan.stream("real").examples + plan.stream("synth").examples == plan.total_steps * 8
    # Two real epochs asked for: exact over whole blocks of 1000; the last, partial block of m examples
    # holds a hypergeometric number of real ones (sd ~ sqrt(m w (1 - w))).
    partial = plan.total_steps * 8 % 1000
    assert abs(plan.stream("real").examples - 2 * plan.stream("real").windows) < 6 * np.sqrt(partial * 0.25 * 0.75)


def test_every_window_once_per_epoch(stores):
    config = make_config(
        {"real": (stores["real"], 1.0)}, data=dict(seq_len=SEQ_LEN, real_epochs=1.0), train=dict(batch_size=4)
    )
    data = pipeline.TrainData(config)
    windows = len(data.sources[0])
    rows = np.concatenate([batch["inputs"] for _, batch in data.iterate(0)])[:windows]
    expected = data.sources[0].read_rows(np.arange(windows))["inputs"]
    assert sorted(map(bytes, rows)) == sorted(map(bytes, expected))


def test_plan_accounting(stores):
    data = pipeline.TrainData(config_for(stores, epochs=3.0, r=0.9))
    real_windows = len(data.sources[0])
    plan = data.plan
    assert plan.steps_per_real_epoch == real_windows / 8
    assert plan.total_steps == plan.derived_steps == int(np.ceil(real_windows / 8 * 3.0 / 0.1 - 1e-9))
    synth = plan.stream("synth")
    assert synth.epochs == synth.examples / len(data.sources[1])
    assert f"{plan.total_steps} steps" in str(plan)
    overridden = pipeline.TrainData(config_for(stores, steps=5)).plan
    assert overridden.total_steps == 5 and overridden.steps_overridden
    assert sum(s.examples for s in overridden.streams) == 40


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def test_eval_batches_are_the_evaluate_commands_windows_in_order(stores):
    config = config_for(stores, batch=4)
    store = StoreReader.open(stores["heldout"])
    plan = concat_plan(store, SEQ_LEN)
    batches, whole = eval_batches(stores["heldout"], config, 3)
    assert len(batches) == 3 and not whole
    for b, rows in enumerate(batches):
        assert_batches_equal(rows.batch, plan.read_batch(store, b, 4).batch)
    everything, whole = eval_batches(stores["heldout"], config, 0)  # 0: the whole store
    assert whole and len(everything) == plan.num_batches(4) > 3
    assert sum(int(r.batch["loss_mask"].sum()) for r in everything) == plan.scored_tokens


def test_eval_batches_in_the_document_recipe_start_at_the_store_beginning(stores):
    config = config_for(stores, batch=4)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, eval_recipe="document"))
    batches, _ = eval_batches(stores["heldout"], config, 2)
    first_document = StoreReader.open(stores["heldout"]).document(0).tokens
    n = min(len(first_document), SEQ_LEN)
    np.testing.assert_array_equal(batches[0].batch["targets"][0, :n], first_document[:n])


def test_eval_store_too_small(stores):
    expected = r"train.eval_batches: 1000 batches of train.batch_size=8 rows, but the store .*heldout.* has \d+ rows"
    with pytest.raises(ConfigError, match=expected):
        eval_batches(stores["heldout"], config_for(stores), 1000)


# --------------------------------------------------------------------------------------------------
# Validation: every error names the config key and the store
# --------------------------------------------------------------------------------------------------


def test_store_vocabulary_larger_than_the_model(stores):
    config = make_config({"real": (stores["real"], 1.0)}, data=dict(seq_len=SEQ_LEN), model=dict(vocab_size=VOCAB - 1))
    expected = r"model.vocab_size: 99 is smaller .* 100 of the store .*real \(data.streams\[0\].store\)"
    with pytest.raises(ConfigError, match=expected):
        pipeline.TrainData(config)


@pytest.mark.parametrize(
    "checksum, message",
    [
        (False, r"real: window \d+ \(step \d+, stream 'real'\) holds token id -?\d+, outside"),  # the id check
        (True, r"real: array input_ids/data, chunk \d+ .* cannot be read: the store is damaged"),  # the crc32c
    ],
)
def test_a_damaged_chunk_stops_training_naming_the_store_and_the_window(tmp_path, checksum, message):
    """What a bad disk or a cut copy does: bytes in the middle of a token chunk XOR-ed. Without chunk
    checksums (format 1 stores) the ids decode to garbage and the pipeline's range check stops it."""
    documents = random_documents(150, seed=0, token_range=REAL_TOKENS)
    store = write_store(tmp_path / "real", documents, layout=StoreLayout(checksum=checksum))
    token_array = tmp_path / "real" / "input_ids" / "data"  # the token ids (docs/store.md)
    chunk = max(
        (p for p in token_array.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size
    )
    data = bytearray(chunk.read_bytes())
    middle = StoreReader.open(store).num_tokens * 4 // 2  # the middle of the ids (int32, from the shard's start)
    data[middle : middle + 300] = bytes(b ^ 0x5A for b in data[middle : middle + 300])
    chunk.write_bytes(bytes(data))
    config = make_config({"real": (store, 1.0)}, data=dict(seq_len=SEQ_LEN, real_epochs=1.0), train=dict(batch_size=8))
    train_data = pipeline.TrainData(config)
    with pytest.raises(StoreError, match=message):
        for step in range(train_data.plan.total_steps):
            train_data.batch(step)


def test_stream_too_small_for_one_window(stores, tmp_path):
    tiny = write_store(tmp_path / "tiny", [np.array([5, 6, 0], np.int32)])
    config = make_config({"real": (stores["real"], 0.5), "tiny": (tiny, 0.5)}, data=dict(seq_len=SEQ_LEN))
    with pytest.raises(ConfigError, match=r"data.seq_len: the store .*tiny \(data.streams\[1\].store\) holds 3 tokens"):
        pipeline.TrainData(config)


def test_batch_not_divisible_by_process_count(stores):
    with pytest.raises(ConfigError, match="train.batch_size: 8 is not divisible by the process count 3"):
        pipeline.TrainData(config_for(stores), process_index=0, process_count=3)


def test_tokenizer_mismatch(stores):
    other = TokenizerInfo(name="other", hash="sha256:other", vocab_size=VOCAB, eos_id=0)
    with pytest.raises(StoreError, match=r"data.streams\[0\].store: .*real: manifest.json tokenizer 'test'"):
        pipeline.TrainData(config_for(stores), tokenizer=other)
    pipeline.TrainData(config_for(stores), tokenizer=TOKENIZER)  # the right one is accepted


def test_streams_from_different_tokenizers(stores, tmp_path):
    other = TokenizerInfo(name="other", hash="sha256:other", vocab_size=VOCAB, eos_id=0)
    foreign = write_store(tmp_path / "foreign", random_documents(50, seed=4), tokenizer=other)
    config = make_config({"real": (stores["real"], 0.5), "foreign": (foreign, 0.5)}, data=dict(seq_len=SEQ_LEN))
    with pytest.raises(ConfigError, match=r"data.streams\[1\].store: the store .*foreign has tokenizer"):
        pipeline.TrainData(config)


def test_config_keys_checked(stores):
    with pytest.raises(ConfigError, match="data.streams: no training streams"):
        pipeline.TrainData(make_config({}, data=dict(seq_len=SEQ_LEN)))
    with pytest.raises(ConfigError, match="data.real_stream: 'web' is not one of the stream names"):
        pipeline.TrainData(config_for(stores, real_stream="web"))
    with pytest.raises(ConfigError, match="data.seed: must be >= 0"):
        pipeline.TrainData(make_config({"real": (stores["real"], 1.0)}, data=dict(seq_len=SEQ_LEN, seed=-1)))
    with pytest.raises(StoreError, match=r"data.streams\[0\].store: .*missing: not a token store"):
        pipeline.TrainData(make_config({"real": (stores["real"] + "-missing", 1.0)}, data=dict(seq_len=SEQ_LEN)))


# --------------------------------------------------------------------------------------------------
# Prefetching
# --------------------------------------------------------------------------------------------------


def test_prefetch_keeps_order_and_raises_at_the_failing_step():
    def produce(step):
        if step == 3:
            raise RuntimeError("bad step 3")
        return {"step": np.array([step])}

    seen = []
    with pytest.raises(RuntimeError, match="bad step 3"):
        for step, batch in pipeline.prefetched(produce, range(10), depth=2):
            seen.append((step, int(batch["step"][0])))
    assert seen == [(0, 0), (1, 1), (2, 2)]


def test_closing_the_iterator_stops_the_thread():
    produced = []
    iterator = pipeline.prefetched(lambda step: produced.append(step) or {}, range(10**6), depth=2)
    next(iterator)
    iterator.close()
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())
    assert len(produced) <= 5  # it ran at most a few steps ahead, then stopped
