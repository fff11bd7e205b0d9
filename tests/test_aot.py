"""The ahead-of-time TPU compile tool: topology names, and (where libtpu is installed) a compile
of the tiny config's real train step for a v5e slice, a forced non-fit, the JSON report."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_jax.tools.aot_compile import UsageError, parse_topology

REPO = Path(__file__).resolve().parents[1]
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize("name, desc, chips, hbm", [
    ("v5p-64", "v5p:2x4x4", 32, 95.74),
    ("v5p-32", "v5p:2x2x4", 16, 95.74),
    ("v5e-256", "v5e:16x16", 256, 15.75),
    ("v5litepod-64", "v5e:8x8", 64, 15.75),
    ("v6e-64", "v6e:8x8", 64, 31.25),
    ("v5p:2x2x2", "v5p:2x2x2", 8, 95.74),
])
def test_topology_names(name, desc, chips, hbm):
    t = parse_topology(name)
    assert (t.desc_name, t.chips, t.hbm_gib) == (desc, chips, hbm)


@pytest.mark.parametrize("name", ["v5p-63", "v5e-48", "h100-8", "v5p", "v4-32"])
def test_bad_topology_names(name):
    with pytest.raises(UsageError):
        parse_topology(name)


def aot(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "llava_jax.tools.aot", f"--config={REPO}/configs/demo.py:tiny_stage2",
                           "--vocab_size=512", *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


@pytest.mark.skipif(HAVE_LIBTPU, reason="libtpu is installed")
def test_without_libtpu_says_how_to_install():
    p = aot("--topology=v5e-4")
    assert p.returncode == 2 and "jax[tpu]" in p.stderr


@pytest.mark.skipif(not HAVE_LIBTPU, reason='needs libtpu: pip install "jax[tpu]==<jax version>"')
def test_compiles_the_train_step_for_a_tpu_slice(tmp_path):
    out = tmp_path / "r.json"
    p = aot("--topology=v5e-4", "--config.train.mesh.data=2", "--config.train.mesh.fsdp=2", f"--json={out}")
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "FITS" in p.stdout and "largest arrays" in p.stdout and ", attention xla," in p.stdout
    r = json.loads(out.read_text())
    assert r["fits"] and r["chips"] == 4 and r["device_kind"].startswith("TPU v5")
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and r["grad_accum"] == 2
    m = r["memory"]
    assert 0 < m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temps"] + m["code"]
    assert r["model_tflops_per_step"] > 0
    # params are sharded as the rules table says: the embedding's `embed` dim over fsdp
    embed = next(a for a in r["largest"] if a["array"] == "params/llm/embed")
    assert embed["spec"] == "P(None, 'fsdp')" and embed["per_device_bytes"] * 2 == embed["bytes"]
    # the same step does not fit in a chip with (pretend) 1 MiB of HBM: exit status 1
    p = aot("--topology=v5e-4", "--hbm_gib=0.001")
    assert p.returncode == 1 and "DOES NOT FIT" in p.stdout


@pytest.mark.slow  # CI time (22 s)
def test_cast_frozen_shrinks_the_compiled_step_on_cpu():
    """The will-it-fit compile reads `model.cast_frozen` like the trainer (here on the CPU device,
    no libtpu needed): the step's arguments shrink by 2 bytes per cast frozen param."""
    import jax

    from llava_jax.demo.run import load_demo_config
    from llava_jax.tools import aot_compile as aot

    topo = aot.Topology(name="cpu", desc_name="cpu", chips=1, hbm_gib=16.0)
    reports = {}
    for cast in (False, True):
        c = load_demo_config("tiny_stage1")
        c.model.dtype, c.model.cast_frozen = "bfloat16", cast
        reports[cast] = aot.compile_step(c, topo, vocab_size=256, devices=jax.devices()[:1])
    assert reports[True]["cast_frozen"] and reports[True]["fits"]
    frozen = reports[False]["params"]["frozen"]
    saved = reports[False]["memory"]["arguments"] - reports[True]["memory"]["arguments"]
    assert 0 < saved <= 2 * frozen and saved % 2 == 0
    assert saved > 2 * frozen * 0.9  # all but the norms and position embeddings


def _run_tpu_script(script: str, timeout: int) -> dict:
    """Run `script` (it compiles for a TPU topology and prints RESULT + JSON) in a subprocess, so
    libtpu's environment stays out of this process; its JSON."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.split("RESULT", 1)[1])


# A small model with enough depth for the estimate's extrapolation (4 LLM layers, 3 vision layers
# run) and wide enough (1024) that matmuls, not per-op overheads, dominate the modelled time;
# compiled for v5e-4 in a subprocess (`_run_tpu_script`).
ESTIMATE_SCRIPT = r"""
import json, sys
from llava_jax import sharding as shd
from llava_jax.demo.run import load_demo_config
from llava_jax.tools import aot_compile as aot
from llava_jax.train_step import step_flops

def config(pdb):
    c = load_demo_config("tiny_stage2")
    c.model.dtype = "bfloat16"
    c.model.scratch.text.update(hidden_size=1024, intermediate_size=2048, num_layers=4, num_heads=8, num_kv_heads=4,
                                head_dim=128)
    c.model.scratch.vision.update(hidden_size=256, intermediate_size=512, num_layers=3, num_heads=4, image_size=32,
                                  patch_size=8)
    c.data.max_length, c.data.max_images_per_row = 128, 2
    c.train.per_device_batch, c.train.global_batch = pdb, 4 * pdb
    return c

topo = aot.parse_topology("v5e-4")
out = {}
for pdb in (2, 4):
    c = config(pdb)
    r = aot.compile_step(c, topo, vocab_size=512, top=0)
    cfg = aot.model_config(c, 512)
    r["step_flops"] = step_flops(cfg, {"projector", "llm"}, c.train.global_batch * 128, c.train.global_batch * 2, 128)
    out[pdb] = r
# the same micro-step compiled at full depth with every scan unrolled: what the extrapolation stands for
c = config(2)
mesh = shd.make_mesh(dict(c.train.mesh), devices=aot.topology_devices(topo))
with aot._unrolled_scans():
    _, lowered = aot._lower_step(c, mesh, aot.model_config(c, 512))
out["full_unrolled"] = aot._cost(lowered.compile())
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # 9 TPU compiles: ~2 min on 2 free cores
@pytest.mark.skipif(not HAVE_LIBTPU, reason='needs libtpu: pip install "jax[tpu]==<jax version>"')
def test_compiler_estimate_is_positive_consistent_and_extrapolates_depth():
    out = _run_tpu_script(ESTIMATE_SCRIPT, timeout=900)
    r2, r4, full = out["2"], out["4"], out["full_unrolled"]
    for r in (r2, r4):
        e = r["estimate"]
        assert r["fits"] and r["grad_accum"] == 1 and e["step_s"] > 0 and e["tokens_per_s"] > 0
        # the model FLOPs are train_step.step_flops', and MFU is them over time x chips x v5e's peak
        assert r["model_tflops_per_step"] * 1e12 == pytest.approx(r["step_flops"], rel=1e-12)
        assert e["peak_tflops_per_chip"] == 197.0
        assert e["mfu"] == pytest.approx(r["step_flops"] / (e["step_s"] * 4 * 197e12), rel=1e-9)
        assert e["tokens_per_s"] == pytest.approx(r["global_batch"] * 128 / e["step_s"], rel=1e-9)
        assert e["tokens_per_s_per_chip"] * 4 == pytest.approx(e["tokens_per_s"], rel=1e-9)
        # XLA computes at least the model's FLOPs (remat none: about them, plus full-square attention)
        assert 0.9 < e["xla_tflops_per_step"] / r["model_tflops_per_step"] < 2.0
    # the extrapolation in depth stands for the fully unrolled micro-step: FLOPs are linear in depth
    # (exact up to fusion), the modelled time nearly so (scheduling across layer boundaries)
    e2 = r2["estimate"]
    assert e2["xla_tflops_per_step"] * 1e12 / 4 == pytest.approx(full["flops"], rel=0.02)
    assert e2["micro_step_s"] == pytest.approx(full["seconds"], rel=0.10)
    # twice the batch per chip: twice the matmul work (about twice XLA's FLOPs), the same optimizer
    # update, gradient all-reduce and weight traffic. With libtpu 0.0.42 those fixed costs carry
    # this small step (40M fp32 params over 4 data-parallel chips: the time went only 1.08x for 2x
    # the FLOPs), so the check is that the estimate charges the extra rows at no more than the
    # chip's peak and stays under twice the time. At 7B scale the same estimate went 1.86x from one
    # to two rows per micro-step (BENCHMARKS.md, v6e-64).
    e4 = r4["estimate"]
    # data-parallel over the 4 chips: each step all-reduces every trainable parameter's gradient
    # (in bf16 or fp32) and nothing else of weight size, whatever the rows per chip
    for e in (e2, e4):
        reduced = e["collectives_per_step"]["all-reduce"]["bytes"]
        assert 2 * r2["params"]["trainable"] <= reduced <= 4.05 * r2["params"]["trainable"]
        assert e["collectives_per_step"].get("all-gather", {"bytes": 0})["bytes"] < 0.01 * reduced
    assert e4["collectives_per_step"]["all-reduce"] == e2["collectives_per_step"]["all-reduce"]
    assert 1.8 < e4["xla_tflops_per_step"] / e2["xla_tflops_per_step"] <= 2.05
    extra_flops_per_chip = (e4["xla_tflops_per_step"] - e2["xla_tflops_per_step"]) * 1e12 / 4
    assert extra_flops_per_chip / (197e12) <= e4["step_s"] - e2["step_s"]
    assert e4["step_s"] <= 2.1 * e2["step_s"]


def test_hlo_collectives_counts_each_collective_and_its_result_bytes():
    """Explicit collectives (shard_map over 8 host devices) in XLA's compiled HLO: one each, with
    the bytes of the array each produces on one device; and the async form the TPU compiler
    writes (this line is from its output for the 7B step on v5p-64), counted once, by its result."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    from llava_jax.tools.aot_compile import hlo_collectives

    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))

    def f(shard, grad, block):
        return (jax.lax.all_gather(shard, "x", tiled=True), jax.lax.psum(grad, "x"),
                jax.lax.ppermute(block, "x", [(i, (i + 1) % 8) for i in range(8)]))

    step = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("x"), P(), P("x")), out_specs=(P(), P(), P("x")),
                                 check_vma=False))
    text = step.lower(jnp.zeros((8 * 16, 64), jnp.float32), jnp.zeros((32, 32), jnp.float32),
                      jnp.zeros((8 * 4, 10), jnp.int8)).compile().as_text()
    assert hlo_collectives(text) == {"all-gather": {"count": 1, "bytes": 128 * 64 * 4},
                                     "all-reduce": {"count": 1, "bytes": 32 * 32 * 4},
                                     "collective-permute": {"count": 1, "bytes": 4 * 10}}
    tpu = ("  %collective-permute-start = (bf16[14,14,3,1,32]{4,1,0,2,3:T(8,128)(2,1)}, "
           "bf16[14,14,3,1,32]{4,1,0,2,3:T(8,128)(2,1)}, u32[]{:S(2)}, u32[]{:S(2)}) "
           "collective-permute-start(%get-tuple-element.4559), channel_id=178, source_target_pairs={{0,31},{1,0}}\n"
           "  %collective-permute-done = bf16[14,14,3,1,32]{4,1,0,2,3:T(8,128)(2,1)} "
           "collective-permute-done(%collective-permute-start)\n")
    assert hlo_collectives(tpu) == {"collective-permute": {"count": 1, "bytes": 14 * 14 * 3 * 32 * 2}}


def test_sweep_grid_is_pruned_to_shapes_that_divide():
    from llava_jax.tools import aot_sweep

    # 32 chips, global batch 128, 32 KV heads: the config's own mesh (all data) is not a
    # divisor problem; every candidate uses all chips
    meshes = aot_sweep.mesh_shapes(32, 128, 32, {"data": 1, "fsdp": -1, "tensor": 1})
    assert meshes == [(1, 32, 1), (2, 16, 1), (1, 16, 2)]
    # global batch 8 on 32 chips: no mesh whose batch axes span more than 8 chips
    assert aot_sweep.mesh_shapes(32, 8, 32, {"data": -1, "fsdp": 1, "tensor": 1}) == []
    assert aot_sweep.mesh_shapes(32, 8, 32, {}, given=["2x4x4"]) == [(2, 4, 4)]
    with pytest.raises(UsageError):
        aot_sweep.mesh_shapes(32, 128, 32, {}, given=["3x10x1"])
    with pytest.raises(UsageError):  # tensor must divide the KV heads
        aot_sweep.mesh_shapes(24, 24, 4, {}, given=["1x8x3"])
    # per-chip batches: largest (no accumulation) first, then halves; given ones must divide
    assert aot_sweep.batch_sizes(128, 32) == [4, 2, 1]
    assert aot_sweep.batch_sizes(96, 32) == [3]
    assert aot_sweep.batch_sizes(128, 32, given=[1, 3, 4, 8]) == [4, 1]


def test_sweep_ranks_by_estimated_tokens_per_second():
    from llava_jax.tools import aot_sweep

    def rep(tps, fits=True, total=1):
        return {"fits": fits, "memory": {"total": total}, "estimate": {"tokens_per_s": tps} if fits else None}

    ranked = aot_sweep.rank([rep(10), rep(0, fits=False, total=5), rep(30), rep(0, fits=False, total=2), rep(20)])
    assert [r["estimate"]["tokens_per_s"] for r in ranked[:3]] == [30, 20, 10]
    assert [r["memory"]["total"] for r in ranked[3:]] == [2, 5]


def test_sweep_cache_returns_a_report_without_compiling_again(tmp_path, monkeypatch):
    """A sweep point's report is cached by a hash of the resolved config and topology (here on
    the CPU device: no libtpu needed); a changed field is a new point."""
    import jax

    from llava_jax.demo.run import load_demo_config
    from llava_jax.tools import aot_compile as aot, aot_sweep

    monkeypatch.setenv("LLAVA_JAX_AOT_CACHE", str(tmp_path))
    topo = aot.Topology(name="cpu", desc_name="cpu", chips=1, hbm_gib=16.0)
    c = load_demo_config("tiny_stage1")
    first = aot_sweep.cached_compile(c, topo, 256, jax.devices()[:1])
    again = aot_sweep.cached_compile(c, topo, 256, jax.devices()[:1])
    assert not first["cached"] and again["cached"] and again["memory"] == first["memory"]
    assert len(list(tmp_path.glob("*.json"))) == 1
    c.train.per_device_batch = 2
    assert not aot_sweep.cached_compile(c, topo, 256, jax.devices()[:1])["cached"]
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_qlora_int8_base_shrinks_the_compiled_step_on_cpu():
    """`model.base_quant` reaches the will-it-fit compile with no hook of its own (the model is
    built quantized from the config): an int8 base takes 3 bytes less per LLM linear weight than
    the fp32 LoRA base, less its per-channel fp32 scales."""
    import jax

    from llava_jax.demo.run import load_demo_config
    from llava_jax.tools import aot_compile as aot

    topo = aot.Topology(name="cpu", desc_name="cpu", chips=1, hbm_gib=16.0)
    reports = {}
    for quant in ("none", "int8"):
        c = load_demo_config("tiny_stage2_lora")
        c.model.base_quant = quant
        reports[quant] = aot.compile_step(c, topo, vocab_size=256, devices=jax.devices()[:1], top=200)
    assert reports["int8"]["fits"]
    kernels = [a for a in reports["int8"]["largest"] if a["array"].split("/")[-1].endswith("_kernel")
               and "/llm/layers/" in a["array"]]
    assert len(kernels) == 7 and {a["dtype"] for a in kernels} == {"int8"}
    n_linear = sum(math.prod(a["shape"]) for a in kernels)
    saved = reports["none"]["memory"]["arguments"] - reports["int8"]["memory"]["arguments"]
    assert 0.9 * 3 * n_linear < saved < 3 * n_linear


# The splash kernel compiled for one v5e chip (the train step's path: inside the batch-sharding
# context, so the Mosaic kernel, not its CPU interpretation), attention forward + backward at
# 2 x 1024 tokens, 8 heads of 128, against XLA's own attention.
SPLASH_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from llava_jax.models.layers import attention_mask, batch_sharded_activations, dot_product_attention, maybe_remat
from llava_jax.tools import aot_compile as aot

dev = aot.topology_devices(aot.parse_topology("v5e-4"))[0]
mesh = Mesh(np.array([dev]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
rows = lambda ndim: NamedSharding(mesh, P())
B, L, H, D = 2, 1024, 8, 128
x = jax.ShapeDtypeStruct((B, L, H, D), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

def grads(impl, causal):
    def loss(q, k, v):
        seg = jnp.ones((B, L), jnp.int32)
        i = jnp.broadcast_to(jnp.arange(L), (B, L))
        with batch_sharded_activations(rows):
            out = (dot_product_attention(q, k, v, attention_mask(i, i, seg, seg, True), impl, segment_ids=seg,
                                         causal=True) if causal else dot_product_attention(q, k, v, None, impl))
        # a random cotangent: with sum(out) XLA would turn its dO V' into a row sum
        return (out.astype(jnp.float32) * jax.random.normal(jax.random.key(0), out.shape)).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))  # the loss too: the forward PV stays

out = {}
for impl, causal in (("xla", False), ("splash", False), ("splash", True)):
    with aot._costed_splash_kernels():
        compiled = grads(impl, causal).lower(x, x, x).compile()
    out[f"{impl}_{causal}"] = {**aot._cost(compiled),
                               "mosaic": compiled.as_text().count('custom_call_target="tpu_custom_call"')}
out["uncosted"] = aot._cost(grads("splash", True).lower(x, x, x).compile())

# Two scanned layers (projection, causal splash, projection) under a remat policy: how many splash
# kernels the compiled step holds.
def scanned(policy):
    def layer(h, w):
        q = (h @ w).reshape(B, L, H, D)
        seg = jnp.ones((B, L), jnp.int32)
        i = jnp.broadcast_to(jnp.arange(L), (B, L))
        a = dot_product_attention(q, q, q, attention_mask(i, i, seg, seg, True), "splash", segment_ids=seg,
                                  causal=True)
        return a.reshape(B, L, H * D) @ w, None
    def loss(h, ws):
        with batch_sharded_activations(rows):
            return (jax.lax.scan(maybe_remat(layer, policy), h, ws)[0].astype(jnp.float32) ** 2).sum()
    h = jax.ShapeDtypeStruct((B, L, H * D), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    ws = jax.ShapeDtypeStruct((2, H * D, H * D), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    with aot._costed_splash_kernels():
        txt = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, ws).compile().as_text()
    return txt.count('custom_call_target="tpu_custom_call"')
out["remat"] = {policy: scanned(policy) for policy in ("dots_no_batch", "dots_attn")}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.skipif(not HAVE_LIBTPU, reason='needs libtpu: pip install "jax[tpu]==<jax version>"')
def test_splash_attention_compiles_for_tpu_and_the_estimate_costs_it():
    """The splash kernel is a Mosaic custom call in the TPU program, and XLA's cost model counts
    nothing for it (no FLOPs, no time) until the estimate gives it a cost: the matmul FLOPs of
    the score blocks its mask visits. Independent check of that count: XLA's own count of its
    attention (forward QK' and PV, backward dV, dP, dS K, dS' Q: 6 matmuls) against splash's 7
    (its backward recomputes QK'), and a causal mask at 2 x 2 blocks of 512 visits 3 of the 4."""
    out = _run_tpu_script(SPLASH_SCRIPT, timeout=600)
    xla, full, causal = out["xla_False"], out["splash_False"], out["splash_True"]
    assert xla["mosaic"] == 0 and full["mosaic"] >= 2 and causal["mosaic"] >= 2  # forward + fused backward
    matmul = 2 * 2 * 8 * 1024 * 1024 * 128  # one [L, L] x [L, D] product per row and head
    assert out["uncosted"]["flops"] < 0.05 * causal["flops"] and out["uncosted"]["seconds"] < causal["seconds"]
    assert xla["flops"] == pytest.approx(6 * matmul, rel=0.08)  # XLA's own count (+6%: softmax, cotangent)
    assert full["flops"] == pytest.approx(7 * matmul, rel=0.05)
    assert causal["flops"] == pytest.approx(full["flops"] * 3 / 4, rel=0.05)
    assert 0 < causal["seconds"] < full["seconds"]
    # Scanned layers: `dots_no_batch` reruns the forward kernel in the backward pass (per layer:
    # forward, forward again, fused backward: 3 in the scan bodies); `dots_attn` saves the kernel's
    # output and residuals (2).
    assert out["remat"] == {"dots_no_batch": 3, "dots_attn": 2}


def _flat(config, prefix=""):
    out = {}
    for k, v in config.items():
        out.update(_flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
    return out


def test_tpu_slice_settings_fit_the_slice_and_change_nothing_else():
    """`<recipe>@<slice>` (configs/llava_v1_5.py TPU_SETTINGS): a mesh that the slice's chips
    fill, a per-chip batch that divides the recipe's global batch, the splash kernel, and every
    other field (global batch, learning rates, trainable set, ...) the recipe's own."""
    from jax.sharding import AbstractMesh
    from train_util import recipes as load_recipes

    from llava_jax.build import grad_accum_steps
    from llava_jax.sharding import MESH_AXES, resolve_mesh_shape

    recipes = load_recipes("llava_v1_5")
    slices = ("v5p-64", "v5p-128", "v5e-64", "v5e-256", "v6e-64")
    trained = [f"{size}_{stage}" for size in ("7b", "13b") for stage in ("stage1", "stage2", "lora")]
    assert set(recipes.TPU_SETTINGS) == {(r, t) for r in trained for t in slices}  # every cell
    for (recipe, tpu), flags in recipes.TPU_SETTINGS.items():
        config = recipes.get_config(f"{recipe}@{tpu}")
        base, c = _flat(recipes.get_config(recipe)), _flat(config)
        assert c["model.attention_impl"] == "splash"
        assert {k for k in c if c[k] != base[k]} <= set(flags) | {"model.attention_impl"}, (recipe, tpu)
        mesh = AbstractMesh(resolve_mesh_shape(dict(config.train.mesh), parse_topology(tpu).chips), MESH_AXES)
        assert grad_accum_steps(config, mesh) >= 1  # raises unless the global batch divides
    with pytest.raises(ValueError, match="known slices for 7b_stage2: .*v5p-64"):
        recipes.get_config("7b_stage2@v5p-8")
