"""llava-jax: LLaVA in JAX/Flax.

Public API:
    model = llava_jax.from_pretrained(path, dtype=jnp.float32)       # HF dir -> Flax NNX model
    logits = model(input_ids=..., pixel_values=..., attention_mask=...)
    llava_jax.save_pretrained(model, out_dir, tokenizer=None)          # -> llava-hf dir
    pixel_values = llava_jax.preprocess_images(images, mode="pad", size=336)
"""
from llava_jax.config import LlavaConfig, RuntimeOptions, TextConfig, VisionConfig
from llava_jax.convert.hf import CheckpointError, from_pretrained, save_pretrained
from llava_jax.models.llava import LlavaModel, causal_lm_loss, loss_fn_from_logits

__version__ = "0.1.0"


def preprocess_images(images, mode: str = "pad", size: int = 336, **kw):
    """CLIP preprocessing of PIL images (see `llava_jax.data.images.preprocess_images`)."""
    from llava_jax.data.images import preprocess_images as _pre

    return _pre(images, mode=mode, size=size, **kw)


__all__ = [
    "LlavaConfig", "VisionConfig", "TextConfig", "RuntimeOptions", "LlavaModel", "CheckpointError",
    "from_pretrained", "save_pretrained", "preprocess_images", "causal_lm_loss", "loss_fn_from_logits",
]
