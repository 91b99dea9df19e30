"""A hardware file's flags and environment put into the process environment before JAX starts a backend.

XLA reads XLA_FLAGS, and libtpu LIBTPU_INIT_ARGS, once, when the backend (or the TPU plugin) initialises;
NCCL reads its NCCL_* variables when the first communicator is made. So `apply` runs first thing in the
train and evaluate commands, after the config is read and before `jax.distributed.initialize` or any
`jax.devices()`. Importing jax starts no backend; a backend already started is refused, because the
flags would then be silently ignored.

What the user already set wins: a flag of the same name already in XLA_FLAGS or LIBTPU_INIT_ARGS, or a
variable already in the environment, is kept as it is, and the start-up line says so:

    hardware tpu-v5e-16: from the hardware file: LIBTPU_INIT_ARGS --xla_enable_async_all_gather ... |
        kept from your environment (yours win): LIBTPU_INIT_ARGS --xla_tpu_scoped_vmem_limit_kib

(one line in the console).

No JAX import here (the tests check): this module only edits a mapping of strings.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import MutableMapping, Sequence
from typing import TextIO

from megadoc_jax.config import FLAG_VARIABLES, HardwareConfig, flag_name


class BackendAlreadyStarted(RuntimeError):
    """XLA flags were to be applied after JAX had initialised a backend: they would have no effect."""


@dataclasses.dataclass
class Applied:
    """What `apply` did: per variable, the entries taken from the hardware file and those the user's won."""

    name: str
    from_hardware: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # variable -> flags / names
    kept: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # variable -> the user's, unchanged

    def line(self) -> str:
        """One line for the console, naming every flag and variable; empty when the section sets nothing."""
        if not self.from_hardware and not self.kept:
            return ""

        def listed(groups: dict[str, list[str]]) -> str:
            return "; ".join(f"{var} {' '.join(flag_name(i) for i in items)}" for var, items in groups.items() if items)

        text = f"hardware {self.name or '(unnamed)'}: from the hardware file: {listed(self.from_hardware) or 'nothing'}"
        if self.kept:
            text += f" | kept from your environment (yours win): {listed(self.kept)}"
        return text


def merge_flags(current: str, flags: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """(`current` with each of `flags` whose name it does not already hold appended, the flags appended,
    the names of those it already held). Entries are separated by whitespace, as XLA and libtpu split them."""
    present = {flag_name(token) for token in current.split()}
    added = [flag for flag in flags if flag_name(flag) not in present]
    kept = [flag_name(flag) for flag in flags if flag_name(flag) in present]
    merged = " ".join([*current.split(), *added])
    return merged, added, kept


def _backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")  # only if jax was imported; never imports it
    return bool(getattr(bridge, "_backends", None))


def apply(hardware: HardwareConfig, environ: MutableMapping[str, str] | None = None) -> Applied:
    """Put `hardware`'s flags and variables into `environ` (default os.environ); the user's win (module doc)."""
    environ = os.environ if environ is None else environ
    wanted = any(getattr(hardware, field) for field in FLAG_VARIABLES.values()) or hardware.env
    if wanted and environ is os.environ and _backend_started():
        raise BackendAlreadyStarted(
            f"hardware {hardware.name!r}: JAX has already initialised a backend, so XLA_FLAGS and "
            "LIBTPU_INIT_ARGS would be ignored; apply the hardware section before the first jax.devices()"
        )
    applied = Applied(hardware.name)
    for variable, field in FLAG_VARIABLES.items():
        flags = getattr(hardware, field)
        if not flags:
            continue
        merged, added, kept = merge_flags(environ.get(variable, ""), flags)
        environ[variable] = merged
        applied.from_hardware[variable] = added
        if kept:
            applied.kept[variable] = kept
    for name, value in hardware.env.items():
        if name in environ:
            applied.kept.setdefault("env", []).append(name)
        else:
            environ[name] = value
            applied.from_hardware.setdefault("env", []).append(name)
    return applied


def apply_and_report(hardware: HardwareConfig, out: TextIO | None = None) -> Applied:
    """`apply` to os.environ, then print its one line (nothing when the section is empty)."""
    applied = apply(hardware)
    line = applied.line()
    if line:
        print(line, file=out or sys.stdout, flush=True)
    return applied
