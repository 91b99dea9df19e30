"""Child processes: Python processes on fake CPU devices (alone or as one of a jax.distributed job over gloo),
and, for the kill -9 tests, waiting until they have made progress, then killing them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env(coordinator: str, num_processes: int, process_id: int) -> dict[str, str]:
    """The environment that makes megadoc_jax.distributed.initialize_from_environment join a job."""
    return {
        "MEGADOC_COORDINATOR": coordinator,
        "MEGADOC_NUM_PROCESSES": str(num_processes),
        "MEGADOC_PROCESS_ID": str(process_id),
    }


def slurm_env(port: int, num_processes: int, process_id: int) -> dict[str, str]:
    """What srun would set for task `process_id` of a one-node step on this machine (MEGADOC_DISTRIBUTED=slurm)."""
    return {
        "MEGADOC_DISTRIBUTED": "slurm",
        "MEGADOC_COORDINATOR_PORT": str(port),
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": str(num_processes),
        "SLURM_NTASKS": str(num_processes),
        "SLURM_PROCID": str(process_id),
        "SLURM_LOCALID": str(process_id),
        "SLURM_NODEID": "0",
    }


def start_python(args: list[str], *, devices: int, env: dict | None = None, **popen) -> subprocess.Popen:
    """`python ARGS` in the repository root on `devices` fake CPU devices, stdout and stderr piped together."""
    environment = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, *args],
        env=environment,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _output(process: subprocess.Popen) -> str:
    """The tail of what the process wrote to its piped stderr (or stdout), for a failure message."""
    pipe = process.stderr or process.stdout
    if pipe is None:
        return ""
    text = pipe.read()
    return (text.decode(errors="replace") if isinstance(text, bytes) else text)[-3000:]


def wait_until(process: subprocess.Popen, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ready() until it holds; fail the test if the process ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"{what} ended before it could be stopped: {_output(process)}"
        assert time.monotonic() < deadline, f"{what} made no progress in {timeout:.0f} s"
        time.sleep(0.005)


def kill_when(
    process: subprocess.Popen, ready: Callable[[], bool], *, timeout: float, what: str, sig: int = signal.SIGKILL
) -> None:
    """wait_until, then `sig` (SIGKILL; SIGTERM for a scheduler's stop), waiting for the process to end;
    it is reaped (killed if need be) whatever happens."""
    try:
        wait_until(process, ready, timeout=timeout, what=what)
        os.kill(process.pid, sig)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
