"""LoRA adapters <-> PEFT adapter directories, and merging.

    add_lora(model, LoraConfig(rank=8, alpha=16))   fresh adapters (a no-op until trained)
    save_adapter(model, out_dir)                    adapter_config.json + adapter_model.safetensors
    load_adapter(model, adapter_dir)                a PEFT LoRA adapter onto a llava-jax model
    merge(model)                                    adapters folded into the kernels, then removed

The directory is the one `peft.PeftModel.from_pretrained(LlavaForConditionalGeneration, dir)`
loads: tensor names are PEFT's (`base_model.model.model.language_model.layers.N.self_attn.
q_proj.lora_A.weight`, from the one key map in `keymap.py`), `target_modules` a regex that picks
the same projections of the language model only (a plain list of names would also catch the
CLIP tower's q/k/v projections). Each function changes `model` in place (no second copy of a 7B
base) and returns it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from llava_jax import sharding as shd
from llava_jax.convert import keymap
from llava_jax.convert.hf import CheckpointError, _flat_params, hf_tensors
from llava_jax.convert.safetensors_io import checkpoint_files, prepare_output_dir, write_safetensors
from llava_jax.models import lora as lora_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# transformers module name of each projection inside a decoder layer
MODULE_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _mesh_of(model):
    sharding = getattr(model.llm.layers.q_kernel.value, "sharding", None)
    return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None


def _adapters(model, lora: lora_lib.LoraConfig, seed: int | None):
    """Adapters for `model`'s LLM, created in the shardings their logical axes give on the mesh
    the base kernels live on (zeros when `seed` is None: to be filled from a file)."""
    cfg = model.config
    dtype = cfg.runtime.param_dtype

    def make():
        return lora_lib.LoraAdapters(cfg.text, lora, dtype, None if seed is None else nnx.Rngs(seed))

    mesh = _mesh_of(model)
    if mesh is None:
        return make()
    graphdef, abstract = shd.abstract_model(make, mesh)
    # as build.model's init: on CPU, LLVM's optimisations only slow down a one-off random init
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    state = jax.jit(lambda: nnx.state(make()), out_shardings=jax.tree.map(lambda x: x.sharding, abstract),
                    compiler_options=opts)()
    return nnx.merge(graphdef, state)


def _attach(model, adapters, lora):
    model.llm.layers.lora = adapters
    model.config = model.config.replace(lora=lora)
    return model


def add_lora(model, lora: lora_lib.LoraConfig, seed: int = 0):
    """Fresh adapters (PEFT's init: A kaiming-uniform, B zeros) on `model`'s LLM."""
    if model.config.lora is not None:
        raise ValueError("the model already has LoRA adapters (merge them first, or start from the base)")
    return _attach(model, _adapters(model, lora, seed), lora)


def merge(model):
    """Fold the adapters into their kernels (W + scale * A B, in fp32) and drop them: the model
    PEFT's `merge_and_unload()` gives. A quantized base (QLoRA) is dequantized first: the merged
    model computes what the adapters were trained on, in the params' dtype."""
    lora = model.config.lora
    if lora is None:
        return model
    if model.config.base_quant is not None:
        from llava_jax.models.quant import dequantize_model

        dequantize_model(model)
    merged = lora_lib.merged_flat({p: v.value for p, v in _flat_params(model).items()}, lora)
    for n in lora.modules:
        var = getattr(model.llm.layers, f"{n}_kernel")
        new = merged[f"llm/layers/{n}_kernel"]
        sharding = getattr(var.value, "sharding", None)  # keep the kernel where it was (FSDP / TP shards)
        var.value = new if sharding is None else jax.device_put(new, sharding)
    model.llm.layers.lora = None
    model.config = model.config.replace(lora=None)
    return model


def target_modules_regex(lora: lora_lib.LoraConfig) -> str:
    """PEFT `target_modules` (a regex PEFT fully matches against module names) for the adapted
    projections of the language model's layers, in either llava-hf key layout."""
    names = "|".join(re.escape(MODULE_NAMES[n]) for n in lora.modules)
    return rf".*language_model\..*layers\.\d+\.({names})"


def save_adapter(model, out_dir, dtype=None, base_model_name_or_path: str | None = None, overwrite: bool = False):
    """Write the model's adapters as a PEFT LoRA adapter directory."""
    lora = model.config.lora
    if lora is None:
        raise ValueError("the model has no LoRA adapters to save")
    out = prepare_output_dir(out_dir, overwrite)
    tensors = [(keymap.peft_key(k), v if dtype is None else v.astype(np.dtype(dtype)))
               for k, v in hf_tensors(model, select=lambda p: p.startswith(lora_lib.LORA_PREFIX))]
    write_safetensors(out / ADAPTER_WEIGHTS, tensors)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": target_modules_regex(lora), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def _check_config(c: dict, path: Path) -> None:
    """Refuse PEFT features these adapters do not compute, naming the field."""
    unsupported = []
    if c.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type={c.get('peft_type')!r} (only LORA)")
    for field, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if c.get(field, ok) != ok:
            unsupported.append(f"{field}={c[field]!r}")
    if c.get("bias", "none") != "none" or c.get("lora_bias"):
        unsupported.append(f"bias={c.get('bias')!r} (only 'none')")
    if c.get("modules_to_save"):
        unsupported.append(f"modules_to_save={c['modules_to_save']!r}")
    for field, base in (("rank_pattern", c.get("r")), ("alpha_pattern", c.get("lora_alpha"))):
        if any(v != base for v in (c.get(field) or {}).values()):
            unsupported.append(f"{field}={c[field]!r} (one rank and alpha for every module)")
    if unsupported:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: unsupported PEFT settings: {'; '.join(unsupported)}")


def load_adapter(model, adapter_dir):
    """A PEFT LoRA adapter directory onto `model` (without adapters). Layers the adapter leaves
    out (`layers_to_transform`) get zero adapters, which change nothing."""
    path = Path(adapter_dir)
    if model.config.lora is not None:
        raise ValueError("the model already has LoRA adapters (merge them first, or start from the base)")
    c = json.loads((path / ADAPTER_CONFIG).read_text()) if (path / ADAPTER_CONFIG).exists() else None
    if c is None:
        raise FileNotFoundError(f"{path / ADAPTER_CONFIG} not found: {path} is not a PEFT adapter directory")
    _check_config(c, path)
    files = checkpoint_files(path / ADAPTER_WEIGHTS if (path / ADAPTER_WEIGHTS).exists() else path)
    entries = {}
    for f in files:
        for raw in f.keys():
            entries[keymap.normalize_peft(raw) or raw] = (f, raw)
    n_layers = model.config.text.num_layers
    templates = {n: {ab: keymap.hf_key_for(f"{lora_lib.LORA_PREFIX}{n}_{ab}") for ab in "ab"}
                 for n in lora_lib.PROJECTIONS}
    found = [n for n in lora_lib.PROJECTIONS
             if any(templates[n]["a"][0].format(i=i) in entries for i in range(n_layers))]
    known = {t[0].format(i=i) for n in found for t in templates[n].values() for i in range(n_layers)}
    unexpected = sorted(k for k in entries if k not in known)
    if unexpected or not found:
        raise CheckpointError(f"{path}: adapter tensors llava-jax cannot place (it adapts the language model's "
                              f"{', '.join(MODULE_NAMES.values())} only): {unexpected[:10] or 'none found'}")
    lora = lora_lib.LoraConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0)),
                               rslora=bool(c.get("use_rslora", False)),
                               targets=(rf"llm/layers/({'|'.join(found)})_kernel",))
    adapters = _adapters(model, lora, None)
    for p, var in _flat_params(nnx.state(adapters, nnx.Param)).items():
        full = lora_lib.LORA_PREFIX + p
        template, transform, _ = keymap.hf_key_for(full)
        shape = tuple(var.value.shape)
        expect = keymap.hf_shape(transform, shape[1:])
        buf = np.zeros(shape, np.dtype(var.value.dtype))
        for i in range(n_layers):
            key = template.format(i=i)
            if key not in entries:
                continue
            f, raw = entries[key]
            if tuple(f.shape(raw)) != tuple(expect):
                raise CheckpointError(f"{path}: {raw} has shape {tuple(f.shape(raw))}, expected {tuple(expect)} "
                                      f"(rank {lora.rank} from {ADAPTER_CONFIG})")
            buf[i] = keymap.to_ours(np.asarray(f.get(raw), np.float32), transform, shape[1:])
        sharding = getattr(var.value, "sharding", None)
        getattr(adapters, p).value = jax.device_put(buf, sharding) if sharding is not None else jax.device_put(buf)
    return _attach(model, adapters, lora)
