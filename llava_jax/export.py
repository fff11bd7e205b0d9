"""Export a training run's model (or a checkpoint + a LoRA adapter) to a llava-hf directory:

    python -m llava_jax.export --workdir=DIR --out=HF_DIR [--dtype=bfloat16] [--overwrite]

The model is rebuilt exactly as the trainer built it, from the config the run recorded in
`DIR/run_config.json` (its checkpoints / seeded init + the previous stages' workdirs), the
workdir's latest trained params are applied, and the result is written with `save_pretrained`
(legacy llava-hf layout, sharded safetensors, config, processor configs and the run's tokenizer).
`transformers.LlavaForConditionalGeneration` loads it. `--config` (with `--config.x.y=...`
overrides) replaces the recorded config, e.g. for a run whose checkpoints moved.

A param that no checkpoint provided (neither the base checkpoints, nor a previous stage, nor the
workdir) would be exported with its random initialisation: the export refuses, naming the missing
subtrees and the flag that supplies them; `--allow_random_init` exports anyway.

GGUF for llama.cpp and Ollama (`llava_jax/convert/gguf_export.py`; needs `pip install -e ".[gguf]"`):

    python -m llava_jax.export --format=gguf --workdir=DIR --out=GGUF_DIR [--quant=f16|q8_0|q4_0|q4_K_M]
    python -m llava_jax.export --format=gguf --model=HF_DIR --out=GGUF_DIR     # any checkpoint llava-jax loads

writes the LLM GGUF, the `mmproj` GGUF (vision tower + projector) and an Ollama `Modelfile`.

A run that trained LoRA adapters (`model.lora`) exports merged weights in both formats (the
adapters folded into the kernels, as PEFT's `merge_and_unload`), or the adapter alone:

    python -m llava_jax.export --format=peft --workdir=DIR --out=ADAPTER_DIR

a PEFT adapter directory (`peft.PeftModel.from_pretrained(llava_hf_model, ADAPTER_DIR)`; the base
is the run's `model.hf_path`). A LoRA run's projector trains too: export it with the default
format, or the merged model, as PEFT's adapter holds the LLM's adapters only.

A PEFT LoRA adapter merged into a base (`--adapter`, with `--model` or `--workdir` as the base):

    python -m llava_jax.export --format=hf --model=BASE_HF_DIR --adapter=ADAPTER_DIR --out=HF_DIR

writes the llava-hf directory PEFT's `merge_and_unload()` gives for that base and adapter (and the
base's tokenizer, when its directory has one). ADAPTER_DIR is any adapter `convert/peft.py`
imports: PEFT's, `--format=peft`'s, or an original LLaVA LoRA run's output directory (its
`non_lora_trainables.bin` projector replaces the base's). `--format=gguf` takes `--adapter` too.
`--merge` (the default, and the only choice for llava-hf and GGUF, which have no place for
unmerged adapters) writes the adapters merged into the weights; `--nomerge` is refused there:
`--format=peft` writes an adapter alone. Without `--adapter`, `--format=hf --model=DIR` rewrites
any checkpoint llava-jax loads (e.g. the original LLaVA's layout) as a llava-hf directory.

HF_DIR must be empty or new: old weight files left next to the new ones would be read back
instead of them (a stale shard index). `--overwrite` writes into a non-empty HF_DIR, removing
the weight files there (*.safetensors, model.safetensors.index.json) first; other files stay.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
from absl import flags
from ml_collections import config_flags

from llava_jax.cli import run_absl

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "the run's config file (path:arg); default: the config the run recorded in WORKDIR",
    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "the training workdir to export (its latest checkpoint)")
_MODEL = flags.DEFINE_string("model", None, "or (--format=hf / gguf): a llava-hf directory / any checkpoint llava-jax "
                             "loads")
_ADAPTER = flags.DEFINE_string("adapter", None, "a PEFT LoRA adapter directory to merge into the model (--model or "
                               "--workdir) before writing it (--format=hf / gguf)")
_MERGE = flags.DEFINE_bool("merge", True, "write LoRA adapters merged into the weights (PEFT's merge_and_unload); "
                           "llava-hf and GGUF hold them no other way, so --nomerge is refused (use --format=peft)")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "gguf", "peft"], "hf: a llava-hf directory; gguf: llama.cpp/Ollama "
                            "files; peft: the run's LoRA adapter as a PEFT adapter directory")
_QUANT = flags.DEFINE_enum("quant", "f16", ["f16", "q8_0", "q4_0", "q4_K_M"], "GGUF weight type of the LLM "
                           "(the mmproj is f16); q4_K_M runs llama.cpp's llama-quantize")
_OUT = flags.DEFINE_string("out", None, "the llava-hf directory to write")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "stored weight dtype")
_RANDOM = flags.DEFINE_bool("allow_random_init", False, "export even if some params were never trained or loaded")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "write into a non-empty --out, removing the weight files there first")
flags.mark_flags_as_required(["out"])


def _trained_model(workdir: str, config, allow_random_init: bool):
    """(model, tokenizer, config) of a workdir, rebuilt on the run's own mesh shape."""
    from llava_jax import build, sharding

    config = config or build.run_config(workdir)
    mesh = sharding.make_mesh(dict(config.train.mesh))
    return build.trained_model(workdir, config, mesh, allow_random_init=allow_random_init)


def export(workdir: str, out: str, config=None, dtype: str = "float32", allow_random_init: bool = False,
           overwrite: bool = False, adapter: str | None = None):
    """A training workdir's model (with the PEFT adapter `adapter` merged into it) as llava-hf."""
    from llava_jax.convert.hf import save_pretrained
    from llava_jax.convert.peft import with_adapter
    from llava_jax.convert.safetensors_io import check_output_dir

    check_output_dir(out, overwrite)  # refuse now, not after building the model
    model, tokenizer, config = _trained_model(workdir, config, allow_random_init)
    model = with_adapter(model, workdir, adapter)
    save_pretrained(model, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite,
                    template=config.data.get("template"))  # served in the format it trained in
    return model


def export_checkpoint(model_dir: str, out: str, adapter: str | None = None, dtype: str = "float32",
                      overwrite: bool = False):
    """A checkpoint directory llava-jax loads (`llava_jax.from_pretrained`), with the PEFT adapter
    `adapter` merged into it, as llava-hf; the directory's tokenizer too when it has one."""
    from pathlib import Path

    import llava_jax
    from llava_jax.convert.peft import with_adapter
    from llava_jax.convert.safetensors_io import check_output_dir
    from llava_jax.data.tokenize import load_tokenizer

    check_output_dir(out, overwrite)
    model = with_adapter(llava_jax.from_pretrained(model_dir), model_dir, adapter)
    has_tokenizer = any((Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(model_dir) if has_tokenizer else None
    llava_jax.save_pretrained(model, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    return model


def export_gguf_checkpoint(out, workdir=None, model_dir=None, quant: str = "f16", config=None,
                           allow_random_init: bool = False, adapter=None) -> dict[str, Path]:
    """GGUF files of a training workdir (its latest checkpoint, rebuilt as the trainer built it)
    or of a checkpoint directory llava-jax loads (`llava_jax.from_pretrained`), with the PEFT LoRA
    adapter directory `adapter` merged in when given."""
    if bool(workdir) == bool(model_dir):
        raise ValueError("give exactly one of --workdir or --model")
    from llava_jax.convert.gguf_export import export_gguf
    from llava_jax.data.templates import default_template

    if workdir:
        from llava_jax import build

        model, tokenizer, config = build.trained_model(workdir, config, allow_random_init=allow_random_init)
        name = Path(workdir).name
        template = config.data.get("template", "vicuna_v1")  # the prompt format the run trained with
    else:
        import llava_jax
        from llava_jax.data.tokenize import load_tokenizer

        model, tokenizer, name = llava_jax.from_pretrained(model_dir), load_tokenizer(model_dir), Path(model_dir).name
        template = default_template(tokenizer)  # the format its chat template was written from, else vicuna_v1
    if template == "chat_template":  # the tokenizer's own template: its Jinja is no Template to convert
        template = "vicuna_v1"
    if adapter:
        from llava_jax.convert.peft import with_adapter

        model = with_adapter(model, workdir or model_dir, adapter)
    return export_gguf(model, tokenizer, out, quant=quant, name=name, template=template)


def export_adapter(workdir: str, out: str, config=None, dtype: str = "float32", allow_random_init: bool = False,
                   overwrite: bool = False):
    """The LoRA adapters a run trained, as a PEFT adapter directory (`convert/peft.py`)."""
    from llava_jax import build
    from llava_jax.convert.peft import save_adapter
    from llava_jax.convert.safetensors_io import check_output_dir

    check_output_dir(out, overwrite)
    config = config or build.run_config(workdir)
    if build.lora_config(config) is None:
        raise ValueError(f"the run in {workdir} trained no LoRA adapters (model.lora.rank is 0): "
                         "export it with --format=hf")
    model, _, _ = _trained_model(workdir, config, allow_random_init)
    save_adapter(model, out, dtype=dtype, base_model_name_or_path=config.model.hf_path or None, overwrite=overwrite)
    return model


def main(argv):
    del argv
    from llava_jax.build import ProvenanceError
    from llava_jax.convert.hf import CheckpointError

    try:
        if _FORMAT.value == "peft":
            if _ADAPTER.value:
                raise ValueError("--format=peft writes the adapter a run trained; --adapter is one already")
        elif not _MERGE.value:
            raise ValueError(f"--nomerge: --format={_FORMAT.value} has no place for unmerged LoRA adapters; write them "
                             "with --format=peft (and serve them with --adapter-unmerged)")
        if _FORMAT.value == "gguf":
            files = export_gguf_checkpoint(_OUT.value, _WORKDIR.value, _MODEL.value, _QUANT.value, _CONFIG.value,
                                           _RANDOM.value, adapter=_ADAPTER.value)
            if jax.process_index() == 0:
                print("\n".join(f"{k}: {v}" for k, v in files.items()))
            return
        if _FORMAT.value == "hf" and bool(_WORKDIR.value) == bool(_MODEL.value):
            raise ValueError("give exactly one of --workdir or --model")
        if _FORMAT.value == "hf" and _MODEL.value:
            export_checkpoint(_MODEL.value, _OUT.value, _ADAPTER.value, _DTYPE.value, _OVERWRITE.value)
        elif not _WORKDIR.value:
            raise ValueError(f"--format={_FORMAT.value} exports a training workdir: give --workdir")
        elif _FORMAT.value == "peft":
            export_adapter(_WORKDIR.value, _OUT.value, _CONFIG.value, _DTYPE.value, _RANDOM.value, _OVERWRITE.value)
        else:
            export(_WORKDIR.value, _OUT.value, _CONFIG.value, _DTYPE.value, _RANDOM.value, _OVERWRITE.value,
                   _ADAPTER.value)
    except (ProvenanceError, CheckpointError, FileNotFoundError, FileExistsError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        what = _WORKDIR.value or _MODEL.value
        print(f"exported {what}{f' + {_ADAPTER.value} (merged)' if _ADAPTER.value else ''} to {_OUT.value}")


if __name__ == "__main__":
    run_absl(main, sys.modules[__name__])
