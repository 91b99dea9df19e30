"""What the config checks (`python -m megadoc_jax.experiments check`, experiments.py and hardware_check.py)
share: the Problem they raise, the train-state fit, the compiled step's line, and running one check in a
process of its own.

A process of its own, because XLA and libtpu read their flags (XLA_FLAGS, LIBTPU_INIT_ARGS) once, when
they start: a check that compiles with a config's hardware flags, or that asks whether the installed
jaxlib and libtpu accept them, runs in a fresh Python that applies them first (xla_env.apply), then checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax

from megadoc_jax import aot, dry_run, step
from megadoc_jax import config as config_lib


class Problem(Exception):
    """A config that does not pass; the message names the file and the key."""


def shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def state_line(where: str, setup: step.TrainSetup, device_kind: str, capacity: int | None) -> str:
    """'N parameters | state X/device', or Problem when the train state alone exceeds the device memory."""
    state_bytes = aot.state_bytes_per_device(setup.abstract_state)
    if capacity is not None and state_bytes > capacity:
        fit = aot.format_fit(state_bytes, device_kind, capacity)
        raise Problem(f"{where}: mesh.fsdp: the train state alone needs {fit}")
    return f"{setup.num_parameters:,} parameters | state {aot.format_bytes(state_bytes)}/device"


def compiled_step_line(where: str, config: config_lib.Config, mesh: jax.sharding.Mesh, setup: step.TrainSetup) -> str:
    """The real train step compiled ahead of time for `mesh`'s (TPU) devices: '| step ... | FLOPs | time',
    or Problem naming the keys that decide its memory."""
    try:
        report = dry_run.compile_train_step(config, mesh, setup)
    except Exception as e:  # a lowering or compiler error: this file's problem; the others are still checked
        first_line = (str(e).strip().splitlines() or [""])[0]
        message = f"model.attention / mesh: the TPU compile failed: {type(e).__name__}: {first_line}"
        raise Problem(f"{where}: {message}") from e
    if report["memory"] is None:
        raise Problem(
            f"{where}: model.remat / train.microbatches / mesh: the TPU compiler refused the step: "
            + report["compile_error"].split("\n")[0]
        )
    kind = report["device_kind"]
    fit = aot.format_fit(
        report["memory"]["required_bytes"], kind, report["device_memory_bytes"], report["device_memory_source"]
    )
    if report["fits"] is False:
        raise Problem(f"{where}: model.remat / train.microbatches / mesh: the compiled step needs {fit}")
    loops = " (loop bodies counted once)" if report["flops_count_loops_once"] else ""
    return (
        f" | step {fit} | {report['flops_per_device']:.4g} FLOPs/device/step{loops} | "
        f"compiled in {report['compile_s']:.0f} s"
    )


# What a check process that died, rather than printing a line, says about which flags were refused.
_REFUSALS = (
    ("Unknown command line flag", "hardware.libtpu_init_args: the installed libtpu refused them"),
    ("XLA_FLAGS", "hardware.xla_flags: the installed jaxlib refused them"),
)


def run_in_own_process(where: str, argv: list[str]) -> str:
    """`python -m megadoc_jax.experiments check ARGV --this-process` in a fresh process, on CPU (TPU programs
    compile there; no accelerator is needed): its one line, or Problem with its error (a refused flag names
    hardware.xla_flags or hardware.libtpu_init_args)."""
    command = [sys.executable, "-m", "megadoc_jax.experiments", "check", *argv, "--this-process"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode in (0, 1) and lines:
        line = lines[-1]
        if line.startswith("FAIL "):
            raise Problem(line.removeprefix("FAIL "))
        return line
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    for marker, message in _REFUSALS:
        refused = [line for line in errors if marker in line]
        if refused:
            raise Problem(f"{where}: {message}: {refused[-1].strip()}")
    raise Problem(f"{where}: the check process failed (exit {done.returncode}): {(errors or ['no output'])[-1]}")
