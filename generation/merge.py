"""Workers' output directories: their format, crash recovery, and `python -m generation merge`.

generation/generate.py writes through `WorkerOutput`; this module owns the on-disk format so that the
writer, its recovery after a kill and the merge that checks everything agree on it:

    OUT/worker-0000i-of-0000N/
        provenance.json   {"format", "identity": {...}, "sessions": [...]}: a restart must match identity
        parts/part-NNNNNN.jsonl   one committed chunk: one line per document, all its samples
        ledger.jsonl      one line per committed chunk, appended after its part is durable (commit point)
        summary.json      written when the worker's shard is done ("finished": true)

`merge` checks that all N workers finished with the same identity, that every part matches its ledger
line (sha256, documents, samples), that each document belongs to its worker's shard and has samples
0..G-1 exactly once, and that no document appears twice; then it writes, into a new directory (built
under a temporary name and renamed into place):

    generations.jsonl   kept samples, one line per sample, documents in input order (independent of N);
                        the fields megadoc_spool.parse_generation reads, plus flags, seeds, token counts
    dropped.jsonl       the samples the flag policy dropped, same layout
    manifest.json       identity, totals, sha256 of generations.jsonl, "finished": true (written last)

`read_generations(merged_dir)` is the reader for the megadoc builders.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from generation.backends import generator_label
from megadoc_jax import files
from megadoc_jax.files import fsync_directory, lock_exclusive, on_disk_full, write_bytes_atomic

FORMAT_VERSION = 1
PROVENANCE, LEDGER, PARTS, SUMMARY, LOCK = "provenance.json", "ledger.jsonl", "parts", "summary.json", ".lock"
WORKER_NAME = re.compile(r"worker-(\d{5})-of-(\d{5})$")
EXAMPLES = 5
# Identity keys that differ between the workers of one job.
PER_WORKER_KEYS = ("worker_index",)


class OutputError(RuntimeError):
    """A damaged, incomplete or mismatched output; the message names the directory, file or field."""


def shard_of(doc_id: str, num_workers: int) -> int:
    """The worker of a document: a hash of its id (so repeats of an id land on one worker)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") % num_workers


def worker_dir(out: str | Path, worker_index: int, num_workers: int) -> Path:
    return Path(out) / f"worker-{worker_index:05d}-of-{num_workers:05d}"


# --------------------------------------------------------------------------------------------------
# Durable writes
# --------------------------------------------------------------------------------------------------


def append_line(path: Path, entry: dict) -> None:
    """Append one JSON line with its newline, then fsync. A write that cannot finish (a full disk writes
    part of the line, then fails) is undone, the file cut back to its old end: no torn line stays behind
    for the next commit to append after."""
    data = memoryview(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def read_ledger(path: Path, *, repair: bool) -> list[dict]:
    """Ledger entries. Only newline-ended lines count: a kill mid-append leaves a last line without
    its newline, whose chunk was never committed. With repair that torn tail is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    entries = []
    for number, line in enumerate(data[:complete].splitlines(), 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise OutputError(f"{path}:{number}: corrupt ledger line") from None
    if complete < len(data):
        if not repair:
            raise OutputError(f"{path}: torn last line (a killed worker); rerun that worker to repair it")
        with open(path, "r+b") as f:
            f.truncate(complete)
            os.fsync(f.fileno())
    return entries


def read_json(path: Path) -> dict:
    """A JSON object of an output directory; OutputError naming the file if it is missing or not JSON."""
    return files.read_json(path, error=OutputError)


# --------------------------------------------------------------------------------------------------
# Writing one worker's output
# --------------------------------------------------------------------------------------------------


class WorkerOutput:
    """One worker's directory opened for writing: locked, checked against the job, recovered."""

    def __init__(self, directory: str | Path, identity: dict[str, Any]):
        self.dir = Path(directory)
        (self.dir / PARTS).mkdir(parents=True, exist_ok=True)
        holder = "another process writing this worker's output"
        self._lock = lock_exclusive(self.dir / LOCK, holder=holder, error=OutputError)
        try:
            self.provenance = self._open_provenance(identity)
            self.entries = read_ledger(self.dir / LEDGER, repair=True)
            self._recover()
        except BaseException:
            self.close()
            raise

    @property
    def last_position(self) -> int:
        """Input position of the last record consumed by a committed chunk (-1: none yet)."""
        return self.entries[-1]["last_position"] if self.entries else -1

    @property
    def finished(self) -> bool:
        return (self.dir / SUMMARY).exists() and read_json(self.dir / SUMMARY).get("finished") is True

    def add_session(self, session: dict[str, Any]) -> None:
        self.provenance["sessions"].append(session)
        with self._on_disk_full(f"writing {PROVENANCE}"):
            write_bytes_atomic(self.dir / PROVENANCE, _dumps(self.provenance))

    def commit(self, records: list[dict], stats: dict, last_position: int, wall_seconds: float, devices: dict) -> None:
        """Make one chunk durable: its part (if it has documents), then its ledger line. A full disk raises
        DiskFullError; the chunk is then not committed, and a rerun generates it again."""
        with self._on_disk_full(f"committing chunk {len(self.entries)}"):
            self._commit(records, stats, last_position, wall_seconds, devices)

    def _commit(self, records: list[dict], stats: dict, last_position: int, wall_seconds: float, devices: dict) -> None:
        chunk = len(self.entries)
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
        part = f"part-{chunk:06d}.jsonl" if records else None
        if part:
            write_bytes_atomic(self.dir / PARTS / part, data)
        entry = {
            "chunk": chunk,
            "part": part,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "last_position": last_position,
            "keys": [[r["doc_id"], len(r["samples"])] for r in records],
            "stats": stats,
            "wall_seconds": wall_seconds,
            "devices": devices,
        }
        append_line(self.dir / LEDGER, entry)
        self.entries.append(entry)

    def finish(self) -> dict[str, Any]:
        summary = {"finished": True, **summarize(self.entries)}
        with self._on_disk_full(f"writing {SUMMARY}"):
            write_bytes_atomic(self.dir / SUMMARY, _dumps(summary))
        return summary

    def _on_disk_full(self, writing: str):
        advice = "free space and rerun the same command: it resumes after the last committed chunk"
        return on_disk_full(self.dir, writing, advice)

    def close(self) -> None:
        self._lock.release()

    def _open_provenance(self, identity: dict[str, Any]) -> dict[str, Any]:
        path = self.dir / PROVENANCE
        if not path.exists():
            provenance = {"format": FORMAT_VERSION, "identity": identity, "sessions": []}
            write_bytes_atomic(path, _dumps(provenance))
            return provenance
        provenance = read_json(path)
        differences = diff_keys(provenance.get("identity", {}), identity)
        if differences:
            raise OutputError(
                f"{path}: this output was made by another job; differing: {', '.join(differences)}. "
                f"Use another --output directory, or the original settings to resume"
            )
        return provenance

    def _recover(self) -> None:
        """Delete what no ledger line commits (temporary files, parts renamed just before a kill)."""
        committed = {e["part"]: e for e in self.entries if e["part"]}
        for path in list(self.dir.glob("*.tmp")) + list((self.dir / PARTS).iterdir()):
            if path.name not in committed:
                path.unlink()
        for name, entry in committed.items():
            path = self.dir / PARTS / name
            if not path.exists() or path.stat().st_size != entry["bytes"]:
                raise OutputError(f"{path}: committed part is missing or has the wrong size; the output is damaged")


def _dumps(value: dict) -> bytes:
    return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode()


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "(root)"]


def add_counts(total: dict, part: dict) -> dict:
    """Add nested counts: numbers add, dicts recurse, example lists concatenate (at most EXAMPLES)."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        elif isinstance(value, list):
            total[key] = (total.get(key, []) + value)[:EXAMPLES]
        elif isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value
    return total


def summarize(entries: list[dict]) -> dict[str, Any]:
    """Totals of a worker's chunks, with device-hours per billion output tokens per device kind."""
    totals: dict[str, Any] = {"chunks": len(entries), "wall_seconds": 0.0}
    hours: dict[str, float] = {}
    for entry in entries:
        add_counts(totals, entry["stats"])
        totals["wall_seconds"] += entry["wall_seconds"]
        label = "cpu_core_hours" if entry["devices"]["kind"] == "cpu" else f"{entry['devices']['kind']}_hours"
        hours[label] = hours.get(label, 0.0) + entry["wall_seconds"] * entry["devices"]["count"] / 3600
    totals["cost"] = cost(hours, totals.get("output_tokens", 0))
    return totals


PER_BILLION = "_per_billion_output_tokens"


def cost(hours: dict[str, float], output_tokens: int) -> dict[str, float | None]:
    """Device-hours (device count x wall hours: GPU-hours; on CPU, CPU core-hours) and their ratio to
    billions of output tokens."""
    result: dict[str, float | None] = {}
    for label, value in sorted(hours.items()):
        result[label] = value
        result[label + PER_BILLION] = value / (output_tokens / 1e9) if output_tokens else None
    return result


# --------------------------------------------------------------------------------------------------
# Merging and checking all workers
# --------------------------------------------------------------------------------------------------


def find_workers(out: Path) -> tuple[int, list[Path]]:
    """(N, worker directories 0..N-1) or an error naming what is missing or inconsistent."""
    found = {}
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        match = WORKER_NAME.match(path.name)
        if match and path.is_dir():
            found[(int(match[1]), int(match[2]))] = path
    counts = {n for _, n in found}
    if not found:
        raise OutputError(f"{out}: no worker-IIIII-of-NNNNN directories")
    if len(counts) != 1:
        raise OutputError(f"{out}: worker directories of different worker counts {sorted(counts)}")
    (n,) = counts
    missing = sorted(set(range(n)) - {i for i, _ in found})
    if missing:
        raise OutputError(f"{out}: workers {missing} of {n} have no output; run them first")
    return n, [found[(i, n)] for i in range(n)]


def worker_records(directory: Path, index: int, num_workers: int, samples: int) -> Iterator[dict]:
    """Every document record of a finished worker, each part checked against its ledger line."""
    if not (directory / SUMMARY).exists() or read_json(directory / SUMMARY).get("finished") is not True:
        raise OutputError(f"{directory}: this worker has not finished; rerun it (it resumes) before merging")
    previous = -1
    for entry in read_ledger(directory / LEDGER, repair=False):
        if not entry["part"]:
            continue
        path = directory / PARTS / entry["part"]
        data = path.read_bytes() if path.exists() else b""
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise OutputError(f"{path}: missing, or its sha256 differs from the ledger's")
        records = [json.loads(line) for line in data.splitlines()]
        if [[r["doc_id"], len(r["samples"])] for r in records] != entry["keys"]:
            raise OutputError(f"{path}: documents or sample counts differ from the ledger's keys")
        for record in records:
            where = f"{path}: document {record['doc_id']!r}"
            if shard_of(record["doc_id"], num_workers) != index:
                raise OutputError(f"{where} belongs to another worker's shard")
            if [s["sample"] for s in record["samples"]] != list(range(samples)):
                raise OutputError(f"{where}: samples are not exactly 0..{samples - 1}")
            if record["position"] <= previous:
                raise OutputError(f"{where}: out of input order")
            previous = record["position"]
            yield record


def merge(out: str | Path, merged: str | Path) -> dict[str, Any]:
    """Check every worker's output and write the merged directory; returns its manifest."""
    out, merged = Path(out), Path(merged)
    if merged.exists():
        raise OutputError(f"{merged} already exists; merge writes a new directory")
    num_workers, dirs = find_workers(out)
    identities = [read_json(d / PROVENANCE)["identity"] for d in dirs]
    for d, identity in zip(dirs, identities):
        ignored = {k: None for k in PER_WORKER_KEYS}
        differences = diff_keys({**identities[0], **ignored}, {**identity, **ignored})
        if differences:
            raise OutputError(f"{d}: made by another job than {dirs[0].name}; differing: {', '.join(differences)}")
    samples = identities[0]["settings"]["samples"]
    streams = [worker_records(d, i, num_workers, samples) for i, d in enumerate(dirs)]
    merged.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{merged.name}.merging-", dir=merged.parent))
    try:
        counts = _write_merged(tmp, heapq.merge(*streams, key=lambda r: r["position"]), identities[0])
        totals = merged_totals([read_json(d / SUMMARY) for d in dirs])
        manifest = {
            "format": FORMAT_VERSION,
            "workers": num_workers,
            "identity": {k: v for k, v in identities[0].items() if k not in PER_WORKER_KEYS},
            **counts,
            "totals": totals,
            "finished": True,
        }
        write_bytes_atomic(tmp / "manifest.json", _dumps(manifest))
        os.rename(tmp, merged)
        fsync_directory(merged.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def merged_totals(summaries: list[dict]) -> dict[str, Any]:
    """Sum of the workers' counts; the cost ratios recomputed from the summed hours and tokens."""
    totals: dict[str, Any] = {}
    hours: dict[str, float] = {}
    for summary in summaries:
        add_counts(totals, {k: v for k, v in summary.items() if k not in ("finished", "cost")})
        for label, value in summary["cost"].items():
            if not label.endswith(PER_BILLION):
                hours[label] = hours.get(label, 0.0) + value
    totals["cost"] = cost(hours, totals.get("output_tokens", 0))
    return totals


def _write_merged(tmp: Path, records: Iterator[dict], identity: dict) -> dict[str, Any]:
    digest = hashlib.sha256()
    counts = {"documents": 0, "kept_samples": 0, "dropped_samples": 0}
    seen: set[str] = set()
    with open(tmp / "generations.jsonl", "wb") as kept_file, open(tmp / "dropped.jsonl", "wb") as dropped_file:
        for record in records:
            if record["doc_id"] in seen:
                raise OutputError(f"document {record['doc_id']!r} appears more than once across workers")
            seen.add(record["doc_id"])
            counts["documents"] += 1
            for kept, line in sample_lines(record, identity):
                (kept_file if kept else dropped_file).write(line)
                digest.update(line if kept else b"")
                counts["kept_samples" if kept else "dropped_samples"] += 1
        for f in (kept_file, dropped_file):
            f.flush()
            os.fsync(f.fileno())
    return {**counts, "sha256": digest.hexdigest()}


def sample_lines(record: dict, identity: dict) -> Iterator[tuple[bool, bytes]]:
    """One flat JSON line per sample, with the fields the megadoc export reads (doc_id, sample, G,
    text, finish_reason, generator, prompt_version) and the rest of the record."""
    model, template = identity["model"], identity["template"]
    shared = {
        "doc_id": record["doc_id"],
        "G": identity["settings"]["samples"],
        "task": record["task"],
        "generator": generator_label(model),
        "prompt_version": f"{template['name']}-v{template['version']}",
        "position": record["position"],
        "source_chars": record["source_chars"],
        "used_chars": record["used_chars"],
    }
    for sample in record["samples"]:
        yield sample["kept"], json.dumps({**shared, **sample}, ensure_ascii=False).encode() + b"\n"


def read_generations(merged: str | Path) -> Iterator[dict]:
    """Kept samples of a finished merge, one dict per sample, in input order of their documents."""
    merged = Path(merged)
    if read_json(merged / "manifest.json").get("finished") is not True:
        raise OutputError(f"{merged}: the merge did not finish")
    with open(merged / "generations.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("merge", help="check all workers' generation outputs and merge them")
    parser.add_argument("out", help="the --output directory of the generation workers")
    parser.add_argument("--merged", required=True, help="new directory for the merged output")
    parser.set_defaults(run=main)
    return parser


def main(args: argparse.Namespace) -> int:
    manifest = merge(args.out, args.merged)
    print(json.dumps({k: manifest[k] for k in ("workers", "documents", "kept_samples", "dropped_samples")}))
    return 0
