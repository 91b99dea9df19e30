"""Multiple-choice benchmarks scored by log-likelihood, with lm-evaluation-harness 0.4.x's numbers.

    results = evaluate_benchmarks(["arc_easy", "piqa", "sciq"], data_dir, tokenizer, loglikelihoods,
                                  max_length=4096)

reads each task's scored split from DATA_DIR/<task>/<split>.jsonl or .parquet (benchmark_tasks.py), builds
lm-eval's requests (and few-shot contexts), encodes them as lm-eval's HF backend does
(loglikelihood_requests.py), hands the distinct requests to `loglikelihoods` (the model side: summed
log-probability of the continuation and is_greedy per request), and scores every item as lm-eval's
process_results does:

- acc: argmax of the log-likelihoods (the first index wins a tie) equals the gold index;
- acc_norm: argmax of log-likelihood / len(choice) in characters (the choice without the delimiter);
- per task the mean and its standard error, sample standard deviation (n - 1) / sqrt(n);
- the paper's figure: the unweighted mean of acc over arc_easy, piqa and sciq, with the standard error of
  an unweighted mean of k task means, sqrt(sum of squared standard errors) / k (lm-eval's group
  aggregation with weight_by_size false).

The arithmetic is lm-eval's, operation for operation, so that equal log-likelihoods give bit-equal figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megadoc_jax.evaluation.benchmark_tasks import (
    FEWSHOT_SEED,
    PAPER_TASKS,
    ItemRequests,
    get_task,
    load_split,
    split_file,
    task_requests,
)
from megadoc_jax.evaluation.loglikelihood_requests import (
    Loglikelihoods,
    encode_request,
    is_truncated,
)


@dataclass(frozen=True)
class ItemScore:
    """One item: the log-likelihood and is_greedy of each choice, the predictions and the item's metrics."""

    loglikelihoods: tuple[float, ...]
    is_greedy: tuple[bool, ...]
    gold: int
    pred: int
    pred_norm: int
    metrics: Mapping[str, float]


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    items: list[ItemScore] = field(repr=False)
    requests: int = 0
    truncated: int = 0  # requests longer than the model's context, cut from the left as lm-eval does

    def summary(self) -> dict[str, Any]:
        return {
            "n": len(self.items),
            "metrics": self.metrics,
            "stderr": self.stderr,
            "requests": self.requests,
            "truncated": self.truncated,
            # acc of guessing uniformly: 1 / choices, averaged over the items (what a random model scores)
            "chance": float(np.mean([1.0 / len(item.loglikelihoods) for item in self.items])) if self.items else None,
        }


def score_item(
    loglikelihoods: Sequence[float],
    is_greedy: Sequence[bool],
    choices: Sequence[str],
    gold: int,
    metrics: Sequence[str] = ("acc", "acc_norm"),
) -> ItemScore:
    """lm-eval's multiple-choice process_results for one item."""
    lls = np.array(loglikelihoods, dtype=np.float64)
    pred = int(np.argmax(lls))  # numpy's argmax: the first maximum
    pred_norm = int(np.argmax(lls / np.array([float(len(c)) for c in choices])))  # characters, not bytes
    values = {"acc": 1.0 if pred == gold else 0.0, "acc_norm": 1.0 if pred_norm == gold else 0.0}
    return ItemScore(
        tuple(float(x) for x in loglikelihoods),
        tuple(bool(g) for g in is_greedy),
        gold,
        pred,
        pred_norm,
        {m: values[m] for m in metrics},
    )


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean: sample standard deviation (n - 1) over sqrt(n); nan for one value."""
    if len(values) < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum([(x - mu) ** 2 for x in values]) / (len(values) - 1)) / math.sqrt(len(values))


def aggregate(name: str, items: list[ItemScore], metrics: Sequence[str]) -> TaskResult:
    columns = {m: [item.metrics[m] for item in items] for m in metrics}
    return TaskResult(
        name, {m: mean(v) for m, v in columns.items()}, {m: mean_stderr(v) for m, v in columns.items()}, items
    )


def unweighted_average(results: Sequence[TaskResult], metric: str = "acc") -> tuple[float, float]:
    """(mean, stderr) of a metric over tasks, each task weighing the same (the paper's three-task figure)."""
    values = [r.metrics[metric] for r in results]
    stderrs = [r.stderr[metric] for r in results]
    return sum(values) / len(values), math.sqrt(sum(s**2 for s in stderrs)) / len(stderrs)


def score_requests(
    items: Sequence[ItemRequests], tokenizer: Any, loglikelihoods: Loglikelihoods, max_length: int
) -> tuple[list[list[tuple[float, bool]]], int, int]:
    """Each item's (log-likelihood, is_greedy) per choice; each distinct request is scored once.

    Returns (per item results, number of distinct requests, how many of them were truncated)."""
    index: dict[tuple[str, str], int] = {}
    encoded: list[tuple[list[int], list[int]]] = []
    for item in items:
        for request in item.requests:
            if request not in index:
                index[request] = len(encoded)
                encoded.append(encode_request(tokenizer, *request))
    for _, cont in encoded:
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds the model's context {max_length}")
    scores = loglikelihoods(encoded)
    if len(scores) != len(encoded):
        raise ValueError(f"loglikelihoods returned {len(scores)} results for {len(encoded)} requests")
    truncated = sum(is_truncated(ctx, cont, max_length) for ctx, cont in encoded)
    return [[scores[index[r]] for r in item.requests] for item in items], len(encoded), truncated


def evaluate_task(
    name: str,
    docs_path: str | Path,
    tokenizer: Any,
    loglikelihoods: Loglikelihoods,
    *,
    max_length: int,
    num_fewshot: int = 0,
    fewshot_path: str | Path | None = None,
    seed: int = FEWSHOT_SEED,
) -> TaskResult:
    """One task on one scored split file (and its few-shot split file when num_fewshot > 0)."""
    task = get_task(name)
    if num_fewshot and fewshot_path is None:
        raise ValueError(f"{name}: num_fewshot={num_fewshot} needs the {task.fewshot_split} split")
    docs = load_split(task, docs_path)
    fewshot_docs = load_split(task, fewshot_path) if num_fewshot else []
    items = task_requests(task, docs, num_fewshot=num_fewshot, fewshot_docs=fewshot_docs, seed=seed)
    results, n_requests, truncated = score_requests(items, tokenizer, loglikelihoods, max_length)
    scores = [
        score_item([ll for ll, _ in res], [g for _, g in res], item.choices, item.gold, task.metrics)
        for item, res in zip(items, results, strict=True)
    ]
    result = aggregate(name, scores, task.metrics)
    result.requests, result.truncated = n_requests, truncated
    return result


def evaluate_benchmarks(
    tasks: Sequence[str],
    data_dir: str | Path,
    tokenizer: Any,
    loglikelihoods: Loglikelihoods,
    *,
    max_length: int,
    num_fewshot: int = 0,
    seed: int = FEWSHOT_SEED,
) -> dict[str, Any]:
    """Every task's figures and, when the paper's three tasks are among them, their average.

    {"tasks": {name: TaskResult.summary()}, "paper_average": {"tasks", "acc", "acc_stderr"} | None,
     "num_fewshot": k, "fewshot_seed": seed}"""
    results = {}
    for name in tasks:
        task = get_task(name)
        fewshot = split_file(data_dir, name, task.fewshot_split) if num_fewshot else None
        results[name] = evaluate_task(
            name,
            split_file(data_dir, name, task.split),
            tokenizer,
            loglikelihoods,
            max_length=max_length,
            num_fewshot=num_fewshot,
            fewshot_path=fewshot,
            seed=seed,
        )
    paper = None
    if all(t in results for t in PAPER_TASKS):
        acc, stderr = unweighted_average([results[t] for t in PAPER_TASKS], "acc")
        paper = {"tasks": list(PAPER_TASKS), "acc": acc, "acc_stderr": stderr}
    return {
        "tasks": {n: r.summary() for n, r in results.items()},
        "paper_average": paper,
        "num_fewshot": num_fewshot,
        "fewshot_seed": seed,
    }
