"""Child processes that do not outlive their parent, and their logs. No JAX import.

Used by the sweep's workers and by the miniature: both start `python -m ...` children that must die
with them (a killed worker must not leave a training process running on its own).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGKILL when its parent dies (Linux; elsewhere a
    no-op). Only a system call (the library is loaded in the parent), so it is safe with threads running."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log file joined by ' | ' ('' if there is no such file)."""
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except FileNotFoundError:
        return ""
