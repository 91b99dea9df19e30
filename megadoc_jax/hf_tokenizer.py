"""Hugging Face tokenizer directories: the project's one tokenizer loader, and copying one. No JAX, so that
tokenization-only processes (export, the vLLM worker) stay light; megadoc_jax.hf re-exports these names.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_JSON = "tokenizer.json"
# Copied with a tokenizer when present (tokenizer.model is a sentencepiece protobuf, not a pickle).
TOKENIZER_FILES = (
    TOKENIZER_JSON,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)


class HFError(ValueError):
    """A Hugging Face directory that cannot be imported or written; the message names the file."""


def load_tokenizer(directory: str | Path, *, chat_template: str | Path | None = None, trust_remote_code: bool = False):
    """The Hugging Face tokenizer of a local directory (AutoTokenizer, local files only), with the chat
    template of file `chat_template` if given."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / name).is_file() for name in (TOKENIZER_JSON, "tokenizer_config.json")):
        raise HFError(f"no tokenizer in {directory}: {directory / TOKENIZER_JSON} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise HFError(f"cannot load the tokenizer in {directory}: {e}") from e
    if chat_template is not None:
        if not Path(chat_template).is_file():
            raise HFError(f"chat template file {chat_template} does not exist")
        tokenizer.chat_template = Path(chat_template).read_text()
    return tokenizer


def copy_tokenizer(source: str | Path, destination: Path) -> None:
    """Copy the tokenizer files of `source` (which must hold tokenizer.json) into `destination`."""
    source = Path(source)
    if not (source / TOKENIZER_JSON).is_file():
        raise HFError(f"no tokenizer: {source / TOKENIZER_JSON} does not exist")
    destination.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
