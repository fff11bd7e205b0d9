"""Jobs: which measurements a command asks for, and running one, in this process or in its own
subprocess (`python -m llava_jax.tools.bench --worker <job>`, the result printed on one line)."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

from llava_jax.tools.bench.jax_jobs import jax_decode, jax_train
from llava_jax.tools.bench.llamacpp_jobs import llamacpp_decode
from llava_jax.tools.bench.torch_jobs import torch_decode, torch_train
from llava_jax.tools.bench.workload import DEFAULT_VARIANT, XLA_FLAG_SETS, Geometry, parse_variants

# Marks the result line in a worker's stdout, where the frameworks print lines of their own.
RESULT_PREFIX = "BENCH_RESULT "


def run_job(spec: dict) -> dict:
    """Run one measurement; never raises (errors are reported in the result)."""
    geo = Geometry(**{**spec["geometry"], "decode_batches": tuple(spec["geometry"]["decode_batches"])})
    t = time.perf_counter()
    try:
        if spec["framework"] == "llamacpp":
            res = llamacpp_decode(geo, spec["batch"], spec["quant"], spec["opts"])
        elif spec["framework"] == "jax":
            if spec["work"] == "decode":
                res = jax_decode(geo, spec["batch"], spec["variant"], spec["opts"])
            else:
                res = jax_train(geo, spec["stage"], spec["variant"], spec["opts"])
        else:
            if spec["work"] == "decode":
                res = torch_decode(geo, spec["batch"], spec["compiled"], spec["opts"])
            else:
                res = torch_train(geo, spec["stage"], spec["compiled"], spec["opts"])
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
        res = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
               "traceback": traceback.format_exc()[-4000:]}
    res["wall_s"] = time.perf_counter() - t
    res["versions"] = versions()
    res["host"] = f"{platform.node()} ({os.cpu_count()} CPUs)"
    res["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {**spec, **res}


def run_isolated(spec: dict, timeout: int, xla_flags: str) -> dict:
    env = dict(os.environ)
    if spec["framework"] == "jax":
        flags = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags, XLA_FLAG_SETS[spec["variant"]["xla"]]) if f)
        if flags:
            env["XLA_FLAGS"] = flags
    cmd = [sys.executable, "-m", "llava_jax.tools.bench", "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "ok": False, "error": f"timed out after {timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
    return {**spec, "ok": False, "error": f"worker exited {p.returncode}: " + (tail[-1] if tail else ""),
            "traceback": "\n".join(tail)}


def versions() -> dict[str, str]:
    """Package versions from metadata; torch's CUDA/cuDNN only where torch is already imported
    (a JAX worker must not load a second cuDNN)."""
    import importlib.metadata as md

    out = {}
    for p in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
              "nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "flax", "optax", "torch", "transformers", "gguf"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        out["torch CUDA"] = torch.version.cuda
        out["torch cuDNN"] = str(torch.backends.cudnn.version())
    out["python"] = platform.python_version()
    return out


def build_jobs(args, geo: Geometry) -> list[dict]:
    import importlib.util

    on_gpu = cuda_available()
    compiled = {"auto": on_gpu, "yes": True, "no": False}[args.torch_compile]
    torch_modes = [compiled] + ([False] if args.torch_eager and compiled else [])
    if "torch" in args.frameworks and importlib.util.find_spec("torch") is None:
        raise SystemExit("torch is not installed: use --frameworks=jax or pip install torch")
    opts = {"grad_clip": args.grad_clip, "profile_dir": args.profile_dir, "decode_chunk": args.decode_chunk,
            "threads": args.threads}
    gd = dataclasses.asdict(geo)
    works = []
    for w in args.tasks:
        if w in ("stage1", "stage2"):
            works.append({"work": "train", "stage": int(w[-1])})
        elif w == "decode":
            works += [{"work": "decode", "batch": b} for b in geo.decode_batches]
        else:
            raise SystemExit(f"unknown task {w!r}; use stage1, stage2, decode")
    jobs = []
    for w in works:
        if "jax" in args.frameworks:
            variants = parse_variants(args.variants)
            if w["work"] == "decode":  # cached decoding takes the xla attention path whatever the
                seen = {}  # variant: one run per XLA flag set and serving dtype
                for v in variants:
                    key = (v["xla"], v["serve_dtype"])
                    seen.setdefault(key, {**DEFAULT_VARIANT, "xla": v["xla"], "serve_dtype": v["serve_dtype"]})
                variants = list(seen.values())
            for v in variants:
                jobs.append({"framework": "jax", **w, "variant": v, "geometry": gd, "opts": opts})
        if "torch" in args.frameworks:
            for c in torch_modes:
                jobs.append({"framework": "torch", **w, "compiled": c, "geometry": gd, "opts": opts})
        if "llamacpp" in args.frameworks and w["work"] == "decode" and w["batch"] == 1:  # its CLI: one sequence
            for q in args.llamacpp_quants:
                jobs.append({"framework": "llamacpp", **w, "quant": q, "geometry": gd, "opts": opts})
    return jobs


def cuda_available() -> bool:
    """Without initialising any framework on the device (workers own the GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
