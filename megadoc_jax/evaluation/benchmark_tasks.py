"""The multiple-choice benchmarks as lm-evaluation-harness 0.4.x defines them, read from local files.

Each task turns one item of its published data set (the Hugging Face hub's field names, read from a local
JSONL or Parquet file) into lm-eval's prompt parts: the question text, the choices, the gold index, and for
Winogrande (lm-eval's "multiple input" task) the shared continuation. The prompt templates, HellaSwag's
preprocessing and Winogrande's partial evaluation follow lm-eval's task YAMLs and their helpers
(lm_eval/tasks/{arc,piqa,sciq,hellaswag,winogrande}); tests/test_benchmarks.py checks every string against
lm-eval itself.

A file with a malformed line, a missing or mistyped field, or a gold answer that is not among the choices
stops with an error naming the file and line (JSONL lines count from 1) or row (Parquet, from 0). lm-eval
would crash on most of these, and score an out-of-range gold as a silent 0: we refuse instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGET_DELIMITER = " "  # lm-eval's target_delimiter: between a context and a choice
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's fewshot_delimiter: after each example
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


class BenchmarkDataError(ValueError):
    """A benchmark file that cannot be read as the task's published format (names the file and line)."""


@dataclass(frozen=True)
class Doc:
    """One item of a benchmark file: its fields as published, and where it came from."""

    fields: Mapping[str, Any]
    where: str  # "path:LINE" (JSONL, from 1) or "path:row N" (Parquet, from 0)


@dataclass(frozen=True)
class Prompt:
    """lm-eval's view of one item: doc_to_text, doc_to_choice, gold index, doc_to_target (multiple input)."""

    text: str | None  # the question; None for a multiple-input task, whose contexts are the choices
    choices: tuple[str, ...]  # what acc_norm measures in characters (Winogrande: the two contexts)
    gold: int
    target: str | None = None  # multiple input only: the continuation that all choices share


@dataclass(frozen=True)
class BenchmarkTask:
    """A task: its published data set, the split it scores, its few-shot split and its prompt."""

    name: str
    hub_path: str  # the Hugging Face data set lm-eval 0.4.x reads (for fetching the files once)
    hub_name: str | None  # its config name
    split: str  # the split lm-eval scores: test if the task defines one, else validation
    fewshot_split: str  # where few-shot examples come from (lm-eval: the training split)
    test_split: str | None  # lm-eval's test_split; when None, few-shot sampling leaves out the scored item
    fields: Mapping[str, str]  # required field -> its type, checked on read
    prompt: Callable[[Mapping[str, Any]], Prompt]
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    multiple_input: bool = False

    def prompt_of(self, doc: Doc) -> Prompt:
        prompt = self.prompt(doc.fields)
        if not 0 <= prompt.gold < len(prompt.choices):
            n = len(prompt.choices)
            raise BenchmarkDataError(f"{doc.where}: gold answer {prompt.gold} is not among {n} choices")
        return prompt


# --------------------------------------------------------------------------------------------------
# Prompts (lm-eval's task YAMLs)
# --------------------------------------------------------------------------------------------------


def _arc(doc: Mapping[str, Any]) -> Prompt:
    labels = list(doc["choices"]["label"])
    if doc["answerKey"] not in labels:
        raise KeyError(f"answerKey {doc['answerKey']!r} is not among choices.label {labels}")
    text = f"Question: {doc['question']}\nAnswer:"
    return Prompt(text, tuple(doc["choices"]["text"]), labels.index(doc["answerKey"]))


def _piqa(doc: Mapping[str, Any]) -> Prompt:
    return Prompt(f"Question: {doc['goal']}\nAnswer:", (doc["sol1"], doc["sol2"]), doc["label"])


def _sciq(doc: Mapping[str, Any]) -> Prompt:
    text = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    return Prompt(text, (doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]), 3)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: strip, " [title]" -> ". ", drop [bracket] groups, one pass of "  " -> " "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: Mapping[str, Any]) -> Prompt:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    text = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return Prompt(text, tuple(hellaswag_preprocess(e) for e in doc["endings"]), int(doc["label"]))


def _winogrande(doc: Mapping[str, Any]) -> Prompt:
    sentence = doc["sentence"]
    blank = sentence.index("_")  # partial evaluation: the options fill the blank in the context
    if doc["answer"] not in ("1", "2"):
        raise ValueError(f'answer is {doc["answer"]!r}, expected "1" or "2"')
    answer = {"1": 0, "2": 1}[doc["answer"]]
    choices = (sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"])
    return Prompt(None, choices, answer, target=sentence[blank + 1 :].strip())


_ARC_FIELDS = {"id": "str", "question": "str", "choices": "arc_choices", "answerKey": "str"}
TASKS: dict[str, BenchmarkTask] = {
    t.name: t
    for t in (
        BenchmarkTask("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", "train", "test", _ARC_FIELDS, _arc),
        BenchmarkTask("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "train", "test", _ARC_FIELDS, _arc),
        BenchmarkTask(
            "piqa",
            "baber/piqa",
            None,
            "validation",
            "train",
            None,
            {"goal": "str", "sol1": "str", "sol2": "str", "label": "int"},
            _piqa,
        ),
        BenchmarkTask(
            "sciq",
            "allenai/sciq",
            None,
            "test",
            "train",
            "test",
            {
                "question": "str",
                "distractor1": "str",
                "distractor2": "str",
                "distractor3": "str",
                "correct_answer": "str",
                "support": "str",
            },
            _sciq,
        ),
        BenchmarkTask(
            "hellaswag",
            "Rowan/hellaswag",
            None,
            "validation",
            "train",
            None,
            {"activity_label": "str", "ctx_a": "str", "ctx_b": "str", "endings": "list[str]", "label": "digits"},
            _hellaswag,
        ),
        BenchmarkTask(
            "winogrande",
            "allenai/winogrande",
            "winogrande_xl",
            "validation",
            "train",
            None,
            {"sentence": "blank", "option1": "str", "option2": "str", "answer": "str"},
            _winogrande,
            metrics=("acc",),
            multiple_input=True,
        ),
    )
}
PAPER_TASKS = ("arc_easy", "piqa", "sciq")  # the paper's benchmark figure: mean zero-shot acc of these


def get_task(name: str) -> BenchmarkTask:
    if name not in TASKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


# --------------------------------------------------------------------------------------------------
# Reading the published formats
# --------------------------------------------------------------------------------------------------


def _field_error(value: Any, kind: str) -> str | None:
    """Why value is not of the field's kind, or None."""
    if kind == "str":
        return None if isinstance(value, str) else f"is {type(value).__name__}, expected a string"
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"is {type(value).__name__}, expected an integer"
    if kind == "digits":  # HellaSwag's label: a string of digits in the published data
        ok = (isinstance(value, str) and value.isdigit()) or (isinstance(value, int) and not isinstance(value, bool))
        return None if ok else f'is {value!r}, expected a label such as "0"'
    if kind == "list[str]":
        ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        return None if ok else "expected a non-empty list of strings"
    if kind == "blank":
        if not isinstance(value, str):
            return f"is {type(value).__name__}, expected a string"
        return None if "_" in value else "has no '_' blank"
    if kind == "arc_choices":
        if not isinstance(value, dict) or not {"text", "label"} <= value.keys():
            return "expected {text: [...], label: [...]}"
        text, label = value["text"], value["label"]
        for name, seq in (("text", text), ("label", label)):
            if not isinstance(seq, list) or not seq or not all(isinstance(v, str) for v in seq):
                return f"{name} is not a non-empty list of strings"
        return None if len(text) == len(label) else f"has {len(text)} texts but {len(label)} labels"
    raise AssertionError(kind)


def check_doc(task: BenchmarkTask, doc: Doc) -> Doc:
    """Every field the task reads is present with its published type, and the prompt can be built."""
    for name, kind in task.fields.items():
        if name not in doc.fields or doc.fields[name] is None:
            fields = list(task.fields)
            raise BenchmarkDataError(f"{doc.where}: missing field {name!r} ({task.name} items have {fields})")
        if (why := _field_error(doc.fields[name], kind)) is not None:
            raise BenchmarkDataError(f"{doc.where}: field {name!r} {why}")
    try:
        task.prompt_of(doc)
    except (KeyError, ValueError) as e:
        if isinstance(e, BenchmarkDataError):
            raise
        raise BenchmarkDataError(f"{doc.where}: {task.name}: {e}") from None
    return doc


def read_docs(path: str | Path) -> list[Doc]:
    """The items of a .jsonl (one JSON object a line; blank lines ignored) or .parquet file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            raise BenchmarkDataError(f"{path}: not a readable Parquet file ({e})") from None
        return [Doc(row, f"{path}:row {i}") for i, row in enumerate(rows)]
    if path.suffix not in (".jsonl", ".json", ".ndjson"):
        raise BenchmarkDataError(f"{path}: expected a .jsonl or .parquet file")
    docs = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BenchmarkDataError(f"{where}: not UTF-8 ({e})") from None
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(fields, dict):
                raise BenchmarkDataError(f"{where}: expected a JSON object, got {type(fields).__name__}")
            docs.append(Doc(fields, where))
    return docs


def split_file(data_dir: str | Path, task: str, split: str) -> Path:
    """DATA_DIR/<task>/<split>.jsonl or .parquet (exactly one of them)."""
    found = [p for p in (Path(data_dir) / task / f"{split}{ext}" for ext in (".jsonl", ".parquet")) if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"no {task} {split} split: expected {Path(data_dir) / task / split}.jsonl or .parquet "
            "(docs/evaluation.md says how to fetch it)"
        )
    if len(found) > 1:
        raise BenchmarkDataError(f"both {found[0]} and {found[1]} exist: keep one")
    return found[0]


def load_split(task: BenchmarkTask, path: str | Path) -> list[Doc]:
    """The checked items of one split file."""
    docs = [check_doc(task, doc) for doc in read_docs(path)]
    if not docs:
        raise BenchmarkDataError(f"{path}: no items")
    return docs


# --------------------------------------------------------------------------------------------------
# Few-shot contexts (lm-eval's ContextSampler and fewshot_context)
# --------------------------------------------------------------------------------------------------


class FewshotSampler:
    """lm-eval's default ContextSampler: one random.Random(seed) per task, drawn from in item order.

    When the task has no test split (it scores validation), lm-eval passes the scored item so that it is
    left out: it draws n + 1 and drops the item's copies; our sampler does the same, so that the k examples
    of every item are lm-eval's."""

    def __init__(self, docs: Sequence[Doc], seed: int = FEWSHOT_SEED):
        import random

        self.docs = list(docs)
        self.rnd = random.Random(seed)

    def sample(self, n: int, eval_doc: Doc | None = None) -> list[Doc]:
        if n == 0:
            return []
        if not self.docs:
            raise BenchmarkDataError("few-shot examples requested but the few-shot split has no items")
        if n + (eval_doc is not None) > len(self.docs):
            have = len(self.docs)
            raise BenchmarkDataError(f"{n} few-shot examples requested but the few-shot split has {have} items")
        if eval_doc is None:
            return self.rnd.sample(self.docs, n)
        same = eval_doc.fields
        res = [d for d in self.rnd.sample(self.docs, n + 1) if d.fields != same][:n]
        if len(res) < n:  # duplicates of the scored item were drawn: lm-eval resamples without any of them
            res = self.rnd.sample([d for d in self.docs if d.fields != same], n)
        return res


def example_text(task: BenchmarkTask, doc: Doc) -> str:
    """One few-shot example as lm-eval writes it: question, delimiter, answer, fewshot delimiter."""
    prompt = task.prompt_of(doc)
    if task.multiple_input:
        question, answer = prompt.choices[prompt.gold], prompt.target
    else:
        question, answer = prompt.text, prompt.choices[prompt.gold]
    if answer == "":  # lm-eval: no answer, no delimiters
        return question
    return question + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER


def fewshot_prefix(task: BenchmarkTask, doc: Doc, num_fewshot: int, sampler: FewshotSampler | None) -> str:
    """The examples in front of one scored item (empty for zero-shot)."""
    if num_fewshot == 0:
        return ""
    if sampler is None:
        raise ValueError("few-shot contexts need a FewshotSampler")
    eval_doc = doc if task.test_split is None else None  # lm-eval: fewshot split (None) == test_split
    return "".join(example_text(task, d) for d in sampler.sample(num_fewshot, eval_doc=eval_doc))


@dataclass(frozen=True)
class ItemRequests:
    """The log-likelihood requests of one item, one per choice, and what scoring them needs."""

    doc: Doc
    requests: tuple[tuple[str, str], ...]  # (context, continuation) strings
    choices: tuple[str, ...]  # lengths for acc_norm
    gold: int


def item_requests(task: BenchmarkTask, doc: Doc, prefix: str = "") -> ItemRequests:
    """lm-eval's construct_requests: (context, " " + choice) per choice; multiple input: (context_k, " " + target)."""
    prompt = task.prompt_of(doc)
    if task.multiple_input:
        requests = tuple((prefix + c, TARGET_DELIMITER + prompt.target) for c in prompt.choices)
    else:
        requests = tuple((prefix + prompt.text, TARGET_DELIMITER + c) for c in prompt.choices)
    return ItemRequests(doc, requests, prompt.choices, prompt.gold)


def task_requests(
    task: BenchmarkTask,
    docs: Sequence[Doc],
    *,
    num_fewshot: int = 0,
    fewshot_docs: Sequence[Doc] = (),
    seed: int = FEWSHOT_SEED,
) -> list[ItemRequests]:
    """Every item's requests, in item order (which is also the order few-shot examples are drawn in)."""
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    sampler = FewshotSampler(fewshot_docs, seed) if num_fewshot else None
    return [item_requests(task, doc, fewshot_prefix(task, doc, num_fewshot, sampler)) for doc in docs]
