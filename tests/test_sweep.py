"""Sweeps: the search (planted objectives, ties, failures), the sweep file, and whole sweeps of real training
runs by worker processes, one of them killed mid-run."""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import signal
from pathlib import Path

import pytest
import yaml
from pipeline_stores import random_documents, write_store
from processes import start_python, wait_until

from megadoc_jax import files, metrics_log
from megadoc_jax.config import ConfigError
from megadoc_jax.sweep.search import Outcome, Space, search
from megadoc_jax.sweep.spec import Runs, load_spec

REPO = Path(__file__).resolve().parent.parent
PAPER_GRIDS = {
    "lr": (1e-3, 3e-3, 1e-2),
    "wd": (0.1, 0.4, 0.8, 1.6),
    "epochs": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
    "r": (0.5, 0.75, 0.9),
}


def drive(space: Space, objective, *, fails=frozenset()) -> tuple[object, collections.Counter]:
    """Runs what the search asks for, round after round, as workers would; counts runs per point."""
    outcomes, runs = {}, collections.Counter()
    while not (state := search(space, outcomes)).finished:
        assert state.to_run
        for point in state.to_run:
            runs[point] += 1
            outcomes[point] = Outcome.failed() if point in fails else Outcome.done(objective(point))
    return state, runs


def bowl(optimum: dict[str, float]):
    """A convex bowl over grid indices with its minimum (0) at `optimum`."""
    index = {name: {v: i for i, v in enumerate(values)} for name, values in PAPER_GRIDS.items()}
    target = {name: index[name][value] for name, value in optimum.items()}

    def f(point):
        return sum((index[n][v] - target[n]) ** 2 * (1 + k) for k, (n, v) in enumerate(zip(PAPER_GRIDS, point)))

    return f


def test_the_search_reaches_a_planted_interior_optimum_from_a_corner_running_each_point_once():
    optimum = {"lr": 3e-3, "wd": 0.8, "epochs": 8.0, "r": 0.75}
    corner = {name: values[0] for name, values in PAPER_GRIDS.items()}
    space = Space(PAPER_GRIDS, corner)
    state, runs = drive(space, bowl(optimum))
    assert space.named(state.best) == optimum and state.best_objective == 0
    assert set(runs.values()) == {1}  # no point run twice, though rounds share points
    centres = [r.centre for r in state.rounds]
    assert len(set(centres)) == len(centres)
    scores = [bowl(optimum)(c) for c in centres]
    assert all(b < a for a, b in zip(scores, scores[1:]))  # each move improves
    assert set(runs) == {p for r in state.rounds for p in r.candidates}
    first = state.rounds[0]
    assert len(first.candidates) == 5  # a corner: one neighbour per coordinate
    assert all(sum(a != b for a, b in zip(p, first.centre)) == 1 for p in first.candidates[1:])
    assert len(state.rounds[1].candidates) == 1 + 2 + 1 + 1 + 1  # one coordinate left its corner


def test_nine_runs_a_round_at_an_interior_centre_and_the_search_can_be_replayed():
    centre = {"lr": 3e-3, "wd": 0.4, "epochs": 4.0, "r": 0.75}
    space = Space(PAPER_GRIDS, centre)
    assert len(search(space, {}).to_run) == 9
    state, runs = drive(space, bowl({"lr": 1e-2, "wd": 0.4, "epochs": 4.0, "r": 0.75}))
    outcomes = {p: Outcome.done(bowl({"lr": 1e-2, "wd": 0.4, "epochs": 4.0, "r": 0.75})(p)) for p in runs}
    assert search(space, outcomes) == state  # a pure function of the results: any worker recomputes it


def test_ties_the_centre_stays_and_the_first_neighbour_wins():
    space = Space({"lr": (1.0, 2.0, 3.0), "wd": (1.0, 2.0, 3.0)}, {"lr": 2.0, "wd": 2.0})
    flat, runs = drive(space, lambda p: 1.0)
    assert flat.finished and flat.best == (2.0, 2.0) and len(flat.rounds) == 1 and sum(runs.values()) == 5
    # (1, 2) and (2, 3) tie below the centre: the first in candidate order (lr before wd, lower first) wins
    state, _ = drive(space, lambda p: 0.5 if p in {(1.0, 2.0), (2.0, 3.0)} else 1.0)
    assert state.rounds[0].moved_to == (1.0, 2.0)
    need_more = Space(space.grids, space.centre, min_improvement=0.6)
    assert drive(need_more, lambda p: 0.5 if p == (3.0, 2.0) else 1.0)[0].best == (2.0, 2.0)


def test_failed_runs_are_excluded_and_reported_and_diverged_runs_never_win():
    space = Space({"lr": (1.0, 2.0, 3.0, 4.0)}, {"lr": 1.0})
    # failing at 2.0 (for good) blocks the path along lr: the search stops at 1.0, reporting the failure
    state, _ = drive(space, lambda p: -p[0], fails={(2.0,)})
    assert state.finished and state.best == (1.0,) and state.failed == ((2.0,),)
    # a failed centre counts as +inf: the search moves to a finished neighbour
    state, _ = drive(Space(space.grids, {"lr": 2.0}), lambda p: 5.0, fails={(2.0,)})
    assert state.best == (1.0,) and state.failed == ((2.0,),)
    # a diverged neighbour (non-finite objective) is a result, and no improvement
    state, _ = drive(space, lambda p: math.nan if p == (2.0,) else 1.0)
    assert state.best == (1.0,) and state.failed == ()
    # a failed centre whose neighbours all failed too: finished, no best
    state, _ = drive(Space(space.grids, {"lr": 1.0}), lambda p: 1.0, fails={(1.0,), (2.0,)})
    assert state.finished and state.best is None


def test_pending_points_stay_to_run_until_they_have_an_outcome():
    space = Space({"lr": (1.0, 2.0, 3.0)}, {"lr": 1.0})
    state = search(space, {(1.0,): Outcome.done(1.0)})
    assert not state.finished and state.to_run == ((2.0,),) and state.best == (1.0,)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grids": {"lr": [1e-3, 3e-3], "beta": [1.0]}}, "grids.beta: unknown coordinate"),
        ({"centre": {"lr": 5e-3}}, r"centre.lr: 0.005 is not in grids.lr"),
        ({"grids": {"lr": [3e-3, 1e-3]}}, "grids.lr: values must increase"),
        ({"grids": {"r": [0.5, 1.0]}, "centre": {"r": 0.5}}, r"grids.r: 1.0 must be in \(0, 1\)"),
        ({"max_attempts": 0}, "max_attempts: must be >= 1"),
        ({"lease_seconds": "soon"}, "lease_seconds: expected a number"),
        ({"overrides": ["train.run_dir=x"]}, "overrides: 'train.run_dir=x': the sweep sets train.run_dir"),
        ({"overrides": ["optim.lr=1"]}, r"overrides: .optim.lr=1.: optim.lr is swept \(grids.lr\)"),
        ({"surprise": 1}, "unknown key surprise"),
        ({"sweep_dir": "gs://bucket/sweeps/a"}, "sweep_dir: must be a local or shared filesystem path, not a URL"),
    ],
)
def test_bad_sweep_files_name_the_file_and_the_key(tmp_path, change, message):
    raw = {"config": "base.yaml", "sweep_dir": "s", "centre": {"lr": 1e-3}, "grids": {"lr": [1e-3, 3e-3]}, **change}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"sweep file {path}: {message}"):
        load_spec(path)


def test_the_example_sweep_file_loads_and_its_runs_set_r_and_its_complement(tmp_path):
    spec = load_spec(REPO / "configs" / "sweeps" / "demo.yaml")
    runs = Runs(spec)
    runs.check()
    space = spec.space
    names = {runs.name(p) for p in itertools.product(*space.grids.values())}
    assert len(names) == math.prod(len(v) for v in space.grids.values())  # distinct run names
    point = space.point({**spec.centre, "r": 0.75})
    config = runs.config(point)
    weights = {s.name: s.weight for s in config.data.streams}
    assert weights == {"real": 0.25, "synthetic": 0.75}
    assert "-r0.75-" in runs.name(point)


# --------------------------------------------------------------------------------------------------
# Whole sweeps: worker processes training tiny models on tiny stores
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stores")
    return {
        name: write_store(root / name, random_documents(count, seed))
        for name, count, seed in (("real", 200, 0), ("synthetic", 200, 1), ("heldout", 40, 2))
    }


OBJECTIVE = "eval/heldout/partial/loss"  # train.eval_batches=1: the first batch of the held-out store


def write_sweep(tmp_path: Path, stores: dict[str, str], **fields) -> Path:
    streams = [{"name": "real", "store": stores["real"], "weight": 0.5}]
    streams.append({"name": "synthetic", "store": stores["synthetic"], "weight": 0.5})
    raw = {
        "config": str(REPO / "configs" / "tiny.yaml"),
        "sweep_dir": str(tmp_path / "sweep"),
        "objective": OBJECTIVE,
        "centre": {"lr": 1e-3},
        "grids": {"lr": [1e-3, 1e-2]},
        "overrides": [
            "model.vocab_size=100",
            f"data.streams={json.dumps(streams)}",
            f"data.eval_stores={{heldout: {stores['heldout']}}}",
            "data.seq_len=32",
            "train.batch_size=8",
            "train.steps=6",
            "train.log_every=1",
            "train.eval_batches=1",
            "train.checkpoints=false",
        ],
        "max_attempts": 2,
        "lease_seconds": 3,
        **fields,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_command(*args: str) -> list[str]:
    return ["-m", "megadoc_jax.sweep", *args]


def finish(process, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def check_finished_sweep(sweep_dir: Path) -> dict:
    """Every run the search met is done exactly once, and the table agrees with the files."""
    table = files.read_json(sweep_dir / "table.json")
    assert table["finished"] and table["best"] is not None
    runs = table["runs"]
    assert runs and all(row["status"] == "done" for row in runs), runs
    done = sorted(p.stem for p in (sweep_dir / "done").iterdir())
    assert done == sorted(row["run"] for row in runs)
    for row in runs:
        # Resume-aware: a kill after the final evaluation was logged makes the next attempt log it again.
        run_dir = sweep_dir / "runs" / row["run"]
        finals = [r for r in metrics_log.read_metrics(run_dir).records if OBJECTIVE in r]
        assert len(finals) == 1, (row["run"], finals)  # trained to the end once
        logged = sum(f'"{OBJECTIVE}"' in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())
        assert 1 <= logged <= row["attempts"], (row["run"], logged)
        assert row["objective"] == finals[0][OBJECTIVE]
    best = min(runs, key=lambda row: row["objective"])
    assert table["best"]["run"] == best["run"]  # one coordinate: the best run of all is where it stops
    return table


@pytest.mark.slow
def test_two_workers_finish_a_sweep_one_killed_mid_run_and_replaced_and_nothing_is_rerun(tmp_path, stores):
    """`run --workers 2`; once both train, one worker is SIGKILLed and a new worker started (the restart);
    the sweep finishes with every run done once, the killed run on its second attempt."""
    sweep_file = write_sweep(tmp_path, stores)
    sweep_dir = tmp_path / "sweep"

    def training(run: str) -> bool:
        path = sweep_dir / "runs" / run / "metrics.jsonl"
        return path.exists() and '"loss"' in path.read_text()

    def both_training() -> bool:
        runs = [p.name for p in (sweep_dir / "runs").glob("*")] if (sweep_dir / "runs").exists() else []
        return len(runs) == 2 and all(training(run) for run in runs)

    workers = start_python(sweep_command("run", str(sweep_file), "--workers", "2"), devices=1)
    wait_until(workers, both_training, timeout=400, what="the sweep's two workers")
    killed_run = sorted(p.name for p in (sweep_dir / "runs").glob("*"))[0]
    holder = files.read_json(sweep_dir / "claims" / killed_run / "1.lease")
    os.kill(holder["pid"], signal.SIGKILL)
    replacement = start_python(sweep_command("run", str(sweep_file)), devices=1)
    output = finish(workers)
    finish(replacement)

    table = check_finished_sweep(sweep_dir)
    assert "finished after" in output and f"best {table['best']['run']}" in output
    attempts = {row["run"]: row["attempts"] for row in table["runs"]}
    assert attempts.pop(killed_run) == 2  # the killed attempt counted; its successor finished the run
    assert set(attempts.values()) == {1}
    (row,) = [row for row in table["runs"] if row["run"] == killed_run]
    assert len(row["failures"]) == 1 and row["failures"][0].startswith("attempt 1: lease expired"), row
    assert row["worker"] != holder["worker"]
    metrics = (sweep_dir / "runs" / killed_run / "metrics.jsonl").read_text().splitlines()
    assert sum('"open"' in line for line in metrics) == 2  # the first attempt's training died with its worker

    claims_before = sorted(p.name for p in (sweep_dir / "claims").rglob("*"))
    again = finish(start_python(sweep_command("run", str(sweep_file)), devices=1), timeout=120)
    assert "attempt" not in again and sorted(p.name for p in (sweep_dir / "claims").rglob("*")) == claims_before
    status = finish(start_python(sweep_command("status", str(sweep_dir)), devices=1), timeout=60)
    assert table["best"]["run"] in status and "| done |" in status
    changed = write_sweep(tmp_path, stores, max_attempts=5)
    refused = start_python(sweep_command("run", str(changed)), devices=1)
    output, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "max_attempts = 2" in output
