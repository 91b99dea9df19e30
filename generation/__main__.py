"""`python -m generation <command>`: the generation stage's command line.

    generate   one worker of a generation job: rephrases or rationales (docs/generation.md)
    merge      check the workers' outputs and merge them into one directory (docs/generation.md)
    megadocs   build megadoc streams from documents and their generations (docs/megadocs.md)
    export     tokenize JSONL / Parquet documents into a token store (docs/export.md)
    demo-data  build the demo data: corpus, tokenizer, train / held-out stores, synthetic stream

Each command is one `add_<command>(subparsers)` function (`add_subcommand` in its own module for
generate, merge and megadocs) that registers its arguments and its `run` function.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from generation.documents import DEFAULT_POLICY, REASONS


def add_export(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="tokenize documents into a token store",
        description="Tokenize JSONL / Parquet documents (EOS appended) into a token store. Rerunning on an "
        "unfinished store resumes it; on a finished one with the same settings it does nothing.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="DOCS", help="files or glob patterns")
    parser.add_argument("--tokenizer", required=True, metavar="TOKDIR", help="Hugging Face tokenizer directory")
    parser.add_argument("--out", required=True, metavar="STORE", help="token store directory")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--id-field", default="id", help="'' for none: no duplicate check, id = file:line")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count; 0: none)")
    parser.add_argument("--batch-size", type=int, default=None, help="records per worker task")
    parser.add_argument("--max-tokens", type=int, default=0, help="longest document, EOS included (0: no limit)")
    parser.add_argument(
        "--on-error",
        default=None,
        metavar="REASON=ACTION,...",
        help=f"error or skip per reason ({', '.join(REASONS)}, all); defaults: "
        + ",".join(f"{reason}={action}" for reason, action in DEFAULT_POLICY.items()),
    )
    parser.add_argument("--flush-tokens", type=int, default=None, help="tokens between durable commits")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from generation import export

    options: dict[str, Any] = {
        "text_field": args.text_field,
        "id_field": args.id_field or None,
        "workers": args.workers,
        "max_tokens": args.max_tokens,
        "on_error": args.on_error,
        "progress": not args.no_progress,
    }
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.flush_tokens is not None:
        options["flush_tokens"] = args.flush_tokens
    report = export.export(args.input, args.tokenizer, args.out, **options)
    print_summary(report)
    print(f"report: {args.out}/{export.REPORT_FILE}")
    return 0


def print_summary(report: dict[str, Any]) -> None:
    print(f"store {report['store']}: {report['documents']:,} documents, {report['tokens']:,} tokens")
    skipped = {reason: n for reason, n in report["skipped"].items() if n}
    print(f"skipped {report['skipped_total']:,} records" + (f": {json.dumps(skipped)}" if skipped else ""))
    for reason, examples in report.get("examples", {}).items():
        for example in examples:
            print(f"  {reason}: {example}")
    if report.get("resumed_at_document"):
        print(f"resumed after {report['resumed_at_document']:,} documents already in the store")
    print(f"content hash {report['content_hash']}")


def add_demo_data(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo-data",
        help="build the demo data that configs/demo.yaml names",
        description="Build everything configs/demo.yaml names (generation/demo.py): DIR/tokenizer, "
        "DIR/train.jsonl, DIR/heldout.jsonl and the stores DIR/train and DIR/heldout from Python's own "
        "documentation, and the synthetic stream DIR/synthetic (a tiny random generator's rephrases, "
        "stitched). Does nothing for what is already built.",
    )
    where = "default: $MEGADOC_DEMO_DIR, else ~/.cache/megadoc_jax/demo (where `demo:` paths look)"
    parser.add_argument("--out", metavar="DIR", default=None, help=where)
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: in this process)")
    parser.set_defaults(run=run_demo_data)


def run_demo_data(args: argparse.Namespace) -> int:
    from generation import demo
    from megadoc_jax.data.demo import COMPLETE_MARKER, SYNTHETIC_DIR, SYNTHETIC_MARKER

    paths = demo.ensure_demo_data(args.out, workers=args.workers)
    root = paths["train"].parent
    summary = json.loads((root / COMPLETE_MARKER).read_text())
    synthetic = json.loads((root / SYNTHETIC_DIR / SYNTHETIC_MARKER).read_text())
    stores = {"train": summary["train"], "heldout": summary["heldout"], "stitched": synthetic["stitched"]}
    for name, counts in stores.items():
        print(
            f"{paths[name]}: {counts['documents']:,} documents, {counts['tokens']:,} tokens, {counts['content_hash']}"
        )
    print(f"tokenizer: {paths['tokenizer']}")
    return 0


def _commands() -> tuple[Callable[[Any], Any], ...]:
    from generation import generate, megadoc_export, merge

    return (generate.add_subcommand, merge.add_subcommand, megadoc_export.add_subcommand, add_export, add_demo_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m generation", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in _commands():
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from generation.backends import BackendError
    from generation.demo import DemoDataError
    from generation.documents import InputError
    from generation.export import ExportError
    from generation.generate import GenerationError
    from generation.megadoc_export import MegadocExportError
    from generation.megadocs import MissingGenerationsError
    from generation.merge import OutputError
    from generation.prompts import PromptError
    from megadoc_jax.data.store import StoreError
    from megadoc_jax.files import DiskFullError

    errors = (
        InputError,
        ExportError,
        StoreError,
        DemoDataError,
        GenerationError,
        OutputError,
        BackendError,
        PromptError,
        MegadocExportError,
        MissingGenerationsError,
        DiskFullError,  # the message says what a rerun does once space is back
    )
    try:
        return args.run(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
