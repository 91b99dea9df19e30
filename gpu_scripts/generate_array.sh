#!/bin/bash
# The generation stage on a GPU cluster (docs/gpu.md, docs/generation.md): a SLURM array job, each array
# task one worker of the job, one vLLM engine per GPU (or per --tensor-parallel GPUs).
#
#   sbatch --array=0-63 gpu_scripts/generate_array.sh --output /shared/gen/rephrase-g32 --num-workers 64 \
#       -- --input '/data/dclm/*.jsonl' --model /models/Llama-3.1-8B-Instruct --task rephrase -G 32
#   # when every task has finished (rerun a failed index with --array=I: it resumes from its ledger):
#   sbatch --array=0 --dependency=afterok:JOBID gpu_scripts/generate_array.sh \
#       --output /shared/gen/rephrase-g32 --merge /shared/gen/rephrase-g32-merged
#
# Options:
#   --output DIR          the job directory, on a filesystem every node shares (required)
#   --num-workers N       workers of the whole job (required for a worker: not taken from the array, so
#                         that rerunning one failed index with --array=I keeps the same sharding)
#   --tensor-parallel K   GPUs per vLLM engine (default 1; submit with --gpus-per-task=K as well)
#   --merge DIR           instead of a worker: check and merge the N workers' output into DIR
#   --python PATH         the interpreter of vLLM's environment (default: $MEGADOC_PYTHON, else python)
#   --dry-run             print the command instead of running it
# Everything after `--` goes to `python -m generation generate` (inputs, model, task, sampling, ...);
# `--backend vllm` is set here and can be overridden there (`--tensor-parallel` is vLLM's).
#
#SBATCH --job-name=megadoc-generate
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out

set -euo pipefail
# Self-contained (no shared helper file): sbatch runs a copy of this script from its spool directory.

die() {
  echo "gpu_scripts/generate_array.sh: $*" >&2
  exit 2
}

output=""
num_workers=""
tensor_parallel=1
merged=""
python="${MEGADOC_PYTHON:-python}"
dry_run=0
while (($#)); do
  case "$1" in
    --output | --num-workers | --tensor-parallel | --merge | --python)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --output) output="$2" ;;
        --num-workers) num_workers="$2" ;;
        --tensor-parallel) tensor_parallel="$2" ;;
        --merge) merged="$2" ;;
        --python) python="$2" ;;
      esac
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
    *) die "unknown option $1 (generate arguments go after --)" ;;
  esac
done
generate_args=("$@")

[[ -n "$output" ]] || die "--output DIR is required"

if [[ -n "$merged" ]]; then
  # merge finds the workers in OUTPUT and refuses unless all of them have finished.
  echo "megadoc generate: merging the workers of $output into $merged"
  command=("$python" -m generation merge "$output" --merged "$merged")
else
  [[ "$num_workers" =~ ^[1-9][0-9]*$ ]] || die "--num-workers must be a positive number, not '$num_workers'"
  [[ "$tensor_parallel" =~ ^[1-9][0-9]*$ ]] || die "--tensor-parallel must be a positive number, not '$tensor_parallel'"
  index="${SLURM_ARRAY_TASK_ID:-}"
  [[ "$index" =~ ^[0-9]+$ ]] || die "SLURM_ARRAY_TASK_ID='$index' is not an array index: submit with sbatch --array"
  ((index < num_workers)) || die "SLURM_ARRAY_TASK_ID=$index is not below --num-workers $num_workers: submit with --array=0-$((num_workers - 1))"
  gpus="${SLURM_GPUS_ON_NODE:-}"
  if [[ -n "$gpus" ]] && ((gpus < tensor_parallel)); then
    die "--tensor-parallel $tensor_parallel but SLURM_GPUS_ON_NODE=$gpus: submit with --gpus-per-task=$tensor_parallel"
  fi
  echo "megadoc generate: job ${SLURM_ARRAY_JOB_ID:-?} task $index, worker $index of $num_workers, $tensor_parallel GPU(s) per engine, on ${HOSTNAME:-?}"
  command=("$python" -m generation generate --backend vllm)
  # Only when above 1, so that a backend without this option can still be chosen after --.
  ((tensor_parallel == 1)) || command+=(--backend-option "tensor_parallel_size=$tensor_parallel")
  command+=(--output "$output" --num-workers "$num_workers" --worker-index "$index" --no-progress)
  command+=("${generate_args[@]}")
fi

if ((dry_run)); then
  printf '%q' "${command[0]}"
  printf ' %q' "${command[@]:1}"
  echo
  exit 0
fi
exec "${command[@]}"
