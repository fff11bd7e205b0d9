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
Reported: tokens/s, ms/step, MFU (model FLOPs of `train.state.step_flops`, the same count for both
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
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "

# Dense bf16 peak TFLOP/s per device (MFU denominator); the first matching substring wins.
# ============================================================================ geometry / presets
@dataclasses.dataclass(frozen=True)
class Geometry:
    # vision tower (CLIP ViT)
    v_hidden: int = 1024
    v_inter: int = 4096
    v_layers: int = 24
    v_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    # LLaMA
    vocab: int = 32064
    hidden: int = 2048
    inter: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    image_token_id: int = 32000
    # work
    seq_len: int = 2048
    train_batch: int = 8
    prompt_text: int = 32
    new_tokens: int = 256
    decode_batches: tuple[int, ...] = (1, 16)
    warmup: int = 3
    steps: int = 10
    decode_repeats: int = 3

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def prompt_len(self) -> int:
        return 1 + self.num_image_tokens + self.prompt_text

    def llava_config(self, runtime=None):
        from llava_jax.config import LlavaConfig, RuntimeOptions, TextConfig, VisionConfig

        return LlavaConfig(
            vision=VisionConfig(hidden_size=self.v_hidden, intermediate_size=self.v_inter, num_layers=self.v_layers,
                                num_heads=self.v_heads, image_size=self.image_size, patch_size=self.patch_size),
            text=TextConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.inter,
                            num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
                            head_dim=self.hidden // self.heads, max_position_embeddings=4096, pad_token_id=0),
            image_token_id=self.image_token_id, projector_type="mlp2x_gelu", vision_feature_layer=-2,
            runtime=runtime or RuntimeOptions())


PRESETS: dict[str, dict[str, Any]] = {
    # The issue's geometry: CLIP ViT-L/14-336 + a 1.1B LLaMA (TinyLlama shape) + mlp2x_gelu.
    "h100": dict(geometry=Geometry(),
                 variants="attention=cudnn_padded,remat=dots_attn,loss_chunk=1024,frozen_bf16=1"),
    # Runs on CPU in seconds; the variant mirrors the GPU default with CPU-runnable kernels.
    # 48 new tokens, 5 repeats: with 16 and 3, the 15 decode steps of this tiny model in eager
    # torch (~1 ms each) sometimes timed below the 1-token call's noise on a busy CPU, giving
    # no ms/step at all.
    "tiny": dict(geometry=Geometry(v_hidden=32, v_inter=64, v_layers=2, v_heads=2, image_size=28, patch_size=14,
                                   vocab=256, hidden=64, inter=128, layers=2, heads=4, kv_heads=2,
                                   image_token_id=255, seq_len=64, train_batch=2, prompt_text=8, new_tokens=48,
                                   decode_batches=(1, 2), warmup=1, steps=3, decode_repeats=5),
                 variants="attention=dpa_padded,remat=dots_attn,loss_chunk=16,frozen_bf16=1"),
}

VARIANT_KEYS = {"attention": str, "remat": str, "loss_chunk": int, "frozen_bf16": int, "param_dtype": str, "xla": str}
DEFAULT_VARIANT = {"attention": "xla", "remat": "none", "loss_chunk": 0, "frozen_bf16": 0, "param_dtype": "float32",
                   "xla": "default"}
# Named XLA_FLAGS sets for the `xla=` variant key (isolated runs only: XLA reads its flags at
# start-up). Every name here is accepted by jaxlib 0.10.2 (tests/test_bench.py checks).
XLA_FLAG_SETS = {
    "default": "",
    "cublas": "--xla_gpu_enable_triton_gemm=false",  # every GEMM through cuBLAS(Lt), none through Triton
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "cublas_lhs": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_latency_hiding_scheduler=true",
    "graphs": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,WHILE,CONDITIONAL "
              "--xla_gpu_graph_min_graph_size=1",  # CUDA graphs for more of the step (decode)
}


def parse_variants(text: str) -> list[dict[str, Any]]:
    out = []
    for part in [p for p in text.split(";") if p.strip()]:
        v = dict(DEFAULT_VARIANT)
        for kv in [x for x in part.split(",") if x.strip()]:
            k, _, val = kv.partition("=")
            k = k.strip()
            if k not in VARIANT_KEYS:
                raise ValueError(f"unknown variant key {k!r} in {part!r}; known: {', '.join(VARIANT_KEYS)}")
            v[k] = VARIANT_KEYS[k](val.strip())
        if v["xla"] not in XLA_FLAG_SETS:
            raise ValueError(f"unknown xla flag set {v['xla']!r}; known: {', '.join(XLA_FLAG_SETS)}")
        out.append(v)
    return out or [dict(DEFAULT_VARIANT)]


def variant_label(v: dict[str, Any]) -> str:
    return ",".join(f"{k}={v[k]}" for k in VARIANT_KEYS if v[k] != DEFAULT_VARIANT[k]) or "defaults"


# ============================================================================ inputs
def train_tokens(geo: Geometry, seed: int = 0):
    """ids [B, L] int32 (BOS, image tokens, random text) and HF-style labels (-100 on BOS and image
    tokens); llava-jax targets are the same labels shifted left by one."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, l, t = geo.train_batch, geo.seq_len, geo.num_image_tokens
    ids = rng.integers(3, min(geo.vocab, 32000) - 1, (b, l)).astype(np.int32)
    ids[ids == geo.image_token_id] = 5
    ids[:, 0] = 1
    ids[:, 1:1 + t] = geo.image_token_id
    labels = ids.copy()
    labels[:, :1 + t] = -100
    return ids, labels


def prompt_tokens(geo: Geometry, batch: int, seed: int = 1):
    import numpy as np

    rng = np.random.default_rng(seed)
    text = rng.integers(3, min(geo.vocab, 32000) - 1, (batch, geo.prompt_text)).astype(np.int32)
    text[text == geo.image_token_id] = 5
    ids = np.concatenate([np.ones((batch, 1), np.int32),
                          np.full((batch, geo.num_image_tokens), geo.image_token_id, np.int32), text], 1)
    return ids


# ============================================================================ llava-jax workers
def _jax_env() -> dict[str, Any]:
    import jax

    d = jax.devices()[0]
    return {"device": f"{d.platform}:{d.device_kind}", "device_kind": d.device_kind, "platform": d.platform}


def _jax_peak_bytes(compiled=None) -> tuple[float | None, str]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device"
    if compiled is not None:  # CPU: XLA's own estimate for the compiled step
        try:
            m = compiled.memory_analysis()
            total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
            return float(total), "xla-estimate"
        except Exception:  # noqa: BLE001
            pass
    return None, "n/a"


@contextlib.contextmanager
def _jax_trace(profile_dir: str, label: str):
    """jax.profiler trace, its files then moved flat into `profile_dir` as `<label>.<name>` (the
    profiler nests them 3 folders down; flat names are easier to fetch from a remote machine)."""
    import shutil

    import jax

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", label)
    tmp = Path(profile_dir) / f".{safe}.tmp"
    with jax.profiler.trace(str(tmp)):
        yield
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            shutil.move(str(f), str(Path(profile_dir) / f"{safe}.{f.name}"))
    shutil.rmtree(tmp, ignore_errors=True)


class _Attrs(dict):
    __getattr__ = dict.__getitem__


def _random_model(cfg):
    """Random weights initialised on the device under jit. The rbg PRNG: threefry's init graph
    for a few hundred params takes minutes to compile on a small CPU."""
    import jax
    from flax import nnx

    from llava_jax.models.llava import LlavaModel

    key = jax.random.key(0, impl="rbg")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(key))))
    state = jax.jit(lambda k: nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(k)))[1])(key)
    return nnx.merge(graphdef, state)


def jax_train(geo: Geometry, stage: int, variant: dict, opts: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llava_jax.config import RuntimeOptions
    from llava_jax.train.state import cast_frozen, make_optimizer, make_train_step, split_model

    rt = RuntimeOptions(dtype=jnp.bfloat16, param_dtype=getattr(jnp, variant["param_dtype"]),
                        remat_policy=variant["remat"], attention_impl=variant["attention"])
    cfg = geo.llava_config(rt)
    t0 = time.perf_counter()
    model = _random_model(cfg)
    patterns = [r"projector/.*"] + ([r"llm/.*"] if stage == 2 else [])
    graphdef, trainable, frozen = split_model(model, patterns)
    del model
    if variant["frozen_bf16"]:
        frozen = cast_frozen(frozen, jnp.bfloat16)
    # The trainer's optimizer (AdamW + warmup-cosine + global-norm clipping); the fields of
    # train.defaults' `optim` group, without ml_collections (absent from the GPU image).
    ocfg = _Attrs(lr=2e-5, schedule="cosine", warmup_ratio=0.0, warmup_steps=1, weight_decay=0.0, b1=0.9,
                  b2=0.999, eps=1e-8, grad_clip=opts["grad_clip"])
    total = geo.warmup + geo.steps
    tx, schedule = make_optimizer(ocfg, total, trainable)
    opt_state = jax.jit(tx.init)(trainable)
    step_fn = jax.jit(make_train_step(graphdef, tx, schedule, loss_chunk=variant["loss_chunk"]), donate_argnums=(0, 1))

    ids, labels = train_tokens(geo)
    targets = np.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    b, l = ids.shape
    rng = np.random.default_rng(2)
    batch = {
        "input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
        "segment_ids": jnp.ones((b, l), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
        "images": jnp.asarray(rng.integers(0, 256, (b, 1, geo.image_size, geo.image_size, 3), np.uint8)),
        "image_mask": jnp.ones((b, 1), bool),
    }
    compiled = step_fn.lower(trainable, opt_state, frozen, batch, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    for i in range(geo.warmup):
        trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, jnp.int32(i))
    loss0 = float(metrics["loss"]) if geo.warmup else float("nan")
    jax.block_until_ready(trainable)

    def timed(n, start):
        nonlocal trainable, opt_state, metrics
        t = time.perf_counter()
        for i in range(n):
            trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, jnp.int32(start + i))
        jax.block_until_ready((trainable, metrics))
        return time.perf_counter() - t

    sec = timed(geo.steps, geo.warmup)
    if opts.get("profile_dir"):
        with _jax_trace(opts["profile_dir"], f"jax_stage{stage}_{variant_label(variant)}"):
            timed(min(2, geo.steps), total)
    peak, src = _jax_peak_bytes(compiled)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return {**_jax_env(), "sec_per_step": sec / geo.steps, "peak_bytes": peak, "peak_source": src,
            "compile_s": compile_s, "loss_first": loss0, "loss_last": loss}


def jax_decode(geo: Geometry, batch: int, variant: dict, opts: dict) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from llava_jax.config import RuntimeOptions
    from llava_jax.serve.engine import Engine, SamplingParams

    # Serving weights in bf16; the attention impl only matters for the prefill here.
    rt = RuntimeOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=variant["attention"])
    cfg = geo.llava_config(rt)
    t0 = time.perf_counter()
    kw = {"chunk_size": opts["decode_chunk"]} if opts.get("decode_chunk") and \
        "chunk_size" in inspect.signature(Engine).parameters else {}
    engine = Engine(_random_model(cfg), **kw)
    prompts = [list(map(int, r)) for r in prompt_tokens(geo, batch)]
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (batch, 1, geo.image_size, geo.image_size, 3), np.uint8)
    image_mask = np.ones((batch, 1), bool)

    def gen(n):
        t = time.perf_counter()
        out = engine.generate(prompts, images, image_mask, params=SamplingParams(max_new_tokens=n), eos_ids=())
        dt = time.perf_counter() - t
        if any(len(o) != n for o in out):
            raise RuntimeError(f"asked for {n} tokens, got {[len(o) for o in out]}")
        return dt

    gen(geo.new_tokens), gen(1)  # compile both shapes
    compile_s = time.perf_counter() - t0
    t1 = statistics.median(gen(1) for _ in range(geo.decode_repeats))
    tn = statistics.median(gen(geo.new_tokens) for _ in range(geo.decode_repeats))
    if opts.get("profile_dir"):
        with _jax_trace(opts["profile_dir"], f"jax_decode_b{batch}_{variant_label(variant)}"):
            gen(geo.new_tokens)
    peak, src = _jax_peak_bytes()
    return {**_jax_env(), "prefill_s": t1, "total_s": tn,
            "sec_per_step": max(tn - t1, 0.0) / (geo.new_tokens - 1), "peak_bytes": peak, "peak_source": src,
            "compile_s": compile_s}


# ============================================================================ transformers workers
def _torch_setup(geo: Geometry, compiled: bool):
    import torch
    import transformers

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_cfg = transformers.LlavaConfig.from_dict(geo.llava_config().to_hf_dict())
    torch.manual_seed(0)
    with dev:
        model = transformers.LlavaForConditionalGeneration._from_config(hf_cfg, dtype=torch.bfloat16,
                                                                        attn_implementation="sdpa")
    model.to(dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    env = {"device": f"{dev.type}:{name}", "device_kind": name, "platform": "gpu" if dev.type == "cuda" else dev.type,
           "torch_compiled": compiled}
    return torch, model, dev, env


def _torch_sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _torch_peak(torch, dev) -> tuple[float | None, str]:
    if dev.type == "cuda":
        return float(torch.cuda.max_memory_allocated(dev)), "device"
    return None, "n/a"


def torch_train(geo: Geometry, stage: int, compiled: bool, opts: dict) -> dict:
    torch, model, dev, env = _torch_setup(geo, compiled)
    t0 = time.perf_counter()
    model.train()
    model.requires_grad_(False)  # the vision tower stays frozen in both stages
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == 2:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=dev.type == "cuda")
    fwd = torch.compile(model) if compiled else model
    ids, labels = train_tokens(geo)
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=dev)
    labels_t = torch.as_tensor(labels, dtype=torch.long, device=dev)
    g = torch.Generator(device="cpu").manual_seed(2)
    pixels = torch.randn(geo.train_batch, 3, geo.image_size, geo.image_size, generator=g).to(dev, torch.bfloat16)

    def step():
        loss = fwd(input_ids=ids_t, pixel_values=pixels, labels=labels_t).loss
        loss.backward()
        if opts["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(params, opts["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    loss0 = float("nan")
    for i in range(geo.warmup):
        loss = step()
        if i == 0:
            loss0 = loss.item()
    _torch_sync(torch, dev)
    compile_s = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(geo.steps):
        loss = step()
    _torch_sync(torch, dev)
    sec = time.perf_counter() - t
    if opts.get("profile_dir"):
        _torch_profile(torch, step, dev, Path(opts["profile_dir"]) / f"torch_stage{stage}.json.gz")
    peak, src = _torch_peak(torch, dev)
    return {**env, "sec_per_step": sec / geo.steps, "peak_bytes": peak, "peak_source": src, "compile_s": compile_s,
            "loss_first": loss0, "loss_last": loss.item()}


def torch_decode(geo: Geometry, batch: int, compiled: bool, opts: dict) -> dict:
    torch, model, dev, env = _torch_setup(geo, compiled)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.as_tensor(prompt_tokens(geo, batch), dtype=torch.long, device=dev)
    g = torch.Generator(device="cpu").manual_seed(3)
    pixels = torch.randn(batch, 3, geo.image_size, geo.image_size, generator=g).to(dev, torch.bfloat16)
    kw: dict[str, Any] = dict(do_sample=False)
    if compiled:  # transformers compiles the decode step itself for a static cache on GPU
        kw["cache_implementation"] = "static"

    @torch.inference_mode()
    def gen(n):
        _torch_sync(torch, dev)
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             max_new_tokens=n, min_new_tokens=n, **kw)
        _torch_sync(torch, dev)
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"asked for {n} tokens, got {out.shape[1] - ids.shape[1]}")
        return time.perf_counter() - t

    t0 = time.perf_counter()
    for _ in range(2 if compiled else 1):  # compile + CUDA-graph capture happen in the first calls
        gen(geo.new_tokens)
    gen(1)
    compile_s = time.perf_counter() - t0
    t1 = statistics.median(gen(1) for _ in range(geo.decode_repeats))
    tn = statistics.median(gen(geo.new_tokens) for _ in range(geo.decode_repeats))
    if opts.get("profile_dir"):
        _torch_profile(torch, lambda: gen(geo.new_tokens), dev,
                       Path(opts["profile_dir"]) / f"torch_decode_b{batch}.json.gz")
    peak, src = _torch_peak(torch, dev)
    return {**env, "prefill_s": t1, "total_s": tn, "sec_per_step": max(tn - t1, 0.0) / (geo.new_tokens - 1),
            "peak_bytes": peak, "peak_source": src, "compile_s": compile_s}


def _torch_profile(torch, fn, dev, path: Path):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=acts) as prof:
        fn()
        _torch_sync(torch, dev)
    prof.export_chrome_trace(str(path))  # gzipped by torch for a .gz name


# ============================================================================ one job
def run_job(spec: dict) -> dict:
    """Run one measurement; never raises (errors are reported in the result)."""
    geo = Geometry(**{**spec["geometry"], "decode_batches": tuple(spec["geometry"]["decode_batches"])})
    t = time.perf_counter()
    try:
        if spec["framework"] == "jax":
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


# ============================================================================ results -> table
def derive(r: dict, geo: Geometry, peak_override: float | None) -> dict:
    """tokens/s, MFU, GB from a raw result."""
    out = dict(r)
    if not r.get("ok"):
        return out
    sec = r["sec_per_step"]
    if r["work"] == "decode":
        out["tokens_per_s"] = r["batch"] / sec if sec > 0 else float("nan")
        out["mfu"] = None
    else:
        from llava_jax.train.state import step_flops

        tokens = geo.train_batch * geo.seq_len
        out["tokens_per_s"] = tokens / sec
        flops = step_flops(geo.llava_config(), {"projector"} | ({"llm"} if r["stage"] == 2 else set()),
                           tokens, geo.train_batch, geo.seq_len)
        from llava_jax.train.metrics import peak_tflops  # the one table of device peaks

        peak = peak_override or peak_tflops(r.get("device_kind", ""))
        out["step_tflop"] = flops / 1e12
        out["mfu"] = flops / sec / (peak * 1e12) if peak else None
    return out


def side_label(r: dict) -> str:
    if r["framework"] == "jax" and r["work"] == "decode":  # only the XLA flags reach decoding
        x = r["variant"]["xla"]
        return "llava-jax (Engine" + ("" if x == "default" else f", xla={x}") + ")"
    if r["framework"] == "jax":
        return f"llava-jax ({variant_label(r['variant'])})"
    return "transformers " + ("compiled" if r["compiled"] else "eager")


def work_label(r: dict, geo: Geometry) -> str:
    if r["work"] == "decode":
        return f"decode B={r['batch']} ({geo.prompt_len}-token prompt + {geo.new_tokens} new)"
    return f"stage {r['stage']} train (B={geo.train_batch}, L={geo.seq_len})"


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None or x != x else format(x, spec)


def _pct(x) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if x >= 0.01 else f"{100 * x:.2g}%"


def render_table(results: list[dict], geo: Geometry, peak_override: float | None = None) -> str:
    rows = [derive(r, geo, peak_override) for r in results]
    order = {"train1": 0, "train2": 1, "decode": 2}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (order["decode"] if r["work"] == "decode" else order[f"train{r['stage']}"], r.get("batch", 0))
        groups.setdefault(key, []).append(r)
    lines = ["| work | implementation | tokens/s | ms/step | MFU | peak memory | vs transformers | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups):
        g = groups[key]
        base = next((r for r in g if r["framework"] == "torch" and r["ok"] and r["compiled"]), None) \
            or next((r for r in g if r["framework"] == "torch" and r["ok"]), None)
        g.sort(key=lambda r: (r["framework"] != "jax", not r.get("compiled", True)))
        for i, r in enumerate(g):
            work = work_label(r, geo) if i == 0 else ""
            if not r["ok"]:
                err = r.get("error", "")[:160].replace("|", "\\|")
                lines.append(f"| {work} | {side_label(r)} | failed | | | | | {err} |")
                continue
            ratio = (r["tokens_per_s"] / base["tokens_per_s"]) if base and base["tokens_per_s"] else None
            ratio_s = _fmt(ratio, ".2f")
            ratio_s += "x" if ratio_s != "–" else ""
            mem = r.get("peak_bytes")
            mem_s = "–" if mem is None else ("~" if r.get("peak_source") == "xla-estimate" else "") + \
                (f"{mem / 1e9:.2f} GB" if mem >= 1e8 else f"{mem / 1e6:.2f} MB")
            notes = []
            if r["work"] == "decode":
                notes.append(f"prefill {r['prefill_s'] * 1e3:.1f} ms")
            else:
                notes.append(f"loss {r['loss_first']:.3f}→{r['loss_last']:.3f}")
            notes.append(f"warm-up/compile {r['compile_s']:.0f} s")
            lines.append(f"| {work} | {side_label(r)} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                         f"{_fmt(r['sec_per_step'] * 1e3, '.2f')} | {_pct(r['mfu'])} | {mem_s} | {ratio_s} | "
                         f"{'; '.join(notes)} |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Package versions from metadata; torch's CUDA/cuDNN only where torch is already imported
    (a JAX worker must not load a second cuDNN)."""
    import importlib.metadata as md

    out = {}
    for p in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt",
              "nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "flax", "optax", "torch", "transformers"):
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


def markdown_block(results: list[dict], preset: str, table: str) -> str:
    """Device, versions, host, date and exact command(s), all as recorded by the runs themselves
    (so results saved on a GPU machine render the same anywhere with --from_json)."""
    devices = sorted({r["device"] for r in results if r.get("ok") and r.get("device")})
    vers = {}
    for r in results:
        vers.update(r.get("versions", {}))
    hosts = sorted({r["host"] for r in results if r.get("host")})
    commands = list(dict.fromkeys(r["command"] for r in results if r.get("command")))
    dates = sorted(r["date"] for r in results if r.get("date"))
    date = dates[0] if dates else datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if len(dates) > 1 and dates[-1] != dates[0]:
        date += f" to {dates[-1]}"
    notes = []
    torch_runs = [r for r in results if r["framework"] == "torch"]
    if torch_runs and not any(r.get("compiled") for r in torch_runs):
        notes.append("transformers ran eager only (torch.compile skipped"
                     + (" on CPU)" if all(r.get("platform") == "cpu" for r in torch_runs if r.get("ok")) else ")"))
    if any(r.get("peak_source") == "xla-estimate" for r in results):
        notes.append("~ peak memory = XLA's estimate for the compiled step (no device counters on CPU)")
    return "\n".join([
        f"### {preset} preset — {', '.join(devices) or 'no device'} — {date}",
        "",
        *[f"`{c}`" + ("  " if i < len(commands) - 1 else "") for i, c in enumerate(commands)],
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in vers.items())}. Host: {', '.join(hosts)}.",
        *([""] + [f"Note: {n}." for n in notes] if notes else []),
        "",
        table,
        "",
    ])


# ============================================================================ main
def build_jobs(args, geo: Geometry) -> list[dict]:
    import importlib.util

    on_gpu = _cuda_available()
    compiled = {"auto": on_gpu, "yes": True, "no": False}[args.torch_compile]
    torch_modes = [compiled] + ([False] if args.torch_eager and compiled else [])
    if "torch" in args.frameworks and importlib.util.find_spec("torch") is None:
        raise SystemExit("torch is not installed: use --frameworks=jax or pip install torch")
    opts = {"grad_clip": args.grad_clip, "profile_dir": args.profile_dir, "decode_chunk": args.decode_chunk}
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
            if w["work"] == "decode":  # cached decoding uses bf16 weights and the xla attention
                seen = {}  # path whatever the variant: one run per XLA flag set
                for v in variants:
                    seen.setdefault(v["xla"], {**DEFAULT_VARIANT, "xla": v["xla"]})
                variants = list(seen.values())
            for v in variants:
                jobs.append({"framework": "jax", **w, "variant": v, "geometry": gd, "opts": opts})
        if "torch" in args.frameworks:
            for c in torch_modes:
                jobs.append({"framework": "torch", **w, "compiled": c, "geometry": gd, "opts": opts})
    return jobs


def _cuda_available() -> bool:
    """Without initialising any framework on the device (workers own the GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m llava_jax.tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    p.add_argument("--tasks", default="stage1,stage2,decode", help="comma list of stage1, stage2, decode")
    p.add_argument("--frameworks", default="jax,torch", help="comma list of jax, torch")
    p.add_argument("--variants", default=None, help="llava-jax option sets (see module doc); default per preset")
    p.add_argument("--torch_compile", choices=("auto", "yes", "no"), default="auto",
                   help="auto: compile on CUDA, eager elsewhere (torch.compile on CPU is slow)")
    p.add_argument("--torch_eager", action="store_true", help="also measure eager transformers beside compiled")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one subprocess per measurement (auto: on GPU)")
    p.add_argument("--steps", type=int, help="timed training steps (preset default)")
    p.add_argument("--warmup", type=int, help="untimed training steps first (preset default)")
    p.add_argument("--decode_repeats", type=int, help="timed generate calls per length (median)")
    p.add_argument("--decode_batches", help="comma list (preset default)")
    p.add_argument("--new_tokens", type=int)
    p.add_argument("--decode_chunk", type=int, default=0,
                   help="llava-jax decode steps per compiled chunk, where the engine has chunks (0 = its default)")
    p.add_argument("--seq_len", type=int)
    p.add_argument("--train_batch", type=int)
    p.add_argument("--grad_clip", type=float, default=1.0, help="global-norm clipping on both sides (0 = off)")
    p.add_argument("--peak_tflops", type=float, help="override the per-device bf16 peak used for MFU")
    p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for the llava-jax workers (isolated runs)")
    p.add_argument("--profile_dir", help="write jax.profiler / torch.profiler traces here")
    p.add_argument("--markdown", help="append the results to this markdown file (e.g. BENCHMARKS.md)")
    p.add_argument("--json", help="append raw results as JSON lines to this file")
    p.add_argument("--from_json", help="render the table from saved JSON lines instead of running")
    p.add_argument("--worker_timeout", type=int, default=1800)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.frameworks = [f for f in args.frameworks.split(",") if f]
    if args.variants is None:
        args.variants = PRESETS[args.preset]["variants"]
    return args


def geometry_from_args(args) -> Geometry:
    geo = PRESETS[args.preset]["geometry"]
    over = {k: getattr(args, k) for k in ("steps", "warmup", "decode_repeats", "new_tokens", "seq_len", "train_batch")
            if getattr(args, k) is not None}
    if args.decode_batches:
        over["decode_batches"] = tuple(int(x) for x in args.decode_batches.split(","))
    return dataclasses.replace(geo, **over)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(run_job(json.loads(args.worker))), flush=True)
        return 0
    geo = geometry_from_args(args)
    command = "python -m llava_jax.tools.bench " + " ".join(argv)
    preset = args.preset
    if args.from_json:
        results = [json.loads(x) for x in Path(args.from_json).read_text().splitlines() if x.strip()]
        geo = Geometry(**{**results[0]["geometry"], "decode_batches": tuple(results[0]["geometry"]["decode_batches"])})
        preset = results[0].get("preset", preset)
    else:
        jobs = build_jobs(args, geo)
        for j in jobs:
            j.update(command=command, preset=args.preset)
        isolate = {"auto": _cuda_available(), "yes": True, "no": False}[args.isolate]
        if not isolate:
            if args.xla_flags:
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
            if any(j["framework"] == "jax" and j["variant"]["xla"] != "default" for j in jobs):
                raise SystemExit("xla= flag sets need --isolate=yes (XLA reads its flags at start-up)")
        results = []
        for i, job in enumerate(jobs):
            what = f"{job['framework']} {job['work']}{job.get('stage', '')}" + \
                   (f" B={job['batch']}" if job["work"] == "decode" else "") + \
                   (f" [{variant_label(job['variant'])}]" if job["framework"] == "jax" else
                    f" [{'compiled' if job['compiled'] else 'eager'}]")
            print(f"[{i + 1}/{len(jobs)}] {what} ...", file=sys.stderr, flush=True)
            r = run_isolated(job, args.worker_timeout, args.xla_flags) if isolate else run_job(job)
            if not r["ok"]:
                print(f"    FAILED: {r.get('error')}\n{r.get('traceback', '')}", file=sys.stderr, flush=True)
            else:
                print(f"    {r['sec_per_step'] * 1e3:.2f} ms/step ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            results.append(r)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({k: v for k, v in r.items() if k != "traceback"}) + "\n")
    table = render_table(results, geo, args.peak_tflops)
    block = markdown_block(results, preset, table)
    print(block)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + block)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
