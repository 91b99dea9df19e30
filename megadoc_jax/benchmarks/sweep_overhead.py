"""The sweep's bookkeeping per run, with a runner that trains nothing: claim, search recompute, table, done marker.

    python -m megadoc_jax.benchmarks.sweep_overhead [--runs 1000] [--dir DIR]

One worker runs a sweep whose search visits exactly --runs points: one coordinate (wd) with --runs grid
values and a planted objective that falls along the grid, from the first value (each round adds one new
neighbour, so the search walks the whole grid). The runner returns the planted objective at once, so the
time between runner calls is the worker's own work: recomputing the search from the files, the lease
(exclusive create, heartbeat thread), two table rewrites (JSON and Markdown, atomic, fsynced) and the done
marker. The table holds every run met so far, so its cost grows with the sweep. Prints ms per run (all,
first and last tenth), then what a restarted worker pays to recompute the whole state from the files,
and one table write at the final size. The sweep directory is a fresh temporary one (or --dir).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from megadoc_jax.sweep.leases import Lease
from megadoc_jax.sweep.spec import SweepSpec, validate_spec
from megadoc_jax.sweep.table import build_table, write_table
from megadoc_jax.sweep.worker import Job, Result, Sweep, work

REPO = Path(__file__).resolve().parents[2]


def benchmark(root: Path, runs: int) -> None:
    grid = tuple(round(0.1 + 0.001 * i, 6) for i in range(runs))  # 4 significant digits: distinct run names
    spec = SweepSpec(
        config=str(REPO / "configs" / "tiny.yaml"),
        sweep_dir=str(root / "sweep"),
        centre={"wd": grid[0]},
        grids={"wd": grid},
        objective="eval/heldout/loss",
        overrides=("data.streams=[{name: real, store: unused, weight: 1.0}]",),
        lease_seconds=600,
    )
    validate_spec(spec)
    sweep = Sweep(spec)
    sweep.adopt()
    calls: list[float] = []

    def planted(job: Job, lease: Lease) -> Result:
        calls.append(time.perf_counter())
        loss = 10.0 - job.point[0]  # falls along the grid: the search walks to its end
        return Result(0, loss, {spec.objective: loss})

    start = time.perf_counter()
    state = work(sweep, planted, say=lambda line: None)
    total = time.perf_counter() - start
    assert state.finished and len(calls) == runs and state.best == (grid[-1],), (len(calls), state.best)
    per_run_ms = [1e3 * (b - a) for a, b in zip(calls, calls[1:])]
    tenth = max(len(per_run_ms) // 10, 1)
    print(f"{runs} runs, {len(state.rounds)} rounds, one worker, no-op runner: {total:.2f} s")
    print(f"bookkeeping per run: {1e3 * total / runs:.2f} ms mean over the sweep")
    first, last = statistics.mean(per_run_ms[:tenth]), statistics.mean(per_run_ms[-tenth:])
    print(f"  first tenth {first:.2f} ms, last tenth {last:.2f} ms")

    start = time.perf_counter()
    restarted = Sweep(spec)  # a worker started after a restart: reads every record once
    state, records = restarted.state()
    seconds = time.perf_counter() - start
    print(f"a restarted worker's first recompute ({len(records)} runs from the files): {seconds:.3f} s")
    table = build_table(spec, state, restarted.runs, records)
    start = time.perf_counter()
    write_table(spec.sweep_dir, table)
    seconds = time.perf_counter() - start
    print(f"one table write with {len(table['runs'])} rows (JSON + Markdown): {1e3 * seconds:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--dir", help="where to make the sweep directory (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        benchmark(Path(tmp), args.runs)


if __name__ == "__main__":
    main()
