# shellcheck shell=bash
# The slice's life cycle through gcloud: a TPU VM (`tpu-vm`) or a queued resource (`queued-resources`, one slice
# or a multislice of --node-count slices named PREFIX-0 .. PREFIX-(N-1)).
# States: google.cloud.tpu.v2 Node.State and QueuedResourceState.State (docs/tpu.md names the sources).

# The runtime version ("TPU software version") Google's versions page gives for each TPU generation.
default_runtime_version() {  # ACCELERATOR_TYPE
    case $1 in
        v6e-*) printf 'v2-alpha-tpuv6e' ;;
        v5p-*) printf 'v2-alpha-tpuv5' ;;
        v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
        v4-* | v3-* | v2-*) printf 'tpu-ubuntu2204-base' ;;
        *) return 1 ;;
    esac
}

# The TPU VM names of the slice: one, or PREFIX-i for a multislice queued resource.
node_names() {
    local i
    if ((QUEUED && NODE_COUNT > 1)); then
        for ((i = 0; i < NODE_COUNT; i++)); do
            printf '%s\n' "${NODE_PREFIX:-$NAME}-$i"
        done
    elif ((QUEUED)); then
        printf '%s\n' "${NODE_ID:-$NAME}"
    else
        printf '%s\n' "$NAME"
    fi
}

provisioning_flags() {
    case $PROVISIONING in
        on-demand) ;;
        spot) printf '%s\n' --spot ;;
        reserved) printf '%s\n' --reserved ;;
    esac
}

create_slice() {
    require_option --accelerator-type "$ACCELERATOR_TYPE" "e.g. v5litepod-16"
    local version=$RUNTIME_VERSION provisioning_args
    if [[ -z $version ]] && ! version=$(default_runtime_version "$ACCELERATOR_TYPE"); then
        die "no default runtime version for accelerator type '$ACCELERATOR_TYPE': pass --version"
    fi
    mapfile -t provisioning_args < <(provisioning_flags)
    DRY_RUN_STATE=$(healthy_state)
    if ((QUEUED)); then
        local nodes=("--node-id=${NODE_ID:-$NAME}")
        if ((NODE_COUNT > 1)); then
            nodes=("--node-count=$NODE_COUNT" "--node-prefix=${NODE_PREFIX:-$NAME}")
        fi
        run_gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" \
            "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$version" "${nodes[@]}" \
            "${provisioning_args[@]}" "${CREATE_FLAGS[@]}"
    else
        run_gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
            "--accelerator-type=$ACCELERATOR_TYPE" "--version=$version" "${provisioning_args[@]}" "${CREATE_FLAGS[@]}"
    fi
}

delete_slice() {
    DRY_RUN_STATE=NOT_FOUND
    if ((QUEUED)); then
        # --force: the queued resource's TPU VMs are deleted with it.
        run_gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
    else
        run_gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
    fi
}

stop_slice() {
    if ((QUEUED)); then
        die "a queued resource cannot be stopped, only deleted (tpu.sh delete --queued ...)"
    fi
    run_gcloud compute tpus tpu-vm stop "$NAME" "${LOCATION[@]}"
}

healthy_state() {
    if ((QUEUED)); then printf 'ACTIVE'; else printf 'READY'; fi
}

# healthy, pending (wait for it) or bad (delete and recreate) for a state of this kind of slice.
state_class() {  # STATE
    if [[ $1 == "$(healthy_state)" ]]; then
        printf 'healthy'
        return
    fi
    if ((QUEUED)); then
        case $1 in
            CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING) printf 'pending' ;;
            *) printf 'bad' ;;  # FAILED, SUSPENDING, SUSPENDED, DELETING, NOT_FOUND, anything unknown
        esac
    else
        case $1 in
            CREATING | STARTING | RESTARTING | REIMAGING | REPAIRING) printf 'pending' ;;
            *) printf 'bad' ;;  # PREEMPTED, TERMINATED, STOPPED, STOPPING, DELETING, NOT_FOUND, ...
        esac
    fi
}

# STATE: the slice's state word; NOT_FOUND when describe fails (no such slice, or gcloud cannot tell).
# Under --dry-run the command is printed and the state is DRY_RUN_STATE (what the commands so far would leave).
read_state() {
    local format='value(state)' kind=tpu-vm answer
    if ((QUEUED)); then
        format='value(state.state)'
        kind=queued-resources
    fi
    if ((DRY_RUN)); then
        run_gcloud compute tpus "$kind" describe "$NAME" "${LOCATION[@]}" "--format=$format"
        STATE=$DRY_RUN_STATE
    elif answer=$(run_gcloud compute tpus "$kind" describe "$NAME" "${LOCATION[@]}" "--format=$format"); then
        answer=${answer//[[:space:]]/}
        STATE=${answer:-NOT_FOUND}
    else
        STATE=NOT_FOUND
    fi
}

# Polls until the slice is healthy; fails (status 1) on a bad state or after --wait-timeout seconds.
wait_until_ready() {
    local started=$SECONDS
    while :; do
        read_state
        case $(state_class "$STATE") in
            healthy)
                note "$NAME is $STATE"
                return 0
                ;;
            bad)
                note "$NAME is $STATE while waiting for it to become $(healthy_state)"
                return 1
                ;;
        esac
        if ((WAIT_TIMEOUT > 0 && SECONDS - started >= WAIT_TIMEOUT)); then
            note "$NAME still $STATE after --wait-timeout $WAIT_TIMEOUT s"
            return 1
        fi
        note "$NAME is $STATE; polling again in $POLL_SECONDS s"
        sleep "$POLL_SECONDS"
    done
}
