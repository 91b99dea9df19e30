"""Export throughput against bare batched tokenization: same tokenizer, documents and process count.

    python -m generation.benchmarks.export [--tokens 3000000] [--workers N] [--batch-size 256] [--repeats 3]

Input: the demo corpus (megadoc_jax.data.demo) written as JSONL, repeated with distinct ids until it holds
about --tokens tokens; the demo tokenizer (byte-level BPE, 2048) trained on the fly.
- bare: texts already in memory, a spawn Pool of N processes, `encode_batch_fast` over batches of
  --batch-size texts, token counts returned (the least work that tokenizes everything once);
- export: `generation.export.export` from the JSONL file into a fresh store with N worker processes:
  reading, parsing, checking, tokenizing + EOS, ordering, duplicate check, writing, commits, the
  content hash at finish.
Both times include starting the pool. Wall time is what a user waits for; CPU time (this process and
its finished children) is what the work costs, and stays meaningful on a machine shared with other
jobs. The best of --repeats interleaved runs of each is kept; the ratio export / bare tokens per second
is the figure of merit (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

from generation import export as export_module
from megadoc_jax.data import demo


def _count_tokens(texts: list[str]) -> int:
    encodings = export_module._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return sum(len(e.ids) + 1 for e in encodings)  # + EOS, as the export stores it


def cpu_seconds() -> float:
    """User + system time of this process and of its children that have been waited for."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def bare_tokenization(texts: list[str], tokenizer_json: str, eos_id: int, workers: int, batch_size: int) -> int:
    """Tokens in `texts`, tokenized with a pool of `workers` processes."""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=export_module.init_worker, initargs=(tokenizer_json, eos_id)) as pool:
        tokens = sum(pool.imap(_count_tokens, batches, chunksize=1))
        pool.close()
        pool.join()  # the workers' CPU time is counted once they are waited for
    return tokens


def timed(run, *args, **kwargs) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds) of run(*args, **kwargs)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run(*args, **kwargs)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def write_corpus(path: Path, target_tokens: int, tokenizer_json: str, eos_id: int) -> list[str]:
    """Write the demo corpus repeated to about target_tokens tokens; returns the texts in file order."""
    documents = demo.demo_documents()
    export_module.init_worker(tokenizer_json, eos_id, single_threaded=False)
    tokens_per_copy = _count_tokens([d["text"] for d in documents])
    copies = max(1, math.ceil(target_tokens / tokens_per_copy))
    texts = []
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(copies):
            for document in documents:
                f.write(json.dumps({"id": f"{copy}/{document['id']}", "text": document["text"]}) + "\n")
                texts.append(document["text"])
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3_000_000)
    parser.add_argument("--workers", type=int, default=export_module.default_workers())
    parser.add_argument("--batch-size", type=int, default=export_module.DEFAULT_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer_dir = demo.train_demo_tokenizer(root / "tokenizer")
        info, tokenizer_json = export_module.export_tokenizer(tokenizer_dir)  # transformers imported before timing
        texts = write_corpus(root / "corpus.jsonl", args.tokens, tokenizer_json, info.eos_id)
        size_mb = (root / "corpus.jsonl").stat().st_size / 1e6
        print(
            f"corpus: {len(texts):,} documents, {size_mb:.1f} MB JSONL; workers={args.workers} "
            f"batch_size={args.batch_size} cpus={os.cpu_count()}"
        )

        best = {"bare": (0.0, 0.0), "export": (0.0, 0.0)}  # (tokens per wall second, per CPU second)
        for repeat in range(args.repeats):
            tokens, wall, cpu = timed(
                bare_tokenization, texts, tokenizer_json, info.eos_id, args.workers, args.batch_size
            )
            report, export_wall, export_cpu = timed(
                export_module.export,
                [root / "corpus.jsonl"],
                tokenizer_dir,
                root / f"store{repeat}",
                workers=args.workers,
                batch_size=args.batch_size,
                progress=False,
            )
            if report["tokens"] != tokens:
                raise RuntimeError(f"export wrote {report['tokens']} tokens, bare tokenization gave {tokens}")
            for name, seconds, cpu_s in (("bare", wall, cpu), ("export", export_wall, export_cpu)):
                rates = (tokens / seconds, tokens / cpu_s)
                best[name] = (max(best[name][0], rates[0]), max(best[name][1], rates[1]))
                print(
                    f"{name:6} run {repeat}: {tokens:,} tokens, {seconds:.2f} s wall = {rates[0]:,.0f} tokens/s, "
                    f"{cpu_s:.2f} s CPU = {rates[1]:,.0f} tokens/CPU-s"
                )
        for i, unit in enumerate(("tokens/s (wall)", "tokens/CPU-s")):
            bare, export = best["bare"][i], best["export"][i]
            print(
                f"best {unit}: bare {bare:,.0f}, export {export:,.0f}, ratio export/bare {export / bare:.2f} "
                "(goal >= 0.8)"
            )


if __name__ == "__main__":
    main()
