#!/usr/bin/env bash
# megadoc-jax on Cloud TPU through gcloud: create a TPU VM slice or a queued resource, install the project on
# every worker, run training or evaluation on all workers, follow and collect logs, stop and delete; and
# run-until-done, which survives preemption. Every subcommand takes --dry-run. docs/tpu.md has the details.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT_ROOT=$(dirname "$SCRIPTS_DIR")
# shellcheck source=lib/common.sh
source "$SCRIPTS_DIR/lib/common.sh"
# shellcheck source=lib/slice.sh
source "$SCRIPTS_DIR/lib/slice.sh"
# shellcheck source=lib/job.sh
source "$SCRIPTS_DIR/lib/job.sh"
# shellcheck source=lib/loop.sh
source "$SCRIPTS_DIR/lib/loop.sh"

usage() {
    cat <<'USAGE'
usage: tpu_scripts/tpu.sh SUBCOMMAND --name NAME --zone ZONE [options] [-- ARGS...]

subcommands:
  create          create the TPU VM (or, with --queued, the queued resource) and wait until it is READY (ACTIVE)
  wait            wait until the slice is READY (ACTIVE)
  status          print the slice's state (NOT_FOUND when describe fails)
  install         copy a source tarball of this checkout to every worker and pip install '.[tpu]' in a venv there
  train           run python -m megadoc_jax.train --config CONFIG [train.run_dir=RUN_DIR] [ARGS...] on all workers
  evaluate        run python -m megadoc_jax.evaluate ARGS... on all workers
  logs            follow the job's log on worker 0
  collect-logs    copy every worker's job log into --log-dir
  stop            stop the TPU VM (a queued resource cannot be stopped: delete it)
  delete          delete the TPU VM, or the queued resource with --force (its VMs too)
  run-until-done  create / install / train, relaunching after a preemption or failure until training exits 0

the slice:
  --name NAME               TPU VM name or queued resource id (required)
  --zone ZONE               zone, e.g. us-west4-a (required)
  --project PROJECT         Google Cloud project (default: gcloud's configured project)
  --queued                  a queued resource (gcloud compute tpus queued-resources) instead of a TPU VM
  --accelerator-type TYPE   e.g. v5litepod-16, v4-32, v5p-64, v6e-16 (create, run-until-done)
  --version VERSION         runtime version (default from the type: v2-alpha-tpuv6e, v2-alpha-tpuv5,
                            v2-alpha-tpuv5-lite, tpu-ubuntu2204-base for v4 and older)
  --provisioning MODEL      on-demand (default), spot or reserved
  --node-count N            with --queued: N slices (multislice, N > 1), TPU VMs PREFIX-0 .. PREFIX-(N-1)
  --node-prefix PREFIX      with --node-count: the prefix of the slices' names (default NAME)
  --node-id ID              with --queued and one slice: the TPU VM's name (default NAME)
  --create-flag FLAG        one more flag for the create command, e.g. --create-flag=--internal-ips (repeatable)
  --poll-seconds S          seconds between state checks while waiting (default 30)
  --wait-timeout S          give up waiting after S seconds (default 0: no limit; a queued resource can wait long)

the job:
  --config CONFIG           experiment config, relative to the checkout (train, run-until-done)
  --run-dir URL             run directory: train.run_dir=URL (run-until-done: required, gs://..., so that
                            checkpoints outlive the VMs)
  --env KEY=VALUE           one more environment variable of the job (repeatable; MEGADOC_DISTRIBUTED=auto is set)
  --job-name NAME           names the job's log on the workers, megadoc-logs/NAME.log (default train or evaluate)
  --python PYTHON           interpreter of the workers' venv (default python3.11)
  --tarball FILE            copy this source tarball instead of building one of the checkout
  --setup COMMAND           run COMMAND on every worker in the unpacked source after each install, e.g.
                            fetch the data: --setup 'gcloud storage cp -r gs://BUCKET/data .'
  --log-dir DIR             local directory for logs and the attempt log (default tpu_logs/NAME)
  --workers N               workers per slice for collect-logs (default: read with describe)
  -- ARGS...                train: config overrides key=value; evaluate: the evaluate command's arguments

run-until-done:
  --max-attempts N          job launches in all (default 10)
  --max-job-failures N      failures of the job on a healthy slice before giving up (default 2)
  --retry-seconds S         pause before each attempt after the first (default 60)
  --attempt-log FILE        one line per attempt (default LOG_DIR/attempts.log)

  --dry-run                 print the gcloud commands, one per line, shell-quoted, and run none
  -h, --help                this text
USAGE
}

# Options, with their defaults.
NAME='' ZONE='' PROJECT='' QUEUED=0 ACCELERATOR_TYPE='' RUNTIME_VERSION='' PROVISIONING=on-demand
NODE_COUNT=1 NODE_PREFIX='' NODE_ID='' POLL_SECONDS=30 WAIT_TIMEOUT=0
CONFIG='' RUN_DIR='' SETUP='' JOB_NAME='' PYTHON=python3.11 TARBALL='' LOG_DIR='' WORKERS=''
MAX_ATTEMPTS=10 MAX_JOB_FAILURES=2 RETRY_SECONDS=60 ATTEMPT_LOG='' DRY_RUN=0
CREATE_FLAGS=() JOB_ENV=() JOB_EXTRA=() LOCATION=() JOB_ARGV=()
DRY_RUN_STATE=READY STATE=''

parse_options() {
    local option value
    while (($#)); do
        option=$1
        case $option in
            --) shift; JOB_EXTRA=("$@"); return ;;
            -h | --help) usage; exit 0 ;;
            --dry-run) DRY_RUN=1; shift; continue ;;
            --queued) QUEUED=1; shift; continue ;;
            --*=*) value=${option#*=}; option=${option%%=*}; shift ;;
            --*)
                if (($# < 2)) || [[ $2 == --* ]]; then
                    die "$option needs a value (write $option=VALUE for a value that starts with --)"
                fi
                value=$2
                shift 2
                ;;
            *) die "unexpected argument '$option' (config overrides and evaluate arguments go after --)" ;;
        esac
        case $option in
            --name) NAME=$value ;;
            --zone) ZONE=$value ;;
            --project) PROJECT=$value ;;
            --accelerator-type) ACCELERATOR_TYPE=$value ;;
            --version) RUNTIME_VERSION=$value ;;
            --provisioning) PROVISIONING=$value ;;
            --node-count) NODE_COUNT=$value ;;
            --node-prefix) NODE_PREFIX=$value ;;
            --node-id) NODE_ID=$value ;;
            --create-flag) CREATE_FLAGS+=("$value") ;;
            --poll-seconds) POLL_SECONDS=$value ;;
            --wait-timeout) WAIT_TIMEOUT=$value ;;
            --config) CONFIG=$value ;;
            --run-dir) RUN_DIR=$value ;;
            --env) JOB_ENV+=("$value") ;;
            --job-name) JOB_NAME=$value ;;
            --python) PYTHON=$value ;;
            --tarball) TARBALL=$value ;;
            --setup) SETUP=$value ;;
            --log-dir) LOG_DIR=$value ;;
            --workers) WORKERS=$value ;;
            --max-attempts) MAX_ATTEMPTS=$value ;;
            --max-job-failures) MAX_JOB_FAILURES=$value ;;
            --retry-seconds) RETRY_SECONDS=$value ;;
            --attempt-log) ATTEMPT_LOG=$value ;;
            *) die "unknown option $option (see tpu.sh --help)" ;;
        esac
    done
}

validate_options() {
    require_option --name "$NAME" "the TPU VM or queued resource"
    set_location
    case $PROVISIONING in
        on-demand | spot | reserved) ;;
        *) die "--provisioning must be on-demand, spot or reserved, got '$PROVISIONING'" ;;
    esac
    require_positive_int --node-count "$NODE_COUNT"
    require_non_negative_int --poll-seconds "$POLL_SECONDS"
    require_non_negative_int --wait-timeout "$WAIT_TIMEOUT"
    require_non_negative_int --retry-seconds "$RETRY_SECONDS"
    require_positive_int --max-attempts "$MAX_ATTEMPTS"
    require_positive_int --max-job-failures "$MAX_JOB_FAILURES"
    if [[ -n $WORKERS ]]; then require_positive_int --workers "$WORKERS"; fi
    if ((!QUEUED)) && [[ $NODE_COUNT != 1 || -n $NODE_PREFIX || -n $NODE_ID ]]; then
        die "--node-count, --node-prefix and --node-id are for a queued resource: add --queued"
    fi
    if ((NODE_COUNT == 1)) && [[ -n $NODE_PREFIX ]]; then
        die "--node-prefix names the slices of a multislice: it needs --node-count N (N > 1)"
    fi
    if ((NODE_COUNT > 1)) && [[ -n $NODE_ID ]]; then
        die "--node-id names a single slice; a multislice's slices are named by --node-prefix"
    fi
    local pair
    for pair in "${JOB_ENV[@]}"; do
        if ! [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then die "--env takes KEY=VALUE, got '$pair'"; fi
    done
    LOG_DIR=${LOG_DIR:-tpu_logs/$NAME}
    ATTEMPT_LOG=${ATTEMPT_LOG:-$LOG_DIR/attempts.log}
}

main() {
    if (($# == 0)); then
        usage >&2
        exit 2
    fi
    SUBCOMMAND=$1
    shift
    case $SUBCOMMAND in
        -h | --help) usage; exit 0 ;;
        create | wait | status | install | train | evaluate | logs | collect-logs | stop | delete | run-until-done) ;;
        *) die "unknown subcommand '$SUBCOMMAND' (see tpu.sh --help)" ;;
    esac
    parse_options "$@"
    validate_options
    case $SUBCOMMAND in
        create) create_slice && wait_until_ready ;;
        wait) wait_until_ready ;;
        status)
            read_state
            printf '%s\n' "$STATE"
            ;;
        install) install_project ;;
        train | evaluate)
            set_job_argv "$SUBCOMMAND"
            launch_job
            ;;
        logs)
            set_job_argv_name_only
            follow_log
            ;;
        collect-logs)
            set_job_argv_name_only
            collect_logs "$LOG_DIR"
            ;;
        stop) stop_slice ;;
        delete) delete_slice ;;
        run-until-done)
            require_option --accelerator-type "$ACCELERATOR_TYPE" "run-until-done creates the slice when needed"
            if [[ $RUN_DIR != gs://?* ]]; then
                die "run-until-done needs --run-dir gs://BUCKET/PATH: a recreated slice has new disks, and training \
resumes from the checkpoints in its run directory only when that directory is on shared storage"
            fi
            set_job_argv run-until-done
            DRY_RUN_STATE=NOT_FOUND  # a dry run shows the commands for a slice that does not exist yet
            run_until_done
            ;;
    esac
}

# logs and collect-logs need only the job's name (default train).
set_job_argv_name_only() {
    JOB_NAME=${JOB_NAME:-train}
}

main "$@"
