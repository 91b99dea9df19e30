"""The embedded demo data: English text that ships with Python, a tokenizer trained on it, two stores.

The corpus is the interpreter's own documentation, so the demo needs no download:
- pydoc topics (`pydoc_data.topics.topics`, the language reference behind `help('if')`), one document
  per section (headings underlined with '='), long sections cut at paragraph breaks;
- the docstrings of a fixed list of standard-library modules, read from their source files (module
  docstring, then each public function, class and method), one document per module, cut the same way.
Documents are ordered and split deterministically: about HELDOUT_PERCENT of them, chosen by a hash of
the document id, form the held-out split. The content depends only on the Python version.

The tokenizer is a byte-level BPE trained on the train split with the `tokenizers` library (vocabulary
of config.MODEL_SIZES['demo'] size, EOS '<|endoftext|>'), saved as a Hugging Face directory that
`transformers.AutoTokenizer.from_pretrained` loads. The stores are written by `generation.export`, the
same path as real data.

    ensure_demo_stores(root) -> {'tokenizer', 'train_jsonl', 'heldout_jsonl', 'train', 'heldout'}
    ensure_demo_megadocs(root) -> the same plus {'generator', 'generations', 'merged', 'stitched'}

build root/ (and root/synthetic/) on first use (into a temporary directory renamed into place, so an
interrupted build leaves nothing half-made) and afterwards just return the paths. The synthetic stream
(generation/demo.py) is rephrases of every train document by a tiny randomly initialised generator with
the jax backend, stitched back G=2 into a store with the train stores' tokenizer: a random model cannot
rephrase, so it shows the machinery, not the effect. It is built only when a config names it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from megadoc_jax import config as config_lib
from megadoc_jax.config import MODEL_SIZES

DEMO_VOCAB_SIZE: int = MODEL_SIZES["demo"]["vocab_size"]
EOS_TOKEN = "<|endoftext|>"
HELDOUT_PERCENT = 10
MAX_DOCUMENT_CHARS = 8000
COMPLETE_MARKER = "demo.json"  # written last inside the temporary directory, before the rename
SYNTHETIC_DIR = "synthetic"  # root/synthetic: the demo's synthetic stream, built only when a config asks
SYNTHETIC_MARKER = "synthetic.json"
SYNTHETIC_NAMES = ("generator", "generations", "merged", "stitched")  # `demo:` names that need it
DEMO_FORMAT = 1

# Pure-Python modules with substantial English docstrings; fixed so the corpus is deterministic.
DOCSTRING_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools",
    "gettext", "heapq", "http.client", "inspect", "ipaddress", "json", "logging", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "shlex", "shutil", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest.case", "urllib.parse", "uuid",
    "zipfile",
)  # fmt: skip

_SECTION_HEADING = re.compile(r"\n(?=[^\n]+\n=+\n)")  # a line followed by a line of '='
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


log = logging.getLogger(__name__)


class DemoDataError(RuntimeError):
    """The demo directory exists but is not a complete demo build."""


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


@functools.lru_cache(maxsize=None)  # parsing the sources takes about a second; they do not change
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


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = DEMO_VOCAB_SIZE) -> Path:
    """Train a byte-level BPE (vocabulary <= vocab_size, EOS included) and save it as a HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() > vocab_size:
        raise RuntimeError(f"trained vocabulary {tokenizer.get_vocab_size()} exceeds {vocab_size}")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN).save_pretrained(str(out_dir))
    return out_dir


# --------------------------------------------------------------------------------------------------
# Building the demo directory
# --------------------------------------------------------------------------------------------------


def train_demo_tokenizer(out_dir: Path) -> Path:
    """The demo tokenizer alone (trained on the demo's train split), e.g. for benchmarks."""
    train, _ = split_heldout(demo_documents())
    return train_tokenizer((d["text"] for d in train), out_dir)


def demo_paths(root: str | Path) -> dict[str, Path]:
    root = Path(root)
    return {
        "tokenizer": root / "tokenizer",
        "train_jsonl": root / "train.jsonl",
        "heldout_jsonl": root / "heldout.jsonl",
        "train": root / "train",
        "heldout": root / "heldout",
    }


def build_demo_data(out_dir: str | Path, workers: int = 0) -> dict[str, Path]:
    """Write tokenizer, JSONL splits and both stores into out_dir (which must not exist yet)."""
    from generation.export import export

    paths = demo_paths(out_dir)
    Path(out_dir).mkdir(parents=True)
    train, heldout = split_heldout(demo_documents())
    write_jsonl(train, paths["train_jsonl"])
    write_jsonl(heldout, paths["heldout_jsonl"])
    train_tokenizer((d["text"] for d in train), paths["tokenizer"])
    summary: dict[str, object] = {"format": DEMO_FORMAT, "heldout_percent": HELDOUT_PERCENT}
    for split in ("train", "heldout"):
        report = export([paths[f"{split}_jsonl"]], paths["tokenizer"], paths[split], workers=workers, progress=False)
        summary[split] = {key: report[key] for key in ("documents", "tokens", "content_hash")}
    (Path(out_dir) / COMPLETE_MARKER).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return paths


def _build_into_place(target: Path, build: Callable[[Path], None], marker: str) -> None:
    """Run build(tmp) into a temporary directory next to target, then rename it to target, unless target
    exists already. A failed build leaves nothing at target; a concurrent builder's rename may win."""
    if not target.exists():
        log.info("building %s (first use)", target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
        try:
            build(tmp / target.name)
            try:
                os.rename(tmp / target.name, target)
            except OSError:
                if not (target / marker).exists():  # not a concurrent builder that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not (target / marker).exists():
        raise DemoDataError(
            f"{target} exists but has no {marker}: it is not a complete demo build; remove it to rebuild"
        )


def ensure_demo_stores(root: str | Path, workers: int = 0) -> dict[str, Path]:
    """The demo paths under root, building them first if root does not exist yet (idempotent)."""
    root = Path(root)
    _build_into_place(root, lambda out_dir: build_demo_data(out_dir, workers=workers), COMPLETE_MARKER)
    return demo_paths(root)


def ensure_demo_megadocs(root: str | Path, workers: int = 0) -> dict[str, Path]:
    """demo_paths plus the synthetic stream under root/SYNTHETIC_DIR (generation/demo.py: a tiny random
    generator, rephrases with the jax backend, stitched megadocs), each built on first use."""
    from generation import demo as generation_demo  # imports JAX: only when the synthetic stream is asked for

    paths = ensure_demo_stores(root, workers=workers)

    def build(out_dir: Path) -> None:
        summary = generation_demo.build_synthetic(paths["train_jsonl"], paths["tokenizer"], out_dir)
        (out_dir / SYNTHETIC_MARKER).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")

    synthetic_dir = Path(root) / SYNTHETIC_DIR
    _build_into_place(synthetic_dir, build, SYNTHETIC_MARKER)
    return {**paths, **generation_demo.synthetic_paths(synthetic_dir)}


DEMO_PREFIX = "demo:"


def resolve_demo_paths(config: config_lib.Config) -> config_lib.Config:
    """Replaces `demo:NAME` paths by the embedded demo data, built on first use under $MEGADOC_DEMO_DIR
    (default ~/.cache/megadoc_jax/demo): tokenizer, train, heldout; and `stitched` (the synthetic stream,
    built only when some path names one of SYNTHETIC_NAMES)."""
    raw = config_lib.to_dict(config)
    data = raw["data"]
    named = [data["tokenizer"], *(s["store"] for s in data["streams"]), *data["eval_stores"].values()]
    demo_names = {str(path)[len(DEMO_PREFIX):] for path in named if str(path).startswith(DEMO_PREFIX)}
    if not demo_names:
        return config
    root = Path(os.environ.get("MEGADOC_DEMO_DIR", Path.home() / ".cache" / "megadoc_jax" / "demo"))
    ensure = ensure_demo_megadocs if demo_names & set(SYNTHETIC_NAMES) else ensure_demo_stores
    paths = {name: str(path) for name, path in ensure(root).items()}

    def resolve(path: str, key: str) -> str:
        if not path.startswith(DEMO_PREFIX):
            return path
        name = path[len(DEMO_PREFIX):]
        if name not in paths:
            known = sorted({*paths, *SYNTHETIC_NAMES})
            raise config_lib.ConfigError(f"{key}: unknown demo path {path!r}; known: {known}")
        return paths[name]

    data["tokenizer"] = resolve(data["tokenizer"], "data.tokenizer")
    for i, stream in enumerate(data["streams"]):
        stream["store"] = resolve(stream["store"], f"data.streams[{i}].store")
    data["eval_stores"] = {k: resolve(v, f"data.eval_stores.{k}") for k, v in data["eval_stores"].items()}
    return config_lib.from_dict(raw)
