"""Small token stores for the pipeline tests, written with the real StoreWriter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megadoc_jax.config import Config, from_dict
from megadoc_jax.data.store import Document, StoreLayout, StoreWriter, TokenizerInfo

VOCAB = 100
EOS = 0
TOKENIZER = TokenizerInfo(name="test", hash="sha256:test", vocab_size=VOCAB, eos_id=EOS)


def random_documents(
    count: int, seed: int, *, max_len: int = 40, token_range: tuple[int, int] = (1, VOCAB)
) -> list[np.ndarray]:
    """Documents of 1..max_len tokens ending with EOS, other tokens drawn from token_range."""
    rng = np.random.default_rng(seed)
    return [
        np.append(rng.integers(*token_range, size=rng.integers(0, max_len)), EOS).astype(np.int32) for _ in range(count)
    ]


def write_store(
    path: Path, documents: Sequence[np.ndarray], tokenizer: TokenizerInfo = TOKENIZER, layout: StoreLayout | None = None
) -> str:
    with StoreWriter(path, tokenizer, layout=layout) as writer:
        writer.append(Document(tokens, {}) for tokens in documents)
        writer.finish()
    return str(path)


def make_config(streams: dict[str, tuple[str, float]], **sections: dict) -> Config:
    """A validated Config with the given {name: (store, weight)} streams and section overrides."""
    raw = {key: dict(value) for key, value in sections.items()}
    data = raw.setdefault("data", {})
    data["streams"] = [{"name": n, "store": s, "weight": w} for n, (s, w) in streams.items()]
    raw.setdefault("model", {}).setdefault("vocab_size", VOCAB)
    return from_dict(raw)
