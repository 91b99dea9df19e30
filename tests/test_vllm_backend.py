"""Our side of the vLLM backend, against a test double of the `vllm` module (vLLM is not installable here).

The double mimics what generation/backends/vllm_backend.py relies on, as in vLLM's v1 engine:
`LLM(**engine_args)` with `llm_engine.model_config.max_model_len`; `LLM.generate(prompts, params,
use_tqdm=)` taking TokensPrompt dicts and one SamplingParams per prompt, rejecting a prompt longer than
max_model_len (the whole call fails, as in vLLM), splitting `n` into child requests seeded seed + k
(vllm/v1/engine/parallel_sampling.py) and returning RequestOutput objects in prompt order, each with
CompletionOutput(index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason).
The real engine path was not run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
from typing import Any

import numpy as np
import pytest
from test_generate import CORPUS, Crash, merged_lines, write_docs
from test_prompts import make_generator_dir

from generation import prompts as P
from generation.backends import BackendError, Request, Sampling, create_backend
from generation.backends.vllm_backend import VllmBackend, VllmOptions, engine_arguments, parse_request_output
from generation.generate import GenerationSettings, run
from generation.merge import LEDGER, worker_dir

EOS = 0


@dataclasses.dataclass
class SamplingParams:  # the fields of vllm.SamplingParams that our side sets, with vLLM's defaults
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: Any
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool


class FakeLLM:
    def __init__(self, model: str, max_model_len: int = 4096, **engine_args: Any):
        self.engine_args = {"model": model, "max_model_len": max_model_len, **engine_args}
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=max_model_len))
        self.requests = 0
        self.children: list[tuple[tuple[int, ...], int]] = []  # (prompt, child seed) of every sample
        self.crash_on_call: int | None = None
        self.calls = 0
        self.shuffle_samples = False

    def generate(self, prompts, sampling_params, *, use_tqdm: bool = True):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise Crash("engine died")
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        for prompt in prompts:
            if len(prompt["prompt_token_ids"]) > self.llm_engine.model_config.max_model_len:
                raise ValueError("The decoder prompt is longer than the maximum model length")
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            children = [self._child(prompt["prompt_token_ids"], params, k) for k in range(params.n)]
            if self.shuffle_samples:  # vLLM returns children in finishing order when streaming
                children.reverse()
            ids = list(prompt["prompt_token_ids"])
            outputs.append(RequestOutput(str(self.requests), None, ids, None, children, finished=True))
            self.requests += 1
        return outputs

    def _child(self, prompt: list[int], params: SamplingParams, index: int) -> CompletionOutput:
        seed = params.seed + index  # ParentRequest._get_child_sampling_params
        self.children.append((tuple(prompt), seed))
        rng = np.random.default_rng([seed, len(prompt), sum(prompt)])
        tokens = [int(t) for t in rng.integers(20, 300, size=params.max_tokens)]
        stop = int(rng.integers(1, params.max_tokens + 3))
        if stop <= params.max_tokens:
            return CompletionOutput(index, "", tokens[: stop - 1] + [EOS], None, None, "stop", None)
        return CompletionOutput(index, "", tokens, None, None, "length", None)


def fake_vllm() -> types.SimpleNamespace:
    return types.SimpleNamespace(LLM=FakeLLM, SamplingParams=SamplingParams, __version__="0.0-test-double")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_generator_dir(tmp_path_factory.mktemp("generator"))


def backend(model_dir, **options) -> VllmBackend:
    return VllmBackend(model_dir, VllmOptions(**options), vllm_module=fake_vllm())


def test_engine_arguments_prefix_caching_and_knobs(model_dir):
    options = VllmOptions(
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        gpu_memory_utilization=0.8,
        max_model_len=2048,
        tensor_parallel_size=2,
    )
    args = engine_arguments(model_dir, options, trust_remote_code=False)
    assert args["enable_prefix_caching"] is True and args["trust_remote_code"] is False
    assert args["model"] == args["tokenizer"] == str(model_dir)
    knobs = [f.name for f in dataclasses.fields(VllmOptions) if f.name not in ("dtype", "enforce_eager")]
    assert {k: args[k] for k in knobs} == {k: getattr(options, k) for k in knobs}
    defaults = engine_arguments(model_dir, VllmOptions(), trust_remote_code=True)
    assert "max_num_seqs" not in defaults and "max_model_len" not in defaults and defaults["trust_remote_code"]
    llm_backend = backend(model_dir, max_model_len=2048, tensor_parallel_size=2)
    assert llm_backend.context_length == 2048 and llm_backend.devices().count == 2
    assert llm_backend.version() == "vllm 0.0-test-double"


def test_sampling_params_per_request(model_dir):
    params = backend(model_dir).sampling_params(Request((5, 6), (40, 41, 42)), Sampling(0.7, 0.9, 0, 100))
    assert (params.n, params.seed, params.temperature, params.top_p, params.max_tokens) == (3, 40, 0.7, 0.9, 100)
    assert params.top_k == 0  # not passed: vLLM's own default
    assert backend(model_dir).sampling_params(Request((5,), (1,)), Sampling(top_k=20)).top_k == 20


def test_samples_get_distinct_reproducible_seeds(model_dir):
    llm_backend = backend(model_dir)
    requests = [Request((7, 8, 9), (100, 101, 102, 103)), Request((7, 8, 10), (500,))]
    first = llm_backend.generate(requests, Sampling(max_new_tokens=20))
    assert [seed for _, seed in llm_backend._llm.children] == [100, 101, 102, 103, 500]
    assert len({c.token_ids for c in first[0]}) == 4  # the G samples differ
    assert backend(model_dir).generate(requests, Sampling(max_new_tokens=20)) == first
    assert {c.finish_reason for c in first[0] + first[1]} <= {"stop", "length"}
    for completion in first[0]:
        assert (completion.finish_reason == "stop") == (completion.token_ids[-1] == EOS)


def test_output_parsing_orders_samples_and_checks_requests(model_dir):
    llm_backend = backend(model_dir)
    llm_backend._llm.shuffle_samples = True
    request = Request((7, 8, 9), (100, 101, 102))
    (shuffled,) = llm_backend.generate([request], Sampling(max_new_tokens=8))
    (in_order,) = backend(model_dir).generate([request], Sampling(max_new_tokens=8))
    assert shuffled == in_order  # sample k is CompletionOutput.index k, whatever order vLLM returns
    good = RequestOutput("0", None, [7, 8, 9], None, [CompletionOutput(0, "", [1], None, None, "stop")], True)
    with pytest.raises(BackendError, match="another prompt"):
        parse_request_output(good, Request((7, 8), (1,)), 0)
    with pytest.raises(BackendError, match=r"sample indices \[0\], expected 0..1"):
        parse_request_output(good, Request((7, 8, 9), (1, 2)), 0)
    with pytest.raises(BackendError, match="not finished"):
        parse_request_output(dataclasses.replace(good, finished=False), Request((7, 8, 9), (1,)), 0)


def test_missing_vllm_gives_an_install_hint(model_dir):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(BackendError, match="cannot import vllm.*own environment"):
        create_backend("vllm", model_dir)


def test_job_with_vllm_double_filters_overlong_resumes_and_merges(tmp_path, model_dir):
    """The whole job through VllmBackend: no over-long prompt reaches the engine, a crash resumes."""
    long_text = " ".join(CORPUS[:80])
    docs = write_docs(tmp_path / "docs.jsonl", count=7, extra_lines=(json.dumps({"id": "long", "text": long_text}),))
    settings = GenerationSettings(samples=4, max_new_tokens=16, chunk_documents=2)
    crashing = backend(model_dir, max_model_len=1024)
    crashing._llm.crash_on_call = 3
    with pytest.raises(Crash):
        run(settings, [docs], model_dir, tmp_path / "out", backend=crashing, progress=False)
    committed = set(crashing._llm.children)
    resumed = backend(model_dir, max_model_len=1024)
    summary = run(settings, [docs], model_dir, tmp_path / "out", backend=resumed, progress=False)
    assert not committed & set(resumed._llm.children)
    assert summary["documents"] == 7 and summary["skipped"]["overlong"] == 1 and summary["samples"] == 28
    ledger = [json.loads(line) for line in (worker_dir(tmp_path / "out", 0, 1) / LEDGER).read_text().splitlines()]
    assert sorted(key[0] for e in ledger for key in e["keys"]) == sorted(f"doc-{i}" for i in range(7))
    clean = backend(model_dir, max_model_len=1024)
    run(settings, [docs], model_dir, tmp_path / "clean", backend=clean, progress=False)
    assert merged_lines(tmp_path / "out", tmp_path / "m1") == merged_lines(tmp_path / "clean", tmp_path / "m2")
    provenance = json.loads((worker_dir(tmp_path / "out", 0, 1) / "provenance.json").read_text())
    assert provenance["identity"]["backend"] == "vllm"
    assert provenance["sessions"][-1]["backend_version"] == "vllm 0.0-test-double"
    first = json.loads((tmp_path / "m1" / "generations.jsonl").read_text().splitlines()[0])
    assert first["seed"] == P.document_seed(0, "doc-0")
