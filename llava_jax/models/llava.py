"""The LLaVA model: vision tower (CLIP or SigLIP) -> projector -> LLaMA, image features written into the token
embeddings at image-token positions with static shapes.

Two image layouts:
  * `pixel_values` [N, C, H, W] (transformers' layout, normalised floats): the N images fill the
    image tokens of the whole batch in row-major order, as `LlavaForConditionalGeneration` does.
  * `images` [B, M, H, W, C] (uint8 or normalised float) + `image_mask` [B, M]: up to M image
    slots per row, the k-th image token of row b takes feature k of that row's valid images.
    This is the training layout: shapes never depend on content, so `jit` never retraces.
  * AnyRes (LLaVA-NeXT, `config.image_grid_pinpoints`): `tiles` [B, M, 1 + K, H, W, C] + the host's
    `image_index` [B, S] (models/anyres.py): a row's image tokens take the gathered features in order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.config import IGNORE_INDEX, LlavaConfig
from llava_jax.models import anyres
from llava_jax.models.clip import VisionTower
from llava_jax.models.llama import LlamaDecoder
from llava_jax.models.pixels import normalize
from llava_jax.models.projector import Projector
from llava_jax.models.siglip import SiglipVisionTower

# The tower class of each `VisionConfig.model_type`.
VISION_TOWERS = {"clip_vision_model": VisionTower, "siglip_vision_model": SiglipVisionTower}


def _check_rows(is_image, n_features, features_text):
    """A row whose count of image tokens differs from its image features' is named, not silently
    mis-filled; `features_text(n)` says what the row's n features are."""
    n_tok, n_features = np.asarray(is_image.sum(-1)), np.asarray(n_features)
    bad = np.nonzero(n_tok != n_features)[0]
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"row {r}: {int(n_tok[r])} image tokens but {features_text(int(n_features[r]))}")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)



def image_kwargs(images, image_mask, image_index) -> dict:
    """The model's image keyword arguments for a serving/eval batch: AnyRes tiles placed by a host
    `image_index` (LLaVA-NeXT), plain images with their mask, or none (text only)."""
    if image_index is not None:
        return {"tiles": images, "image_index": image_index}
    if images is not None:
        return {"images": images, "image_mask": image_mask}
    return {}

class LlavaModel(nnx.Module):
    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs | None = None):
        self.config = config
        rt = config.runtime
        kw = dict(param_dtype=rt.param_dtype, dtype=rt.dtype, rngs=rngs)
        self.vision = VISION_TOWERS[config.vision.model_type](config.vision, remat_policy=rt.remat_policy, attention_impl=rt.attention_impl, **kw)
        self.projector = Projector(config.projector_type, config.projector_in_features, config.text.hidden_size,
                                   config.projector_bias, image_newline=config.is_anyres, **kw)
        self.llm = LlamaDecoder(config.text, remat_policy=rt.remat_policy, attention_impl=rt.attention_impl,
                                lora=config.lora, base_quant=config.base_quant, **kw)

    # ------------------------------------------------------------------ images
    def encode_images(self, pixels_nhwc):
        """[N, H, W, C] normalised -> projected features [N, T, D_text]."""
        feats = self.vision(pixels_nhwc, self.config.feature_layers, self.config.vision_feature_select_strategy)
        return self.projector(feats)

    def embed_inputs(self, input_ids, pixel_values=None, images=None, image_mask=None, tiles=None, image_index=None):
        """Token embeddings with image features written at image-token positions."""
        cfg = self.config
        is_image = input_ids == cfg.image_token_id
        # Image-token ids may lie outside the vocab (original LLaVA); look up a valid id instead.
        embeds = self.llm.embed_tokens(jnp.where(is_image, 0, input_ids))
        if tiles is not None:
            if image_index is None:
                raise ValueError("AnyRes tiles need their image_index (llava_jax.data.anyres.anyres_batch)")
            feats = anyres.image_token_features(self, tiles, image_index)  # [B, S, D]
            if _is_concrete(is_image) and _is_concrete(image_index):
                _check_rows(is_image, (np.asarray(image_index) >= 0).sum(-1),
                            lambda n: f"its AnyRes images give {n} features (data.anyres.num_image_tokens per image)")
            return self._scatter(embeds, is_image, feats)
        if cfg.is_anyres and (pixel_values is not None or images is not None):
            # One tower-sized view per image would run a LLaVA-NeXT model on inputs it never saw,
            # with token counts its processor never produces: refused rather than silently wrong.
            raise NotImplementedError("this LLaVA-NeXT (AnyRes) model takes tiles= and image_index= "
                                      "(llava_jax.data.anyres.anyres_batch, as the training pipeline and the server "
                                      "build them), not pixel_values/images (docs/anyres.md)")
        if pixel_values is None and images is None:
            if _is_concrete(is_image) and bool(jnp.any(is_image)):
                raise ValueError(
                    f"input_ids hold {int(is_image.sum())} image tokens (id {cfg.image_token_id}) but no images were given"
                )
            return embeds
        t = cfg.num_image_tokens
        if pixel_values is not None:
            # transformers layout: flat images fill image tokens in row-major order over the batch.
            pv = jnp.asarray(pixel_values)
            pv = jnp.transpose(pv, (0, 2, 3, 1)) if pv.shape[1] == cfg.vision.num_channels else pv
            feats = self.encode_images(pv).reshape(-1, embeds.shape[-1])  # [N*T, D]
            self._check_count(is_image.sum(), feats.shape[0], "the batch")
            index = jnp.cumsum(is_image.reshape(-1)) - 1
            gathered = jnp.take(feats, jnp.clip(index, 0, feats.shape[0] - 1), axis=0).reshape(embeds.shape)
        else:
            b, m = images.shape[:2]
            pix = images.reshape((b * m,) + images.shape[2:])
            if pix.dtype == jnp.uint8:  # uint8 travels to the device; normalised as the processor would
                pix = normalize(pix, cfg.image_processor.mean, cfg.image_processor.std)
            feats = self.encode_images(pix).reshape(b, m * t, -1)  # [B, M*T, D]
            if image_mask is None:
                image_mask = jnp.ones((b, m), bool)
            if _is_concrete(is_image) and _is_concrete(image_mask):
                _check_rows(is_image, np.asarray(image_mask.sum(-1)) * t,
                            lambda n: f"{n} image features ({n // t} images x {t} tokens)")
            return self._scatter(embeds, is_image, feats)
        return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)

    @staticmethod
    def _scatter(embeds, is_image, feats):
        """The static scatter: the k-th image token of row b takes feats[b, k] ([B, N, D])."""
        index = jnp.cumsum(is_image, axis=-1) - 1
        gathered = jnp.take_along_axis(feats, jnp.clip(index, 0, feats.shape[1] - 1)[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)

    @staticmethod
    def _check_count(n_tokens, n_features, where):
        if _is_concrete(n_tokens) and int(n_tokens) != int(n_features):
            raise ValueError(f"image tokens and image features do not match in {where}: "
                             f"{int(n_tokens)} tokens vs {int(n_features)} features")

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, pixel_values=None, attention_mask=None, *, images=None, image_mask=None,
                 tiles=None, image_index=None, positions=None, segment_ids=None, return_hidden: bool = False,
                 dropout_rng=None):
        """Logits [B, L, V]. `attention_mask` (1 = token, 0 = padding) is transformers-style;
        packed rows pass `segment_ids` (0 = padding) and per-segment `positions` instead.
        `dropout_rng`: the key for LoRA dropout while training (None: no dropout)."""
        input_ids = jnp.asarray(input_ids)
        b, l = input_ids.shape
        if segment_ids is None:
            segment_ids = (jnp.ones((b, l), jnp.int32) if attention_mask is None
                           else jnp.asarray(attention_mask).astype(jnp.int32))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        embeds = self.embed_inputs(input_ids, pixel_values, images, image_mask, tiles, image_index)
        out, _ = self.llm(embeds, positions, segment_ids, return_hidden=return_hidden, dropout_rng=dropout_rng)
        return out


def loss_fn_from_logits(logits, labels, weights=None):
    """Mean cross-entropy over supervised tokens (labels != -100), in fp32.

    Returns (sum_loss, num_tokens) so callers can normalise over a whole global batch
    (gradient accumulation divides once by the total count, not per micro-batch).
    """
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE_INDEX
    if weights is not None:
        valid = valid & (weights > 0)
    safe = jnp.where(valid, labels, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, logz - tgt, 0.0)
    return nll.sum(), valid.sum()


def causal_lm_loss(logits, labels):
    """Mean loss over supervised tokens with HF's shift (logit t predicts label t+1)."""
    s, n = loss_fn_from_logits(logits[:, :-1], labels[:, 1:])
    return s / jnp.maximum(n, 1)


def chunked_loss_fn(hidden, targets, logits_fn, chunk: int, weights=None):
    """`loss_fn_from_logits(logits_fn(hidden), targets, weights)` without the full [B, L, V] logits.

    The sequence is cut into chunks of `chunk` positions; a `lax.scan` computes each chunk's logits,
    log-sum-exp and target logit, and keeps only the two sums. The chunk body is rematerialised
    (`jax.checkpoint`), so the backward pass recomputes one chunk's logits at a time as well: peak
    logits memory is [B, chunk, V] instead of [B, L, V] (bf16) plus its fp32 copy and softmax.
    Same ops per chunk as the unchunked path (logits in the compute dtype, loss in fp32), so the
    loss and gradients are equal up to float summation order. The batch dim stays leading inside
    each chunk, so data-parallel sharding is untouched. L is padded with ignored targets to a
    multiple of `chunk`.
    """
    b, l, d = hidden.shape
    n = -(-l // chunk)
    pad = n * chunk - l
    if weights is None:
        weights = jnp.ones_like(targets)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    split = lambda x: jnp.swapaxes(x.reshape((b, n, chunk) + x.shape[2:]), 0, 1)  # noqa: E731

    @jax.checkpoint
    def one(h, t, w):
        return loss_fn_from_logits(logits_fn(h), t, w)

    def body(carry, xs):
        s, c = one(*xs)
        return (carry[0] + s, carry[1] + c), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (s, c), _ = jax.lax.scan(body, init, (split(hidden), split(targets), split(weights)))
    return s, c
