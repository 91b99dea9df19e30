"""The training loop end to end on tiny models: loss falls, device counts agree, resume is exact.

In-process runs use a subset of the 8 fake CPU devices; runs that must be killed or span processes are
subprocesses of `python -m megadoc_jax.train`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from processes import distributed_env, free_port, slurm_env, start_python, wait_until

from generation import demo
from megadoc_jax import config as config_lib
from megadoc_jax import metrics, train

REPO = Path(__file__).resolve().parent.parent
STEPS = 12


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, str]:
    return {k: str(v) for k, v in demo.ensure_demo_stores(tmp_path_factory.mktemp("demo") / "data").items()}


def tiny_overrides(demo_data: dict[str, str], run_dir: Path, *extra: str) -> list[str]:
    return [
        "model.size=tiny",
        "model.vocab_size=2048",
        "model.compute_dtype=float32",
        f"data.tokenizer={demo_data['tokenizer']}",
        f"data.streams=[{{name: real, store: {demo_data['train']}, weight: 1.0}}]",
        f"data.eval_stores={{heldout: {demo_data['heldout']}}}",
        "data.seq_len=32",
        "optim.lr=1e-2",
        "optim.warmup_fraction=0.1",
        "train.batch_size=8",
        f"train.steps={STEPS}",
        "train.log_every=1",
        f"train.run_dir={run_dir}",
        *extra,
    ]


def tiny_config(demo_data, run_dir, *extra) -> config_lib.Config:
    return config_lib.load(None, tiny_overrides(demo_data, run_dir, *extra))


def train_losses(result: train.RunResult) -> list[float]:
    return [h["loss"] for h in result.history if "loss" in h]


def final_params(run_dir: Path) -> dict:
    checkpoints = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints")
    restored = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.StandardRestore())
    checkpoints.close()
    return restored["params"]


def assert_trees_equal(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def eight_device_run(demo_data, tmp_path_factory) -> train.RunResult:
    run_dir = tmp_path_factory.mktemp("eight")
    config = tiny_config(demo_data, run_dir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.checkpoint_every=6")
    return train.run(config, devices=jax.devices()), run_dir


def test_loss_falls_and_one_device_matches_eight(demo_data, tmp_path, eight_device_run):
    eight, _ = eight_device_run
    one = train.run(tiny_config(demo_data, tmp_path, "mesh.data=1"), devices=jax.devices()[:1])
    assert one.exit_code == 0 and one.step == STEPS
    losses_one, losses_eight = train_losses(one), train_losses(eight)
    assert len(losses_one) == STEPS
    assert losses_one[-1] < losses_one[0] - 0.5, losses_one
    np.testing.assert_allclose(losses_one, losses_eight, rtol=2e-4)
    for key in ("eval/heldout/loss", "eval/heldout/bpb"):  # the whole store (train.eval_batches 0), bytes
        np.testing.assert_allclose(one.history[-1][key], eight.history[-1][key], rtol=2e-4)


def test_evaluate_on_the_final_checkpoint_adds_no_second_figure_of_the_same_name(tmp_path, eight_device_run):
    from megadoc_jax import evaluate

    eight, run_dir = eight_device_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert evaluate.main(["--model", str(run), "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    records = [r for r in metrics.read_metrics(run).records if r["step"] == STEPS]
    logged = [key for r in records for key in r if key.startswith("eval/")]
    assert len(logged) == len(set(logged))  # each figure once at the final step
    loop, appended = records[-2], records[-1]  # the loop's final figures, then the evaluation's
    assert {"eval/heldout/loss", "eval/heldout/bpb"} <= set(loop) and "eval/heldout/loss" not in appended
    assert "eval/heldout/document/loss" in appended  # what the loop does not compute is appended
    (value,) = [json.loads(f.read_text()) for f in (tmp_path / "eval").glob("*.json")]
    (concat,) = [r for r in value["results"] if r["recipe"] == "concat"]
    np.testing.assert_allclose(concat["loss"], loop["eval/heldout/loss"], rtol=1e-6)
    np.testing.assert_allclose(concat["bpb"], loop["eval/heldout/bpb"], rtol=1e-6)


def test_restore_onto_a_different_device_count(demo_data, tmp_path, eight_device_run):
    eight, eight_dir = eight_device_run
    # Continue the 8-device run's step-6 checkpoint on 2 devices (another mesh), to the same end.
    run_dir = tmp_path / "two"
    (run_dir / "checkpoints").mkdir(parents=True)
    os.symlink(Path(eight_dir) / "checkpoints" / "6", run_dir / "checkpoints" / "6")
    two = train.run(tiny_config(demo_data, run_dir, "mesh.data=1", "mesh.fsdp=2"), devices=jax.devices()[:2])
    assert [h["step"] for h in two.history if "loss" in h] == list(range(7, STEPS + 1))
    np.testing.assert_allclose(train_losses(two), train_losses(eight)[6:], rtol=2e-4)


def run_train_process(overrides: list[str], devices: int, env: dict | None = None, **popen) -> subprocess.Popen:
    args = ["-m", "megadoc_jax.train", "--config", str(REPO / "configs" / "tiny.yaml"), *overrides]
    return start_python(args, devices=devices, env=env, **popen)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    reached = lambda: any(s >= step for s in logged_steps(run_dir))  # noqa: E731
    wait_until(process, reached, timeout=timeout, what=f"the training process (waiting for step {step})")


def test_kill_minus_nine_then_resume_equals_uninterrupted(demo_data, tmp_path):
    extra = ("mesh.data=1", "train.checkpoint_every=1", "train.keep_last=2")
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    kill_at = random.Random(os.environ.get("PYTEST_SEED", "0")).randint(2, STEPS - 2)

    process = run_train_process(tiny_overrides(demo_data, killed_dir, *extra), devices=1)
    wait_for_step(process, killed_dir, kill_at)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run_train_process(tiny_overrides(demo_data, killed_dir, *extra), devices=1)
    clean = run_train_process(tiny_overrides(demo_data, clean_dir, *extra), devices=1)
    outputs = [p.communicate(timeout=300)[0] for p in (resumed, clean)]
    assert resumed.returncode == 0 and clean.returncode == 0, outputs
    assert "resumed from step" in outputs[0] and "resumed from step" not in outputs[1]
    assert_trees_equal(final_params(killed_dir), final_params(clean_dir))


def test_sigterm_saves_and_exits_then_resumes(demo_data, tmp_path):
    extra = ("mesh.data=1", "train.checkpoint_every=100")
    process = run_train_process(tiny_overrides(demo_data, tmp_path, *extra), devices=1)
    wait_for_step(process, tmp_path, 3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "preemption requested" in output
    saved = ocp.CheckpointManager(tmp_path.absolute() / "checkpoints").latest_step()
    assert 3 <= saved < STEPS
    resumed = run_train_process(tiny_overrides(demo_data, tmp_path, *extra), devices=1)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"resumed from step {saved}" in output, output
    assert max(logged_steps(tmp_path)) == STEPS


def test_a_second_run_on_the_same_run_directory_is_refused(demo_data, tmp_path, capsys):
    from megadoc_jax import files

    # The first run's lock, as its process holds it (an flock on another open file conflicts, in one
    # process too); the real two-process case is the same kernel lock.
    tmp_path.mkdir(exist_ok=True)
    with files.lock_exclusive(tmp_path / train.RUN_LOCK):
        args = ["--config", str(REPO / "configs" / "tiny.yaml"), *tiny_overrides(demo_data, tmp_path, "mesh.data=8")]
        assert train.main(args) == 2
    assert f"{tmp_path}: another training run holds {train.RUN_LOCK}" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_non_finite_step_stops_and_keeps_last_good_checkpoint(demo_data, tmp_path):
    # An absurd learning rate overflows fp32 within a few steps.
    config = tiny_config(
        demo_data, tmp_path, "mesh.data=1", "optim.lr=1e30", "optim.clip_norm=0", "train.checkpoint_every=1"
    )
    result = train.run(config, devices=jax.devices()[:1])
    assert result.exit_code == 3
    assert result.step < STEPS
    params = final_params(tmp_path)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


LAUNCH_ENVIRONMENTS = {
    # MEGADOC_COORDINATOR and friends, as a hand launch sets them
    "explicit": lambda port, i: distributed_env(f"127.0.0.1:{port}", 2, i),
    # the variables srun sets in a 2-task step on one node (localhost), read by cluster_env
    "slurm": lambda port, i: slurm_env(port, 2, i),
}


@pytest.mark.slow
@pytest.mark.parametrize("launch", sorted(LAUNCH_ENVIRONMENTS))
def test_two_process_distributed_run_matches_one_process(demo_data, tmp_path, eight_device_run, launch):
    eight, _ = eight_device_run
    port = free_port()
    overrides = tiny_overrides(
        demo_data, tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.checkpoint_every=6"
    )
    processes = [run_train_process(overrides, devices=4, env=LAUNCH_ENVIRONMENTS[launch](port, i)) for i in range(2)]
    if launch == "slurm":  # scancel's SIGTERM reaching one task first: both must stop at one step
        wait_for_step(processes[0], tmp_path, 3, timeout=400)
        processes[1].send_signal(signal.SIGTERM)
    saved: list[list[str]] = []  # each process's saved step
    for i, p in enumerate(processes):
        output, _ = p.communicate(timeout=400)
        assert p.returncode == 0, output
        assert f"joined: process {i} of 2, 4 local devices of 8" in output, output
        if launch == "slurm":
            assert f"SLURM: process {i} of 2 on node 0 of 1 (2 processes per node)" in output, output
            saved.append(re.findall(r"preemption requested: saved step (\d+)", output))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    if launch == "slurm":  # through jax.distributed's preemption sync point, the same step on both
        assert saved[0] == saved[1] and len(saved[0]) == 1, saved
        step = saved[0][0]
        assert 3 <= int(step) < STEPS and max(logged_steps(tmp_path)) == int(step)
    np.testing.assert_allclose(losses, train_losses(eight)[: len(losses)], rtol=2e-4)
