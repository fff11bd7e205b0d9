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

from llava_jax.tools.aot import UsageError, parse_topology

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
    assert "FITS" in p.stdout and "largest arrays" in p.stdout
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


def test_cast_frozen_shrinks_the_compiled_step_on_cpu():
    """The will-it-fit compile reads `model.cast_frozen` like the trainer (here on the CPU device,
    no libtpu needed): the step's arguments shrink by 2 bytes per cast frozen param."""
    import jax

    from llava_jax.demo.run import load_demo_config
    from llava_jax.tools import aot

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


def test_qlora_int8_base_shrinks_the_compiled_step_on_cpu():
    """`model.base_quant` reaches the will-it-fit compile with no hook of its own (the model is
    built quantized from the config): an int8 base takes 3 bytes less per LLM linear weight than
    the fp32 LoRA base, less its per-channel fp32 scales."""
    import jax

    from llava_jax.demo.run import load_demo_config
    from llava_jax.tools import aot

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
