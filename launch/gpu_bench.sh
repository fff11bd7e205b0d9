#!/usr/bin/env bash
# llava-jax against torch.compile'd transformers on one GPU, side by side, in a few minutes: stage-2
# training (llava-jax with the h100 preset's levers: cudnn_padded attention, dots_attn remat, the
# loss in chunks of 1024, bf16 frozen params) and decoding at the preset's batches (h100: 1 and 16;
# transformers' static cache against the engine). Each measurement runs in its own process and is appended to
# OUT/bench.jsonl as it finishes; a rerun with the same OUT runs only what that file has no result
# for (a job that failed, e.g. a kernel that refused the shape, stays recorded and is not retried).
#
#   launch/gpu_bench.sh OUT [extra flags for python -m llava_jax.tools.bench]
#
# Environment: PYTHON (default python3), PRESET (default h100; `tiny` runs on a CPU in a minute),
# BUDGET_S (the whole benchmark's wall limit, default 480), WORKER_TIMEOUT_S (one measurement's,
# default 300). The llava-jax source is taken from this checkout (PYTHONPATH), so a machine that has
# jax, flax, optax, torch and transformers needs nothing installed. If the limit cuts the run short,
# render what finished:  python -m llava_jax.tools.bench --from_json=OUT/bench.jsonl
set -uo pipefail

OUT="${1:?usage: launch/gpu_bench.sh OUT [bench flags]}"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"

# What ran where, before anything can fail: the card, the driver, the framework versions.
{
  date -u '+%Y-%m-%d %H:%M UTC'
  git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "commit: unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" -c 'import jax, torch, transformers; print("jax", jax.__version__, jax.devices());
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/env.txt"
"$PYTHON" -c 'import flax, optax, llava_jax.tools.bench' || { echo "llava-jax cannot be imported here" >&2; exit 2; }

timeout "${BUDGET_S:-480}" "$PYTHON" -m llava_jax.tools.bench --preset="${PRESET:-h100}" --tasks=stage2,decode \
  --json="$OUT/bench.jsonl" --resume --markdown="$OUT/bench.md" \
  --worker_timeout="${WORKER_TIMEOUT_S:-300}" "$@" 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
if [[ $status -eq 124 ]]; then
  echo "stopped at BUDGET_S=${BUDGET_S:-480} s; rerun with the same OUT to finish the rest" >&2
fi
exit "$status"
