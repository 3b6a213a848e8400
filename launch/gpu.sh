#!/usr/bin/env bash
# Train on one machine with one or more NVIDIA GPUs: a single process sees every GPU and runs
# data parallel over them. See --help; README.md "Training on GPUs".
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

usage() {
    cat <<'EOF_USAGE'
Usage: launch/gpu.sh [OPTIONS] COMMAND... [-- MAIN_FLAGS...]

Commands (several run in order, e.g. `setup preflight train`):
  preflight  compile CONFIG (and the --config.* flags after --) for TARGET and stop unless it
           fits its GPUs' memory at MEM_FRACTION (python -m resnet_v2_jax.preflight; needs
           pip install '.[cuda]' where no GPU is, e.g. before renting one)
  setup    create .venv in the repository and install the project with jax[cuda12]
  train    run `python -m resnet_v2_jax.main` in the foreground (rerun it to resume)

Settings: environment variable or option (the option wins).
  CONFIG         --config=FILE        default configs/cifar10_resnet164.py
  WORKDIR        --workdir=DIR        run folder, local or gs:// (required for train)
  DATA_DIR       --data-dir=DIR       tfds data_dir (default: tfds's, ~/tensorflow_datasets)
  GPUS           --gpus=LIST          GPUs to use, e.g. 0,1 (default: all)
  TARGET         --target=NAME        what preflight compiles for: h100, h100x8, a100-80gbx8,
                                       h200x8 (python -m resnet_v2_jax.preflight --target=list)
  MEM_FRACTION   --mem-fraction=F     share of each GPU's memory JAX preallocates (default 0.9)
  PYTHON         --python=PATH        default .venv/bin/python of the repository
  DRY_RUN=1      --dry-run            print every command instead of running it
Flags after `--` go to resnet_v2_jax.main, e.g. -- --config.batch_size=256

TensorFlow only reads data here: the project installs tensorflow-cpu (x86_64) and hides the
GPUs from TensorFlow, so the GPUs' memory is JAX's alone.
EOF_USAGE
}

CONFIG=${CONFIG:-configs/cifar10_resnet164.py}
WORKDIR=${WORKDIR:-}
DATA_DIR=${DATA_DIR:-}
GPUS=${GPUS:-}
TARGET=${TARGET:-}
MEM_FRACTION=${MEM_FRACTION:-0.9}
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
COMMANDS=()
MAIN_FLAGS=()

while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --config=*) CONFIG=${1#*=} ;;
        --workdir=*) WORKDIR=${1#*=} ;;
        --data-dir=*) DATA_DIR=${1#*=} ;;
        --gpus=*) GPUS=${1#*=} ;;
        --target=*) TARGET=${1#*=} ;;
        --mem-fraction=*) MEM_FRACTION=${1#*=} ;;
        --python=*) PYTHON=${1#*=} ;;
        --) shift; MAIN_FLAGS=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        preflight | setup | train) COMMANDS+=("$1") ;;
        *) die "unknown command $1 (see --help)" ;;
    esac
    shift
done
((${#COMMANDS[@]})) || { usage >&2; exit 2; }

cmd_setup() {
    run python3 -m venv "$REPO_ROOT/.venv"
    run "$REPO_ROOT/.venv/bin/pip" install --quiet -e "$REPO_ROOT" 'jax[cuda12]'
    run "$REPO_ROOT/.venv/bin/python" -c 'import jax; print(jax.devices())'
}

cmd_preflight() {
    [[ -n $TARGET ]] || die "set TARGET or --target for preflight (e.g. h100x8)"
    preflight "$PYTHON" "$TARGET" XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
}

cmd_train() {
    [[ -n $WORKDIR ]] || die "set WORKDIR or --workdir"
    local env=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
    [[ -z $GPUS ]] || env+=(CUDA_VISIBLE_DEVICES="$GPUS")
    [[ -z $DATA_DIR ]] || env+=(TFDS_DATA_DIR="$DATA_DIR")
    cd "$REPO_ROOT"
    run env "${env[@]}" "$PYTHON" -m resnet_v2_jax.main --config="$CONFIG" \
        --workdir="$WORKDIR" "${MAIN_FLAGS[@]}"
}

for command in "${COMMANDS[@]}"; do
    "cmd_$command"
done
