#!/usr/bin/env bash
# Submit llava-jax training to a multi-node GPU cluster with SLURM (launch/slurm_gpu.sbatch).
#
#   launch/slurm_gpu.sh [options] --config CONFIG --workdir DIR [-- extra train flags]
#
# Options (each also settable by the environment variable in brackets):
#   --config CONFIG       [CONFIG]          e.g. configs/llava_v1_5.py:7b_stage2 (required)
#   --workdir DIR         [WORKDIR]         shared by all nodes (shared FS or gs://) (required)
#   --nodes N             [SLURM_NODES]     default 2
#   --gpus-per-node G     [GPUS_PER_NODE]   default 8
#   --partition P         [SLURM_PARTITION]
#   --account A           [SLURM_ACCOUNT]
#   --time T              [SLURM_TIME]      default 24:00:00
#   --venv DIR            [LLAVA_VENV]      virtualenv with llava-jax installed, activated on the nodes
#   --dry-run             [DRY_RUN=1]       print the sbatch command and the job's srun command
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
SLURM_NODES="${SLURM_NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
SLURM_PARTITION="${SLURM_PARTITION:-}"
SLURM_ACCOUNT="${SLURM_ACCOUNT:-}"
SLURM_TIME="${SLURM_TIME:-24:00:00}"
LLAVA_VENV="${LLAVA_VENV:-}"
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --nodes) SLURM_NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS_PER_NODE="$2"; shift 2 ;;
    --partition) SLURM_PARTITION="$2"; shift 2 ;;
    --account) SLURM_ACCOUNT="$2"; shift 2 ;;
    --time) SLURM_TIME="$2"; shift 2 ;;
    --venv) LLAVA_VENV="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
need CONFIG --config
need WORKDIR --workdir

SBATCH=(sbatch --chdir="$REPO" --nodes="$SLURM_NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS_PER_NODE"
        --time="$SLURM_TIME" --export="ALL,LLAVA_VENV=$LLAVA_VENV,LLAVA_REPO=$REPO")
[[ -n "$SLURM_PARTITION" ]] && SBATCH+=(--partition="$SLURM_PARTITION")
[[ -n "$SLURM_ACCOUNT" ]] && SBATCH+=(--account="$SLURM_ACCOUNT")

run "${SBATCH[@]}" "$HERE/slurm_gpu.sbatch" "$CONFIG" "$WORKDIR" "${EXTRA[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "# the job runs on every node:"
  DRY_RUN=1 LLAVA_REPO="$REPO" SLURM_JOB_NUM_NODES="$SLURM_NODES" bash "$HERE/slurm_gpu.sbatch" \
    "$CONFIG" "$WORKDIR" "${EXTRA[@]}" 2>/dev/null
fi
