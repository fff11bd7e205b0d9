"""Model configuration, readable from and writable to transformers' `LlavaConfig` JSON.

One dataclass per sub-model. `LlavaConfig.from_hf_dict` understands:
  * llava-hf `config.json` (`model_type: llava`, `text_config` / `vision_config`), both the
    transformers-4 rope fields (`rope_theta`, `rope_scaling`) and transformers-5 `rope_parameters`;
  * the original LLaVA `LlavaLlamaForCausalLM` config (LLaMA fields + `mm_*` fields), given the
    vision config from the separate CLIP directory.
Runtime knobs (compute dtype, remat policy, attention kernel) are not part of the HF JSON; they
live in `RuntimeOptions`, set by the caller.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp

# The label of a position that is not supervised (HF's convention), shared by the data pipeline
# and the loss.
IGNORE_INDEX = -100

SUPPORTED_TEXT_MODEL_TYPES = ("llama",)
SUPPORTED_VISION_MODEL_TYPES = ("clip_vision_model", "clip")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768  # unused by LLaVA; kept so export round-trips the HF config

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        if d.get("model_type") == "clip" and "vision_config" in d:  # a full CLIPModel config
            d = d["vision_config"]
        mt = d.get("model_type", "clip_vision_model")
        if mt not in SUPPORTED_VISION_MODEL_TYPES:
            raise ValueError(
                f"unsupported vision model_type {mt!r}; supported: {', '.join(SUPPORTED_VISION_MODEL_TYPES)}"
            )
        return cls(
            hidden_size=d.get("hidden_size", 768),
            intermediate_size=d.get("intermediate_size", 3072),
            num_layers=d.get("num_hidden_layers", 12),
            num_heads=d.get("num_attention_heads", 12),
            image_size=d.get("image_size", 224),
            patch_size=d.get("patch_size", 32),
            num_channels=d.get("num_channels", 3),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            hidden_act=d.get("hidden_act", "quick_gelu"),
            projection_dim=d.get("projection_dim", 512),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "projection_dim": self.projection_dim,
        }


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `type` is default | linear | llama3."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "RopeConfig":
        params = d.get("rope_parameters")
        if params is None:  # transformers-4 style fields
            params = dict(d.get("rope_scaling") or {})
            params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        rtype = params.get("rope_type", params.get("type", "default")) or "default"
        if rtype not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope type {rtype!r}; supported: default, linear, llama3")
        return cls(
            theta=float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
            type=rtype,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.type, "rope_theta": self.theta}
        if self.type in ("linear", "llama3"):
            out["factor"] = self.factor
        if self.type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "TextConfig":
        mt = d.get("model_type", "llama")
        if mt not in SUPPORTED_TEXT_MODEL_TYPES and not mt.startswith("llava_llama"):
            raise ValueError(
                f"unsupported text model_type {mt!r}; supported: {', '.join(SUPPORTED_TEXT_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported LLaMA hidden_act {act!r}; only 'silu' (SwiGLU) is supported")
        hidden, heads = d.get("hidden_size", 4096), d.get("num_attention_heads", 32)
        return cls(
            vocab_size=d.get("vocab_size", 32000),
            hidden_size=hidden,
            intermediate_size=d.get("intermediate_size", 11008),
            num_layers=d.get("num_hidden_layers", 32),
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf_dict(d),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=d.get("eos_token_id", 2),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope.to_hf_dict(),
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(projector_type: str) -> int:
    """Number of linear layers: `linear` -> 1, `mlpNx_gelu` -> N."""
    if projector_type == "linear":
        return 1
    m = _MLP_RE.match(projector_type)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown projector type {projector_type!r}; use 'linear' or 'mlp<N>x_gelu'")
    return int(m.group(1))


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How the model runs; not stored in HF JSON."""

    dtype: Any = jnp.float32  # compute dtype (bf16 for training)
    param_dtype: Any = jnp.float32  # master params
    remat_policy: str = "none"  # see llava_jax.models.layers.REMAT_POLICIES
    # xla | dpa | cudnn | dpa_padded | cudnn_padded | pallas: see llava_jax.models.layers
    attention_impl: str = "xla"


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 32000
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # default (drop CLS) | full
    runtime: RuntimeOptions = RuntimeOptions()
    # LoRA adapters on the LLM (`llava_jax.models.lora.LoraConfig`; None = none). Not part of the
    # HF JSON: an adapter travels as a PEFT adapter directory (`convert/peft.py`).
    lora: Any = None
    # The LLM's linear kernels stored weight-only quantized ("int8" | "int4", `models/quant.py`;
    # None = in param_dtype): QLoRA's frozen base, or a model quantized for serving.
    base_quant: str | None = None

    def __post_init__(self):
        projector_depth(self.projector_type)  # validates
        if self.base_quant not in (None, "int8", "int4"):
            raise ValueError(f"base_quant must be None, 'int8' or 'int4', got {self.base_quant!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Feature layers as non-negative indices into the hidden-state list
        (0 = after pre_layrnorm, i = after encoder layer i), as transformers indexes them."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        n = self.vision.num_layers + 1
        out = []
        for layer in layers:
            idx = layer + n if layer < 0 else layer
            if not 0 <= idx < n:
                raise ValueError(f"vision_feature_layer {layer} out of range for {self.vision.num_layers} layers")
            out.append(idx)
        return tuple(out)

    @property
    def num_image_tokens(self) -> int:
        """Tokens each image contributes to the LLM sequence (576 for ViT-L/14-336)."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def projector_in_features(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    def replace(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, **kw)

    def with_runtime(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **kw))

    # ---------------------------------------------------------------- HF JSON
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], vision_dict: dict[str, Any] | None = None) -> "LlavaConfig":
        """From a llava-hf config, or an original-LLaVA config plus the CLIP config."""
        mt = d.get("model_type")
        if mt == "llava":
            act = d.get("projector_hidden_act", "gelu")
            if act != "gelu":
                raise ValueError(f"unsupported projector_hidden_act {act!r}; llava-jax supports 'gelu' (exact erf)")
            layer = d.get("vision_feature_layer", -2)
            return cls(
                vision=VisionConfig.from_hf_dict(vision_dict or d.get("vision_config") or {}),
                text=TextConfig.from_hf_dict(d.get("text_config") or {"model_type": "llama"}),
                image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
                projector_type="mlp2x_gelu",  # the llava-hf projector is always Linear-GELU-Linear
                projector_bias=bool(d.get("multimodal_projector_bias", True)),
                vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
                vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            )
        if mt in ("llava_llama", "llama") or "mm_projector_type" in d or "mm_vision_tower" in d:
            if vision_dict is None:
                raise ValueError(
                    "an original-LLaVA / LLaMA checkpoint needs the CLIP vision config: pass clip_path=..."
                )
            text = TextConfig.from_hf_dict({**d, "model_type": "llama"})
            select = d.get("mm_vision_select_feature", "patch")
            return cls(
                vision=VisionConfig.from_hf_dict(vision_dict),
                text=text,
                # The original LLaVA marks images with id -200 outside the vocab; the llava-hf
                # convention (used by our tokenizer helpers) is the first id after the vocab.
                image_token_id=text.vocab_size,
                projector_type=d.get("mm_projector_type", "mlp2x_gelu") or "linear",
                projector_bias=True,
                vision_feature_layer=d.get("mm_vision_select_layer", -2),
                vision_feature_select_strategy="full" if select == "cls_patch" else "default",
            )
        raise ValueError(
            f"unknown architecture model_type={mt!r} (architectures={d.get('architectures')}); supported: "
            "llava (llava-hf LlavaForConditionalGeneration), llava_llama (original LLaVA "
            "LlavaLlamaForCausalLM, with clip_path), llama (with clip_path, fresh projector)"
        )

    def to_hf_dict(self) -> dict[str, Any]:
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(
                f"llava-hf format only holds an mlp2x_gelu projector; this model has {self.projector_type!r}"
            )
        layer = self.vision_feature_layer
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "vision_config": self.vision.to_hf_dict(),
            "text_config": self.text.to_hf_dict(),
            "image_token_index": self.image_token_id,
            "image_seq_length": self.num_image_tokens,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": self.projector_bias,
            "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "tie_word_embeddings": self.text.tie_word_embeddings,
        }


# ---------------------------------------------------------------- named presets
# The one geometry table of the released models (HF config values). The dataclass defaults above
# are CLIP ViT-L/14-336 and Vicuna-7B; the presets name them.
CLIP_VIT_L_14_336 = VisionConfig()
VICUNA_7B = TextConfig()
VICUNA_13B = TextConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)


def llava_1_5_7b(**overrides) -> LlavaConfig:
    """llava-1.5-7b: CLIP ViT-L/14-336 (penultimate layer, CLS dropped) + mlp2x_gelu + Vicuna-7B v1.5."""
    return LlavaConfig(vision=CLIP_VIT_L_14_336, text=VICUNA_7B, **overrides)


def llava_1_5_13b(**overrides) -> LlavaConfig:
    """llava-1.5-13b: as 7b with Vicuna-13B v1.5."""
    return LlavaConfig(vision=CLIP_VIT_L_14_336, text=VICUNA_13B, **overrides)


PRESETS = {"llava_1_5_7b": llava_1_5_7b, "llava_1_5_13b": llava_1_5_13b}
