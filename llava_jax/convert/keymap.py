"""HF <-> llava_jax: ONE declarative key map, used in both directions.

Each row maps a llava_jax param path (regex over `vision/...`, `projector/...`, `llm/...`) to the
canonical HF key (the legacy llava-hf layout) and a named transform. `{i}` is the layer index of
a stacked param; regex groups fill `{1}`, `{2}`, ... Other checkpoint layouts are first rewritten
to canonical keys by a small per-layout `normalize_*` function, so the map itself never branches.
LoRA adapters (`llm/layers/lora/*`) map to PEFT's tensor names on the same canonical keys
(`...q_proj.lora_A.weight`); `normalize_peft` / `peft_key` translate a PEFT adapter file's keys
(`normalize_peft` also reads the original LLaVA's LoRA runs, through `normalize_llama`).
"""
from __future__ import annotations

import re

import numpy as np

V = "vision_tower.vision_model."
VL = V + "encoder.layers.{i}."
L = "language_model.model."
LL = L + "layers.{i}."

# (our param path regex, canonical HF key template, transform)
KEY_MAP: list[tuple[str, str, str]] = [
    (r"vision/patch_embed", V + "embeddings.patch_embedding.weight", "conv"),
    (r"vision/patch_bias", V + "embeddings.patch_embedding.bias", "id"),  # SigLIP
    (r"vision/class_embed", V + "embeddings.class_embedding", "id"),
    (r"vision/pos_embed", V + "embeddings.position_embedding.weight", "id"),
    (r"vision/pre_ln_scale", V + "pre_layrnorm.weight", "id"),
    (r"vision/pre_ln_bias", V + "pre_layrnorm.bias", "id"),
    (r"vision/post_ln_scale", V + "post_layernorm.weight", "id"),
    (r"vision/post_ln_bias", V + "post_layernorm.bias", "id"),
    (r"vision/layers/ln1_scale", VL + "layer_norm1.weight", "id"),
    (r"vision/layers/ln1_bias", VL + "layer_norm1.bias", "id"),
    (r"vision/layers/([qkv])_kernel", VL + "self_attn.{1}_proj.weight", "split_heads_out"),
    (r"vision/layers/([qkv])_bias", VL + "self_attn.{1}_proj.bias", "split_heads"),
    (r"vision/layers/o_kernel", VL + "self_attn.out_proj.weight", "split_heads_in"),
    (r"vision/layers/o_bias", VL + "self_attn.out_proj.bias", "id"),
    (r"vision/layers/ln2_scale", VL + "layer_norm2.weight", "id"),
    (r"vision/layers/ln2_bias", VL + "layer_norm2.bias", "id"),
    (r"vision/layers/(fc[12])_kernel", VL + "mlp.{1}.weight", "T"),
    (r"vision/layers/(fc[12])_bias", VL + "mlp.{1}.bias", "id"),
    # SigLIP's attention-pooling head (only when the checkpoint has one)
    (r"vision/head/probe", V + "head.probe", "id"),
    (r"vision/head/in_proj_kernel", V + "head.attention.in_proj_weight", "split_qkv_heads_out"),
    (r"vision/head/in_proj_bias", V + "head.attention.in_proj_bias", "split_heads"),
    (r"vision/head/o_kernel", V + "head.attention.out_proj.weight", "split_heads_in"),
    (r"vision/head/o_bias", V + "head.attention.out_proj.bias", "id"),
    (r"vision/head/norm_scale", V + "head.layernorm.weight", "id"),
    (r"vision/head/norm_bias", V + "head.layernorm.bias", "id"),
    (r"vision/head/(fc[12])_kernel", V + "head.mlp.{1}.weight", "T"),
    (r"vision/head/(fc[12])_bias", V + "head.mlp.{1}.bias", "id"),
    (r"projector/linear_(\d+)_kernel", "multi_modal_projector.linear_{1}.weight", "T"),
    (r"projector/linear_(\d+)_bias", "multi_modal_projector.linear_{1}.bias", "id"),
    (r"projector/image_newline", "image_newline", "id"),  # LLaVA-NeXT (AnyRes)
    (r"llm/embed", L + "embed_tokens.weight", "id"),
    (r"llm/final_norm", L + "norm.weight", "id"),
    (r"llm/lm_head", "language_model.lm_head.weight", "T"),
    (r"llm/layers/attn_norm", LL + "input_layernorm.weight", "id"),
    (r"llm/layers/mlp_norm", LL + "post_attention_layernorm.weight", "id"),
    (r"llm/layers/([qkv])_kernel", LL + "self_attn.{1}_proj.weight", "split_heads_out"),
    (r"llm/layers/([qkv])_bias", LL + "self_attn.{1}_proj.bias", "split_heads"),
    (r"llm/layers/o_kernel", LL + "self_attn.o_proj.weight", "split_heads_in"),
    (r"llm/layers/o_bias", LL + "self_attn.o_proj.bias", "id"),
    (r"llm/layers/(gate|up|down)_kernel", LL + "mlp.{1}_proj.weight", "T"),
    (r"llm/layers/(gate|up|down)_bias", LL + "mlp.{1}_proj.bias", "id"),
    # LoRA: A [*in, r] is PEFT's lora_A.weight [r, in], B [r, *out] its lora_B.weight [out, r]
    (r"llm/layers/lora/([qkv])_a", LL + "self_attn.{1}_proj.lora_A.weight", "T"),
    (r"llm/layers/lora/([qkv])_b", LL + "self_attn.{1}_proj.lora_B.weight", "split_heads_out"),
    (r"llm/layers/lora/o_a", LL + "self_attn.o_proj.lora_A.weight", "split_heads_in"),
    (r"llm/layers/lora/o_b", LL + "self_attn.o_proj.lora_B.weight", "T"),
    (r"llm/layers/lora/(gate|up|down)_a", LL + "mlp.{1}_proj.lora_A.weight", "T"),
    (r"llm/layers/lora/(gate|up|down)_b", LL + "mlp.{1}_proj.lora_B.weight", "T"),
]
_COMPILED = [(re.compile(p + "$"), t, x) for p, t, x in KEY_MAP]


def hf_key_for(path: str) -> tuple[str, str, bool]:
    """(HF key template, transform, stacked?) for one of our param paths."""
    for rx, template, transform in _COMPILED:
        m = rx.match(path)
        if m:
            key = template
            for gi, g in enumerate(m.groups(), 1):
                key = key.replace("{%d}" % gi, g)
            return key, transform, "{i}" in key
    raise KeyError(f"no HF key mapping for param {path!r}")


# ------------------------------------------------------------------ transforms
def to_ours(arr: np.ndarray, transform: str, target_shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor -> our layout (per-layer shape `target_shape`)."""
    if transform == "id":
        out = arr
    elif transform == "T":
        out = arr.T
    elif transform == "conv":  # torch OIHW -> HWIO
        out = arr.transpose(2, 3, 1, 0)
    elif transform == "split_heads_out":  # Linear [H*hd, in] -> [in, H, hd]
        out = arr.T
    elif transform == "split_heads_in":  # Linear [out, H*hd] -> [H, hd, out]
        out = arr.T
    elif transform == "split_heads":  # bias [H*hd] -> [H, hd]
        out = arr
    elif transform == "split_qkv_heads_out":  # packed Linear [3*H*hd, in] -> [3, in, H, hd]
        out = arr.reshape(3, -1, arr.shape[-1]).transpose(0, 2, 1)
    else:
        raise ValueError(transform)
    return out.reshape(target_shape)


def to_hf(arr: np.ndarray, transform: str) -> np.ndarray:
    """One of our per-layer tensors -> the HF layout (inverse of `to_ours`)."""
    if transform == "id":
        return arr
    if transform == "T":
        return arr.T
    if transform == "conv":
        return arr.transpose(3, 2, 0, 1)
    if transform == "split_heads_out":
        return arr.reshape(arr.shape[0], -1).T
    if transform == "split_heads_in":
        return arr.reshape(-1, arr.shape[-1]).T
    if transform == "split_heads":
        return arr.reshape(-1)
    if transform == "split_qkv_heads_out":
        return arr.reshape(3, arr.shape[1], -1).transpose(0, 2, 1).reshape(-1, arr.shape[1])
    raise ValueError(transform)


def hf_shape(transform: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    return to_hf(np.empty(our_shape, np.uint8), transform).shape


# ------------------------------------------------------------------ layouts -> canonical keys
_IGNORED_SUFFIXES = (".position_ids", ".inv_freq")


def normalize_llava_hf(key: str) -> str | None:
    """llava-hf keys in any layout transformers reads -> canonical (legacy) keys."""
    if key.endswith(_IGNORED_SUFFIXES):
        return None
    for old, new in (("model.language_model.", L), ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline"),
                     ("lm_head.", "language_model.lm_head.")):
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("vision_tower.") and not key.startswith(V):
        key = V + key[len("vision_tower."):]
    return key


# PEFT names a tensor by the module path in the wrapped model (`base_model.model.` + the
# transformers module name, adapter name dropped), so its keys are llava-hf keys behind a prefix,
# or, for an adapter the original LLaVA's LoRA script trained on its `LlavaLlamaForCausalLM`,
# that model's keys (`base_model.model.model.layers.N...`, `...model.mm_projector.0.weight` in its
# `non_lora_trainables.bin`) behind the same prefix.
PEFT_PREFIX = "base_model.model."


def normalize_peft(key: str) -> str | None:
    """A PEFT adapter file's key (on llava-hf, or on the original LLaVA) -> canonical key."""
    if not key.startswith(PEFT_PREFIX):
        return None
    key = key[len(PEFT_PREFIX):]
    canon = normalize_llava_hf(key)
    if canon is not None and canon.startswith("model."):  # no llava-hf layout: the original's model
        return normalize_llama(key)
    return canon


def peft_key(canonical: str) -> str:
    """Canonical key -> the name PEFT gives it on transformers-5 `LlavaForConditionalGeneration`
    (whose language model sits at `model.language_model.`)."""
    if canonical.startswith(L):
        canonical = "model.language_model." + canonical[len(L):]
    return PEFT_PREFIX + canonical


_MM_PROJ = re.compile(r"^(?:model\.)?mm_projector\.(\d+)\.(weight|bias)$")


def _mm_projector(key: str) -> str | None:
    m = _MM_PROJ.match(key)
    if not m:
        return None
    # nn.Sequential(Linear, GELU, Linear, ...): linear layers sit at even indices (or a bare
    # `mm_projector.weight` for the `linear` type, handled below).
    return f"multi_modal_projector.linear_{int(m.group(1)) // 2 + 1}.{m.group(2)}"


def normalize_llama(key: str) -> str | None:
    """Original LLaVA (`LlavaLlamaForCausalLM`) or plain LLaMA/Vicuna keys -> canonical keys."""
    if key.endswith(_IGNORED_SUFFIXES) or key.startswith("model.vision_tower."):
        return None  # the tower comes from the separate CLIP directory
    proj = normalize_projector(key)
    if proj is not None:
        return proj
    if key.startswith("model."):
        return L + key[len("model."):]
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    return key


def normalize_projector(key: str) -> str | None:
    """A stage-1 projector file (`mm_projector.bin` keys, or ours/llava-hf names)."""
    if key.startswith("multi_modal_projector.") or key.startswith("model.multi_modal_projector."):
        return key[len("model."):] if key.startswith("model.") else key
    m = re.match(r"^(?:model\.)?mm_projector\.(weight|bias)$", key)
    if m:
        return f"multi_modal_projector.linear_1.{m.group(1)}"
    return _mm_projector(key)


def normalize_clip(key: str) -> str | None:
    """CLIPVisionModel / CLIPModel / SiglipVisionModel / SiglipModel keys -> canonical; the text
    tower and projections are ignored."""
    if key.endswith(_IGNORED_SUFFIXES):
        return None
    if key.startswith("vision_model."):
        return "vision_tower." + key
    if key.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")):
        return V + key  # transformers-5 {CLIP,Siglip}VisionModel.save_pretrained drops "vision_model."
    return None
