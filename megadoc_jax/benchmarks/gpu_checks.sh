#!/usr/bin/env bash
# The GPU figures of issue 13 on one H100/H200, in under 10 minutes, all output in one log file:
#
#   bash megadoc_jax/benchmarks/gpu_checks.sh OUT_DIR            # on the GPU machine, from the repo root
#   bash megadoc_jax/benchmarks/gpu_checks.sh OUT_DIR --dry-run  # print the checks and their time limits
#   bash megadoc_jax/benchmarks/gpu_checks.sh OUT_DIR --smoke    # the same checks at tiny sizes (CPU test)
#
# Checks, each under its own time limit so that one that hangs or fails does not eat the others' time:
#   1. gpu_train 300m at 4,096 tokens: tokens/s, TFLOP/s, MFU, its formula and the peak it divides by
#   2. gpu_train 1.5b at 4,096 tokens (the same figures)
#   3. attention_gpu compare: cudnn vs xla at 4k/16k/32k (time and agreement)
#   4. attention_gpu longest: the longest 300m window that trains on one card (searched up to 65,536)
#   5. the generation benchmark with the 300m shape: ours vs transformers' generate, tokens/s and ratio
# PYTHON (default: python) is the interpreter, with jax[cuda] and torch installed.
# Exit status: 0 when every check passed, else 1 (the log says which failed and why).
set -uo pipefail

usage() {
    echo "usage: $0 OUT_DIR [--dry-run | --smoke]" >&2
    exit 2
}

[[ $# -ge 1 && $# -le 2 ]] || usage
out_dir=$1
mode=${2:-run}
case $mode in
    run | --dry-run | --smoke) ;;
    *) usage ;;
esac
python=${PYTHON:-python}

if [[ $mode == --smoke ]]; then
    # Tiny sizes that run on a CPU in seconds; attention_gpu refuses to run without a GPU (a failed check).
    train_300m=(--sizes tiny --steps 2 --batch 2 model.vocab_size=128256)
    train_1_5b=(--sizes tiny --steps 2 --batch 2 model.vocab_size=128256 model.layers=1)
    attention_compare=(--part compare --lengths 256 --repeats 1)
    attention_longest=(--part longest --max-length 8192)
    generation=(--shape tiny --batch 2 --prompt-len 8 --new-tokens 4 --rounds 1 --no-phases)
else
    train_300m=(--sizes 300m --steps 20)
    train_1_5b=(--sizes 1.5b --steps 16)
    attention_compare=(--part compare --lengths 4096 16384 32768 --repeats 5)
    attention_longest=(--part longest --max-length 65536)
    generation=(--shape 300m --batch 32 --prompt-len 512 --new-tokens 256 --rounds 3)
fi

if [[ $mode != --dry-run ]]; then
    mkdir -p "$out_dir" || exit 2
fi
log="$out_dir/gpu_checks-$(date -u +%Y%m%dT%H%M%SZ).log"
failed=()
started=$SECONDS

# run_check NAME SECONDS ARGS...: `python -m ARGS` under a time limit, output appended to the log.
run_check() {
    local name=$1 limit=$2
    shift 2
    if [[ $mode == --dry-run ]]; then
        printf 'check %s: limit %ss: %s -m %s\n' "$name" "$limit" "$python" "$*"
        return
    fi
    {
        printf '\n=== %s (limit %ss, %s UTC): %s -m %s\n' "$name" "$limit" "$(date -u +%H:%M:%S)" "$python" "$*"
    } >>"$log"
    local start=$SECONDS status=0
    timeout --kill-after=15 "$limit" "$python" -m "$@" >>"$log" 2>&1 || status=$?
    local outcome="passed"
    if [[ $status -eq 124 || $status -eq 137 ]]; then
        outcome="TIMED OUT after ${limit}s"
    elif [[ $status -ne 0 ]]; then
        outcome="FAILED (exit $status)"
    fi
    [[ $outcome == passed ]] || failed+=("$name")
    printf '=== %s: %s in %ss\n' "$name" "$outcome" "$((SECONDS - start))" | tee -a "$log"
}

if [[ $mode != --dry-run ]]; then
    {
        echo "gpu_checks.sh $mode, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
        "$python" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
    } >>"$log"
    echo "log: $log"
fi

# Limits sum to 595 s, under the 10 minutes (typical runs finish well inside them).
run_check train-300m 120 megadoc_jax.benchmarks.gpu_train "${train_300m[@]}"
run_check train-1.5b 160 megadoc_jax.benchmarks.gpu_train "${train_1_5b[@]}"
run_check attention-compare 45 megadoc_jax.benchmarks.attention_gpu "${attention_compare[@]}"
run_check attention-longest 120 megadoc_jax.benchmarks.attention_gpu "${attention_longest[@]}"
run_check generation-300m 150 megadoc_jax.benchmarks.generation "${generation[@]}"

if [[ $mode == --dry-run ]]; then
    exit 0
fi
echo "total ${SECONDS}s since the start ($((SECONDS - started))s of checks); log: $log" | tee -a "$log"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed: ${failed[*]}" | tee -a "$log"
    exit 1
fi
echo "all checks passed" | tee -a "$log"
