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

Model sizes come from the config's checkpoint directories when they exist locally, else from the
named preset `model.preset` or the one the directory names (vicuna-7b-v1.5, llava-1.5-13b-hf, ...:
`llava_jax.config.PRESETS`), through `llava_jax.build.model_config`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (path:arg)", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-64, v5e-256, v6e-64, ... or generation:chip grid (v5p:2x4x4)")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "per-chip HBM capacity in GiB (0: the generation's)")
_TOP = flags.DEFINE_integer("top", 8, "how many of the largest arrays to list")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "LLM vocabulary for model.init=scratch (0: 32064) or to override a "
                               "named preset's (0: the preset's own, e.g. 152064 for Qwen2-7B)")
_JSON = flags.DEFINE_string("json", "", "also write the report as JSON to this file")
flags.mark_flags_as_required(["config", "topology"])

GIB = 1024**3

# generation -> (get_topology_desc name prefix, "-N" units per chip, usable HBM GiB per chip, grid dims).
# HBM is what XLA's TPU compiler allows a program (it reports it in its out-of-memory error).
GENERATIONS = {
    "v5p": ("v5p", 2, 95.74, 3),  # v5p-N counts TensorCores: N/2 chips (one JAX device each)
    "v5e": ("v5e", 1, 15.75, 2),  # v5e-N / v6e-N count chips
    "v5litepod": ("v5e", 1, 15.75, 2),
    "v6e": ("v6e", 1, 31.25, 2),
}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

class UsageError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    desc_name: str  # for get_topology_desc, e.g. "v5p:2x4x4"
    chips: int
    hbm_gib: float


def parse_topology(name: str, hbm_gib: float = 0.0) -> Topology:
    """`v5p-64` (Cloud TPU accelerator type) or `v5p:2x4x4` (generation:chip grid)."""
    m = re.fullmatch(r"(v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if m:
        prefix, per, hbm, dims = GENERATIONS[m.group(1)]
        n = int(m.group(2))
        if n % per:
            raise UsageError(f"{name}: v5p-N counts TensorCores, N must be even")
        chips = n // per
        shape = (SHAPES_3D if dims == 3 else SHAPES_2D).get(chips)
        if shape is None:
            raise UsageError(f"{name}: unknown slice size; give the chip grid, e.g. {prefix}:2x4x4")
        return Topology(name, f"{prefix}:{shape}", chips, hbm_gib or hbm)
    m = re.fullmatch(r"(v5p|v5e|v6e):(\d+(?:x\d+)+)", name)
    if m:
        chips = math.prod(int(x) for x in m.group(2).split("x"))
        return Topology(name, name, chips, hbm_gib or GENERATIONS[m.group(1)][2])
    raise UsageError(f"unknown topology {name!r}; use e.g. v5p-64, v5e-256, v6e-64 or v5p:2x4x4 "
                     "(v5p, v5e, v6e)")


def topology_devices(topo: Topology):
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise UsageError('libtpu is not installed: pip install "jax[tpu]==<your jax version>"') from e
    # Not on a TPU VM: tell libtpu what it would otherwise look up (and warn about).
    gen, _ = topo.desc_name.split(":")
    accel = {"v5e": f"v5litepod-{topo.chips}", "v6e": f"v6e-{topo.chips}"}.get(gen, f"{gen}-{2 * topo.chips}")
    # ALLOW_MULTIPLE_LIBTPU_LOAD: several compiles may run at once (no TPU to guard with a lockfile).
    for k, v in {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": accel, "TPU_WORKER_HOSTNAMES": "localhost",
                 "TPU_WORKER_ID": "0", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
        os.environ.setdefault(k, v)
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topo.desc_name).devices
    if len(devices) != topo.chips:
        raise UsageError(f"{topo.name}: libtpu gives {len(devices)} devices for {topo.desc_name}, expected {topo.chips}")
    return devices


# ------------------------------------------------------------------ the step, abstractly
def compile_step(config, topo: Topology, vocab_size: int = 0, devices=None, top: int = 8) -> dict:
    """Lower + compile the train step of `config` for `topo`; a report dict (see `main`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llava_jax import build
    from llava_jax import sharding as shd
    from llava_jax.models.llava import LlavaModel
    from llava_jax.train.state import step_flops

    devices = topology_devices(topo) if devices is None else devices
    mesh = shd.make_mesh(dict(config.train.mesh), devices=devices)
    pdb, gb = config.train.per_device_batch, config.train.global_batch
    try:
        grad_accum = build.grad_accum_steps(config, mesh)
        if config.model.init == "scratch":
            vocab_size = vocab_size or 32064
            cfg = build.model_config(config, vocab_size, image_token_id=vocab_size - 1)
        else:  # a checkpoint's or preset's own vocabulary unless one is given
            cfg = build.model_config(config, vocab_size or None)
    except ValueError as e:
        raise UsageError(f"{e}; set --config.train.global_batch / the model paths") from None
    # params as ShapeDtypeStructs with the run's shardings on the topology's mesh
    abs_model = nnx.merge(*shd.abstract_model(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)), mesh))
    t0 = time.perf_counter()
    replicated = NamedSharding(mesh, P())
    batch = build.batch_spec(config, cfg, mesh)
    L, M = config.data.max_length, config.data.max_images_per_row
    # the trainer's own freezing, optimizer and compiled step (build.train_parts), lowered for the
    # TPU topology on abstract params
    parts = build.train_parts(config, mesh, abs_model, 1000, abstract=True, batch=batch)
    trainable, frozen, opt_state, step = parts.trainable, parts.frozen, parts.opt_state, parts.step
    lowered = step.lower(trainable, opt_state, frozen, batch, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    report = {
        "config": config.name, "topology": topo.name, "topology_desc": topo.desc_name, "chips": topo.chips,
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "per_device_batch": pdb,
        "global_batch": gb, "grad_accum": grad_accum, "max_length": L, "remat": config.model.remat,
        "loss_chunk": config.model.loss_chunk, "cast_frozen": bool(config.model.cast_frozen),
        "dtype": config.model.dtype, "param_dtype": config.model.param_dtype, "hbm_gib": topo.hbm_gib,
        "trainable": list(config.trainable),
        # model FLOPs (6N + attention per token; every image slot filled, as the static-shape step computes)
        "model_tflops_per_step": step_flops(cfg, {"lora" if "lora" in p else p.split("/")[0] for p in config.trainable},
                                            gb * L, gb * M, L) / 1e12,
        "params": {"trainable": _count(trainable), "frozen": _count(frozen)},
        "largest": _largest([("params", trainable), ("frozen", frozen), ("opt_state", opt_state)], top),
    }
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA reports out-of-memory at compile time
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "memory" not in msg.lower():
            raise
        report.update(fits=False, error=msg.strip().splitlines()[0][:2000], error_full=msg,
                      compile_s=time.perf_counter() - t0)
        return report
    report["compile_s"] = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temps, code = mem.alias_size_in_bytes, mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
    total = args + outs - alias + temps + code
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    xla_flops = float(cost.get("flops", 0.0))
    report.update(
        fits=total <= topo.hbm_gib * GIB,
        memory={"arguments": args, "outputs": outs, "aliased": alias, "temps": temps, "code": code, "total": total},
        hbm_used_frac=total / (topo.hbm_gib * GIB),
        # XLA's cost analysis counts a loop body once (layers and accumulation are loops): reference only
        xla_cost_analysis_tflops=xla_flops / 1e12,
    )
    return report


def _count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _largest(named_trees, k: int) -> list[dict]:
    import jax

    from llava_jax.train.state import path_str

    rows = []
    for name, tree in named_trees:
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            nbytes = math.prod(x.shape) * x.dtype.itemsize
            shard = x.sharding.shard_shape(x.shape)
            rows.append({"array": f"{name}/{path_str(path)}", "shape": list(x.shape), "dtype": str(x.dtype),
                         "spec": str(x.sharding.spec), "bytes": nbytes,
                         "per_device_bytes": math.prod(shard) * x.dtype.itemsize})
    return sorted(rows, key=lambda r: -r["bytes"])[:k]


# ------------------------------------------------------------------ report
def _gib(b) -> str:
    return f"{b / GIB:.2f} GiB"


def format_report(r: dict) -> str:
    out = [f"{r['config']} on {r['topology']} ({r['topology_desc']}, {r['chips']} x {r['device_kind']}, "
           f"{r['hbm_gib']:g} GiB HBM each)",
           f"  mesh {r['mesh']}, per-device batch {r['per_device_batch']} x {r['grad_accum']} accumulation = "
           f"global batch {r['global_batch']} rows of {r['max_length']}, remat {r['remat']}, "
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
            "per chip; 6N + attention per token, every image slot filled)",
            "  largest arrays (global shape, sharding, per device):"]
    for a in r["largest"]:
        out.append(f"    {a['array']:<44} {str(tuple(a['shape'])):<24} {a['dtype']:<8} {a['spec']:<40} "
                   f"{a['per_device_bytes'] / 2**20:,.0f} MiB")
    return "\n".join(out)


def main(argv):
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; the TPU devices are abstract
    try:
        topo = parse_topology(_TOPOLOGY.value, _HBM.value)
        report = compile_step(_CONFIG.value, topo, _VOCAB.value, top=_TOP.value)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(report), flush=True)
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(report, indent=2))
    sys.exit(0 if report["fits"] else 1)


def run():
    from llava_jax.cli import run_absl

    run_absl(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
