"""Ahead-of-time compile of the real train step for a Cloud TPU topology, on any machine.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # brings libtpu
    python -m llava_jax.tools.aot --config=configs/llava_v1_5.py:7b_stage2 --topology=v5p-64 \
        [--config.train.per_device_batch=2 --config.model.remat=full --config.train.mesh.fsdp=-1 ...]

The TPU topology's devices come from `jax.experimental.topologies.get_topology_desc` (libtpu, no
TPU needed). The model, its trainable/frozen split, the optimizer state and one global batch are
abstract (`jax.eval_shape` / `ShapeDtypeStruct` with the run's shardings): no weight is ever
materialised. The step that `llava_jax.train` runs is lowered and compiled for the real model
size and mesh, then the tool prints per-device memory (arguments, outputs, temporaries, total vs
the chip's HBM), FLOPs per step and the sharding of the largest arrays. Exit status 1 when the
step does not fit (XLA's own out-of-memory error included), 2 on a usage error.

Model sizes come from the config's checkpoint directories when they exist locally, else from the
known architectures below by directory name (vicuna-7b-v1.5, vicuna-13b-v1.5, CLIP ViT-L/14-336).
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

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (path:arg)", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-64, v5e-256, v6e-64, ... or generation:chip grid (v5p:2x4x4)")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "per-chip HBM capacity in GiB (0: the generation's)")
_TOP = flags.DEFINE_integer("top", 8, "how many of the largest arrays to list")
_VOCAB = flags.DEFINE_integer("vocab_size", 32064, "LLM vocabulary for model.init=scratch or known-architecture configs")
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

# Known architectures (HF config values), used when the config names a checkpoint directory that
# is not on this machine.
TEXT_ARCHS = {
    "vicuna-7b-v1.5": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                           head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "vicuna-13b-v1.5": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                            num_kv_heads=40, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5),
}
TEXT_ARCHS["llava-1.5-7b-hf"] = TEXT_ARCHS["vicuna-7b-v1.5"]
TEXT_ARCHS["llava-1.5-13b-hf"] = TEXT_ARCHS["vicuna-13b-v1.5"]
VISION_ARCHS = {
    "clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                                       image_size=336, patch_size=14, projection_dim=768),
}


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


# ------------------------------------------------------------------ the model, abstractly
def model_config(config, vocab_size: int):
    from llava_jax.config import LlavaConfig, RuntimeOptions, TextConfig, VisionConfig
    from llava_jax.train import trainer

    m = config.model
    if m.init == "scratch":
        return trainer.scratch_model_config(config, vocab_size, image_token_id=vocab_size - 1)
    path = m.hf_path if m.init == "hf" else m.llm_path
    if path and (Path(path) / "config.json").exists() and (m.init == "hf" or (Path(m.clip_path) / "config.json").exists()):
        kw = dict(clip_path=m.clip_path or None, **trainer.runtime_options(config))
        if m.init == "clip_llama":
            kw.update(projector_type=m.projector_type, vision_feature_layer=m.vision_feature_layer)
        return trainer._probe_config(path, kw)  # noqa: SLF001 - the trainer's own reader
    text_key, vis_key = Path(path or "").name, Path(m.clip_path or "clip-vit-large-patch14-336").name
    if text_key not in TEXT_ARCHS or vis_key not in VISION_ARCHS:
        raise UsageError(f"no local config.json for {path!r} / {m.clip_path!r} and not a known architecture "
                         f"({sorted(TEXT_ARCHS)}, {sorted(VISION_ARCHS)}); point the config at checkpoint dirs")
    return LlavaConfig(vision=VisionConfig(**VISION_ARCHS[vis_key]),
                       text=TextConfig(vocab_size=vocab_size, **TEXT_ARCHS[text_key]),
                       image_token_id=32000, projector_type=m.projector_type,
                       vision_feature_layer=m.vision_feature_layer,
                       vision_feature_select_strategy=m.vision_feature_select_strategy,
                       runtime=RuntimeOptions(**trainer.runtime_options(config)))


def _abstract_sharded(state, mesh):
    """nnx.State of abstract Params -> same tree with ShapeDtypeStruct values carrying shardings."""
    import jax
    from flax import nnx

    from llava_jax.train import mesh as mesh_lib

    def one(v):
        val = v.get_value() if hasattr(v, "get_value") else v.value
        sh = mesh_lib.named_sharding(v.get_metadata()["axes"], val.shape, mesh)
        return v.replace(jax.ShapeDtypeStruct(val.shape, val.dtype, sharding=sh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def compile_step(config, topo: Topology, vocab_size: int = 32064, devices=None, top: int = 8) -> dict:
    """Lower + compile the train step of `config` for `topo`; a report dict (see `main`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llava_jax.models.llava import LlavaModel
    from llava_jax.train import mesh as mesh_lib
    from llava_jax.train import trainer
    from llava_jax.train.state import make_optimizer, make_train_step, opt_state_shardings, split_model, step_flops

    devices = topology_devices(topo) if devices is None else devices
    mesh = mesh_lib.make_mesh(dict(config.train.mesh), devices=devices)
    dp = mesh_lib.data_parallel_size(mesh)
    pdb, gb = config.train.per_device_batch, config.train.global_batch
    if gb % (pdb * dp):
        raise UsageError(f"global_batch {gb} is not a multiple of per_device_batch {pdb} x {dp} data-parallel "
                         f"devices; set --config.train.global_batch")
    grad_accum = gb // (pdb * dp)

    cfg = model_config(config, vocab_size)
    abs_model = nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, trainable, frozen = split_model(abs_model, list(config.trainable))
    trainable, frozen = _abstract_sharded(trainable, mesh), _abstract_sharded(frozen, mesh)
    frozen = trainer.frozen_for_training(frozen, config)  # model.cast_frozen, as the trainer does
    tx, schedule = make_optimizer(config.optim, 1000, trainable)
    t0 = time.perf_counter()
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             jax.eval_shape(tx.init, trainable), opt_state_shardings(tx, trainable, mesh))

    L, M, S = config.data.max_length, config.data.max_images_per_row, cfg.vision.image_size
    shapes = {"input_ids": ((gb, L), jnp.int32), "targets": ((gb, L), jnp.int32),
              "segment_ids": ((gb, L), jnp.int32), "positions": ((gb, L), jnp.int32),
              "images": ((gb, M, S, S, 3), jnp.uint8), "image_mask": ((gb, M), jnp.bool_)}
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=mesh_lib.batch_sharding(mesh, len(s))) for k, (s, d) in shapes.items()}

    sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    train_step = make_train_step(graphdef, tx, schedule, grad_accum)
    step = jax.jit(mesh_lib.with_batch_sharded_activations(train_step, mesh),
                   in_shardings=(sh(trainable), sh(opt_state), sh(frozen), sh(batch), replicated),
                   out_shardings=(sh(trainable), sh(opt_state), replicated), donate_argnums=(0, 1))
    lowered = step.lower(trainable, opt_state, frozen, batch, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    report = {
        "config": config.name, "topology": topo.name, "topology_desc": topo.desc_name, "chips": topo.chips,
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "per_device_batch": pdb,
        "global_batch": gb, "grad_accum": grad_accum, "max_length": L, "remat": config.model.remat,
        "loss_chunk": config.model.loss_chunk, "cast_frozen": bool(config.model.cast_frozen),
        "dtype": config.model.dtype, "param_dtype": config.model.param_dtype, "hbm_gib": topo.hbm_gib,
        "trainable": list(config.trainable),
        # model FLOPs (6N + attention per token; every image slot filled, as the static-shape step computes)
        "model_tflops_per_step": step_flops(cfg, {p.split("/")[0] for p in config.trainable}, gb * L, gb * M, L) / 1e12,
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
    app.run(main)


if __name__ == "__main__":
    run()
