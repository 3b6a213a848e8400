#!/usr/bin/env bash
# Train on several GPU nodes under SLURM: writes a batch script and submits it with sbatch.
# One process per GPU; jax.distributed.initialize() finds its peers from SLURM's environment.
# See --help; README.md "Training on GPUs".
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$REPO_ROOT/launch/common.sh"

usage() {
    cat <<'EOF_USAGE'
Usage: launch/slurm_gpu.sh [OPTIONS] [-- MAIN_FLAGS...]

Writes ${TMPDIR:-/tmp}/JOB_NAME.sbatch and submits it. Each node runs GPUS_PER_NODE processes
(one per GPU) of `python -m resnet_v2_jax.main`; main.py calls jax.distributed.initialize()
because SLURM_NTASKS > 1, and JAX reads the coordinator (the first node), the process count and
index, and each process's GPU (SLURM_LOCALID) from SLURM. Resubmitting resumes the run.

Settings: environment variable or option (the option wins).
  NODES          --nodes=N            default 2
  GPUS_PER_NODE  --gpus-per-node=N    default 8
  PARTITION      --partition=NAME     default: the cluster's
  ACCOUNT        --account=NAME       default: yours
  TIME           --time=D-HH:MM:SS    default 24:00:00
  CPUS_PER_TASK  --cpus-per-task=N    input-pipeline threads per process (default: SLURM's)
  JOB_NAME       --job-name=NAME      default resnet_v2_jax
  CONFIG         --config=FILE        default configs/imagenet_200.py
  WORKDIR        --workdir=DIR        on a filesystem every node shares, or gs:// (required)
  DATA_DIR       --data-dir=DIR       tfds data_dir every node can read
  MEM_FRACTION   --mem-fraction=F     share of each GPU's memory JAX preallocates (0.9)
  PYTHON         --python=PATH        default .venv/bin/python of the repository
  DRY_RUN=1      --dry-run            print the batch script and sbatch command, submit nothing
Flags after `--` go to resnet_v2_jax.main. config.batch_size is the GLOBAL batch over all
NODES x GPUS_PER_NODE GPUs.
EOF_USAGE
}

NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
TIME=${TIME:-24:00:00}
CPUS_PER_TASK=${CPUS_PER_TASK:-}
JOB_NAME=${JOB_NAME:-resnet_v2_jax}
CONFIG=${CONFIG:-configs/imagenet_200.py}
WORKDIR=${WORKDIR:-}
DATA_DIR=${DATA_DIR:-}
MEM_FRACTION=${MEM_FRACTION:-0.9}
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
MAIN_FLAGS=()

while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --nodes=*) NODES=${1#*=} ;;
        --gpus-per-node=*) GPUS_PER_NODE=${1#*=} ;;
        --partition=*) PARTITION=${1#*=} ;;
        --account=*) ACCOUNT=${1#*=} ;;
        --time=*) TIME=${1#*=} ;;
        --cpus-per-task=*) CPUS_PER_TASK=${1#*=} ;;
        --job-name=*) JOB_NAME=${1#*=} ;;
        --config=*) CONFIG=${1#*=} ;;
        --workdir=*) WORKDIR=${1#*=} ;;
        --data-dir=*) DATA_DIR=${1#*=} ;;
        --mem-fraction=*) MEM_FRACTION=${1#*=} ;;
        --python=*) PYTHON=${1#*=} ;;
        --) shift; MAIN_FLAGS=("$@"); break ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

[[ -n $WORKDIR ]] || die "set WORKDIR or --workdir (a folder every node shares, or gs://)"
[[ $NODES =~ ^[1-9][0-9]*$ && $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
    die "NODES and GPUS_PER_NODE must be positive integers, got $NODES and $GPUS_PER_NODE"

batch_script() {
    echo "#!/bin/bash"
    echo "#SBATCH --job-name=$JOB_NAME"
    echo "#SBATCH --nodes=$NODES"
    echo "#SBATCH --ntasks-per-node=$GPUS_PER_NODE"
    echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
    echo "#SBATCH --time=$TIME"
    echo "#SBATCH --output=$JOB_NAME-%j.out"
    [[ -z $PARTITION ]] || echo "#SBATCH --partition=$PARTITION"
    [[ -z $ACCOUNT ]] || echo "#SBATCH --account=$ACCOUNT"
    [[ -z $CPUS_PER_TASK ]] || echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
    echo "set -euo pipefail"
    echo "cd $(quote "$REPO_ROOT")"
    echo "# Every task sees all GPUs of its node (GPUs are requested per node, not bound per"
    echo "# task); JAX gives process SLURM_LOCALID the GPU of that number."
    echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=$(quote "$MEM_FRACTION")"
    [[ -z $DATA_DIR ]] || echo "export TFDS_DATA_DIR=$(quote "$DATA_DIR")"
    quote_all srun "$PYTHON" -m resnet_v2_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
        "${MAIN_FLAGS[@]}"
}

SCRIPT_FILE=${TMPDIR:-/tmp}/$JOB_NAME.sbatch
if [[ $DRY_RUN == 1 ]]; then
    echo "cat > $(quote "$SCRIPT_FILE") <<'SBATCH'"
    batch_script
    echo "SBATCH"
else
    batch_script > "$SCRIPT_FILE"
fi
run sbatch "$SCRIPT_FILE"
