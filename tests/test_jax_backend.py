"""The jax backend for real: a tiny Decoder checkpointed by our own training code (orbax train state) with
the demo tokenizer, restored and sampled through the Backend interface and through
`python -m generation generate --backend jax`; and a Hugging Face Llama imported from safetensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from generation.backends import BackendError, Request, Sampling, create_backend, jax_backend
from generation.demo import ensure_demo_stores
from megadoc_jax import checkpoint, decode, hf, optim, sharding
from megadoc_jax import config as config_lib
from megadoc_jax import model as model_lib
from megadoc_jax import step as step_lib
from megadoc_jax.data import demo

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
SAVED_STEP = 3


def make_run_dir(root: Path, seed: int) -> Path:
    """A run directory as train.py leaves it: config.yaml + checkpoints/STEP of {'step','params','opt_state'}."""
    tokenizer = ensure_demo_stores(root.parent / "demo")["tokenizer"]
    config = config_lib.load(
        None,
        [
            "model.size=tiny",
            "model.vocab_size=2048",
            "model.compute_dtype=float32",
            "model.init_std=0.3",
            f"data.tokenizer={tokenizer}",
            "data.seq_len=256",
            f"train.run_dir={root}",
            f"train.seed={seed}",
        ],
    )
    run = Path(config.train.run_dir)
    run.mkdir()
    config_lib.dump(config, run / "config.yaml")
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    params = nnx.to_pure_dict(nnx.state(model_lib.create_sharded_model(config.model, mesh, seed=seed)))
    tx, _ = optim.make_optimizer(config.optim, total_steps=10)
    with checkpoint.Checkpointer(run / "checkpoints", config.train) as saver:
        saver.save(SAVED_STEP, step_lib.init_state(params, tx))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("jax-backend") / "run", seed=0)


@pytest.fixture(scope="module")
def second_run_dir(run_dir) -> Path:
    """Another member for an ensemble: the same model shape and tokenizer, another seed."""
    run = make_run_dir(run_dir.parent / "run-seed-1", seed=1)
    hf.prepare_run_dir(run)
    return run


@pytest.fixture(scope="module")
def backend(run_dir):
    hf.prepare_run_dir(run_dir)
    return create_backend("jax", run_dir, {"batch_size": 4, "devices": 1, "prompt_bucket": 16})


def test_restores_the_checkpointed_params_and_describes_the_run(backend, run_dir):
    config = config_lib.load(run_dir / "config.yaml")
    saved = nnx.state(model_lib.create_sharded_model(config.model, sharding.make_mesh({}, jax.devices()[:1]), 0))
    restored = nnx.to_pure_dict(backend.sampler.params[0])
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(saved)), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert backend.context_length == 256 and backend.name == "jax"
    described = json.loads((run_dir / "config.json").read_text())
    assert described["hidden_size"] == 64 and described["eos_token_id"] == backend.tokenizer.eos_token_id
    assert checkpoint.step_dir(run_dir / "checkpoints").name == str(SAVED_STEP)


def test_samples_follow_seeds_not_batches(backend):
    a = Request(tuple(range(30, 50)), (1000, 1001, 1002))
    b = Request((5, 6, 7), (77,))
    sampling = Sampling(max_new_tokens=12, top_k=100)
    together = backend.generate([b, a], sampling)
    alone = [backend.generate([Request(a.prompt_token_ids, (seed,))], sampling)[0][0] for seed in a.seeds]
    assert together[1] == alone  # sample k of a request uses seed seeds[0] + k, whatever its batch
    assert len({c.token_ids for c in together[1]}) == 3
    # The same draw as decode.Sampler on the model itself, one row at a time.
    sampler = decode.Sampler(backend.sampler.models[0], backend.sampler.eos_ids)
    direct = sampler.generate([b.prompt_token_ids], [77], decode.SamplingConfig(top_k=100), 12)[0]
    assert (direct.token_ids, direct.finish_reason) == (together[0][0].token_ids, together[0][0].finish_reason)
    for completion in together[0] + together[1]:
        assert completion.finish_reason in ("stop", "length") and 1 <= len(completion.token_ids) <= 12


def test_missing_checkpoint_and_foreign_model_are_refused(tmp_path, run_dir):
    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    (empty_run / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (empty_run / "config.json").write_text("{}")
    with pytest.raises(BackendError, match="no committed checkpoint"):
        create_backend("jax", empty_run, {"devices": 1})
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(BackendError, match="model_type 'gpt2'"):
        create_backend("jax", other, {"devices": 1})


def test_generate_command_end_to_end(run_dir, backend, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"Document {i} is about lists and dicts."}) + "\n" for i in range(3))
    )
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    argv = [
        "generate",
        "--backend",
        "jax",
        "--model",
        str(run_dir),
        "--input",
        str(docs),
        "--output",
        str(tmp_path / "out"),
        "-G",
        "2",
        "--max-new-tokens",
        "10",
        "--chat-template",
        str(template),
        "--no-progress",
        "--backend-option",
        "devices=1",
        "--backend-option",
        "batch_size=4",
        "--flag-policy",
        "all=keep",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # "jax" is in the backends' lazy table: no import needed
    done = subprocess.run(
        [sys.executable, "-m", "generation", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    merge_argv = ["merge", str(tmp_path / "out"), "--merged", str(tmp_path / "m")]
    merged = subprocess.run(
        [sys.executable, "-m", "generation", *merge_argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert merged.returncode == 0, merged.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "m" / "generations.jsonl").read_text().splitlines()]
    assert [(x["doc_id"], x["sample"]) for x in lines] == [(f"d{i}", k) for i in range(3) for k in range(2)]
    assert all(x["output_tokens"] >= 1 for x in lines) and lines[0]["seed"] + 1 == lines[1]["seed"]
    provenance = json.loads((tmp_path / "out" / "worker-00000-of-00001" / "provenance.json").read_text())
    assert provenance["identity"]["backend"] == "jax"


def test_hugging_face_llama_import_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch", reason="the parity check builds the Llama with transformers + torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=500.0,
        eos_token_id=1,
        bos_token_id=1,
    )
    llama = LlamaForCausalLM(hf_config).eval()
    llama.save_pretrained(str(tmp_path), safe_serialization=True)
    demo.train_tokenizer(["a few words of text " * 20], tmp_path, vocab_size=300)
    loaded = create_backend("jax", tmp_path, {"devices": 1, "dtype": "float32"})
    tokens = [[3, 17, 250, 9, 42, 42, 7]]
    with torch.no_grad():
        expected = llama(torch.tensor(tokens)).logits[0].numpy()
    model = loaded.sampler.models[0]
    got = np.asarray(model(np.asarray(tokens, np.int32), np.arange(7)[None]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert loaded.context_length == 128 and 1 in loaded.sampler.eos_ids
    # dtype=auto follows the checkpoint: float32 tensors compute in float32.
    assert create_backend("jax", tmp_path, {"devices": 1}).model_config.compute_dtype == "float32"


def test_ensemble_of_two_runs_samples_their_mean_logits(backend, run_dir, second_run_dir):
    ensemble = create_backend("jax", [run_dir, second_run_dir], {"batch_size": 4, "devices": 1, "prompt_bucket": 16})
    assert ensemble.sampler.ensemble_size == 2 and "ensemble of 2" in ensemble.version()
    # Member 1 holds the second run's checkpoint (seed 1), not a copy of member 0.
    config = config_lib.load(second_run_dir / "config.yaml")
    saved = model_lib.create_sharded_model(config.model, sharding.make_mesh({}, jax.devices()[:1]), seed=1)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(saved))), jax.tree.leaves(ensemble.sampler.params[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    request, sampling = Request((5, 6, 7, 8), (41, 42)), Sampling(max_new_tokens=10, top_k=100)
    got = ensemble.generate([request], sampling)[0]
    members = [backend.sampler.models[0], ensemble.sampler.models[1]]
    direct = decode.Sampler(members, backend.sampler.eos_ids).generate(
        [request.prompt_token_ids] * 2, list(request.seeds), decode.SamplingConfig(top_k=100), 10
    )
    assert [c.token_ids for c in got] == [d.token_ids for d in direct]
    assert [c.token_ids for c in got] != [c.token_ids for c in backend.generate([request], sampling)[0]]


def test_only_ensemble_backends_take_several_models(monkeypatch, run_dir, second_run_dir):
    from generation import backends

    class OneModel(jax_backend.JaxBackend):
        supports_ensembles = False

    monkeypatch.setitem(backends._REGISTRY, "one-model", OneModel)
    with pytest.raises(BackendError, match=r"samples from one model; an ensemble of 2 model directories"):
        create_backend("one-model", [run_dir, second_run_dir])


def test_ensemble_generate_command_records_every_member(run_dir, second_run_dir, tmp_path):
    from generation import generate

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d0", "text": "A document about sets and tuples."}) + "\n")
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    settings = generate.GenerationSettings(
        samples=2, max_new_tokens=8, flag_policy=generate.parse_flag_policy("all=keep")
    )
    summary = generate.run(
        settings,
        [docs],
        [run_dir, second_run_dir],
        tmp_path / "out",
        backend="jax",
        backend_options={"devices": 1, "batch_size": 2},
        chat_template=template,
        progress=False,
    )
    assert summary["samples"] == 2
    provenance = json.loads((tmp_path / "out" / "worker-00000-of-00001" / "provenance.json").read_text())
    members = provenance["identity"]["model"]["ensemble"]
    assert [m["name"] for m in members] == [run_dir.name, second_run_dir.name]
    # The merge labels each sample with the whole ensemble.
    from generation import merge

    merge.merge(tmp_path / "out", tmp_path / "merged")
    lines = [json.loads(line) for line in (tmp_path / "merged" / "generations.jsonl").read_text().splitlines()]
    assert [x["generator"] for x in lines] == [f"ensemble({run_dir.name}+{second_run_dir.name})"] * 2
