"""`tools/aot.py --sweep`: compile one recipe for one TPU topology over a grid of mesh shapes
(data x fsdp x tensor), remat policies, per-chip batches and attention implementations, and rank
what fits by the compiler's estimated tokens/s (`aot_compile.estimate_step_time`).

The grid is pruned before anything compiles: a mesh must use every chip, its batch axes
(data x fsdp) must divide the global batch and `tensor` the attention heads; a per-chip batch
must divide global batch / batch axes. Per (mesh, remat, attention) the per-chip batches are
tried largest first and the first that fits ends the search: a smaller one runs the same
per-chip work in more micro-batches (accumulation), which the estimate cannot rank higher
(it only adds optimizer updates). Each point costs one full compile (memory, fit) plus two or
three shallow unrolled ones (time) -- minutes for 7B on a small CPU -- so every point's report
is cached as JSON under ~/.cache/llava_jax/aot/ (LLAVA_JAX_AOT_CACHE), keyed by a hash of the
resolved config, topology, vocabulary, jax and libtpu versions: a rerun only compiles what is new.
(JAX's own persistent compilation cache does write entries for these TPU AOT compiles, but the
cost analysis, the estimate's extrapolation and the out-of-memory verdicts are ours to keep.)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

from llava_jax.tools import aot_compile

CACHE_VERSION = 1  # bump when a report's content changes meaning


def cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_JAX_AOT_CACHE", "~/.cache/llava_jax/aot")).expanduser()


def cache_key(config, topo: aot_compile.Topology, vocab_size: int) -> str:
    import jax

    try:
        libtpu = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        libtpu = ""
    blob = json.dumps({"config": json.loads(config.to_json_best_effort(sort_keys=True)), "topology": topo.desc_name,
                       "hbm_gib": topo.hbm_gib, "vocab": vocab_size, "jax": jax.__version__, "libtpu": libtpu,
                       "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_compile(config, topo: aot_compile.Topology, vocab_size: int, devices, use_cache: bool = True) -> dict:
    """`aot_compile.compile_step` with the estimate, its report read from / written to the cache."""
    path = cache_dir() / f"{cache_key(config, topo, vocab_size)}.json"
    if use_cache and path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    report = aot_compile.compile_step(config, topo, vocab_size, devices=devices, top=0)
    report.pop("error_full", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)
    return {**report, "cached": False}


# ------------------------------------------------------------------ the grid
def parse_mesh(text: str) -> tuple[int, int, int]:
    """`2x16x1` -> (data, fsdp, tensor)."""
    try:
        d, f, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise aot_compile.UsageError(f"mesh {text!r}: give data x fsdp x tensor, e.g. 2x16x1") from None
    return d, f, t


def mesh_shapes(chips: int, global_batch: int, heads: int, config_mesh: dict, given=()) -> list[tuple[int, int, int]]:
    """Candidate (data, fsdp, tensor) meshes: `given`, else the config's own, all-fsdp, data 2 x fsdp,
    fsdp x tensor 2 -- each kept only if it uses every chip, data x fsdp divides the global batch
    and tensor divides the heads."""
    from llava_jax import sharding as shd

    if given:
        cands = [parse_mesh(m) for m in given]
    else:
        own = tuple(shd.resolve_mesh_shape(dict(config_mesh), chips))
        cands = [own, (1, chips, 1), (2, chips // 2, 1), (1, chips // 2, 2)]
    out = []
    for d, f, t in cands:
        ok = d * f * t == chips and min(d, f, t) >= 1 and global_batch % (d * f) == 0 and heads % t == 0
        if given and not ok:
            raise aot_compile.UsageError(f"mesh {d}x{f}x{t} does not fit {chips} chips, global batch {global_batch} "
                                         f"and {heads} heads")
        if ok and (d, f, t) not in out:
            out.append((d, f, t))
    return out


def batch_sizes(global_batch: int, dp: int, given=()) -> list[int]:
    """Per-chip batches, largest first: `given` (those that divide global_batch / dp), else
    global_batch / dp (no accumulation) and its halves down to 1."""
    rows = global_batch // dp
    if given:
        return sorted({b for b in given if rows % b == 0}, reverse=True)
    out, b = [], rows
    while b >= 1:
        out.append(b)
        if b % 2:
            break
        b //= 2
    return out


def sweep(config, topo: aot_compile.Topology, vocab_size: int, meshes=(), remats=(), batches=(), attentions=(),
          use_cache: bool = True, log=print) -> list[dict]:
    """Compile the grid (module docstring); the reports, ranked by estimated tokens/s (what does
    not fit last)."""
    devices = aot_compile.topology_devices(topo)
    cfg = aot_compile.model_config(config, vocab_size)
    gb = config.train.global_batch
    remats = list(remats) or list(dict.fromkeys([config.model.remat, "full"]))
    attentions = list(attentions) or list(dict.fromkeys([config.model.attention_impl, "splash"]))
    reports = []
    for d, f, t in mesh_shapes(topo.chips, gb, cfg.text.num_kv_heads, config.train.mesh, meshes):
        for remat in remats:
            for attention in attentions:
                for pdb in batch_sizes(gb, d * f, batches):
                    c = config.copy_and_resolve_references()
                    c.train.mesh.data, c.train.mesh.fsdp, c.train.mesh.tensor = d, f, t
                    c.model.remat, c.model.attention_impl, c.train.per_device_batch = remat, attention, pdb
                    r = cached_compile(c, topo, vocab_size, devices, use_cache)
                    reports.append(r)
                    log(format_row(r), flush=True)
                    if r["fits"]:
                        break
    return rank(reports)


def rank(reports: list[dict]) -> list[dict]:
    def key(r):
        e = r.get("estimate")
        return (0, -e["tokens_per_s"]) if r["fits"] and e else (1, r.get("memory", {}).get("total", 0))
    return sorted(reports, key=key)


def format_row(r: dict) -> str:
    m = r["mesh"]
    head = (f"{m['data']}x{m['fsdp']}x{m['tensor']:<3} {r['remat']:<14} {r.get('attention_impl', 'xla'):<6} "
            f"{r['per_device_batch']:>3} x{r['grad_accum']:<3}")
    if "memory" not in r:
        return head + "  does not fit (XLA out of memory)" + (" [cached]" if r.get("cached") else "")
    mem = f"{r['memory']['total'] / aot_compile.GIB:7.2f} GiB {r['hbm_used_frac']:4.0%}"
    e = r.get("estimate")
    if not r["fits"] or not e:
        return head + f" {mem}  does not fit" + (" [cached]" if r.get("cached") else "")
    mfu = "  n/a" if e["mfu"] is None else f"{e['mfu']:5.1%}"
    return (head + f" {mem} {e['step_s'] * 1e3:9.1f} {e['tokens_per_s_per_chip']:9,.0f} {e['tokens_per_s']:11,.0f} "
            f"{mfu}" + (" [cached]" if r.get("cached") else ""))


HEADER = ("mesh d x f x t remat          attn   pdb x acc    memory / HBM    step ms  tok/s/chip  tok/s slice   MFU"
          "\n" + "-" * 104)


def format_sweep(config_name: str, topo: aot_compile.Topology, reports: list[dict]) -> str:
    out = [f"{config_name} on {topo.name} ({topo.chips} chips): {len(reports)} configurations, ranked by "
           "estimated tokens/s (compiler estimate: XLA's TPU cost model, not a measurement)", HEADER]
    out += [format_row(r) for r in reports]
    return "\n".join(out)
