"""The seqio Vocabulary over a Hugging Face tokenizer directory: ids shifted by one so that seqio's pad id
0 is never a real token; encode and decode in Python and inside tf.data."""

import pickle

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="the seqio extra is not installed (make test-seqio installs it)")
tf = pytest.importorskip("tensorflow")

from tokenizers import Tokenizer  # noqa: E402

from megadoc_jax.data.store import TokenizerInfo  # noqa: E402
from megadoc_jax.seqio_interop import HFVocabulary, VocabularyError  # noqa: E402

TEXT = "x != y! Hello, world!"


def tokenizer_ids(directory, text):
    return Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def test_id_zero_is_a_real_token_and_is_shifted_off_padding(bang_tokenizer):
    raw = tokenizer_ids(bang_tokenizer, TEXT)
    assert 0 in raw  # '!' is id 0 in this tokenizer, as in Llama 3
    vocabulary = HFVocabulary(bang_tokenizer)
    info = TokenizerInfo.from_directory(bang_tokenizer)
    assert vocabulary.encode(TEXT) == [i + 1 for i in raw]
    assert 0 not in vocabulary.encode(TEXT) and vocabulary.pad_id == 0
    assert vocabulary.vocab_size == info.vocab_size + 1 and vocabulary.eos_id == info.eos_id + 1
    assert vocabulary.decode(vocabulary.encode(TEXT)) == TEXT
    # seqio's decode: padding is dropped and everything after the first EOS too
    assert vocabulary.decode([0, *vocabulary.encode(TEXT), vocabulary.eos_id, *vocabulary.encode("tail")]) == (
        TEXT + "<|endoftext|>"
    )


def test_encode_and_decode_inside_tf_data(bang_tokenizer):
    vocabulary = HFVocabulary(bang_tokenizer)
    texts = [TEXT, "!", "def f(a, b):\n    return a != b"]
    dataset = tf.data.Dataset.from_tensor_slices(texts).map(lambda s: {"ids": vocabulary.encode_tf(s)})
    encoded = [example["ids"].tolist() for example in dataset.as_numpy_iterator()]
    assert encoded == [vocabulary.encode(t) for t in texts]
    padded = dataset.padded_batch(3, padded_shapes={"ids": [None]}).map(lambda b: vocabulary.decode_tf(b["ids"]))
    assert [t.decode() for t in next(padded.as_numpy_iterator())] == texts  # pad 0 dropped
    # a tf.function graph and seqio's own tokenize preprocessor use the same ops
    features = {"targets": seqio.Feature(vocabulary, add_eos=False)}
    raw = tf.data.Dataset.from_tensor_slices({"targets": texts})
    tokenized = seqio.preprocessors.tokenize(raw, features, copy_pretokenized=False)
    assert [e["targets"].tolist() for e in tokenized.as_numpy_iterator()] == encoded
    assert vocabulary.decode_tf(tf.constant(vocabulary.encode(TEXT))).numpy().decode() == TEXT
    assert vocabulary.encode_tf(tf.constant(texts)).to_list() == encoded


def test_id_offset_zero_is_refused_where_id_zero_is_not_padding(bang_tokenizer, demo_tokenizer):
    with pytest.raises(VocabularyError, match=r"its id 0 is '!', not a pad token .* use id_offset=1"):
        HFVocabulary(bang_tokenizer, id_offset=0)
    with pytest.raises(VocabularyError, match=r"its id 0 is '<\|endoftext\|>'"):
        HFVocabulary(demo_tokenizer, id_offset=0)
    with pytest.raises(VocabularyError, match="id_offset: 2 is not one of"):
        HFVocabulary(bang_tokenizer, id_offset=2)


def test_id_offset_zero_is_accepted_for_a_tokenizer_that_pads_with_zero(bang_tokenizer, tmp_path):
    """A tokenizer whose id 0 is its pad token (T5's layout) may keep its ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bang_tokenizer))
    tokenizer.pad_token = "!"  # id 0 declared the pad token
    tokenizer.save_pretrained(str(tmp_path))
    vocabulary = HFVocabulary(tmp_path, id_offset=0)
    assert vocabulary.vocab_size == TokenizerInfo.from_directory(tmp_path).vocab_size
    assert vocabulary.encode("a b") == tokenizer_ids(tmp_path, "a b")


def test_vocabularies_pickle_and_compare_by_tokenizer(bang_tokenizer, demo_tokenizer):
    vocabulary = HFVocabulary(bang_tokenizer)
    copy = pickle.loads(pickle.dumps(vocabulary))
    assert copy == vocabulary and hash(copy) == hash(vocabulary) and copy.encode(TEXT) == vocabulary.encode(TEXT)
    assert HFVocabulary(demo_tokenizer) != vocabulary
    assert np.asarray(copy.encode(TEXT)).dtype.kind == "i"
