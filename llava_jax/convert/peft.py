"""LoRA adapters <-> PEFT adapter directories, and merging.

    add_lora(model, LoraConfig(rank=8, alpha=16))   fresh adapters (a no-op until trained)
    save_adapter(model, out_dir)                    adapter_config.json + adapter_model.safetensors
    load_adapter(model, adapter_dir)                a PEFT LoRA adapter onto a llava-jax model
    init_adapter(model, adapter_dir)                its values into the model's own adapters (training)
    merge(model)                                    adapters folded into the kernels, then removed

The directory is the one `peft.PeftModel.from_pretrained(LlavaForConditionalGeneration, dir)`
loads: tensor names are PEFT's (`base_model.model.model.language_model.layers.N.self_attn.
q_proj.lora_A.weight`, from the one key map in `keymap.py`), `target_modules` a regex that picks
the same projections of the language model only (a plain list of names would also catch the
CLIP tower's q/k/v projections). Each function changes `model` in place (no second copy of a 7B
base) and returns it.

An adapter the original LLaVA's LoRA script trained (`llava/train/train.py`: PEFT on its
`LlavaLlamaForCausalLM`, keys `base_model.model.model.layers.N...`, maybe `adapter_model.bin`, and
the projector it trained in `non_lora_trainables.bin`) loads the same way, projector included.
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
from llava_jax.convert import keymap
from llava_jax.convert.hf import CheckpointError, _flat_params, hf_tensors
from llava_jax.convert.safetensors_io import checkpoint_files, prepare_output_dir, write_safetensors
from llava_jax.models import lora as lora_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# what load_adapter reads, first found: PEFT's, or its pickle (safe_serialization=False; older PEFT,
# e.g. the original LLaVA's LoRA runs)
ADAPTER_WEIGHT_FILES = (ADAPTER_WEIGHTS, "adapter_model.bin")
# the original LLaVA's LoRA run saves the params it trained beside the adapter (the projector) here
NON_LORA_TRAINABLES = "non_lora_trainables.bin"
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


class _AdapterDir:
    """A PEFT LoRA adapter directory, read for a model of `n_layers` decoder layers: its config
    (`lora`: rank, alpha, rsLoRA and the projections the file adapts), its tensors by canonical
    key, and the projector an original-LLaVA LoRA run saved beside them (`non_lora_trainables.bin`),
    read as its `mm_projector.bin` is (`checkpoint_files`, `normalize_projector`)."""

    def __init__(self, adapter_dir, n_layers: int):
        path = self.path = Path(adapter_dir)
        if not (path / ADAPTER_CONFIG).exists():
            raise FileNotFoundError(f"{path / ADAPTER_CONFIG} not found: {path} is not a PEFT adapter directory")
        c = json.loads((path / ADAPTER_CONFIG).read_text())
        _check_config(c, path)
        weights = next((path / n for n in ADAPTER_WEIGHT_FILES if (path / n).exists()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} holds no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)})")
        self.entries = {}
        for f in checkpoint_files(weights):
            for raw in f.keys():
                self.entries[keymap.normalize_peft(raw) or raw] = (f, raw)
        self.n_layers = n_layers
        self.templates = {n: {ab: keymap.hf_key_for(f"{lora_lib.LORA_PREFIX}{n}_{ab}") for ab in "ab"}
                          for n in lora_lib.PROJECTIONS}
        found = [n for n in lora_lib.PROJECTIONS
                 if any(self.templates[n]["a"][0].format(i=i) in self.entries for i in range(n_layers))]
        known = {t[0].format(i=i) for n in found for t in self.templates[n].values() for i in range(n_layers)}
        unexpected = sorted(k for k in self.entries if k not in known)
        if unexpected or not found:
            raise CheckpointError(f"{path}: adapter tensors llava-jax cannot place (it adapts the language model's "
                                  f"{', '.join(MODULE_NAMES.values())} only): {unexpected[:10] or 'none found'}")
        self.lora = lora_lib.LoraConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
                                        dropout=float(c.get("lora_dropout", 0)), rslora=bool(c.get("use_rslora", False)),
                                        targets=(rf"llm/layers/({'|'.join(found)})_kernel",))
        self.projector = {}
        if (path / NON_LORA_TRAINABLES).exists():
            for f in checkpoint_files(path / NON_LORA_TRAINABLES):
                for raw in f.keys():
                    canon = keymap.normalize_peft(raw) or keymap.normalize_projector(raw)
                    self.projector[canon if canon and canon.startswith("multi_modal_projector.") else raw] = (f, raw)
            other = sorted(k for k in self.projector if not k.startswith("multi_modal_projector."))
            if other:
                raise CheckpointError(f"{path / NON_LORA_TRAINABLES}: llava-jax takes the projector "
                                      f"(mm_projector.*) from it, not {other[:10]}")

    def first_tensor(self, module: str) -> str:
        """'KEY in FILE has shape S' for the first lora_A tensor of `module` in the file."""
        template = self.templates[module]["a"][0]
        key = next(template.format(i=i) for i in range(self.n_layers) if template.format(i=i) in self.entries)
        f, raw = self.entries[key]
        return f"{raw} in {Path(f.path).name} has shape {tuple(f.shape(raw))}"

    def fill(self, adapters) -> None:
        """The file's tensors into `adapters` (LoraAdapters in the file's rank), in their shardings;
        a layer the file leaves out keeps what `adapters` held there."""
        for p, var in _flat_params(nnx.state(adapters, nnx.Param)).items():
            template, transform, _ = keymap.hf_key_for(lora_lib.LORA_PREFIX + p)
            shape = tuple(var.value.shape)
            buf = np.zeros(shape, np.dtype(var.value.dtype))
            present = np.zeros(shape[0], bool)
            for i in range(self.n_layers):
                if (key := template.format(i=i)) in self.entries:
                    buf[i] = self._tensor(self.entries[key], transform, shape[1:])
                    present[i] = True
            getattr(adapters, p).value = _placed(buf, var.value, present)

    def _tensor(self, entry, transform, shape) -> np.ndarray:
        f, raw = entry
        expect = keymap.hf_shape(transform, shape)
        if tuple(f.shape(raw)) != tuple(expect):
            raise CheckpointError(f"{self.path}: {raw} has shape {tuple(f.shape(raw))}, expected {tuple(expect)} "
                                  f"({Path(f.path).name}; rank {self.lora.rank} from {ADAPTER_CONFIG})")
        return keymap.to_ours(np.asarray(f.get(raw), np.float32), transform, shape)

    def load_projector(self, model) -> bool:
        """The projector of `non_lora_trainables.bin` into `model.projector` (False: no such file)."""
        if not self.projector:
            return False
        params = _flat_params(model.projector)
        missing = []
        for p, var in params.items():
            template, transform, _ = keymap.hf_key_for("projector/" + p)
            if template not in self.projector:
                missing.append(template)
        if missing:
            raise CheckpointError(f"{self.path / NON_LORA_TRAINABLES} lacks the projector's {missing} "
                                  f"(it holds {sorted(self.projector)})")
        for p, var in params.items():
            template, transform, _ = keymap.hf_key_for("projector/" + p)
            buf = self._tensor(self.projector[template], transform, tuple(var.value.shape))
            var.value = _placed(buf.astype(np.dtype(var.value.dtype)), var.value)
        return True


def _placed(buf: np.ndarray, like, present: np.ndarray | None = None):
    """`buf` in `like`'s sharding; where `present` (over the leading axis) is False, `like`'s values."""
    sharding = getattr(like, "sharding", None)
    new = jax.device_put(buf, sharding) if sharding is not None else jax.device_put(buf)
    if present is None or present.all():
        return new
    mask = present.reshape((-1,) + (1,) * (buf.ndim - 1))
    return jax.jit(lambda old, new: jnp.where(mask, new, old), out_shardings=sharding)(like, new)


def load_adapter(model, adapter_dir):
    """A PEFT LoRA adapter directory onto `model` (without adapters). Layers the adapter leaves
    out (`layers_to_transform`) get zero adapters, which change nothing. The original LLaVA's LoRA
    runs load too: their keys name its `LlavaLlamaForCausalLM` (`keymap.normalize_peft`), the
    weights may be `adapter_model.bin`, and the projector they trained, `non_lora_trainables.bin`
    beside the adapter, replaces the model's."""
    if model.config.lora is not None:
        raise ValueError("the model already has LoRA adapters (merge them first, or start from the base)")
    src = _AdapterDir(adapter_dir, model.config.text.num_layers)
    adapters = _adapters(model, src.lora, None)
    src.fill(adapters)
    src.load_projector(model)
    return _attach(model, adapters, src.lora)


def check_init_adapter(adapter_dir, cfg):
    """The adapter directory `adapter_dir`, read, if it fits the LoRA adapters of the model config
    `cfg` (`cfg.lora`: the run's `model.lora`): the same rank, alpha, rsLoRA and projections;
    otherwise a CheckpointError naming the file and, for the rank, the shapes. Needs no model, so
    a run is refused before its base is loaded."""
    lora = cfg.lora
    if lora is None:
        raise ValueError(f"model.lora.init_adapter={str(adapter_dir)!r} needs LoRA adapters: set model.lora.rank")
    src = _AdapterDir(adapter_dir, cfg.text.num_layers)
    got, where = src.lora, src.path / ADAPTER_CONFIG
    problems = []
    if got.rank != lora.rank:
        n = next((n for n in got.modules if n in lora.modules), got.modules[0])
        transform = keymap.hf_key_for(f"{lora_lib.LORA_PREFIX}{n}_a")[1]
        expect = keymap.hf_shape(transform, lora_lib.io_dims(cfg.text)[n][0] + (lora.rank,))
        problems.append(f"rank: {where} has r={got.rank} ({src.first_tensor(n)}), "
                        f"model.lora.rank={lora.rank} expects {expect}")
    if got.alpha != lora.alpha:
        problems.append(f"alpha: {where} has lora_alpha={got.alpha:g}, model.lora.alpha={lora.alpha:g}")
    if got.rslora != lora.rslora:
        problems.append(f"rsLoRA: {where} has use_rslora={got.rslora}, model.lora.rslora={lora.rslora}")
    if set(got.modules) != set(lora.modules):
        problems.append(f"targets: the adapter adapts {', '.join(MODULE_NAMES[n] for n in got.modules)}; "
                        f"model.lora.targets={list(lora.targets)} adapt "
                        f"{', '.join(MODULE_NAMES[n] for n in lora.modules)}")
    if problems:
        raise CheckpointError(f"model.lora.init_adapter={str(src.path)!r} does not fit model.lora: "
                              + "; ".join(problems))
    return src


def with_adapter(model, base, adapter, merged: bool = True):
    """`model` (loaded from `base`) with the PEFT LoRA adapter directory `adapter` on it, merged
    into the kernels when `merged` (`--adapter` of the server, the chat CLI and the export); a
    CheckpointError names the adapter, the base and the tensor that does not fit."""
    if adapter is None:
        return model
    try:
        model = load_adapter(model, adapter)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise type(e)(f"cannot put the adapter {adapter} on the model {base}: {e}") from e
    return merge(model) if merged else model


def init_adapter(model, adapter_dir):
    """Start training from a PEFT adapter directory (`model.lora.init_adapter`): `model`'s adapters
    (made from the run's `model.lora`) take the file's values, layers the file leaves out keep
    their fresh ones (trainable: B is zero, A not), and an original-LLaVA run's projector
    (`non_lora_trainables.bin`) replaces the model's. The file must have been trained with the
    run's rank, alpha, rsLoRA and projections (`check_init_adapter`)."""
    src = check_init_adapter(adapter_dir, model.config)
    src.fill(model.llm.layers.lora)
    src.load_projector(model)
    return model
