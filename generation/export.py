"""Export: input documents -> tokens + EOS -> a token store; parallel, resumable, with a report.

The main process reads raw records (documents.py) and sends batches of them to worker processes, which
parse, check and tokenize (a Hugging Face fast tokenizer, batched, no special tokens) and append EOS.
Results come back in input order; the main process applies the bad-input policy, drops duplicate ids,
enforces max_tokens and appends the accepted documents to a StoreWriter.

Resume. After every commit (StoreWriter.flush) the exporter writes STORE/export_progress.json: how many
input records are done and how many documents they gave. A rerun on an unfinished store re-reads the
inputs up to that record only to rebuild the set of ids already seen (no tokenization), then skips the
accepted documents the store already holds beyond it, so a killed export finishes with every document
exactly once and the same content hash as an uninterrupted one. The settings that decide which
documents are accepted are recorded there too; a rerun with other settings is refused, except an
--on-error change from error to skip (records already done cannot contain an error-policy reason).

The report (documents, tokens, skipped by reason with example locations) is returned and written to
STORE/export_report.json.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from generation.documents import (
    REASONS,
    BadInputReport,
    Record,
    expand_inputs,
    location,
    parse_policy,
    parse_record,
    read_records,
)
from generation.worker_pool import WorkerPool
from megadoc_jax import storage
from megadoc_jax.data.store import Document, StoreWriter, TokenizerInfo, finished_manifest
from megadoc_jax.files import on_disk_full
from megadoc_jax.storage import read_json, write_json_atomic

PROGRESS_FILE = "export_progress.json"
REPORT_FILE = "export_report.json"
DEFAULT_BATCH_SIZE = 256  # records per worker task: large enough to amortise the inter-process hop
DEFAULT_FLUSH_TOKENS = 1 << 22  # tokens between commits (and progress records)
NO_AUTO_FLUSH = 1 << 62  # the exporter commits itself, at batch boundaries, so progress matches commits


class ExportError(RuntimeError):
    """The export cannot start or continue (settings differ from the unfinished export, inputs changed)."""


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------
# Worker side: parse, check, tokenize, append EOS
# --------------------------------------------------------------------------------------------------

_tokenizer: Any = None
_eos_id: int = -1


def init_worker(tokenizer_json: str, eos_id: int, single_threaded: bool = True) -> None:
    """Load the tokenizer in this process. Pool workers run single-threaded: one process per core."""
    global _tokenizer, _eos_id
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _tokenizer = Tokenizer.from_str(tokenizer_json)
    _eos_id = eos_id


def process_batch(task: tuple[bool, str, str | None, list]) -> tuple[list, np.ndarray | None, np.ndarray | None]:
    """(verdicts [(reason, detail, doc_id)] per record, lengths int64 [good], tokens int32 [sum lengths]).

    Without tokenization (records before the resume point) lengths and tokens are None.
    """
    tokenize, text_field, id_field, payloads = task
    parsed = [parse_record(payload, text_field, id_field) for payload in payloads]
    verdicts = [(p.reason, p.detail, p.doc_id) for p in parsed]
    if not tokenize:
        return verdicts, None, None
    encodings = _tokenizer.encode_batch_fast([p.text for p in parsed if p.reason is None], add_special_tokens=False)
    lengths = np.array([len(e.ids) + 1 for e in encodings], dtype=np.int64)
    tokens = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(e.ids, (_eos_id,)) for e in encodings),
        dtype=np.int32,
        count=int(lengths.sum()),
    )
    return verdicts, lengths, tokens


def export_tokenizer(tokenizer_dir: str | Path) -> tuple[TokenizerInfo, str]:
    """The store's tokenizer identity, and the fast tokenizer (hf.load_tokenizer) as JSON for the workers."""
    from megadoc_jax import hf_tokenizer as hf

    info = TokenizerInfo.from_directory(tokenizer_dir)
    try:
        hf_tokenizer = hf.load_tokenizer(tokenizer_dir)
    except hf.HFError as e:
        raise ExportError(str(e)) from None
    if not getattr(hf_tokenizer, "is_fast", False):
        raise ExportError(f"{tokenizer_dir}: not a fast (Rust) Hugging Face tokenizer")
    if hf_tokenizer.eos_token_id != info.eos_id:
        raise ExportError(
            f"{tokenizer_dir}: AutoTokenizer eos_token_id {hf_tokenizer.eos_token_id} differs from "
            f"tokenizer_config.json eos_token id {info.eos_id}"
        )
    return info, hf_tokenizer.backend_tokenizer.to_str()


# --------------------------------------------------------------------------------------------------
# Main side: policy, duplicates, length limit, writing, progress
# --------------------------------------------------------------------------------------------------


class _ExportState:
    """Counts and seen ids of one export; `progress()` is what a resume restores."""

    def __init__(self, settings: dict[str, Any], progress: dict[str, Any] | None, committed: int, out: storage.AnyPath):
        progress = progress or {}
        self.settings = settings
        self.records_done: int = progress.get("records_done", 0)
        self.documents: int = progress.get("documents", 0)
        self.tokens: int = progress.get("tokens", 0)
        self.tokens_at_start = self.tokens  # for this run's rate
        self.bad_input = BadInputReport(settings["policy"], progress.get("skipped"), progress.get("examples"))
        self.seen_ids: set[str] = set()
        self.resumed_at_document = committed
        self.to_skip = committed - self.documents  # accepted documents the store already holds past records_done
        if self.to_skip < 0:
            raise ExportError(
                f"{out}/{PROGRESS_FILE} records {self.documents} documents but the store committed only {committed}"
            )

    def progress(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "records_done": self.records_done,
            "documents": self.documents,
            "tokens": self.tokens,
            **{key: value for key, value in self.bad_input.to_dict().items() if key != "skipped_total"},
        }


def _check_resumable(out: storage.AnyPath, recorded: dict[str, Any], current: dict[str, Any]) -> None:
    for key in current:
        if key == "policy":
            for reason in REASONS:
                old, new = recorded["policy"].get(reason), current["policy"][reason]
                if old != new and old != "error":
                    raise ExportError(
                        f"{out}: the unfinished export used --on-error {reason}={old}; continuing with "
                        f"{reason}={new} could change documents already written. Delete the store to start over."
                    )
        elif recorded.get(key) != current[key]:
            raise ExportError(
                f"{out}/{PROGRESS_FILE}: setting {key!r} of the unfinished export was {recorded.get(key)!r}, "
                f"now {current[key]!r}; rerun with the same setting, or delete the store to start over"
            )


def _settings(files: list[Path], info: TokenizerInfo, **options: Any) -> dict[str, Any]:
    inputs = [{"path": str(path.resolve()), "bytes": path.stat().st_size} for path in files]
    return {"inputs": inputs, "tokenizer_hash": info.hash, **options}


def export(
    inputs: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out: str | Path | storage.Location,
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    workers: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int = 0,
    on_error: str | dict[str, str] | None = None,
    flush_tokens: int = DEFAULT_FLUSH_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize the documents of `inputs` (JSONL / Parquet paths or globs) into the store `out`.

    id_field None: no ids, no duplicate check. workers 0: in this process. max_tokens 0: no limit.
    on_error: 'reason=error|skip,...' over documents.DEFAULT_POLICY. Returns the report.
    """
    workers = default_workers() if workers is None else workers
    for name, value, low in (("workers", workers, 0), ("batch_size", batch_size, 1), ("max_tokens", max_tokens, 0)):
        if value < low:
            raise ExportError(f"{name} must be >= {low}, got {value}")
    files = expand_inputs(inputs)
    info, tokenizer_json = export_tokenizer(tokenizer_dir)
    out = storage.location(out, "--out")
    settings = _settings(
        files, info, text_field=text_field, id_field=id_field, max_tokens=max_tokens, policy=parse_policy(on_error)
    )
    finished = _finished_report(out, settings)
    if finished is not None:
        return finished

    advice = "free space and rerun the same command: it resumes from the last commit"
    with on_disk_full(out, "writing the store", advice):
        return _export(files, settings, out, info, tokenizer_json, workers, batch_size, flush_tokens, progress)


def _export(
    files: list[Path],
    settings: dict[str, Any],
    out: storage.AnyPath,
    info: TokenizerInfo,
    tokenizer_json: str,
    workers: int,
    batch_size: int,
    flush_tokens: int,
    progress: bool,
) -> dict[str, Any]:
    started = time.monotonic()
    with StoreWriter(out, info, flush_tokens=NO_AUTO_FLUSH) as writer:
        state = _resume(out, settings, writer.num_committed)
        _run(files, settings, writer, state, workers, batch_size, flush_tokens, (tokenizer_json, info.eos_id), progress)
        if state.to_skip:
            raise ExportError(f"{out}: holds {state.to_skip} more documents than the inputs give; inputs changed?")
        seconds = time.monotonic() - started
        report = {
            "store": str(out),
            "inputs": [entry["path"] for entry in settings["inputs"]],
            "documents": state.documents,
            "tokens": state.tokens,
            **state.bad_input.to_dict(),
            "records": state.records_done,
            "resumed_at_document": state.resumed_at_document,
            "seconds": round(seconds, 3),
            "tokens_per_second": round((state.tokens - state.tokens_at_start) / max(seconds, 1e-9), 1),  # this run
            "settings": settings,
        }
        write_json_atomic(out / REPORT_FILE, report)  # before finish: a finished store always has its report
        manifest = writer.finish()
    report["content_hash"] = manifest["content_hash"]
    write_json_atomic(out / REPORT_FILE, report)
    storage.delete(out / PROGRESS_FILE)
    return report


def _finished_report(out: storage.AnyPath, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The report of an already finished export of the same settings (a rerun does nothing), else None."""
    manifest = finished_manifest(out)
    if manifest is None:
        return None
    if not storage.is_file(out / REPORT_FILE):
        raise ExportError(f"{out}: is a finished store not written by export (no {REPORT_FILE}); choose another out")
    report = read_json(out / REPORT_FILE, error=ExportError)
    if report.get("settings") != settings:
        raise ExportError(f"{out}: is already finished, from other inputs or settings; choose another out")
    report["content_hash"] = manifest["content_hash"]
    storage.delete(out / PROGRESS_FILE)
    return report


def _resume(out: storage.AnyPath, settings: dict[str, Any], committed: int) -> _ExportState:
    progress_path = out / PROGRESS_FILE
    progress = read_json(progress_path, error=ExportError) if storage.is_file(progress_path) else None
    if progress is None and committed > 0:
        raise ExportError(f"{out}: unfinished store with {committed} documents but no {PROGRESS_FILE}; not ours")
    if progress is not None:
        _check_resumable(out, progress["settings"], settings)
    state = _ExportState(settings, progress, committed, out)
    write_json_atomic(progress_path, state.progress())  # records the settings before anything is written
    return state


def _run(
    files: list[Path],
    settings: dict[str, Any],
    writer: StoreWriter,
    state: _ExportState,
    workers: int,
    batch_size: int,
    flush_tokens: int,
    init_args: tuple,
    show_progress: bool,
) -> None:
    text_field, id_field, max_tokens = settings["text_field"], settings["id_field"], settings["max_tokens"]
    records = read_records(files, text_field, id_field)
    done_before = state.records_done

    def tasks() -> Iterator[tuple[list[Record], tuple]]:
        # Records already done are only parsed (to rebuild seen ids); batches never straddle that point.
        for tokenize, part in ((False, itertools.islice(records, done_before)), (True, records)):
            while batch := list(itertools.islice(part, batch_size)):
                yield batch, (tokenize, text_field, id_field, [r.payload for r in batch])

    total_bytes = sum(entry["bytes"] for entry in settings["inputs"])
    bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, desc="export", disable=not show_progress)
    started, uncommitted_tokens = time.monotonic(), 0
    with bar, WorkerPool(workers, init_worker, init_args) as pool:
        for batch, (verdicts, lengths, tokens) in pool.map_ordered(process_batch, tasks()):
            redo = lengths is None
            documents = _accept(batch, verdicts, lengths, tokens, state, files, id_field, max_tokens, redo)
            if documents:
                writer.append(documents)
                uncommitted_tokens += sum(d.tokens.size for d in documents)
            if not redo:
                state.records_done += len(batch)
            if uncommitted_tokens >= flush_tokens:
                _commit(writer, state)
                uncommitted_tokens = 0
            bar.update(sum(r.nbytes for r in batch))
            rate = (state.tokens - state.tokens_at_start) / max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"docs={state.documents:,} tokens={state.tokens:,} tok/s={rate:,.0f}", refresh=False)
    _commit(writer, state)


def _accept(
    batch: list[Record],
    verdicts: list[tuple],
    lengths: np.ndarray | None,
    tokens: np.ndarray | None,
    state: _ExportState,
    files: list[Path],
    id_field: str | None,
    max_tokens: int,
    redo: bool,
) -> list[Document]:
    """Documents of one batch to append; counts skips (or raises for error-policy reasons)."""
    documents: list[Document] = []
    ends = np.cumsum(lengths) if lengths is not None else None
    good = 0
    for record, (reason, detail, doc_id) in zip(batch, verdicts):
        if reason is None:
            doc_tokens = None if redo else tokens[ends[good] - lengths[good] : ends[good]]
            good += 1
            if id_field is None:  # the file name (not its directory: keeps the content hash portable) and line
                doc_id = Path(location(files, record.file_index, record.position)).name
            elif doc_id in state.seen_ids:
                reason, detail = "duplicate_id", f"id {doc_id!r} seen before"
            else:
                state.seen_ids.add(doc_id)
            if reason is None and max_tokens and not redo and doc_tokens.size > max_tokens:
                reason, detail = "too_long", f"{doc_tokens.size} tokens (EOS included) > max_tokens {max_tokens}"
        if redo:  # already counted before the resume point; only the seen ids were needed
            continue
        if reason is not None:
            state.bad_input.reject(reason, location(files, record.file_index, record.position), detail)
            continue
        state.documents += 1
        state.tokens += doc_tokens.size
        if state.to_skip:  # committed by the interrupted run
            state.to_skip -= 1
            continue
        documents.append(Document(tokens=doc_tokens, metadata={"source_id": doc_id, "method": "original"}))
    return documents


def _commit(writer: StoreWriter, state: _ExportState) -> None:
    """A durable commit of everything appended, then the progress record that matches it."""
    writer.flush()
    # Once the documents of an interrupted run are skipped, store and count agree, or the inputs changed.
    if not state.to_skip and (writer.num_committed, writer.num_committed_tokens) != (state.documents, state.tokens):
        raise ExportError(
            f"{writer.path}: the store holds {writer.num_committed} documents and {writer.num_committed_tokens} "
            f"tokens where the inputs give {state.documents} and {state.tokens}: did the inputs change?"
        )
    write_json_atomic(writer.path / PROGRESS_FILE, state.progress())
