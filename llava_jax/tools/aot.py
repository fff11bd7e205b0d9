"""Ahead-of-time compile of the real train step for a Cloud TPU topology, on any machine.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # brings libtpu
    python -m llava_jax.tools.aot --config=configs/llava_v1_5.py:7b_stage2 --topology=v5p-64 \
        [--config.train.per_device_batch=2 --config.model.remat=full --config.train.mesh.fsdp=-1 ...]

The TPU topology's devices come from `jax.experimental.topologies.get_topology_desc` (libtpu, no
TPU needed). The model, its trainable/frozen split, the optimizer state and one global batch are
abstract (`ShapeDtypeStruct`s with the run's shardings; the params from
`llava_jax.sharding.abstract_model`): no weight is ever materialised. The step that
`llava_jax.train` runs is lowered and compiled for the real model size and mesh, then the tool
prints per-device memory (arguments, outputs, temporaries, total vs the chip's HBM), FLOPs per
step and the sharding of the largest arrays. Exit status 1 when the step does not fit (XLA's own
out-of-memory error included), 2 on a usage error.

Beside memory it prints the compiler estimate: XLA's TPU cost model's step time (from shallow
unrolled compiles, see `estimate_step_time`), tokens/s and samples/s per chip and for the slice,
and the implied MFU (`train_step.step_flops` over estimated time x chips x the generation's
peak, `train.metrics.PEAK_TFLOPS`), and the collectives one chip runs per step (count and GiB of
the all-gathers, all-reduces, ... in the estimate's compiled HLO). A model of the hardware, not a measurement: docs/performance.md
("Compiler estimates") says how far it was from published measured figures.

    python -m llava_jax.tools.aot --config=configs/llava_v1_5.py:7b_stage2 --topology=v5p-64 --sweep \
        [--sweep_mesh=1x32x1,2x16x1 --sweep_remat=full,dots_no_batch --sweep_batch=4,2 --json=sweep.json]

ranks the configurations that fit by estimated tokens/s (`llava_jax/tools/aot_sweep.py`; results
cached under ~/.cache/llava_jax/aot/). `--config.data.max_images_per_row=0` compiles a text-only
step (the LLM alone; for calibration against published LLM figures).

Model sizes come from the config's checkpoint directories when they exist locally, else from the
named preset `model.preset` or the one the directory names (vicuna-7b-v1.5, llava-1.5-13b-hf, ...:
`llava_jax.presets.PRESETS`), through `llava_jax.build.model_config`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from llava_jax.tools import aot_sweep
from llava_jax.tools.aot_compile import GIB, UsageError, compile_step, parse_topology


def _define_flags():
    """The command's flags, defined when it runs (not on import: `python -m` would otherwise define them
    twice, as __main__ and as llava_jax.tools.aot)."""
    global _CONFIG, _TOPOLOGY, _HBM, _TOP, _VOCAB, _JSON, _ESTIMATE, _CACHE
    global _SWEEP, _SWEEP_MESH, _SWEEP_REMAT, _SWEEP_BATCH, _SWEEP_ATTN
    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (path:arg)", lock_config=True)
    _TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-64, v5e-256, v6e-64, ... or generation:chip grid (v5p:2x4x4)")
    _HBM = flags.DEFINE_float("hbm_gib", 0.0, "per-chip HBM capacity in GiB (0: the generation's)")
    _TOP = flags.DEFINE_integer("top", 8, "how many of the largest arrays to list")
    _VOCAB = flags.DEFINE_integer("vocab_size", 0, "LLM vocabulary for model.init=scratch (0: 32064) or to override a "
                                   "named preset's (0: the preset's own, e.g. 152064 for Qwen2-7B)")
    _JSON = flags.DEFINE_string("json", "", "also write the report as JSON to this file")
    _ESTIMATE = flags.DEFINE_bool("estimate", True, "add the compiler's step-time estimate (a few shallow compiles more)")
    _SWEEP = flags.DEFINE_bool("sweep", False, "compile a grid of meshes / remat / per-chip batch / attention and rank "
                               "what fits by estimated tokens/s (llava_jax/tools/aot_sweep.py)")
    _SWEEP_MESH = flags.DEFINE_list("sweep_mesh", [], "meshes as data x fsdp x tensor (2x16x1,...); default: the "
                                    "config's, all-fsdp, 2 x fsdp, fsdp x 2 tensor")
    _SWEEP_REMAT = flags.DEFINE_list("sweep_remat", [], "remat policies; default: the config's and full")
    _SWEEP_BATCH = flags.DEFINE_list("sweep_batch", [], "per-chip batches; default: global batch / batch axes and halves")
    _SWEEP_ATTN = flags.DEFINE_list("sweep_attention", [], "attention implementations; default: the config's and "
                                    "splash (the TPU kernel)")
    _CACHE = flags.DEFINE_bool("cache", True, "--sweep: reuse reports cached under ~/.cache/llava_jax/aot")
    flags.mark_flags_as_required(["config", "topology"])


# ------------------------------------------------------------------ report
def _gib(b) -> str:
    return f"{b / GIB:.2f} GiB"


def format_report(r: dict) -> str:
    out = [f"{r['config']} on {r['topology']} ({r['topology_desc']}, {r['chips']} x {r['device_kind']}, "
           f"{r['hbm_gib']:g} GiB HBM each)",
           f"  mesh {r['mesh']}, per-device batch {r['per_device_batch']} x {r['grad_accum']} accumulation = "
           f"global batch {r['global_batch']} rows of {r['max_length']}, remat {r['remat']}, "
           f"attention {r.get('attention_impl', 'xla')}, "
           f"{r['dtype']} compute / {r['param_dtype']} params, compiled in {r['compile_s']:.0f}s"]
    out.append(f"  params: {r['params']['trainable']:,} trainable, {r['params']['frozen']:,} frozen")
    if "error" in r:
        out.append(f"  DOES NOT FIT: XLA: {r['error']}")
    else:
        m = r["memory"]
        out += ["  per-device memory: arguments " + _gib(m["arguments"]) + ", outputs " + _gib(m["outputs"])
                + " (aliased " + _gib(m["aliased"]) + "), temps " + _gib(m["temps"]) + ", code " + _gib(m["code"]),
                f"  total {_gib(m['total'])} of {r['hbm_gib']:g} GiB ({r['hbm_used_frac']:.0%}): "
                + ("FITS" if r["fits"] else "DOES NOT FIT")]
    out += [f"  FLOPs per step: model {r['model_tflops_per_step']:,.1f} TFLOP ({r['model_tflops_per_step'] / r['chips']:,.1f} "
            "per chip; 6N + attention per token, every image slot filled)"]
    out += format_estimate(r)
    out.append("  largest arrays (global shape, sharding, per device):")
    for a in r["largest"]:
        out.append(f"    {a['array']:<44} {str(tuple(a['shape'])):<24} {a['dtype']:<8} {a['spec']:<40} "
                   f"{a['per_device_bytes'] / 2**20:,.0f} MiB")
    return "\n".join(out)


def format_estimate(r: dict) -> list[str]:
    e = r.get("estimate")
    if not e:
        return []
    mfu = "n/a (unknown peak)" if e["mfu"] is None else f"{e['mfu']:.1%} of {e['peak_tflops_per_chip']:g} TFLOP/s per chip"
    return [f"  step time (compiler estimate): {e['step_s'] * 1e3:,.4g} ms ({r['grad_accum']} x {e['micro_step_s'] * 1e3:,.4g} ms"
            f" micro-step); shallow compiles {e['compile_s']:.0f}s",
            f"  throughput (compiler estimate): {e['tokens_per_s_per_chip']:,.0f} tokens/s per chip, "
            f"{e['tokens_per_s']:,.0f} for the slice; {e['samples_per_s_per_chip']:,.3f} samples (rows of "
            f"{r['max_length']}) /s per chip, {e['samples_per_s']:,.2f} for the slice",
            f"  MFU (compiler estimate): {mfu}; XLA computes {e['xla_tflops_per_step']:,.1f} TFLOP per step "
            f"({e['xla_tflops_per_step'] / r['model_tflops_per_step']:.2f} x the model FLOPs)"] + (
            ["  collectives per step and chip (the estimate's compile; GiB of results): " + ", ".join(
                f"{op} {c['count']:,} ({c['bytes'] / 2**30:,.2f} GiB)" for op, c in e["collectives_per_step"].items())]
            if e.get("collectives_per_step") else [])


def main(argv):
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; the TPU devices are abstract
    try:
        topo = parse_topology(_TOPOLOGY.value, _HBM.value)
        if _SWEEP.value:
            print(aot_sweep.HEADER, flush=True)
            reports = aot_sweep.sweep(_CONFIG.value, topo, _VOCAB.value, _SWEEP_MESH.value, _SWEEP_REMAT.value,
                                      [int(b) for b in _SWEEP_BATCH.value], _SWEEP_ATTN.value, _CACHE.value)
            print("\n" + aot_sweep.format_sweep(_CONFIG.value.name, topo, reports), flush=True)
            if _JSON.value:
                Path(_JSON.value).write_text(json.dumps(reports, indent=2))
            sys.exit(0 if any(r["fits"] for r in reports) else 1)
        report = compile_step(_CONFIG.value, topo, _VOCAB.value, top=_TOP.value, estimate=_ESTIMATE.value)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(report), flush=True)
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(report, indent=2))
    sys.exit(0 if report["fits"] else 1)


def run():
    from llava_jax.cli import run_absl

    _define_flags()
    run_absl(main, sys.modules[__name__])


if __name__ == "__main__":
    from llava_jax.tools.aot import run as _run  # one copy of the module (see _define_flags)

    _run()
