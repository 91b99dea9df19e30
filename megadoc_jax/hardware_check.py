"""`python -m megadoc_jax.experiments check --hardware`: every hardware target at a representative model size.

    python -m megadoc_jax.experiments check --hardware                      # every target in configs/hardware/
    python -m megadoc_jax.experiments check --hardware FILE ... --compile   # and the TPU step compiled
    python -m megadoc_jax.experiments check --hardware FILE --size 1.5b train.microbatches=2

A target is a file of configs/hardware/ that names a TPU topology (experiment.topology) or a device count
(hardware.devices); base/ and cpu.yaml are bases, not targets. Each is composed over the paper's recipe and
a model size (configs/recipe/paper.yaml, configs/model/SIZE.yaml; default the paper's main model, 300m),
then checked in a process of its own with the file's flags and environment applied (xla_env.apply), so that
the installed jaxlib parses its XLA_FLAGS and libtpu its LIBTPU_INIT_ARGS (both refuse unknown flags):

- TPU targets: the abstract devices of experiment.topology, mesh.dcn_data slices of it, must be
  hardware.devices of hardware.accelerator; then the dry run's abstract build over them (mesh
  divisibility, the attention backend's mesh needs, shardings, train state against HBM) and with
  --compile the real train step compiled ahead of time with the file's libtpu flags.
- Other targets (GPUs): the same build over a device-free mesh of hardware.devices
  (sharding.abstract_mesh), the state against hardware.accelerator's HBM; nothing compiles for a GPU here.

One line per target, as the experiment check prints them, e.g.

    configs/hardware/tpu-v5e-16.yaml: tpu-v5e-16 300m | mesh data=1 fsdp=16 tensor=1 context=1 dcn_data=1 on
        16 x TPU v5 lite | 299,649,792 parameters | state 214.46 MiB/device
"""

from __future__ import annotations

from pathlib import Path

import jax

from megadoc_jax import aot, dry_run, hardware, sharding, step
from megadoc_jax import config as config_lib
from megadoc_jax.config_check import Problem, compiled_step_line, shown, state_line

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # the checkout's configs/
HARDWARE_DIR = CONFIGS_DIR / "hardware"
RECIPE = CONFIGS_DIR / "recipe" / "paper.yaml"
DEFAULT_SIZE = "300m"  # the paper's main model (experiment_configs.MAIN_SIZE)


def is_target(config: config_lib.Config) -> bool:
    return bool(config.experiment.topology or config.hardware.devices)


def shipped_targets() -> list[Path]:
    """The hardware targets directly under configs/hardware/ (module doc)."""
    return [path for path in sorted(HARDWARE_DIR.glob("*.yaml")) if is_target(config_lib.load(path))]


def representative_config(path: Path, size: str = DEFAULT_SIZE, overrides: list[str] = ()) -> config_lib.Config:
    """The paper's recipe with model `size` on hardware file `path` (composed last, as in an experiment)."""
    model = CONFIGS_DIR / "model" / f"{size}.yaml"
    if not model.is_file():
        raise config_lib.ConfigError(f"--size {size}: no model file {model}")
    raw = config_lib.compose_files([RECIPE, model, path])
    return config_lib.from_dict(config_lib.apply_overrides(raw, list(overrides)))


def _tpu_devices(where: str, config: config_lib.Config) -> list[jax.Device]:
    h, topology, slices = config.hardware, config.experiment.topology, config.mesh.dcn_data
    try:
        devices = aot.tpu_topology_devices(topology, slices)
    except aot.AotError as e:
        raise Problem(f"{where}: experiment.topology: {e}") from None
    if h.devices and len(devices) != h.devices:
        raise Problem(f"{where}: hardware.devices: {h.devices}, but {slices} x {topology} has {len(devices)} devices")
    chip = hardware.accelerator(devices[0].device_kind)
    if h.accelerator and (chip is None or chip.name != h.accelerator):
        raise Problem(f"{where}: hardware.accelerator: {h.accelerator!r}, but {topology} is {devices[0].device_kind}")
    return devices


def check_target(path: Path, size: str = DEFAULT_SIZE, compile_step: bool = False, overrides: list[str] = ()) -> str:
    """Check one hardware target in this process (module doc; its flags apply only if this process applied
    them before JAX started); returns its line, raises Problem naming the file and the key."""
    where = shown(path)
    try:
        config = representative_config(path, size, overrides)
    except config_lib.ConfigError as e:
        raise Problem(f"{where}: {e}") from None
    h = config.hardware
    if not is_target(config):
        raise Problem(f"{where}: hardware.devices: neither it nor experiment.topology is set: not a hardware target")
    try:
        if config.experiment.topology:
            devices = _tpu_devices(where, config)
            mesh_sizes, mesh, setup = dry_run.abstract_setup(config, devices)
            kind, count = devices[0].device_kind, len(devices)
            capacity = hardware.hbm_bytes_per_device(kind)
        else:
            mesh_sizes = config_lib.validate_for_devices(config, h.devices)
            mesh = sharding.abstract_mesh(mesh_sizes)
            setup = step.train_setup(config, mesh, max(config.train.steps, 1))
            chip = next((acc for acc in hardware.ACCELERATORS if acc.name == h.accelerator), None)
            kind, count = h.accelerator or "unknown device", h.devices
            capacity = None if chip is None else chip.hbm_bytes_per_device
        state = state_line(where, setup, kind, capacity)
    except (config_lib.ConfigError, ValueError) as e:  # ValueError: a mesh or split that does not work
        raise Problem(f"{where}: {e}") from None
    axes = " ".join(f"{axis}={n}" for axis, n in {**mesh_sizes, "dcn_data": config.mesh.dcn_data}.items())
    line = f"{where}: {h.name or '-'} {config.model.size} | mesh {axes} on {count} x {kind} | {state}"
    if not compile_step:
        return line
    if not config.experiment.topology:
        return line + " | not compiled (no ahead-of-time compile for this target here)"
    return line + compiled_step_line(where, config, mesh, setup)
