"""Child processes in the kill -9 tests: wait until they have made progress, then kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


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


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
    """wait_until, then SIGKILL; the process is reaped whatever happens."""
    try:
        wait_until(process, ready, timeout=timeout, what=what)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
