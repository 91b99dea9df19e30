# shellcheck shell=bash
# The project on the workers: the source tarball, its install, the job, its logs.
# Remote paths are relative to the ssh user's home directory, where gcloud's ssh and scp start.

REMOTE_TARBALL=megadoc-jax.tar.gz
REMOTE_SOURCE=megadoc-jax
REMOTE_VENV=megadoc-venv
REMOTE_LOGS=megadoc-logs

# ssh to every worker of every slice.
ssh_all() {  # REMOTE_COMMAND [extra gcloud flags...]
    local command=$1
    shift
    if ((QUEUED)); then
        run_gcloud compute tpus queued-resources ssh "$NAME" "${LOCATION[@]}" --worker=all --node=all \
            "--command=$command" "$@"
    else
        run_gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all "--command=$command" "$@"
    fi
}

local_tarball() {
    if [[ -n $TARBALL ]]; then
        printf '%s' "$TARBALL"
    else
        printf '%s' "$LOG_DIR/source.tar.gz"
    fi
}

# The checkout as it is (tracked files with their working-tree contents, and untracked files git does not
# ignore), so that uncommitted edits reach the workers too.
build_tarball() {  # OUT
    local out=$1 root
    if ! root=$(git -C "$PROJECT_ROOT" rev-parse --show-toplevel 2>/dev/null); then
        die "$PROJECT_ROOT is not a git checkout: build a tarball of the project and pass --tarball FILE"
    fi
    mkdir -p "$(dirname "$out")"
    out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
    (
        cd "$root" || exit
        git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' file; do
                if [[ -f $file ]]; then printf '%s\0' "$file"; fi
            done |
            tar --null -T - -czf "$out"
    ) || die "could not build the source tarball $out"
    note "source tarball $out ($(du -h "$out" | cut -f1)) of $root at $(git -C "$root" rev-parse --short HEAD)"
}

install_project() {
    local tarball
    tarball=$(local_tarball)
    if ((DRY_RUN)); then
        if [[ -z $TARBALL ]]; then note "(dry run) would build the source tarball $tarball"; fi
    elif [[ -z $TARBALL ]]; then
        build_tarball "$tarball"
    elif [[ ! -f $TARBALL ]]; then
        die "--tarball $TARBALL: no such file"
    fi
    if ((QUEUED)); then
        run_gcloud compute tpus queued-resources scp "$tarball" "$NAME:$REMOTE_TARBALL" "${LOCATION[@]}" \
            --worker=all --node=all || return
    else
        run_gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_TARBALL" "${LOCATION[@]}" --worker=all || return
    fi
    ssh_all "rm -rf $REMOTE_SOURCE && mkdir -p $REMOTE_SOURCE && tar -xzf $REMOTE_TARBALL -C $REMOTE_SOURCE && \
bash $REMOTE_SOURCE/tpu_scripts/worker/install.sh $(quote_words --python "$PYTHON" --venv "$REMOTE_VENV" \
--source "$REMOTE_SOURCE")" || return
    # Data the job reads from local disk must be fetched again onto new VMs: --setup does it after each install.
    if [[ -n $SETUP ]]; then
        ssh_all "cd $REMOTE_SOURCE && $SETUP"
    fi
}

# JOB_ARGV: the python command of the subcommand (train, evaluate, run-until-done).
set_job_argv() {
    case $1 in
        train | run-until-done)
            require_option --config "$CONFIG" "the experiment config, e.g. configs/experiments/baselines/300m.yaml"
            JOB_ARGV=(python -m megadoc_jax.train --config "$CONFIG")
            if [[ -n $RUN_DIR ]]; then JOB_ARGV+=("train.run_dir=$RUN_DIR"); fi
            JOB_ARGV+=("${JOB_EXTRA[@]}")
            ;;
        evaluate)
            if ((${#JOB_EXTRA[@]} == 0)); then
                die "evaluate passes the arguments after -- to python -m megadoc_jax.evaluate, and there are none \
(e.g. -- --model gs://BUCKET/runs/NAME)"
            fi
            JOB_ARGV=(python -m megadoc_jax.evaluate "${JOB_EXTRA[@]}")
            ;;
    esac
    if [[ -z $JOB_NAME ]]; then JOB_NAME=${1/run-until-done/train}; fi
}

remote_log() {
    printf '%s' "$REMOTE_LOGS/$JOB_NAME.log"
}

# The job on every worker: jax.distributed.initialize() finds the pod (and the slices of a multislice queued
# resource) from the TPU metadata, because MEGADOC_DISTRIBUTED=auto (megadoc_jax/distributed.py).
# stdout: worker 0's log as it runs. Status: gcloud's, non-zero when the command failed on any worker.
launch_job() {
    local env=(MEGADOC_DISTRIBUTED=auto "${JOB_ENV[@]}")
    local command
    command="cd $REMOTE_SOURCE && env $(quote_words "${env[@]}") bash tpu_scripts/worker/run.sh \
$(quote_words --log "../$(remote_log)" --venv "../$REMOTE_VENV" -- "${JOB_ARGV[@]}")"
    # Keep-alives, so that a worker that vanished (preempted) ends the ssh within minutes, not hours.
    ssh_all "$command" --ssh-flag=-oServerAliveInterval=60 --ssh-flag=-oServerAliveCountMax=5
}

follow_log() {
    local command
    command="tail -n +1 -F $(remote_log)"
    if ((QUEUED)); then
        run_gcloud compute tpus queued-resources ssh "$NAME" "${LOCATION[@]}" --node=0 --worker=0 "--command=$command"
    else
        run_gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=0 "--command=$command"
    fi
}

# WORKERS: the number of TPU VM workers per slice (--workers, or the first slice's network endpoints).
read_worker_count() {
    local first answer
    if [[ -n $WORKERS ]]; then
        return
    fi
    first=$(node_names | head -n 1)
    if ((DRY_RUN)); then
        run_gcloud compute tpus tpu-vm describe "$first" "${LOCATION[@]}" '--format=value(networkEndpoints.len())'
        note "(dry run) assuming 1 worker per slice; pass --workers N to print the copies of a pod slice"
        WORKERS=1
    elif answer=$(run_gcloud compute tpus tpu-vm describe "$first" "${LOCATION[@]}" \
        '--format=value(networkEndpoints.len())') && [[ $answer =~ ^[1-9][0-9]*$ ]]; then
        WORKERS=$answer
    else
        note "cannot read the worker count of $first; collecting worker 0 only"
        WORKERS=1
    fi
}

# Copies every worker's log into DIR as node-N-worker-W.log (worker-W.log for a TPU VM). Status: 1 when any
# copy failed (the others are still made).
collect_logs() {  # DIR
    local dir=$1 node worker nodes failed=0
    read_worker_count
    nodes=$(node_names | wc -l)
    if ((!DRY_RUN)); then mkdir -p "$dir"; fi
    for ((node = 0; node < nodes; node++)); do
        for ((worker = 0; worker < WORKERS; worker++)); do
            if ((QUEUED)); then
                run_gcloud compute tpus queued-resources scp "$NAME:$(remote_log)" \
                    "$dir/node-$node-worker-$worker.log" "${LOCATION[@]}" "--node=$node" "--worker=$worker" ||
                    failed=1
            else
                run_gcloud compute tpus tpu-vm scp "$NAME:$(remote_log)" "$dir/worker-$worker.log" \
                    "${LOCATION[@]}" "--worker=$worker" || failed=1
            fi
        done
    done
    return "$failed"
}
