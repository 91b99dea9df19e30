"""Config loading, overrides and every validation error, each naming its key."""

from pathlib import Path

import pytest
import yaml

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


# --------------------------------------------------------------------------------------------------
# Composition: base files
# --------------------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bases_merge_in_order_then_the_file_then_overrides(tmp_path):
    write(tmp_path / "model" / "small.yaml", "model: {size: 150m, layers: 3}\ntrain: {batch_size: 32, steps: 5}\n")
    write(tmp_path / "recipe.yaml", "optim: {lr: 1.0e-3, b2: 0.99}\ntrain: {batch_size: 16, log_every: 7}\n")
    run = write(
        tmp_path / "runs" / "run.yaml",
        "base: [../model/small.yaml, ../recipe.yaml]\noptim: {lr: 2.0e-3}\ntrain: {run_dir: runs/x}\n",
    )
    config = config_lib.load(run, ["train.steps=9"])
    assert (config.model.size, config.model.hidden, config.model.layers) == ("150m", 512, 3)  # preset + base key
    assert (config.optim.lr, config.optim.b2) == (2.0e-3, 0.99)  # the file wins over its base, per key
    assert config.train.batch_size == 16  # the later base wins over the earlier one
    assert (config.train.log_every, config.train.run_dir) == (7, "runs/x")
    assert config.train.steps == 9  # the override wins over everything


def test_bases_may_have_bases_and_paths_are_relative_to_the_file_naming_them(tmp_path):
    write(tmp_path / "a" / "root.yaml", "data: {seq_len: 256, seed: 4}\n")
    write(tmp_path / "a" / "middle.yaml", "base: root.yaml\ndata: {seq_len: 128}\n")
    top = write(tmp_path / "top.yaml", "base: a/middle.yaml\ndata: {seed: 5}\n")
    config = config_lib.load(top)
    assert (config.data.seq_len, config.data.seed) == (128, 5)


def test_lists_replace_and_mappings_merge(tmp_path):
    write(
        tmp_path / "base.yaml",
        "data:\n  streams: [{name: real, store: /r, weight: 0.5}, {name: syn, store: /s, weight: 0.5}]\n"
        "  eval_stores: {iid: /h}\noptim: {no_decay: [norm, embed, bias]}\n",
    )
    top = write(
        tmp_path / "top.yaml",
        "base: base.yaml\ndata:\n  streams: [{name: real, store: /r2}]\n  eval_stores: {long: /l}\n"
        "optim: {no_decay: [norm]}\n",
    )
    config = config_lib.load(top)
    assert [(s.name, s.store, s.weight) for s in config.data.streams] == [("real", "/r2", 1.0)]
    assert config.optim.no_decay == ("norm",)
    assert config.data.eval_stores == {"iid": "/h", "long": "/l"}
    # An override sets the value at its path: a mapping given there replaces the file's mapping.
    assert config_lib.load(top, ["data.eval_stores={x: /x}"]).data.eval_stores == {"x": "/x"}


def test_a_composed_config_dumps_without_bases_and_loads_back_equal(tmp_path):
    config = config_lib.load(CONFIGS / "300m_64k.yaml", ["train.steps=3"])
    config_lib.dump(config, tmp_path / "config.yaml")
    assert "base" not in yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config_lib.load(tmp_path / "config.yaml") == config


def test_a_cycle_of_bases_is_refused_with_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: [c.yaml]\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        config_lib.load(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        config_lib.load(tmp_path / "self.yaml")


def test_a_base_shared_by_two_bases_is_not_a_cycle(tmp_path):
    write(tmp_path / "common.yaml", "train: {log_every: 3}\n")
    write(tmp_path / "x.yaml", "base: common.yaml\ntrain: {steps: 2}\n")
    write(tmp_path / "y.yaml", "base: common.yaml\ntrain: {batch_size: 4}\n")
    top = write(tmp_path / "top.yaml", "base: [x.yaml, y.yaml]\n")
    train = config_lib.load(top).train
    assert (train.log_every, train.steps, train.batch_size) == (3, 2, 4)


def test_a_missing_base_names_the_file_that_asked_for_it(tmp_path):
    asking = write(tmp_path / "sub" / "asking.yaml", "base: [nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"asking\.yaml: its base .*sub/nope\.yaml does not exist"):
        config_lib.load(asking)


@pytest.mark.parametrize("base", ["3", "[a.yaml, 4]", "{a: b}", "['']"])
def test_a_malformed_base_key_is_refused(tmp_path, base):
    with pytest.raises(ConfigError, match=r"f\.yaml: base must be a file name or a list"):
        config_lib.load(write(tmp_path / "f.yaml", f"base: {base}\n"))


def test_unknown_keys_and_wrong_types_are_named_with_their_file(tmp_path):
    write(tmp_path / "base.yaml", "model: {hiden: 3}\n")
    top = write(tmp_path / "top.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key model\.hiden"):
        config_lib.load(top)
    write(tmp_path / "base.yaml", "train: {steps: many}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: train\.steps: expected an integer"):
        config_lib.load(top)
    write(tmp_path / "base.yaml", "{}\n")
    write(tmp_path / "top.yaml", "base: base.yaml\ntrian: {steps: 1}\n")
    with pytest.raises(ConfigError, match=r"top\.yaml: unknown key trian"):
        config_lib.load(top)


def test_base_is_a_key_of_files_only():
    with pytest.raises(ConfigError, match="unknown key base"):
        load("base=configs/tiny.yaml")


# The paper's sizes: the shared recipe reaches every size file, and the per-size values stay its own.
PAPER_SIZES = {  # size: (real_epochs, lr, weight_decay)
    "150m": (16, 3.0e-3, 0.8),
    "300m": (16, 3.0e-3, 1.6),
    "600m": (8, 1.0e-3, 3.2),
    "1.5b": (8, 1.0e-3, 3.2),
}


@pytest.mark.parametrize("size", sorted(PAPER_SIZES))
def test_paper_size_configs_share_the_recipe(size):
    c = config_lib.load(CONFIGS / f"{size}.yaml")
    assert (c.model.size, c.train.run_dir) == (size, f"runs/{size}")
    assert (c.data.real_epochs, c.optim.lr, c.optim.weight_decay) == PAPER_SIZES[size]
    assert (c.data.seq_len, c.train.batch_size, c.mesh.data) == (4096, 64, -1)
    assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.clip_norm) == (0.9, 0.95, 1e-8, 1.0)
    assert (c.optim.warmup_fraction, c.optim.final_lr_fraction) == (0.01, 0.0)
    assert (c.train.log_every, c.train.eval_every, c.train.checkpoint_every, c.train.keep_last) == (50, 1000, 1000, 2)


def test_custom_size_takes_no_preset_and_needs_every_shape_key():
    shape = [
        "model.vocab_size=1000",
        "model.hidden=96",
        "model.mlp=200",
        "model.layers=3",
        "model.heads=6",
        "model.kv_heads=3",
    ]
    config = load("model.size=custom", *shape)
    assert (config.model.hidden, config.model.mlp, config.model.layers, config.model.kv_heads) == (96, 200, 3, 3)
    with pytest.raises(ConfigError, match=r"model.size=custom takes no preset: give model.layers too"):
        load("model.size=custom", *[s for s in shape if "layers" not in s])
    with pytest.raises(ConfigError, match=r"unknown size 'huge'.*or 'custom'"):
        load("model.size=huge")
