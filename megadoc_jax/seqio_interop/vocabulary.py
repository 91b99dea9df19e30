"""A seqio Vocabulary over a Hugging Face tokenizer directory, with the id shift that frees seqio's pad id 0.

seqio reserves id 0 for padding: LMFeatureConverter's loss weights are `targets != 0`, its decoder inputs
are the targets shifted right with 0 inserted, and packing pads with 0. In many tokenizers id 0 is a real
token (Llama 3: "!"; the demo tokenizer: its EOS), which seqio would then silently drop from the loss. So
the vocabulary shifts every id by `id_offset` (1 by default): model id = tokenizer id + 1, vocab_size + 1,
and id 0 is padding only. `id_offset=0` (the tokenizer's own ids) is accepted only when the tokenizer's own
pad token is id 0 (T5's sentencepiece vocabularies are built that way); anything else is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf

from megadoc_jax import hf_tokenizer
from megadoc_jax.data.store import TokenizerInfo

ID_OFFSETS = (0, 1)


class VocabularyError(ValueError):
    """A tokenizer directory or id offset that cannot make a seqio vocabulary; the message says which."""


class HFVocabulary(seqio.Vocabulary):
    """seqio ids = tokenizer ids + id_offset; id 0 is seqio's padding. Pickles by directory (a tf.data
    worker or seqio's cache job reloads the tokenizer)."""

    def __init__(self, tokenizer_dir: str | Path, id_offset: int = 1) -> None:
        if id_offset not in ID_OFFSETS:
            raise VocabularyError(f"id_offset: {id_offset!r} is not one of {ID_OFFSETS}")
        self.tokenizer_dir = Path(tokenizer_dir)
        self.info = TokenizerInfo.from_directory(self.tokenizer_dir)  # the same identity stores record
        self.id_offset = id_offset
        self._tokenizer = hf_tokenizer.load_tokenizer(self.tokenizer_dir)  # AutoTokenizer, as export uses
        if id_offset == 0 and self._tokenizer.pad_token_id != 0:
            token = self._tokenizer.convert_ids_to_tokens(0)
            raise VocabularyError(
                f"{self.tokenizer_dir}: id_offset=0 keeps the tokenizer's ids, but its id 0 is {token!r}, not a pad "
                f"token (pad_token_id is {self._tokenizer.pad_token_id}): seqio treats id 0 as padding and would drop "
                "every such token from the loss; use id_offset=1 (ids shifted by one, vocab_size + 1)"
            )
        self._backend = self._tokenizer.backend_tokenizer  # the Rust tokenizer: export's encoding exactly
        super().__init__(extra_ids=0)

    def __reduce__(self):
        return (HFVocabulary, (self.tokenizer_dir, self.id_offset))

    def __eq__(self, other: object) -> bool:
        # A Mixture requires its tasks' features to be equal; tasks of one tokenizer make separate instances.
        if not isinstance(other, HFVocabulary):
            return NotImplemented
        return (self.info.hash, self.id_offset) == (other.info.hash, other.id_offset)

    def __hash__(self) -> int:
        return hash((self.info.hash, self.id_offset))

    def __repr__(self) -> str:
        return f"HFVocabulary({str(self.tokenizer_dir)!r}, id_offset={self.id_offset})"

    # ---- seqio's abstract interface -------------------------------------------------------------

    @property
    def eos_id(self) -> int:
        return self.info.eos_id + self.id_offset

    @property
    def unk_id(self) -> int | None:
        unk = self._tokenizer.unk_token_id
        return None if unk is None else unk + self.id_offset

    @property
    def _base_vocab_size(self) -> int:
        return self.info.vocab_size + self.id_offset

    def _encode(self, s: str) -> Sequence[int]:
        ids = self._backend.encode(s, add_special_tokens=False).ids
        return [i + self.id_offset for i in ids]

    def _decode(self, ids: Iterable[int]) -> str:
        # Pad (0) is dropped; with id_offset=0 that is the tokenizer's own pad token.
        tokenizer_ids = [int(i) - self.id_offset for i in ids if int(i) != self.pad_id]
        return self._backend.decode(tokenizer_ids, skip_special_tokens=False)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """A scalar string -> int32 [n] (a rank-1 batch of strings -> a RaggedTensor [batch, None])."""
        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank == 1:
            return tf.map_fn(self._encode_tf, s, fn_output_signature=tf.RaggedTensorSpec(shape=[None], dtype=tf.int32))
        if s.shape.rank != 0:
            raise VocabularyError(
                f"HFVocabulary.encode_tf: expected a scalar or 1-D string tensor, got shape {s.shape}"
            )

        def encode(text: bytes | np.ndarray) -> np.ndarray:  # bytes, or a 0-d object array holding them
            return np.asarray(self._encode(np.asarray(text, dtype=object).item().decode("utf-8")), np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """int ids [..., n] -> strings [...] (one per row), through the Python tokenizer."""
        ids = tf.convert_to_tensor(ids)
        if isinstance(ids, tf.RaggedTensor):
            ids = ids.to_tensor(default_value=self.pad_id)

        def decode(rows: np.ndarray) -> np.ndarray:
            flat = rows.reshape(-1, rows.shape[-1]) if rows.ndim else rows.reshape(1, 0)
            texts = [self._decode(row.tolist()).encode("utf-8") for row in flat]
            return np.array(texts, dtype=object).reshape(rows.shape[:-1])

        texts = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        texts.set_shape(ids.shape[:-1])
        return texts
