"""The text spool of the megadoc export: sources and generations read once, texts addressable by offset.

Every stream needs random access to texts (the simple stream is shuffled globally; a source's
generations may lie anywhere in the generation files), and several streams are built from the same
inputs. So the inputs are read once, checked, and spooled to OUT/.megadocs-text:

    texts.bin     every accepted text, UTF-8, back to back
    index.npz     source spans; generation entries sorted by (task, splits, source, number) with their
                  spans and codes of finish reason, generator and prompt version
    spool.json    the input identity, string tables, source ids and the input report; written last

The spool is built in a temporary directory renamed into place, so a crash leaves none or a whole one;
it is reused while the inputs (paths, sizes, modification times) and reading settings are unchanged.
The caller holds a lock on OUT (one run per OUT at a time).

Sources are read with generation/documents.py (the export's reader and bad-input policy). Generation
records (JSONL or Parquet, one per sample; or a finished merge directory of generation/merge.py) are
read by `parse_generation`; GENERATION_FIELDS names the fields. Problems with generations are counted
with example locations: a source id not among the accepted sources ('orphan'), a second record for the
same key ('duplicate', the first read is kept), an empty text ('empty') or one that is not valid
Unicode ('invalid_utf8'); such a generation is missing.
A record that is not JSON or lacks a required field stops the build, naming its file and line.
"""

from __future__ import annotations

import array
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from generation.documents import (
    EXAMPLES_PER_REASON,
    BadInputReport,
    InputError,
    expand_inputs,
    input_format,
    location,
    parse_policy,
    parse_record,
    read_records,
)
from megadoc_jax.files import read_json, write_json_atomic

SPOOL_DIR = ".megadocs-text"
SPOOL_FORMAT = 1
TASKS = ("rephrase", "rationale")
GENERATION_PROBLEMS = ("orphan", "duplicate", "empty", "invalid_utf8")
GROUP_STRIDE = 1 << 16  # group key = task * GROUP_STRIDE + splits

# Record field -> its name in the generation files (the lines of generation/merge.py's generations.jsonl).
GENERATION_FIELDS = {
    "doc_id": "doc_id",  # the source document's id (string or integer)
    "task": "task",  # "rephrase" or "rationale"
    "sample": "sample",  # 0-based sample index; for a rationale, its split point - 1
    "splits": "G",  # rationales: the G they were made for (the document cut into G+1 chunks)
    "text": "text",
    "finish_reason": "finish_reason",
    "generator": "generator",  # optional: model name (and revision)
    "prompt_version": "prompt_version",  # optional: template name and version
    "split_char": "split_char",  # optional, rationales: character offset of the split in the source text
}
MERGED_FILE = "generations.jsonl"  # inside a merge directory (generation/merge.py)


class Generation(NamedTuple):
    doc_id: str
    task: str
    number: int  # 1-based: rephrase k, or the rationale at split point k
    splits: int  # rationale: its G; rephrase: 0
    text: str
    finish_reason: str
    generator: str  # "" when the record has none
    prompt_version: str  # "" when the record has none
    split_char: int  # rationale: where the generator split the source (characters); -1 unknown


def parse_generation(fields: dict[str, Any], where: str) -> Generation:
    """One generation record as a Generation, or InputError naming `where` and the bad field."""
    names = GENERATION_FIELDS

    def get(key: str, types: type | tuple[type, ...], default: Any = None) -> Any:
        value = fields.get(names[key])
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise InputError(f"{where}: field {names[key]!r} is {value!r}, expected {expected}")
        return value

    task = get("task", str)
    if task not in TASKS:
        raise InputError(f"{where}: field {names['task']!r} is {task!r}, expected one of {TASKS}")
    sample = get("sample", int)
    splits = get("splits", int) if task == "rationale" else 0
    if sample < 0 or (task == "rationale" and not 0 <= sample < splits):
        raise InputError(
            f"{where}: sample {sample} out of range" + (f" for {names['splits']}={splits}" if splits else "")
        )
    return Generation(
        str(get("doc_id", (str, int))),
        task,
        sample + 1,
        splits,
        get("text", str),
        get("finish_reason", str),
        get("generator", str, ""),
        get("prompt_version", str, ""),
        get("split_char", int, -1) if task == "rationale" else -1,
    )


def generation_files(patterns: Sequence[str | Path]) -> list[Path]:
    """Generation files: JSONL / Parquet paths or globs, or finished merge directories (their generations.jsonl)."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if not path.is_dir():
            files += expand_inputs([pattern])
            continue
        manifest = path / "manifest.json"
        if not manifest.is_file() or read_json(manifest, error=InputError).get("finished") is not True:
            raise InputError(f"{path}: a directory that is not a finished merge (no manifest.json with finished true)")
        files.append(path / MERGED_FILE)
    return files


def _generation_fields(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(0-based line or row, fields) of each record of a generation file; blank JSONL lines are skipped."""
    if input_format(path) == "jsonl":
        with open(path, "rb") as f:
            for line_number, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    fields = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise InputError(f"{_location(path, line_number)}: not a JSON record ({e})") from None
                if not isinstance(fields, dict):
                    raise InputError(f"{_location(path, line_number)}: a JSON {type(fields).__name__}, not an object")
                yield line_number, fields
        return
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file ({e})") from e
    columns = [name for name in GENERATION_FIELDS.values() if name in parquet.schema_arrow.names]
    row = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        for fields in batch.to_pylist():
            yield row, fields
            row += 1


# --------------------------------------------------------------------------------------------------
# Building the spool
# --------------------------------------------------------------------------------------------------


def _identity(files: dict[str, list[Path]], options: dict[str, Any]) -> dict[str, Any]:
    inputs = {
        role: [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]
        for role, paths in files.items()
    }
    return {"format": SPOOL_FORMAT, "inputs": inputs, "generation_fields": GENERATION_FIELDS, **options}


class _Codes:
    """A small string table (finish reasons, generators or prompt versions): each string gets an integer code."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._codes: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        if name not in self._codes:
            self._codes[name] = len(self.names)
            self.names.append(name)
        return self._codes[name]


def ensure_spool(
    out: Path,
    sources: Sequence[str | Path],
    generations: Sequence[str | Path],
    *,
    text_field: str = "text",
    id_field: str = "id",
    on_error: str | dict[str, str] | None = None,
) -> TextSpool:
    """The spool of these inputs under out/SPOOL_DIR: reused when complete and the same, else rebuilt."""
    files = {"sources": expand_inputs(sources), "generations": generation_files(generations)}
    policy = parse_policy(on_error)
    identity = _identity(files, {"text_field": text_field, "id_field": id_field, "policy": policy})
    root = out / SPOOL_DIR
    if (root / "spool.json").is_file() and read_json(root / "spool.json", "spool.json")["identity"] == identity:
        return TextSpool(root)
    # A spool of other inputs, or the leftovers of a killed build: only ever our own directories.
    for stale in [root, *out.glob(f"{SPOOL_DIR}.building-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{SPOOL_DIR}.building-", dir=out))
    try:
        _write_spool(tmp, files, identity, text_field, id_field, policy)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TextSpool(root)


ENTRY_COLUMNS = (
    "task",
    "splits",
    "source",
    "number",
    "start",
    "end",
    "finish",
    "generator",
    "prompt",
    "split_char",
    "origin_file",
    "origin_position",
)


class _Problems:
    """Counts of GENERATION_PROBLEMS with the first few locations of each."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(GENERATION_PROBLEMS, 0)
        self.examples: dict[str, list[str]] = {p: [] for p in GENERATION_PROBLEMS}

    def __call__(self, name: str, where: str) -> None:
        self.counts[name] += 1
        if len(self.examples[name]) < EXAMPLES_PER_REASON:
            self.examples[name].append(where)


def _write_spool(
    tmp: Path, files: dict[str, list[Path]], identity: dict, text_field: str, id_field: str, policy: dict
) -> None:
    source_files, source_ids, source_spans, offset = files["sources"], [], [], 0
    bad_sources, problems = BadInputReport(policy), _Problems()
    positions: dict[str, int] = {}
    columns = {name: array.array("q") for name in ENTRY_COLUMNS}
    finish, generator, prompt = _Codes(), _Codes(), _Codes()
    with open(tmp / "texts.bin", "wb") as texts:
        for record in read_records(source_files, text_field, id_field):
            parsed = parse_record(record.payload, text_field, id_field)
            reason, detail = parsed.reason, parsed.detail
            if reason is None and parsed.doc_id in positions:
                reason, detail = "duplicate_id", f"id {parsed.doc_id!r} seen before"
            if reason is not None:
                bad_sources.reject(reason, location(source_files, record.file_index, record.position), detail)
                continue
            data = parsed.text.encode()
            positions[parsed.doc_id] = len(source_ids)
            source_ids.append(parsed.doc_id)
            source_spans.append((offset, offset + len(data)))
            texts.write(data)
            offset += len(data)
        for file_number, path in enumerate(files["generations"]):
            jsonl = input_format(path) == "jsonl"
            for position, fields in _generation_fields(path):
                where = f"{path}:{position + 1}" if jsonl else f"{path} row {position}"  # as _location
                g = parse_generation(fields, where)
                if g.doc_id not in positions:
                    problems("orphan", f"{where}: id {g.doc_id!r}")
                    continue
                if not g.text.strip():
                    problems("empty", where)
                    continue
                try:
                    data = g.text.encode()
                except UnicodeEncodeError as e:  # a lone surrogate escape in the JSON text
                    problems("invalid_utf8", f"{where}: character {e.start}")
                    continue
                row = (
                    TASKS.index(g.task),
                    g.splits,
                    positions[g.doc_id],
                    g.number,
                    offset,
                    offset + len(data),
                    finish(g.finish_reason),
                    generator(g.generator),
                    prompt(g.prompt_version),
                    g.split_char,
                    file_number,
                    position,
                )
                for column, value in zip(columns.values(), row):
                    column.append(value)
                texts.write(data)
                offset += len(data)
        texts.flush()
        os.fsync(texts.fileno())  # durable before spool.json says the spool is complete
    entries = _drop_duplicates(
        {name: np.array(values, dtype=np.int64) for name, values in columns.items()}, files["generations"], problems
    )
    with open(tmp / "index.npz", "wb") as index:
        np.savez(index, source_spans=np.array(source_spans, dtype=np.int64).reshape(-1, 2), **entries)
        index.flush()
        os.fsync(index.fileno())
    report = {
        "sources": len(source_ids),
        "sources_bad": bad_sources.to_dict(),
        "generations": int(entries["task"].size),
        "generation_problems": problems.counts,
        "generation_examples": {name: lines for name, lines in problems.examples.items() if lines},
    }
    spool = {
        "identity": identity,
        "source_ids": source_ids,
        "report": report,
        "finish_reasons": finish.names,
        "generators": generator.names,
        "prompt_versions": prompt.names,
    }
    write_json_atomic(tmp / "spool.json", spool)  # written last: its presence marks a complete spool


def _location(path: Path, position: int) -> str:
    """'path:line' (1-based) for JSONL, 'path row N' (0-based) for Parquet, as documents.location."""
    return f"{path}:{position + 1}" if input_format(path) == "jsonl" else f"{path} row {position}"


def _drop_duplicates(entries: dict[str, np.ndarray], files: list[Path], problems: _Problems) -> dict[str, np.ndarray]:
    """Entries sorted by (task, splits, source, number); of equal keys the first read is kept, the others counted."""
    order = np.lexsort((entries["number"], entries["source"], entries["splits"], entries["task"]))  # stable
    entries = {name: values[order] for name, values in entries.items()}
    keys = np.stack([entries[k] for k in ("task", "splits", "source", "number")], axis=1)
    repeat = np.zeros(keys.shape[0], dtype=bool)
    repeat[1:] = np.all(keys[1:] == keys[:-1], axis=1)
    for i in np.flatnonzero(repeat):
        problems("duplicate", _location(files[entries["origin_file"][i]], int(entries["origin_position"][i])))
    return {name: values[~repeat] for name, values in entries.items()}


# --------------------------------------------------------------------------------------------------
# Reading the spool
# --------------------------------------------------------------------------------------------------


class GenerationGroup:
    """The generations of one task (and for rationales one G) per source, sorted by number."""

    def __init__(self, numbers: np.ndarray, first_entry: int, bounds: np.ndarray) -> None:
        self._numbers = numbers  # int64 [entries of the group], sorted by (source, number)
        self._first_entry = first_entry
        self._bounds = bounds  # int64 [sources + 1]: source s has group entries [bounds[s], bounds[s+1])

    @property
    def size(self) -> int:
        return int(self._numbers.size)

    def available(self) -> list[np.ndarray]:
        """Per source, the distinct numbers of its generations (what megadocs.plan_stream takes)."""
        return [self._numbers[self._bounds[s] : self._bounds[s + 1]] for s in range(self._bounds.size - 1)]

    def entries(self, source: int, numbers: np.ndarray) -> np.ndarray:
        """Spool entry ids of source's generations with these numbers (ascending, and which must exist)."""
        lo, hi = int(self._bounds[source]), int(self._bounds[source + 1])
        found = lo + np.searchsorted(self._numbers[lo:hi], numbers)
        if found.size and (found[-1] >= hi or not np.array_equal(self._numbers[found], numbers)):
            raise KeyError(f"source #{source}: no generation numbered {numbers.tolist()} in the group")
        return self._first_entry + found


class TextSpool:
    """A complete spool: texts by offset, generation entries grouped by (task, splits)."""

    def __init__(self, root: Path) -> None:
        meta = read_json(root / "spool.json", "spool.json")
        self.root = root
        self.source_ids: list[str] = meta["source_ids"]
        self.report: dict[str, Any] = meta["report"]
        self._names = {key: meta[key] for key in ("finish_reasons", "generators", "prompt_versions")}
        digest = hashlib.sha256(json.dumps(meta["identity"], sort_keys=True).encode()).hexdigest()
        self.identity = f"sha256:{digest}"  # what a stream's settings record of its inputs
        with np.load(root / "index.npz") as index:
            self._source_spans = index["source_spans"]
            self._entries = {name: index[name] for name in index.files if name != "source_spans"}
        self._group_keys = self._entries["task"] * GROUP_STRIDE + self._entries["splits"]  # sorted
        with open(root / "texts.bin", "rb") as f:  # the mapping stays valid after the file is closed
            self._texts = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""

    def _text(self, start: int, end: int) -> bytes:
        return self._texts[int(start) : int(end)]

    def source_text(self, source: int) -> bytes:
        return self._text(*self._source_spans[source])

    def generation_text(self, entry: int) -> bytes:
        return self._text(self._entries["start"][entry], self._entries["end"][entry])

    def finish_reason(self, entry: int) -> str:
        return self._names["finish_reasons"][self._entries["finish"][entry]]

    def generator(self, entry: int) -> str:
        return self._names["generators"][self._entries["generator"][entry]]

    def split_char(self, entry: int) -> int:
        return int(self._entries["split_char"][entry])

    def prompt_version(self, entry: int) -> str:
        return self._names["prompt_versions"][self._entries["prompt"][entry]]

    def rationale_Gs(self) -> list[int]:
        """The G values the rationales in the spool were made for."""
        rationale = self._entries["task"] == TASKS.index("rationale")
        return sorted({int(g) for g in np.unique(self._entries["splits"][rationale])})

    def group(self, task: str, splits: int) -> GenerationGroup:
        """Rephrases (splits 0), or the rationales made for G = splits."""
        key = TASKS.index(task) * GROUP_STRIDE + splits
        lo, hi = (int(np.searchsorted(self._group_keys, key, side=side)) for side in ("left", "right"))
        bounds = np.searchsorted(self._entries["source"][lo:hi], np.arange(len(self.source_ids) + 1))
        return GenerationGroup(self._entries["number"][lo:hi], lo, bounds.astype(np.int64))
