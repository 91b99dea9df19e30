"""Multiple-choice benchmarks against lm-evaluation-harness 0.4.13 itself.

tests/data/lm_eval_fixture.json was written by tests/make_lm_eval_fixture.py (lm-eval's HF backend on the
tiny Llama in tests/data/lm_eval_model and the item files in tests/data/benchmarks). Here, without lm-eval:
our requests (strings and token ids, zero- and few-shot) are lm-eval's, lm-eval's log-likelihoods through
our scoring give every item's metrics and every aggregate bit for bit, a PyTorch reference scorer
reproduces lm-eval's log-likelihoods (which validates the fixture and the scorer interface), and bad
benchmark files are refused naming the file and line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from megadoc_jax.evaluation import benchmark_tasks as bt
from megadoc_jax.evaluation.benchmarks import (
    evaluate_benchmarks,
    evaluate_task,
    score_item,
    unweighted_average,
)
from megadoc_jax.evaluation.loglikelihood_requests import encode_request, model_input

DATA = Path(__file__).parent / "data"
BENCHMARKS = DATA / "benchmarks"
PARQUET = DATA / "benchmarks_parquet"
MODEL_DIR = DATA / "lm_eval_model"
FIXTURE = json.loads((DATA / "lm_eval_fixture.json").read_text(encoding="utf-8"))
MAX_LENGTH = FIXTURE["max_length"]
FEW = FIXTURE["few_shot"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)


def scored_file(task: str) -> Path:
    """The file lm-eval read for the task's scored split (Parquet for the fixture's Parquet tasks)."""
    split = FIXTURE["splits"][task]["scored"]
    root = PARQUET if task in FIXTURE["parquet_tasks"] else BENCHMARKS
    return bt.split_file(root, task, split)


def fewshot_file(task: str) -> Path:
    root = PARQUET if task in FIXTURE["parquet_tasks"] else BENCHMARKS
    return bt.split_file(root, task, FIXTURE["splits"][task]["fewshot"])


def our_requests(task: str, num_fewshot: int = 0) -> list[bt.ItemRequests]:
    spec = bt.get_task(task)
    docs = bt.load_split(spec, scored_file(task))
    fewshot = bt.load_split(spec, fewshot_file(task)) if num_fewshot else []
    return bt.task_requests(spec, docs, num_fewshot=num_fewshot, fewshot_docs=fewshot, seed=FEW["seed"])


def lm_evals_float_sum(expected):
    """A figure of the fixture (lm-eval on Python 3.11) that is a builtin sum() of non-integer floats: standard
    errors and the average over tasks, to within a few ulps. Python 3.12 made sum() of floats compensated
    (Neumaier summation, cpython#100425), so on 3.12 these move in the last bit, ours and lm-eval's alike.
    A task's accuracies (sums of 0.0 and 1.0) stay exact and are compared exactly."""
    return pytest.approx(expected, rel=1e-14, abs=0, nan_ok=True)


def fixture_cases():
    for task, record in FIXTURE["zero_shot"].items():
        yield pytest.param(task, 0, record, id=f"{task}-0shot")
    for task, record in FEW["tasks"].items():
        yield pytest.param(task, FEW["num_fewshot"], record, id=f"{task}-{FEW['num_fewshot']}shot")


def fixture_scorer(record_sets):
    """A Loglikelihoods that answers with lm-eval's recorded results, looked up by token ids."""
    table = {}
    for record in record_sets:
        for item in record["items"]:
            for r in item["requests"]:
                table[(tuple(r["context_ids"]), tuple(r["continuation_ids"]))] = (r["loglikelihood"], r["is_greedy"])

    def loglikelihoods(requests):
        return [table[(tuple(c), tuple(k))] for c, k in requests]

    return loglikelihoods


# --------------------------------------------------------------------------------------------------
# (a) requests and (c) few-shot contexts: lm-eval's strings and token ids
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,num_fewshot,record", list(fixture_cases()))
def test_requests_are_lm_evals(tokenizer, task, num_fewshot, record):
    ours = our_requests(task, num_fewshot)
    assert len(ours) == record["n"] == len(record["items"])
    for item, expected in zip(ours, record["items"], strict=True):
        assert [list(r) for r in item.requests] == [[r["context"], r["continuation"]] for r in expected["requests"]]
        for (context, continuation), r in zip(item.requests, expected["requests"], strict=True):
            ctx_ids, cont_ids = encode_request(tokenizer, context, continuation)
            assert (ctx_ids, cont_ids) == (r["context_ids"], r["continuation_ids"]), (context, continuation)


def test_fewshot_contexts_hold_examples_from_the_training_split():
    """The few-shot contexts really are k examples (so test (c) above compares something)."""
    for task, record in FEW["tasks"].items():
        for item in record["items"]:
            context = item["requests"][0]["context"]
            assert context.count(bt.FEWSHOT_DELIMITER) == FEW["num_fewshot"], (task, context)
    # tasks without a test split leave the scored item out of its own examples: our sampler draws n + 1 there
    assert bt.get_task("piqa").test_split is None and bt.get_task("arc_easy").test_split == "test"


def test_fewshot_sampler_leaves_out_the_scored_item():
    docs = [bt.Doc({"x": i}, f"f:{i}") for i in range(4)]
    for seed in range(20):
        sampler = bt.FewshotSampler(docs, seed)
        for doc in docs:
            drawn = sampler.sample(3, eval_doc=doc)
            assert len(drawn) == 3 and doc not in drawn and len({d.where for d in drawn}) == 3
    with pytest.raises(bt.BenchmarkDataError, match="few-shot split has 4 items"):
        bt.FewshotSampler(docs).sample(4, eval_doc=docs[0])


def test_encoding_rules(tokenizer):
    bos = tokenizer.bos_token_id
    # trailing whitespace of the context moves into the continuation
    ctx, cont = encode_request(tokenizer, "Answer: ", "yes")
    assert (ctx, cont) == encode_request(tokenizer, "Answer:", " yes")
    assert ctx[0] == bos and ctx == tokenizer.encode("Answer:")
    # an empty context is the prefix token (BOS) and the continuation without special tokens
    ctx, cont = encode_request(tokenizer, "", " yes")
    assert ctx == [bos] and cont == tokenizer.encode(" yes", add_special_tokens=False)
    # a context that already starts with BOS's text gets no second BOS
    ctx, _ = encode_request(tokenizer, "<s>Answer:", " yes")
    assert ctx.count(bos) == 1
    # the model's window: cut from the left to max_length + 1 tokens, the last one dropped
    assert model_input([1, 2, 3], [4, 5], 10) == [1, 2, 3, 4]
    assert model_input([1, 2, 3, 4, 5, 6], [7, 8], 4) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model_input([1], [2, 3, 4], 2)


# --------------------------------------------------------------------------------------------------
# (b) lm-eval's log-likelihoods through our scoring: every prediction and aggregate identical
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,num_fewshot,record", list(fixture_cases()))
def test_scoring_is_lm_evals(tokenizer, task, num_fewshot, record):
    result = evaluate_task(
        task,
        scored_file(task),
        tokenizer,
        fixture_scorer([record]),
        max_length=MAX_LENGTH,
        num_fewshot=num_fewshot,
        fewshot_path=fewshot_file(task) if num_fewshot else None,
        seed=FEW["seed"],
    )
    for ours, expected in zip(result.items, record["items"], strict=True):
        assert list(ours.loglikelihoods) == [r["loglikelihood"] for r in expected["requests"]]
        assert ours.metrics == {m: expected[m] for m in record["metrics"]}
    assert result.metrics == record["metrics"]  # exactly: the same float operations as lm-eval
    assert result.stderr == lm_evals_float_sum(record["stderr"])


def test_paper_average_is_lm_evals_group(tokenizer):
    zero = FIXTURE["zero_shot"]
    results = evaluate_benchmarks(
        list(FIXTURE["splits"]), BENCHMARKS, tokenizer, fixture_scorer(zero.values()), max_length=MAX_LENGTH
    )
    paper = FIXTURE["paper3"]
    assert results["paper_average"]["tasks"] == paper["tasks"] == list(bt.PAPER_TASKS)
    assert results["paper_average"]["acc"] == lm_evals_float_sum(paper["metrics"]["acc"])
    assert results["paper_average"]["acc_stderr"] == lm_evals_float_sum(paper["stderr"]["acc"])
    for task, record in zero.items():  # JSONL everywhere here: PIQA's JSONL and Parquet give the same figures
        assert results["tasks"][task]["metrics"] == record["metrics"]
        assert results["tasks"][task]["stderr"] == lm_evals_float_sum(record["stderr"])
    # the long SciQ item is longer than the model's context: cut as lm-eval does, and counted
    assert results["tasks"]["sciq"]["truncated"] > 0
    assert all(results["tasks"][t]["truncated"] == 0 for t in zero if t != "sciq")
    # acc_norm of the average too (lm-eval's group reports it; we compute it the same way)
    from megadoc_jax.evaluation.benchmarks import TaskResult

    parts = [TaskResult(t, zero[t]["metrics"], zero[t]["stderr"], []) for t in bt.PAPER_TASKS]
    acc_norm, acc_norm_stderr = unweighted_average(parts, "acc_norm")
    assert acc_norm == lm_evals_float_sum(paper["metrics"]["acc_norm"])
    assert acc_norm_stderr == lm_evals_float_sum(paper["stderr"]["acc_norm"])


def test_fixture_exercises_the_hard_cases():
    """Items where characters and bytes pick different answers, a tie, non-ASCII text, an empty support."""
    char_byte, ties = 0, 0
    for record in FIXTURE["zero_shot"].values():
        for item in record["items"]:
            lls = np.array([r["loglikelihood"] for r in item["requests"]])
            choices = [r["continuation"][1:] for r in item["requests"]]
            by_char = np.argmax(lls / np.array([len(c) for c in choices]))
            by_byte = np.argmax(lls / np.array([len(c.encode()) for c in choices]))
            char_byte += int(by_char != by_byte)
            ties += int(len(set(lls.tolist())) < len(lls))
    assert char_byte >= 2 and ties >= 1
    sciq = [d.fields for d in bt.read_docs(BENCHMARKS / "sciq" / "test.jsonl")]
    assert any(d["support"] == "" for d in sciq)
    assert any(ord(ch) > 0x3000 for d in sciq for ch in d["question"])


def test_ties_go_to_the_first_choice_and_norm_uses_characters():
    item = score_item([-4.0, -4.0, -9.0], [False] * 3, ["ab", "ab", "c"], gold=1)
    assert (item.pred, item.metrics["acc"]) == (0, 0.0)
    # per character: -6/3 = -2 beats -3/1; per byte "水水水" (9 bytes) would win instead
    item = score_item([-3.0, -6.0], [False] * 2, ["a", "水水水"], gold=1)
    assert (item.pred, item.pred_norm, item.metrics["acc_norm"]) == (0, 1, 1.0)
    item = score_item([-3.0, -7.0], [False] * 2, ["é", "水水"], gold=0)
    assert item.pred_norm == 0  # -3/1 > -7/2; by bytes -3/2 < -7/6


# --------------------------------------------------------------------------------------------------
# A PyTorch reference scorer reproduces lm-eval's log-likelihoods (the harness for the JAX model's test)
# --------------------------------------------------------------------------------------------------


def torch_loglikelihoods(model_dir: Path, max_length: int):
    """Loglikelihoods from transformers' LlamaForCausalLM, one request at a time, fp32."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()

    def loglikelihoods(requests):
        out = []
        with torch.no_grad():
            for ctx, cont in requests:
                inp = torch.tensor([model_input(ctx, cont, max_length)])
                logp = torch.log_softmax(model(inp).logits[0].float(), dim=-1)[-len(cont) :]
                target = torch.tensor(cont)
                ll = logp.gather(1, target[:, None]).sum()
                out.append((float(ll), bool((logp.argmax(-1) == target).all())))
        return out

    return loglikelihoods


def test_torch_reference_reproduces_lm_eval(tokenizer):
    pytest.importorskip("torch")
    score = torch_loglikelihoods(MODEL_DIR, MAX_LENGTH)
    requests, expected = [], []
    for record in [*FIXTURE["zero_shot"].values(), *FEW["tasks"].values()]:
        for item in record["items"]:
            for r in item["requests"]:
                requests.append((r["context_ids"], r["continuation_ids"]))
                expected.append((r["loglikelihood"], r["is_greedy"]))
    got = score(requests)
    worst = max(abs(a[0] - b[0]) for a, b in zip(got, expected, strict=True))
    assert worst < 1e-4, worst
    assert [g for _, g in got] == [g for _, g in expected]
    # end to end with a real model: the same figures as lm-eval
    results = evaluate_benchmarks(list(FIXTURE["splits"]), BENCHMARKS, tokenizer, score, max_length=MAX_LENGTH)
    for task, record in FIXTURE["zero_shot"].items():
        assert results["tasks"][task]["metrics"] == record["metrics"], task
        for m, v in record["stderr"].items():
            assert math.isclose(results["tasks"][task]["stderr"][m], v, rel_tol=1e-12), (task, m)


# --------------------------------------------------------------------------------------------------
# Files: both readers, bad input
# --------------------------------------------------------------------------------------------------


def test_parquet_and_jsonl_read_the_same_items():
    for task in FIXTURE["parquet_tasks"]:
        for split in FIXTURE["splits"][task].values():
            jsonl = bt.read_docs(BENCHMARKS / task / f"{split}.jsonl")
            parquet = bt.read_docs(PARQUET / task / f"{split}.parquet")
            assert [d.fields for d in jsonl] == [d.fields for d in parquet]
            assert parquet[1].where.endswith(f"{split}.parquet:row 1") and jsonl[1].where.endswith(".jsonl:2")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_ARC = json.dumps(
    {"id": "x", "question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
)


@pytest.mark.parametrize(
    "task,line,message",
    [
        ("arc_easy", '{"id": "x", "question": ', "invalid JSON"),
        ("arc_easy", "[1, 2]", "expected a JSON object"),
        ("arc_easy", json.dumps({"id": "x", "question": "Q?", "answerKey": "A"}), "missing field 'choices'"),
        ("arc_easy", GOOD_ARC.replace('"B"}', '"E"}'), "answerKey 'E' is not among"),
        ("arc_easy", GOOD_ARC.replace('["A", "B"]', '["A"]'), "has 2 texts but 1 labels"),
        ("piqa", json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": "0"}), "'label' is str, expected an int"),
        ("piqa", json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 2}), "gold answer 2 is not among 2"),
        ("piqa", json.dumps({"goal": None, "sol1": "a", "sol2": "b", "label": 0}), "missing field 'goal'"),
        (
            "winogrande",
            json.dumps({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}),
            "has no '_' blank",
        ),
        (
            "winogrande",
            json.dumps({"sentence": "a _ b", "option1": "a", "option2": "b", "answer": ""}),
            'answer is \'\', expected "1" or "2"',
        ),
        (
            "hellaswag",
            json.dumps({"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["d"], "label": "x"}),
            "expected a label",
        ),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, task, line, message):
    path = write_lines(tmp_path / task / "test.jsonl", [GOOD_ARC if task.startswith("arc") else line, "", line])
    if task.startswith("arc"):
        expected_where = f"{path}:3"
    else:
        expected_where = f"{path}:1"
    with pytest.raises(bt.BenchmarkDataError) as e:
        bt.load_split(bt.get_task(task), path)
    assert expected_where + ":" in str(e.value) and message in str(e.value), str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no sciq test split.*docs/evaluation\.md"):
        bt.split_file(tmp_path, "sciq", "test")
    write_lines(tmp_path / "piqa" / "validation.jsonl", ["{}"])
    (tmp_path / "piqa" / "validation.parquet").write_bytes(b"not parquet")
    with pytest.raises(bt.BenchmarkDataError, match="keep one"):
        bt.split_file(tmp_path, "piqa", "validation")
    with pytest.raises(bt.BenchmarkDataError, match="not a readable Parquet file"):
        bt.read_docs(tmp_path / "piqa" / "validation.parquet")
    (tmp_path / "bad.jsonl").write_bytes(GOOD_ARC.encode() + b"\n\xff\xfe\n")
    with pytest.raises(bt.BenchmarkDataError, match=r"bad\.jsonl:2: not UTF-8"):
        bt.read_docs(tmp_path / "bad.jsonl")
    with pytest.raises(bt.BenchmarkDataError, match="no items"):
        bt.load_split(bt.get_task("arc_easy"), write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(KeyError, match="unknown benchmark 'mmlu'"):
        bt.get_task("mmlu")
