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

# The vision towers' pixel statistics: OpenAI CLIP's (transformers.image_utils.OPENAI_CLIP_MEAN /
# OPENAI_CLIP_STD) and SigLIP's (IMAGENET_STANDARD_MEAN / _STD: pixels scaled to [-1, 1]).
# `ImageProcessorConfig`'s defaults; `models.pixels.normalize` applies them.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

# The label of a position that is not supervised (HF's convention), shared by the data pipeline
# and the loss.
IGNORE_INDEX = -100

# transformers text model types the one scanned decoder (models/llama.py) runs, through config
# flags: llama (+ Llama-3 rope), mistral (+ sliding-window attention), qwen2 (q/k/v biases).
SUPPORTED_TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_VISION_MODEL_TYPES = ("clip_vision_model", "clip", "siglip_vision_model", "siglip")

# transformers' defaults of each vision tower family, for fields an HF config.json leaves out
# (`CLIPVisionConfig`, `SiglipVisionConfig`).
_VISION_HF_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5,
                              hidden_act="quick_gelu", projection_dim=512),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                                hidden_act="gelu_pytorch_tanh", vision_use_head=True),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT vision tower. `model_type` picks the family (transformers' names):
    `clip_vision_model`: class token, `pre_layrnorm`, patch conv without bias;
    `siglip_vision_model`: no class token, no pre-norm, patch conv with bias, and (`use_head`)
    the attention-pooling head, held only when the checkpoint has it (LLaVA never runs it)."""

    model_type: str = "clip_vision_model"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768  # unused by LLaVA; kept so export round-trips the HF (CLIP) config
    use_head: bool = False  # SigLIP's `vision_use_head`: the pooling head's params are present

    def __post_init__(self):
        if self.model_type not in _VISION_HF_DEFAULTS:
            raise ValueError(f"unknown vision model_type {self.model_type!r}; known: {', '.join(_VISION_HF_DEFAULTS)}")
        if self.use_head and not self.is_siglip:
            raise ValueError("use_head (the attention-pooling head) exists only for siglip_vision_model")

    @property
    def is_siglip(self) -> bool:
        return self.model_type == "siglip_vision_model"

    @property
    def num_class_tokens(self) -> int:
        """Tokens in front of the patches: CLIP's class token; SigLIP has none."""
        return 0 if self.is_siglip else 1

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
        if d.get("model_type") in ("clip", "siglip") and "vision_config" in d:  # a full CLIPModel / SiglipModel config
            d = {"model_type": d["model_type"] + "_vision_model", **d["vision_config"]}
        mt = d.get("model_type", "clip_vision_model")
        if mt not in SUPPORTED_VISION_MODEL_TYPES:
            raise ValueError(
                f"unsupported vision model_type {mt!r}; supported: {', '.join(SUPPORTED_VISION_MODEL_TYPES)}"
            )
        mt = mt if mt.endswith("_vision_model") else mt + "_vision_model"
        g = {**_VISION_HF_DEFAULTS[mt], **d}
        return cls(
            model_type=mt,
            hidden_size=g["hidden_size"],
            intermediate_size=g["intermediate_size"],
            num_layers=g["num_hidden_layers"],
            num_heads=g["num_attention_heads"],
            image_size=g["image_size"],
            patch_size=g["patch_size"],
            num_channels=g["num_channels"],
            layer_norm_eps=g["layer_norm_eps"],
            hidden_act=g["hidden_act"],
            projection_dim=g.get("projection_dim", cls.projection_dim),
            use_head=bool(g.get("vision_use_head", False)) and mt == "siglip_vision_model",
        )

    def to_hf_dict(self) -> dict[str, Any]:
        out = {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
        }
        if self.is_siglip:
            out["vision_use_head"] = self.use_head
        else:
            out["projection_dim"] = self.projection_dim
        return out


# transformers' image processors that llava-jax reproduces (data/images.py), by family.
# LLaVA-NeXT's processor runs CLIP's steps on each AnyRes tile (data/anyres.py does the tiling); the
# tiling itself is the model's `LlavaConfig.image_grid_pinpoints`, so it counts as the CLIP family here.
IMAGE_PROCESSOR_TYPES = {"clip": ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
                                  "LlavaNextImageProcessor", "LlavaNextImageProcessorFast", "LlavaNextImageProcessorPil"),
                         "siglip": ("SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil")}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """How an image becomes the tower's pixels: transformers' image processor of the checkpoint
    (its `preprocessor_config.json`). The output size is always the tower's `image_size`.

    `type` "clip": resize the shortest edge, center-crop the square (`CLIPImageProcessor`);
    "siglip": resize straight to the square, no crop (`SiglipImageProcessor`). Then ×1/255 and
    normalise with `mean`/`std`, which the model also applies on device to uint8 images.
    `resample`: PIL's filter number (2 bilinear, 3 bicubic).
    """

    type: str = "clip"
    resample: int = 3
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        if self.type not in IMAGE_PROCESSOR_TYPES:
            raise ValueError(f"unknown image processor type {self.type!r}; known: {', '.join(IMAGE_PROCESSOR_TYPES)}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    @classmethod
    def of_type(cls, kind: str) -> "ImageProcessorConfig":
        """transformers' defaults of that processor (both bicubic; SigLIP's mean/std are 0.5)."""
        return cls(type="siglip", mean=SIGLIP_MEAN, std=SIGLIP_STD) if kind == "siglip" else cls(type=kind)

    @classmethod
    def for_tower(cls, vision: VisionConfig) -> "ImageProcessorConfig":
        """The processor a tower family ships with (no preprocessor_config.json at hand)."""
        return cls.of_type("siglip" if vision.is_siglip else "clip")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], vision: VisionConfig) -> "ImageProcessorConfig":
        """From a `preprocessor_config.json` (its `image_processor_type` picks the family); its
        size must be the tower's. Settings it leaves out take the family's defaults."""
        name = d.get("image_processor_type", "")
        kind = next((k for k, names in IMAGE_PROCESSOR_TYPES.items() if name in names), None)
        if kind is None:
            known = ", ".join(n for names in IMAGE_PROCESSOR_TYPES.values() for n in names[:1])
            raise ValueError(f"unsupported image_processor_type {name!r} in preprocessor_config.json; supported: {known}")
        base = cls.of_type(kind)
        size = d.get("size") or {}
        crop = d.get("crop_size") or {}
        sides = {size.get("shortest_edge"), size.get("height"), size.get("width"),
                 crop.get("height") if kind == "clip" else None, crop.get("width") if kind == "clip" else None}
        sides.discard(None)
        if sides and sides != {vision.image_size}:
            raise ValueError(f"preprocessor_config.json sizes {size} {crop if kind == 'clip' else ''} do not give the "
                             f"vision tower's image_size {vision.image_size}; llava-jax feeds the tower "
                             f"{vision.image_size}x{vision.image_size} images")
        return cls(type=kind, resample=int(d.get("resample", base.resample)),
                   mean=tuple(d.get("image_mean", base.mean)), std=tuple(d.get("image_std", base.std)))

    def to_hf_dict(self, image_size: int) -> dict[str, Any]:
        common = {"do_resize": True, "resample": self.resample, "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "image_mean": list(self.mean), "image_std": list(self.std),
                  "do_convert_rgb": True, "processor_class": "LlavaProcessor"}
        if self.type == "siglip":
            return {"image_processor_type": "SiglipImageProcessor", **common,
                    "size": {"height": image_size, "width": image_size}}
        return {"image_processor_type": "CLIPImageProcessor", **common, "size": {"shortest_edge": image_size},
                "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}}


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
    attention_bias: bool = False  # biases on the q, k and v projections
    o_proj_bias: bool = False  # a bias on the output projection (LLaMA's attention_bias has both; Qwen2 none)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # The transformers architecture written on export (llama | mistral | qwen2); the decoder itself
    # only reads the flags above and `sliding_window`.
    model_type: str = "llama"
    # Sliding-window attention (Mistral-7B-v0.1; Qwen2 with use_sliding_window on every layer): a
    # query attends to itself and the `sliding_window - 1` tokens before it (transformers' rule
    # `q - k < window`), within its segment. None = full causal attention.
    sliding_window: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise ValueError(f"unsupported text model_type {self.model_type!r}; supported: "
                             f"{', '.join(SUPPORTED_TEXT_MODEL_TYPES)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "TextConfig":
        mt = d.get("model_type", "llama")
        if mt.startswith("llava_llama"):
            mt = "llama"
        if mt not in SUPPORTED_TEXT_MODEL_TYPES:
            raise ValueError(
                f"unsupported text model_type {mt!r}; supported: {', '.join(SUPPORTED_TEXT_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported {mt} hidden_act {act!r}; only 'silu' (SwiGLU) is supported")
        hidden, heads = d.get("hidden_size", 4096), d.get("num_attention_heads", 32)
        if mt == "qwen2":  # q/k/v always biased, o never (transformers' Qwen2Attention)
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif mt == "mistral":  # no biases anywhere (MistralAttention / MistralMLP)
            qkv_bias = o_bias = mlp_bias = False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
            mlp_bias = bool(d.get("mlp_bias", False))
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
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=d.get("eos_token_id", 2),
            pad_token_id=d.get("pad_token_id"),
            model_type=mt,
            sliding_window=_sliding_window(mt, d),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers config of `model_type`; refuses flags that architecture cannot hold
        (transformers would build a different model from the file)."""
        mt = self.model_type
        fixed = {"qwen2": (True, False, False), "mistral": (False, False, False)}.get(mt)
        if fixed is not None and (self.attention_bias, self.o_proj_bias, self.mlp_bias) != fixed:
            raise ValueError(f"a {mt} config has q/k/v, o and MLP biases {fixed}; this model has "
                             f"{(self.attention_bias, self.o_proj_bias, self.mlp_bias)}")
        if mt == "llama" and self.attention_bias != self.o_proj_bias:
            raise ValueError("LLaMA's attention_bias covers q, k, v and o alike; this model has q/k/v biases "
                             f"{self.attention_bias} and an o bias {self.o_proj_bias} (model_type='qwen2' is q/k/v only)")
        if mt == "llama" and self.sliding_window is not None:
            raise ValueError("transformers' LLaMA has no sliding window; use model_type='mistral'")
        out = {
            "model_type": mt,
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
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if mt == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif mt == "mistral":
            out["sliding_window"] = self.sliding_window
        else:  # qwen2: one window on every layer (max_window_layers=0), or none
            out.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                       max_window_layers=0 if self.sliding_window is not None else self.num_layers)
        return out


def _sliding_window(model_type: str, d: dict[str, Any]) -> int | None:
    """The one window of a transformers text config (None = full attention). Mistral applies
    `sliding_window` to every layer; Qwen2 only with `use_sliding_window`, and then to the layers
    its `layer_types` mark (from `max_window_layers` on): a mix of windowed and full layers is
    refused, the scanned decoder runs one attention rule for all layers."""
    if model_type == "mistral":
        return d.get("sliding_window")
    if model_type != "qwen2" or not d.get("use_sliding_window") or d.get("sliding_window") is None:
        return None
    n = d.get("num_hidden_layers", 32)
    types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
                                     for i in range(n)]
    if all(t == "full_attention" for t in types):
        return None
    if any(t != "sliding_attention" for t in types):
        raise ValueError(f"Qwen2 with sliding-window attention on some layers only (layer_types={types}) is not "
                         "supported: llava-jax runs one attention rule for every layer (all windowed or none)")
    return int(d["sliding_window"])


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
    vision_feature_select_strategy: str = "default"  # default (drop the first token) | full
    # The checkpoint's image processor (preprocessor_config.json, not config.json); None: the one
    # the vision tower ships with (`ImageProcessorConfig.for_tower`).
    image_processor: ImageProcessorConfig | None = None
    runtime: RuntimeOptions = RuntimeOptions()
    # LoRA adapters on the LLM (`llava_jax.models.lora.LoraConfig`; None = none). Not part of the
    # HF JSON: an adapter travels as a PEFT adapter directory (`convert/peft.py`).
    lora: Any = None
    # The LLM's linear kernels stored weight-only quantized ("int8" | "int4", `models/quant.py`;
    # None = in param_dtype): QLoRA's frozen base, or a model quantized for serving.
    base_quant: str | None = None
    # LLaVA-NeXT AnyRes (`LlavaNextConfig.image_grid_pinpoints`): the (height, width) canvases an
    # image may be tiled onto, each a multiple of the tower's image_size; None = plain LLaVA (one
    # image_size view per image). Set, the model is `llava_next`: a base view + up to
    # `max_tiles` tiles per image, and the `projector/image_newline` param (models/anyres.py).
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None

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
        if self.image_processor is None:
            object.__setattr__(self, "image_processor", ImageProcessorConfig.for_tower(self.vision))
        if self.image_grid_pinpoints is not None:
            pins = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)
            object.__setattr__(self, "image_grid_pinpoints", pins)
            s = self.vision.image_size
            bad = [p for p in pins if p[0] % s or p[1] % s or min(p) <= 0]
            if not pins or bad:
                raise ValueError(f"image_grid_pinpoints must be non-empty (height, width) multiples of the tower's "
                                 f"image_size {s}; got {list(pins)}")
            if self.num_image_tokens != self.vision.num_patches:
                raise ValueError("AnyRes tiles need one feature per patch (CLIP with 'default', SigLIP with 'full'); "
                                 f"this config gives {self.num_image_tokens} features for {self.vision.num_patches} "
                                 "patches (transformers' LlavaNext cannot lay those out on the patch grid either)")

    @property
    def is_anyres(self) -> bool:
        """LLaVA-NeXT (`llava_next`): images are tiled by `image_grid_pinpoints`."""
        return self.image_grid_pinpoints is not None

    @property
    def max_tiles(self) -> int:
        """The most tiles any pinpoint cuts an image into (the base view not counted): the static
        tile dimension of AnyRes batches is `max_tiles + 1`."""
        s = self.vision.image_size
        return max((h // s) * (w // s) for h, w in self.image_grid_pinpoints)

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
        """Tokens each image contributes to the LLM sequence (576 for ViT-L/14-336, 729 for SigLIP
        so400m-14-384 with "full"). "default" drops the first token whatever the tower, as
        transformers does (for SigLIP that is a patch)."""
        n = self.vision.num_patches + self.vision.num_class_tokens
        return n - (1 if self.vision_feature_select_strategy == "default" else 0)

    @property
    def projector_in_features(self) -> int:
        return self.vision.hidden_size * len(self.feature_layers)

    def replace(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, **kw)

    def with_runtime(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **kw))

    # ---------------------------------------------------------------- HF JSON
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], vision_dict: dict[str, Any] | None = None,
                     processor_dict: dict[str, Any] | None = None) -> "LlavaConfig":
        """From a llava-hf config, or an original-LLaVA config plus the vision tower's config;
        `processor_dict`: the checkpoint's preprocessor_config.json (None: the tower's own)."""
        cfg = cls._from_hf_dict(d, vision_dict)
        if processor_dict:
            cfg = cfg.replace(image_processor=ImageProcessorConfig.from_hf_dict(processor_dict, cfg.vision))
        return cfg

    @classmethod
    def _from_hf_dict(cls, d: dict[str, Any], vision_dict: dict[str, Any] | None) -> "LlavaConfig":
        mt = d.get("model_type")
        if mt == "llava_next":  # LLaVA-NeXT: the llava fields plus the AnyRes grid
            pins = d.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
            base = cls._from_hf_dict({**d, "model_type": "llava"}, vision_dict)
            return base.replace(image_grid_pinpoints=tuple(tuple(p) for p in pins))
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
        if mt in ("llava_llama",) + SUPPORTED_TEXT_MODEL_TYPES or "mm_projector_type" in d or "mm_vision_tower" in d:
            if vision_dict is None:
                raise ValueError(
                    f"an original-LLaVA / {mt or 'LLaMA'} checkpoint needs the CLIP vision config: pass clip_path=..."
                )
            text = TextConfig.from_hf_dict({**d, "model_type": mt if mt in SUPPORTED_TEXT_MODEL_TYPES else "llama"})
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
            "llava (llava-hf LlavaForConditionalGeneration), llava_next (LlavaNextForConditionalGeneration), llava_llama (original LLaVA "
            "LlavaLlamaForCausalLM, with clip_path), llama / mistral / qwen2 (with clip_path, fresh projector)"
        )

    def to_hf_dict(self) -> dict[str, Any]:
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(
                f"llava-hf format only holds an mlp2x_gelu projector; this model has {self.projector_type!r}"
            )
        layer = self.vision_feature_layer
        out = {
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
        if self.is_anyres:
            out.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                       image_grid_pinpoints=[list(p) for p in self.image_grid_pinpoints])
        return out
