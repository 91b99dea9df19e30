# shellcheck shell=bash
# run-until-done: the training job relaunched until it exits 0 on a healthy slice. A slice found preempted,
# suspended, failed or missing is deleted and recreated, the project reinstalled, and the job relaunched: it
# resumes from the newest checkpoint in its run directory, which is on shared storage (gs://) for that reason.
# One line per attempt goes to the attempt log.

# time, attempt number, the state seen after it, the action taken, the exit code of the step that ended it.
log_attempt() {  # ATTEMPT STATE ACTION STEP EXIT
    local line
    line=$(printf '%s attempt=%s state=%s action=%s step=%s exit=%s' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$2" "$3" "$4" "$5")
    if ((DRY_RUN)); then
        note "(dry run) attempt log: $line"
    else
        mkdir -p "$(dirname "$ATTEMPT_LOG")"
        printf '%s\n' "$line" >>"$ATTEMPT_LOG"
        note "attempt log: $line"
    fi
}

# Brings the slice to its healthy state (reusing, waiting for, or recreating it). Sets NEEDS_INSTALL when it
# may have new VMs. Status 0 when healthy; otherwise FAILED_STEP and FAILED_EXIT say what failed.
bring_up_slice() {
    case $(state_class "$STATE") in
        healthy) return 0 ;;
        pending) ;;
        bad)
            if [[ $STATE != NOT_FOUND ]]; then
                delete_slice || { FAILED_STEP=delete FAILED_EXIT=$?; return 1; }
            fi
            create_slice || { FAILED_STEP=create FAILED_EXIT=$?; return 1; }
            ;;
    esac
    NEEDS_INSTALL=1
    wait_until_ready || { FAILED_STEP=wait FAILED_EXIT=$?; return 1; }
}

# The worker-0 stream of one attempt into LOG_DIR/attempt-N.log, and the job's exit status.
run_attempt_job() {  # ATTEMPT
    local stream=$LOG_DIR/attempt-$1.log
    if ((DRY_RUN)); then
        launch_job
        return 0
    fi
    mkdir -p "$LOG_DIR"
    set +e
    launch_job | tee "$stream"
    local status=${PIPESTATUS[0]}
    set -e
    return "$status"
}

# The line megadoc_jax/train.py logs when it saved and stopped for a preemption notice (its exit code is 0 then).
PREEMPTION_LINE='preemption requested: saved step'

# True when worker 0's stream of the attempt says training stopped for a preemption rather than finished: the
# notice can come before describe shows the slice as preempted.
stopped_for_preemption() {  # ATTEMPT
    local stream=$LOG_DIR/attempt-$1.log
    [[ -f $stream ]] && grep -qF "$PREEMPTION_LINE" "$stream"
}

collect_attempt_logs() {  # ATTEMPT
    collect_logs "$LOG_DIR/attempt-$1" || note "some worker logs of attempt $1 could not be copied"
}

give_up() {  # MESSAGE
    printf 'tpu.sh: run-until-done gave up: %s. Attempt log: %s\n' "$1" "$ATTEMPT_LOG" >&2
    exit 1
}

# Ends the loop when this was the last attempt allowed.
stop_at_retry_limit() {  # ATTEMPT STATE STEP EXIT
    if (($1 >= MAX_ATTEMPTS)); then
        log_attempt "$1" "$2" give-up "$3" "$4"
        give_up "the retry limit of $MAX_ATTEMPTS attempts is reached (last: $3 exit code $4, slice $2)"
    fi
}

# What the next attempt does about a slice that is not healthy.
repair_action() {  # STATE
    if [[ $(state_class "$1") == pending ]]; then printf 'wait'; else printf 'recreate'; fi
}

run_until_done() {
    local attempt=0 job_failures=0 exit_code
    NEEDS_INSTALL=1  # a slice found running may hold another version of the project
    read_state
    while :; do
        attempt=$((attempt + 1))
        if ((attempt > 1 && RETRY_SECONDS > 0 && !DRY_RUN)); then
            note "attempt $attempt in $RETRY_SECONDS s"
            sleep "$RETRY_SECONDS"  # a create that fails at once (no capacity) must not use up the attempts at once
        fi
        if ! bring_up_slice; then
            read_state
            stop_at_retry_limit "$attempt" "$STATE" "$FAILED_STEP" "$FAILED_EXIT"
            log_attempt "$attempt" "$STATE" "$(repair_action "$STATE")" "$FAILED_STEP" "$FAILED_EXIT"
            continue
        fi
        if ((NEEDS_INSTALL)); then
            if install_project; then exit_code=0; else exit_code=$?; fi
            if ((exit_code != 0)); then
                read_state
                stop_at_retry_limit "$attempt" "$STATE" install "$exit_code"
                log_attempt "$attempt" "$STATE" reinstall install "$exit_code"
                continue
            fi
            NEEDS_INSTALL=0
        fi
        if run_attempt_job "$attempt"; then exit_code=0; else exit_code=$?; fi
        read_state
        if [[ $(state_class "$STATE") != healthy ]]; then
            # The slice went away under the job (with exit code 0 too: training saves at a preemption and exits 0).
            stop_at_retry_limit "$attempt" "$STATE" job "$exit_code"
            log_attempt "$attempt" "$STATE" "$(repair_action "$STATE")" job "$exit_code"
            continue
        fi
        collect_attempt_logs "$attempt"
        if ((exit_code == 0)) && stopped_for_preemption "$attempt"; then
            stop_at_retry_limit "$attempt" "$STATE" job 0
            log_attempt "$attempt" "$STATE" relaunch job 0
            continue
        fi
        if ((exit_code == 0)); then
            log_attempt "$attempt" "$STATE" "done" job 0
            note "run-until-done: the job finished (attempt $attempt); logs in $LOG_DIR"
            return 0
        fi
        job_failures=$((job_failures + 1))
        if ((job_failures >= MAX_JOB_FAILURES)); then
            log_attempt "$attempt" "$STATE" give-up job "$exit_code"
            give_up "the job failed $job_failures time(s) on a healthy slice (--max-job-failures $MAX_JOB_FAILURES), \
last with exit code $exit_code while $NAME is $STATE: the job's failure, not the slice's; its logs are in \
$LOG_DIR/attempt-$attempt"
        fi
        stop_at_retry_limit "$attempt" "$STATE" job "$exit_code"
        log_attempt "$attempt" "$STATE" relaunch job "$exit_code"
    done
}
