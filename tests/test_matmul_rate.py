"""The matmul-rate benchmark: its function measures a real matmul, refuses bad arguments, and its CLI prints."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from megadoc_jax.benchmarks.matmul_rate import main, measure_matmul_gflops


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", jnp.float32, jnp.bfloat16])
def test_rate_is_a_positive_finite_figure(dtype):
    gflops = measure_matmul_gflops(dtype, size=128, repeats=3)
    assert math.isfinite(gflops) and gflops > 0


def test_rate_counts_two_size_cubed_flops_per_call(monkeypatch):
    # A clock that advances 0.5 s per reading: every timed call lasts 0.5 s, so 2 * 64**3 FLOPs in 0.5 s.
    ticks = iter(range(1000))
    monkeypatch.setattr("megadoc_jax.benchmarks.matmul_rate.perf_counter", lambda: 0.5 * next(ticks))
    assert measure_matmul_gflops("float32", size=64, repeats=4) == pytest.approx(2 * 64**3 / 0.5 / 1e9)


def test_rate_runs_on_the_given_device():
    last = jax.devices()[-1]
    assert measure_matmul_gflops("float32", size=32, repeats=1, device=last) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "int32"}, "dtype: 'int32' is not a floating-point dtype"),
        ({"dtype": "float33"}, "dtype: 'float33' is not a dtype name"),
        ({"dtype": "float32", "size": 0}, "size: 0 must be a positive integer"),
        ({"dtype": "float32", "size": 2.5}, "size: 2.5 must be a positive integer"),
        ({"dtype": "float32", "repeats": 0}, "repeats: 0 must be a positive integer"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_matmul_gflops(**kwargs)


def test_cli_prints_versions_and_one_rate_per_dtype(capsys):
    main(["--size", "64", "--repeats", "2", "--dtypes", "float32,bfloat16"])
    lines = capsys.readouterr().out.splitlines()
    assert f"jax {jax.__version__}" in lines[0]
    assert lines[1] == "64 x 64 matmul, median of 2 calls"
    assert [line.split(":")[0] for line in lines[2:]] == ["float32", "bfloat16"]
    assert all(float(line.split()[1]) > 0 for line in lines[2:])


def test_cli_refuses_a_bad_dtype(capsys):
    with pytest.raises(SystemExit):
        main(["--size", "16", "--dtypes", "float32,int8"])
    assert "--dtypes: dtype: 'int8' is not a floating-point dtype" in capsys.readouterr().err
