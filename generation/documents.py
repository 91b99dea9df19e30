"""Input documents for export: JSONL and Parquet files, parsed record by record under a bad-input policy.

Reading is split in two so that the expensive part runs in worker processes:
- `read_records` (main process) streams raw records in input order: a JSONL line as bytes, or a Parquet
  row as a dict of its text and id columns. It never judges content.
- `parse_record` (worker) turns one raw record into (reason, detail, doc_id, text): reason is None for a
  good document, else one of REASONS.
The main process then applies the policy with `BadInputReport.reject`: each reason is either an error
(InputError naming the file and line or row) or skipped and counted, with the first few locations kept
as examples. Nothing is dropped without being counted.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq

# Why a record may be rejected. docs/export.md explains each one.
REASONS = (
    "malformed",  # JSONL line that is not valid JSON or not a JSON object
    "invalid_utf8",  # bytes that are not UTF-8, or a lone surrogate escape in the JSON text
    "missing_text",  # text field absent or null
    "not_string",  # text field is a number, list, object, ...
    "empty",  # text empty or whitespace only; also a blank JSONL line
    "bad_id",  # id field absent, null, empty, or not a string or integer
    "duplicate_id",  # id seen before in this export (the first occurrence is kept)
    "too_long",  # more tokens (EOS included) than --max-tokens
)
ACTIONS = ("error", "skip")
# Structural problems (wrong file, wrong field name) stop the export; content problems that real web
# dumps contain are skipped and counted.
DEFAULT_POLICY: dict[str, str] = {
    "malformed": "error",
    "invalid_utf8": "skip",
    "missing_text": "error",
    "not_string": "error",
    "empty": "skip",
    "bad_id": "error",
    "duplicate_id": "skip",
    "too_long": "skip",
}
EXAMPLES_PER_REASON = 5
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


class InputError(ValueError):
    """Bad input that the policy says to stop on, or an unusable input path; names the file and line."""


class Record(NamedTuple):
    """One raw input record, not yet parsed."""

    file_index: int  # index into the list of input files
    position: int  # 0-based line (JSONL) or row (Parquet) index in that file
    payload: bytes | dict[str, Any]  # the JSONL line, or the Parquet row's text and id columns
    nbytes: float  # share of the file's bytes, for progress and ETA


class Parsed(NamedTuple):
    reason: str | None  # None: a good document
    detail: str  # what is wrong, for messages
    doc_id: str | None
    text: str | None


# --------------------------------------------------------------------------------------------------
# Input paths and policy
# --------------------------------------------------------------------------------------------------


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Files named by paths or glob patterns, in the order given (each glob sorted), without repeats."""
    if not patterns:
        raise InputError("no input files given")
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        matches = [pattern] if Path(pattern).is_file() else sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise InputError(f"input {pattern!r} matches no file")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise InputError(f"input {match} is a directory; name its files, e.g. {match}/*.jsonl")
            input_format(path)
            if path not in files:
                files.append(path)
    return files


def input_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"input {path}: unknown format {suffix!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[suffix]


def parse_policy(spec: str | dict[str, str] | None) -> dict[str, str]:
    """DEFAULT_POLICY updated by 'reason=action,...' (or a dict); 'all=skip' sets every reason."""
    policy = dict(DEFAULT_POLICY)
    if not spec:
        return policy
    items = spec.items() if isinstance(spec, dict) else (_split_item(part) for part in spec.split(","))
    for reason, action in items:
        if action not in ACTIONS:
            raise InputError(f"--on-error {reason}={action}: action must be one of {ACTIONS}")
        if reason == "all":
            policy = dict.fromkeys(REASONS, action)
        elif reason in REASONS:
            policy[reason] = action
        else:
            raise InputError(f"--on-error: unknown reason {reason!r}; known: {', '.join(REASONS)}, all")
    return policy


def _split_item(part: str) -> tuple[str, str]:
    reason, sep, action = part.strip().partition("=")
    if not sep:
        raise InputError(f"--on-error: {part!r} is not of the form reason=action")
    return reason.strip(), action.strip()


def location(files: Sequence[Path], file_index: int, position: int) -> str:
    """'path:line' (1-based, as editors count) for JSONL; 'path row N' (0-based, as pyarrow counts)."""
    path = files[file_index]
    if input_format(path) == "jsonl":
        return f"{path}:{position + 1}"
    return f"{path} row {position}"


# --------------------------------------------------------------------------------------------------
# Reading (main process)
# --------------------------------------------------------------------------------------------------


def read_records(files: Sequence[Path], text_field: str, id_field: str | None) -> Iterator[Record]:
    """Every record of every file, in order."""
    for file_index, path in enumerate(files):
        if input_format(path) == "jsonl":
            yield from _read_jsonl(file_index, path)
        else:
            yield from _read_parquet(file_index, path, [text_field] + ([id_field] if id_field else []))


def _read_jsonl(file_index: int, path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for position, line in enumerate(f):
            yield Record(file_index, position, line, len(line))


def _read_parquet(file_index: int, path: Path, fields: list[str]) -> Iterator[Record]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"input {path}: not a readable Parquet file ({e})") from e
    present = [name for name in fields if name in parquet.schema_arrow.names]
    row_bytes = path.stat().st_size / max(parquet.metadata.num_rows, 1)
    position = 0
    # A file without the text or id column still yields its rows, so that the policy for
    # missing_text / bad_id decides, with the row named, like for JSONL.
    for batch in parquet.iter_batches(batch_size=4096, columns=present):
        columns = {name: batch.column(name).to_pylist() for name in present}
        for row in range(batch.num_rows):
            yield Record(file_index, position, {name: columns[name][row] for name in present}, row_bytes)
            position += 1


# --------------------------------------------------------------------------------------------------
# Parsing (worker processes)
# --------------------------------------------------------------------------------------------------


def parse_record(payload: bytes | dict[str, Any], text_field: str, id_field: str | None) -> Parsed:
    """Check one raw record; the first failing check in REASONS order gives the reason."""
    if isinstance(payload, bytes):
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return Parsed("invalid_utf8", f"invalid UTF-8 at byte {e.start}", None, None)
        if not line.strip():
            return Parsed("empty", "blank line", None, None)
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            return Parsed("malformed", f"invalid JSON ({e.msg} at column {e.colno})", None, None)
        if not isinstance(fields, dict):
            return Parsed("malformed", f"a JSON {type(fields).__name__}, not an object", None, None)
    else:
        fields = payload

    text = fields.get(text_field)
    if isinstance(text, bytes):  # a Parquet binary column
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            return Parsed("invalid_utf8", f"field {text_field!r}: invalid UTF-8 at byte {e.start}", None, None)
    if text is None:
        return Parsed("missing_text", f"no field {text_field!r} (or it is null)", None, None)
    if not isinstance(text, str):
        return Parsed("not_string", f"field {text_field!r} is a {type(text).__name__}, not a string", None, None)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return Parsed("invalid_utf8", f"field {text_field!r}: unpaired surrogate at character {e.start}", None, None)
    if not text or text.isspace():
        return Parsed("empty", f"field {text_field!r} is empty or whitespace", None, None)

    if id_field is None:
        return Parsed(None, "", None, text)
    doc_id = fields.get(id_field)
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id:
        return Parsed("bad_id", f"field {id_field!r} is {doc_id!r}, not a non-empty string or integer", None, None)
    return Parsed(None, "", doc_id, text)


# --------------------------------------------------------------------------------------------------
# The policy applied, and what it skipped
# --------------------------------------------------------------------------------------------------


class BadInputReport:
    """Counts of skipped records by reason, with example locations; raises for reasons set to 'error'."""

    def __init__(
        self,
        policy: dict[str, str],
        skipped: dict[str, int] | None = None,
        examples: dict[str, list[str]] | None = None,
    ):
        self.policy = policy
        self.skipped = {reason: 0 for reason in REASONS} | (skipped or {})
        self.examples: dict[str, list[str]] = {reason: [] for reason in REASONS} | (examples or {})

    def reject(self, reason: str, where: str, detail: str) -> None:
        if self.policy[reason] == "error":
            raise InputError(
                f"{where}: {detail} [{reason}]; to skip and count such records instead, pass --on-error {reason}=skip"
            )
        self.skipped[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(f"{where}: {detail}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()),
            "examples": {reason: list(lines) for reason, lines in self.examples.items() if lines},
        }
