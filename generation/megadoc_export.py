"""Megadoc export: source documents + generations -> one token store per (method, G) stream.

    python -m generation megadocs --sources docs.jsonl --generations merged/ --tokenizer TOK \\
        --out OUT --methods simple,stitched-back,stretched --G 4,32

Two phases (docs/megadocs.md):
1. The text spool (megadoc_spool.py): sources and generations are read once, checked, and their texts
   written to OUT/.megadocs-text with numpy indexes, so that every stream reads any text by offset.
2. One store per stream, OUT/<method>-G<G>: megadocs.plan_stream decides the documents and their order;
   worker processes (megadoc_workers.py) tokenize the pieces (batched, no special tokens) and assemble
   tokens and segments; the main process adds the metadata and appends them to a StoreWriter in plan order.

Resume. After every commit the exporter writes STORE/megadocs_progress.json (settings, documents done,
token counts). A rerun re-plans (deterministic), skips the documents recorded there without tokenizing
them, rebuilds (without appending) any the store committed after the last progress record, and goes on.
A finished stream of the same settings is not rebuilt; other settings are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tqdm
from tokenizers import Tokenizer

from generation import megadocs
from generation.documents import EXAMPLES_PER_REASON
from generation.export import DEFAULT_FLUSH_TOKENS, NO_AUTO_FLUSH, default_workers, export_tokenizer
from generation.megadoc_spool import SPOOL_DIR, GenerationGroup, TextSpool, ensure_spool
from generation.megadoc_workers import BatchResult, Unit, WorkerPool, build_batch, init_worker, tokenize_separators
from megadoc_jax import storage
from megadoc_jax.data.store import Document, SegmentKind, StoreWriter, TokenizerInfo, finished_manifest
from megadoc_jax.storage import lock_exclusive, read_json, write_json_atomic

LOCK_FILE = ".megadocs.lock"
PROGRESS_FILE = "megadocs_progress.json"
REPORT_FILE = "megadocs_report.json"
DEFAULT_BATCH_TEXTS = 256  # texts per worker task, as the export's records per task


class MegadocExportError(RuntimeError):
    """A stream cannot be built or resumed (settings differ from the unfinished build, inputs missing)."""


def stream_name(method: str, G: int) -> str:
    return f"{method}-G{G}"


# --------------------------------------------------------------------------------------------------
# One stream
# --------------------------------------------------------------------------------------------------

KIND_NAMES = {kind: kind.name.lower() for kind in SegmentKind}


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """How the streams of one run are built (the CLI flags of docs/megadocs.md)."""

    separators: megadocs.Separators = megadocs.Separators()
    missing: str = "build"  # megadocs.MISSING_POLICIES
    seed: int = 0  # the simple stream's shuffle
    simple_originals: bool = True  # one copy of each original in the simple stream
    batch_texts: int = DEFAULT_BATCH_TEXTS
    flush_tokens: int = DEFAULT_FLUSH_TOKENS
    progress: bool = True

    def settings(self, method: str, G: int) -> dict[str, Any]:
        """What decides the content of the stream (a resume must match it)."""
        simple = megadocs.method_spec(method).one_per_generation  # only the shuffled plan reads these
        return {
            "method": method,
            "G": G,
            "separators": self.separators.used_by(method),
            "missing": self.missing,
            "seed": self.seed if simple else None,
            "simple_originals": self.simple_originals if simple else None,
        }


class _Progress:
    """What a resume restores: documents done and their counts, with the settings they used."""

    def __init__(self, settings: dict[str, Any], recorded: dict[str, Any] | None):
        recorded = recorded or {}
        self.settings = settings
        self.documents: int = recorded.get("documents", 0)
        self.tokens: int = recorded.get("tokens", 0)
        self.tokens_by_kind: dict[str, int] = recorded.get("tokens_by_kind") or dict.fromkeys(KIND_NAMES.values(), 0)
        self.rationales_misplaced: int = recorded.get("rationales_misplaced", 0)
        self.misplaced_examples: list[str] = recorded.get("misplaced_examples", [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "documents": self.documents,
            "tokens": self.tokens,
            "tokens_by_kind": self.tokens_by_kind,
            "rationales_misplaced": self.rationales_misplaced,
            "misplaced_examples": self.misplaced_examples,
        }

    def count(self, batch: BatchResult, metadata: list[dict]) -> None:
        self.documents += batch.lengths.size
        self.tokens += int(batch.lengths.sum())
        for kind in SegmentKind:
            self.tokens_by_kind[KIND_NAMES[kind]] += int(batch.tokens_by_kind[kind])
        self.rationales_misplaced += int(batch.misplaced.sum())
        for i in np.flatnonzero(batch.misplaced)[: EXAMPLES_PER_REASON - len(self.misplaced_examples)]:
            self.misplaced_examples.append(f"source {metadata[i]['source_id']!r}: {int(batch.misplaced[i])} rationales")


def _unit(
    spool: TextSpool, group: GenerationGroup, plan: megadocs.StreamPlan, i: int, separators: megadocs.Separators
) -> tuple[Unit, dict]:
    """The texts a worker needs for document i of the plan, and the document's metadata."""
    source = int(plan.sources[i])
    numbers = plan.numbers(i)
    entries = group.entries(source, numbers)
    unit: Unit = (
        spool.source_text(source) if plan.with_original[i] else None,
        [(int(n), spool.generation_text(e), spool.split_char(e)) for n, e in zip(numbers, entries)],
    )
    metadata = megadocs.document_metadata(
        spool.source_ids[source],
        plan.method,
        plan.G,
        [int(n) for n in numbers],
        [spool.finish_reason(e) for e in entries],
        [spool.generator(e) for e in entries],
        [spool.prompt_version(e) for e in entries],
        separators,
    )
    return unit, metadata


def _tasks(
    spool: TextSpool, group: GenerationGroup, plan: megadocs.StreamPlan, start: int, options: StreamOptions
) -> Iterator[tuple[list[dict], tuple[str, int, list[Unit]]]]:
    """(metadata of each document, worker task) for documents start.. of the plan, about batch_texts texts each."""
    texts_per_document = megadocs.method_spec(plan.method).texts_per_document(plan.G)
    batch_documents = max(1, options.batch_texts // texts_per_document)
    for first in range(start, len(plan), batch_documents):
        last = min(first + batch_documents, len(plan))
        units, metadata = zip(*(_unit(spool, group, plan, i, options.separators) for i in range(first, last)))
        yield list(metadata), (plan.method, plan.G, list(units))


def build_stream(
    spool: TextSpool,
    method: str,
    G: int,
    out: storage.AnyPath,
    info: TokenizerInfo,
    pool: WorkerPool,
    options: StreamOptions,
) -> dict[str, Any]:
    """Build (or resume, or find finished) the store of one stream; returns its report.

    pool: workers initialised with init_worker for `info`'s tokenizer and options.separators.
    """
    settings = {**options.settings(method, G), "tokenizer_hash": info.hash, "spool": spool.identity}
    finished = _finished_report(out, settings)
    if finished is not None:
        return finished
    spec = megadocs.method_spec(method)
    group = spool.group(spec.task, spec.splits(G))
    plan = megadocs.plan_stream(
        method,
        G,
        group.available(),
        missing=options.missing,
        seed=options.seed,
        simple_originals=options.simple_originals,
        source_ids=spool.source_ids,
    )
    started = time.monotonic()
    with StoreWriter(out, info, flush_tokens=NO_AUTO_FLUSH) as writer:
        state = _resume(out, settings, writer.num_committed)
        resumed_at, uncommitted = writer.num_committed, 0
        tasks = _tasks(spool, group, plan, state.documents, options)
        with tqdm.tqdm(
            total=len(plan),
            initial=state.documents,
            unit="doc",
            desc=stream_name(method, G),
            disable=not options.progress,
        ) as bar:
            for metadata, batch in pool.map_ordered(build_batch, tasks):
                ends = np.cumsum(batch.lengths)
                documents = [
                    Document(batch.tokens[end - n : end], meta, segments)
                    for end, n, meta, segments in zip(ends, batch.lengths, metadata, batch.segments)
                ]
                # Documents before writer.num_documents were committed by an interrupted run: count, don't append.
                first_new = max(0, writer.num_documents - state.documents)
                writer.append(documents[first_new:])
                state.count(batch, metadata)
                uncommitted += int(batch.lengths.sum())
                if uncommitted >= options.flush_tokens:
                    _commit(writer, state)
                    uncommitted = 0
                bar.update(len(documents))
        _commit(writer, state)
        report = {
            "store": str(out),
            "stream": stream_name(method, G),
            "method": method,
            "G": G,
            "documents": state.documents,
            "tokens": state.tokens,
            "tokens_by_kind": state.tokens_by_kind,
            "rationales_misplaced": state.rationales_misplaced,
            "misplaced_examples": state.misplaced_examples,
            "plan": plan.counts,
            "inputs": spool.report,
            "resumed_at_document": resumed_at,
            "seconds": round(time.monotonic() - started, 3),
            "settings": settings,
        }
        write_json_atomic(out / REPORT_FILE, report)  # before finish: a finished store always has its report
        report["content_hash"] = writer.finish()["content_hash"]
    write_json_atomic(out / REPORT_FILE, report)
    storage.delete(out / PROGRESS_FILE)
    return report


def _commit(writer: StoreWriter, state: _Progress) -> None:
    """A durable commit of everything appended, then the progress record that matches it."""
    writer.flush()
    if writer.num_committed != state.documents:
        raise MegadocExportError(
            f"{writer.path}: store holds {writer.num_committed} documents, plan gave {state.documents}"
        )
    write_json_atomic(writer.path / PROGRESS_FILE, state.to_dict())


def _finished_report(out: storage.AnyPath, settings: dict[str, Any]) -> dict[str, Any] | None:
    manifest = finished_manifest(out)
    if manifest is None:
        return None
    if not storage.is_file(out / REPORT_FILE):
        raise MegadocExportError(f"{out}: is a finished store not written by megadocs (no {REPORT_FILE})")
    report = read_json(out / REPORT_FILE, error=MegadocExportError)
    if report.get("settings") != settings:
        raise MegadocExportError(
            f"{out}: is already finished, with other inputs or settings; delete it or choose another --out"
        )
    report["content_hash"] = manifest["content_hash"]
    return report


def _resume(out: storage.AnyPath, settings: dict[str, Any], committed: int) -> _Progress:
    path = out / PROGRESS_FILE
    recorded = read_json(path, error=MegadocExportError) if storage.is_file(path) else None
    if recorded is None and committed:
        raise MegadocExportError(f"{out}: unfinished store with {committed} documents but no {PROGRESS_FILE}; not ours")
    if recorded is not None and recorded["settings"] != settings:
        changed = sorted(k for k in settings if recorded["settings"].get(k) != settings[k])
        raise MegadocExportError(
            f"{out}/{PROGRESS_FILE}: the unfinished build used other settings ({', '.join(changed)}); "
            "rerun with the same ones, or delete the store to start over"
        )
    state = _Progress(settings, recorded)
    if state.documents > committed:
        raise MegadocExportError(f"{path} records {state.documents} documents but the store committed only {committed}")
    write_json_atomic(path, state.to_dict())  # records the settings before anything is written
    return state


# --------------------------------------------------------------------------------------------------
# All streams of one run, and the command line
# --------------------------------------------------------------------------------------------------


def build_megadocs(
    sources: Sequence[str | Path],
    generations: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out: str | Path | storage.Location,
    streams: Sequence[tuple[str, int]],
    options: StreamOptions = StreamOptions(),
    *,
    text_field: str = "text",
    id_field: str = "id",
    on_error: str | dict[str, str] | None = None,
    workers: int | None = None,
    keep_spool: bool = False,
) -> list[dict[str, Any]]:
    """Build the store OUT/<method>-G<G> of every (method, G) in `streams`; returns their reports.

    sources: JSONL / Parquet documents (id + text); generations: JSONL / Parquet generation files or
    finished merge directories. on_error: the export's bad-source policy. The spool is removed after
    all streams finish unless keep_spool. One run per OUT at a time (a lock file says so).
    """
    for method, G in streams:
        megadocs.check_method(method, G)
    out = storage.location(out, "--out")
    workers = default_workers() if workers is None else workers
    info, tokenizer_json = export_tokenizer(tokenizer_dir)
    storage.makedirs(out)
    with lock_exclusive(out / LOCK_FILE, holder="another megadocs run", error=MegadocExportError):
        spool = ensure_spool(
            spool_parent(out), sources, generations, text_field=text_field, id_field=id_field, on_error=on_error
        )
        _check_generations_exist(spool, streams)
        used = {name: text for method, _ in streams for name, text in options.separators.used_by(method).items()}
        tokenize_separators(Tokenizer.from_str(tokenizer_json), used)  # refused here, before any worker starts
        with WorkerPool(workers, init_worker, (tokenizer_json, info.eos_id, used)) as pool:
            reports = [build_stream(spool, m, G, out / stream_name(m, G), info, pool, options) for m, G in streams]
        if not keep_spool:
            shutil.rmtree(spool.root)
    return reports


def spool_parent(out: storage.AnyPath) -> Path:
    """Where the spool (memory-mapped, so local) is built: OUT itself for a local OUT; for a URL a local
    scratch directory named after it, so that a rerun on the same host finds the spool built."""
    if isinstance(out, Path):
        return out
    if out.is_local_disk:
        return out.local_path()
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"megadocs-{out.name}-{digest}"


def _check_generations_exist(spool: TextSpool, streams: Sequence[tuple[str, int]]) -> None:
    """A stream whose generations are wholly absent is a mistake in the inputs, not missing samples."""
    for method, G in streams:
        spec = megadocs.method_spec(method)
        splits = spec.splits(G)
        if spool.group(spec.task, splits).size == 0:
            made_for = f" made for G={G} (the inputs have rationales for G in {spool.rationale_Gs()})" if splits else ""
            raise MegadocExportError(
                f"stream {stream_name(method, G)} needs {spec.task} generations{made_for}; none given"
            )


def _unescape(text: str) -> str:
    """'\\n', '\\t' and other backslash escapes typed on a command line; non-ASCII text kept."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def add_subcommand(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "megadocs",
        help="build megadoc streams (simple, stitched, stretched) as token stores",
        description="Build one token store per method and G from source documents and their generations "
        "(docs/megadocs.md). Rerunning resumes unfinished stores and skips finished ones.",
    )
    add = parser.add_argument
    add("--sources", nargs="+", required=True, metavar="DOCS", help="source documents (JSONL / Parquet, id + text)")
    add("--generations", nargs="+", required=True, metavar="GEN", help="generation files or finished merge directories")
    add("--tokenizer", required=True, metavar="TOKDIR", help="Hugging Face tokenizer directory")
    add("--out", required=True, metavar="DIR", help="one store per stream: DIR/<method>-G<G>")
    add("--methods", default=",".join(megadocs.METHODS), help=f"comma-separated, of {', '.join(megadocs.METHODS)}")
    add("--G", default="32", help=f"comma-separated generations per document, each in 1..{megadocs.MAX_G}")
    defaults = megadocs.Separators()
    add("--separator", default=defaults.between, help="between stitched pieces (backslash escapes; '' for none)")
    add("--rationale-open", default=defaults.rationale_open, help="before each rationale of stretched documents")
    add("--rationale-close", default=defaults.rationale_close, help="after each rationale")
    add("--no-separators", action="store_true", help="no separators at all (EOS still ends every document)")
    add(
        "--missing",
        choices=megadocs.MISSING_POLICIES,
        default="build",
        help="a source with fewer than G generations: build with what exists, skip it, or stop",
    )
    add("--seed", type=int, default=0, help="shuffle seed of the simple stream")
    add("--no-simple-originals", action="store_true", help="the simple stream without its copy of each original")
    add("--text-field", default="text")
    add("--id-field", default="id")
    add("--on-error", default=None, metavar="REASON=ACTION,...", help="bad source documents, as for export")
    add("--workers", type=int, default=None, help="tokenizer processes (default: CPU count; 0: this process)")
    add("--batch-texts", type=int, default=DEFAULT_BATCH_TEXTS, help="texts per worker task")
    add("--flush-tokens", type=int, default=DEFAULT_FLUSH_TOKENS, help="tokens between durable commits")
    add("--keep-spool", action="store_true", help=f"keep DIR/{SPOOL_DIR} after the build")
    add("--no-progress", action="store_true")
    parser.set_defaults(run=main)


def main(args: Any) -> int:
    """Run the `megadocs` subcommand from parsed arguments; prints one summary line per stream."""
    separators = (
        megadocs.NO_SEPARATORS
        if args.no_separators
        else megadocs.Separators(
            _unescape(args.separator), _unescape(args.rationale_open), _unescape(args.rationale_close)
        )
    )
    options = StreamOptions(
        separators,
        args.missing,
        args.seed,
        not args.no_simple_originals,
        args.batch_texts,
        args.flush_tokens,
        not args.no_progress,
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    streams = [(method, int(G)) for method in methods for G in args.G.split(",") if G.strip()]
    try:
        reports = build_megadocs(
            args.sources,
            args.generations,
            args.tokenizer,
            args.out,
            streams,
            options,
            text_field=args.text_field,
            id_field=args.id_field,
            on_error=args.on_error,
            workers=args.workers,
            keep_spool=args.keep_spool,
        )
    except (MegadocExportError, megadocs.MissingGenerationsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for report in reports:
        plan = report["plan"]
        print(
            f"{report['store']}: {report['documents']:,} documents, {report['tokens']:,} tokens "
            f"{report['tokens_by_kind']}; "
            f"sources {plan['sources']:,}, incomplete {plan['sources_incomplete']:,} ({plan['generations_missing']:,} "
            f"generations missing), skipped {plan['skipped_incomplete'] + plan['skipped_empty']:,}; "
            f"rationales misplaced {report['rationales_misplaced']:,}"
        )
    if reports:
        print(f"inputs: {json.dumps(reports[0]['inputs'])}")
    return 0
