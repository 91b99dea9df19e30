"""Tasks over stores and seqio's decoder-only packing: every packed token comes from the store, in order,
and every real token is weighted in the loss, the tokens of id 0 included (shifted to 1)."""

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="the seqio extra is not installed (make test-seqio installs it)")

import stores  # noqa: E402

from megadoc_jax.data.store import SegmentKind  # noqa: E402
from megadoc_jax.seqio_interop import SegmentMaskingLMFeatureConverter, register_store_task  # noqa: E402

LENGTH = 128


@pytest.fixture
def task(bang_store, bang_tokenizer):
    return register_store_task("test_bang", bang_store, bang_tokenizer, replace=True)


def flat(feature: str, documents) -> np.ndarray:
    return np.concatenate([d[feature] for d in documents])


def test_task_yields_the_store_documents_shifted_by_one(task, bang_store):
    expected = stores.store_documents(bang_store)
    got = list(task.get_dataset(sequence_length=None, shuffle=False).as_numpy_iterator())
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["targets"], b["targets"] + 1)
        np.testing.assert_array_equal(a["targets_segment_kind"], b["targets_segment_kind"] + 1)
        np.testing.assert_array_equal(a["targets_segment_index"], b["targets_segment_index"] + 1)


def test_long_documents_are_cut_into_pieces_not_truncated(task, bang_store):
    expected = stores.store_documents(bang_store)
    assert max(d["targets"].size for d in expected) > 3 * LENGTH  # the cut is exercised
    pieces = list(task.get_dataset(sequence_length={"targets": LENGTH}, shuffle=False).as_numpy_iterator())
    assert all(0 < p["targets"].size <= LENGTH for p in pieces)
    expected_pieces = sum(-(-d["targets"].size // LENGTH) for d in expected)
    assert len(pieces) == expected_pieces
    for feature, shift in (("targets", 1), ("targets_segment_kind", 1), ("targets_segment_index", 1)):
        np.testing.assert_array_equal(flat(feature, pieces), flat(feature, expected) + shift)


def packed_batches(dataset, converter, batch_size=4):
    converted = converter(dataset, {"targets": LENGTH})
    return list(converted.batch(batch_size).as_numpy_iterator())


@pytest.mark.parametrize(
    "make_converter",
    [lambda: seqio.LMFeatureConverter(pack=True), lambda: seqio.DecoderFeatureConverter(pack=True)],
    ids=["LMFeatureConverter", "DecoderFeatureConverter"],
)
def test_packed_batches_hold_every_store_token_with_loss_weight(task, bang_store, make_converter):
    expected = stores.store_documents(bang_store)
    store_tokens = flat("targets", expected)
    dataset = task.get_dataset(sequence_length={"targets": LENGTH}, shuffle=False)
    batches = packed_batches(dataset, make_converter())
    targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
    segments = np.concatenate([b["decoder_segment_ids"] for b in batches])
    weights = np.concatenate([b["decoder_loss_weights"] for b in batches])
    inputs = np.concatenate([b["decoder_input_tokens"] for b in batches])
    positions = np.concatenate([b["decoder_positions"] for b in batches])
    pieces = sum(-(-d["targets"].size // LENGTH) for d in expected)
    assert targets.shape[1] == LENGTH and len(targets) < pieces  # packed: fewer rows than pieces
    real = segments > 0
    # every real position is a store token (+1), in store order, and nothing of the store is missing
    np.testing.assert_array_equal(targets[real], store_tokens + 1)
    assert (targets[~real] == 0).all()
    # every real token is weighted, the '!' tokens (store id 0, here 1) among them; padding is not
    np.testing.assert_array_equal(weights, real.astype(weights.dtype))
    assert (weights[targets == 1] == 1).all() and (targets[real] == 1).sum() == (store_tokens == 0).sum() > 10
    # decoder inputs: the targets shifted right inside each packed piece, 0 at its start
    starts = real & (positions == 0)
    shifted = np.zeros_like(targets)
    shifted[:, 1:] = targets[:, :-1]
    np.testing.assert_array_equal(inputs[real & ~starts], shifted[real & ~starts])
    assert (inputs[starts] == 0).all()


def test_rationale_tokens_can_be_masked_from_the_loss(task, bang_store):
    expected = stores.store_documents(bang_store)
    kinds = flat("targets_segment_kind", expected)
    assert (kinds == SegmentKind.RATIONALE).sum() > 100
    dataset = task.get_dataset(sequence_length={"targets": LENGTH}, shuffle=False)
    batches = packed_batches(dataset, SegmentMaskingLMFeatureConverter(masked_kinds=[SegmentKind.RATIONALE]))
    segments = np.concatenate([b["decoder_segment_ids"] for b in batches])
    weights = np.concatenate([b["decoder_loss_weights"] for b in batches])
    targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
    assert sorted(batches[0]) == sorted(seqio.LMFeatureConverter(pack=True).get_model_feature_lengths({"targets": 1}))
    real = segments > 0
    np.testing.assert_array_equal(targets[real], flat("targets", expected) + 1)
    np.testing.assert_array_equal(weights[real], (kinds != SegmentKind.RATIONALE).astype(weights.dtype))
    assert (weights[~real] == 0).all()
    # with nothing masked it is LMFeatureConverter's weighting
    unmasked = packed_batches(dataset, SegmentMaskingLMFeatureConverter(masked_kinds=()))
    np.testing.assert_array_equal(np.concatenate([b["decoder_loss_weights"] for b in unmasked]), real.astype(int))


def test_the_demo_recipe_tokenizer_keeps_its_eos_id_zero_in_the_loss(demo_tokenizer, tmp_path):
    """The demo tokenizer's EOS is id 0 and ends every document: shifted, each one is a weighted target."""
    store = stores.write_store(tmp_path / "demo", demo_tokenizer, stores.corpus(30, skip=120))
    task = register_store_task("test_demo_eos", store, demo_tokenizer, replace=True)
    assert task.output_features["targets"].vocabulary.eos_id == 1
    dataset = task.get_dataset(sequence_length={"targets": LENGTH}, shuffle=False)
    batches = packed_batches(dataset, seqio.LMFeatureConverter(pack=True))
    targets = np.concatenate([b["decoder_target_tokens"] for b in batches])
    weights = np.concatenate([b["decoder_loss_weights"] for b in batches])
    assert ((targets == 1) & (weights == 1)).sum() == 30  # one EOS per document, all in the loss
