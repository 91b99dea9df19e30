"""Multiple-choice scoring throughput: our JAX scorer against lm-evaluation-harness's HF backend (goal: faster).

    python -m megadoc_jax.benchmarks.multiple_choice --lm-eval-python /work/lmeval-venv/bin/python \\
        [--model-dir tests/data/lm_eval_model] [--data-dir tests/data/benchmarks] [--tasks arc_easy piqa ...] \\
        [--num-fewshot 0] [--batch-size 16] [--repeats 5] [--threads 1]

Both sides answer the same distinct (context, continuation) requests of the tasks' items (built by
benchmark_tasks, as evaluate_benchmarks builds them) with the same Hugging Face Llama directory in fp32 on
this machine's CPU (or whatever JAX's default devices are), from strings: tokenization included on both
sides, the same batch size. Ours: hf.import_llama (compute dtype float32) + BatchedLoglikelihoods over all
local devices; lm-eval: HFLM.loglikelihood in a child process (lm_eval_hf.py) run by --lm-eval-python, the
Python of a virtualenv with lm-eval (never the project's; refused clearly when missing). Each side answers
once as a warm-up (ours compiles each batch shape then: reported separately as compile time), then
--repeats timed passes, interleaved one by one so that both sides see the same load on a shared machine;
the best pass gives requests/s. --threads N limits both sides to N CPU threads (torch threads; XLA's
thread pool), which keeps a loaded machine from oversubscribing its cores. Also printed: how far apart the
two sides' log-likelihoods are and whether their is_greedy agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LM_EVAL_SIDE = Path(__file__).with_name("lm_eval_hf.py")
SMALLEST_BUCKET = 64
ALL_TASKS = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag", "winogrande")


def task_request_strings(data_dir: Path, tasks: list[str], num_fewshot: int) -> list[tuple[str, str]]:
    """The distinct (context, continuation) requests of the tasks' scored splits, in item order."""
    from megadoc_jax.evaluation import benchmark_tasks as bt

    seen: dict[tuple[str, str], None] = {}
    for name in tasks:
        task = bt.get_task(name)
        docs = bt.load_split(task, bt.split_file(data_dir, name, task.split))
        fewshot = bt.load_split(task, bt.split_file(data_dir, name, task.fewshot_split)) if num_fewshot else []
        for item in bt.task_requests(task, docs, num_fewshot=num_fewshot, fewshot_docs=fewshot):
            for request in item.requests:
                seen.setdefault(tuple(request), None)
    return list(seen)


def check_lm_eval_python(python: str | None) -> str:
    """The interpreter, or SystemExit saying what is missing."""
    if not python:
        raise SystemExit(
            "error: --lm-eval-python is required: the Python of a virtualenv with lm-eval installed "
            "(lm-eval is not a dependency of megadoc_jax; see tests/make_lm_eval_fixture.py for the set-up)"
        )
    try:
        found = subprocess.run([python, "-c", "import lm_eval, torch"], capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise SystemExit(f"error: --lm-eval-python {python} cannot be run: {e}") from None
    if found.returncode != 0:
        raise SystemExit(
            f"error: --lm-eval-python {python} cannot import lm_eval and torch: {found.stderr.strip()[-500:]}"
        )
    return python


class LmEvalSide:
    """lm_eval_hf.py in a child process: loaded and warmed up on start, one timed pass per `timed_pass()`."""

    def __init__(self, python: str, requests: list[tuple[str, str]], model_dir: Path, batch_size: int, threads: int):
        self._tmp = tempfile.TemporaryDirectory()
        path = Path(self._tmp.name) / "requests.json"
        path.write_text(json.dumps(requests), encoding="utf-8")
        self._stderr = open(Path(self._tmp.name) / "stderr.txt", "w+", encoding="utf-8")  # noqa: SIM115
        args = [python, str(LM_EVAL_SIDE), str(path), str(model_dir), str(batch_size), str(threads)]
        self._child = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        self.ready = self._reply()

    def _reply(self) -> dict:
        for line in self._child.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self._child.wait()
        self._stderr.seek(0)
        raise SystemExit(
            f"error: the lm-eval side ended (exit {self._child.returncode}):\n{self._stderr.read()[-3000:]}"
        )

    def timed_pass(self) -> float:
        self._child.stdin.write("pass\n")
        self._child.stdin.flush()
        return self._reply()["seconds"]

    def close(self) -> None:
        self._child.stdin.close()
        self._child.wait()
        self._stderr.close()
        self._tmp.cleanup()


class OurSide:
    """hf.import_llama (fp32) + BatchedLoglikelihoods over all local devices, answering from strings."""

    def __init__(self, requests: list[tuple[str, str]], model_dir: Path, batch_size: int, smallest_bucket: int):
        import jax

        from megadoc_jax import hf, sharding
        from megadoc_jax.evaluation import benchmark_scoring as bs

        self.requests = requests
        self.devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
        mesh = sharding.make_mesh({"data": jax.device_count()})
        model, _, max_length = hf.import_llama(model_dir, mesh, compute_dtype="float32")
        self.tokenizer = hf.load_tokenizer(model_dir)
        buckets = bs.bucket_lengths(max_length, smallest=smallest_bucket, multiple=bs.length_multiple(mesh))
        self.loglikelihoods = bs.BatchedLoglikelihoods(
            bs.decoder_batch_scorer(model, mesh), mesh, max_length=max_length, batch_size=batch_size, buckets=buckets
        )
        self.answers, self.warmup_seconds, _ = self.answer()

    def answer(self) -> tuple[list[tuple[float, bool]], float, float]:
        """(answers, seconds, of which tokenization)."""
        from megadoc_jax.evaluation.loglikelihood_requests import encode_request

        start = time.perf_counter()
        encoded = [encode_request(self.tokenizer, ctx, cont) for ctx, cont in self.requests]
        encoding = time.perf_counter() - start
        answers = self.loglikelihoods(encoded)
        return answers, time.perf_counter() - start, encoding


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-eval-python", default=None, help="the Python of a virtualenv with lm-eval (required)")
    parser.add_argument("--model-dir", type=Path, default=REPO / "tests" / "data" / "lm_eval_model")
    parser.add_argument("--data-dir", type=Path, default=REPO / "tests" / "data" / "benchmarks")
    parser.add_argument("--tasks", nargs="+", default=list(ALL_TASKS))
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch, both sides")
    parser.add_argument("--smallest-bucket", type=int, default=SMALLEST_BUCKET, help="our shortest padded length")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per side, interleaved")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads per side (torch threads; XLA's Eigen pool); 0: defaults"
    )
    args = parser.parse_args(argv)
    if args.threads:  # before JAX starts its CPU backend
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if args.threads == 1 else ""
        flags = flags or f"intra_op_parallelism_threads={args.threads}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    python = check_lm_eval_python(args.lm_eval_python)
    requests = task_request_strings(args.data_dir, args.tasks, args.num_fewshot)
    print(
        f"{len(requests)} distinct requests of {', '.join(args.tasks)} ({args.num_fewshot}-shot), model "
        f"{args.model_dir}, fp32, batch size {args.batch_size}, threads {args.threads or 'default'}, "
        f"best of {args.repeats} interleaved passes per side"
    )
    ours = OurSide(requests, args.model_dir, args.batch_size, args.smallest_bucket)
    theirs = LmEvalSide(python, requests, args.model_dir, args.batch_size, args.threads)
    our_passes, their_passes = [], []
    try:
        for _ in range(args.repeats):  # interleaved, so that both sides see the same load on a shared machine
            our_passes.append(ours.answer())
            their_passes.append(theirs.timed_pass())
    finally:
        theirs.close()
    our_seconds = [p[1] for p in our_passes]
    our_best, their_best = min(our_seconds), min(their_passes)
    stats = ours.loglikelihoods.stats.summary()
    print(
        f"ours (JAX, {ours.devices}): {len(requests) / our_best:8.1f} requests/s  (best pass {our_best * 1e3:.0f} ms, "
        f"median {statistics.median(our_seconds) * 1e3:.0f} ms, of which tokenization "
        f"{min(p[2] for p in our_passes) * 1e3:.0f} ms; batch shapes {stats['shapes']}, "
        f"padding {stats['padding_fraction']:.0%})"
    )
    print(f"    warm-up pass {ours.warmup_seconds:.2f} s: compile time about {ours.warmup_seconds - our_best:.2f} s")
    versions = theirs.ready["versions"]
    print(
        f"lm-eval {versions['lm_eval']} HFLM (torch {versions['torch']}, {versions['torch_threads']} threads): "
        f"{len(requests) / their_best:8.1f} requests/s  (best pass {their_best * 1e3:.0f} ms, "
        f"median {statistics.median(their_passes) * 1e3:.0f} ms; warm-up pass {theirs.ready['warmup_seconds']:.2f} s)"
    )
    print(f"ratio ours/lm-eval: {their_best / our_best:.2f}x requests/s  (goal > 1)")
    pairs = list(zip(ours.answers, theirs.ready["answers"], strict=True))
    gap = max(abs(a[0] - b[0]) for a, b in pairs)
    agree = sum(bool(a[1]) == bool(b[1]) for a, b in pairs)
    print(f"agreement: max |log-likelihood difference| {gap:.2e}, is_greedy equal on {agree}/{len(requests)}")


if __name__ == "__main__":
    sys.exit(main())
