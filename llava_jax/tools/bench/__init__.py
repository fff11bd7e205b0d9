"""Throughput of llava-jax vs transformers' LlavaForConditionalGeneration, side by side, one device.

    python -m llava_jax.tools.bench --preset=h100 --markdown=BENCHMARKS.md    # a GPU, ~15 min
    python -m llava_jax.tools.bench --preset=tiny                             # CPU, seconds (CI)

Same model geometry, random weights, same work on both sides (issue 9):
  * stage-1 / stage-2 training steps: batch x seq_len tokens per step, one image per row
    (`num_image_tokens` image tokens after BOS, then text), AdamW, global-norm clipping.
    llava-jax: the trainer's own step (`make_train_step`, donated buffers, the vision tower frozen,
    stage 1 trains the projector only). transformers: bf16 weights, SDPA attention,
    `torch.compile`d model, vision tower frozen, in stage 1 only the projector trainable, fused
    AdamW; one stage per process (a graph compiled with frozen params would not train them later).
  * decoding: a prompt of BOS + image tokens + `prompt_text` text tokens, `new_tokens` greedy tokens
    (EOS disabled), for each decode batch size. llava-jax: `serve.engine.Engine.generate`.
    transformers: `generate(cache_implementation="static")`, which transformers compiles on GPU
    (`torch.compile`, CUDA graphs), after warm-up calls with the same settings.
    ms/step = (time(new_tokens) - time(1 token)) / (new_tokens - 1): decode steps only, prefill
    excluded; decode tokens/s = batch x 1000 / ms/step.
  * llama.cpp (`--frameworks=...,llamacpp`, decode at batch 1 only): the same geometry exported
    by llava-jax's GGUF export (`--llamacpp_quants`, default f16,q4_K_M) and timed by llama.cpp's
    own tools from the build `python -m llava_jax.tools.llamacpp` caches (`llamacpp_jobs`).
    The presets `demo` (the demo's model size) and `cpu` (the 1B-class geometry, 32 new tokens)
    are for this CPU side-by-side.
Reported: tokens/s, ms/step, MFU (model FLOPs of `train_step.step_flops`, the same count for both
sides, over the device's dense bf16 peak from a table by device kind), peak device memory, and the
ratio llava-jax / transformers (compiled unless that was skipped) of tokens/s.

Each (framework, work, variant) runs in its own subprocess on GPU (clean peak-memory counters, no
JAX/PyTorch allocator fight, one compiled torch graph per stage); on CPU everything runs in this
process by default (`--isolate`). torch.compile is skipped on CPU by default (`--torch_compile`):
the tiny preset then reports eager transformers, and says so.

llava-jax options are swept with `--variants`: semicolon-separated sets of comma-separated
key=value (keys: attention, remat, loss_chunk, frozen_bf16, param_dtype, xla = a named XLA_FLAGS
set from XLA_FLAG_SETS), e.g.
`--variants="attention=cudnn_padded,remat=dots;attention=xla,remat=dots"`; each set is one row.
`--profile_dir` writes a jax.profiler trace (xplane.pb for TensorBoard/XProf, trace.json.gz for
Perfetto) of 2 timed steps of each llava-jax run and a torch.profiler Chrome trace (.json.gz) of one
step of each transformers run, flat in that folder; for a decode run, one whole generate.
Results: printed table, appended to `--markdown` (device, versions, date, exact command) and, as
JSON lines, to `--json`; `--from_json` re-renders saved results (e.g. runs split over commands).
`--resume` (with `--json`) runs only the jobs that file holds no result for: a rerun after a run
cut short measures the rest, and a job recorded as failed (a kernel that refused the shape) is
reported as it was, not retried. `launch/gpu_bench.sh OUT` is the short GPU run: stage-2
training and decoding of the h100 preset, each measurement appended to OUT/bench.jsonl as it
finishes, under a wall limit, resumable.
"""

# No JAX (or torch) import at the top of any module of this package: the parent process and the
# torch workers must not initialise JAX on the device the JAX workers own; each job imports what
# it runs.
from llava_jax.tools.bench.cli import geometry_from_args, main, parse_args
from llava_jax.tools.bench.report import derive, markdown_block, render_table
from llava_jax.tools.bench.runner import RESULT_PREFIX, build_jobs, run_isolated, run_job, versions
from llava_jax.tools.bench.workload import (
    DEFAULT_VARIANT,
    PRESETS,
    VARIANT_KEYS,
    XLA_FLAG_SETS,
    Geometry,
    parse_variants,
    prompt_tokens,
    train_tokens,
    variant_label,
)

__all__ = [
    "DEFAULT_VARIANT", "PRESETS", "RESULT_PREFIX", "VARIANT_KEYS", "XLA_FLAG_SETS", "Geometry",
    "build_jobs", "derive", "geometry_from_args", "main", "markdown_block", "parse_args", "parse_variants",
    "prompt_tokens", "render_table", "run_isolated", "run_job", "train_tokens", "variant_label", "versions",
]
