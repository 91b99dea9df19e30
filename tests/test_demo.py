"""The embedded demo data: corpus, held-out split, tokenizer, stores; deterministic and idempotent.

megadoc_jax.data.demo holds the corpus, the tokenizer and the `demo:` paths; generation.demo builds them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from generation import __main__ as cli
from generation import demo as build
from megadoc_jax import config as config_lib
from megadoc_jax.config import MODEL_SIZES
from megadoc_jax.data import demo
from megadoc_jax.data.store import SegmentKind, StoreReader, TokenizerInfo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return build.ensure_demo_stores(tmp_path_factory.mktemp("demo") / "data")


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
    assert build.ensure_demo_stores(built["train"].parent) == built
    assert marker.stat().st_mtime_ns == before  # not rebuilt


def test_building_twice_gives_the_same_content(built, tmp_path):
    again = build.ensure_demo_stores(tmp_path / "again")
    for split in ("train", "heldout"):
        assert (
            StoreReader.open(again[split]).manifest["content_hash"]
            == StoreReader.open(built[split]).manifest["content_hash"]
        )
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
    with pytest.raises(build.DemoDataError, match="not a complete demo build"):
        build.ensure_demo_stores(tmp_path / "partial")

    def failing_build(out_dir, workers=0):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "train.jsonl").write_text("half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_demo_data", failing_build)
    with pytest.raises(KeyboardInterrupt):
        build.ensure_demo_stores(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial"]


def test_cli_demo_data_reports_the_stores(built, synthetic, capsys, monkeypatch):
    assert cli.main(["demo-data", "--out", str(built["train"].parent)]) == 0
    out = capsys.readouterr().out
    assert f"{built['train']}: " in out and "sha256:" in out and f"tokenizer: {built['tokenizer']}" in out
    assert f"{synthetic['stitched']}: " in out
    monkeypatch.setenv(demo.DEMO_DIR_VARIABLE, str(built["train"].parent))  # without --out: where `demo:` looks
    assert cli.main(["demo-data"]) == 0
    assert capsys.readouterr().out == out


# --------------------------------------------------------------------------------------------------
# The synthetic stream: tiny random generator -> rephrases (jax backend) -> merge -> stitched megadocs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(built) -> dict[str, Path]:
    return build.ensure_demo_data(built["train"].parent)


def test_synthetic_stream_is_stitched_megadocs_with_the_real_tokenizer(built, synthetic):
    from generation.merge import read_generations

    assert {k: synthetic[k] for k in built} == built  # the real stores are the same ones
    info = TokenizerInfo.from_directory(built["tokenizer"])
    reader = StoreReader.open(synthetic["stitched"], info)  # refused if the tokenizer differed
    assert reader.manifest["tokenizer"]["hash"] == StoreReader.open(built["train"]).manifest["tokenizer"]["hash"]
    sources = read_jsonl(built["train_jsonl"])
    assert reader.num_documents == len(sources)  # every train document was rephrased G=2 times
    generations = {(g["doc_id"], g["sample"]): g for g in read_generations(synthetic["merged"])}
    G = build.SAMPLES
    assert len(generations) == G * len(sources)
    train = StoreReader.open(built["train"], info)
    for i in (0, reader.num_documents // 2, reader.num_documents - 1):
        document = reader.document(i)
        assert document.metadata["source_id"] == sources[i]["id"] and document.metadata["G"] == G
        kinds = [(s.kind, s.index) for s in document.segments]
        # original, separator, rephrase 1, separator, rephrase 2, EOS (a one-token separator segment).
        assert kinds == [
            (SegmentKind.ORIGINAL, 0),
            (SegmentKind.SEPARATOR, 0),
            (SegmentKind.REPHRASE, 1),
            (SegmentKind.SEPARATOR, 0),
            (SegmentKind.REPHRASE, 2),
            (SegmentKind.SEPARATOR, 0),
        ]
        assert document.segments[-1].length == 1 and sum(s.length for s in document.segments) == len(document.tokens)
        original = train.document(i).tokens[:-1]  # the real document without its EOS
        assert document.tokens[: len(original)].tolist() == original.tolist()
        assert document.tokens[-1] == info.eos_id
        rephrase_lengths = [s.length for s in document.segments if s.kind == SegmentKind.REPHRASE]
        assert all(n > 0 for n in rephrase_lengths)  # re-tokenized text: not bounded by MAX_NEW_TOKENS
        assert all(generations[(sources[i]["id"], k)]["text"] for k in range(G))
    assert (
        json.loads((synthetic["stitched"].parents[1] / demo.SYNTHETIC_MARKER).read_text())["stitched"]["content_hash"]
        == reader.manifest["content_hash"]
    )


def test_synthetic_stream_is_deterministic_and_not_rebuilt(built, synthetic, tmp_path):
    marker = synthetic["stitched"].parents[1] / demo.SYNTHETIC_MARKER
    before = marker.stat().st_mtime_ns
    assert build.ensure_demo_data(built["train"].parent) == synthetic
    assert marker.stat().st_mtime_ns == before  # not rebuilt
    shutil.copytree(built["train"].parent, tmp_path / "again", ignore=shutil.ignore_patterns(demo.SYNTHETIC_DIR))
    again = build.ensure_demo_data(tmp_path / "again")  # the synthetic stream built once more
    assert (
        StoreReader.open(again["stitched"]).manifest["content_hash"]
        == StoreReader.open(synthetic["stitched"]).manifest["content_hash"]
    )


def test_failed_synthetic_build_leaves_the_real_stores_and_no_synthetic_dir(built, tmp_path, monkeypatch):
    root = tmp_path / "root"
    build.ensure_demo_stores(root)

    def failing(train_jsonl, tokenizer_dir, out_dir):
        Path(out_dir).mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_synthetic", failing)
    with pytest.raises(KeyboardInterrupt):
        build.ensure_demo_data(root)
    assert not (root / demo.SYNTHETIC_DIR).exists() and not list(root.glob(".synthetic.building-*"))
    (root / demo.SYNTHETIC_DIR).mkdir()
    with pytest.raises(build.DemoDataError, match="not a complete demo build"):
        build.ensure_demo_data(root)


def test_resolve_finds_the_built_demo_data(built, synthetic, monkeypatch):
    monkeypatch.setenv(demo.DEMO_DIR_VARIABLE, str(built["train"].parent))
    real_only = config_lib.load(None, ["data.tokenizer=demo:tokenizer"])
    assert demo.resolve_demo_paths(real_only).data.tokenizer == str(built["tokenizer"])
    demo_config = config_lib.load(REPO / "configs" / "demo.yaml")
    resolved = demo.resolve_demo_paths(demo_config)
    assert {s.name: s.store for s in resolved.data.streams} == {
        "real": str(built["train"]),
        "synthetic": str(synthetic["stitched"]),
    }
    assert [s.weight for s in resolved.data.streams] == [0.5, 0.5]
    assert dict(resolved.data.eval_stores) == {"heldout": str(built["heldout"])}
    with pytest.raises(config_lib.ConfigError, match="unknown demo path 'demo:nope'.*stitched"):
        demo.resolve_demo_paths(config_lib.load(None, ["data.tokenizer=demo:nope"]))


def test_resolve_never_builds_and_names_the_command_that_does(built, tmp_path, monkeypatch):
    real_only = config_lib.load(None, ["data.tokenizer=demo:tokenizer"])
    demo_config = config_lib.load(REPO / "configs" / "demo.yaml")
    command = re.escape(f"`{demo.BUILD_COMMAND}`")
    assert demo.BUILD_COMMAND == "python -m generation demo-data"

    # The real data only: its names resolve; the synthetic stream is refused, not built.
    root = tmp_path / "real"
    shutil.copytree(built["train"].parent, root, ignore=shutil.ignore_patterns(demo.SYNTHETIC_DIR))
    monkeypatch.setenv(demo.DEMO_DIR_VARIABLE, str(root))
    assert demo.resolve_demo_paths(real_only).data.tokenizer == str(root / "tokenizer")
    with pytest.raises(
        config_lib.ConfigError,
        match=rf"data.streams\[1\].store: demo:stitched .* is not built; build "
        rf"it with {command} .*`make demo` runs it",
    ):
        demo.resolve_demo_paths(demo_config)
    assert not (root / demo.SYNTHETIC_DIR).exists()

    # Nothing built, or a directory that is not a complete build.
    monkeypatch.setenv(demo.DEMO_DIR_VARIABLE, str(tmp_path / "none"))
    with pytest.raises(
        config_lib.ConfigError,
        match=rf"data.tokenizer: demo:tokenizer: .*none is not built; build it "
        rf"with {command}",
    ):
        demo.resolve_demo_paths(real_only)
    assert not (tmp_path / "none").exists()
    (tmp_path / "none").mkdir()
    with pytest.raises(
        config_lib.ConfigError,
        match=rf"not a complete demo build \(no demo.json\); remove it and run "
        rf"{command}",
    ):
        demo.resolve_demo_paths(real_only)
