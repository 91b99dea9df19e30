"""`python -m megadoc_jax.miniature`: the whole study, scaled down to run on a 2-core CPU (docs/miniature.md).

    python -m megadoc_jax.miniature [--work-dir runs/miniature] [--jobs 2]

Stages (plan.py): the demo corpus and its stores; nested subsets of the train split for the baselines'
data sizes; a tiny generator trained on the train split; its rephrases (G up to 4), merged; simple and
stitched megadoc stores; real-data baselines at 4 data sizes, megadoc runs at each G, a sweep of r for one
configuration; evaluation of every run; the study report with the reference data law and each method's
data efficiency. Rerunning continues where a run stopped. Prints one line per stage, then the report's
main figures; exit status 1 if a stage failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megadoc_jax import files, storage
from megadoc_jax.miniature import summary
from megadoc_jax.miniature.plan import Plan, Settings
from megadoc_jax.miniature.runner import StaleWorkDir, check_recorded, run_stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.miniature", description=__doc__.split("\n")[0])
    work_dir = storage.local_path_argument("--work-dir")
    parser.add_argument("--work-dir", type=work_dir, default=Path("runs/miniature"), help="everything goes here")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once (default 2: this project's CPU)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value for every training run (e.g. train.steps=20 for a smoke run)"
    )
    args = parser.parse_args(argv)
    settings = Settings(work_dir=args.work_dir, jobs=args.jobs, overrides=tuple(args.overrides))
    plan = Plan(settings)
    started = time.monotonic()
    try:
        check_recorded(plan.stages(), plan.work)  # before the configs are rewritten: refused, nothing changes
        plan.write_configs()
        outcomes = run_stages(plan.stages(), plan.work, settings.jobs)
    except StaleWorkDir as e:
        print(f"miniature: {e}", file=sys.stderr)
        return 2
    wall = time.monotonic() - started
    failed = [o for o in outcomes if o.status in ("failed", "blocked")]
    record = {
        "format": "megadoc-miniature",
        "seconds": round(wall, 1),
        "stages": {o.name: {"status": o.status, "seconds": round(o.seconds, 1), "reason": o.reason} for o in outcomes},
    }
    if not failed:
        lines, figures = summary.report_summary(plan.path("report", "report.json"))
        record["figures"] = figures
        print("\n".join(lines))
    files.write_json_atomic(plan.path("miniature.json"), record)
    minutes, seconds = divmod(int(wall), 60)
    if failed:
        print(f"miniature: {len(failed)} stages did not finish: {', '.join(o.name for o in failed)}", file=sys.stderr)
        return 1
    print(f"miniature finished in {minutes}m{seconds:02d}s; report: {plan.path('report', 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
