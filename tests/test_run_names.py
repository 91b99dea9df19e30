"""Run names (run_names.py) and the experiment section of the config."""

from __future__ import annotations

import pytest

from generation import megadocs
from megadoc_jax import config as config_lib
from megadoc_jax.run_names import number, run_name


def stitched_config(**experiment) -> config_lib.Config:
    raw = {
        "model": {"size": "300m"},
        "data": {
            "streams": [
                {"name": "real", "store": "R", "weight": 0.1},
                {"name": "synthetic", "store": "S", "weight": 0.9},
            ],
            "real_epochs": 32,
        },
        "optim": {"lr": 1e-3, "weight_decay": 0.4},
        "experiment": {"data": "dclm", "method": "stitched-back", "generations": 32, **experiment},
    }
    return config_lib.from_dict(raw)


def test_names_encode_the_hyper_parameters():
    assert run_name(stitched_config()) == "300m-dclm-stitched-back-g32-e32-r0.9-lr1e-3-wd0.4-s0"
    real = config_lib.from_dict(
        {
            "model": {"size": "150m"},
            "data": {"streams": [{"name": "real", "store": "R"}], "real_epochs": 16},
            "optim": {"lr": 3e-3, "weight_decay": 0.8},
            "train": {"seed": 3},
            "experiment": {"data": "dclm", "method": "real"},
        }
    )
    assert run_name(real) == "150m-dclm-real-e16-lr3e-3-wd0.8-s3"
    custom = config_lib.from_dict(
        {"model": dict(size="custom", vocab_size=64, hidden=32, mlp=64, layers=3, heads=2, kv_heads=2)}
    )
    assert run_name(custom) == "d32l3-e1-lr3e-3-wd0.1-s0"  # nothing stated: only what the config has


@pytest.mark.parametrize(("seq_len", "part"), [(32768, "-ctx32k-"), (65536, "-ctx64k-"), (128, "-ctx128-")])
def test_names_carry_a_context_length_other_than_the_papers(seq_len, part):
    raw = config_lib.to_dict(stitched_config())
    raw["data"]["seq_len"] = seq_len
    assert run_name(config_lib.from_dict(raw)) == f"300m-dclm-stitched-back-g32{part}e32-r0.9-lr1e-3-wd0.4-s0"
    assert "ctx" not in run_name(stitched_config())  # 4096, the paper's


@pytest.mark.parametrize(
    ("x", "text"), [(3e-3, "3e-3"), (1e-3, "1e-3"), (2.5e-4, "2.5e-4"), (0.4, "0.4"), (16.0, "16"), (0.75, "0.75")]
)
def test_numbers_are_short(x, text):
    assert number(x) == text


def test_distinct_grid_points_get_distinct_names():
    names = set()
    for lr in (1e-3, 3e-3, 1e-2):
        for wd in (0.1, 0.4, 0.8, 1.6):
            for epochs in (1, 2, 4, 8, 16, 32):
                for r in (0.5, 0.75, 0.9):
                    raw = config_lib.to_dict(stitched_config())
                    raw["optim"] |= {"lr": lr, "weight_decay": wd}
                    raw["data"]["real_epochs"] = epochs
                    raw["data"]["streams"][0]["weight"], raw["data"]["streams"][1]["weight"] = 1 - r, r
                    names.add(run_name(config_lib.from_dict(raw)))
    assert len(names) == 3 * 4 * 6 * 3
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz0123456789.-") for n in names)


def test_the_methods_are_the_megadoc_methods_and_real():
    assert set(config_lib.EXPERIMENT_METHODS) == {"real", *megadocs.METHOD_TABLE}


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        ({"method": "stiched"}, r"experiment.method: 'stiched' not in"),
        ({"generations": 0}, r"experiment.generations: must lie in \[1, 32\]"),
        ({"generations": 64}, r"experiment.generations: must lie in \[1, 32\]"),
        ({"synthetic_stream": "synth"}, r"experiment.synthetic_stream: 'synth' is not one of data.streams"),
        ({"data": "DCLM baseline"}, r"experiment.data: 'DCLM baseline': at most 24 characters"),
    ],
)
def test_bad_experiments_are_named(experiment, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        stitched_config(**experiment)


def test_a_real_baseline_has_no_synthetic_stream():
    with pytest.raises(config_lib.ConfigError, match=r"method 'real' has no stream 'synthetic'"):
        stitched_config(method="real", generations=0)
