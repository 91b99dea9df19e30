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

import jax

from megadoc_jax import aot, dry_run, experiment_configs, hardware, hardware_check, xla_env
from megadoc_jax import config as config_lib
from megadoc_jax.config_check import Problem, compiled_step_line, run_in_own_process, shown, state_line
from megadoc_jax.run_names import run_name

CONFIGS_DIR = hardware_check.CONFIGS_DIR


def shipped_configs() -> list[Path]:
    return sorted((CONFIGS_DIR / experiment_configs.EXPERIMENTS_DIR).rglob("*.yaml"))


def check(path: Path, compile_step: bool = False, topology: str | None = None, overrides: list[str] = ()) -> str:
    """Check one config file (module doc) with `key=value` overrides in this process; returns its line, raises
    Problem naming the file and the key. Its hardware flags apply only if this process applied them first."""
    where = shown(path)
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
        devices = aot.tpu_topology_devices(target, config.mesh.dcn_data)
    except aot.AotError as e:
        raise Problem(f"{where}: experiment.topology: {e}") from None
    kind = devices[0].device_kind
    try:
        mesh_sizes, mesh, setup = dry_run.abstract_setup(config, devices)
        state = state_line(where, setup, kind, hardware.hbm_bytes_per_device(kind))
    except (config_lib.ConfigError, ValueError) as e:  # ValueError: a parameter that cannot be split so
        raise Problem(f"{where}: {e}") from None
    mesh_text = " ".join(f"{axis}={size}" for axis, size in mesh_sizes.items())
    line = f"{where}: {config.experiment.name or '-'} {name} | mesh {mesh_text} on {len(devices)} x {kind} | {state}"
    return line + compiled_step_line(where, config, mesh, setup) if compile_step else line


def check_all(paths: list[Path], checks, compile_step: bool) -> int:
    """Run `checks(path)` for each path, one line each; exit status 0 or 1 (module doc)."""
    problems = []
    for path in paths:
        try:
            print(checks(path), flush=True)
        except Problem as e:
            print(f"FAIL {e}", flush=True)
            problems.append(str(e))
    if problems:
        print(f"{len(problems)} of {len(paths)} configs fail; the first: {problems[0]}", file=sys.stderr)
        return 1
    print(f"all {len(paths)} configs pass" + (" (train steps compiled)" if compile_step else ""))
    return 0


def _check_here(args: argparse.Namespace, path: Path, overrides: list[str]) -> int:
    """--this-process: apply the config's hardware section before JAX starts, then check it (config_check)."""
    try:
        if args.hardware:
            config = hardware_check.representative_config(path, args.size, overrides)
        else:
            config = config_lib.load(path, overrides)
    except config_lib.ConfigError as e:
        print(f"FAIL {shown(path)}: {e}")
        return 1
    xla_env.apply_and_report(config.hardware, out=sys.stderr)
    jax.devices()  # starts the CPU backend: XLA parses XLA_FLAGS now, and dies on a flag it does not know
    try:
        if args.hardware:
            print(hardware_check.check_target(path, args.size, args.compile, overrides))
        else:
            print(check(path, args.compile, args.topology, overrides))
    except Problem as e:
        print(f"FAIL {e}")
        return 1
    return 0


def _own_process_argv(args: argparse.Namespace, path: Path, overrides: list[str]) -> list[str]:
    argv = [str(path), *overrides]
    if args.hardware:
        argv += ["--hardware", "--size", args.size]
    if args.compile:
        argv.append("--compile")
    if args.topology:
        argv += ["--topology", args.topology]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megadoc_jax.experiments", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="validate configs and (--compile) compile their TPU steps")
    check_parser.add_argument(
        "configs", nargs="*", help="files (default: every file under configs/experiments/), then key=value overrides"
    )
    check_parser.add_argument("--compile", action="store_true", help="compile each train step ahead of time")
    check_parser.add_argument("--topology", help="TPU slice instead of experiment.topology, e.g. v4:2x2x2")
    check_parser.add_argument(
        "--hardware", action="store_true", help="the files are hardware targets (default: all of configs/hardware/)"
    )
    check_parser.add_argument("--size", default=hardware_check.DEFAULT_SIZE, help="--hardware: the model size")
    check_parser.add_argument("--this-process", action="store_true", help=argparse.SUPPRESS)  # config_check
    commands.add_parser("write", help="rewrite configs/experiments/ from megadoc_jax/experiment_configs.py")
    commands.add_parser("table", help="print docs/experiments.md's table")
    args = parser.parse_args(argv)

    if args.command == "write":
        for path in experiment_configs.write_all(CONFIGS_DIR):
            print(shown(path))
        return 0
    if args.command == "table":
        print(experiment_configs.markdown_table(), end="")
        return 0
    overrides = [a for a in args.configs if "=" in a]  # a.b=value: applied to every file
    paths = [Path(a) for a in args.configs if "=" not in a]
    if args.this_process:
        if len(paths) != 1:
            parser.error("--this-process checks exactly one file")
        return _check_here(args, paths[0], overrides)
    paths = paths or (hardware_check.shipped_targets() if args.hardware else shipped_configs())
    if not paths:
        print(f"no config files under {CONFIGS_DIR}", file=sys.stderr)
        return 2
    try:
        aot.tpu_topology_devices(args.topology or "v4:2x2x2")  # libtpu present? (a usage problem, not a config's)
    except aot.AotError as e:
        print(e, file=sys.stderr)
        return 2
    if args.hardware or args.compile:  # each with its own flags, in its own process (config_check)
        checks = lambda path: run_in_own_process(shown(path), _own_process_argv(args, path, overrides))  # noqa: E731
    else:
        checks = lambda path: check(path, False, args.topology, overrides)  # noqa: E731
    return check_all(paths, checks, args.compile)


if __name__ == "__main__":
    sys.exit(main())
