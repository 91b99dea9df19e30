"""Fixtures of the seqio interop tests: small tokenizers trained here and stores written with them.

These tests need the `seqio` extra (tensorflow); `make test-seqio` builds .venv-seqio and runs them. In an
environment without seqio every module here is skipped with a message (pytest.importorskip).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tensorflow's start-up banner
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tensorflow on CPU, whatever the machine has
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402  (after the environment above, before tensorflow loads)

import pytest  # noqa: E402
import stores  # noqa: E402

from megadoc_jax.data import demo  # noqa: E402


@pytest.fixture(scope="session")
def training_texts() -> list[str]:
    return stores.corpus(120)


@pytest.fixture(scope="session")
def bang_tokenizer(tmp_path_factory, training_texts) -> Path:
    """id 0 is '!', a real token (Llama 3's case); EOS is the last id."""
    return stores.train_bang_tokenizer(training_texts, tmp_path_factory.mktemp("bang-tokenizer"))


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory, training_texts) -> Path:
    """The demo's recipe (megadoc_jax.data.demo.train_tokenizer): id 0 is its EOS, ending every document."""
    return demo.train_tokenizer(training_texts, tmp_path_factory.mktemp("demo-tokenizer"), vocab_size=600)


@pytest.fixture(scope="session")
def bang_store(tmp_path_factory, bang_tokenizer) -> Path:
    """110 documents (some with rationale and rephrase runs) in which '!' (id 0) occurs."""
    return stores.write_store(tmp_path_factory.mktemp("stores") / "bang", bang_tokenizer, stores.corpus(110, skip=120))
