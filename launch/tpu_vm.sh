#!/usr/bin/env bash
# Train on a Cloud TPU VM, single host (v4-8, v5litepod-8) or pod slice (v4-32, ...), with
# `gcloud compute tpus tpu-vm`. See --help; README.md "Training on Cloud TPU" walks through it.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

usage() {
    cat <<'EOF'
Usage: launch/tpu_vm.sh [OPTIONS] COMMAND... [-- MAIN_FLAGS...]

Commands (several run in order, e.g. `preflight create setup train`):
  preflight  compile CONFIG (and the --config.* flags after --) for ACCELERATOR_TYPE on this
           machine and stop unless it fits the slice's memory (python -m
           resnet_v2_jax.preflight; needs pip install '.[tpu]' here, in LOCAL_PYTHON)
  create   create the TPU VM
  setup    put the project on every worker (this checkout's committed HEAD, or a clone of
           REPO_URL) and install it with jax[tpu] into ~/resnet_v2_jax/.venv
  train    start `python -m resnet_v2_jax.main` on every worker at once, in the background
           (nohup); log in ~/resnet_v2_jax/train.log. Rerun it to resume from the last checkpoint.
  logs     follow the training log of worker LOG_WORKER (default 0)
  stop     SIGTERM to the training on every worker (a single host saves a checkpoint), then
           SIGKILL to what still runs after STOP_TIMEOUT seconds
  status   describe the TPU VM
  delete   delete the TPU VM (and its local disks)

Settings: environment variable or option (the option wins).
  TPU_NAME          --name=NAME          TPU VM name (required)
  ZONE              --zone=ZONE          default us-central2-b
  ACCELERATOR_TYPE  --accelerator=TYPE   default v4-8; e.g. v5litepod-8, v4-32
  RUNTIME_VERSION   --version=VERSION    default from the accelerator: tpu-ubuntu2204-base
                                         (v2-v4), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5
                                         (v5p), v2-alpha-tpuv6e (v6e)
  PROJECT           --project=PROJECT    default: gcloud's configured project
  SPOT=1            --spot               create on spot capacity (can be preempted)
  CONFIG            --config=FILE        default configs/imagenet_200.py
  WORKDIR           --workdir=DIR        gs://bucket/run (checkpoints, TensorBoard); a local
                                         path is refused on multi-worker slices
  DATA_DIR          --data-dir=DIR       tfds data_dir, e.g. gs://bucket/tensorflow_datasets
  REPO_URL          --repo=URL           git URL the workers clone; default: copy this checkout
  GIT_REF           --ref=REF            branch, tag or commit of REPO_URL (default main)
  PYTHON_VERSION    --python=VERSION     Python of the workers' venv (default 3.12, via uv)
  LOCAL_PYTHON      --local-python=PATH  Python that runs preflight here (default python3)
  LOG_WORKER        --log-worker=N       worker whose log `logs` follows (default 0)
  STOP_TIMEOUT      --stop-timeout=S     seconds `stop` waits before SIGKILL (default 300)
  DRY_RUN=1         --dry-run            print every command instead of running it
Flags after `--` go to resnet_v2_jax.main, e.g. -- --config.batch_size=1024

Example (v4-32 pod slice, 4 workers):
  export TPU_NAME=r200 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32
  export WORKDIR=gs://my-bucket/imagenet_200 DATA_DIR=gs://my-bucket/tensorflow_datasets
  launch/tpu_vm.sh create && launch/tpu_vm.sh setup && launch/tpu_vm.sh train
  launch/tpu_vm.sh logs
EOF
}

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
CONFIG=${CONFIG:-configs/imagenet_200.py}
WORKDIR=${WORKDIR:-}
DATA_DIR=${DATA_DIR:-}
REPO_URL=${REPO_URL:-}
GIT_REF=${GIT_REF:-main}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
LOCAL_PYTHON=${LOCAL_PYTHON:-python3}
LOG_WORKER=${LOG_WORKER:-0}
STOP_TIMEOUT=${STOP_TIMEOUT:-300}
COMMANDS=()
MAIN_FLAGS=()

while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --spot) SPOT=1 ;;
        --name=*) TPU_NAME=${1#*=} ;;
        --zone=*) ZONE=${1#*=} ;;
        --accelerator=*) ACCELERATOR_TYPE=${1#*=} ;;
        --version=*) RUNTIME_VERSION=${1#*=} ;;
        --project=*) PROJECT=${1#*=} ;;
        --config=*) CONFIG=${1#*=} ;;
        --workdir=*) WORKDIR=${1#*=} ;;
        --data-dir=*) DATA_DIR=${1#*=} ;;
        --repo=*) REPO_URL=${1#*=} ;;
        --ref=*) GIT_REF=${1#*=} ;;
        --python=*) PYTHON_VERSION=${1#*=} ;;
        --local-python=*) LOCAL_PYTHON=${1#*=} ;;
        --log-worker=*) LOG_WORKER=${1#*=} ;;
        --stop-timeout=*) STOP_TIMEOUT=${1#*=} ;;
        --) shift; MAIN_FLAGS=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) COMMANDS+=("$1") ;;
    esac
    shift
done

((${#COMMANDS[@]})) || { usage >&2; exit 2; }
[[ -n $TPU_NAME ]] || die "set TPU_NAME or --name"

# On every worker, relative to the home folder, where remote commands start.
REMOTE_DIR=resnet_v2_jax
LOG_FILE=train.log  # in REMOTE_DIR
PID_FILE=train.pid

# Hosts (workers) of a slice: v2-v4 and v5p count TensorCores, 8 per host; v5e and v6e count
# chips, up to 8 on one host and 4 per host beyond. Unknown types count as multi-host.
num_workers() {
    local family=${1%-*} size=${1##*-}
    [[ $size =~ ^[0-9]+$ ]] || { echo 0; return; }
    case $family in
        v2 | v3 | v4 | v5p) echo $((size > 8 ? size / 8 : 1)) ;;
        v5litepod | v5e | v6e) echo $((size > 8 ? size / 4 : 1)) ;;
        *) echo 0 ;;
    esac
}

default_runtime() {
    case ${1%-*} in
        v5litepod | v5e) echo v2-alpha-tpuv5-lite ;;
        v5p) echo v2-alpha-tpuv5 ;;
        v6e) echo v2-alpha-tpuv6e ;;
        *) echo tpu-ubuntu2204-base ;;
    esac
}

tpu_vm() {
    local verb=$1
    shift
    local scope=(--zone="$ZONE")
    [[ -z $PROJECT ]] || scope+=(--project="$PROJECT")
    run gcloud compute tpus tpu-vm "$verb" "$@" "${scope[@]}"
}

on_workers() {  # WORKER COMMAND_STRING
    tpu_vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}

WORKERS=$(num_workers "$ACCELERATOR_TYPE")

cmd_create() {
    local args=("$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE"
                --version="${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}")
    [[ $SPOT != 1 ]] || args+=(--spot)
    tpu_vm create "${args[@]}"
}

cmd_setup() {
    local fetch
    if [[ -n $REPO_URL ]]; then
        fetch="[ -d $REMOTE_DIR/.git ] || git clone --quiet $(quote "$REPO_URL") $REMOTE_DIR"
        fetch+=" && git -C $REMOTE_DIR fetch --quiet origin $(quote "$GIT_REF")"
        fetch+=" && git -C $REMOTE_DIR checkout --quiet --detach FETCH_HEAD"
    else
        local archive=${TMPDIR:-/tmp}/resnet_v2_jax-$TPU_NAME.tar.gz
        run git -C "$REPO_ROOT" archive --format=tar.gz \
            --output="$archive" HEAD
        tpu_vm scp "$archive" "$TPU_NAME:resnet_v2_jax.tar.gz" --worker=all
        fetch="mkdir -p $REMOTE_DIR && tar -xzf resnet_v2_jax.tar.gz -C $REMOTE_DIR"
    fi
    # Ubuntu 22.04's Python is 3.10; uv fetches a newer one for the venv.
    on_workers all "set -e; $fetch; cd $REMOTE_DIR
python3 -m pip install --quiet --user uv
[ -x .venv/bin/python ] || ~/.local/bin/uv venv --quiet --python $(quote "$PYTHON_VERSION") .venv
~/.local/bin/uv pip install --quiet --python .venv/bin/python -e '.[train]' 'jax[tpu]'
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
}

check_workdir() {
    [[ -n $WORKDIR ]] || die "set WORKDIR or --workdir (gs://bucket/run)"
    [[ $WORKDIR != gs://* ]] || return 0
    if [[ $WORKERS != 1 ]]; then
        die "$ACCELERATOR_TYPE has several workers, each with its own local disk: a local" \
            "--workdir=$WORKDIR would split the checkpoints between them and lose them" \
            "with the VM. Use a gs:// workdir (a bucket in the TPU's region)."
    fi
    echo "warning: $WORKDIR is on the TPU VM's disk; delete copies nothing back" >&2
}

cmd_train() {
    local main_flags=(--config="$CONFIG" --workdir="$WORKDIR")
    [[ $WORKERS == 1 ]] || main_flags+=(--distributed)
    main_flags+=("${MAIN_FLAGS[@]}")
    local env_prefix=""
    [[ -z $DATA_DIR ]] || env_prefix="TFDS_DATA_DIR=$(quote "$DATA_DIR") "
    on_workers all "cd $REMOTE_DIR
if [ -f $PID_FILE ] && kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null; then
  echo \"\$(hostname): already training (pid \$(cat $PID_FILE)); stop it first\" >&2; exit 1
fi
${env_prefix}nohup .venv/bin/python -m resnet_v2_jax.main $(quote_all "${main_flags[@]}") \
>> $LOG_FILE 2>&1 < /dev/null &
echo \$! > $PID_FILE"
}

cmd_stop() {
    [[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a number of seconds"
    on_workers all "cd $REMOTE_DIR && [ -f $PID_FILE ] || exit 0
pid=\$(cat $PID_FILE)
kill \"\$pid\" 2>/dev/null || true
for _ in \$(seq $STOP_TIMEOUT); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done
kill -9 \"\$pid\" 2>/dev/null || true
rm -f $PID_FILE"
}

for command in "${COMMANDS[@]}"; do  # every check before anything runs
    [[ $command =~ ^(preflight|create|setup|train|logs|stop|status|delete)$ ]] ||
        die "unknown command $command (see --help)"
    [[ $command != train ]] || check_workdir
done
for command in "${COMMANDS[@]}"; do
    case $command in
        preflight) preflight "$LOCAL_PYTHON" "$ACCELERATOR_TYPE" ;;
        create) cmd_create ;;
        setup) cmd_setup ;;
        train) cmd_train ;;
        logs) on_workers "$LOG_WORKER" "tail -n 200 -F $REMOTE_DIR/$LOG_FILE" ;;
        stop) cmd_stop ;;
        status) tpu_vm describe "$TPU_NAME" ;;
        delete) tpu_vm delete "$TPU_NAME" --quiet ;;
    esac
done
