"""`--dry-run`: abstract build of any size, parameter count, memory, and AOT compiles for TPU topologies."""

import importlib.util
from pathlib import Path

import pytest

from megadoc_jax import config as config_lib
from megadoc_jax import train
from megadoc_jax.model import count_parameters

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (the `tpu` extra) is not installed"
)


def test_dry_run_of_the_1_5b_model_allocates_nothing(capsys):
    assert train.main(["--config", "configs/1.5b.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected = count_parameters(config_lib.load("configs/1.5b.yaml").model)
    assert f"parameters: {expected}\n" in out
    assert "train state (parameters + AdamW moments) per device" in out


# Parameter counts of every shipped config, frozen: composing configs/ from base files changes none.
PARAMETERS = {
    "150m": 154_147_328,
    "300m": 299_649_792,
    "600m": 602_457_088,
    "1.5b": 1_540_732_416,
    "300m_32k": 299_649_792,
    "300m_64k": 299_649_792,
    "tiny": 164_160,
    "demo": 1_311_872,
}


def test_every_shipped_config_is_covered():
    assert sorted(p.stem for p in Path("configs").glob("*.yaml")) == sorted(PARAMETERS)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_dry_run_parameter_counts_of_the_shipped_configs(name, capsys):
    assert train.main(["--config", f"configs/{name}.yaml", "--dry-run"]) == 0
    assert f"parameters: {PARAMETERS[name]}\n" in capsys.readouterr().out


def test_dry_run_reports_config_errors_before_building(capsys):
    assert train.main(["--config", "configs/tiny.yaml", "--dry-run", "train.batch_size=7"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


@needs_libtpu
def test_dry_run_compiles_the_train_step_for_a_tpu_topology(capsys):
    assert train.main(["--config", "configs/tiny.yaml", "--dry-run", "--topology", "v5e:2x2", "mesh.fsdp=2"]) == 0
    out = capsys.readouterr().out
    assert "AOT compile for 4 x TPU v5 lite" in out
    assert "fits" in out and "DOES NOT FIT" not in out
    assert "compiled FLOPs per device per step" in out


@needs_libtpu
def test_dry_run_refuses_a_state_that_cannot_fit(capsys):
    # 1.5b parameters + AdamW moments in fp32, replicated over 4 v5e chips of 16 GiB: about 17 GiB each.
    assert (
        train.main(["--config", "configs/1.5b.yaml", "--dry-run", "--topology", "v5e:2x2", "train.batch_size=4"]) == 1
    )
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "does not fit" in out
