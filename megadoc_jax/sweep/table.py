"""The table of every run of a sweep, kept on disk: table.json for programs, table.md for people. No JAX.

    table = build_table(spec, state, runs, records)   # from the search state and each run's RunRecord
    write_table(sweep_dir, table)                     # SWEEP_DIR/table.json and table.md, each atomically
    print(render_markdown(table))                     # what `python -m megadoc_jax.sweep status` prints

A row per point the search has met (the candidates of every round, in the order first met): run name,
round, coordinates, overrides, status (queued, running, done, failed), attempts, worker, objective, the
run's other held-out losses, and why attempts failed. Workers rewrite the table after every claim and
every finished attempt; it is a view: the lease files and done markers (leases.py) are what counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megadoc_jax import files
from megadoc_jax.sweep.leases import RunRecord
from megadoc_jax.sweep.search import Point, SearchState
from megadoc_jax.sweep.spec import Runs, SweepSpec

TABLE_JSON, TABLE_MD = "table.json", "table.md"
FORMAT = "megadoc-sweep-table"


def build_table(spec: SweepSpec, state: SearchState, runs: Runs, records: Mapping[Point, RunRecord]) -> dict[str, Any]:
    space = spec.space
    first_round: dict[Point, int] = {}
    centre_of: dict[Point, list[int]] = {}
    for number, round_ in enumerate(state.rounds, start=1):
        centre_of.setdefault(round_.centre, []).append(number)
        for point in round_.candidates:
            first_round.setdefault(point, number)
    rows = []
    for point, number in first_round.items():
        record = records[point]
        done = record.done or {}
        rows.append(
            {
                "run": record.name,
                "round": number,
                "point": space.named(point),
                "overrides": runs.overrides(point),
                "status": record.status(spec.max_attempts),
                "attempts": record.attempts,
                "worker": (record.holder or done).get("worker", ""),
                "objective": done.get("objective"),  # None until done, and for a run that diverged
                "diverged": bool(done.get("diverged", False)),
                "losses": done.get("losses", {}),
                "failures": [f"attempt {f.get('attempt')}: {f.get('reason')}" for f in record.failures],
                "centre_of_rounds": centre_of.get(point, []),
                "best": state.finished and point == state.best,
            }
        )
    best = state.best
    return {
        "format": FORMAT,
        "updated": time.time(),
        "objective": spec.objective,
        "coordinates": list(space.coordinates),
        "max_attempts": spec.max_attempts,
        "finished": state.finished,
        "rounds": len(state.rounds),
        "centre": space.named(state.centre),
        "best": None if best is None else {"point": space.named(best), "run": records[best].name},
        "best_objective": state.best_objective if math.isfinite(state.best_objective) else None,
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("queued", "running", "done", "failed")},
        "runs": rows,
    }


def write_table(sweep_dir: str | Path, table: dict[str, Any]) -> None:
    sweep_dir = Path(sweep_dir)
    files.write_json_atomic(sweep_dir / TABLE_JSON, table)
    files.write_bytes_atomic(sweep_dir / TABLE_MD, render_markdown(table).encode())


def _value(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def summary_line(table: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in table["counts"].items())
    where = f"round {table['rounds']}, centre " + _point(table["centre"])
    if not table["finished"]:
        return f"searching: {where}; runs: {counts}"
    if table["best"] is None:
        return f"finished after {table['rounds']} rounds: the final centre failed; runs: {counts}"
    best = table["best"]
    return (
        f"finished after {table['rounds']} rounds: best {best['run']} ({_point(best['point'])}) "
        f"{table['objective']} {_value(table['best_objective'])}; runs: {counts}"
    )


def _point(named: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in named.items())


def render_markdown(table: dict[str, Any]) -> str:
    coordinates = table["coordinates"]
    lines = [
        f"objective: {table['objective']} (lower is better); max_attempts {table['max_attempts']}",
        summary_line(table),
        "",
        "| round | run | "
        + " | ".join(coordinates)
        + " | status | attempts | worker | objective | other losses | notes |",
        "|---" * (len(coordinates) + 8) + "|",
    ]
    for row in table["runs"]:
        others = ", ".join(f"{k} {v:.4f}" for k, v in sorted(row["losses"].items()) if k != table["objective"])
        notes = [f"centre of round {', '.join(map(str, row['centre_of_rounds']))}"] if row["centre_of_rounds"] else []
        notes += ["**best**"] if row["best"] else []
        notes += ["diverged (non-finite loss)"] if row["diverged"] else []
        notes += row["failures"]
        cells = [str(row["round"]), row["run"], *(f"{row['point'][c]:g}" for c in coordinates), row["status"]]
        cells += [str(row["attempts"]), row["worker"] or "-", _value(row["objective"]), others or "-"]
        lines.append("| " + " | ".join([*cells, "; ".join(notes) or "-"]) + " |")
    return "\n".join(lines) + "\n"
