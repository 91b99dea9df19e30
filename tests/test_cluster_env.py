"""SLURM's environment -> jax.distributed.initialize's arguments, against the layouts in tests/data/slurm/.

Pure (no JAX, no GPU): the placement of each task, the GPUs each process takes (never GPU 0 for all), the
hostlist and tasks-per-node formats, and the errors for missing or contradictory variables.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from megadoc_jax import cluster_env
from megadoc_jax.cluster_env import ClusterEnvError, expand_hostlist, expand_tasks_per_node, slurm_placement

LAYOUTS = Path(__file__).parent / "data" / "slurm"
LAYOUT_FILES = sorted(LAYOUTS.glob("*.json"))


def read_layout(name: str) -> dict:
    return json.loads((LAYOUTS / name).read_text())


def task_env(layout: dict, index: int) -> dict[str, str]:
    return {**layout["job"], **layout["tasks"][index]["task"]}


@pytest.mark.parametrize("path", LAYOUT_FILES, ids=[p.stem for p in LAYOUT_FILES])
def test_recorded_layouts_give_the_expected_placement(path):
    layout = json.loads(path.read_text())
    for task in layout["tasks"]:
        placement = slurm_placement({**layout["job"], **task["task"]})
        expected = dict(task["expected"], local_device_ids=tuple(task["expected"]["local_device_ids"]))
        assert dataclasses.asdict(placement) == expected, task["task"]


def test_layout_files_cover_the_issue_cases():
    assert {p.stem for p in LAYOUT_FILES} >= {
        "1node-8gpu-1proc",
        "2node-8gpu-per-node",
        "2node-8gpu-per-gpu-shared",
        "2node-8gpu-per-gpu-bound",
    }


def test_one_process_per_gpu_uses_each_gpu_of_a_node_exactly_once():
    # The pitfall: 8 processes on a node all opening GPU 0. Every task of the shared layout, generated here
    # from the recorded job variables, must take a different GPU.
    layout = read_layout("2node-8gpu-per-gpu-shared.json")
    for node in range(2):
        taken = []
        for local in range(8):
            env = {**layout["job"], "SLURM_PROCID": str(8 * node + local), "SLURM_LOCALID": str(local)}
            placement = slurm_placement({**env, "SLURM_NODEID": str(node)})
            taken.extend(placement.local_device_ids)
            assert placement.mode == "one process per GPU"
        assert sorted(taken) == list(range(8))


def test_cpu_run_assigns_no_devices_and_needs_no_gpu_variables():
    env = {
        "SLURM_JOB_ID": "5",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "MEGADOC_COORDINATOR_PORT": "4711",
    }
    placement = slurm_placement(env, gpus=False)
    assert (placement.coordinator_address, placement.process_id, placement.local_device_ids) == (
        "localhost:4711",
        1,
        None,
    )
    assert "process 1 of 2" in placement.describe()
    with pytest.raises(ClusterEnvError, match="CUDA_VISIBLE_DEVICES nor SLURM_GPUS_ON_NODE"):
        slurm_placement(env)


def test_one_node_needs_no_node_id_but_a_given_one_is_checked():
    env = {k: v for k, v in task_env(read_layout("1node-8gpu-1proc.json"), 0).items() if k != "SLURM_NODEID"}
    assert slurm_placement(env).node_index == 0
    with pytest.raises(ClusterEnvError, match="SLURM_NODEID='x' is not an integer"):
        slurm_placement({**env, "SLURM_NODEID": "x"})


def test_gpus_on_node_stands_in_for_cuda_visible_devices():
    layout = read_layout("1node-8gpu-1proc.json")
    env = {k: v for k, v in task_env(layout, 0).items() if k != "CUDA_VISIBLE_DEVICES"}
    assert slurm_placement(env).local_device_ids == tuple(range(8))
    assert slurm_placement({**env, "CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}).local_device_ids == (0, 1)


def test_default_port_follows_the_job_id_and_the_port_variable_overrides_it():
    env = task_env(read_layout("1node-8gpu-1proc.json"), 0)
    assert cluster_env.coordinator_port(env) == 61440 + 771203 % 4096
    assert cluster_env.coordinator_port({**env, "SLURM_JOB_ID": "771204"}) == 61440 + 771204 % 4096
    assert cluster_env.coordinator_port({**env, "MEGADOC_COORDINATOR_PORT": "1234"}) == 1234


def test_the_steps_own_task_counts_win_over_the_jobs():
    # A job submitted for one process per GPU (--ntasks-per-node=8) running a one-per-node step: the
    # tasks inherit the job's SLURM_NTASKS_PER_NODE and SLURM_TASKS_PER_NODE, the step variables are right.
    env = {**task_env(read_layout("2node-8gpu-per-node.json"), 1), "SLURM_NTASKS_PER_NODE": "8"}
    env["SLURM_TASKS_PER_NODE"] = "8(x2)"
    placement = slurm_placement(env)
    assert (placement.processes_per_node, placement.local_device_ids) == (1, tuple(range(8)))
    # Without step variables, the job's node list is read with the job's own counts.
    del env["SLURM_STEP_NODELIST"], env["SLURM_STEP_TASKS_PER_NODE"]
    with pytest.raises(ClusterEnvError, match="SLURM_NTASKS=2 but the tasks per node add up to 16"):
        slurm_placement(env)
    assert slurm_placement({**env, "SLURM_TASKS_PER_NODE": "1(x2)"}).num_nodes == 2


def test_ntasks_per_node_stands_in_for_missing_task_counts():
    env = {k: v for k, v in SHARED.items() if not k.endswith("TASKS_PER_NODE") or k == "SLURM_NTASKS_PER_NODE"}
    assert slurm_placement(env).local_device_ids == (5,)


def test_step_nodelist_wins_over_job_nodelist():
    env = task_env(read_layout("1node-8gpu-1proc.json"), 0)
    env = {**env, "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_STEP_NODELIST": "gpu03"}
    assert slurm_placement(env).coordinator_address.startswith("gpu03:")
    del env["SLURM_STEP_NODELIST"], env["SLURM_STEP_TASKS_PER_NODE"]
    env["SLURM_TASKS_PER_NODE"] = "1(x4)"
    env["SLURM_NTASKS"] = "4"
    assert slurm_placement(env).coordinator_address.startswith("gpu01:")


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("gpu07", ["gpu07"]),
        ("gpu[01-03,07],login5", ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]),
        ("n[008-011]", ["n008", "n009", "n010", "n011"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("a1,b[2],c", ["a1", "b2", "c"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("localhost", ["localhost"]),
    ],
)
def test_hostlist_expansion(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    "text, message",
    [
        ("gpu[01-03", "is not closed"),
        ("gpu01]", "without '\\['"),
        ("gpu[]", "empty brackets"),
        ("gpu[05-03]", "runs backwards"),
        ("gpu[1-x]", "not a number or a range"),
        ("a,,b", "empty host name"),
        ("", "is empty"),
        ("gpu[1-[2]]", "nested"),
    ],
)
def test_malformed_hostlists_are_refused(text, message):
    with pytest.raises(ClusterEnvError, match=message) as error:
        expand_hostlist(text, "SLURM_STEP_NODELIST")
    assert "SLURM_STEP_NODELIST" in str(error.value)


def test_tasks_per_node_expansion():
    assert expand_tasks_per_node("8(x2)") == [8, 8]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    for bad in ("8(2)", "x2", "0(x2)", "8(x0)", ""):
        with pytest.raises(ClusterEnvError, match="SLURM_TASKS_PER_NODE"):
            expand_tasks_per_node(bad, "SLURM_TASKS_PER_NODE")


def _with(env: dict, **changes) -> dict:
    """env with variables changed; a value of None removes the variable."""
    out = dict(env)
    for name, value in changes.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


SHARED = task_env(read_layout("2node-8gpu-per-gpu-shared.json"), 3)  # process 13: node 1, local 5


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"SLURM_NTASKS": None}, "SLURM_NTASKS is not set"),
        ({"SLURM_PROCID": None}, "SLURM_PROCID is not set"),
        ({"SLURM_PROCID": "two"}, "SLURM_PROCID='two' is not an integer"),
        ({"SLURM_PROCID": "16"}, "SLURM_PROCID=16 is not below SLURM_NTASKS=16"),
        ({"SLURM_LOCALID": None}, "SLURM_LOCALID is not set"),
        ({"SLURM_LOCALID": "8"}, "SLURM_LOCALID=8 but node 1 runs 8 tasks"),
        ({"SLURM_NODEID": None}, "SLURM_NODEID is not set"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 but SLURM_STEP_NODELIST lists 2 nodes"),
        (
            {"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None},
            "none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set",
        ),
        ({"SLURM_STEP_NODELIST": "gpu[007-009]"}, "describes 2 nodes but SLURM_STEP_NODELIST lists 3"),
        ({"SLURM_NTASKS": "14"}, "SLURM_NTASKS=14 but the tasks per node add up to 16"),
        (
            {"SLURM_STEP_TASKS_PER_NODE": None, "SLURM_NTASKS_PER_NODE": None},
            "SLURM_STEP_NODELIST is set but neither SLURM_STEP_TASKS_PER_NODE nor SLURM_NTASKS_PER_NODE",
        ),
        ({"SLURM_STEP_TASKS_PER_NODE": "8(x2"}, "SLURM_STEP_TASKS_PER_NODE='8(x2': '8(x2' is not N or N(xR)"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "8 tasks on this node but CUDA_VISIBLE_DEVICES='0,1,2' gives 3 GPUs"),
        ({"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES='': this task sees no GPU"),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "this task sees no GPU"),
        ({"CUDA_VISIBLE_DEVICES": None, "SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE='4' gives 4 GPUs"),
        ({"MEGADOC_COORDINATOR_PORT": "70000"}, "MEGADOC_COORDINATOR_PORT=70000 is not a TCP port"),
        ({"MEGADOC_COORDINATOR_PORT": "http"}, "MEGADOC_COORDINATOR_PORT='http' is not an integer"),
        ({"SLURM_JOB_ID": None}, "neither MEGADOC_COORDINATOR_PORT nor SLURM_JOB_ID"),
    ],
)
def test_malformed_environments_are_refused_naming_the_variable(changes, message):
    with pytest.raises(ClusterEnvError) as error:
        slurm_placement(_with(SHARED, **changes))
    assert message in str(error.value)


def test_the_module_imports_no_jax():
    # A pure module: checked in a fresh interpreter, since this test process has JAX loaded already.
    import subprocess
    import sys

    code = "import sys, megadoc_jax.cluster_env; print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
