"""The embedded demo data: English text that ships with Python, a tokenizer trained on it, and `demo:` paths.

The corpus is the interpreter's own documentation, so the demo needs no download:
- pydoc topics (`pydoc_data.topics.topics`, the language reference behind `help('if')`), one document
  per section (headings underlined with '='), long sections cut at paragraph breaks;
- the docstrings of a fixed list of standard-library modules, read from their source files (module
  docstring, then each public function, class and method), one document per module, cut the same way.
Documents are ordered and split deterministically: about HELDOUT_PERCENT of them, chosen by a hash of
the document id, form the held-out split. The content depends only on the Python version.

The tokenizer is a byte-level BPE trained on the train split with the `tokenizers` library (vocabulary
of config.MODEL_SIZES['demo'] size, EOS '<|endoftext|>'), saved as a Hugging Face directory that
`transformers.AutoTokenizer.from_pretrained` loads.

The demo directory ($MEGADOC_DEMO_DIR, default ~/.cache/megadoc_jax/demo) is built by the generation
stage, `python -m generation demo-data` (generation/demo.py; `make demo` runs it): the JSONL splits,
the tokenizer and the train / held-out stores, written by the same export as real data, and the
synthetic stream under root/synthetic/. This module only knows that directory's layout (demo_paths,
synthetic_paths) and resolves the `demo:NAME` paths of a config to it (resolve_demo_paths); it never
builds it, so megadoc_jax does not depend on the generation stage.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from megadoc_jax import config as config_lib
from megadoc_jax.config import MODEL_SIZES

DEMO_VOCAB_SIZE: int = MODEL_SIZES["demo"]["vocab_size"]
EOS_TOKEN = "<|endoftext|>"
HELDOUT_PERCENT = 10
MAX_DOCUMENT_CHARS = 8000
DEMO_PREFIX = "demo:"  # a config path `demo:NAME` names the demo data (resolve_demo_paths)
DEMO_DIR_VARIABLE = "MEGADOC_DEMO_DIR"
DEFAULT_DEMO_DIR = Path.home() / ".cache" / "megadoc_jax" / "demo"
BUILD_COMMAND = "python -m generation demo-data"
COMPLETE_MARKER = "demo.json"  # written last inside the temporary directory, before the rename
SYNTHETIC_DIR = "synthetic"  # root/synthetic: the demo's synthetic stream
SYNTHETIC_MARKER = "synthetic.json"
SYNTHETIC_NAMES = ("generator", "generations", "merged", "stitched")  # `demo:` names under SYNTHETIC_DIR
SYNTHETIC_STREAM = "stitched-back-G2"  # the store generation/demo.py builds: its METHOD, G = its SAMPLES
DEMO_FORMAT = 1

# Pure-Python modules with substantial English docstrings; fixed so the corpus is deterministic.
DOCSTRING_MODULES = (
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "heapq",
    "http.client",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest.case",
    "urllib.parse",
    "uuid",
    "zipfile",
)

_SECTION_HEADING = re.compile(r"\n(?=[^\n]+\n=+\n)")  # a line followed by a line of '='
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


def demo_documents() -> list[dict[str, str]]:
    """All demo documents as {'id', 'text'}, in a fixed order."""
    from pydoc_data.topics import topics

    documents = []
    for topic in sorted(topics):
        for s, section in enumerate(_SECTION_HEADING.split(topics[topic])):
            documents += _pieces(f"pydoc/{topic}/{s}", section)
    for module_name in DOCSTRING_MODULES:
        documents += _pieces(f"docstrings/{module_name}", _module_text(module_name))
    return documents


@functools.cache  # parsing the sources takes about a second; they do not change
def _module_text(module_name: str) -> str:
    """Docstrings read from the module's source (not from the imported module, which other libraries
    may patch): the module's, then each public top-level function and class with its public methods."""
    source_path = importlib.util.find_spec(module_name).origin
    tree = ast.parse(Path(source_path).read_text(encoding="utf-8"))
    parts = [f"Module {module_name}\n\n{ast.get_docstring(tree) or ''}"]
    for node in _public_definitions(tree):
        parts.append(f"{node.name}\n{ast.get_docstring(node) or ''}".strip())
        if isinstance(node, ast.ClassDef):
            for method in _public_definitions(node):
                parts.append(f"{node.name}.{method.name}\n{ast.get_docstring(method) or ''}".strip())
    return "\n\n".join(part for part in parts if "\n" in part)  # only names that have a docstring


def _public_definitions(node: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [child for child in node.body if isinstance(child, kinds) and not child.name.startswith("_")]


def _pieces(doc_id: str, text: str) -> list[dict[str, str]]:
    """The text as one document, or cut at paragraph breaks into pieces of at most MAX_DOCUMENT_CHARS."""
    text = text.strip()
    if not text:
        return []
    if len(text) <= MAX_DOCUMENT_CHARS:
        return [{"id": doc_id, "text": text}]
    pieces: list[str] = []
    current = ""
    for paragraph in _PARAGRAPH_BREAK.split(text):
        if current and len(current) + 2 + len(paragraph) > MAX_DOCUMENT_CHARS:
            pieces.append(current)
            current = paragraph
        else:
            current = f"{current}\n\n{paragraph}" if current else paragraph
    pieces.append(current)
    return [{"id": f"{doc_id}/{p}", "text": piece} for p, piece in enumerate(pieces)]


def is_heldout(doc_id: str) -> bool:
    """About HELDOUT_PERCENT % of ids, by hash: stable under reordering or adding documents."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def split_heldout(documents: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, heldout), each in the input order."""
    train = [d for d in documents if not is_heldout(d["id"])]
    heldout = [d for d in documents if is_heldout(d["id"])]
    return train, heldout


def write_jsonl(documents: Iterable[dict[str, str]], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps({"id": document["id"], "text": document["text"]}, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], out_dir: Path, vocab_size: int = DEMO_VOCAB_SIZE, *, eos_last: bool = False
) -> Path:
    """Train a byte-level BPE (vocabulary <= vocab_size, EOS included) and save it as a HF directory.
    EOS is id 0; eos_last: EOS is added after training as the last id, so id 0 is the byte '!' (Llama 3's
    layout, where id 0 is a text token: the seqio tests need one)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1 if eos_last else vocab_size,
        min_frequency=2,
        special_tokens=[] if eos_last else [EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if eos_last:
        tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    if tokenizer.get_vocab_size() > vocab_size:
        raise RuntimeError(f"trained vocabulary {tokenizer.get_vocab_size()} exceeds {vocab_size}")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN).save_pretrained(str(out_dir))
    return out_dir


def train_demo_tokenizer(out_dir: Path) -> Path:
    """The demo tokenizer alone (trained on the demo's train split), e.g. for benchmarks."""
    train, _ = split_heldout(demo_documents())
    return train_tokenizer((d["text"] for d in train), out_dir)


# --------------------------------------------------------------------------------------------------
# The demo directory and `demo:` paths
# --------------------------------------------------------------------------------------------------


def demo_root() -> Path:
    """Where the demo data lives: $MEGADOC_DEMO_DIR, default ~/.cache/megadoc_jax/demo."""
    return Path(os.environ.get(DEMO_DIR_VARIABLE, DEFAULT_DEMO_DIR))


def demo_paths(root: str | Path) -> dict[str, Path]:
    """The real data under root (complete when root/COMPLETE_MARKER exists)."""
    root = Path(root)
    return {
        "tokenizer": root / "tokenizer",
        "train_jsonl": root / "train.jsonl",
        "heldout_jsonl": root / "heldout.jsonl",
        "train": root / "train",
        "heldout": root / "heldout",
    }


def synthetic_paths(synthetic_dir: str | Path) -> dict[str, Path]:
    """The synthetic stream under root/SYNTHETIC_DIR (complete when its SYNTHETIC_MARKER exists): the
    generator run directory, the generation workers' output, its merge and the stitched store."""
    synthetic_dir = Path(synthetic_dir)
    return {
        "generator": synthetic_dir / "generator",
        "generations": synthetic_dir / "generations",
        "merged": synthetic_dir / "merged",
        "stitched": synthetic_dir / "megadocs" / SYNTHETIC_STREAM,
    }


def _check_built(directory: Path, marker: str, what: str) -> None:
    if (directory / marker).exists():
        return
    command = f"`{BUILD_COMMAND}` (into ${DEMO_DIR_VARIABLE}, default {DEFAULT_DEMO_DIR}; `make demo` runs it)"
    if directory.exists():
        raise config_lib.ConfigError(
            f"{what}: {directory} exists but is not a complete demo build (no {marker}); remove it and run {command}"
        )
    raise config_lib.ConfigError(f"{what}: {directory} is not built; build it with {command}")


def resolve_demo_path(path: str, key: str) -> str:
    """`demo:NAME` -> the path of that demo data under demo_root() (other paths unchanged). ConfigError,
    naming `key`, for an unknown name or data that is not built (saying which command builds it)."""
    if not path.startswith(DEMO_PREFIX):
        return path
    root = demo_root()
    paths = {**demo_paths(root), **synthetic_paths(root / SYNTHETIC_DIR)}
    name = path[len(DEMO_PREFIX) :]
    if name not in paths:
        raise config_lib.ConfigError(f"{key}: unknown demo path {path!r}; known: {sorted(paths)}")
    _check_built(root, COMPLETE_MARKER, f"{key}: {path}")
    if name in SYNTHETIC_NAMES:
        _check_built(root / SYNTHETIC_DIR, SYNTHETIC_MARKER, f"{key}: {path} (the demo's synthetic stream)")
    return str(paths[name])


def resolve_demo_paths(config: config_lib.Config) -> config_lib.Config:
    """Replaces `demo:NAME` paths by the demo data under demo_root() (resolve_demo_path): tokenizer, train,
    heldout, and the synthetic stream's SYNTHETIC_NAMES (`stitched`)."""
    raw = config_lib.to_dict(config)
    data = raw["data"]
    resolve = resolve_demo_path
    data["tokenizer"] = resolve(data["tokenizer"], "data.tokenizer")
    for i, stream in enumerate(data["streams"]):
        stream["store"] = resolve(stream["store"], f"data.streams[{i}].store")
    data["eval_stores"] = {k: resolve(v, f"data.eval_stores.{k}") for k, v in data["eval_stores"].items()}
    return config_lib.from_dict(raw)
