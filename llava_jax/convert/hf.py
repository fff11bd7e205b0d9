"""Load llava_jax models from HF-format directories and export them back.

Import paths (all streamed from memory-mapped files, one target param at a time):
  * llava-hf `LlavaForConditionalGeneration` dirs (legacy or transformers-5 key layouts);
  * original LLaVA `LlavaLlamaForCausalLM` dirs + a separate CLIP dir (`clip_path`);
  * a CLIP dir + a LLaMA/Vicuna dir with a fresh projector (the stage-1 start);
  * optionally a stage-1 projector file (`projector_path`) overriding the projector.
Export writes the legacy llava-hf layout that `LlavaForConditionalGeneration.from_pretrained`
loads with no missing or unexpected keys.
A model with LoRA adapters is exported merged (the adapters folded into their kernels, as
PEFT's `merge_and_unload`); `convert/peft.py` writes the adapters alone, as a PEFT adapter.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax import sharding as shd
from llava_jax.config import SUPPORTED_TEXT_MODEL_TYPES, LlavaConfig
from llava_jax.convert import keymap
from llava_jax.convert.safetensors_io import checkpoint_files, prepare_output_dir, write_sharded
from llava_jax.data.templates import CHAT_TEMPLATE, chat_template_jinja
from llava_jax.data.tokenize import save_tokenizer
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import LlavaModel
from llava_jax.models.params import path_str
from llava_jax.models.projector import Projector


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names the keys and shapes involved."""


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def _flat_params(model_or_state) -> dict[str, nnx.Variable]:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return {path_str(path): v for path, v in nnx.to_flat_state(state)}


class _KeyIndex:
    """canonical HF key -> (file, raw key), over several sources; later sources win."""

    def __init__(self):
        self.entries: dict[str, tuple[object, str]] = {}

    def add(self, files, normalize):
        for f in files:
            for raw in f.keys():
                canon = normalize(raw)
                if canon is not None:
                    self.entries[canon] = (f, raw)

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.entries)


def _layout(path: Path, clip_path):
    """(layout, the checkpoint's config.json, clip_path) of a checkpoint dir: "llava" (llava-hf) or
    "llama" (original LLaVA, or a LLaMA / Mistral / Qwen2 LLM dir, + a separate CLIP dir)."""
    cfg_dict = _read_json(path / "config.json") if path.is_dir() else {}
    mt = cfg_dict.get("model_type")
    if mt in ("llava", "llava_next"):  # llava_next: the same keys plus `image_newline`
        return "llava", cfg_dict, clip_path
    if mt in ("llava_llama",) + SUPPORTED_TEXT_MODEL_TYPES or "mm_vision_tower" in cfg_dict:
        if clip_path is None:
            tower = cfg_dict.get("mm_vision_tower")
            if tower and Path(tower).is_dir():
                clip_path = tower
            else:
                raise ValueError(
                    f"{path} is a {mt or 'LLaMA'}/original-LLaVA checkpoint; pass clip_path=<local CLIP dir> "
                    f"(its mm_vision_tower is {tower!r}, not a local directory)"
                )
        return "llama", cfg_dict, clip_path
    LlavaConfig.from_hf_dict(cfg_dict)  # raises the "unknown architecture" error
    raise AssertionError("unreachable")


PREPROCESSOR_CONFIG = "preprocessor_config.json"


def _processor_dict(*dirs) -> dict | None:
    """The image processor settings of the first of `dirs` (the checkpoint's, then the vision
    tower's) that has any: its preprocessor_config.json, or the "image_processor" entry of the
    processor_config.json that transformers 5's `LlavaProcessor.save_pretrained` writes instead.
    They name the image processor the model was trained with."""
    for d in dirs:
        if d is None:
            continue
        if (Path(d) / PREPROCESSOR_CONFIG).is_file():
            return _read_json(Path(d) / PREPROCESSOR_CONFIG)
        if (Path(d) / "processor_config.json").is_file():
            nested = _read_json(Path(d) / "processor_config.json").get("image_processor")
            if nested:
                return nested
    return None


def resolve_config(path, clip_path=None, projector_type=None, vision_feature_layer=None,
                   image_token_id=None, vision_feature_select_strategy=None, image_grid_pinpoints=None) -> LlavaConfig:
    """The LlavaConfig of a checkpoint dir (+ vision tower dir), from its config.json files alone
    (no weight file is opened), with the given overrides. The image processor comes from the
    checkpoint's processor settings (`_processor_dict`; else the tower dir's, else the tower's own):
    the one place the image preprocessing of a checkpoint is chosen."""
    layout, cfg_dict, clip_path = _layout(Path(path), clip_path)
    processor = _processor_dict(path, clip_path)
    if layout == "llava":
        vision_dict = _read_json(Path(clip_path) / "config.json") if clip_path else None
        cfg = LlavaConfig.from_hf_dict(cfg_dict, vision_dict, processor)
    else:
        mt = cfg_dict.get("model_type")  # a plain LLM dir keeps its architecture; original LLaVA is LLaMA
        cfg = LlavaConfig.from_hf_dict({**cfg_dict, "model_type": mt if mt in SUPPORTED_TEXT_MODEL_TYPES else "llava_llama"},
                                       _read_json(Path(clip_path) / "config.json"), processor)
    overrides = {k: v for k, v in (("projector_type", projector_type), ("vision_feature_layer", vision_feature_layer),
                                   ("image_token_id", image_token_id),
                                   ("vision_feature_select_strategy", vision_feature_select_strategy),
                                   ("image_grid_pinpoints", image_grid_pinpoints)) if v is not None}
    return cfg.replace(**overrides) if overrides else cfg


def _key_index(path: Path, clip_path):
    """(key index over the checkpoint files, params allowed to be freshly initialised)."""
    layout, _, clip_path = _layout(path, clip_path)
    index = _KeyIndex()
    fresh = None
    if layout == "llava":
        index.add(checkpoint_files(path), keymap.normalize_llava_hf)
        if clip_path:
            index.add(checkpoint_files(clip_path), keymap.normalize_clip)
    else:
        index.add(checkpoint_files(path), keymap.normalize_llama)
        index.add(checkpoint_files(clip_path), keymap.normalize_clip)
        if not index.has_prefix("multi_modal_projector."):
            fresh = r"projector/.*"  # CLIP + LLaMA: the stage-1 start, projector trained from scratch
    return index, fresh


def load_params_into(model_abs: LlavaModel, index: _KeyIndex, fresh_pattern: str | None = None,
                     fresh_values: dict | None = None, strict: bool = True) -> LlavaModel:
    """Fill an abstract model (`llava_jax.sharding.abstract_model`) with checkpoint tensors.

    Each target param is assembled on the host from memory-mapped views (stacked layers filled
    one layer at a time) and placed straight into the sharding its abstract value carries (on
    the default device when it carries none), then the host buffer is dropped.
    """
    graphdef, state = nnx.split(model_abs)
    flat = _flat_params(state)
    missing, mismatched = [], []
    used: set[str] = set()
    values: dict[str, jax.Array] = {}
    for path, var in flat.items():
        shape, dtype = tuple(var.value.shape), var.value.dtype
        if fresh_pattern and re.fullmatch(fresh_pattern, path):
            values[path] = fresh_values[path]
            continue
        template, transform, stacked = keymap.hf_key_for(path)
        n = shape[0] if stacked else 1
        per = shape[1:] if stacked else shape
        keys = [template.format(i=i) for i in range(n)] if stacked else [template]
        used.update(keys)  # accounted for, even if this param turns out missing or mis-shaped
        absent = [k for k in keys if k not in index.entries]
        if absent:
            missing.extend(absent)
            continue
        expect = keymap.hf_shape(transform, per)
        bad = [(k, index.entries[k][0].shape(index.entries[k][1])) for k in keys]
        bad = [(k, s) for k, s in bad if tuple(s) != tuple(expect)]
        if bad:
            mismatched.extend(f"{k}: expected {tuple(expect)} (for {path}), found {tuple(s)}" for k, s in bad)
            continue
        buf = np.empty(shape, dtype=np.dtype(dtype))
        for i, k in enumerate(keys):
            f, raw = index.entries[k]
            t = keymap.to_ours(f.get(raw), transform, per)
            if stacked:
                buf[i] = t
            else:
                buf[...] = t
        sharding = getattr(var.value, "sharding", None)
        if sharding is None:
            values[path] = jax.device_put(buf)
        else:
            values[path] = jax.make_array_from_callback(shape, sharding, lambda idx, b=buf: b[idx])
        del buf
    unexpected = sorted(set(index.entries) - used)
    problems = []
    if mismatched:
        problems.append("shape mismatch:\n  " + "\n  ".join(mismatched))
    if missing:
        problems.append(f"missing keys ({len(missing)}):\n  " + "\n  ".join(missing[:50]))
    if unexpected and strict:
        problems.append(f"unexpected keys ({len(unexpected)}):\n  " + "\n  ".join(unexpected[:50]))
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n" + "\n".join(problems))
    for path, var in flat.items():
        var.value = values[path]
    return nnx.merge(graphdef, state)


def from_pretrained(path, *, clip_path=None, projector_path=None, dtype=jnp.float32, param_dtype=jnp.float32,
                    projector_type: str | None = None, vision_feature_layer=None, image_token_id: int | None = None,
                    vision_feature_select_strategy: str | None = None, remat_policy: str = "none", attention_impl: str = "xla",
                    mesh=None, rules=None, strict: bool = True, seed: int = 0, image_grid_pinpoints=None) -> LlavaModel:
    """Load a LLaVA model from a local HF-format directory (see module docstring for layouts).

    `dtype` is the compute dtype, `param_dtype` the stored param dtype. With a `mesh`, each param
    is created directly in its shard, as the logical-axis `rules` (default: the one table in
    `llava_jax.sharding`) place it; no full copy ever sits on one device.
    """
    path = Path(path)
    cfg = resolve_config(path, clip_path, projector_type, vision_feature_layer, image_token_id,
                         vision_feature_select_strategy, image_grid_pinpoints)
    index, fresh = _key_index(path, clip_path)
    if projector_path is not None:
        proj = _KeyIndex()
        proj.add(checkpoint_files(projector_path), keymap.normalize_projector)
        if not proj.entries:
            raise CheckpointError(f"{projector_path} holds no projector weights (mm_projector.* / multi_modal_projector.*)")
        index.entries.update(proj.entries)
        # a stage-1 projector file never holds LLaVA-NeXT's newline: stage 2 starts it fresh
        fresh = r"projector/image_newline" if cfg.is_anyres else None
    cfg = cfg.with_runtime(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
                           attention_impl=attention_impl)
    model_abs = nnx.merge(*shd.abstract_model(lambda: LlavaModel(cfg, rngs=None), mesh, rules or shd.LOGICAL_RULES))
    fresh_values = None
    if fresh:
        proj = Projector(cfg.projector_type, cfg.projector_in_features, cfg.text.hidden_size, cfg.projector_bias,
                         image_newline=cfg.is_anyres, param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(seed))
        fresh_values = {"projector/" + k: v.value for k, v in _flat_params(proj).items()}
    return load_params_into(model_abs, index, fresh, fresh_values, strict)


# ------------------------------------------------------------------ export
def hf_tensors(model_or_params, dtype=None, lora=None, select=None):
    """Yield (canonical HF key, numpy array) for every param (those whose path `select` accepts),
    one param on the host at a time. Quantized kernels (`base_quant`: QLoRA, `--quantize`) are
    written dequantized, and LoRA adapters merged into their kernels first (`lora`: their
    LoraConfig, default the model's), unless `select` asks for the adapters themselves."""
    from llava_jax.models.quant import dequantized_flat

    flat = {p: v.value for p, v in _flat_params(model_or_params).items()}
    lora = lora if lora is not None else getattr(getattr(model_or_params, "config", None), "lora", None)
    if select is None:
        flat = dequantized_flat(flat)
    if lora is not None and select is None:
        flat = lora_lib.merged_flat(flat, lora)
    for path, value in sorted(flat.items()):
        if select is not None and not select(path):
            continue
        template, transform, stacked = keymap.hf_key_for(path)
        arr = np.asarray(jax.device_get(value))
        if dtype is not None:
            arr = arr.astype(np.dtype(dtype))
        if stacked:
            for i in range(arr.shape[0]):
                yield template.format(i=i), np.ascontiguousarray(keymap.to_hf(arr[i], transform))
        else:
            yield template, np.ascontiguousarray(keymap.to_hf(arr, transform))


def processor_files(cfg: LlavaConfig) -> dict[str, dict]:
    """The image-processor and LlavaProcessor (LlavaNextProcessor for AnyRes) settings matching the model."""
    image = cfg.image_processor.to_hf_dict(cfg.vision.image_size)
    processor_class = "LlavaProcessor"
    if cfg.is_anyres:  # LLaVA-NeXT: CLIP's steps per tile, the tiling from the grid pinpoints
        processor_class = "LlavaNextProcessor"
        image.update(image_processor_type="LlavaNextImageProcessor", processor_class=processor_class, do_pad=True,
                     image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints])
    return {
        PREPROCESSOR_CONFIG: image,
        "processor_config.json": {
            "processor_class": processor_class, "patch_size": cfg.vision.patch_size,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "num_additional_image_tokens": cfg.vision.num_class_tokens, "image_token": "<image>",
        },
    }


def save_pretrained(model: LlavaModel, out_dir, tokenizer=None, dtype=None, max_shard_size: int = 5 * 10**9,
                    overwrite: bool = False, template: str | None = None):
    """Write `model` as a llava-hf directory (legacy key layout, sharded safetensors + index,
    config.json, processor configs, and the tokenizer when given). A non-empty `out_dir` is
    refused unless `overwrite`, which first removes the weight files there (`prepare_output_dir`).
    `template`: the llava-jax template the model was trained with, written as the saved
    tokenizer's chat template, so that chat, serve and eval (`default_template`) and transformers'
    `apply_chat_template` render the prompt format it learned (templates the Jinja form does not
    cover, e.g. `plain`, write none)."""
    cfg: LlavaConfig = model.config
    store_dtype = np.dtype(dtype) if dtype is not None else np.dtype(cfg.runtime.param_dtype)
    if store_dtype.name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"llava-hf weights are stored as float32, bfloat16 or float16, not {store_dtype.name}")
    out = prepare_output_dir(out_dir, overwrite)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["dtype"] = store_dtype.name
    write_sharded(out, hf_tensors(model, store_dtype), max_shard_size)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    for name, content in processor_files(cfg).items():
        (out / name).write_text(json.dumps(content, indent=2))
    if tokenizer is not None:
        jinja = chat_template_jinja(template) if template and template != CHAT_TEMPLATE else None
        before = getattr(tokenizer, "chat_template", None)
        if jinja:
            tokenizer.chat_template = jinja
        try:
            save_tokenizer(tokenizer, out)
        finally:
            if jinja:
                tokenizer.chat_template = before
    return out
