"""python -m megadoc_jax.sweep run SWEEP.yaml [--workers N] | status SWEEP_DIR [--json]

`run` works on the sweep until its search is finished: with --workers 1 (the default) this process is
the worker; with N > 1 it starts N worker processes (`run SWEEP.yaml --workers 1`) and waits for them.
Any number of `run` commands, on any hosts sharing the sweep directory, may work on one sweep at once.
Exit codes: 0 finished, 1 not finished (every worker ended early) or the final centre failed, 2 a bad sweep
file or sweep directory.
`status` prints the table of runs, recomputed from the sweep directory's files (read-only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from megadoc_jax.config import ConfigError
from megadoc_jax.subprocesses import die_with_parent
from megadoc_jax.sweep.spec import load_spec
from megadoc_jax.sweep.table import TABLE_MD, build_table, render_markdown, summary_line
from megadoc_jax.sweep.worker import Sweep, stored_spec, train_runner, work


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.sweep", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="work on a sweep until its search is finished")
    run.add_argument("sweep_file", help="the sweep's YAML file (configs/sweeps/*.yaml)")
    run.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: this one)")
    status = commands.add_parser("status", help="print the table of a sweep's runs")
    status.add_argument("sweep_dir")
    status.add_argument("--json", action="store_true", help="the table as JSON instead of Markdown")
    return parser.parse_args(argv)


def run_workers(sweep_file: str, workers: int) -> int:
    command = [sys.executable, "-m", "megadoc_jax.sweep", "run", sweep_file, "--workers", "1"]
    processes = [subprocess.Popen(command, preexec_fn=die_with_parent) for _ in range(workers)]
    return max(p.wait() for p in processes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "status":
            sweep = Sweep(stored_spec(args.sweep_dir))
            state, records = sweep.state()
            table = build_table(sweep.spec, state, sweep.runs, records)
            print(
                json.dumps(table, indent=1) if args.json else render_markdown(table), end="" if not args.json else "\n"
            )
            return 0
        if args.workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {args.workers}")
        sweep = Sweep(load_spec(args.sweep_file))
        sweep.adopt()
        if args.workers > 1:
            code = run_workers(args.sweep_file, args.workers)
            if code == 2:
                return code
        else:
            work(sweep, train_runner(sweep.spec))
        table = sweep.write_table()
        print(summary_line(table))
        print(f"table: {sweep.root / TABLE_MD}")
        return 0 if table["finished"] and table["best"] is not None else 1
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
