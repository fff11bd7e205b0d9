"""The one assembly path from a training config to running things. Every entry point calls it:
the trainer (``train/trainer.py``, the loop), ``export``, ``eval.answer``, the demo and
``tools/aot.py``.

    config -> tokenizer()            the run's tokenizer + the <image>/<pad> ids
           -> model_config()         scratch / HF dirs / CLIP + LLaMA dirs / a named preset
           -> model()                params created or loaded straight into their shards, then the
                                     previous stages' workdirs on top (`init_from_workdir`), then
                                     a PEFT adapter to start LoRA from (`model.lora.init_adapter`)
           -> trained_model()        a training workdir's finished model, rebuilt from the config
                                     the run recorded; refuses params no checkpoint provided
           -> training_data()        this process's input iterator and the schedule's length
           -> train_parts()          freezing, optimizer, optimizer state and the jitted step with
                                     donated buffers (`compiled_train_step`), for a model in its
                                     shards (the trainer) or an abstract one (tools/aot.py compiles
                                     it for a TPU topology)
           -> batch_spec()           the global batch's shapes, dtypes and shardings

A run records its config in ``WORKDIR/run_config.json``; together with each workdir's
checkpoint that is its provenance: where every param came from.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax import sharding as shd
from llava_jax.config import (
    LlavaConfig,
    RopeConfig,
    RuntimeOptions,
    TextConfig,
    VisionConfig,
)
from llava_jax.models.llava import LlavaModel
from llava_jax.presets import PRESETS
from llava_jax.models.params import PathPatterns, path_str

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
RUN_CONFIG = "run_config.json"


class ProvenanceError(ValueError):
    """A model would be used with params that no checkpoint provided (random init)."""


# =============================================================================== tokenizer
def tokenizer(config):
    """(tokenizer, LlavaTokenIds): `tokenizer_path`, else the LLM's or the HF checkpoint's dir,
    with `<image>` and `<pad>` added as llava-hf has them."""
    from llava_jax.data.tokenize import add_llava_special_tokens, load_tokenizer

    path = config.tokenizer_path or config.model.llm_path or config.model.hf_path
    if not path:
        raise ValueError("set config.tokenizer_path (or model.llm_path / model.hf_path)")
    tok = load_tokenizer(path)
    return tok, add_llava_special_tokens(tok)


# =============================================================================== model config
def lora_config(config):
    """The run's LoRA adapters (`model.lora`; None when rank is 0 or the config predates LoRA)."""
    from llava_jax.models.lora import LoraConfig

    return LoraConfig.from_config(config.model.get("lora"))


def base_quant(config) -> str | None:
    """`model.base_quant` (QLoRA: the frozen LLM's linear kernels stored "int8" / "int4"; None for
    "none" or a config that predates it). Only LoRA adapters can train on a quantized base, so it
    is refused without them."""
    mode = config.model.get("base_quant", "none") or "none"
    if mode == "none":
        return None
    from llava_jax.models.quant import check_mode

    check_mode(mode)
    if lora_config(config) is None:
        raise ValueError(f"model.base_quant={mode!r} (QLoRA) stores the frozen LLM quantized, so only LoRA adapters "
                         "can train on it, and model.lora.rank is 0: set --config.model.lora.rank (e.g. the "
                         "configs/llava_v1_5.py:7b_qlora preset), or model.base_quant=none")
    return mode


def runtime(config) -> RuntimeOptions:
    m = config.model
    return RuntimeOptions(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], remat_policy=m.remat,
                          attention_impl=m.attention_impl)


def scratch_config(config, vocab_size: int, image_token_id: int) -> LlavaConfig:
    s = config.model.scratch
    v, t = s.vision, s.text
    return LlavaConfig(
        vision=VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            num_layers=v.num_layers, num_heads=v.num_heads, image_size=v.image_size,
                            patch_size=v.patch_size),
        text=TextConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                        num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                        head_dim=t.head_dim, rope=RopeConfig(theta=t.rope_theta),
                        max_position_embeddings=t.max_position_embeddings),
        image_token_id=image_token_id,
        projector_type=config.model.projector_type,
        vision_feature_layer=config.model.vision_feature_layer,
        vision_feature_select_strategy=config.model.vision_feature_select_strategy,
        image_grid_pinpoints=image_grid_pinpoints(config),
        runtime=runtime(config),
        lora=lora_config(config),
        base_quant=base_quant(config),
    )


def image_grid_pinpoints(config) -> tuple | None:
    """`model.image_grid_pinpoints` as the model config takes it (None: not set here)."""
    pins = config.model.get("image_grid_pinpoints") or ()
    return tuple(tuple(int(x) for x in p) for p in pins) or None


def _checkpoint_kwargs(config, image_token_id: int | None) -> tuple[str, dict]:
    """(checkpoint dir, `from_pretrained` keyword arguments) of an hf / clip_llama config."""
    m = config.model
    path = m.hf_path if m.init == "hf" else m.llm_path
    if not path:
        raise ValueError(f"model.init={m.init!r} needs model.{'hf_path' if m.init == 'hf' else 'llm_path'}")
    kw: dict[str, Any] = dict(clip_path=m.clip_path or None, projector_path=m.projector_path or None)
    if m.init == "clip_llama":
        kw.update(projector_type=m.projector_type, vision_feature_layer=m.vision_feature_layer,
                  vision_feature_select_strategy=m.vision_feature_select_strategy)
    if image_token_id is not None and m.init != "hf":
        kw["image_token_id"] = image_token_id
    if pins := image_grid_pinpoints(config):  # e.g. LLaVA-NeXT stage 2 from CLIP + an LLM (+ the stage-1 projector)
        kw["image_grid_pinpoints"] = pins
    return path, kw


def model_config(config, vocab_size: int | None = None, image_token_id: int | None = None) -> LlavaConfig:
    """The model geometry of `config`, without loading a weight: `model.scratch` for
    `init=scratch`, the checkpoints' config.json files for `hf` / `clip_llama`, else the named
    preset `model.preset` (e.g. `llava_1_5_7b`; what tools/aot.py compiles for when the
    checkpoints are not on this machine)."""
    from llava_jax.convert.hf import resolve_config

    m = config.model
    if m.init == "scratch":
        return scratch_config(config, vocab_size, image_token_id if image_token_id is not None else vocab_size - 1)
    path, kw = _checkpoint_kwargs(config, image_token_id)
    local = (Path(path) / "config.json").exists() and (m.init == "hf" or (Path(m.clip_path) / "config.json").exists())
    if local:
        kw.pop("projector_path")
        return resolve_config(Path(path), **kw).replace(runtime=runtime(config), lora=lora_config(config),
                                                        base_quant=base_quant(config))
    preset = m.get("preset") or preset_for(path)
    if preset not in PRESETS:
        raise ValueError(f"no local config.json for {path!r} / {m.clip_path!r} and model.preset={preset!r} is not a "
                         f"named preset ({sorted(PRESETS)}); point the config at checkpoint dirs or name a preset")
    cfg = PRESETS[preset]()
    if m.init == "clip_llama":
        cfg = cfg.replace(projector_type=m.projector_type, vision_feature_layer=m.vision_feature_layer,
                          vision_feature_select_strategy=m.vision_feature_select_strategy)
    if pins := image_grid_pinpoints(config):
        cfg = cfg.replace(image_grid_pinpoints=pins)
    if vocab_size is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab_size))
    return cfg.replace(runtime=runtime(config), lora=lora_config(config), base_quant=base_quant(config))


# checkpoint dir name patterns of the other backbones -> preset (first match wins)
_DIR_PRESETS = (
    (r"llava-v1\.6-vicuna-13b", "llava_v1_6_vicuna_13b"),
    (r"llava-v1\.6-vicuna-7b", "llava_v1_6_vicuna_7b"),
    (r"llava-v1\.6-mistral-7b", "llava_v1_6_mistral_7b"),
    (r"llama-?3\.1-8b", "llava_llama3_1_8b"),
    (r"llama-?3-8b", "llava_llama3_8b"),
    (r"qwen2-7b", "llava_qwen2_7b"),
    (r"mistral-7b(-instruct)?-v0\.1", "llava_mistral_7b_v0_1"),
    (r"mistral-7b", "llava_mistral_7b"),
)


def preset_for(path: str) -> str | None:
    """The preset a checkpoint directory's name stands for (vicuna-7b-v1.5, llava-1.5-13b-hf,
    Meta-Llama-3-8B-Instruct, Qwen2-7B-Instruct, Mistral-7B-Instruct-v0.2, ...)."""
    name = Path(path or "").name.lower()
    for pattern, preset in _DIR_PRESETS:
        if re.search(pattern, name):
            return preset
    for size in ("13b", "7b"):
        if size in name and ("vicuna" in name or "llava" in name):
            return f"llava_1_5_{size}"
    return None


# =============================================================================== model
def model(config, mesh, tokenizer_ids=None, vocab_size: int | None = None) -> LlavaModel:
    """The model of `config` with every param created or loaded directly into its shard (no full
    copy on one device), then the previous stages' trained params applied on top."""
    m = config.model
    adapter = init_adapter(config)
    if adapter:  # refused before the base is loaded if it does not fit model.lora
        from llava_jax.convert.peft import check_init_adapter

        check_init_adapter(adapter, model_config(config, vocab_size, getattr(tokenizer_ids, "image_token_id", None)))
    if m.init == "scratch":
        cfg = scratch_config(config, vocab_size, tokenizer_ids.image_token_id)
        graphdef, abs_state = shd.abstract_model(lambda: LlavaModel(cfg, rngs=nnx.Rngs(m.seed)), mesh)
        shardings = jax.tree.map(lambda x: x.sharding, abs_state)

        def init():
            return nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(m.seed)))[1]

        # Init runs once: on CPU, skip LLVM's optimisations (the random-number graphs of ~40
        # params otherwise take most of a tiny model's start-up to compile; 3x faster measured).
        opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
        state = jax.jit(init, out_shardings=shardings, compiler_options=opts)()
        built = nnx.merge(graphdef, state)
    else:
        from llava_jax.convert.hf import from_pretrained

        path, kw = _checkpoint_kwargs(config, None if tokenizer_ids is None else tokenizer_ids.image_token_id)
        rt = runtime(config)
        built = from_pretrained(path, mesh=mesh, dtype=rt.dtype, param_dtype=rt.param_dtype,
                                remat_policy=rt.remat_policy, attention_impl=rt.attention_impl, **kw)
        if lora_config(config) is not None:  # fresh adapters (a no-op) in the kernels' shardings
            from llava_jax.convert.peft import add_lora

            built = add_lora(built, lora_config(config), seed=m.seed)
        if base_quant(config) is not None:  # QLoRA: the loaded base quantized kernel by kernel, in its shards
            from llava_jax.models.quant import quantize_model

            built = quantize_model(built, base_quant(config))
    for wd in previous_stages(config):
        built, _ = apply_workdir_params(built, wd, m.init_from_workdir_patterns)
    if adapter:  # after the previous stages: an adapter's own projector wins
        from llava_jax.convert.peft import init_adapter as load_init_adapter

        built = load_init_adapter(built, adapter)
    return built


def init_adapter(config) -> str | None:
    """`model.lora.init_adapter`: the PEFT adapter directory the run's adapters start from (None:
    fresh adapters, or a config that predates the field)."""
    lora = config.model.get("lora")
    return (lora.get("init_adapter", "") if lora is not None else "") or None


def previous_stages(config) -> list[str]:
    """`model.init_from_workdir`: comma-separated workdirs, applied in order (later ones win)."""
    return [w.strip() for w in str(config.model.init_from_workdir or "").split(",") if w.strip()]


def apply_workdir_params(model: LlavaModel, workdir: str, patterns) -> tuple[LlavaModel, set[str]]:
    """Load a training run's trained params (its latest checkpoint) into `model`; only those
    matching `patterns` are taken (e.g. just `projector/.*` from a stage-1 run). Returns the
    model and the param paths loaded."""
    from llava_jax.checkpoint import Checkpointer
    from llava_jax.train_step import split_model

    ck = Checkpointer(workdir, async_save=False)
    try:
        step = ck.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: is {workdir} a training workdir "
                                    "whose run saved at least once?")
        saved_patterns = ck.extra(step).get("meta", {}).get("trainable")
        if not saved_patterns:
            raise ValueError(f"checkpoint {workdir} step {step} does not record its trainable params")
        _, saved_like, _ = split_model(model, saved_patterns)
        # Only what the earlier stage had: a param this model adds keeps its initialisation
        # (LLaVA-NeXT's `projector/image_newline`: stage 1 runs at base resolution without it).
        on_disk = ck.param_paths(step)
        new = [path_str(p) for p, _ in nnx.to_flat_state(saved_like) if on_disk and path_str(p) not in on_disk]
        if new:
            log.info("%s step %d has no %s: kept as initialised", workdir, step, new)
            saved_like = saved_like.filter(lambda p, _: path_str(p) in on_disk)
        restored = ck.restore_params(step, saved_like)
    finally:
        ck.close()
    wanted = PathPatterns(patterns)
    keep = [(p, v) for p, v in nnx.to_flat_state(restored) if wanted(p)]
    if not keep:
        raise ValueError(f"none of the params saved in {workdir} ({saved_patterns}) match {list(patterns)}")
    nnx.update(model, nnx.from_flat_state(keep))
    log.info("loaded %d params from %s step %d", len(keep), workdir, step)
    return model, {path_str(p) for p, _ in keep}


def record_run_config(config, workdir) -> None:
    """Write the run's config to `WORKDIR/run_config.json` (what `trained_model` rebuilds from)."""
    from llava_jax.fileio import as_path

    (as_path(workdir) / RUN_CONFIG).write_text(config.to_json_best_effort(indent=2))


def run_config(workdir):
    """The config a training run recorded in its workdir (an ml_collections ConfigDict)."""
    import ml_collections

    from llava_jax.fileio import as_path

    path = as_path(workdir) / RUN_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir of llava-jax (or was "
                                "trained before runs recorded their config; pass its --config)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def provided_params(config, loaded_from_checkpoints: set[str], all_paths: Sequence[str]) -> set[str]:
    """Param paths of `config`'s model that a checkpoint provided: the HF / CLIP / LLaMA
    checkpoints (all but a fresh projector), plus `loaded_from_checkpoints` (workdirs)."""
    m = config.model
    if m.init == "scratch":
        base: set[str] = set()
    elif m.init == "clip_llama" and not m.projector_path:
        base = {p for p in all_paths if not p.startswith("projector/")}
    else:
        base = set(all_paths)
    return base | loaded_from_checkpoints


def trained_model(workdir, config=None, mesh=None, *, allow_random_init: bool = False):
    """(model, tokenizer, config) of a finished training workdir: the model rebuilt as the run
    built it (from `config`, default the config the run recorded), every previous stage applied,
    then the workdir's own trained params.

    Raises ProvenanceError, naming the missing subtrees and the flag that supplies them, when a
    param would keep its random initialisation (no checkpoint, previous stage or this workdir
    provided it), unless `allow_random_init`."""
    config = run_config(workdir) if config is None else config
    mesh = mesh or shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tok, ids = tokenizer(config)
    m = config.model
    built = model(_without_previous_stages(config), mesh, ids, vocab_size=len(tok))
    all_paths = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(built, nnx.Param))]
    loaded: set[str] = set()
    for wd in previous_stages(config):
        built, got = apply_workdir_params(built, wd, m.init_from_workdir_patterns)
        loaded |= got
    built, got = apply_workdir_params(built, str(workdir), [r".*"])
    loaded |= got
    missing = sorted(set(all_paths) - provided_params(config, loaded, all_paths))
    if missing and not allow_random_init:
        subtrees: dict[str, int] = {}
        for p in missing:
            top = p.split("/")[0] + "/"
            subtrees[top] = subtrees.get(top, 0) + 1
        what = ", ".join(f"{k} ({n} tensors)" for k, n in sorted(subtrees.items()))
        raise ProvenanceError(
            f"no checkpoint provides {what} of the model trained in {workdir}: it would be exported or served "
            f"with random weights there. The run's config (model.init={m.init!r}, model.init_from_workdir="
            f"{m.init_from_workdir!r}) names no source for them. Give the workdirs that trained them, e.g. "
            "--config.model.init_from_workdir=TOWER_WORKDIR,STAGE1_WORKDIR (in order), or the checkpoint dirs "
            "(model.hf_path / clip_path / llm_path / projector_path); --allow_random_init if random is intended. "
            f"First missing params: {missing[:5]}")
    return built, tok, config


def _without_previous_stages(config):
    c = config.copy_and_resolve_references()
    c.model.init_from_workdir = ""
    return c


# =============================================================================== data
@dataclasses.dataclass
class TrainingData:
    """This process's input for a run: `iterator` yields batches of `process_batch` rows (shard
    `shard[0]` of `shard[1]`, `sharding.process_data_shard`); `num_steps` is the schedule's length."""
    iterator: Any
    num_steps: int
    shard: tuple[int, int]
    process_batch: int


def training_data(config, tokenizer, model_cfg: LlavaConfig, mesh, workdir) -> TrainingData:
    """The run's input pipeline. Skipped rows go to the workdir's skip log (one file per process
    when there are several); `train.num_steps <= 0` means one schedule over `data.num_epochs`,
    estimated in packed rows (`estimate_num_steps`)."""
    from llava_jax.data.pipeline import make_iterator, make_skip_log
    from llava_jax.data.pipeline_config import PipelineConfig
    from llava_jax.data.sources import ConcatSource, sources_from_config
    from llava_jax.fileio import as_path

    d = config.data
    shard = shd.process_data_shard(mesh)
    process_batch = config.train.global_batch // shard[1]
    pcfg = PipelineConfig.from_config(d, model_cfg, process_batch)
    sources = ConcatSource(sources_from_config(d.sources, d.image_folder))
    skip_path = None
    if d.skip_log:
        skip_path = as_path(workdir) / d.skip_log
        if jax.process_count() > 1:
            skip_path = skip_path.with_name(f"{skip_path.stem}.process{jax.process_index()}{skip_path.suffix}")
    it = make_iterator(sources, tokenizer, pcfg, process_index=shard[0], process_count=shard[1],
                       skip_log=make_skip_log(skip_path))
    num_steps = config.train.num_steps
    if num_steps <= 0:
        num_steps = estimate_num_steps(sources, tokenizer, pcfg, d.num_epochs, config.train.global_batch)
        log.info("num_steps estimated at %d for %d epochs", num_steps, d.num_epochs)
    return TrainingData(it, num_steps, shard, process_batch)


def estimate_num_steps(sources, tokenizer, pcfg, num_epochs: int, global_batch: int, probe: int = 256) -> int:
    """Optimizer steps for `num_epochs` passes: packed rows per sample measured on the first
    `probe` records (run through the real pipeline, with the training run's packing window),
    scaled to the whole source."""
    import math

    from llava_jax.data.pipeline import make_iterator
    from llava_jax.data.skips import NoTrainingData

    n = len(sources)
    k = min(n, probe)
    sub = [sources[i] for i in range(k)]
    # One row per batch, but the training run's packing window (`num_bins` follows the batch
    # size by default): with a single open row the probe packed worse than training and
    # overestimated the steps by ~14% on the demo, so the cosine schedule was cut before its end.
    it = make_iterator(sub, tokenizer, pcfg.replace(batch_size=1, pack_bins=pcfg.num_bins, shuffle=False,
                                                    num_epochs=1, worker_count=0, drop_remainder=False,
                                                    prefetch_batches=0),
                       process_index=0, process_count=1)
    try:
        rows = sum(1 for _ in it)
    except NoTrainingData:  # every probed row skipped: the run's own guard judges the whole data
        rows = 0
    return max(1, math.ceil(n * num_epochs * max(rows, 1) / k / global_batch))


# =============================================================================== step
@dataclasses.dataclass
class TrainParts:
    """What the train step holds: the graph, the trainable and frozen params, the optimizer, its
    state and the compiled `step(trainable, opt_state, frozen, batch, step) -> (trainable,
    opt_state, metrics)`."""
    graphdef: Any
    trainable: Any
    frozen: Any
    tx: Any
    schedule: Any
    opt_state: Any
    step: Any


def train_parts(config, mesh, model: LlavaModel, num_steps: int, *, abstract: bool = False, batch=None) -> TrainParts:
    """Split `model` into trainable and frozen params (`config.trainable`), build the optimizer
    and its state in the params' shardings, and the compiled step (`compiled_train_step`).
    `abstract`: `model` is `shd.abstract_model`'s (params are ShapeDtypeStructs carrying their
    shardings) and nothing is materialised (tools/aot.py lowers the same step for a TPU topology;
    `batch`: a `batch_spec`)."""
    from llava_jax.train_step import make_optimizer, opt_state_shardings, split_model

    graphdef, trainable, frozen = split_model(model, list(config.trainable))
    frozen = frozen_for_training(frozen, config)
    tx, schedule = make_optimizer(config.optim, num_steps, trainable)
    shardings = opt_state_shardings(tx, trainable, mesh)
    if abstract:
        opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 jax.eval_shape(tx.init, trainable), shardings)
    else:
        opt_state = jax.jit(tx.init, out_shardings=shardings)(trainable)
    step = compiled_train_step(config, mesh, graphdef, tx, schedule, trainable, opt_state, frozen, batch)
    return TrainParts(graphdef, trainable, frozen, tx, schedule, opt_state, step)


@dataclasses.dataclass
class TrainingRun:
    """All a training loop needs, assembled from one config: the mesh, the model's config, the
    input (`TrainingData`) and the step with its params and optimizer state (`TrainParts`)."""
    mesh: Any
    model_config: LlavaConfig
    data: TrainingData
    parts: TrainParts


def training_run(config, workdir) -> TrainingRun:
    """The trainer's assembly, in order: mesh, the run's config recorded in `workdir` (process 0),
    tokenizer, model (params created/loaded straight into their shards), the process's input
    shard, freezing + optimizer + compiled step. Checks that the tokenizer fits the model's
    vocabulary; logs the batch layout and the param counts."""
    from llava_jax.train_step import count_params, param_count_by_subtree

    mesh = shd.make_mesh(dict(config.train.mesh))
    grad_accum = grad_accum_steps(config, mesh)
    if jax.process_index() == 0:
        record_run_config(config, workdir)
    tok, tok_ids = tokenizer(config)
    built = model(config, mesh, tok_ids, vocab_size=len(tok))
    model_cfg: LlavaConfig = built.config
    if len(tok) > model_cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model vocab is {model_cfg.text.vocab_size}")
    # Each process reads the data shard whose rows its devices hold; the global batch is
    # assembled from the process-local rows (jax.make_array_from_process_local_data).
    data = training_data(config, tok, model_cfg, mesh, workdir)
    log.info("mesh %s, global batch %d = %d per device x %d devices x %d accumulation; %d process(es), "
             "input shard %d of %d (%d rows each)", dict(mesh.shape), config.train.global_batch,
             config.train.per_device_batch, shd.data_parallel_size(mesh), grad_accum, jax.process_count(),
             data.shard[0], data.shard[1], data.process_batch)
    parts = train_parts(config, mesh, built, data.num_steps)
    log.info("trainable params %s (%d); frozen %d", param_count_by_subtree(parts.trainable),
             count_params(parts.trainable), count_params(parts.frozen))
    return TrainingRun(mesh, model_cfg, data, parts)


def frozen_for_training(frozen, config):
    """The frozen params as the train step holds them: in model.dtype when model.cast_frozen
    (`train_step.cast_frozen`: every use casts them to it anyway), else as loaded."""
    from llava_jax.train_step import cast_frozen

    return cast_frozen(frozen, DTYPES[config.model.dtype]) if config.model.cast_frozen else frozen


def grad_accum_steps(config, mesh) -> int:
    """Micro-batches per optimizer step: global_batch / (per_device_batch x data-parallel devices)."""
    dp = shd.data_parallel_size(mesh)
    micro = config.train.per_device_batch * dp
    if config.train.global_batch % micro:
        raise ValueError(f"global_batch {config.train.global_batch} is not a multiple of per_device_batch "
                         f"{config.train.per_device_batch} x {dp} data-parallel devices")
    return config.train.global_batch // micro


def compiled_train_step(config, mesh, graphdef, tx, schedule, trainable, opt_state, frozen, batch=None):
    """The jitted train step (`train_step.make_train_step`) with the run's shardings, activations
    pinned to the batch sharding and the trainable params and optimizer state donated; the step
    options (`model.loss_chunk`) are its arguments. `batch` (arrays or `batch_spec`) fixes the
    batch shardings when given."""
    from llava_jax.train_step import make_train_step

    sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # metrics: readable on every host
    lora = lora_config(config)
    step = make_train_step(graphdef, tx, schedule, grad_accum_steps(config, mesh), loss_chunk=config.model.loss_chunk,
                           dropout_seed=config.train.seed if lora is not None and lora.dropout > 0 else None)
    return jax.jit(with_batch_sharded_activations(step, mesh),
                   in_shardings=(sh(trainable), sh(opt_state), sh(frozen), None if batch is None else sh(batch),
                                 None if batch is None else replicated),
                   out_shardings=(sh(trainable), sh(opt_state), replicated), donate_argnums=(0, 1))


def with_batch_sharded_activations(fn, mesh):
    """`fn` traced with every model layer's activations pinned to the batch sharding (see
    `llava_jax.models.layers.batch_sharded_activations`); wrap a train step with it before jit."""
    from llava_jax.models.layers import batch_sharded_activations

    def traced(*args, **kwargs):
        with batch_sharded_activations(lambda ndim: shd.batch_sharding(mesh, ndim)):
            return fn(*args, **kwargs)

    return traced


def batch_spec(config, model_cfg: LlavaConfig, mesh, rows: int | None = None) -> dict:
    """The global batch as ShapeDtypeStructs with their shardings: `rows` (default
    train.global_batch) packed rows of data.max_length tokens, data.max_images_per_row image slots
    (a LLaVA-NeXT model: each slot's 1 + max_tiles AnyRes views and the rows' image_index, the
    pipeline's `data.packing.build_row` layout)."""
    from llava_jax.data.anyres import index_capacity

    rows = rows or config.train.global_batch
    L, M, S = config.data.max_length, config.data.max_images_per_row, model_cfg.vision.image_size
    shapes = {"input_ids": ((rows, L), jnp.int32), "targets": ((rows, L), jnp.int32),
              "segment_ids": ((rows, L), jnp.int32), "positions": ((rows, L), jnp.int32)}
    if model_cfg.is_anyres:
        k = 1 + model_cfg.max_tiles
        shapes.update(tiles=((rows, M, k, S, S, 3), jnp.uint8), tile_mask=((rows, M, k), jnp.bool_),
                      image_index=((rows, index_capacity(model_cfg, M, L)), jnp.int32))
    else:
        shapes.update(images=((rows, M, S, S, 3), jnp.uint8), image_mask=((rows, M), jnp.bool_))
    return {k: jax.ShapeDtypeStruct(s, d, sharding=shd.batch_sharding(mesh, len(s))) for k, (s, d) in shapes.items()}
