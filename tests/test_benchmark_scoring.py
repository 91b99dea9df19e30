"""Our JAX decoder as lm-eval's model side, against lm-evaluation-harness 0.4.13 and transformers.

The fixture model (tests/data/lm_eval_model, a tiny random Llama) is imported with hf.import_llama in fp32
and scores every request of tests/data/lm_eval_fixture.json through BatchedLoglikelihoods: every
log-likelihood within 1e-3 of lm-eval's, every is_greedy, every item's prediction and every aggregate
identical, on one device, on 8 fake devices (data 8; data 4 x tensor 2) and in a 2-process jax.distributed
job. The fixture's is_greedy are all false (a random model), so greedy continuations made with transformers'
LlamaForCausalLM check the true case. The batching itself (lm-eval's order, buckets, padding rows, spans,
request order) is checked with a scorer whose numbers are known.
"""

from __future__ import annotations

import functools
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from benchmark_scoring_job import FIXTURE, MODEL_DIR, fixture_figures, fixture_requests
from processes import distributed_env, free_port, start_python
from test_benchmarks import fewshot_file, fixture_cases, lm_evals_float_sum, scored_file, torch_loglikelihoods

from megadoc_jax import hf, sharding
from megadoc_jax.evaluation import benchmark_scoring as bs
from megadoc_jax.evaluation.benchmarks import evaluate_task

MAX_LENGTH = FIXTURE["max_length"]
FEW = FIXTURE["few_shot"]
MESHES = {"1 device": {}, "data 8": {"data": 8}, "data 4 x tensor 2": {"data": 4, "tensor": 2}}
CONTEXT_MESH = {"data 2 x context 2": {"data": 2, "context": 2}}  # positions split: scores gathered per row


@functools.cache
def mesh_of(name: str) -> jax.sharding.Mesh:
    sizes = {**MESHES, **CONTEXT_MESH}[name]
    devices = jax.devices()[: max(1, np.prod(list(sizes.values()), dtype=int))]
    return sharding.make_mesh(sizes, devices)


@functools.cache
def jax_loglikelihoods(mesh_name: str) -> bs.BatchedLoglikelihoods:
    """The fixture model on the mesh, one scorer per mesh (its compiled programs reused across tests)."""
    mesh = mesh_of(mesh_name)
    model, _, max_length = hf.import_llama(MODEL_DIR, mesh, compute_dtype="float32")
    assert max_length == MAX_LENGTH
    return bs.BatchedLoglikelihoods(bs.decoder_batch_scorer(model, mesh), mesh, max_length=MAX_LENGTH)


@functools.cache
def lm_eval_answers() -> dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, bool]]:
    answers = {}
    for record in [*FIXTURE["zero_shot"].values(), *FEW["tasks"].values()]:
        for item in record["items"]:
            for r in item["requests"]:
                answers[(tuple(r["context_ids"]), tuple(r["continuation_ids"]))] = (r["loglikelihood"], r["is_greedy"])
    return answers


@pytest.fixture(scope="module")
def tokenizer():
    return hf.load_tokenizer(MODEL_DIR)


# --------------------------------------------------------------------------------------------------
# Batching, with a scorer whose numbers are known
# --------------------------------------------------------------------------------------------------


def known_scorer(batch):
    """log_prob = -(target + 1), greedy = target is even: a request's answer is a function of its ids."""
    return {"log_prob": -(batch["targets"] + 1).astype(jnp.float32), "is_greedy": batch["targets"] % 2 == 0}


def known_answer(continuation: list[int]) -> tuple[float, bool]:
    return float(-sum(t + 1 for t in continuation)), all(t % 2 == 0 for t in continuation)


def random_requests(n: int, seed: int, max_total: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        total = rng.randint(2, max_total)
        cont = rng.randint(1, min(total - 1, 6))
        ids = [rng.randrange(2, 500) for _ in range(total)]
        requests.append((ids[: total - cont], ids[total - cont :]))
    return requests


@pytest.mark.parametrize("mesh_name", ["1 device", "data 4 x tensor 2", "data 2 x context 2"])
def test_batches_score_each_continuation_in_request_order(mesh_name):
    mesh = mesh_of(mesh_name)
    requests = random_requests(75, seed=0, max_total=60)  # some longer than max_length=40: cut from the left
    scorer = bs.BatchedLoglikelihoods(known_scorer, mesh, max_length=40, batch_size=16, buckets=(16, 40))
    assert bs.length_multiple(mesh) == (4 if "context" in mesh_name else 1)
    got = scorer(requests)
    assert got == [known_answer(cont) for _, cont in requests]
    assert any(a[1] for a in got) and not all(a[1] for a in got)
    # 75 requests in batches of 16: 5 batches, the last with 5 padding rows; only the two bucket shapes
    assert scorer.stats.batches == 5 and set(scorer.stats.shapes) <= {(16, 16), (16, 40)}
    assert scorer.stats.shapes[(16, 40)] >= 1 and scorer.stats.shapes[(16, 16)] >= 1
    # the same requests shuffled: the same answers, moved with them
    order = list(range(len(requests)))
    random.Random(1).shuffle(order)
    assert scorer([requests[i] for i in order]) == [got[i] for i in order]


def test_plan_is_lm_evals_order_in_buckets():
    requests = [([1, 2], [3]), ([1, 2, 3, 4], [5, 6]), ([9], [8]), ([1, 1], [2]), ([7] * 30, [1])]
    # lm-eval's Collator: longest first, ties by the token ids
    assert bs.lm_eval_order(requests) == [4, 1, 3, 0, 2]
    windows = [bs.Window.of(c, k, 16) for c, k in requests]
    assert windows[4].inputs.tolist() == [7] * 16 and windows[4].targets.tolist() == [7] * 15 + [1]
    assert windows[1].inputs.tolist() == [1, 2, 3, 4, 5] and windows[1].targets.tolist() == [2, 3, 4, 5, 6]
    plan = bs.plan_batches(windows, bs.lm_eval_order(requests), 2, (4, 8, 16))
    assert [p.rows.tolist() for p in plan] == [[4, 1], [3, 0], [2, -1]]
    assert [p.length for p in plan] == [16, 4, 4]
    packed = bs.pack(plan[2], windows)
    assert packed["inputs"].tolist() == [[9, 0, 0, 0], [0, 0, 0, 0]] and packed["targets"][0, 0] == 8
    assert bs.bucket_lengths(192) == (64, 128, 192)
    assert bs.bucket_lengths(4096, multiple=6) == (66, 132, 258, 516, 1026, 2052, 4098)
    assert bs.bucket_lengths(48) == (48,)
    with pytest.raises(ValueError, match="longer than the largest bucket 8"):
        bs.plan_batches(windows, [4], 1, (4, 8))


def test_bad_batching_settings_are_refused():
    mesh = mesh_of("data 8")
    scorer = bs.BatchedLoglikelihoods(known_scorer, mesh, max_length=40, batch_size=3)
    assert scorer.batch_size == 8  # rounded up to the row axes (data x fsdp)
    with pytest.raises(ValueError, match="shorter than max_length 40"):
        bs.BatchedLoglikelihoods(known_scorer, mesh, max_length=40, buckets=(16, 32))
    with pytest.raises(ValueError, match=r"buckets \[6\] are not multiples of 4"):
        bs.BatchedLoglikelihoods(known_scorer, mesh_of("data 2 x context 2"), max_length=40, buckets=(6, 40))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        bs.BatchedLoglikelihoods(known_scorer, mesh, max_length=40, batch_size=0)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        scorer([([1], [2] * 41)])


# --------------------------------------------------------------------------------------------------
# The fixture model against lm-eval: every request, every item, every aggregate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_every_request_is_lm_evals(mesh_name):
    requests = fixture_requests()
    got = jax_loglikelihoods(mesh_name)(requests)
    expected = [lm_eval_answers()[(tuple(c), tuple(k))] for c, k in requests]
    worst = max(abs(a[0] - b[0]) for a, b in zip(got, expected, strict=True))
    assert worst < 1e-3, worst
    assert [g for _, g in got] == [g for _, g in expected]
    if mesh_name != "1 device":  # the same numbers on every mesh, up to fp32 reduction order
        one = jax_loglikelihoods("1 device")(requests)
        np.testing.assert_allclose([a for a, _ in got], [a for a, _ in one], rtol=1e-6, atol=1e-5)
    shapes = jax_loglikelihoods(mesh_name).stats.shapes
    assert {length for _, length in shapes} <= {64, 128, 192}  # few programs: the buckets


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("task,num_fewshot,record", list(fixture_cases()))
def test_items_and_aggregates_are_lm_evals(tokenizer, mesh_name, task, num_fewshot, record):
    result = evaluate_task(
        task,
        scored_file(task),
        tokenizer,
        jax_loglikelihoods(mesh_name),
        max_length=MAX_LENGTH,
        num_fewshot=num_fewshot,
        fewshot_path=fewshot_file(task) if num_fewshot else None,
        seed=FEW["seed"],
    )
    for ours, expected in zip(result.items, record["items"], strict=True):
        np.testing.assert_allclose(ours.loglikelihoods, [r["loglikelihood"] for r in expected["requests"]], atol=1e-3)
        assert ours.metrics == {m: expected[m] for m in record["metrics"]}
    assert result.metrics == record["metrics"]
    assert result.stderr == lm_evals_float_sum(record["stderr"])


def assert_figures_are_lm_evals(figures: dict) -> None:
    """run_benchmarks' zero- and few-shot figures equal the fixture's aggregates, bit for bit."""
    zero, few = figures["zero_shot"], figures["few_shot"]
    for task, record in FIXTURE["zero_shot"].items():
        assert zero["tasks"][task]["metrics"] == record["metrics"], task
        assert zero["tasks"][task]["stderr"] == lm_evals_float_sum(record["stderr"]), task
    assert zero["paper_average"]["acc"] == lm_evals_float_sum(FIXTURE["paper3"]["metrics"]["acc"])
    assert zero["paper_average"]["acc_stderr"] == lm_evals_float_sum(FIXTURE["paper3"]["stderr"]["acc"])
    assert zero["tasks"]["sciq"]["truncated"] > 0
    for task, record in FEW["tasks"].items():
        assert few["tasks"][task]["metrics"] == record["metrics"], task
        assert few["tasks"][task]["stderr"] == lm_evals_float_sum(record["stderr"]), task


@functools.cache
def one_process_figures() -> dict:
    return fixture_figures(mesh_of("1 device"))


def test_run_benchmarks_end_to_end_is_lm_evals():
    figures = one_process_figures()
    assert_figures_are_lm_evals(figures)
    scoring = figures["zero_shot"]["scoring"]
    assert scoring["requests"] == sum(t["requests"] for t in figures["zero_shot"]["tasks"].values())
    assert scoring["local_requests"] == scoring["requests"] and 0 <= scoring["padding_fraction"] < 1


# --------------------------------------------------------------------------------------------------
# is_greedy true: the model's own greedy continuations, made with transformers
# --------------------------------------------------------------------------------------------------


def greedy_continuation(model, context: list[int], n: int) -> list[int]:
    import torch

    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-MAX_LENGTH:]])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(context) :]


def test_greedy_continuations_are_transformers(tokenizer):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32, local_files_only=True).eval()
    contexts = [r["context_ids"] for r in (item["requests"][0] for item in FIXTURE["zero_shot"]["arc_easy"]["items"])]
    requests, constructed = [], []
    for context in contexts[:4]:
        greedy = greedy_continuation(model, context, 3)
        other = (greedy[-1] + 1) % model.config.vocab_size
        requests += [(context, greedy[:1]), (context, greedy), (context, [*greedy[:2], other])]
        constructed += [True, True, False]
    # longer than the model: cut from the left, the first continuation token still sees the last 192 tokens
    long_context = max((c for c, _ in fixture_requests()), key=len)
    assert len(long_context) > MAX_LENGTH
    greedy = greedy_continuation(model, long_context, 1)
    requests += [(long_context, greedy), (long_context, [(greedy[0] + 1) % model.config.vocab_size])]
    constructed += [True, False]
    expected = torch_loglikelihoods(MODEL_DIR, MAX_LENGTH)(requests)
    assert [g for _, g in expected] == constructed  # the reference agrees with the construction
    for mesh_name in ("1 device", "data 4 x tensor 2"):
        got = jax_loglikelihoods(mesh_name)(requests)
        assert [g for _, g in got] == [g for _, g in expected], mesh_name
        np.testing.assert_allclose([a for a, _ in got], [a for a, _ in expected], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Multi-host: a 2-process jax.distributed job on CPU (gloo)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes", ["data=8", "data=4,tensor=2"])
def test_two_processes_get_the_figures_of_one(tmp_path, mesh_sizes):
    coordinator = f"127.0.0.1:{free_port()}"
    job = ["tests/benchmark_scoring_job.py", str(tmp_path), mesh_sizes]
    processes = [start_python(job, devices=4, env=distributed_env(coordinator, 2, i)) for i in range(2)]
    for p in processes:
        output, _ = p.communicate(timeout=400)
        assert p.returncode == 0, output
    figures = [json.loads((tmp_path / f"process-{i}.json").read_text()) for i in range(2)]
    assert [f["process"] for f in figures] == [{"index": i, "count": 2, "devices": 8} for i in range(2)]
    assert figures[0]["requests"] == figures[1]["requests"]  # every process gets all results, gathered
    # each process scored a share: the rows its devices hold (data 8: half the rows each, no overlap)
    scoring = [f["zero_shot"]["scoring"] for f in figures]
    assert all(0 < s["local_requests"] < s["requests"] for s in scoring)
    if mesh_sizes == "data=8":
        assert sum(s["local_requests"] for s in scoring) == scoring[0]["requests"]
    for f in figures:
        assert_figures_are_lm_evals(f)
        for part in ("zero_shot", "few_shot"):
            assert {k: v for k, v in f[part].items() if k != "scoring"} == json.loads(
                json.dumps({k: v for k, v in one_process_figures()[part].items() if k != "scoring"})
            )
    one = one_process_figures()["requests"]
    np.testing.assert_allclose([a for a, _ in figures[0]["requests"]], [a for a, _ in one], rtol=1e-6, atol=1e-5)
    assert [g for _, g in figures[0]["requests"]] == [g for _, g in one]
