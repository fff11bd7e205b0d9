"""The machinery of `tools/aot.py` (the command): a Cloud TPU topology's abstract devices, the
real train step lowered and compiled for them, its memory, and the compiler's step-time estimate.
`tools/aot_sweep.py` runs it over a grid; `tools/aot_calibrate.py` over published LLM cases.

The TPU topology's devices come from `jax.experimental.topologies.get_topology_desc` (libtpu, no
TPU needed). The model, its trainable/frozen split, the optimizer state and one global batch are
abstract (`ShapeDtypeStruct`s with the run's shardings; the params from
`llava_jax.sharding.abstract_model`): no weight is ever materialised. The step that
`llava_jax.train` runs is lowered and compiled for the real model size and mesh (`compile_step`);
the estimate (`estimate_step_time`) is XLA's TPU cost model over shallow unrolled compiles.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time

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
def _lower_step(config, mesh, cfg):
    """The trainer's own freezing, optimizer and jitted step (`build.train_parts`) for model
    geometry `cfg` on abstract params, lowered for `mesh`: (train parts, lowered step)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llava_jax import build
    from llava_jax import sharding as shd
    from llava_jax.models.llava import LlavaModel

    # params as ShapeDtypeStructs with the run's shardings on the topology's mesh
    abs_model = nnx.merge(*shd.abstract_model(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)), mesh))
    batch = build.batch_spec(config, cfg, mesh)
    if config.data.max_images_per_row == 0:  # text only (calibration against LLM-only figures)
        batch = {k: v for k, v in batch.items() if not k.startswith("image")}
    parts = build.train_parts(config, mesh, abs_model, 1000, abstract=True, batch=batch)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    return parts, parts.step.lower(parts.trainable, parts.opt_state, parts.frozen, batch, step)


def model_config(config, vocab_size: int):
    """The model geometry: `vocab_size` for model.init=scratch (0: 32064), else the checkpoint's or
    preset's own vocabulary unless one is given."""
    from llava_jax import build

    try:
        if config.model.init == "scratch":
            vocab_size = vocab_size or 32064
            return build.model_config(config, vocab_size, image_token_id=vocab_size - 1)
        return build.model_config(config, vocab_size or None)
    except ValueError as e:
        raise UsageError(f"{e}; set --config.train.global_batch / the model paths") from None


def compile_step(config, topo: Topology, vocab_size: int = 0, devices=None, top: int = 8,
                 estimate: bool = True) -> dict:
    """Lower + compile the train step of `config` for `topo`; a report dict (see `main`).
    `estimate`: add the compiler's step-time estimate (`estimate_step_time`; TPU devices only)."""
    from llava_jax import build
    from llava_jax import sharding as shd
    from llava_jax.train_step import step_flops

    devices = topology_devices(topo) if devices is None else devices
    mesh = shd.make_mesh(dict(config.train.mesh), devices=devices)
    pdb, gb = config.train.per_device_batch, config.train.global_batch
    try:
        grad_accum = build.grad_accum_steps(config, mesh)
    except ValueError as e:
        raise UsageError(f"{e}; set --config.train.global_batch / the model paths") from None
    cfg = model_config(config, vocab_size)
    t0 = time.perf_counter()
    L, M = config.data.max_length, config.data.max_images_per_row
    parts, lowered = _lower_step(config, mesh, cfg)
    trainable, frozen, opt_state = parts.trainable, parts.frozen, parts.opt_state
    report = {
        "config": config.name, "topology": topo.name, "topology_desc": topo.desc_name, "chips": topo.chips,
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "per_device_batch": pdb,
        "global_batch": gb, "grad_accum": grad_accum, "max_length": L, "remat": config.model.remat,
        "attention_impl": config.model.attention_impl,
        "loss_chunk": config.model.loss_chunk, "cast_frozen": bool(config.model.cast_frozen),
        "dtype": config.model.dtype, "param_dtype": config.model.param_dtype, "hbm_gib": topo.hbm_gib,
        "trainable": list(config.trainable),
        # model FLOPs (6N + attention per token; every image slot filled, as the static-shape step
        # computes; an AnyRes slot runs its base view and max_tiles tiles through tower and projector)
        "model_tflops_per_step": step_flops(cfg, _trains(config), gb * L, gb * M * _views_per_slot(cfg), L) / 1e12,
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
    report.update(
        fits=total <= topo.hbm_gib * GIB,
        memory={"arguments": args, "outputs": outs, "aliased": alias, "temps": temps, "code": code, "total": total},
        hbm_used_frac=total / (topo.hbm_gib * GIB),
        # XLA's cost analysis counts a loop body once (layers and accumulation are loops): reference only
        xla_cost_analysis_tflops=_cost(compiled)["flops"] / 1e12,
    )
    if estimate and report["fits"] and devices[0].platform == "tpu":
        report["estimate"] = estimate_step_time(config, cfg, mesh, report)
    return report


def _views_per_slot(cfg) -> int:
    """Tower passes per image slot in the compiled step: 1, or 1 + max_tiles for AnyRes."""
    return 1 + cfg.max_tiles if cfg.is_anyres else 1


def _trains(config) -> set[str]:
    """What `step_flops` needs to know of `config.trainable`: the top-level subtrees, "lora"."""
    return {"lora" if "lora" in p else p.split("/")[0] for p in config.trainable}


# Custom calls XLA's TPU cost model has no time for: each adds -1 s to `optimal_seconds` (seen with
# libtpu of jax 0.10.2: a shallow step with 9 `ConcatBitcast`s reported -8.99948 s, the same step
# deeper with 15 reported -14.9987 s; their FLOPs were right). They join two slices in place (no
# data moves), so adding the 1 s back leaves their time at zero.
UNCOSTED_CUSTOM_CALLS = ("ConcatBitcast",)


def _cost(compiled) -> dict:
    """Per-device cost analysis of a compiled executable: modelled seconds (TPU only; 0 elsewhere),
    FLOPs and bytes accessed."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    seconds = float(cost.get("optimal_seconds", 0.0))
    if seconds < 0:
        text = compiled.as_text()
        seconds += sum(text.count(f'custom_call_target="{t}"') for t in UNCOSTED_CUSTOM_CALLS)
    return {"seconds": seconds, "flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}


# The collectives a compiled step runs, read from its HLO: which op, how many, and the bytes of
# their results on one chip (an all-gather's result is the gathered array). The TPU compiler
# writes a reduce-scatter as an all-reduce whose result is then sliced (XLA's cost model gives a
# `psum_scatter` and an all-reduce + slice of one gradient the same time), so FSDP's gradient
# reduction shows up as all-reduce. An async op counts once (its -start; its -done is not matched).
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def hlo_collectives(text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in compiled HLO `text` (one chip's program)."""
    out = {}
    for line in text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        result, op, is_async = m.groups()
        arrays = _ARRAY.findall(result)
        if is_async:  # (operands, results, scalar contexts...): the results
            while arrays and not arrays[-1][1]:
                arrays.pop()
            arrays = arrays[len(arrays) // 2:]
        nbytes = sum(math.prod(int(d) for d in dims.split(",") if d) * _dtype_bytes(dt) for dt, dims in arrays)
        entry = out.setdefault(op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return out


def _dtype_bytes(hlo_type: str) -> int:
    """bf16 -> 2, f8e4m3fn -> 1, pred -> 1, s4 -> 1 (rounded up to a byte)."""
    bits = re.search(r"[0-9]+", hlo_type)
    return max(1, int(bits.group()) // 8) if bits else 1


# ------------------------------------------------------------------ compiler estimate
# XLA's TPU compiler models the run time of what it compiles (`cost_analysis()["optimal_seconds"]`,
# beside "flops" and "bytes accessed", per device). It counts a while loop's body ONCE, whatever
# its trip count (../shared/DESIGN.md, "TPU compiler estimate"), and the step is loops: the scanned
# LLM and vision layers, the chunked loss, gradient accumulation. So the estimate comes from
# shallow copies of the model with every `lax.scan` unrolled, one micro-batch per step, and is
# extrapolated linearly in depth: T(n_llm, n_vis) = T(a, b) + (n_llm - a) dT_llm + (n_vis - b) dT_vis,
# the per-layer slopes taken between depth a and a + 1 (a = 2: a one-layer scan is compiled
# differently). Then step = grad_accum x micro-step, which counts the optimizer update once per
# micro-batch: an overestimate by (grad_accum - 1) updates (memory-bound, ~1 ms at 7B on 32 chips).
# XLA's SPMD partitioner turns an FSDP matmul into a "windowed einsum" (collective matmul): a while
# loop over the shards whose body the cost model counts once. Seen on v5p-64 (7B, fsdp 32): 21 such
# loops per LLM layer, and the estimate's FLOPs 0.24 x the model's. The estimate's compiles turn
# them off: the same matmuls and collectives, not overlapped (so the estimate errs slow).
LOOP_FREE_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                     "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


# Pallas TPU kernels are custom calls XLA's cost model sees into only through the `pl.CostEstimate`
# a kernel carries (seen with libtpu of jax 0.10.2: jax's TPU flash-attention forward carries one
# and is costed at its FLOPs over the chip's peak, 34.56 GFLOP -> 0.175 ms on v5e). jax's splash
# kernels carry none, and XLA counts them as no FLOPs and no time, so the estimate's compiles give
# each of them one: 2 FLOPs per multiply-add of every score block the mask lets the kernel visit
# (the forward computes QK' and PV; the fused backward recomputes QK', then dO V', dV, dK and dQ),
# one exp per visited score, and its operands and results read / written once. XLA then costs the kernel as
# if it ran at the chip's peak: the estimate of the attention is a lower bound on its time.
SPLASH_MATMULS = {"fwd": ("qk", "v"), "dq": ("qk", "v", "qk"), "dkv": ("qk", "v", "v", "qk"),
                  "dkv_fused": ("qk", "v", "v", "qk", "qk")}


def _splash_cost_estimate(name: str, operands, out_shape):
    """The `pl.CostEstimate` of one splash kernel call (operands as jax 0.10's splash passes them:
    three mask tables, q [H, Lq, D], k [KV, Lk, D], v [KV, Lk, Dv], ..., and last the query
    positions, which only a causal or sliding-window mask reads)."""
    import jax.experimental.pallas as pl
    import numpy as np

    from llava_jax.models.layers import splash_visited_fraction

    q, k, v = operands[3:6]
    if not (q.ndim == k.ndim == v.ndim == 3 and k.shape[1] == q.shape[1] == v.shape[1]):
        raise RuntimeError(f"{name}: operands 3-5 are not q, k, v of one self-attention ({q.shape}, {k.shape}, "
                           f"{v.shape}): the splash kernel's call changed, update _splash_cost_estimate")
    heads, lq, d = q.shape
    masked = operands[-1] is not None
    phase = next(p for p in ("fwd", "dkv", "dq") if f"_{p}" in name)
    if phase == "dkv" and out_shape[3] is not None:  # the fused backward also writes dQ
        phase = "dkv_fused"
    dims = {"qk": d, "v": v.shape[-1]}
    scores = heads * lq * lq * (splash_visited_fraction(heads, lq) if masked else 1.0)
    arrays = [x for x in (*operands, *out_shape) if x is not None and hasattr(x, "shape")]
    return pl.CostEstimate(flops=int(scores * sum(2 * dims[m] for m in SPLASH_MATMULS[phase])),
                           transcendentals=int(scores),
                           bytes_accessed=int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in arrays)))


@contextlib.contextmanager
def _costed_splash_kernels():
    """Every splash kernel traced inside carries `_splash_cost_estimate` (see above). Yields the
    names of the kernels it costed."""
    import jax
    import jax.experimental.pallas as pl

    pallas_call = pl.pallas_call
    costed_names: list[str] = []

    def costed(kernel, *args, name=None, cost_estimate=None, **kwargs):
        if cost_estimate is not None or not str(name).startswith("splash_"):
            return pallas_call(kernel, *args, name=name, cost_estimate=cost_estimate, **kwargs)

        def call(*operands):
            estimate = _splash_cost_estimate(name, operands, kwargs["out_shape"])
            costed_names.append(name)
            return pallas_call(kernel, *args, name=name, cost_estimate=estimate, **kwargs)(*operands)

        return call

    # splash's entry point is a jax.jit, whose traces are cached: a kernel traced before (the
    # memory compile) would come back uncosted, and a costed one would outlive this context
    jax.clear_caches()
    pl.pallas_call = costed
    try:
        yield costed_names
    finally:
        pl.pallas_call = pallas_call
        jax.clear_caches()


@contextlib.contextmanager
def _unrolled_scans():
    """Every `jax.lax.scan` traced inside is fully unrolled (the models call `jax.lax.scan`)."""
    import jax

    scan = jax.lax.scan

    def unrolled(f, init, xs=None, length=None, reverse=False, unroll=1, _split_transpose=False):
        del unroll
        return scan(f, init, xs, length=length, reverse=reverse, unroll=True)

    jax.lax.scan = unrolled
    try:
        yield
    finally:
        jax.lax.scan = scan


def _at_depth(cfg, llm_layers: int, vision_layers: int | None):
    """`cfg` with `llm_layers` LLM layers and `vision_layers` vision layers run (the layers after
    the feature layer stay; None: the vision tower as is)."""
    text = dataclasses.replace(cfg.text, num_layers=llm_layers)
    if vision_layers is None:
        return cfg.replace(text=text)
    if len(cfg.feature_layers) != 1:
        raise UsageError("the compiler estimate supports one vision feature layer")
    unrun = cfg.vision.num_layers - cfg.feature_layers[0]
    return cfg.replace(text=text, vision=dataclasses.replace(cfg.vision, num_layers=vision_layers + unrun),
                       vision_feature_layer=-(unrun + 1))


def _depth_points(n: int) -> tuple[int, int | None]:
    """(base depth, slope depth or None when the base already is the full depth)."""
    a = min(2, n)
    return a, (a + 1 if n > a else None)


def estimate_step_time(config, cfg, mesh, report: dict) -> dict:
    """The compiler's estimate of one train step of `config` (model geometry `cfg`) on `mesh`,
    from unrolled shallow compiles (see above); throughput and MFU from it."""
    from llava_jax import sharding as shd
    from llava_jax.train.metrics import peak_tflops

    t0 = time.perf_counter()
    micro = config.copy_and_resolve_references()
    micro.train.global_batch = config.train.per_device_batch * shd.data_parallel_size(mesh)  # no accumulation
    with_images = config.data.max_images_per_row > 0
    n_llm, n_vis = cfg.text.num_layers, cfg.feature_layers[0] if with_images else None
    (a, a1), (b, b1) = _depth_points(n_llm), _depth_points(n_vis) if with_images else (None, None)

    def cost(llm_layers, vision_layers):
        with _unrolled_scans(), _costed_splash_kernels() as costed:
            _, lowered = _lower_step(micro, mesh, _at_depth(cfg, llm_layers, vision_layers))
        compiled = lowered.compile(compiler_options=LOOP_FREE_OPTIONS)
        text = compiled.as_text()
        if " while(" in text:
            raise RuntimeError("the shallow compile for the compiler estimate still has a while loop, whose body "
                               "XLA's cost model counts once: the estimate would be too low")
        if 'custom_call_target="tpu_custom_call"' in text and not costed:
            raise RuntimeError("the step holds a Pallas kernel that XLA's cost model counts as no work and the "
                               "estimate has no cost for: the estimate would be too low")
        collectives = {f"{op} {key}": v for op, e in hlo_collectives(text).items() for key, v in e.items()}
        return {**_cost(compiled), **collectives}

    base = cost(a, b)
    points = [{"llm_layers": a, "vision_layers": b, **base}]
    total = dict(base)
    for depth, slope_depth, n, key in ((a, a1, n_llm, "llm_layers"), (b, b1, n_vis, "vision_layers")):
        if slope_depth is None:
            continue
        c = cost(slope_depth, b) if key == "llm_layers" else cost(a, slope_depth)
        points.append({"llm_layers": slope_depth if key == "llm_layers" else a,
                       "vision_layers": slope_depth if key == "vision_layers" else b, **c})
        for k in total.keys() | c.keys():
            total[k] = total.get(k, 0) + (n - depth) * (c.get(k, 0) - base.get(k, 0))
    k, chips = report["grad_accum"], report["chips"]
    step = k * total["seconds"]
    rows, tokens = report["global_batch"], report["global_batch"] * report["max_length"]
    peak = peak_tflops(report["device_kind"])
    out = {
        "method": "compiler estimate (XLA TPU cost model; unrolled shallow compiles extrapolated in depth)",
        "step_s": step, "micro_step_s": total["seconds"],
        "tokens_per_s": tokens / step, "tokens_per_s_per_chip": tokens / step / chips,
        "samples_per_s": rows / step, "samples_per_s_per_chip": rows / step / chips,
        "peak_tflops_per_chip": peak,
        "mfu": None if not peak else report["model_tflops_per_step"] * 1e12 / (step * chips * peak * 1e12),
        # what XLA computes (remat recompute, masked attention blocks, ...) against the model FLOPs
        "xla_tflops_per_step": k * total["flops"] * chips / 1e12,
        "hbm_bytes_per_chip_per_step": k * total["bytes"],
        # what one chip's step gathers / reduces / exchanges: each micro-step runs its own
        "collectives_per_step": {op: {"count": round(k * total[f"{op} count"]), "bytes": k * total[f"{op} bytes"]}
                                 for op in COLLECTIVES if total.get(f"{op} count", 0) > 0},
        "points": points, "compile_s": time.perf_counter() - t0,
    }
    if min(p["seconds"] for p in points) <= 0:
        raise RuntimeError(f"the compiler's time estimate is not positive at {points}: an op it has no cost for "
                           f"(aot.UNCOSTED_CUSTOM_CALLS lists the known ones)")
    return out


def _count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _largest(named_trees, k: int) -> list[dict]:
    import jax

    from llava_jax.train_step import path_str

    rows = []
    for name, tree in named_trees:
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            nbytes = math.prod(x.shape) * x.dtype.itemsize
            shard = x.sharding.shard_shape(x.shape)
            rows.append({"array": f"{name}/{path_str(path)}", "shape": list(x.shape), "dtype": str(x.dtype),
                         "spec": str(x.sharding.spec), "bytes": nbytes,
                         "per_device_bytes": math.prod(shard) * x.dtype.itemsize})
    return sorted(rows, key=lambda r: -r["bytes"])[:k]
