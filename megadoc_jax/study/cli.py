"""`python -m megadoc_jax.evaluate report RUNS_DIR [--out DIR] ...` (or `python -m megadoc_jax.study ...`, which
imports no JAX): the study report of every run under RUNS_DIR. docs/study.md has the definitions.

    python -m megadoc_jax.evaluate report runs/                           # writes runs/report/
    python -m megadoc_jax.evaluate report runs/ --out paper/ --store iid --level 0.9 --no-plots
    python -m megadoc_jax.evaluate report runs/ --real-tokens /data/dclm_1b=1000000000

Prints what it wrote and the notes (fits with too few points, ...). Exit status 2 for bad input (a broken
config, an unreachable real store, an unreadable evaluation JSON: the message names the run or the file).
"""

from __future__ import annotations

import argparse
import sys
import time

from megadoc_jax import storage
from megadoc_jax.study import report
from megadoc_jax.study.runs import StudyError, discover, load_runs

DEFAULT_OUT = "report"  # under RUNS_DIR


def store_tokens(text: str) -> tuple[str, int]:
    path, sep, count = text.rpartition("=")
    if not sep or not path or not count.isdigit() or int(count) <= 0:
        raise argparse.ArgumentTypeError(f"--real-tokens {text!r}: expected STORE_PATH=TOKENS (a positive integer)")
    return path, int(count)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.evaluate report", description=__doc__.split("\n")[0])
    local = storage.local_path_argument  # the report reads and writes local files only (docs/cloud.md)
    parser.add_argument("runs_dir", type=local("RUNS_DIR"), help="directory whose subdirectories (any depth) hold runs")
    parser.add_argument("--out", type=local("--out"), help=f"output directory (default RUNS_DIR/{DEFAULT_OUT})")
    parser.add_argument(
        "--store", help="the objective (i.i.d.) store (default: each run's first data.eval_stores name)"
    )
    parser.add_argument("--level", type=float, default=0.95, help="interval level of fits and efficiencies")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap refits per fit")
    parser.add_argument(
        "--real-tokens",
        type=store_tokens,
        action="append",
        default=[],
        metavar="STORE=TOKENS",
        help="token count of a store (as the configs name it) that is not reachable here; repeatable",
    )
    parser.add_argument("--skip-broken", action="store_true", help="list unreadable run configs instead of stopping")
    parser.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.level < 1:
        print(f"report: --level {args.level} must lie in (0, 1)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        discovery = discover(args.runs_dir, skip_broken=args.skip_broken)
        runs = load_runs(discovery, args.runs_dir, objective=args.store, real_tokens=dict(args.real_tokens))
    except StudyError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    value = report.build(runs, runs_dir=args.runs_dir, objective=args.store, level=args.level, bootstrap=args.bootstrap)
    out = args.out or args.runs_dir / DEFAULT_OUT
    written = report.write(value, out, plots=not args.no_plots)
    print(
        f"report: {len(runs.runs)} runs ({len(runs.unstated)} without a method) in {time.perf_counter() - start:.1f}s"
    )
    for message in value["messages"]:
        print(f"  note: {message}")
    for path in written:
        print(f"  wrote {path}")
    return 0
