# shellcheck shell=bash
# Helpers shared by the launch scripts; sourced, never run.
#
# `run CMD ARGS...` runs a command and echoes it to stderr first; with DRY_RUN=1 it prints the
# command instead, as one line of shell words that `bash -c` or Python's shlex.split read back
# into exactly the same arguments.

DRY_RUN=${DRY_RUN:-0}

die() {
    echo "error: $*" >&2
    exit 1
}

# One shell word: as is when it is plainly safe, else single-quoted.
quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# All arguments as one line of shell words.
quote_all() {
    local words=() arg
    for arg in "$@"; do
        words+=("$(quote "$arg")")
    done
    printf '%s\n' "${words[*]}"
}

run() {
    if [[ $DRY_RUN == 1 ]]; then
        quote_all "$@"
    else
        echo "+ $(quote_all "$@")" >&2
        "$@"
    fi
}
