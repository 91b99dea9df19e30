"""The hardware section (config.HardwareConfig) and megadoc_jax/xla_env.py: validation naming the field, flags
merged into XLA_FLAGS / LIBTPU_INIT_ARGS with the user's winning, and a hardware flag reaching the JAX that
`python -m megadoc_jax.train` and `python -m megadoc_jax.evaluate` start (subprocesses: XLA reads its flags
once per process)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megadoc_jax import config as config_lib
from megadoc_jax import xla_env

ROOT = Path(__file__).resolve().parent.parent


def hardware(**fields) -> config_lib.HardwareConfig:
    return config_lib.from_dict({"hardware": fields}).hardware


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"xla_flags": ["xla_gpu_foo=1"]}, r"hardware.xla_flags\[0\]: 'xla_gpu_foo=1' is not of the form --name"),
        ({"xla_flags": ["--a=1 --b=2"]}, r"hardware.xla_flags\[0\]: '--a=1 --b=2' is not of the form"),
        ({"libtpu_init_args": ["--a=1", "--b", "--a=2"]}, r"hardware.libtpu_init_args\[2\]: --a is given twice"),
        ({"env": {"nccl_debug": "WARN"}}, r"hardware.env.nccl_debug: an environment variable name is an uppercase"),
        ({"env": {"LIBTPU_INIT_ARGS": "--a=1"}}, r"hardware.env.LIBTPU_INIT_ARGS: set it through hardware.libtpu"),
        ({"accelerator": "H300"}, r"hardware.accelerator: 'H300' not in \["),
        ({"devices": -8}, r"hardware.devices: must be 0"),
        ({"xla_flags": "--a=1"}, r"hardware.xla_flags: expected a list"),
    ],
)
def test_bad_hardware_sections_name_the_field(fields, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        hardware(**fields)


def test_good_flags_and_env_values_are_kept_as_strings():
    h = hardware(xla_flags=["--xla_a=true", "--xla_b"], env={"NCCL_X": 1, "CUDA_Y": "0.9"})
    assert h.xla_flags == ("--xla_a=true", "--xla_b") and h.env == {"NCCL_X": "1", "CUDA_Y": "0.9"}


def test_the_users_flags_and_variables_win_and_are_reported():
    h = hardware(
        name="target",
        xla_flags=["--xla_a=1", "--xla_b=2"],
        libtpu_init_args=["--xla_tpu_c=3"],
        env={"NCCL_X": "from-file", "CUDA_Y": "1"},
    )
    environ = {"XLA_FLAGS": "--xla_b=9 --xla_other", "NCCL_X": "mine"}
    applied = xla_env.apply(h, environ)
    assert environ == {
        "XLA_FLAGS": "--xla_b=9 --xla_other --xla_a=1",
        "LIBTPU_INIT_ARGS": "--xla_tpu_c=3",
        "NCCL_X": "mine",
        "CUDA_Y": "1",
    }
    assert applied.line() == (
        "hardware target: from the hardware file: XLA_FLAGS --xla_a; LIBTPU_INIT_ARGS --xla_tpu_c; env CUDA_Y"
        " | kept from your environment (yours win): XLA_FLAGS --xla_b; env NCCL_X"
    )
    assert xla_env.apply(h, environ).from_hardware["XLA_FLAGS"] == []  # applying twice adds nothing


def test_an_empty_section_changes_nothing_and_prints_nothing():
    environ, out = {"XLA_FLAGS": "--x=1"}, io.StringIO()
    assert xla_env.apply(config_lib.HardwareConfig(), environ).line() == ""
    assert environ == {"XLA_FLAGS": "--x=1"}
    before = dict(os.environ)
    xla_env.apply_and_report(config_lib.HardwareConfig(), out=out)
    assert out.getvalue() == "" and dict(os.environ) == before


def test_flags_after_a_backend_started_are_refused():
    import jax

    jax.devices()  # this test process has a backend (conftest's 8 CPU devices)
    with pytest.raises(xla_env.BackendAlreadyStarted, match="already initialised a backend"):
        xla_env.apply(hardware(name="late", xla_flags=["--xla_a=1"]))


def test_xla_env_and_config_import_no_jax():
    code = "import sys, megadoc_jax.xla_env; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_importing_and_loading_configs_starts_no_backend():
    # What train and evaluate do before xla_env.apply must leave jax without a backend.
    code = (
        "import megadoc_jax.train, megadoc_jax.evaluate, megadoc_jax.experiments\n"
        "from megadoc_jax import config\n"
        "config.load('configs/experiments/baselines/300m.yaml')\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, xla_bridge._backends\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=_fresh_env())


def _fresh_env(**extra: str) -> dict[str, str]:
    """This environment without conftest's XLA_FLAGS (8 devices), on CPU."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _device_count_config(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "three.yaml"
    path.write_text(
        f"base: {ROOT / 'configs' / 'tiny.yaml'}\n"
        "hardware:\n  name: three-cpus\n"
        f"  xla_flags: [--xla_force_host_platform_device_count={count}]\n"
        "  env: {MEGADOC_TEST_HARDWARE_VARIABLE: set-by-file}\n"
        "mesh: {data: -1, fsdp: 1, tensor: 1, context: 1}\n"
        "train: {batch_size: 6}\n"
    )
    return path


def test_train_applies_the_hardware_flags_before_jax_starts(tmp_path):
    # --xla_force_host_platform_device_count is an XLA flag one can see on CPU: the device count.
    config = _device_count_config(tmp_path, 3)
    command = [sys.executable, "-m", "megadoc_jax.train", "--config", str(config), "--dry-run"]
    done = subprocess.run(command, cwd=ROOT, env=_fresh_env(), capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == (
        "hardware three-cpus: from the hardware file: XLA_FLAGS --xla_force_host_platform_device_count; "
        "env MEGADOC_TEST_HARDWARE_VARIABLE"
    )
    assert "mesh: {'data': 3, 'fsdp': 1, 'tensor': 1, 'context': 1} over 3 x cpu" in lines

    # The user's own setting of the same flag wins, and the line says so.
    env = _fresh_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].endswith(
        "| kept from your environment (yours win): XLA_FLAGS --xla_force_host_platform_device_count"
    )
    assert "mesh: {'data': 2, 'fsdp': 1, 'tensor': 1, 'context': 1} over 2 x cpu" in lines


def test_evaluate_applies_the_run_configs_hardware_flags(tmp_path):
    # A run directory whose config.yaml has the hardware section and no checkpoint: evaluate applies the
    # flags, starts JAX, and then refuses the model; the process's JAX has the file's 3 devices.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    config_lib.dump(config_lib.load(_device_count_config(tmp_path, 3)), run_dir / "config.yaml")
    code = (
        "import sys, os\n"
        "from megadoc_jax import evaluate\n"
        f"code = evaluate.main(['--model', {str(run_dir)!r}, '--store', 'x=/nonexistent', '--no-progress'])\n"
        "import jax\n"
        "print('exit', code, 'devices', jax.device_count(), os.environ['MEGADOC_TEST_HARDWARE_VARIABLE'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_fresh_env(), capture_output=True, text=True, check=True
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("hardware three-cpus: from the hardware file: XLA_FLAGS")
    assert lines[-1] == "exit 2 devices 3 set-by-file"
