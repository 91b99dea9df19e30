#!/bin/bash
# Training on GPUs under SLURM (docs/gpu.md): `python -m megadoc_jax.train` as one srun step.
#
#   sbatch gpu_scripts/train.sh [OPTIONS] [-- TRAIN_ARGS...]
#
#   one node, all its GPUs, one process (the defaults below):
#     sbatch gpu_scripts/train.sh -- --config runs/300m-h100.yaml
#   several nodes, one process per node (each takes all its node's GPUs):
#     sbatch --nodes=2 gpu_scripts/train.sh -- --config runs/300m-multinode.yaml
#   several nodes, one process per GPU (the job must have as many tasks per node as GPUs):
#     sbatch --nodes=2 --ntasks-per-node=8 gpu_scripts/train.sh --process-per gpu -- --config ...
#
# Options:
#   --process-per node|gpu  one process per node (default) or one per GPU
#   --port N                coordinator port (MEGADOC_COORDINATOR_PORT; default: from the job id)
#   --python PATH           the interpreter (default: $MEGADOC_PYTHON, else python)
#   --dry-run               print the commands instead of running them
# Everything after `--` goes to `python -m megadoc_jax.train`. Command-line sbatch options override the
# #SBATCH lines. The training process saves a checkpoint on SIGTERM: --signal sends one to the step
# 120 s before the time limit, and a requeued job resumes from that checkpoint.
#
#SBATCH --job-name=megadoc-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail
# Self-contained (no shared helper file): sbatch runs a copy of this script from its spool directory.

die() {
  echo "gpu_scripts/train.sh: $*" >&2
  exit 2
}

process_per=node
port=""
python="${MEGADOC_PYTHON:-python}"
dry_run=0
while (($#)); do
  case "$1" in
    --process-per)
      (($# >= 2)) || die "--process-per needs a value (node or gpu)"
      process_per="$2"
      shift 2
      ;;
    --port)
      (($# >= 2)) || die "--port needs a value"
      port="$2"
      shift 2
      ;;
    --python)
      (($# >= 2)) || die "--python needs a value"
      python="$2"
      shift 2
      ;;
    --dry-run)
      dry_run=1
      shift
      ;;
    --)
      shift
      break
      ;;
    *) die "unknown option $1 (training arguments go after --)" ;;
  esac
done
train_args=("$@")

[[ "$process_per" == node || "$process_per" == gpu ]] || die "--process-per must be node or gpu, not '$process_per'"
[[ -z "$port" || "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, not '$port'"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "SLURM_JOB_ID is not set: submit this script with sbatch"
nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "SLURM_JOB_NUM_NODES='$nodes' is not a node count"

# The GPUs of each node: SLURM_GPUS_ON_NODE, else the entries of CUDA_VISIBLE_DEVICES.
gpus="${SLURM_GPUS_ON_NODE:-}"
if [[ -z "$gpus" && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  gpus="${#visible[@]}"
fi
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "no GPUs in this job (SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}', CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'): request them with --gpus-per-node"

if [[ "$process_per" == gpu ]]; then
  tasks_per_node="$gpus"
  if [[ "${SLURM_NTASKS_PER_NODE:-}" != "$gpus" ]]; then
    die "--process-per gpu needs $gpus tasks per node but the job has SLURM_NTASKS_PER_NODE='${SLURM_NTASKS_PER_NODE:-}': submit with --ntasks-per-node=$gpus"
  fi
else
  tasks_per_node=1
fi
processes=$((nodes * tasks_per_node))

# One process in all: a plain single-process run (no jax.distributed); otherwise every task reads its
# place from SLURM's variables (MEGADOC_DISTRIBUTED=slurm, megadoc_jax/cluster_env.py).
launch=(srun "--nodes=$nodes" "--ntasks-per-node=$tasks_per_node" --kill-on-bad-exit=1)
environment=()
if ((processes > 1)); then
  environment+=(MEGADOC_DISTRIBUTED=slurm)
  [[ -z "$port" ]] || environment+=("MEGADOC_COORDINATOR_PORT=$port")
fi
command=(env "${environment[@]}" "${launch[@]}" "$python" -m megadoc_jax.train "${train_args[@]}")

echo "megadoc train: job $SLURM_JOB_ID, $nodes node(s) x $gpus GPU(s), one process per $process_per, $processes process(es)"
if ((dry_run)); then
  printf '%q' "${command[0]}"
  printf ' %q' "${command[@]:1}"
  echo
  exit 0
fi
set +e
"${command[@]}"
status=$?
set -e
echo "megadoc train: srun exited with status $status"
exit "$status"
