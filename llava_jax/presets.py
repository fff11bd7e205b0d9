"""Named model geometries: the released towers and LLMs (their HF config values) and the LLaVA
presets built from them (`PRESETS`: `model.preset` in a training config, `build.model_config`,
tools/aot.py's will-it-fit compile)."""
from __future__ import annotations

import dataclasses

from llava_jax.config import LlavaConfig, RopeConfig, TextConfig, VisionConfig

# The one geometry table of the released models (HF config values). The dataclass defaults above
# are CLIP ViT-L/14-336 and Vicuna-7B; the presets name them.
CLIP_VIT_L_14_336 = VisionConfig()
# google/siglip-so400m-patch14-384 (its SiglipVisionConfig): 27 layers, 27x27 = 729 patches; the
# released tower has the pooling head. llava-hf's SigLIP conversions keep 26 layers and no head.
SIGLIP_SO400M_14_384 = VisionConfig(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                    num_layers=27, num_heads=16, image_size=384, patch_size=14,
                                    layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", use_head=True)
VICUNA_7B = TextConfig()
VICUNA_13B = TextConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)


def llava_1_5_7b(**overrides) -> LlavaConfig:
    """llava-1.5-7b: CLIP ViT-L/14-336 (penultimate layer, CLS dropped) + mlp2x_gelu + Vicuna-7B v1.5."""
    return LlavaConfig(vision=CLIP_VIT_L_14_336, text=VICUNA_7B, **overrides)


def llava_1_5_13b(**overrides) -> LlavaConfig:
    """llava-1.5-13b: as 7b with Vicuna-13B v1.5."""
    return LlavaConfig(vision=CLIP_VIT_L_14_336, text=VICUNA_13B, **overrides)


# Other LLM backbones (their HF config.json values; the LLM's own vocabulary: `<image>` is added
# after it by the tokenizer, and the decoder never looks its embedding up).
LLAMA3_8B = TextConfig(  # Meta-Llama-3-8B(-Instruct): plain RoPE at theta 5e5, 8k context
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    rope=RopeConfig(theta=500000.0), max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128009)
LLAMA3_1_8B = dataclasses.replace(  # Llama-3.1-8B(-Instruct): the same weights' shapes, llama3 RoPE scaling
    LLAMA3_8B, rope=RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192),
    max_position_embeddings=131072, eos_token_id=[128001, 128008, 128009])
QWEN2_7B = TextConfig(  # Qwen2-7B(-Instruct): q/k/v biases, untied head, no sliding window in use
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
    num_kv_heads=4, rms_norm_eps=1e-6, rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768,
    attention_bias=True, bos_token_id=151643, eos_token_id=151645)
MISTRAL_7B_V0_2 = TextConfig(  # Mistral-7B-Instruct-v0.2: no window, theta 1e6
    model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768)
MISTRAL_7B_V0_1 = dataclasses.replace(  # Mistral-7B-v0.1: 4096-token sliding window, theta 1e4
    MISTRAL_7B_V0_2, rope=RopeConfig(theta=10000.0), sliding_window=4096)


def _clip_336_with(text: TextConfig, doc: str):
    def preset(**overrides) -> LlavaConfig:
        return LlavaConfig(vision=CLIP_VIT_L_14_336, text=text, image_token_id=text.vocab_size, **overrides)

    preset.__doc__ = f"CLIP ViT-L/14-336 (penultimate layer, CLS dropped) + mlp2x_gelu + {doc}."
    return preset


def llava_siglip_7b(**overrides) -> LlavaConfig:
    """SigLIP so400m-14-384 + mlp2x_gelu + Vicuna-7B: the LLaVA-NeXT/OneVision choice of features,
    the output of the tower's 26th of 27 layers (layer -2; LLaVA-NeXT deletes the last layer),
    every token ("full": SigLIP has no class token), 729 tokens per image."""
    kw = dict(vision_feature_layer=-2, vision_feature_select_strategy="full", **overrides)
    return LlavaConfig(vision=SIGLIP_SO400M_14_384, text=VICUNA_7B, **kw)


def llava_siglip_qwen2_7b(**overrides) -> LlavaConfig:
    """SigLIP so400m-14-384 (features as `llava_siglip_7b`) + mlp2x_gelu + Qwen2-7B-Instruct: the
    pairing LLaVA-OneVision uses (at base resolution; OneVision adds AnyRes), `<image>` after the
    LLM's own vocabulary."""
    kw = dict(vision_feature_layer=-2, vision_feature_select_strategy="full", image_token_id=QWEN2_7B.vocab_size)
    return LlavaConfig(vision=SIGLIP_SO400M_14_384, text=QWEN2_7B, **{**kw, **overrides})


# LLaVA-NeXT (llava-v1.6): CLIP ViT-L/14-336 AnyRes over these canvases (grids 1x2, 2x1, 2x2, 3x1,
# 1x3: max_tiles 4, at most 2928 image tokens), the llava-hf checkpoints' vocab of 32064 with
# <image> = 32000 (the released llava-v1.6-*-hf config.json values).
LLAVA_V1_6_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _llava_v1_6_with(text: TextConfig, doc: str):
    def preset(**overrides) -> LlavaConfig:
        kw = dict(vision=CLIP_VIT_L_14_336, text=text, image_grid_pinpoints=LLAVA_V1_6_PINPOINTS)
        return LlavaConfig(**{**kw, **overrides})

    preset.__doc__ = f"llava-v1.6 (LLaVA-NeXT AnyRes): CLIP ViT-L/14-336 + mlp2x_gelu + {doc}."
    return preset


PRESETS = {
    "llava_1_5_7b": llava_1_5_7b,
    "llava_1_5_13b": llava_1_5_13b,
    "llava_llama3_8b": _clip_336_with(LLAMA3_8B, "Meta-Llama-3-8B-Instruct"),
    "llava_llama3_1_8b": _clip_336_with(LLAMA3_1_8B, "Llama-3.1-8B-Instruct (llama3 RoPE scaling)"),
    "llava_qwen2_7b": _clip_336_with(QWEN2_7B, "Qwen2-7B-Instruct"),
    "llava_mistral_7b": _clip_336_with(MISTRAL_7B_V0_2, "Mistral-7B-Instruct-v0.2"),
    "llava_mistral_7b_v0_1": _clip_336_with(MISTRAL_7B_V0_1, "Mistral-7B-v0.1 (sliding window 4096)"),
    "llava_siglip_7b": llava_siglip_7b,
    "llava_siglip_qwen2_7b": llava_siglip_qwen2_7b,
    "llava_v1_6_vicuna_7b": _llava_v1_6_with(VICUNA_7B, "Vicuna-7B v1.5"),
    "llava_v1_6_vicuna_13b": _llava_v1_6_with(VICUNA_13B, "Vicuna-13B v1.5"),
    "llava_v1_6_mistral_7b": _llava_v1_6_with(dataclasses.replace(MISTRAL_7B_V0_2, vocab_size=32064),
                                              "Mistral-7B-Instruct-v0.2"),
}
