"""`python -m megadoc_jax.experiments`: check the paper's experiment configs before they cost TPU time.

    python -m megadoc_jax.experiments check                      # every file under configs/experiments/
    python -m megadoc_jax.experiments check FILE ... --compile   # and compile each train step for its TPU
    python -m megadoc_jax.experiments check FILE --topology v4:2x2x2   # another target than experiment.topology
    python -m megadoc_jax.experiments check FILE --compile train.microbatches=2   # key=value overrides
    python -m megadoc_jax.experiments write                      # rewrite configs/experiments/ from the table
    python -m megadoc_jax.experiments table                      # the Markdown table of docs/experiments.md

`check` loads each config (config.load: types, values, the experiment section), checks that its run
directory is runs/<run_names.run_name(config)>, and builds the train step abstractly over the abstract
devices of its TPU slice (experiment.topology, or --topology; needs libtpu, the `tpu` extra) as the dry
run does: mesh divisibility, the attention backend's mesh needs, parameter shardings and whether the
train state fits the chip. With --compile it also compiles the real train step ahead of time for that
slice on this machine (aot.compile_report: per-device memory and FLOPs; minutes per config on a CPU).
One line per config:

    configs/experiments/simple/g2.yaml: simple-g2 300m-dclm-simple-g2-e4-r0.75-lr3e-3-wd0.8-s0 |
        mesh data=1 fsdp=8 tensor=1 context=1 on 8 x TPU v4 | 299,649,792 parameters | state 428.64 MiB/device

Exit status 0 when every config passes, 1 when one does not (the last line names the first problem's file
and key), 2 when the check cannot run (no libtpu, no config files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megadoc_jax import aot, dry_run, experiment_configs, hardware
from megadoc_jax import config as config_lib
from megadoc_jax.run_names import run_name

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # the checkout's configs/


class Problem(Exception):
    """A config that does not pass; the message names the file and the key."""


def shipped_configs() -> list[Path]:
    return sorted((CONFIGS_DIR / experiment_configs.EXPERIMENTS_DIR).rglob("*.yaml"))


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check(path: Path, compile_step: bool = False, topology: str | None = None, overrides: list[str] = ()) -> str:
    """Check one config file (module doc) with `key=value` overrides; returns its line, raises Problem
    naming the file and the key."""
    where = _shown(path)
    try:
        config = config_lib.load(path, overrides)
    except config_lib.ConfigError as e:
        raise Problem(f"{where}: {e}") from None
    name = run_name(config)
    if config.experiment.name and config.train.run_dir != f"runs/{name}":
        raise Problem(f"{where}: train.run_dir: {config.train.run_dir!r} is not runs/<its run name> = runs/{name}")
    target = topology or config.experiment.topology
    if not target:
        raise Problem(f"{where}: experiment.topology: not set (a configs/hardware/ file sets it); or give --topology")
    try:
        devices = aot.tpu_topology_devices(target)
    except aot.AotError as e:
        raise Problem(f"{where}: experiment.topology: {e}") from None
    try:
        mesh_sizes, mesh, setup = dry_run.abstract_setup(config, devices)
        state_bytes = aot.state_bytes_per_device(setup.abstract_state)
    except (config_lib.ConfigError, ValueError) as e:  # ValueError: a parameter that cannot be split so
        raise Problem(f"{where}: {e}") from None
    kind = devices[0].device_kind
    capacity = hardware.hbm_bytes_per_device(kind)
    if capacity is not None and state_bytes > capacity:
        raise Problem(f"{where}: mesh.fsdp: the train state alone needs " + aot.format_fit(state_bytes, kind, capacity))
    mesh_text = " ".join(f"{axis}={size}" for axis, size in mesh_sizes.items())
    line = (
        f"{where}: {config.experiment.name or '-'} {name} | mesh {mesh_text} on {len(devices)} x {kind} | "
        f"{setup.num_parameters:,} parameters | state {aot.format_bytes(state_bytes)}/device"
    )
    if not compile_step:
        return line
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
    memory = report["memory"]["required_bytes"]
    fit = aot.format_fit(memory, kind, report["device_memory_bytes"], report["device_memory_source"])
    if report["fits"] is False:
        raise Problem(f"{where}: model.remat / train.microbatches / mesh: the compiled step needs {fit}")
    loops = " (loop bodies counted once)" if report["flops_count_loops_once"] else ""
    return (
        f"{line} | step {fit} | {report['flops_per_device']:.4g} FLOPs/device/step{loops} | "
        f"compiled in {report['compile_s']:.0f} s"
    )


def check_all(paths: list[Path], compile_step: bool, topology: str | None, overrides: list[str] = ()) -> int:
    problems = []
    for path in paths:
        try:
            print(check(path, compile_step, topology, overrides), flush=True)
        except Problem as e:
            print(f"FAIL {e}", flush=True)
            problems.append(str(e))
    if problems:
        print(f"{len(problems)} of {len(paths)} configs fail; the first: {problems[0]}", file=sys.stderr)
        return 1
    print(f"all {len(paths)} configs pass" + (" (train steps compiled)" if compile_step else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.experiments", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="validate configs and (--compile) compile their TPU steps")
    check_parser.add_argument(
        "configs", nargs="*", help="files (default: every file under configs/experiments/), then key=value overrides"
    )
    check_parser.add_argument("--compile", action="store_true", help="compile each train step ahead of time")
    check_parser.add_argument("--topology", help="TPU slice instead of experiment.topology, e.g. v4:2x2x2")
    commands.add_parser("write", help="rewrite configs/experiments/ from megadoc_jax/experiment_configs.py")
    commands.add_parser("table", help="print docs/experiments.md's table")
    args = parser.parse_args(argv)

    if args.command == "write":
        for path in experiment_configs.write_all(CONFIGS_DIR):
            print(_shown(path))
        return 0
    if args.command == "table":
        print(experiment_configs.markdown_table(), end="")
        return 0
    overrides = [a for a in args.configs if "=" in a]  # a.b=value: applied to every file
    paths = [Path(a) for a in args.configs if "=" not in a] or shipped_configs()
    if not paths:
        print(f"no config files under {CONFIGS_DIR / experiment_configs.EXPERIMENTS_DIR}", file=sys.stderr)
        return 2
    try:
        aot.tpu_topology_devices(args.topology or "v4:2x2x2")  # libtpu present? (a usage problem, not a config's)
    except aot.AotError as e:
        print(e, file=sys.stderr)
        return 2
    return check_all(paths, args.compile, args.topology, overrides)


if __name__ == "__main__":
    sys.exit(main())
