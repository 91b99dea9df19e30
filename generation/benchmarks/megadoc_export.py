"""Megadoc export throughput against bare batched tokenization of the same texts: same tokenizer and processes.

    python -m generation.benchmarks.megadoc_export [--sources 400] [--G 8] [--workers N] [--repeats 2]
        [--methods simple,stitched-back,stretched]

Input: --sources documents of the demo corpus (megadoc_jax.data.demo: Python's own documentation,
repeated with distinct ids) as JSONL, and a generation file in the format of generation/merge.py: for
source i, rephrase k is the text of another demo document and rationale k its first 1,500 characters
(real English text of realistic length; no generator runs here). The demo tokenizer (byte-level BPE) is
trained on the fly.

Per method, both sides tokenize exactly the texts that method's stream holds (originals and rephrases
1..G, or originals and rationales 1..G):
- bare: texts already in memory, a spawn Pool of N processes, `encode_batch_fast` over batches of
  --batch-texts texts, token counts returned (generation.benchmarks.export.bare_tokenization);
- megadocs: `build_megadocs` of that one stream into a fresh directory, N worker processes: reading and
  checking the inputs into the spool, planning, tokenizing, assembling with separators, segments and
  metadata, ordering, writing, commits and the content hash. Stretched also computes the originals'
  token offsets (to check where the rationales were made).
Both times include starting the pool. Wall time is what a user waits for; CPU time (this process and
its finished children, as generation.benchmarks.export measures it) is what the work costs and stays
meaningful on a machine shared with other jobs. Tokens per second count the texts' tokens on both
sides (not separators or EOS); the best of --repeats interleaved runs is kept; megadocs / bare is the
figure of merit (goal >= 0.8). The "stream alone" figure leaves out the spool pass (reading and
checking the inputs), which all streams of one run share.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from generation import megadocs
from generation.benchmarks.export import bare_tokenization, timed
from generation.export import default_workers, export_tokenizer
from generation.megadoc_export import DEFAULT_BATCH_TEXTS, StreamOptions, build_megadocs
from megadoc_jax.data import demo

RATIONALE_CHARS = 1500


def write_inputs(root: Path, num_sources: int, G: int) -> tuple[Path, Path, dict[str, list[str]]]:
    """Sources and generations as JSONL; returns their paths and, per task, the texts a stream holds.

    Source i is demo document i mod N (id made distinct); its generation k the text of demo document
    i + 1 + k (mod N), never its own.
    """
    documents = demo.demo_documents()
    n = len(documents)
    texts: dict[str, list[str]] = {"rephrase": [], "rationale": []}
    with (
        open(root / "sources.jsonl", "w", encoding="utf-8") as sources,
        open(root / "generations.jsonl", "w", encoding="utf-8") as generations,
    ):
        for i in range(num_sources):
            doc_id = f"{i // n}/{documents[i % n]['id']}"
            sources.write(json.dumps({"id": doc_id, "text": documents[i % n]["text"]}) + "\n")
            for k in range(G):
                other = documents[(i + 1 + k) % n]["text"]
                for task, text in (("rephrase", other), ("rationale", other[:RATIONALE_CHARS])):
                    record = {
                        "doc_id": doc_id,
                        "task": task,
                        "sample": k,
                        "G": G,
                        "text": text,
                        "finish_reason": "stop",
                        "generator": "demo-texts",
                        "prompt_version": "benchmark",
                    }
                    generations.write(json.dumps(record) + "\n")
                    texts[task].append(text)
    return root / "sources.jsonl", root / "generations.jsonl", texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=400)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--methods", default=f"{megadocs.SIMPLE},{megadocs.BACK},{megadocs.STRETCHED}")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--batch-texts", type=int, default=DEFAULT_BATCH_TEXTS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer_dir = demo.train_demo_tokenizer(root / "tokenizer")
        info, tokenizer_json = export_tokenizer(tokenizer_dir)  # transformers imported before timing
        sources_path, generations_path, generated = write_inputs(root, args.sources, args.G)
        with open(sources_path, encoding="utf-8") as lines:
            originals = [json.loads(line)["text"] for line in lines]
        print(
            f"{args.sources} sources, G={args.G}, workers={args.workers}, batch_texts={args.batch_texts}, "
            f"cpus={os.cpu_count()}, tokenizer: demo BPE {info.vocab_size}"
        )
        for method in args.methods.split(","):
            spec = megadocs.method_spec(method)
            texts = originals * spec.with_original + generated[spec.task]
            best = {key: 0.0 for key in ("bare wall", "bare cpu", "megadocs wall", "megadocs cpu", "stream wall")}
            for repeat in range(args.repeats):  # interleaved, so that both sides see the same machine load
                counted, bare_wall, bare_cpu = timed(
                    bare_tokenization, texts, tokenizer_json, info.eos_id, args.workers, args.batch_texts
                )
                tokens = counted - len(texts)  # bare_tokenization counts an EOS per text
                (report,), wall, cpu = timed(
                    build_megadocs,
                    [sources_path],
                    [generations_path],
                    tokenizer_dir,
                    root / f"{method}-{repeat}",
                    [(method, args.G)],
                    StreamOptions(batch_texts=args.batch_texts, progress=False),
                    workers=args.workers,
                )
                kinds = report["tokens_by_kind"]
                if kinds["original"] + kinds["rephrase"] + kinds["rationale"] != tokens:
                    raise RuntimeError(
                        f"{method}: megadocs stored {kinds} text tokens, bare tokenization gave {tokens}"
                    )
                for key, seconds in (
                    ("bare wall", bare_wall),
                    ("bare cpu", bare_cpu),
                    ("megadocs wall", wall),
                    ("megadocs cpu", cpu),
                    ("stream wall", report["seconds"]),
                ):
                    best[key] = max(best[key], tokens / seconds)
                print(
                    f"{method:14s} run {repeat}: {tokens:,} text tokens ({report['tokens']:,} stored); bare "
                    f"{bare_wall:.2f} s wall {bare_cpu:.2f} s cpu; megadocs {wall:.2f} s wall (stream alone "
                    f"{report['seconds']:.2f} s) {cpu:.2f} s cpu"
                )
            print(
                f"{method:14s} best tokens/s: bare {best['bare wall']:,.0f} wall, {best['bare cpu']:,.0f} cpu; "
                f"megadocs {best['megadocs wall']:,.0f} wall, {best['megadocs cpu']:,.0f} cpu, stream alone "
                f"{best['stream wall']:,.0f} wall | ratio megadocs/bare: "
                f"wall {best['megadocs wall'] / best['bare wall']:.2f}, "
                f"cpu {best['megadocs cpu'] / best['bare cpu']:.2f}, stream alone wall "
                f"{best['stream wall'] / best['bare wall']:.2f} (goal >= 0.8)"
            )


if __name__ == "__main__":
    main()
