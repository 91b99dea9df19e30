"""Check finished token stores: python -m megadoc_jax.data.verify STORE [STORE...] [--quiet]

Runs every check of store_checks.CHECKS on each store (manifest, arrays, offsets, segments, content
hash, token ids), prints each result, and exits 0 only when every check holds on every store; 1
otherwise, after a line per failure naming the store, the check and what is wrong. Reading the content
shows a progress bar on a terminal (not with --quiet, nor when stderr is not a tty). docs/store.md.
"""

from __future__ import annotations

import argparse
import sys

from megadoc_jax.data import store_checks
from megadoc_jax.data.store_format import StoreError


def verify_store(path: str, progress: bool) -> list[store_checks.CheckResult]:
    try:
        view = store_checks.StoreView.open(path, progress=progress)
    except StoreError as e:  # no manifest, or one that is not JSON: nothing else can be checked
        skipped = [store_checks.CheckResult(c.name, "skipped", "needs manifest") for c in store_checks.CHECKS[1:]]
        return [store_checks.CheckResult("manifest", "FAIL", str(e)), *skipped]
    return store_checks.run_checks(view)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", metavar="STORE", help="a finished token store (a path or URL)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    progress = not args.quiet and sys.stderr.isatty()
    failures, failed_stores = [], 0
    for path in args.stores:
        print(path)
        results = verify_store(path, progress)
        for result in results:
            print(f"  {result.name:<13} {result.status:<8} {result.detail}")
            if result.status == "FAIL":
                failures.append(f"{path}: check {result.name!r} failed: {result.detail}")
        failed_stores += any(result.status != "ok" for result in results)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"{len(args.stores) - failed_stores} of {len(args.stores)} stores pass every check")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
