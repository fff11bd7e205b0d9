"""The transformers measurements: `LlavaForConditionalGeneration` training steps and `generate`.

No JAX here (a torch worker must not load a second CUDA/cuDNN runtime); torch is imported when a
job runs.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any

from llava_jax.tools.bench.workload import Geometry, prompt_tokens, train_tokens


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
