"""generation export: input formats, bad-input policy, round trip of tokens, resume after kill -9."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import kill_when

from generation import __main__ as cli
from generation import export as export_module
from generation.documents import DEFAULT_POLICY, REASONS, InputError
from generation.export import PROGRESS_FILE, REPORT_FILE, ExportError, export
from megadoc_jax.data import demo
from megadoc_jax.data.store import StoreReader, TokenizerInfo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, str]]:
    return demo.demo_documents()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    return demo.train_tokenizer((d["text"] for d in corpus[:60]), tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def expected_tokens(hf_tokenizer, text: str) -> list[int]:
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"] + [hf_tokenizer.eos_token_id]


def stored_documents(store: Path, tokenizer_dir: Path) -> list:
    reader = StoreReader.open(store, TokenizerInfo.from_directory(tokenizer_dir))
    return [reader.document(i) for i in range(reader.num_documents)]


# --------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------


def test_jsonl_round_trip_with_worker_processes(tmp_path, corpus, tokenizer_dir, hf_tokenizer):
    docs = corpus[:40]
    first_file = write_lines(tmp_path / "a.jsonl", [{"id": d["id"], "text": d["text"]} for d in docs[:25]])
    write_lines(tmp_path / "b.jsonl", [{"id": d["id"], "text": d["text"]} for d in docs[25:]])
    report = export(
        [first_file, tmp_path / "b*.jsonl"], tokenizer_dir, tmp_path / "store", workers=2, batch_size=7, progress=False
    )
    stored = stored_documents(tmp_path / "store", tokenizer_dir)
    assert len(stored) == len(docs) == report["documents"]
    for doc, got in zip(docs, stored):
        assert got.tokens.tolist() == expected_tokens(hf_tokenizer, doc["text"])
        assert got.metadata == {"source_id": doc["id"], "method": "original"}
    assert report["tokens"] == sum(d.tokens.size for d in stored)
    assert report["skipped_total"] == 0
    assert json.loads((tmp_path / "store" / REPORT_FILE).read_text())["content_hash"] == report["content_hash"]
    assert not (tmp_path / "store" / PROGRESS_FILE).exists()


def test_parquet_inputs_by_glob(tmp_path, corpus, tokenizer_dir, hf_tokenizer):
    texts = [d["text"] for d in corpus[:6]]
    pq.write_table(pa.table({"doc": [10, 11, 12], "body": texts[:3]}), tmp_path / "part-0.parquet")
    body = [t.encode() for t in texts[3:]] + [b"caf\xe9", None]  # a binary column: bytes decoded as UTF-8
    pq.write_table(pa.table({"doc": [13, 14, 15, 16, 17], "body": body}), tmp_path / "part-1.parquet")
    report = export(
        [tmp_path / "part-*.parquet"],
        tokenizer_dir,
        tmp_path / "store",
        text_field="body",
        id_field="doc",
        workers=0,
        on_error="missing_text=skip",
        progress=False,
    )
    stored = stored_documents(tmp_path / "store", tokenizer_dir)
    assert [d.metadata["source_id"] for d in stored] == ["10", "11", "12", "13", "14", "15"]
    assert [d.tokens.tolist() for d in stored] == [expected_tokens(hf_tokenizer, t) for t in texts]
    assert report["skipped"]["invalid_utf8"] == 1 and report["skipped"]["missing_text"] == 1
    assert report["examples"]["invalid_utf8"][0].startswith(f"{tmp_path / 'part-1.parquet'} row 3:")
    assert report["examples"]["missing_text"][0].startswith(f"{tmp_path / 'part-1.parquet'} row 4:")


def test_without_id_field_ids_are_file_and_line(tmp_path, tokenizer_dir):
    path = write_lines(tmp_path / "docs.jsonl", [{"text": "one"}, {"text": "one"}])
    export([path], tokenizer_dir, tmp_path / "store", id_field=None, workers=0, progress=False)
    stored = stored_documents(tmp_path / "store", tokenizer_dir)
    assert [d.metadata["source_id"] for d in stored] == ["docs.jsonl:1", "docs.jsonl:2"]


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

LONG_TEXT = "a long document " * 200
BAD_LINES: dict[str, list[bytes | str | dict]] = {
    "malformed": ['{"id": "m1", "text": ', "[1, 2]"],
    "invalid_utf8": [b'{"id": "u1", "text": "caf\xe9"}', '{"id": "u2", "text": "x \\ud800 y"}'],
    "missing_text": [{"id": "t1"}, {"id": "t2", "text": None}],
    "not_string": [{"id": "n1", "text": 42}],
    "empty": [{"id": "e1", "text": " \n "}, ""],
    "bad_id": [{"text": "no id"}, {"id": 1.5, "text": "float id"}],
    "duplicate_id": [{"id": "good", "text": "the same id again"}],
    "too_long": [{"id": "l1", "text": LONG_TEXT}],
}
MAX_TOKENS = 100


def test_every_bad_input_is_skipped_and_counted(tmp_path, tokenizer_dir, hf_tokenizer):
    lines: list = [{"id": "good", "text": "A good document."}]
    for reason in REASONS:
        lines += BAD_LINES[reason]
    lines.append({"id": 7, "text": "An integer id."})
    path = write_lines(tmp_path / "bad.jsonl", lines)
    report = export(
        [path], tokenizer_dir, tmp_path / "store", workers=0, max_tokens=MAX_TOKENS, on_error="all=skip", progress=False
    )
    assert report["skipped"] == {reason: len(BAD_LINES[reason]) for reason in REASONS}
    assert report["records"] == len(lines)
    duplicate_line, blank_line = lines.index(BAD_LINES["duplicate_id"][0]) + 1, lines.index("") + 1
    assert report["examples"]["duplicate_id"] == [f"{path}:{duplicate_line}: id 'good' seen before"]
    assert report["examples"]["empty"][1] == f"{path}:{blank_line}: blank line"
    stored = stored_documents(tmp_path / "store", tokenizer_dir)
    assert [d.metadata["source_id"] for d in stored] == ["good", "7"]
    assert stored[1].tokens.tolist() == expected_tokens(hf_tokenizer, "An integer id.")


@pytest.mark.parametrize("reason", REASONS)
def test_bad_input_error_names_file_and_line(tmp_path, tokenizer_dir, reason):
    good = [{"id": "good", "text": "A good document."}, {"id": "other", "text": "Another one."}]
    path = write_lines(tmp_path / "in.jsonl", good + BAD_LINES[reason][:1])
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}:3: .*\\[{reason}\\]"):
        export(
            [path],
            tokenizer_dir,
            tmp_path / "store",
            workers=0,
            max_tokens=MAX_TOKENS,
            on_error=f"{reason}=error",
            progress=False,
        )


def test_default_policy_stops_on_structure_and_skips_content(tmp_path, tokenizer_dir):
    assert DEFAULT_POLICY["malformed"] == "error" and DEFAULT_POLICY["empty"] == "skip"
    path = write_lines(tmp_path / "in.jsonl", [{"id": "a", "text": ""}, {"id": "b", "text": "fine"}, "{oops"])
    with pytest.raises(InputError, match=f"{path}:3: invalid JSON"):
        export([path], tokenizer_dir, tmp_path / "store", workers=0, progress=False)


def test_bad_paths_and_options_are_named(tmp_path, tokenizer_dir):
    with pytest.raises(InputError, match="matches no file"):
        export([tmp_path / "nothing-*.jsonl"], tokenizer_dir, tmp_path / "s1", progress=False)
    (tmp_path / "x.csv").write_text("id,text\n")
    with pytest.raises(InputError, match="x.csv: unknown format"):
        export([tmp_path / "x.csv"], tokenizer_dir, tmp_path / "s2", progress=False)
    path = write_lines(tmp_path / "in.jsonl", [{"id": "a", "text": "fine"}])
    with pytest.raises(InputError, match="unknown reason 'malformd'"):
        export([path], tokenizer_dir, tmp_path / "s3", on_error="malformd=skip", progress=False)
    with pytest.raises(InputError, match="action must be one of"):
        export([path], tokenizer_dir, tmp_path / "s4", on_error="empty=ignore", progress=False)
    (tmp_path / "corrupt.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="corrupt.parquet: not a readable Parquet file"):
        export([tmp_path / "corrupt.parquet"], tokenizer_dir, tmp_path / "s5", workers=0, progress=False)
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "other-column.parquet")
    with pytest.raises(InputError, match="other-column.parquet row 0: no field 'text'"):
        export([tmp_path / "other-column.parquet"], tokenizer_dir, tmp_path / "s6", workers=0, progress=False)


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------


def manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def test_resume_after_an_input_error_with_a_looser_policy(tmp_path, corpus, tokenizer_dir):
    lines = (
        [{"id": d["id"], "text": d["text"]} for d in corpus[:30]]
        + ["{broken"]
        + [{"id": d["id"], "text": d["text"]} for d in corpus[30:40]]
    )
    path = write_lines(tmp_path / "in.jsonl", lines)
    options = dict(workers=0, batch_size=4, flush_tokens=3000, progress=False)
    with pytest.raises(InputError, match=":31: invalid JSON"):
        export([path], tokenizer_dir, tmp_path / "store", **options)
    assert manifest(tmp_path / "store")["finished"] is False
    with pytest.raises(ExportError, match="setting 'text_field'"):
        export([path], tokenizer_dir, tmp_path / "store", text_field="body", **options)
    with pytest.raises(ExportError, match="empty=skip; continuing with empty=error"):
        export([path], tokenizer_dir, tmp_path / "store", on_error="empty=error", **options)

    resumed = export([path], tokenizer_dir, tmp_path / "store", on_error="malformed=skip", **options)
    fresh = export([path], tokenizer_dir, tmp_path / "fresh", on_error="malformed=skip", **options)
    assert 0 < resumed["resumed_at_document"] <= 30
    assert resumed["content_hash"] == fresh["content_hash"]
    assert (resumed["documents"], resumed["tokens"], resumed["skipped"]) == (
        fresh["documents"],
        fresh["tokens"],
        fresh["skipped"],
    )
    assert resumed["documents"] == 40 and resumed["skipped"]["malformed"] == 1


class Crash(Exception):
    pass


def test_crash_between_commit_and_progress_record(tmp_path, corpus, tokenizer_dir, monkeypatch):
    """The store holds documents the progress record does not count: the resume skips exactly those."""
    path = write_lines(tmp_path / "in.jsonl", [{"id": d["id"], "text": d["text"]} for d in corpus[:30]])
    options = dict(workers=0, batch_size=4, flush_tokens=3000, progress=False)
    progress_writes = []

    def write_json_crashing_on_third_progress(target: Path, value: dict) -> None:
        if target.name == PROGRESS_FILE:
            progress_writes.append(value["documents"])
            if len(progress_writes) == 3:  # the initial record, one commit, then the crash after a commit
                raise Crash()
        real_write_json(target, value)

    real_write_json = export_module.write_json_atomic
    monkeypatch.setattr(export_module, "write_json_atomic", write_json_crashing_on_third_progress)
    with pytest.raises(Crash):
        export([path], tokenizer_dir, tmp_path / "store", **options)
    monkeypatch.undo()
    recorded = json.loads((tmp_path / "store" / PROGRESS_FILE).read_text())["documents"]
    resumed = export([path], tokenizer_dir, tmp_path / "store", **options)
    fresh = export([path], tokenizer_dir, tmp_path / "fresh", **options)
    assert recorded == progress_writes[1] < resumed["resumed_at_document"] == progress_writes[2]
    assert resumed["content_hash"] == fresh["content_hash"]
    assert (resumed["documents"], resumed["tokens"]) == (fresh["documents"], fresh["tokens"]) == (30, fresh["tokens"])


def test_finished_store_rerun_returns_report_and_refuses_other_settings(tmp_path, tokenizer_dir):
    path = write_lines(tmp_path / "in.jsonl", [{"id": "a", "text": "fine"}])
    first = export([path], tokenizer_dir, tmp_path / "store", workers=0, progress=False)
    again = export([path], tokenizer_dir, tmp_path / "store", workers=0, progress=False)
    assert again["content_hash"] == first["content_hash"] and again["documents"] == 1
    with pytest.raises(ExportError, match="already finished"):
        export([path], tokenizer_dir, tmp_path / "store", workers=0, max_tokens=5, progress=False)


def test_kill_9_mid_export_then_rerun_matches_uninterrupted(tmp_path, corpus, tokenizer_dir):
    # The corpus (about 1 s of tokenization, to be caught between the first commit and the end) plus a
    # duplicate and an empty document.
    lines = [{"id": d["id"], "text": d["text"]} for d in corpus]
    lines[50:50] = [{"id": lines[3]["id"], "text": "duplicate"}, {"id": "empty", "text": ""}]
    path = write_lines(tmp_path / "in.jsonl", lines)
    store = tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "generation",
        "export",
        "--input",
        str(path),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(store),
        "--workers",
        "1",
        "--batch-size",
        "4",
        "--flush-tokens",
        "2000",
        "--no-progress",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress_path = store / PROGRESS_FILE
    started = lambda: progress_path.exists() and json.loads(progress_path.read_text())["records_done"] > 0  # noqa: E731
    kill_when(process, started, timeout=240, what="export")
    assert manifest(store)["finished"] is False
    options = dict(workers=0, batch_size=4, flush_tokens=2000, progress=False)  # worker count does not matter
    resumed = export([path], tokenizer_dir, store, **options)
    fresh = export([path], tokenizer_dir, tmp_path / "fresh", **options)
    assert resumed["resumed_at_document"] > 0
    assert resumed["content_hash"] == fresh["content_hash"]
    assert resumed["documents"] == fresh["documents"] == len(lines) - 2
    assert resumed["skipped"] == fresh["skipped"]
    assert resumed["skipped"]["duplicate_id"] == 1 and resumed["skipped"]["empty"] == 1
    assert StoreReader.open(store).verify() == resumed["content_hash"]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_cli_export_prints_summary_and_errors(tmp_path, tokenizer_dir, capsys):
    path = write_lines(tmp_path / "in.jsonl", [{"id": "a", "text": "fine"}, {"id": "b", "text": ""}])
    argv = [
        "export",
        "--input",
        str(path),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(tmp_path / "store"),
        "--workers",
        "0",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 documents" in out and 'skipped 1 records: {"empty": 1}' in out and f"{path}:2: " in out
    assert cli.main(argv + ["--on-error", "empty=error", "--out", str(tmp_path / "s2")]) == 2
    assert f"error: {path}:2: field 'text' is empty" in capsys.readouterr().err


def test_export_to_a_url_store_and_rerun(tmp_path, corpus, tokenizer_dir, hf_tokenizer):
    """--out memory://... (tensorstore's memory kvstore, the object-store code path of megadoc_jax/storage.py)."""
    import uuid

    from megadoc_jax import storage

    docs = corpus[:12]
    source = write_lines(tmp_path / "a.jsonl", [{"id": d["id"], "text": d["text"]} for d in docs])
    url = f"memory://export-{uuid.uuid4().hex}/store"
    report = export([source], tokenizer_dir, url, workers=0, batch_size=5, flush_tokens=50, progress=False)
    stored = stored_documents(url, tokenizer_dir)
    assert [d.tokens.tolist() for d in stored] == [expected_tokens(hf_tokenizer, d["text"]) for d in docs]
    assert report["store"] == url
    assert storage.read_json(storage.location(url) / REPORT_FILE)["content_hash"] == report["content_hash"]
    assert not storage.exists(storage.location(url) / PROGRESS_FILE)
    again = export([source], tokenizer_dir, url, workers=0, progress=False)  # finished: nothing is redone
    assert again["content_hash"] == report["content_hash"]
