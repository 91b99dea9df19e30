"""The DataSource: the documents seqio reads from a store are the store's, token for token, for any
shard count; shuffling is a seeded permutation of a shard."""

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="the seqio extra is not installed (make test-seqio installs it)")

import stores  # noqa: E402

from megadoc_jax.data.store import StoreError, TokenizerInfo  # noqa: E402
from megadoc_jax.seqio_interop import DOCUMENT_FEATURES, StoreDataSource, document_range  # noqa: E402


def as_lists(dataset) -> list[dict[str, np.ndarray]]:
    return list(dataset.as_numpy_iterator())


def assert_same_documents(got: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert sorted(a) == sorted(DOCUMENT_FEATURES), i
        for feature in DOCUMENT_FEATURES:
            assert a[feature].dtype == np.int32, (i, feature)
            np.testing.assert_array_equal(a[feature], b[feature], err_msg=f"document {i}, {feature}")


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 13])
def test_shards_together_are_the_store_token_for_token(bang_store, num_shards):
    expected = stores.store_documents(bang_store)
    assert len(expected) == 110
    source = StoreDataSource({"train": bang_store})
    assert source.supports_arbitrary_sharding and source.num_input_examples("train") == len(expected)
    shards = [
        as_lists(source.get_dataset("train", shuffle=False, shard_info=seqio.ShardInfo(i, num_shards)))
        for i in range(num_shards)
    ]
    assert [len(s) for s in shards] == [len(document_range(len(expected), i, num_shards)) for i in range(num_shards)]
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1  # balanced
    assert_same_documents([d for shard in shards for d in shard], expected)


def test_more_shards_than_documents_leaves_some_empty(bang_store):
    source = StoreDataSource({"train": bang_store})
    assert as_lists(source.get_dataset("train", shuffle=False, shard_info=seqio.ShardInfo(0, 200))) == []
    (only,) = as_lists(source.get_dataset("train", shuffle=False, shard_info=seqio.ShardInfo(199, 200)))
    np.testing.assert_array_equal(only["targets"], stores.store_documents(bang_store)[109]["targets"])
    ranges = [document_range(110, i, 200) for i in range(200)]
    assert [i for r in ranges for i in r] == list(range(110))


def test_the_store_really_has_segments_and_id_zero(bang_store):
    documents = stores.store_documents(bang_store)
    kinds = np.concatenate([d["targets_segment_kind"] for d in documents])
    assert {0, 1, 2} <= set(kinds.tolist())
    assert (np.concatenate([d["targets"] for d in documents]) == 0).sum() > 10


def test_shuffle_is_a_seeded_permutation_of_the_shard(bang_store):
    expected = stores.store_documents(bang_store)
    source = StoreDataSource({"train": bang_store})
    shard = seqio.ShardInfo(1, 3)
    in_order = as_lists(source.get_dataset("train", shuffle=False, shard_info=shard))
    first = as_lists(source.get_dataset("train", shuffle=True, seed=5, shard_info=shard))
    again = as_lists(source.get_dataset("train", shuffle=True, seed=5, shard_info=shard))
    other = as_lists(source.get_dataset("train", shuffle=True, seed=6, shard_info=shard))
    assert_same_documents(first, again)
    key = lambda d: d["targets"].tobytes()
    assert sorted(map(key, first)) == sorted(map(key, in_order)) == sorted(map(key, other))
    assert list(map(key, first)) != list(map(key, in_order)) and list(map(key, first)) != list(map(key, other))
    assert {key(d) for d in in_order} == {key(d) for d in expected[len(expected) // 3 : 2 * len(expected) // 3]}


def test_list_shards_cover_the_documents_once(bang_store):
    source = StoreDataSource({"train": bang_store}, documents_per_shard=40)
    assert source.list_shards("train") == [f"{bang_store}[0:40]", f"{bang_store}[40:80]", f"{bang_store}[80:110]"]


def test_refusals_name_what_is_wrong(bang_store, tmp_path):
    source = StoreDataSource({"train": bang_store})
    with pytest.raises(ValueError, match="split 'validation' is not one of this source's splits"):
        source.get_dataset("validation")
    with pytest.raises(ValueError, match="index 3 of 3 shards"):
        source.get_dataset("train", shard_info=seqio.ShardInfo(3, 3))
    with pytest.raises(StoreError, match="not a token store"):
        StoreDataSource({"train": tmp_path / "missing"})
    other = TokenizerInfo(name="other", hash="sha256:other", vocab_size=601, eos_id=600)
    with pytest.raises(StoreError, match="differs from this run's tokenizer 'other'"):
        StoreDataSource({"train": bang_store}, other)
