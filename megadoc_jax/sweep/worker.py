"""A sweep worker: recompute the search from the sweep directory, claim a run, train it, record it; repeat.

    sweep = Sweep(load_spec("configs/sweeps/demo.yaml"))
    sweep.adopt()                                # SWEEP_DIR/spec.json: every worker of a directory agrees
    state = work(sweep, train_runner(sweep.spec))  # returns when the search is finished

Each pass: the search state is recomputed from the files (search.search over the outcomes that the done
markers and leases give; done and failed-for-good records never change, so they are read once), the
first run of the current round that is queued is claimed (leases.py), and the table is rewritten. With
every run of the round held by others, the worker waits poll_seconds and looks again. The run is
trained as a subprocess,

    python -m megadoc_jax.train --config BASE_CONFIG OVERRIDES... train.run_dir=SWEEP_DIR/runs/<run name>

with its output in SWEEP_DIR/logs/<run name>.<attempt>.log, while a thread heartbeats the lease; the
objective is the last logged value of the sweep's metric in the run's metrics.jsonl. Exit 0 with the
objective, or exit 3 (a non-finite loss: the run diverged, objective +inf), makes the done marker; any
other end is a failed attempt, retried while attempts are left. A retried run resumes from its
run directory's newest checkpoint, as `train` always does. The training process is killed with its
worker (PR_SET_PDEATHSIG on Linux), and when its lease is taken over.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megadoc_jax import files
from megadoc_jax.config import ConfigError, build_dataclass
from megadoc_jax.subprocesses import die_with_parent, log_tail
from megadoc_jax.sweep.leases import DONE_DIR, Lease, Leases, RunRecord
from megadoc_jax.sweep.search import Outcome, Point, SearchState, search
from megadoc_jax.sweep.spec import Runs, SweepSpec
from megadoc_jax.sweep.table import build_table, write_table

SPEC_JSON, RUNS_DIR, LOGS_DIR = "spec.json", "runs", "logs"
SPEC_FORMAT = "megadoc-sweep-spec"
DIVERGED_EXIT_CODE = 3  # train.py: stopped on a non-finite loss


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    point: Point
    attempt: int
    overrides: list[str]
    run_dir: Path
    log_path: Path


@dataclasses.dataclass(frozen=True)
class Result:
    exit_code: int
    objective: float | None = None  # the final value of the sweep's objective; None if not logged
    losses: dict[str, float] = dataclasses.field(default_factory=dict)  # every eval/<store>/loss at the end
    reason: str = ""  # why the attempt failed


Runner = Callable[[Job, Lease], Result]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def stored_spec(sweep_dir: str | Path) -> SweepSpec:
    """The spec that SWEEP_DIR/spec.json records (as the first worker read it)."""
    path = Path(sweep_dir) / SPEC_JSON
    raw = files.read_json(path, "the sweep's spec (is this a sweep directory?)", ConfigError)
    raw.pop("format", None)
    try:
        return build_dataclass(SweepSpec, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


class Sweep:
    """One sweep directory as one worker sees it: the spec, its runs, the leases and the final records."""

    def __init__(self, spec: SweepSpec, *, clock: Callable[[], float] = time.time):
        self.spec = spec
        self.space = spec.space
        self.runs = Runs(spec)
        self.root = Path(spec.sweep_dir)
        self.leases = Leases(self.root, spec.lease_seconds, clock=clock)
        self._outcomes: dict[Point, Outcome] = {}  # final: done or failed for good
        self._final_records: dict[Point, RunRecord] = {}
        self.read_done_markers()

    def adopt(self) -> None:
        """Record the spec in SWEEP_DIR/spec.json, or check that it agrees with the one recorded there."""
        self.runs.check()
        path = self.root / SPEC_JSON
        mine = {
            "format": SPEC_FORMAT,
            **dataclasses.asdict(self.spec),
            "config": str(Path(self.spec.config).absolute()),
        }
        if files.create_json_exclusive(path, mine):
            return
        theirs = stored_spec(self.root).agreement()
        for key, value in self.spec.agreement().items():
            if theirs.get(key) != value:
                raise ConfigError(
                    f"{path}: this sweep directory holds a sweep with {key} = {theirs.get(key)!r}, but the sweep file "
                    f"says {value!r}; use another sweep_dir for another sweep"
                )

    def read_done_markers(self) -> None:
        """Take every done marker's outcome (and run name) at once: what a worker joining a long sweep
        would otherwise find one round at a time."""
        for path in sorted((self.root / DONE_DIR).glob("*.json")):
            marker = files.read_json(path, "done marker", ConfigError)
            try:
                point = self.space.point(marker["point"])
            except (KeyError, ValueError) as e:
                raise ConfigError(f"{path}: a done marker of another sweep? ({e})") from None
            self.runs.names.setdefault(point, marker["run"])
            self.record(point)

    def record(self, point: Point) -> RunRecord:
        if point in self._final_records:
            return self._final_records[point]
        record = self.leases.record(self.runs.name(point))
        outcome = self._outcome(record)
        if outcome is not None:
            self._outcomes[point], self._final_records[point] = outcome, record
        return record

    def _outcome(self, record: RunRecord) -> Outcome | None:
        status = record.status(self.spec.max_attempts)
        if status == "done":
            return Outcome.done(float("inf") if record.done.get("diverged") else record.done["objective"])
        return Outcome.failed() if status == "failed" else None

    def state(self) -> tuple[SearchState, dict[Point, RunRecord]]:
        """The search state and the record of every point it has met, from the files as they are now."""
        while True:
            state = search(self.space, self._outcomes)
            pending = {p: self.record(p) for p in state.to_run}
            if all(p not in self._outcomes for p in pending):
                break  # nothing new became final: this is where the search stands
        records = {p: self.record(p) for r in state.rounds for p in r.candidates}
        return state, records

    def write_table(self) -> dict[str, Any]:
        state, records = self.state()
        table = build_table(self.spec, state, self.runs, records)
        write_table(self.root, table)
        return table

    def job(self, point: Point, lease: Lease) -> Job:
        name, root = lease.name, self.root.absolute()
        return Job(
            name,
            point,
            lease.attempt,
            self.runs.overrides(point),
            root / RUNS_DIR / name,
            root / LOGS_DIR / f"{name}.{lease.attempt}.log",
        )


def work(sweep: Sweep, runner: Runner, *, worker: str | None = None, say: Callable[[str], None] = print) -> SearchState:
    """Claim and run the sweep's runs until the search is finished (module docstring); the final state."""
    worker = worker or worker_id()
    while True:
        state, records = sweep.state()
        if state.finished:
            write_table(sweep.root, build_table(sweep.spec, state, sweep.runs, records))
            return state
        claimed = None
        for point in state.to_run:
            if records[point].status(sweep.spec.max_attempts) == "queued":
                info = {
                    "worker": worker,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "point": sweep.space.named(point),
                }
                lease = sweep.leases.claim(records[point].name, info, sweep.spec.max_attempts)
                if lease is not None:
                    claimed = (point, lease)
                    break
        if claimed is None:  # every run of the round is held by another worker
            write_table(sweep.root, build_table(sweep.spec, state, sweep.runs, records))
            time.sleep(sweep.spec.poll_seconds)
            continue
        sweep.write_table()  # once a run: the previous run's result and this claim
        run_attempt(sweep, *claimed, runner, worker, say)


def run_attempt(
    sweep: Sweep, point: Point, lease: Lease, runner: Runner, worker: str, say: Callable[[str], None]
) -> None:
    job = sweep.job(point, lease)
    described = ", ".join(f"{k}={v:g}" for k, v in sweep.space.named(point).items())
    say(f"[{worker}] {job.name} ({described}): attempt {job.attempt} of {sweep.spec.max_attempts}")
    with lease.heartbeat(sweep.spec.heartbeat_seconds):
        result = runner(job, lease)
        if lease.lost.is_set():
            say(f"[{worker}] {job.name}: lease taken over by another worker; this attempt's result is dropped")
            return
        diverged = result.exit_code == DIVERGED_EXIT_CODE
        if diverged or (result.exit_code == 0 and result.objective is not None):
            marker = {
                "run": job.name,
                "point": sweep.space.named(point),
                "objective": None if diverged else result.objective,
                "diverged": diverged,
                "losses": result.losses,
                "worker": worker,
                "finished": time.time(),
                "run_dir": str(job.run_dir),
            }
            if lease.finish(marker):
                shown = "diverged" if diverged else f"{sweep.spec.objective} {result.objective:.4f}"
                say(f"[{worker}] {job.name}: {shown}")
            return
        reason = result.reason or f"exit code {result.exit_code}"
        lease.fail(
            {
                "reason": reason,
                "exit_code": result.exit_code,
                "worker": worker,
                "log": str(job.log_path),
                "time": time.time(),
            }
        )
        say(f"[{worker}] {job.name}: attempt {job.attempt} failed: {reason}")


# --------------------------------------------------------------------------------------------------
# The training runner
# --------------------------------------------------------------------------------------------------


def read_objective(run_dir: Path, objective: str) -> tuple[float | None, dict[str, float]]:
    """The last logged value of `objective` in the run's metrics.jsonl, and every eval/*/loss of that record."""
    from megadoc_jax.metrics import read_metrics  # imports JAX: only the training runner needs it

    if not (run_dir / "metrics.jsonl").exists():
        return None, {}
    final = [r for r in read_metrics(run_dir).records if objective in r]
    if not final:
        return None, {}
    record = final[-1]
    losses = {k: float(v) for k, v in record.items() if k.startswith("eval/") and k.endswith("/loss")}
    return float(record[objective]), losses


def train_runner(spec: SweepSpec, *, python: str = sys.executable) -> Runner:
    config = str(Path(spec.config).absolute())

    def run(job: Job, lease: Lease) -> Result:
        command = [
            python,
            "-m",
            "megadoc_jax.train",
            "--config",
            config,
            *job.overrides,
            f"train.run_dir={job.run_dir}",
        ]
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        with job.log_path.open("ab") as log:
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            while process.poll() is None:
                if lease.lost.wait(0.2):
                    process.kill()
                    process.wait()
                    return Result(process.returncode, reason="lease taken over")
        if process.returncode == DIVERGED_EXIT_CODE:
            return Result(process.returncode, reason="non-finite loss")
        if process.returncode != 0:
            return Result(process.returncode, reason=f"exit code {process.returncode}: {log_tail(job.log_path)}")
        objective, losses = read_objective(job.run_dir, spec.objective)
        if objective is None:
            return Result(0, reason=f"{job.run_dir}/metrics.jsonl has no {spec.objective}")
        return Result(0, objective, losses)

    return run
