# shellcheck shell=bash
# Shared helpers of tpu_scripts/tpu.sh: errors, shell quoting, and the one place gcloud is called (so that
# --dry-run prints every gcloud command instead of running it).

die() {
    printf 'tpu.sh: error: %s\n' "$*" >&2
    exit 2
}

note() {
    printf 'tpu.sh: %s\n' "$*" >&2
}

# One word quoted for a POSIX shell, as Python's shlex.quote does: bare when it is made of safe characters only.
shell_quote() {
    local word=$1
    if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$word"
    else
        printf "'%s'" "${word//\'/\'\\\'\'}"
    fi
}

quote_words() {
    local out="" word
    for word in "$@"; do
        out+="${out:+ }$(shell_quote "$word")"
    done
    printf '%s' "$out"
}

# gcloud ARGS...: prints the command (stdout) under --dry-run; otherwise echoes it to stderr and runs it.
run_gcloud() {
    if ((DRY_RUN)); then
        quote_words gcloud "$@"
        printf '\n'
        return 0
    fi
    printf '+ %s\n' "$(quote_words gcloud "$@")" >&2
    gcloud "$@"
}

# LOCATION: the flags every gcloud call of this slice takes.
set_location() {
    require_option --zone "$ZONE" "the slice's zone, e.g. us-west4-a"
    LOCATION=("--zone=$ZONE")
    if [[ -n $PROJECT ]]; then
        LOCATION+=("--project=$PROJECT")
    fi
}

require_option() {  # NAME VALUE WHAT
    if [[ -z $2 ]]; then
        die "$SUBCOMMAND needs $1 ($3)"
    fi
}

require_positive_int() {  # NAME VALUE
    if ! [[ $2 =~ ^[1-9][0-9]*$ ]]; then
        die "$1 must be a positive integer, got '$2'"
    fi
}

require_non_negative_int() {  # NAME VALUE
    if ! [[ $2 =~ ^[0-9]+$ ]]; then
        die "$1 must be a non-negative integer, got '$2'"
    fi
}
