"""Calibration of the compiler estimate (`tools/aot_compile.py`) against published measured LLM figures.

    python -m llava_jax.tools.aot_calibrate llama2_70b v5p-128 4096 4 full [--attention=splash]

Builds a text-only LLaMA with llava-jax's own layers (the LLaVA-1.5 stage-2 config with
`model.init=scratch`, the named geometry, no image slots, the LLM trained), FSDP over every chip,
the given sequence length and per-chip batch (no accumulation) and remat policy, and prints the
compiler estimate (`aot_compile.estimate_step_time`: shallow unrolled compiles only, no full-depth memory
compile) as one JSON line. BENCHMARKS.md ("TPU compiler estimates") compares it with MaxText's
published measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import time

# (text geometry, vocabulary) of the published configurations
GEOMETRIES = {
    "llama2_70b": (dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
                        head_dim=128), 32000),
    "llama3_1_8b": (dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                         head_dim=128), 128256),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(GEOMETRIES))
    ap.add_argument("topology", help="v5p-128, v6e-256, ...")
    ap.add_argument("seq", type=int)
    ap.add_argument("per_chip_batch", type=int)
    ap.add_argument("remat", help="full, dots_no_batch, ...")
    ap.add_argument("--attention", default="xla", help="model.attention_impl: xla (default) or splash, the fused "
                    "TPU kernel MaxText's measured runs use")
    a = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from configs.llava_v1_5 import get_config
    from llava_jax import sharding as shd
    from llava_jax.tools import aot_compile
    from llava_jax.train_step import step_flops

    geom, vocab = GEOMETRIES[a.model]
    c = get_config("7b_stage2")
    c.model.init = "scratch"
    c.model.scratch.text.update(max_position_embeddings=a.seq, **geom)
    c.data.max_images_per_row, c.data.max_length = 0, a.seq
    c.trainable = (r"llm/.*",)
    topo = aot_compile.parse_topology(a.topology)
    devices = aot_compile.topology_devices(topo)
    c.train.per_device_batch, c.train.global_batch = a.per_chip_batch, a.per_chip_batch * topo.chips
    c.train.mesh.data, c.train.mesh.fsdp, c.train.mesh.tensor = 1, -1, 1
    c.model.remat, c.model.attention_impl = a.remat, a.attention
    mesh = shd.make_mesh(dict(c.train.mesh), devices=devices)
    cfg = aot_compile.model_config(c, vocab)
    gb = c.train.global_batch
    report = {"grad_accum": 1, "chips": topo.chips, "global_batch": gb, "max_length": a.seq,
              "device_kind": devices[0].device_kind,
              "model_tflops_per_step": step_flops(cfg, {"llm"}, gb * a.seq, 0, a.seq) / 1e12}
    t = time.time()
    estimate = aot_compile.estimate_step_time(c, cfg, mesh, report)
    out = {"model": a.model, "topology": a.topology, "seq": a.seq, "per_chip_batch": a.per_chip_batch,
           "remat": a.remat, "attention": a.attention, **report, "estimate": estimate, "wall_s": time.time() - t}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
