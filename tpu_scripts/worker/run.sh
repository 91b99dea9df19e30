#!/usr/bin/env bash
# Runs on each TPU VM worker (tpu.sh train / evaluate / run-until-done start it on all of them at once): the
# job's output goes to a log file, and also to stdout on the first worker of the first slice, so that the
# launching terminal shows one worker's log rather than all of them interleaved.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: run.sh --log FILE --venv DIR -- COMMAND [ARG...]
  --log FILE  the job's output (stdout and stderr), replaced at each run
  --venv DIR  the virtual environment whose bin/ comes first on PATH
USAGE
}

log=
venv=
while (($#)); do
    case $1 in
        --log) log=${2:?--log needs a value}; shift 2 ;;
        --venv) venv=${2:?--venv needs a value}; shift 2 ;;
        --) shift; break ;;
        -h | --help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
if [[ -z $log || -z $venv || $# -eq 0 ]]; then
    usage >&2
    exit 2
fi

# The metadata server of the TPU VM: what jax.distributed reads too (jax/_src/clusters/cloud_tpu_cluster.py).
metadata() {  # KEY
    curl -sf -H 'Metadata-Flavor: Google' \
        "${MEGADOC_METADATA_URL:-http://metadata.google.internal/computeMetadata/v1/instance/attributes}/$1"
}

# Worker 0 of slice 0. Off a TPU VM (no metadata server) the one process is the first.
is_first_worker() {
    local worker slice
    worker=$(metadata agent-worker-number) || return 0
    slice=$(metadata tpu-env | sed -n "s/^MEGASCALE_SLICE_ID: *'\{0,1\}\([0-9]*\)'\{0,1\}$/\1/p") || slice=
    [[ ${worker:-0} == 0 && ${slice:-0} == 0 ]]
}

mkdir -p "$(dirname "$log")"
PATH="$(cd "$venv" && pwd)/bin:$PATH"
export PATH
if is_first_worker; then
    "$@" 2>&1 | tee "$log"
    exit "${PIPESTATUS[0]}"
fi
"$@" >"$log" 2>&1
