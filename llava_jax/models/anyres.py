"""LLaVA-NeXT AnyRes on the device, with static shapes.

Inputs (built on the host by `llava_jax.data.anyres.anyres_batch`):
  ``tiles`` [B, M, 1 + K, H, W, 3]: per image slot, the base view then up to K = `max_tiles`
  tiles (uint8, normalised here, or already-normalised floats); padded tiles are zeros;
  ``image_index`` int32 [B, S]: per image token of the row, its row in the row's feature table; -1
  past the row's image tokens.

Every tile goes through the tower and the projector (padded tiles too: the shapes stay static; the
features of padded tiles are never gathered). One image's table is its (1 + K) x T tile features
followed by the `projector/image_newline` vector; the row's table is its M image tables back to
back. The host-side index already encodes the grid, the unpadding, the newlines and the base-first
layout (transformers' `LlavaNextModel.pack_image_features`), so the device does ONE gather, and the
result fills the row's image tokens in order (`LlavaModel`'s static scatter).
"""
from __future__ import annotations

import jax.numpy as jnp

from llava_jax.models.pixels import normalize


def image_token_features(model, tiles, image_index):
    """[B, S, D]: the feature of each of a row's image tokens, in order (zeros where index < 0)."""
    cfg = model.config
    b, m, k = tiles.shape[:3]
    if k != 1 + cfg.max_tiles:
        raise ValueError(f"tiles hold {k} views per image; this config needs 1 + max_tiles = {1 + cfg.max_tiles}")
    pix = tiles.reshape((b * m * k,) + tiles.shape[3:])
    if pix.dtype == jnp.uint8:
        pix = normalize(pix, cfg.image_processor.mean, cfg.image_processor.std)
    feats = model.encode_images(pix)  # [B*M*K, T, D]
    d = feats.shape[-1]
    feats = feats.reshape(b, m, k * feats.shape[1], d)
    newline = model.projector.image_newline.value.astype(feats.dtype)
    table = jnp.concatenate([feats, jnp.broadcast_to(newline, (b, m, 1, d))], axis=2).reshape(b, -1, d)
    index = jnp.asarray(image_index)
    gathered = jnp.take_along_axis(table, jnp.clip(index, 0, table.shape[1] - 1)[..., None], axis=1)
    return jnp.where((index >= 0)[..., None], gathered, 0)
