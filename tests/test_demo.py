"""The embedded demo data: corpus, held-out split, tokenizer, stores; deterministic and idempotent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from generation import __main__ as cli
from megadoc_jax.config import MODEL_SIZES
from megadoc_jax.data import demo
from megadoc_jax.data.store import StoreReader, TokenizerInfo


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return demo.ensure_demo_stores(tmp_path_factory.mktemp("demo") / "data")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_is_deterministic_and_split_by_document():
    documents = demo.demo_documents()
    assert documents == demo.demo_documents()
    ids = [d["id"] for d in documents]
    assert len(set(ids)) == len(ids) > 200
    assert all(d["text"].strip() for d in documents)
    assert sum(len(d["text"]) for d in documents) > 500_000  # enough English for a small model
    train, heldout = demo.split_heldout(documents)
    assert heldout and len(heldout) < len(train)
    assert {d["id"] for d in train}.isdisjoint(d["id"] for d in heldout)
    assert len(train) + len(heldout) == len(documents)


def test_corpus_does_not_depend_on_what_was_imported_or_patched(monkeypatch):
    """Libraries patch the standard library (torch replaces inspect.getfile): the corpus must not change."""
    import inspect

    before = demo.demo_documents()
    monkeypatch.setattr(inspect, "getfile", lambda obj: "patched")
    demo._module_text.cache_clear()
    assert demo.demo_documents() == before


def test_long_texts_are_cut_at_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "x" * 1000 for i in range(20))
    pieces = demo._pieces("doc", text)
    assert len(pieces) > 1 and all(len(p["text"]) <= demo.MAX_DOCUMENT_CHARS for p in pieces)
    assert "\n\n".join(p["text"] for p in pieces) == text
    assert [p["id"] for p in pieces] == [f"doc/{i}" for i in range(len(pieces))]


def test_build_writes_every_path_and_is_idempotent(built):
    for key, path in built.items():
        assert path.exists(), key
    marker = built["train"].parent / demo.COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    assert demo.ensure_demo_stores(built["train"].parent) == built
    assert marker.stat().st_mtime_ns == before  # not rebuilt


def test_building_twice_gives_the_same_content(built, tmp_path):
    again = demo.ensure_demo_stores(tmp_path / "again")
    for split in ("train", "heldout"):
        assert StoreReader.open(again[split]).manifest["content_hash"] == StoreReader.open(built[split]).manifest[
            "content_hash"
        ]
    assert TokenizerInfo.from_directory(again["tokenizer"]) == TokenizerInfo.from_directory(built["tokenizer"])
    assert again["train_jsonl"].read_bytes() == built["train_jsonl"].read_bytes()


def test_tokenizer_reloads_through_autotokenizer(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(built["tokenizer"]))
    info = TokenizerInfo.from_directory(built["tokenizer"])
    assert len(tokenizer) == info.vocab_size <= MODEL_SIZES["demo"]["vocab_size"]
    assert tokenizer.eos_token == demo.EOS_TOKEN and tokenizer.eos_token_id == info.eos_id
    text = read_jsonl(built["heldout_jsonl"])[0]["text"] + " Ünïcödé ☃"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE: lossless on any text
    assert len(ids) < len(text.encode()) / 2  # and it did learn merges


def test_stores_hold_the_jsonl_documents_with_eos(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(built["tokenizer"]))
    info = TokenizerInfo.from_directory(built["tokenizer"])
    for split in ("train", "heldout"):
        documents = read_jsonl(built[f"{split}_jsonl"])
        reader = StoreReader.open(built[split], info)
        assert reader.num_documents == len(documents)
        for i in (0, len(documents) - 1):
            stored = reader.document(i)
            expected = tokenizer(documents[i]["text"], add_special_tokens=False)["input_ids"] + [info.eos_id]
            assert stored.tokens.tolist() == expected
            assert stored.metadata["source_id"] == documents[i]["id"]
    summary = json.loads((built["train"].parent / demo.COMPLETE_MARKER).read_text())
    assert summary["train"]["documents"] == StoreReader.open(built["train"]).num_documents


def test_incomplete_root_is_refused_and_failed_build_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "partial").mkdir()
    with pytest.raises(demo.DemoDataError, match="not a complete demo build"):
        demo.ensure_demo_stores(tmp_path / "partial")

    def failing_build(out_dir, workers=0):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "train.jsonl").write_text("half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_demo_data", failing_build)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_stores(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial"]


def test_cli_demo_data_reports_the_stores(built, capsys):
    assert cli.main(["demo-data", "--out", str(built["train"].parent)]) == 0
    out = capsys.readouterr().out
    assert f"{built['train']}: " in out and "sha256:" in out and f"tokenizer: {built['tokenizer']}" in out
