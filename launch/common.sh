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

# `preflight PYTHON TARGET [VAR=VALUE...]`: compiles CONFIG, with the --config.* flags of
# MAIN_FLAGS, for TARGET on this machine (python -m resnet_v2_jax.preflight, which needs the
# [tpu] or [cuda] extra there) and stops the script unless it fits. It runs in a dry run too: it
# only compiles, here, and prints to stderr.
preflight() {
    local python=$1 target=$2 overrides=() flag
    shift 2
    for flag in "${MAIN_FLAGS[@]}"; do
        [[ $flag != --config.* ]] || overrides+=("$flag")
    done
    echo "+ preflight: $CONFIG on $target" >&2
    local status=0
    (cd "$REPO_ROOT" && env "$@" "$python" -m resnet_v2_jax.preflight --config="$CONFIG" \
        --target="$target" --out="${TMPDIR:-/tmp}/resnet_v2_jax-preflight" \
        "${overrides[@]}") >&2 || status=$?
    case $status in
        0) ;;
        3) die "$CONFIG does not fit $target (see above): nothing was started" ;;
        *) die "the preflight check of $CONFIG for $target failed (see above)" ;;
    esac
}
