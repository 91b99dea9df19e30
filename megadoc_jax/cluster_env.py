"""Where this process sits in a SLURM job: the arguments of `jax.distributed.initialize`, from the environment.

Pure: reads a mapping of environment variables, imports no JAX, so that recorded environments test it.

SLURM sets, for every task of an `srun` step (srun man page, "OUTPUT ENVIRONMENT VARIABLES", Slurm 22.05):
SLURM_NTASKS (tasks in the step), SLURM_PROCID (this task, 0..NTASKS-1), SLURM_LOCALID (this task on its
node), SLURM_NODEID (this node), SLURM_STEP_NODELIST and SLURM_JOB_NODELIST (hostlists such as
`gpu[01-03,07],login5`), SLURM_STEP_TASKS_PER_NODE and SLURM_TASKS_PER_NODE (the tasks of each node of
the step's and the job's list, such as `8(x2)` or `2(x3),1`), SLURM_GPUS_ON_NODE (GPUs of the step on
this node) and CUDA_VISIBLE_DEVICES (the GPUs this task may use). By default a step gets all the job's
GPUs and every task sees all of them; `--gpus-per-task` binds each task to its own (--gpu-bind).

Device assignment, the point of this module: a GPU process must be told which local GPUs are its own.
- one task on the node: the process takes every GPU it sees (one process per node);
- several tasks on the node (one process per GPU): the task sees either its own GPU only (srun bound it,
  `--gpus-per-task=1`: CUDA_VISIBLE_DEVICES has one entry, so its GPU is local device 0), or every GPU of
  the node, one per task (then its GPU is local device SLURM_LOCALID). Left to itself, every such process
  would open GPU 0 (or all of them), the pitfall of one-process-per-GPU JAX jobs.
Anything else (3 tasks on 8 visible GPUs) is refused with the variables that disagree.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

# Each node list with the tasks-per-node variable in its order; the step's first (srun's own step).
NODELIST_AND_TASKS_VARIABLES = (
    ("SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE"),
    ("SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE"),
    ("SLURM_NODELIST", "SLURM_TASKS_PER_NODE"),
)
PORT_VARIABLE = "MEGADOC_COORDINATOR_PORT"
# Without MEGADOC_COORDINATOR_PORT the port is derived from the job id, so that two jobs whose first node
# is the same do not collide; the range is the top 4096 ports, the range JAX's own SLURM detection uses.
DEFAULT_PORT_BASE = 65536 - 4096
DEFAULT_PORT_SPAN = 4096


class ClusterEnvError(ValueError):
    """The scheduler's environment is missing a variable or contradicts itself; the message names them."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """The arguments of jax.distributed.initialize for this process, and how they were arrived at."""

    coordinator_address: str  # host:port of process 0's node
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # None: no GPUs to assign (a CPU run), JAX takes its devices
    processes_per_node: int  # on this node
    node_index: int
    num_nodes: int

    @property
    def mode(self) -> str:
        if self.processes_per_node == 1:
            return "one process per node"
        if self.local_device_ids is None:  # a CPU run: no GPUs to speak of
            return f"{self.processes_per_node} processes per node"
        return "one process per GPU"

    def describe(self) -> str:
        devices = "all local devices" if self.local_device_ids is None else f"GPUs {list(self.local_device_ids)}"
        return (
            f"process {self.process_id} of {self.num_processes} on node {self.node_index} of {self.num_nodes} "
            f"({self.mode}), coordinator {self.coordinator_address}, {devices}"
        )


# --------------------------------------------------------------------------------------------------
# SLURM's compact formats
# --------------------------------------------------------------------------------------------------


def _split_top_level(text: str, variable: str) -> list[str]:
    """`a[1,2],b` -> ['a[1,2]', 'b']: commas inside brackets do not separate hosts."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ClusterEnvError(f"{variable}={text!r}: nested '[' at character {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ClusterEnvError(f"{variable}={text!r}: ']' without '[' at character {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ClusterEnvError(f"{variable}={text!r}: '[' is not closed")
    items.append(text[start:])
    if any(not item for item in items):
        raise ClusterEnvError(f"{variable}={text!r}: an empty host name")
    return items


def _expand_range_list(ranges: str, text: str, variable: str) -> list[str]:
    """`01-03,7` -> ['01', '02', '03', '7']; a range keeps the width of its first bound (zero padding)."""
    out = []
    for part in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ClusterEnvError(f"{variable}={text!r}: {part!r} is not a number or a range N-M")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ClusterEnvError(f"{variable}={text!r}: the range {part!r} runs backwards")
        width = len(low)
        out.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return out


def expand_hostlist(text: str, variable: str = "hostlist") -> list[str]:
    """SLURM's hostlist syntax: `gpu[01-03,07],login5` -> gpu01 gpu02 gpu03 gpu07 login5.

    A name may have several bracket groups (`rack[1-2]-n[1-2]`: every combination, as SLURM expands it).
    """
    text = text.strip()
    if not text:
        raise ClusterEnvError(f"{variable} is empty")
    hosts: list[str] = []
    for item in _split_top_level(text, variable):
        # re.split with one group alternates literal text and bracket contents: [lit, ranges, lit, ...]
        pieces = re.split(r"\[([^\]]*)\]", item)
        names = [pieces[0]]
        for ranges, literal in zip(pieces[1::2], pieces[2::2]):
            if not ranges:
                raise ClusterEnvError(f"{variable}={text!r}: empty brackets in {item!r}")
            numbers = _expand_range_list(ranges, text, variable)
            names = [name + number + literal for name in names for number in numbers]
        hosts.extend(names)
    return hosts


def expand_tasks_per_node(text: str, variable: str = "tasks per node") -> list[int]:
    """SLURM's tasks-per-node syntax: `8(x2),4` -> [8, 8, 4]."""
    counts: list[int] = []
    for part in text.strip().split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ClusterEnvError(f"{variable}={text!r}: {part!r} is not N or N(xR)")
        count, repeat = int(match.group(1)), int(match.group(2) or 1)
        if count < 1 or repeat < 1:
            raise ClusterEnvError(f"{variable}={text!r}: {part!r} has a zero count")
        counts.extend([count] * repeat)
    return counts


def visible_gpus(value: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES as a list of entries (indices or GPU-UUIDs); SLURM's `NoDevFiles` is none."""
    entries = [v.strip() for v in value.split(",") if v.strip()]
    return [] if entries == ["NoDevFiles"] else entries


# --------------------------------------------------------------------------------------------------
# The placement
# --------------------------------------------------------------------------------------------------


def _integer(env: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    value = env.get(name)
    if value is None or not value.strip():
        raise ClusterEnvError(f"{name} is not set: is this process a task of an srun step?")
    try:
        number = int(value)
    except ValueError:
        raise ClusterEnvError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise ClusterEnvError(f"{name}={value!r} must be at least {minimum}")
    return number


def coordinator_port(env: Mapping[str, str]) -> int:
    if env.get(PORT_VARIABLE, "").strip():
        port = _integer(env, PORT_VARIABLE, minimum=1)
        if port > 65535:
            raise ClusterEnvError(f"{PORT_VARIABLE}={port} is not a TCP port (1..65535)")
        return port
    if not env.get("SLURM_JOB_ID", "").strip():
        raise ClusterEnvError(f"neither {PORT_VARIABLE} nor SLURM_JOB_ID is set: no coordinator port")
    return DEFAULT_PORT_BASE + _integer(env, "SLURM_JOB_ID") % DEFAULT_PORT_SPAN


def _nodes_and_tasks(env: Mapping[str, str]) -> tuple[str, list[str], list[int]]:
    """The node list, and the tasks on each of its nodes, checked against each other.

    SLURM_TASKS_PER_NODE follows the order of SLURM_JOB_NODELIST (srun man page), and the step's count
    describes the step's nodes, so each list is read with its own count. SLURM_NTASKS_PER_NODE is
    only a fallback: srun reads it as an input (--ntasks-per-node), so a task may inherit the job's value
    while its own step runs another count.
    """
    present = [pair for pair in NODELIST_AND_TASKS_VARIABLES if env.get(pair[0], "").strip()]
    if not present:
        names = ", ".join(nodelist for nodelist, _ in NODELIST_AND_TASKS_VARIABLES)
        raise ClusterEnvError(f"none of {names} is set: is this process a task of an srun step?")
    nodelist_variable, tasks_variable = present[0]
    nodes = expand_hostlist(env[nodelist_variable], nodelist_variable)
    if env.get(tasks_variable, "").strip():
        counts = expand_tasks_per_node(env[tasks_variable], tasks_variable)
        if len(counts) != len(nodes):
            raise ClusterEnvError(
                f"{tasks_variable}={env[tasks_variable]!r} describes {len(counts)} nodes but "
                f"{nodelist_variable} lists {len(nodes)}"
            )
    elif env.get("SLURM_NTASKS_PER_NODE", "").strip():
        counts = [_integer(env, "SLURM_NTASKS_PER_NODE", minimum=1)] * len(nodes)
    else:
        raise ClusterEnvError(f"{nodelist_variable} is set but neither {tasks_variable} nor SLURM_NTASKS_PER_NODE")
    return nodelist_variable, nodes, counts


def _local_device_ids(env: Mapping[str, str], tasks_here: int, local_id: int) -> tuple[int, ...]:
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        source, count = "CUDA_VISIBLE_DEVICES", len(visible_gpus(env["CUDA_VISIBLE_DEVICES"]))
    elif env.get("SLURM_GPUS_ON_NODE", "").strip():
        source, count = "SLURM_GPUS_ON_NODE", _integer(env, "SLURM_GPUS_ON_NODE")
    else:
        raise ClusterEnvError(
            "neither CUDA_VISIBLE_DEVICES nor SLURM_GPUS_ON_NODE is set, so this task's GPUs are unknown: "
            "request GPUs (--gpus-per-node, --gpus-per-task) or, for a CPU run, set JAX_PLATFORMS=cpu"
        )
    if count == 0:
        raise ClusterEnvError(f"{source}={env[source]!r}: this task sees no GPU")
    if tasks_here == 1:
        return tuple(range(count))
    if count == 1:  # srun bound this task to its own GPU, which is therefore local device 0
        return (0,)
    if count == tasks_here:
        return (local_id,)
    raise ClusterEnvError(
        f"{tasks_here} tasks on this node but {source}={env[source]!r} gives {count} GPUs: one process per GPU "
        f"needs each task to see only its own GPU (srun --gpus-per-task=1) or all of them, one per task "
        f"(--ntasks-per-node equal to the GPUs per node)"
    )


def slurm_placement(env: Mapping[str, str], *, gpus: bool = True) -> Placement:
    """This task's place in the job, checked for consistency. `gpus=False` (a CPU run) assigns no devices."""
    ntasks = _integer(env, "SLURM_NTASKS", minimum=1)
    process_id = _integer(env, "SLURM_PROCID")
    if process_id >= ntasks:
        raise ClusterEnvError(f"SLURM_PROCID={process_id} is not below SLURM_NTASKS={ntasks}")
    nodelist_variable, nodes, tasks = _nodes_and_tasks(env)
    if sum(tasks) != ntasks:
        raise ClusterEnvError(f"SLURM_NTASKS={ntasks} but the tasks per node add up to {sum(tasks)} ({tasks})")
    # One node needs no SLURM_NODEID (a hand-made environment may leave it out); several do.
    node_index = _integer(env, "SLURM_NODEID") if len(nodes) > 1 or env.get("SLURM_NODEID", "").strip() else 0
    if node_index >= len(nodes):
        raise ClusterEnvError(f"SLURM_NODEID={node_index} but {nodelist_variable} lists {len(nodes)} nodes")
    tasks_here = tasks[node_index]
    local_id = _integer(env, "SLURM_LOCALID")
    if local_id >= tasks_here:
        raise ClusterEnvError(f"SLURM_LOCALID={local_id} but node {node_index} runs {tasks_here} tasks")
    return Placement(
        coordinator_address=f"{nodes[0]}:{coordinator_port(env)}",
        num_processes=ntasks,
        process_id=process_id,
        local_device_ids=_local_device_ids(env, tasks_here, local_id) if gpus else None,
        processes_per_node=tasks_here,
        node_index=node_index,
        num_nodes=len(nodes),
    )
