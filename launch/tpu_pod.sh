#!/usr/bin/env bash
# Train llava-jax on a Cloud TPU pod slice: create the slice (directly or as a queued resource),
# install this checkout on every worker, run the same command on --worker=all, stream the logs,
# stop (SIGTERM: every host checkpoints at the same step), delete. See launch/README.md.
#
#   launch/tpu_pod.sh [options] COMMAND [-- extra train flags]
#
# Commands:
#   create        create the slice (--queued: through a queued resource) and wait until it is ready
#   install       copy this checkout to every worker, install jax[tpu] + llava-jax[gcs] in ~/llava-venv
#   fetch SRC DST copy SRC (gs://...) to DST on every worker (checkpoints, data; each host reads its shard)
#   train         start `python -m llava_jax.train` on all workers, detached (log: ~/llava-jax-train.log)
#   logs          stream the training log of worker --worker (default 0)
#   stop          SIGTERM the run on all workers: they save a checkpoint at a common step and exit
#   status        describe the slice
#   delete        delete the slice (and its queued resource)
#
# Options (each also settable by the environment variable in brackets):
#   --name NAME         [TPU_NAME]     slice name (required)
#   --zone ZONE         [TPU_ZONE]     e.g. us-east5-a (required)
#   --project PROJECT   [TPU_PROJECT]  default: gcloud's configured project
#   --type TYPE         [TPU_TYPE]     accelerator type for create: v5p-64, v5litepod-256, v6e-64, v4-32
#   --version VERSION   [TPU_VERSION]  TPU VM runtime version (default from the type's generation)
#   --queued            [TPU_QUEUED=1] create through a queued resource
#   --spot              [TPU_SPOT=1]   spot capacity
#   --config CONFIG     [CONFIG]       e.g. configs/llava_v1_5.py:7b_stage2 (train)
#   --workdir URI       [WORKDIR]      gs://BUCKET/RUN: checkpoints, metrics, TensorBoard (train)
#   --worker N          [TPU_WORKER]   worker for `logs` (default 0)
#   --jax-version V     [JAX_VERSION]  jax to install (default: the local one)
#   --python PY         [PYTHON]       python on the workers (default python3.11, apt-installed if absent)
#   --dry-run           [DRY_RUN=1]    print the commands instead of running them
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_TYPE="${TPU_TYPE:-}"
TPU_VERSION="${TPU_VERSION:-}"
TPU_QUEUED="${TPU_QUEUED:-0}"
TPU_SPOT="${TPU_SPOT:-0}"
TPU_WORKER="${TPU_WORKER:-0}"
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
JAX_VERSION="${JAX_VERSION:-}"
PYTHON="${PYTHON:-python3.11}"
COMMAND=""
POSITIONAL=()
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) TPU_NAME="$2"; shift 2 ;;
    --zone) TPU_ZONE="$2"; shift 2 ;;
    --project) TPU_PROJECT="$2"; shift 2 ;;
    --type) TPU_TYPE="$2"; shift 2 ;;
    --version) TPU_VERSION="$2"; shift 2 ;;
    --queued) TPU_QUEUED=1; shift ;;
    --spot) TPU_SPOT=1; shift ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --worker) TPU_WORKER="$2"; shift 2 ;;
    --jax-version) JAX_VERSION="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) if [[ -z "$COMMAND" ]]; then COMMAND="$1"; else POSITIONAL+=("$1"); fi; shift ;;
  esac
done
[[ -n "$COMMAND" ]] || usage 2
need TPU_NAME --name
need TPU_ZONE --zone

GCLOUD=(gcloud)
[[ -n "$TPU_PROJECT" ]] && GCLOUD+=(--project "$TPU_PROJECT")
TPU=("${GCLOUD[@]}" compute tpus tpu-vm)
QR=("${GCLOUD[@]}" compute tpus queued-resources)
# shellcheck disable=SC2088  # expanded on the workers, not here
LOG='~/llava-jax-train.log'
# shellcheck disable=SC2088
PID='~/llava-jax-train.pid'

default_version() {
  case "$1" in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for $1; pass --version" ;;
  esac
}

on_all_workers() {  # on_all_workers 'remote command'
  run "${TPU[@]}" ssh "$TPU_NAME" --zone "$TPU_ZONE" --worker=all --command "$1"
}

cmd_create() {
  need TPU_TYPE --type
  local version="${TPU_VERSION:-$(default_version "$TPU_TYPE")}"
  local spot=()
  [[ "$TPU_SPOT" == 1 ]] && spot=(--spot)
  if [[ "$TPU_QUEUED" == 1 ]]; then
    run "${QR[@]}" create "$TPU_NAME" --node-id "$TPU_NAME" --zone "$TPU_ZONE" \
      --accelerator-type "$TPU_TYPE" --runtime-version "$version" "${spot[@]}"
    local describe=("${QR[@]}" describe "$TPU_NAME" --zone "$TPU_ZONE" --format='value(state.state)')
    if [[ "$DRY_RUN" == 1 ]]; then
      run "${describe[@]}"
      echo "# (repeats until the state is ACTIVE)"
      return
    fi
    local state=""
    until [[ "$state" == ACTIVE ]]; do
      state="$("${describe[@]}")"
      echo "queued resource $TPU_NAME: $state" >&2
      case "$state" in FAILED|SUSPENDED) die "queued resource $TPU_NAME is $state" ;; esac
      [[ "$state" == ACTIVE ]] || sleep 30
    done
  else
    run "${TPU[@]}" create "$TPU_NAME" --zone "$TPU_ZONE" --accelerator-type "$TPU_TYPE" \
      --version "$version" "${spot[@]}"
  fi
}

cmd_install() {
  local jv="$JAX_VERSION"
  if [[ -z "$jv" ]]; then
    jv="$(python3 -c 'import jax; print(jax.__version__)' 2>/dev/null || true)"
  fi
  local jax_req="jax[tpu]"
  [[ -n "$jv" ]] && jax_req="jax[tpu]==$jv"
  local tarball="${TMPDIR:-/tmp}/llava-jax-src.tgz"
  run tar --exclude=.git --exclude='*.pyc' --exclude=__pycache__ -czf "$tarball" -C "$REPO" .
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:llava-jax-src.tgz" --zone "$TPU_ZONE" --worker=all
  # TPU VM images are Ubuntu 22.04 (python 3.10); llava-jax needs >= 3.11
  on_all_workers "set -e; command -v $PYTHON >/dev/null || { sudo apt-get update -qq \
&& sudo apt-get install -y -qq $PYTHON $PYTHON-venv; } \
&& rm -rf ~/llava-jax && mkdir -p ~/llava-jax && tar -xzf ~/llava-jax-src.tgz -C ~/llava-jax \
&& $PYTHON -m venv ~/llava-venv && ~/llava-venv/bin/pip install -q -U pip \
&& ~/llava-venv/bin/pip install -q '$jax_req' -e ~/llava-jax'[gcs]' \
&& ~/llava-venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
}

cmd_fetch() {
  [[ ${#POSITIONAL[@]} -eq 2 ]] || die "fetch needs SRC and DST, e.g. fetch gs://bucket/ckpt ~/ckpt"
  local src dst
  src="$(printf '%q' "${POSITIONAL[0]}")"
  dst="$(printf '%q' "${POSITIONAL[1]}")"
  dst="${dst/#\\~/\~}"  # keep a leading ~ expandable on the worker
  on_all_workers "mkdir -p $dst && gcloud storage cp -r $src $dst"
}

cmd_train() {
  need CONFIG --config
  need WORKDIR --workdir
  [[ "$WORKDIR" == gs://* ]] || echo "warning: --workdir $WORKDIR is not a bucket; all hosts must share it" >&2
  local args=(--config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}")
  local quoted
  quoted="$(quote_cmd "${args[@]}")"
  # LLAVA_JAX_DISTRIBUTED=1: every worker joins jax.distributed (the TPU slice is detected).
  on_all_workers "cd ~/llava-jax && LLAVA_JAX_DISTRIBUTED=1 nohup ~/llava-venv/bin/python -m llava_jax.train \
$quoted > $LOG 2>&1 < /dev/null & echo \$! > $PID; echo started on \$(hostname)"
}

cmd_logs() {
  run "${TPU[@]}" ssh "$TPU_NAME" --zone "$TPU_ZONE" --worker="$TPU_WORKER" --command "tail -n +1 -F $LOG"
}

cmd_stop() {
  on_all_workers "kill -TERM \$(cat $PID) 2>/dev/null && echo stopping on \$(hostname) || true"
}

cmd_status() {
  if [[ "$TPU_QUEUED" == 1 ]]; then
    run "${QR[@]}" describe "$TPU_NAME" --zone "$TPU_ZONE"
  else
    run "${TPU[@]}" describe "$TPU_NAME" --zone "$TPU_ZONE"
  fi
}

cmd_delete() {
  if [[ "$TPU_QUEUED" == 1 ]]; then
    run "${QR[@]}" delete "$TPU_NAME" --zone "$TPU_ZONE" --force --quiet
  else
    run "${TPU[@]}" delete "$TPU_NAME" --zone "$TPU_ZONE" --quiet
  fi
}

case "$COMMAND" in
  create|install|fetch|train|logs|stop|status|delete) "cmd_$COMMAND" ;;
  *) die "unknown command $COMMAND (see --help)" ;;
esac
