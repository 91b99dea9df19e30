"""The transformers backend for real, with a tiny randomly initialised Llama saved to a temporary directory:
exact per-row sampling, batch independence, finish reasons, local-only loading, kill -9 of a worker
process and resume, and the whole path from documents to a token store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the transformers backend needs torch: pip install 'megadoc-jax[torch]'")

from processes import kill_when  # noqa: E402
from test_generate import merged_lines, write_docs  # noqa: E402
from test_prompts import make_generator_dir  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from generation.backends import BackendError, Request, Sampling, create_backend  # noqa: E402
from generation.backends.transformers_backend import GumbelSampler  # noqa: E402
from generation.generate import GenerationSettings, parse_flag_policy, run  # noqa: E402
from generation.merge import LEDGER, SUMMARY, worker_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_tiny_llama(path: Path) -> Path:
    make_generator_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def backend(model_dir):
    return create_backend("transformers", model_dir, {"batch_size": 3})


def test_gumbel_sampler_draws_from_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    rows = 4000
    noisy = GumbelSampler(range(rows))(None, logits.repeat(rows, 1))
    frequencies = torch.bincount(noisy.argmax(-1), minlength=5).double() / rows
    expected = torch.softmax(logits.double(), -1)
    tolerance = 4 * (expected * (1 - expected) / rows).sqrt() + 1e-9
    assert ((frequencies - expected).abs() <= tolerance).all(), (frequencies, expected)
    twice = [GumbelSampler([7, 8])(None, logits.repeat(2, 1)) for _ in range(2)]
    assert torch.equal(*twice)


def test_samples_do_not_depend_on_their_batch(backend):
    a = Request(tuple(range(30, 60)), (11, 12, 13))
    b = Request(tuple(range(40, 50)), (99,))
    sampling = Sampling(max_new_tokens=10)
    together = backend.generate([b, a], sampling)
    alone = backend.generate([a], sampling)
    assert together[1] == alone[0] and len(together[0]) == 1
    assert len({c.token_ids for c in alone[0]}) == 3  # different seeds, different samples
    for completion in together[0] + together[1]:
        assert completion.finish_reason in ("stop", "length")
        assert len(completion.token_ids) <= 10


def test_finish_reasons_and_eos(model_dir):
    backend = create_backend("transformers", model_dir)
    eos = backend.eos_ids[0]
    request = Request(tuple(range(30, 40)), (1, 2, 3))
    free = backend.generate([request], Sampling(max_new_tokens=4))[0]
    for completion in free:  # the EOS is kept when it ends a sample, as vLLM keeps it
        stopped = completion.finish_reason == "stop"
        assert (completion.token_ids[-1] == eos) == stopped and (len(completion.token_ids) == 4 or stopped)
        assert eos not in completion.token_ids[:-1]
    assert "length" in {c.finish_reason for c in free}  # EOS is 1 of ~350 tokens of a random model
    # Make EOS win every draw: every sample is then just the EOS.
    force_eos = lambda module, inputs, logits: logits.index_fill(-1, torch.tensor([eos]), 100.0)  # noqa: E731
    hook = backend.model.lm_head.register_forward_hook(force_eos)
    try:
        forced = backend.generate([request], Sampling(max_new_tokens=4))[0]
    finally:
        hook.remove()
    assert [(c.token_ids, c.finish_reason) for c in forced] == [((eos,), "stop")] * 3


def test_models_load_from_local_directories_and_run_no_shipped_code(model_dir, tmp_path):
    with pytest.raises(BackendError, match="not a local directory"):
        create_backend("transformers", "meta-llama/Llama-3.1-8B-Instruct")
    shipped = tmp_path / "shipped-code"
    shutil.copytree(model_dir, shipped)
    marker = tmp_path / "code-ran"
    (shipped / "modeling_shipped.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((shipped / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_shipped.ShippedModel"}
    (shipped / "config.json").write_text(json.dumps(config))
    with contextlib.suppress(Exception):  # refusing to load is fine too; running the shipped code is not
        create_backend("transformers", shipped)
    assert not marker.exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killed_or_terminated_mid_run_then_resume_matches_an_uninterrupted_run(model_dir, tmp_path, sig):
    """kill -9, or SIGTERM (a scheduler's stop): committed chunks stay, the chunk in flight is discarded."""
    docs = write_docs(tmp_path / "docs.jsonl", count=8)
    common = ["--samples", "2", "--max-new-tokens", "6", "--chunk-documents", "1", "--backend-option", "batch_size=4"]
    settings = GenerationSettings(samples=2, max_new_tokens=6, chunk_documents=1)
    run(
        settings,
        [docs],
        model_dir,
        tmp_path / "clean",
        backend="transformers",
        backend_options={"batch_size": 4},
        progress=False,
    )
    out = tmp_path / "killed"
    ledger = worker_dir(out, 0, 1) / LEDGER
    command = [
        sys.executable,
        "-m",
        "generation",
        "generate",
        "--input",
        str(docs),
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--backend",
        "transformers",
        "--no-progress",
        *common,
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # Killed in the third chunk: generating, writing its part or its ledger line.
    two_chunks = lambda: ledger.exists() and ledger.read_bytes().count(b"\n") >= 2  # noqa: E731
    kill_when(process, two_chunks, timeout=240, what="the worker", sig=sig)
    process.stderr.close()
    assert process.returncode == -sig  # ended by the signal, not finished
    assert not (worker_dir(out, 0, 1) / SUMMARY).exists(), "killed too late: the worker had finished"
    committed_before_resume = ledger.read_bytes().count(b"\n")
    assert 2 <= committed_before_resume < 8
    summary = run(
        settings, [docs], model_dir, out, backend="transformers", backend_options={"batch_size": 4}, progress=False
    )
    assert summary["documents"] == 8 and summary["samples"] == 16
    assert merged_lines(tmp_path / "clean", tmp_path / "m1") == merged_lines(out, tmp_path / "m2")
    sessions = json.loads((worker_dir(out, 0, 1) / "provenance.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[0]["backend_version"].startswith("transformers ")


def test_end_to_end_into_a_token_store(model_dir, tmp_path):
    """Documents -> transformers generations -> merge -> stitched megadocs -> token store."""
    from generation.megadoc_export import StreamOptions, build_megadocs
    from megadoc_jax.data.store import SegmentKind, StoreReader

    docs = write_docs(tmp_path / "docs.jsonl", count=4)
    keep_all = parse_flag_policy("all=keep")  # a random model's samples may repeat: keep them all here
    settings = GenerationSettings(samples=2, max_new_tokens=8, chunk_documents=2, flag_policy=keep_all)
    summary = run(settings, [docs], model_dir, tmp_path / "gen", backend="transformers", progress=False)
    assert summary["kept"] == 8
    merged_lines(tmp_path / "gen", tmp_path / "merged")
    build_megadocs(
        [docs],
        [tmp_path / "merged"],
        model_dir,
        tmp_path / "stores",
        [("stitched-back", 2)],
        StreamOptions(progress=False),
        workers=0,
    )
    reader = StoreReader.open(next((tmp_path / "stores").glob("stitched-back*")))
    assert reader.num_documents == 4
    document = reader.document(0)
    kinds = {segment.kind for segment in document.segments}
    assert SegmentKind.ORIGINAL in kinds and SegmentKind.REPHRASE in kinds
    assert document.metadata["source_id"] == "doc-0" and document.metadata["G"] == 2
