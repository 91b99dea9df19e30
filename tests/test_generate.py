"""The generation job with a deterministic test-double backend: sharding, flags and policy, over-long
inputs, bad input, the chunked ledger and its crash recovery, resume, provenance, merge and its checks.

The kill -9 test of a real worker process is in tests/test_transformers_backend.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_prompts import CORPUS, make_generator_dir

from generation import prompts as P
from generation.backends import Backend, BackendError, Completion, Devices
from generation.generate import GenerationSettings, flag_samples, parse_flag_policy, run
from generation.merge import (
    LEDGER,
    PARTS,
    SUMMARY,
    OutputError,
    WorkerOutput,
    merge,
    read_generations,
    summarize,
    worker_dir,
)

G = 3
MAX_NEW = 12


class Crash(RuntimeError):
    """Stands in for a worker dying in the middle of a chunk."""


class ScriptedBackend(Backend):
    """Deterministic samples from (prompt, seed); enforces the context like vLLM; can die on request."""

    name = "scripted"
    Options = None

    def __init__(self, eos_id: int, context_length: int = 4096, script=None, crash_on_call: int | None = None):
        self.eos_id, self._context, self.script, self.crash_on_call = eos_id, context_length, script, crash_on_call
        self.calls = 0
        self.generated: list[tuple[int, int]] = []  # (hash of prompt, seed) of every sample made

    @property
    def context_length(self) -> int:
        return self._context

    def devices(self) -> Devices:
        return Devices("gpu", 2)

    def version(self) -> str:
        return "scripted 1"

    def generate(self, requests, sampling):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise Crash("killed")
        outputs = []
        for request in requests:
            if len(request.prompt_token_ids) + sampling.max_new_tokens > self._context:
                raise ValueError("prompt too long for the context")  # what vLLM does: the whole batch fails
            outputs.append([self.sample(request, seed, sampling.max_new_tokens) for seed in request.seeds])
        return outputs

    def sample(self, request, seed: int, max_new: int) -> Completion:
        prompt_hash = int(hashlib.sha256(str(request.prompt_token_ids).encode()).hexdigest()[:8], 16)
        self.generated.append((prompt_hash, seed))
        if self.script and seed in self.script:
            return self.script[seed]
        rng = np.random.default_rng([seed, prompt_hash])
        length = int(rng.integers(1, max_new + 1))
        tokens = tuple(int(t) for t in rng.integers(20, 300, size=length))
        if length < max_new:
            return Completion(tokens + (self.eos_id,), "stop")
        return Completion(tokens, "length")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_generator_dir(tmp_path_factory.mktemp("generator"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return P.generator_tokenizer(model_dir)


def write_docs(path: Path, count: int = 11, extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps({"id": f"doc-{i}", "text": CORPUS[i % len(CORPUS)]}) for i in range(count)]
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return path


def settings(**changes) -> GenerationSettings:
    return GenerationSettings(**{"samples": G, "max_new_tokens": MAX_NEW, "chunk_documents": 3, **changes})


def job(tmp_path, model_dir, tokenizer, docs, out, backend=None, **changes):
    backend = backend or ScriptedBackend(tokenizer.eos_token_id)
    summary = run(settings(**changes), [docs], model_dir, out, backend=backend, progress=False)
    return summary, backend


def merged_lines(out: Path, merged: Path) -> list[str]:
    merge(out, merged)
    return (merged / "generations.jsonl").read_text().splitlines()


def test_single_worker_output_ledger_and_provenance(tmp_path, model_dir, tokenizer):
    docs = write_docs(tmp_path / "docs.jsonl")
    summary, backend = job(tmp_path, model_dir, tokenizer, docs, tmp_path / "out")
    directory = worker_dir(tmp_path / "out", 0, 1)
    ledger = [json.loads(line) for line in (directory / LEDGER).read_text().splitlines()]
    assert [e["part"] for e in ledger] == [f"part-{i:06d}.jsonl" for i in range(4)]  # 11 documents, chunks of 3
    assert [key for e in ledger for key in e["keys"]] == [[f"doc-{i}", G] for i in range(11)]
    assert summary["documents"] == 11 and summary["samples"] == 11 * G and len(backend.generated) == 11 * G
    records = [json.loads(line) for e in ledger for line in (directory / PARTS / e["part"]).read_text().splitlines()]
    assert summary["output_tokens"] == sum(s["output_tokens"] for r in records for s in r["samples"])
    # Cost: 2 GPUs (the test double's devices) x committed wall time, per billion output tokens.
    assert summary["cost"]["gpu_hours"] == pytest.approx(2 * summary["wall_seconds"] / 3600)
    assert summary["cost"]["gpu_hours_per_billion_output_tokens"] == pytest.approx(
        summary["cost"]["gpu_hours"] / (summary["output_tokens"] / 1e9)
    )
    provenance = json.loads((directory / "provenance.json").read_text())
    identity = provenance["identity"]
    assert identity["template"]["name"] == "wikipedia" and identity["settings"]["seed"] == 0
    assert identity["settings"]["temperature"] == 1.0 and identity["settings"]["max_new_tokens"] == MAX_NEW
    assert identity["backend"] == "scripted" and identity["inputs"][0]["name"] == "docs.jsonl"
    assert provenance["sessions"][0]["backend_version"] == "scripted 1"
    record = json.loads((directory / PARTS / ledger[0]["part"]).read_text().splitlines()[0])
    sample = record["samples"][1]
    assert sample["seed"] == P.document_seed(0, "doc-0") + 1
    assert set(sample) >= {"text", "finish_reason", "prompt_tokens", "output_tokens", "flags", "kept"}
    # A finished worker rerun is a no-op that returns its summary.
    again, backend = job(tmp_path, model_dir, tokenizer, docs, tmp_path / "out")
    assert again == json.loads((directory / SUMMARY).read_text()) and backend.calls == 0


def test_workers_partition_the_documents_and_merge_matches_one_worker(tmp_path, model_dir, tokenizer):
    docs = write_docs(tmp_path / "docs.jsonl", count=13)
    job(tmp_path, model_dir, tokenizer, docs, tmp_path / "one")
    for index in range(3):
        job(tmp_path, model_dir, tokenizer, docs, tmp_path / "three", num_workers=3, worker_index=index)
    shards = [
        {
            key[0]
            for e in map(json.loads, (worker_dir(tmp_path / "three", i, 3) / LEDGER).read_text().splitlines())
            for key in e["keys"]
        }
        for i in range(3)
    ]
    assert all(shards) and set.union(*shards) == {f"doc-{i}" for i in range(13)} and sum(map(len, shards)) == 13
    one = merged_lines(tmp_path / "one", tmp_path / "merged-one")
    three = merged_lines(tmp_path / "three", tmp_path / "merged-three")
    assert one == three and len(one) == 13 * G  # same samples, same input order, whatever N
    first = json.loads(one[0])
    assert (first["doc_id"], first["sample"], first["G"], first["prompt_version"]) == ("doc-0", 0, G, "wikipedia-v1")
    assert [g["doc_id"] for g in read_generations(tmp_path / "merged-three")][:G] == ["doc-0"] * G


def test_crash_mid_run_then_resume_never_regenerates_committed_samples(tmp_path, model_dir, tokenizer):
    docs = write_docs(tmp_path / "docs.jsonl")
    job(tmp_path, model_dir, tokenizer, docs, tmp_path / "clean")
    crashing = ScriptedBackend(tokenizer.eos_token_id, crash_on_call=3)
    with pytest.raises(Crash):
        job(tmp_path, model_dir, tokenizer, docs, tmp_path / "crashed", backend=crashing)
    committed = set(crashing.generated[: 2 * 3 * G])  # two chunks of 3 documents were committed
    _, resumed = job(tmp_path, model_dir, tokenizer, docs, tmp_path / "crashed")
    assert not committed & set(resumed.generated) and len(resumed.generated) == (11 - 6) * G
    assert merged_lines(tmp_path / "clean", tmp_path / "m1") == merged_lines(tmp_path / "crashed", tmp_path / "m2")
    sessions = json.loads((worker_dir(tmp_path / "crashed", 0, 1) / "provenance.json").read_text())["sessions"]
    assert len(sessions) == 2


def test_recovery_from_every_crash_window(tmp_path, model_dir, tokenizer):
    """A kill between the part's rename and its ledger line, mid-append, or mid-write of a part."""
    docs = write_docs(tmp_path / "docs.jsonl")
    job(tmp_path, model_dir, tokenizer, docs, tmp_path / "clean")
    clean = worker_dir(tmp_path / "clean", 0, 1)
    damaged_root = tmp_path / "damaged"
    damaged = worker_dir(damaged_root, 0, 1)
    shutil.copytree(clean, damaged)
    (damaged / SUMMARY).unlink()
    lines = (damaged / LEDGER).read_bytes().splitlines(keepends=True)
    # Last chunk: part renamed but no ledger line; the one before: ledger line torn mid-append.
    (damaged / LEDGER).write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    (damaged / PARTS / "part-000004.jsonl.tmp").write_bytes(b'{"doc_id": "half a line')
    _, backend = job(tmp_path, model_dir, tokenizer, docs, damaged_root)
    assert len(backend.generated) == (11 - 6) * G  # chunks 2 and 3 again, nothing committed before
    assert not list(damaged.glob("**/*.tmp"))
    assert merged_lines(tmp_path / "clean", tmp_path / "m1") == merged_lines(damaged_root, tmp_path / "m2")


def test_restart_with_other_settings_is_refused(tmp_path, model_dir, tokenizer):
    docs = write_docs(tmp_path / "docs.jsonl")
    with pytest.raises(Crash):
        job(tmp_path, model_dir, tokenizer, docs, tmp_path / "out", backend=ScriptedBackend(0, crash_on_call=2))
    with pytest.raises(OutputError, match="differing: settings.seed"):
        job(tmp_path, model_dir, tokenizer, docs, tmp_path / "out", seed=1)
    write_docs(docs, count=12)
    with pytest.raises(OutputError, match=r"differing: inputs"):
        job(tmp_path, model_dir, tokenizer, docs, tmp_path / "out")


class BrokenBackend(ScriptedBackend):
    """Breaks the interface: `damage` changes the outputs of each generate call."""

    name = "broken"

    def __init__(self, eos_id: int, damage):
        super().__init__(eos_id)
        self.damage = damage

    def generate(self, requests, sampling):
        return self.damage(super().generate(requests, sampling))


def drop_last_sample_of_request_1(outputs):
    return [samples[:-1] if i == 1 else samples for i, samples in enumerate(outputs)]


@pytest.mark.parametrize(
    "damage, message",
    [
        (drop_last_sample_of_request_1, rf"backend broken: request 1 asked for {G} samples, got {G - 1}"),
        (lambda outputs: outputs[:-1], r"backend broken: 2 outputs for 3 requests"),
    ],
)
def test_a_backend_returning_the_wrong_number_of_completions_fails_clearly(
    tmp_path, model_dir, tokenizer, damage, message
):
    docs = write_docs(tmp_path / "docs.jsonl")
    with pytest.raises(BackendError, match=message):
        job(
            tmp_path,
            model_dir,
            tokenizer,
            docs,
            tmp_path / "out",
            backend=BrokenBackend(tokenizer.eos_token_id, damage),
        )
    assert not (worker_dir(tmp_path / "out", 0, 1) / LEDGER).exists()  # nothing of the broken chunk was committed


def test_one_writer_per_worker_directory(tmp_path):
    first = WorkerOutput(tmp_path / "worker", {"job": 1})
    try:
        with pytest.raises(
            OutputError,
            match=rf"{tmp_path}/worker: another process writing this worker's output "
            r"holds .lock",
        ):
            WorkerOutput(tmp_path / "worker", {"job": 1})
    finally:
        first.close()
    WorkerOutput(tmp_path / "worker", {"job": 1}).close()  # released: the next writer may open it


def test_flag_samples_rules():
    flags = flag_samples(
        ["An article.", " An article. ", "", "Source text.", "Cut off", "x"],
        ["stop", "stop", "stop", "stop", "length", "abort"],
        "Source text.\n",
    )
    assert flags == [[], ["duplicate"], ["empty"], ["copies_source"], ["truncated"], ["aborted"]]


def test_flags_policy_and_counts(tmp_path, model_dir, tokenizer):
    docs = write_docs(tmp_path / "docs.jsonl", count=1)
    base = P.document_seed(0, "doc-0")
    encode = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    eos = tokenizer.eos_token_id
    script = {
        base: Completion(encode("A fine article.") + (eos,), "stop"),
        base + 1: Completion(encode("A fine article.") + (eos,), "stop"),  # duplicate of sample 0
        base + 2: Completion((eos,), "stop"),  # empty
        base + 3: Completion(encode(CORPUS[0]) + (eos,), "stop"),  # copies the source
        base + 4: Completion(encode("Cut in the mid"), "length"),  # truncated
    }
    expected_kept = {
        "": [True, False, False, False, True],  # the default drops empty, duplicate, copies_source
        "all=keep": [True] * 5,
        "truncated=drop": [True, False, False, False, False],
    }
    for policy, kept in expected_kept.items():
        out = tmp_path / f"out-{policy}"
        backend = ScriptedBackend(eos, script=script)
        summary, _ = job(
            tmp_path, model_dir, tokenizer, docs, out, backend=backend, samples=5, flag_policy=parse_flag_policy(policy)
        )
        (part,) = (worker_dir(out, 0, 1) / PARTS).iterdir()
        samples = json.loads(part.read_text())["samples"]
        assert [s["kept"] for s in samples] == kept, policy
        assert summary["flags"] == {"truncated": 1, "empty": 1, "duplicate": 1, "copies_source": 1, "aborted": 0}
        assert summary["kept"] == sum(kept) and summary["dropped"] == 5 - sum(kept)
        assert samples[4]["finish_reason"] == "length"
        assert samples[4]["output_tokens"] == len(script[base + 4].token_ids)
    merge(tmp_path / "out-", tmp_path / "merged")
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert (manifest["kept_samples"], manifest["dropped_samples"]) == (2, 3)
    dropped = [json.loads(line) for line in (tmp_path / "merged" / "dropped.jsonl").read_text().splitlines()]
    assert [d["flags"] for d in dropped] == [["duplicate"], ["empty"], ["copies_source"]]
    with pytest.raises(Exception, match="--flag-policy 'empty=maybe'"):
        parse_flag_policy("empty=maybe")


def test_overlong_inputs_are_never_sent(tmp_path, model_dir, tokenizer):
    long_text = " ".join(CORPUS[:80])
    docs = write_docs(tmp_path / "docs.jsonl", count=4, extra_lines=(json.dumps({"id": "long", "text": long_text}),))
    context = 1024
    summary, backend = job(
        tmp_path,
        model_dir,
        tokenizer,
        docs,
        tmp_path / "skip",
        backend=ScriptedBackend(tokenizer.eos_token_id, context_length=context),
    )
    assert summary["documents"] == 4 and summary["skipped"]["overlong"] == 1
    assert summary["skipped_examples"] == {"overlong": ["long"]}
    summary, _ = job(
        tmp_path,
        model_dir,
        tokenizer,
        docs,
        tmp_path / "cut",
        overlong="cut",
        backend=ScriptedBackend(tokenizer.eos_token_id, context_length=context),
    )
    assert summary["documents"] == 5 and summary["cut"] == 1 and summary["skipped"]["overlong"] == 0
    lines = merged_lines(tmp_path / "cut", tmp_path / "merged")
    long = json.loads(lines[-1])
    assert long["doc_id"] == "long" and 0 < long["used_chars"] < long["source_chars"] == len(long_text)


def test_bad_input_is_counted_once_across_workers(tmp_path, model_dir, tokenizer):
    extra = (json.dumps({"id": "doc-1", "text": "again"}), json.dumps({"id": "blank", "text": "  "}))
    docs = write_docs(tmp_path / "docs.jsonl", count=6, extra_lines=extra)
    totals: dict[str, int] = {}
    for index in range(2):
        summary, _ = job(tmp_path, model_dir, tokenizer, docs, tmp_path / "out", num_workers=2, worker_index=index)
        for reason, count in summary["bad_input"]["skipped"].items():
            totals[reason] = totals.get(reason, 0) + count
    assert totals["duplicate_id"] == 1 and totals["empty"] == 1 and sum(totals.values()) == 2
    docs.write_text(docs.read_text() + "not json\n")
    with pytest.raises(Exception, match=r"docs.jsonl:9: invalid JSON.*malformed=skip"):
        job(tmp_path, model_dir, tokenizer, docs, tmp_path / "other")


def test_rationale_job(tmp_path, model_dir, tokenizer):
    docs = write_docs(tmp_path / "docs.jsonl", count=4, extra_lines=(json.dumps({"id": "tiny", "text": "Hi."}),))
    summary, backend = job(tmp_path, model_dir, tokenizer, docs, tmp_path / "out", task="rationale", samples=4)
    assert summary["documents"] == 4 and summary["skipped"]["too_short"] == 1
    lines = [json.loads(line) for line in merged_lines(tmp_path / "out", tmp_path / "merged")]
    first = [line for line in lines if line["doc_id"] == "doc-0"]
    assert [s["sample"] for s in first] == [0, 1, 2, 3] and all(s["task"] == "rationale" for s in first)
    offsets = P.token_offsets(tokenizer, CORPUS[0])
    assert [(s["split_token"], s["split_char"]) for s in first] == P.rationale_splits(offsets, 4)
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert manifest["identity"]["settings"]["max_new_tokens"] == MAX_NEW


def test_merge_refuses_incomplete_or_damaged_outputs(tmp_path, model_dir, tokenizer):
    docs = write_docs(tmp_path / "docs.jsonl")
    out = tmp_path / "out"
    job(tmp_path, model_dir, tokenizer, docs, out, num_workers=2, worker_index=0)
    with pytest.raises(OutputError, match=r"workers \[1\] of 2 have no output"):
        merge(out, tmp_path / "m")
    with pytest.raises(Crash):
        job(
            tmp_path,
            model_dir,
            tokenizer,
            docs,
            out,
            num_workers=2,
            worker_index=1,
            backend=ScriptedBackend(tokenizer.eos_token_id, crash_on_call=2),
        )
    with pytest.raises(OutputError, match="has not finished; rerun it"):
        merge(out, tmp_path / "m")
    job(tmp_path, model_dir, tokenizer, docs, out, num_workers=2, worker_index=1)
    part = sorted((worker_dir(out, 1, 2) / PARTS).iterdir())[0]
    original = part.read_bytes()
    part.write_bytes(original.replace(b'"kept": true', b'"kept": false', 1))
    with pytest.raises(OutputError, match="sha256 differs"):
        merge(out, tmp_path / "m")
    part.write_bytes(original)
    assert not (tmp_path / "m").exists()
    merge(out, tmp_path / "m")
    with pytest.raises(OutputError, match="already exists"):
        merge(out, tmp_path / "m")


def test_summary_cost_per_device_kind():
    entries = [
        {"stats": {"output_tokens": 500_000}, "wall_seconds": 3600.0, "devices": {"kind": "gpu", "count": 8}},
        {"stats": {"output_tokens": 500_000}, "wall_seconds": 1800.0, "devices": {"kind": "cpu", "count": 4}},
    ]
    cost = summarize(entries)["cost"]
    assert cost["gpu_hours"] == 8.0 and cost["cpu_core_hours"] == 2.0
    assert cost["gpu_hours_per_billion_output_tokens"] == pytest.approx(8.0 / 1e-3)


def test_backend_options_are_type_checked_by_the_config_coercer():
    from generation.backends import build_options
    from generation.backends.jax_backend import JaxOptions

    assert build_options(JaxOptions, {"batch_size": 4, "dtype": "float32"}, "jax").batch_size == 4
    with pytest.raises(BackendError, match=r"backend jax options.batch_size: expected an integer, got 'four'"):
        build_options(JaxOptions, {"batch_size": "four"}, "jax")
    with pytest.raises(BackendError, match=r"unknown key backend jax options.colour"):
        build_options(JaxOptions, {"colour": 1}, "jax")
    with pytest.raises(BackendError, match=r"backend vllm takes no options"):
        build_options(None, {"x": 1}, "vllm")
