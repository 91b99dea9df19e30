"""megadoc_jax.hf against transformers' PyTorch LlamaForCausalLM, both ways: a transformers-saved Llama
imported into our Decoder, and our run exported and loaded with LlamaForCausalLM.from_pretrained, each
giving the same fp32 logits (random weights, norm scales not all ones, GQA, tokens including the special
ids); import of an export gives back the parameters bit for bit; bad directories are refused, naming the
file."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from megadoc_jax import checkpoint, hf, optim, sharding
from megadoc_jax import config as config_lib
from megadoc_jax import model as model_lib
from megadoc_jax import step as step_lib
from megadoc_jax.data import demo

torch = pytest.importorskip("torch", reason="parity is checked against transformers' PyTorch Llama")
transformers = pytest.importorskip("transformers")

VOCAB = 300
EOS_ID = 0  # the demo tokenizer's only special token
# Random tokens, the special id and the last id included.
TOKENS = [[3, EOS_ID, 17, 250, VOCAB - 1, 9, 42, 42, 7, 0, 128, 5]]


def one_device_mesh():
    return sharding.make_mesh({}, jax.devices()[:1])


def our_logits(model: nnx.Module, tokens=TOKENS) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32)
    return np.asarray(model(tokens, np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)))


def torch_logits(llama, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return llama(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return demo.train_tokenizer(
        ["a few words of text, and some more words " * 20], tmp_path_factory.mktemp("tokenizer"), vocab_size=VOCAB
    )


def save_transformers_llama(
    directory: Path, tokenizer_dir: Path | None, *, tied: bool = False, shard: str | None = None, seed: int = 0
):
    """A random LlamaForCausalLM (GQA, head_dim != hidden / heads, norm scales around 1) saved as safetensors."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=96,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        tie_word_embeddings=tied,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID,
    )
    llama = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in llama.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.5 * torch.randn_like(parameter))
    kwargs = {"max_shard_size": shard} if shard else {}
    llama.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    if tokenizer_dir is not None:
        hf.copy_tokenizer(tokenizer_dir, directory)
    return llama


def make_run(
    root: Path, tokenizer_dir: Path, model_overrides: list[str], *, seed: int = 0, step: int = 5
) -> tuple[Path, dict]:
    """A run directory as train.py leaves it (a train state with optimizer state), random weights and norms."""
    config = config_lib.load(
        None,
        [
            *model_overrides,
            "model.compute_dtype=float32",
            f"data.tokenizer={tokenizer_dir}",
            "data.seq_len=64",
            f"train.run_dir={root}",
        ],
    )
    root.mkdir(parents=True)
    config_lib.dump(config, root / "config.yaml")
    model = model_lib.create_sharded_model(config.model, one_device_mesh(), seed=seed)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    rng = np.random.default_rng(seed)
    for norms in (params["final_norm"], params["layers"]["attn_norm"], params["layers"]["mlp_norm"]):
        norms["scale"] = (1 + 0.5 * rng.standard_normal(norms["scale"].shape)).astype(np.float32)
    tx, _ = optim.make_optimizer(config.optim, total_steps=10)
    with checkpoint.Checkpointer(root / "checkpoints", config.train) as saver:
        saver.save(step, step_lib.init_state(params, tx))
    return root, params


CUSTOM = [
    "model.size=custom",
    f"model.vocab_size={VOCAB}",
    "model.hidden=48",
    "model.mlp=80",
    "model.layers=3",
    "model.heads=6",
    "model.kv_heads=2",
    "model.head_dim=10",
    "model.rope_base=2000",
    "model.init_std=0.2",
    "model.norm_eps=1e-6",
]


def assert_same_params(a: dict, b: dict) -> None:
    flat_a, flat_b = checkpoint._flat(a), checkpoint._flat(b)
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        assert np.asarray(flat_a[name]).dtype == np.asarray(flat_b[name]).dtype, name
        np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]), err_msg=name)


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied, shard", [(False, None), (True, "20KB")], ids=["untied-one-file", "tied-sharded"])
def test_import_of_a_transformers_llama_gives_its_logits(tmp_path, tokenizer_dir, tied, shard):
    llama = save_transformers_llama(tmp_path, tokenizer_dir, tied=tied, shard=shard)
    assert (tmp_path / hf.INDEX_JSON).is_file() == bool(shard)
    model, cfg, context = hf.import_llama(tmp_path, one_device_mesh())
    assert (cfg.size, cfg.kv_heads, cfg.head_size, cfg.rope_base, cfg.norm_eps, context) == (
        "custom",
        2,
        12,
        500.0,
        1e-5,
        96,
    )
    assert (cfg.param_dtype, cfg.compute_dtype) == ("float32", "float32")  # the checkpoint's dtype
    got, expected = our_logits(model), torch_logits(llama)
    assert np.abs(expected).max() > 1.0  # weights large enough for the comparison to mean something
    assert np.abs(got - expected).max() < 1e-4


def test_imported_config_round_trips_through_yaml(tmp_path, tokenizer_dir):
    save_transformers_llama(tmp_path / "llama", tokenizer_dir)
    run = hf.import_to_run(tmp_path / "llama", tmp_path / "run")
    config = config_lib.load(run / "config.yaml")
    imported = hf.read_llama(tmp_path / "llama")
    assert config.model == imported.config and config.data.seq_len == 96
    assert config.data.tokenizer == str(run / "tokenizer") and (run / "tokenizer" / "tokenizer.json").is_file()
    config_lib.dump(config, tmp_path / "again.yaml")
    assert config_lib.load(tmp_path / "again.yaml") == config
    # size=custom takes no preset: every shape field must be there.
    raw = yaml.safe_load((run / "config.yaml").read_text())
    del raw["model"]["mlp"]
    with pytest.raises(config_lib.ConfigError, match=r"model.size=custom takes no preset: give model.mlp"):
        config_lib.from_dict(raw)
    # The run holds {'step', 'params'} only, and loads as any run.
    loaded = checkpoint.load_run(run, one_device_mesh())
    assert loaded.step == 0 and loaded.config == config
    assert_same_params(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded.model))), imported.params)
    saved = ocp_tree(run / "checkpoints" / "0")
    assert sorted(saved) == ["params", "step"]


def ocp_tree(step_dir: Path) -> dict:
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().metadata(step_dir / "default").item_metadata.tree


def test_import_keeps_a_bfloat16_checkpoint_in_bfloat16(tmp_path, tokenizer_dir):
    llama = save_transformers_llama(tmp_path / "fp32", tokenizer_dir)
    llama.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    imported = hf.read_llama(tmp_path / "bf16")
    assert (imported.config.param_dtype, imported.config.compute_dtype) == ("bfloat16", "bfloat16")
    assert imported.params["embed"].dtype == np.dtype("bfloat16")
    overridden = hf.read_llama(tmp_path / "bf16", compute_dtype="float32")
    assert (overridden.config.param_dtype, overridden.config.compute_dtype) == ("bfloat16", "float32")
    model, _, _ = hf.import_llama(tmp_path / "bf16", one_device_mesh(), compute_dtype="float32")
    # The same bf16 weights computed in fp32 on both sides (loaded afresh: .to() would round rotary buffers too).
    reference = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32).eval()
    assert np.abs(our_logits(model) - torch_logits(reference)).max() < 1e-4


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def test_export_loads_in_transformers_and_imports_back_bit_for_bit(tmp_path, tokenizer_dir):
    run, params = make_run(tmp_path / "run", tokenizer_dir, CUSTOM)
    out = hf.export_run(run, tmp_path / "exported", max_shard_bytes=40_000)  # small shards: an index
    index = json.loads((out / hf.INDEX_JSON).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".exported.partial-*"))
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == EOS_ID

    llama = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert (llama.config.head_dim, llama.config.num_key_value_heads) == (10, 2)
    model = checkpoint.load_run(run, one_device_mesh()).model
    got, expected = our_logits(model), torch_logits(llama)
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() < 1e-4
    assert_same_params(hf.read_llama(out).params, params)
    # And the tokenizer came along.
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token_id == EOS_ID


def test_export_of_a_given_step_in_bfloat16_through_the_command_line(tmp_path, tokenizer_dir, capsys):
    run, params = make_run(tmp_path / "run", tokenizer_dir, ["model.size=tiny", f"model.vocab_size={VOCAB}"])
    code = hf.main(["export", str(run), "--step", "5", "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    imported = hf.read_llama(tmp_path / "bf16")
    assert imported.config.param_dtype == "bfloat16"
    np.testing.assert_array_equal(imported.params["embed"], params["embed"].astype("bfloat16"))
    assert hf.main(["export", str(run), "--step", "7", "--out", str(tmp_path / "x")]) == 2
    assert "no committed checkpoint of step 7" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # import HF_DIR --out RUN_DIR, then the run loads.
    assert hf.main(["import", str(tmp_path / "bf16"), "--out", str(tmp_path / "imported")]) == 0
    assert checkpoint.load_run(tmp_path / "imported", one_device_mesh()).config.model.param_dtype == "bfloat16"


def test_a_failed_export_leaves_no_directory(tmp_path, tokenizer_dir, monkeypatch):
    run, _ = make_run(tmp_path / "run", tokenizer_dir, ["model.size=tiny", f"model.vocab_size={VOCAB}"])
    from safetensors import numpy as safetensors_numpy

    written = []

    def save_then_die(tensors, path, metadata=None):
        if written:
            raise OSError("disk full")
        written.append(path)
        original(tensors, path, metadata=metadata)

    original = safetensors_numpy.save_file
    monkeypatch.setattr(safetensors_numpy, "save_file", save_then_die)
    with pytest.raises(OSError, match="disk full"):
        hf.export_run(run, tmp_path / "out", max_shard_bytes=20_000)
    assert written and not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    monkeypatch.undo()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(hf.HFError, match="taken already exists and is not an empty directory"):
        hf.export_run(run, tmp_path / "taken")


def test_prepare_run_dir_describes_the_run_for_generation(tmp_path, tokenizer_dir):
    run, _ = make_run(tmp_path / "run", tokenizer_dir, CUSTOM)
    assert hf.main(["prepare", str(run)]) == 0
    described = json.loads((run / "config.json").read_text())
    assert (described["hidden_size"], described["head_dim"], described["eos_token_id"]) == (48, 10, EOS_ID)
    assert described["max_position_embeddings"] == 64 and (run / "tokenizer.json").is_file()


@pytest.mark.slow
def test_an_exported_300m_checkpoint_gives_transformers_the_same_logits(tmp_path, tokenizer_dir):
    config = config_lib.load(None, ["model.size=300m", "model.compute_dtype=float32"])
    run = tmp_path / "run"
    run.mkdir()
    config_lib.dump(dataclasses_replace_tokenizer(config, tokenizer_dir, run), run / "config.yaml")
    model = model_lib.create_sharded_model(config.model, one_device_mesh(), seed=0)
    with checkpoint.Checkpointer(run / "checkpoints", config.train) as saver:
        saver.save(1, {"step": np.ones((), np.int32), "params": nnx.to_pure_dict(nnx.state(model))})
    out = hf.export_run(run, tmp_path / "hf", max_shard_bytes=500 * 2**20)  # about 1.2 GB: three shards
    assert len(json.loads((out / hf.INDEX_JSON).read_text())["weight_map"]) == 3 + 9 * 12
    tokens = [[5, 100_000, 128_255, 0, 42, 7]]
    ours = our_logits(model, tokens)
    del model
    llama = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert np.abs(ours - torch_logits(llama, tokens)).max() < 1e-4


def dataclasses_replace_tokenizer(config, tokenizer_dir, run):
    import dataclasses

    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, tokenizer=str(tokenizer_dir)),
        train=dataclasses.replace(config.train, run_dir=str(run)),
    )


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file
# --------------------------------------------------------------------------------------------------


def test_only_pickle_weights_are_refused(tmp_path, tokenizer_dir):
    save_transformers_llama(tmp_path, tokenizer_dir)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(hf.HFError, match=r"holds only pickle weights \(pytorch_model.bin\).*never unpickles"):
        hf.read_llama(tmp_path)


def test_another_model_type_and_missing_features_are_refused_by_name(tmp_path, tokenizer_dir):
    save_transformers_llama(tmp_path, tokenizer_dir)
    config_json = tmp_path / "config.json"
    original = json.loads(config_json.read_text())
    for change, message in [
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters="),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ]:
        config_json.write_text(json.dumps({**original, **change}))
        with pytest.raises(hf.HFError, match=f"{config_json}: {message}"):
            hf.read_llama(tmp_path)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path, tokenizer_dir):
    save_transformers_llama(tmp_path, tokenizer_dir)
    config_json = tmp_path / "config.json"
    original = json.loads(config_json.read_text())
    config_json.write_text(json.dumps({**original, "num_key_value_heads": 4}))
    with pytest.raises(
        hf.HFError,
        match=r"weight model.layers.0.self_attn.k_proj.weight in .*model.safetensors "
        r"has shape \[24, 32\], but .*config.json implies \[48, 32\]",
    ):
        hf.read_llama(tmp_path)
    config_json.write_text(json.dumps({**original, "num_hidden_layers": 3}))
    with pytest.raises(hf.HFError, match=r"weights missing from model.safetensors in .*: model.layers.2"):
        hf.read_llama(tmp_path)


def test_a_missing_tokenizer_is_refused(tmp_path, tokenizer_dir):
    save_transformers_llama(tmp_path / "llama", tokenizer_dir=None)
    with pytest.raises(hf.HFError, match=r"no tokenizer: .*llama/tokenizer.json does not exist"):
        hf.import_to_run(tmp_path / "llama", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(hf.HFError, match=r"no tokenizer in .*llama: .*tokenizer.json does not exist"):
        hf.load_tokenizer(tmp_path / "llama")
    run, _ = make_run(tmp_path / "trained", tmp_path / "nowhere", ["model.size=tiny", f"model.vocab_size={VOCAB}"])
    with pytest.raises(
        hf.HFError,
        match=r"nowhere/tokenizer.json does not exist \(named by data.tokenizer of "
        r".*trained/config.yaml",
    ):
        hf.export_run(run, tmp_path / "out")


def test_load_tokenizer_with_a_chat_template(tmp_path, tokenizer_dir):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = hf.load_tokenizer(tokenizer_dir, chat_template=template)
    assert tokenizer.chat_template == template.read_text() and tokenizer.eos_token_id == EOS_ID
    with pytest.raises(hf.HFError, match="chat template file .*missing.jinja does not exist"):
        hf.load_tokenizer(tokenizer_dir, chat_template=tmp_path / "missing.jinja")


def test_a_run_without_data_tokenizer_needs_one_named(tmp_path, tokenizer_dir, monkeypatch):
    run, _ = make_run(tmp_path / "run", tokenizer_dir, ["model.size=tiny", f"model.vocab_size={VOCAB}"])
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(tokenizer_dir), "''"))
    monkeypatch.chdir(tokenizer_dir)  # a tokenizer in the working directory must not be picked up
    for call in (lambda: hf.export_run(run, tmp_path / "out"), lambda: hf.prepare_run_dir(run)):
        with pytest.raises(hf.HFError, match=r"config.yaml has no data.tokenizer; pass --tokenizer DIR"):
            call()
    assert hf.export_run(run, tmp_path / "out", tokenizer_dir=tokenizer_dir) == tmp_path / "out"
