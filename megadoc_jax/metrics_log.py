"""Reading a run's metrics.jsonl (written by megadoc_jax.metrics.MetricsWriter), resume-aware. No JAX import,
so that reports (megadoc_jax/study) read training logs on any machine; megadoc_jax.metrics re-exports it.

    log = read_metrics(run_dir)      # or the metrics.jsonl path
    log.records                      # [{"step": 100, "time": ..., "loss": ...}, ...], superseded attempts removed
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from megadoc_jax import storage

JSONL_NAME = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class MetricsLog:
    records: list[dict[str, Any]]  # step records in order, with superseded attempts removed
    unreadable_lines: list[int]  # 1-based line numbers that were not JSON objects (cut by a kill)


def read_metrics(path: str | Path | storage.Location) -> MetricsLog:
    """Read a metrics.jsonl (or the run directory holding one; a path or a URL), resume-aware; see
    megadoc_jax.metrics.MetricsWriter."""
    path = storage.location(path, "metrics")
    if storage.is_dir(path):
        path = path / JSONL_NAME
    records: list[dict[str, Any] | None] = []  # None: superseded by a later attempt's record
    earlier: dict[tuple, int] = {}  # (step, names) of the earlier attempts' records -> index in records
    unreadable: list[int] = []
    with path.open(encoding="utf-8") if isinstance(path, Path) else io.StringIO(storage.read_text(path)) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable.append(number)
                continue
            if not isinstance(record, dict) or "step" not in record:
                unreadable.append(number)
            elif record.get("event") == "open":
                records = [r for r in records if r is not None and r["step"] <= record["step"]]
                earlier = {_identity(r): i for i, r in enumerate(records)}
            else:
                # A resumed attempt records again what it recomputes at its first step (the final
                # evaluation, when a kill came after it was logged): its record replaces the earlier one.
                superseded = earlier.pop(_identity(record), None)
                if superseded is not None:
                    records[superseded] = None
                records.append(record)
    return MetricsLog([r for r in records if r is not None], unreadable)


def _identity(record: dict[str, Any]) -> tuple:
    return record["step"], frozenset(record) - {"time"}
