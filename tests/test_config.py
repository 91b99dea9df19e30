"""Config loading, overrides and every validation error, each naming its key."""

from pathlib import Path

import pytest

from megadoc_jax import config as config_lib
from megadoc_jax.config import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load(*overrides: str) -> config_lib.Config:
    return config_lib.load(None, list(overrides))


def test_every_shipped_config_loads():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert {"demo.yaml", "tiny.yaml", "150m.yaml", "300m.yaml", "600m.yaml", "1.5b.yaml"} <= set(names)
    for path in CONFIGS.glob("*.yaml"):
        config_lib.load(path)


def test_size_preset_and_explicit_override():
    config = load("model.size=600m", "model.layers=3")
    assert (config.model.hidden, config.model.mlp, config.model.heads, config.model.kv_heads) == (1024, 3584, 16, 8)
    assert config.model.layers == 3
    assert config.model.vocab_size == 128_256


def test_override_types_are_parsed_as_yaml():
    config = load("optim.lr=1e-3", "optim.no_decay=[norm]", "data.document_masking=true")
    assert config.optim.lr == 1e-3 and config.optim.no_decay == ("norm",) and config.data.document_masking


def test_streams_and_eval_stores_from_overrides():
    config = load(
        "data.streams=[{name: real, store: /r, weight: 0.1}, {name: syn, store: /s, weight: 0.9}]",
        "data.eval_stores={iid: /h}",
    )
    assert [s.name for s in config.data.streams] == ["real", "syn"]
    assert config.data.eval_stores == {"iid": "/h"}


def test_round_trip_through_yaml(tmp_path):
    config = load("model.size=150m", "data.streams=[{name: real, store: /r}]", "train.steps=7")
    config_lib.dump(config, tmp_path / "c.yaml")
    assert config_lib.load(tmp_path / "c.yaml") == config


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.hiden=3"], "model.hiden"),
        (["modle.hidden=3"], "modle"),
        (["model.hidden=wide"], "model.hidden"),
        (["model.scan_layers=3"], "model.scan_layers"),
        (["optim.lr=fast"], "optim.lr"),
        (["model.size=7b"], "model.size"),
        (["model.heads=5"], "model.hidden"),
        (["model.kv_heads=3"], "model.kv_heads"),
        (["model.remat=some"], "model.remat"),
        (["model.compute_dtype=int8"], "model.compute_dtype"),
        (["data.windows=random"], "data.windows"),
        (["data.streams=[{name: a, store: /a, weight: 0.5}]"], "data.streams"),
        (["data.streams=[{name: a, store: '', weight: 1.0}]"], "data.streams[0].store"),
        (["data.streams=[{name: a, store: /a, weight: 0.5}, {name: a, store: /b, weight: 0.5}]"], "data.streams"),
        (["train.microbatches=3"], "train.microbatches"),
        (["train.batch_size=0"], "train.batch_size"),
        (["mesh.fsdp=0"], "mesh.fsdp"),
        (["optim.warmup_fraction=1.5"], "optim.warmup_fraction"),
        (["nonsense"], "nonsense"),
    ],
)
def test_validation_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load(*overrides)


@pytest.mark.parametrize(
    "overrides, devices, key",
    [
        (["mesh.data=2", "mesh.fsdp=2"], 8, "mesh"),  # mesh size differs from the device count
        (["mesh.data=-1", "mesh.fsdp=-1"], 8, "mesh"),
        (["mesh.fsdp=3"], 8, "mesh.fsdp"),
        (["train.batch_size=12"], 8, "train.batch_size"),  # batch not divisible by the data axes
        (["mesh.data=4", "mesh.fsdp=1", "mesh.context=2", "data.seq_len=63"], 8, "data.seq_len"),
        (["mesh.data=2", "mesh.tensor=4", "model.mlp=190"], 8, "mesh.tensor"),
        (["mesh.data=2", "mesh.context=4", "model.attention=ring", "data.seq_len=36"], 8, "zig-zag"),
    ],
)
def test_device_dependent_errors_name_the_key(overrides, devices, key):
    config = load(*overrides)
    with pytest.raises(ConfigError, match=key):
        config_lib.validate_for_devices(config, devices)


def test_mesh_fills_the_free_axis():
    config = load("mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=8")
    assert config_lib.validate_for_devices(config, 8) == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        config_lib.load(bad)


def test_custom_size_takes_no_preset_and_needs_every_shape_key():
    shape = ["model.vocab_size=1000", "model.hidden=96", "model.mlp=200", "model.layers=3", "model.heads=6",
             "model.kv_heads=3"]  # fmt: skip
    config = load("model.size=custom", *shape)
    assert (config.model.hidden, config.model.mlp, config.model.layers, config.model.kv_heads) == (96, 200, 3, 3)
    with pytest.raises(ConfigError, match=r"model.size=custom takes no preset: give model.layers too"):
        load("model.size=custom", *[s for s in shape if "layers" not in s])
    with pytest.raises(ConfigError, match=r"unknown size 'huge'.*or 'custom'"):
        load("model.size=huge")
