"""Running stages: in dependency order, up to `jobs` processes at once, resumable. No JAX import.

    outcomes = run_stages(plan.stages(), work_dir, jobs=2)

- Each stage's action (if any) runs, then its commands, one after another, their output appended to
  WORK/logs/<stage>.log (each command line first, as `$ ...`). Children die with this process.
- A stage that succeeds gets a done marker, WORK/stages/<stage>.json (its commands, seconds, time),
  written atomically after the last command: a rerun skips it. A stage killed midway has no marker and
  runs again; every command of the miniature resumes or redoes its own work (train from its newest
  checkpoint, export, generate and megadocs from what they committed, the sweep from its leases).
- A marker whose commands differ from the plan's, or whose fingerprint does (a training run's resolved
  config: another base config, other overrides), stops the run before anything starts, naming the stage:
  runs of two settings are never mixed.
- Stages start in plan order as what they need finishes, up to `jobs` slots; a ready stage wider than the
  free slots holds back the stages planned after it until it can start.
- A failed stage is reported with its exit code and the log's last lines; the stages after it are not
  started, every other stage still runs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from megadoc_jax import files
from megadoc_jax.miniature.plan import Command, Stage
from megadoc_jax.subprocesses import die_with_parent, log_tail

MARKERS_DIR, LOGS_DIR = "stages", "logs"


class StaleWorkDir(RuntimeError):
    """The work directory holds stages of other settings."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # done (now) | earlier (a marker of an earlier invocation) | failed | blocked
    seconds: float = 0.0
    reason: str = ""


def file_name(stage_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", stage_name)


def _marker(work_dir: Path, stage: Stage) -> Path:
    return work_dir / MARKERS_DIR / f"{file_name(stage.name)}.json"


def _recorded(work_dir: Path, stage: Stage) -> dict | None:
    """The stage's done marker; StaleWorkDir if it recorded other commands than the plan's."""
    path = _marker(work_dir, stage)
    if not path.exists():
        return None
    marker = files.read_json(path, "a miniature stage marker")
    differs = None
    if not callable(stage.commands) and _arguments(marker["commands"]) != _arguments(_as_text(stage.command_list())):
        differs = "ran other commands"
    elif stage.fingerprint is not None and marker.get("fingerprint") != stage.fingerprint():
        differs = "ran with another config"
    if differs:
        raise StaleWorkDir(
            f"{work_dir} was made with other settings: stage {stage.name!r} {differs} ({path}); "
            "use another work directory or remove this one"
        )
    return marker


def check_recorded(stages: Sequence[Stage], work_dir: Path) -> None:
    """StaleWorkDir if a done marker in work_dir disagrees with its stage (before anything is written)."""
    for stage in stages:
        _recorded(work_dir, stage)


def _as_text(commands: Sequence[Command]) -> list[str]:
    return [shlex.join(map(str, c)) for c in commands]


def _arguments(commands: list[str]) -> list[str]:
    """The commands without their interpreter: a rerun from another virtual environment is the same plan."""
    return [text.split(" ", 1)[-1] for text in commands]


def _execute(stage: Stage, work_dir: Path) -> tuple[bool, str]:
    log_path = work_dir / LOGS_DIR / f"{file_name(stage.name)}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        if stage.action is not None:
            stage.action()
        commands = stage.command_list()
    except Exception as e:  # an action's bad input: the stage fails with the reason, the others go on
        return False, f"{type(e).__name__}: {e}"
    with log_path.open("ab") as log:
        for text, command in zip(_as_text(commands), commands, strict=True):
            log.write(f"$ {text}\n".encode())
            log.flush()
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent).returncode
            if code != 0:
                return False, f"exit code {code} of `{shlex.join(map(str, command[:4]))} ...`: {log_tail(log_path)}"
    marker = {"stage": stage.name, "commands": _as_text(commands), "seconds": round(time.monotonic() - started, 1)}
    if stage.fingerprint is not None:
        marker["fingerprint"] = stage.fingerprint()
    _marker(work_dir, stage).parent.mkdir(parents=True, exist_ok=True)
    files.write_json_atomic(_marker(work_dir, stage), marker | {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return True, ""


def check_order(stages: Sequence[Stage]) -> None:
    """Every `after` names an earlier stage (so the plan has no cycle); names are unique."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} is planned twice")
        unknown = [d for d in stage.after if d not in seen]
        if unknown:
            raise ValueError(f"stage {stage.name!r} comes after {unknown}, which are not planned before it")
        seen.add(stage.name)


def run_stages(
    stages: Sequence[Stage], work_dir: Path, jobs: int, echo: Callable[[str], None] = print
) -> list[Outcome]:
    check_order(stages)
    begin = time.monotonic()
    clock = lambda: "[{:>2d}:{:02d}]".format(*divmod(int(time.monotonic() - begin), 60))
    outcomes: dict[str, Outcome] = {}
    for stage in stages:
        if (marker := _recorded(work_dir, stage)) is not None:
            outcomes[stage.name] = Outcome(stage.name, "earlier", marker["seconds"])
    pending = [s for s in stages if s.name not in outcomes]
    if len(pending) < len(stages):
        echo(f"{clock()} {len(stages) - len(pending)} stages done earlier (markers in {work_dir / MARKERS_DIR})")
    running: dict[concurrent.futures.Future, tuple[Stage, float]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for stage in list(pending):  # after a failure: nothing that needs it
                failed = [d for d in stage.after if outcomes.get(d, Outcome(d, "")).status in ("failed", "blocked")]
                if failed:
                    pending.remove(stage)
                    outcomes[stage.name] = Outcome(stage.name, "blocked", reason=f"needs {failed[0]!r}")
                    how = "failed" if outcomes[failed[0]].status == "failed" else "did not run"
                    echo(f"{clock()} skipped {stage.name}: it needs {failed[0]!r}, which {how}")
            free = jobs - sum(s.slots for s, _ in running.values())
            for stage in list(pending):
                if not all(outcomes.get(d, Outcome(d, "")).status in ("done", "earlier") for d in stage.after):
                    continue
                if stage.slots > free and running:
                    break  # it waits for slots, and nothing planned after it overtakes it (or it would starve)
                pending.remove(stage)
                free -= stage.slots
                echo(f"{clock()} start   {stage.name}")
                running[pool.submit(_execute, stage, work_dir)] = (stage, time.monotonic())
            if not running:
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                stage, started = running.pop(future)
                ok, reason = future.result()
                seconds = time.monotonic() - started
                outcomes[stage.name] = Outcome(stage.name, "done" if ok else "failed", seconds, reason)
                if ok:
                    echo(f"{clock()} done    {stage.name} ({seconds:.0f} s)")
                else:
                    log = work_dir / LOGS_DIR / f"{file_name(stage.name)}.log"
                    echo(f"{clock()} FAILED  {stage.name} after {seconds:.0f} s: {reason} (log: {log})")
    return [outcomes[s.name] for s in stages]
