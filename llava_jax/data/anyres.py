"""LLaVA-NeXT AnyRes on the host: grid choice, tiling, token counts and the unpad gather indices.

An image of (height, width) becomes, as transformers' `LlavaNextImageProcessor` makes it:

1. ``to_rgb`` (RGBA/LA/transparent palettes on white, as for LLaVA-1.5);
2. the grid: the pinpoint canvas (H, W) that keeps the most of the image's pixels after an
   aspect-preserving downscale and, on ties, wastes the least canvas (``select_best_resolution``);
   ``rows, cols = H // size, W // size``;
3. the image resized, aspect kept, to fit the canvas (the long side fills it, the other side
   ``ceil``-ed), pasted centred on a black (uint8 0) canvas, cut into ``rows x cols`` tiles of
   ``size`` px, row-major;
4. the base view: the whole image squashed to ``size x size`` (no crop), put FIRST;
5. CLIP's per-tile steps (shortest-edge resize and centre crop: no-ops on ``size`` squares), then
   x1/255 and mean/std (``normalize``, run on the device for uint8 batches).

The model sees each tile's ``p x p`` patch features (p = size // patch_size) laid on the
``rows*p x cols*p`` canvas, cuts away the rows (or columns) that are padding ("unpad", transformers'
``unpad_image``), ends every remaining feature row with ``image_newline`` and puts the base view's
features first. All of that depends only on (height, width) and the config, so it is computed
here, on the host, as ONE index per image token into a per-image feature table
``[base tile, tile 1..max_tiles, newline]`` (``feature_index``); the device does one gather
(models/anyres.py) and jit sees the same shapes whatever the images' sizes.

Image-token counts (``num_image_tokens``) equal `LlavaNextProcessor`'s: base tokens +
unpadded rows x (unpadded cols + 1).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from llava_jax.config import LlavaConfig
from llava_jax.data.images import to_rgb


# ---------------------------------------------------------------------------------------------
# Geometry (pure integers; shared by preprocessing, token counts and the gather indices)
# ---------------------------------------------------------------------------------------------


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (H, W) pinpoint that keeps the most image pixels after an aspect-preserving fit
    (capped at the original pixel count), the least wasted canvas on ties, the first on full ties."""
    best, best_effective, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best


def grid_shape(height: int, width: int, cfg: LlavaConfig) -> tuple[int, int]:
    """(rows, cols) of tiles the image is cut into."""
    h, w = select_best_resolution(height, width, cfg.image_grid_pinpoints)
    s = cfg.vision.image_size
    return h // s, w // s


def fit_size(height: int, width: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
    """(h, w) of the image resized, aspect kept, to fit the canvas: the side with the smaller
    scale fills it, the other is ``ceil``-ed (and capped), as transformers' `get_patch_output_size`."""
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def unpadded_box(height: int, width: int, rows: int, cols: int, p: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the feature canvas (rows*p x cols*p) that is image, not
    padding: transformers' `unpad_image` (a symmetric cut of whole feature rows or columns; the
    scaled size rounded to 7 decimals before truncation, exactly as there)."""
    ch, cw = rows * p, cols * p
    if width / height > cw / ch:
        new_h = int(round(height * (cw / width), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(width * (ch / height), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


def num_image_tokens(height: int, width: int, cfg: LlavaConfig) -> int:
    """Image tokens of one (height, width) image: base view + unpadded rows x (cols + newline)."""
    rows, cols = grid_shape(height, width, cfg)
    top, bottom, left, right = unpadded_box(height, width, rows, cols, cfg.vision.grid_size)
    return cfg.num_image_tokens + (bottom - top) * (right - left + 1)


def max_image_tokens(cfg: LlavaConfig) -> int:
    """The most image tokens any image can take (no unpadding on the largest pinpoint grid):
    2928 for llava-v1.6 (576 + 48 x 49)."""
    p, s = cfg.vision.grid_size, cfg.vision.image_size
    return cfg.num_image_tokens + max((h // s) * p * ((w // s) * p + 1) for h, w in cfg.image_grid_pinpoints)


def table_size(cfg: LlavaConfig) -> int:
    """Rows of one image's feature table: (1 + max_tiles) tiles x T features, then the newline."""
    return (1 + cfg.max_tiles) * cfg.num_image_tokens + 1


def feature_index(height: int, width: int, cfg: LlavaConfig) -> np.ndarray:
    """int32 [num_image_tokens(height, width)]: for each image token in order, its row in the
    image's feature table (``table_size``): the base tile's T features, then the unpadded feature
    canvas row by row, each row followed by the newline (the table's last row)."""
    rows, cols = grid_shape(height, width, cfg)
    p, t = cfg.vision.grid_size, cfg.num_image_tokens
    top, bottom, left, right = unpadded_box(height, width, rows, cols, p)
    y = np.arange(top, bottom)[:, None]
    x = np.arange(left, right)[None, :]
    tile = 1 + (y // p) * cols + (x // p)  # tile 0 is the base view
    canvas = tile * t + (y % p) * p + (x % p)
    newline = np.full((bottom - top, 1), table_size(cfg) - 1)
    return np.concatenate([np.arange(t), np.concatenate([canvas, newline], axis=1).reshape(-1)]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


def preprocess_anyres_uint8(img: Image.Image, cfg: LlavaConfig) -> tuple[np.ndarray, int, tuple[int, int]]:
    """(tiles uint8 [1 + max_tiles, size, size, 3], valid tiles incl. the base, (height, width)).

    Tile 0 is the base view; tiles past the image's grid are zeros (masked). ``normalize`` of the
    valid tiles equals transformers' `LlavaNextImageProcessor` pixel values (transposed to HWC).
    """
    img = to_rgb(img)
    width, height = img.size
    s, resample = cfg.vision.image_size, cfg.image_processor.resample
    canvas_h, canvas_w = select_best_resolution(height, width, cfg.image_grid_pinpoints)
    fit_h, fit_w = fit_size(height, width, canvas_h, canvas_w)
    canvas = np.zeros((canvas_h, canvas_w, 3), np.uint8)
    top, left = (canvas_h - fit_h) // 2, (canvas_w - fit_w) // 2
    canvas[top:top + fit_h, left:left + fit_w] = np.asarray(img.resize((fit_w, fit_h), resample=resample))
    rows, cols = canvas_h // s, canvas_w // s
    out = np.zeros((1 + cfg.max_tiles, s, s, 3), np.uint8)
    out[0] = np.asarray(img.resize((s, s), resample=resample))
    out[1:1 + rows * cols] = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(-1, s, s, 3)
    return out, 1 + rows * cols, (height, width)


def num_views(height: int, width: int, cfg: LlavaConfig) -> int:
    """Views the tower encodes for real for one image: the base view + its grid's tiles."""
    rows, cols = grid_shape(height, width, cfg)
    return 1 + rows * cols


def index_capacity(cfg: LlavaConfig, max_images: int, max_length: int | None = None) -> int:
    """Entries of a row's ``image_index``: room for ``max_images`` of the largest images, and
    never more than the row's tokens (``max_length``), which bound its image tokens anyway."""
    capacity = max_images * max_image_tokens(cfg)
    return capacity if max_length is None else min(capacity, max_length)


def row_image_index(sizes: Sequence[tuple[int, int]], cfg: LlavaConfig, capacity: int) -> np.ndarray:
    """int32 [capacity]: for the k-th image token of a row holding images of ``sizes`` (height,
    width) in token order, its row in the row's feature table (the images' tables of
    ``table_size`` rows back to back: image m's ``feature_index`` offset by ``m * table_size``);
    -1 past the row's image tokens. Raises ValueError when they do not fit ``capacity``."""
    n_table = table_size(cfg)
    parts = [feature_index(h, w, cfg) + m * n_table for m, (h, w) in enumerate(sizes)]
    flat = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    if flat.size > capacity:
        raise ValueError(f"the row's images take {flat.size} image tokens, more than capacity={capacity}")
    index = np.full((capacity,), -1, np.int32)
    index[:flat.size] = flat
    return index


def anyres_batch(rows: Sequence[Sequence[Image.Image]], cfg: LlavaConfig, max_images: int,
                 capacity: int | None = None) -> dict[str, np.ndarray]:
    """The static-shape AnyRes image inputs of a batch; row b holds the images of sample b.

    Returns numpy arrays:
      ``tiles`` uint8 [B, max_images, 1 + max_tiles, size, size, 3] (tile 0 = base view),
      ``tile_mask`` bool [B, max_images, 1 + max_tiles],
      ``image_sizes`` int32 [B, max_images, 2] (height, width; 0 for absent images),
      ``grid`` int32 [B, max_images, 2] (rows, cols of tiles),
      ``image_index`` int32 [B, capacity]: ``row_image_index`` of each row's images.
      ``capacity`` (default ``index_capacity``: ``max_images * max_image_tokens``) only needs to
      hold the row's image tokens: the sequence length is always enough.
    (The training pipeline builds the same arrays per packed row: ``data.packing.build_row``.)
    """
    capacity = capacity if capacity is not None else index_capacity(cfg, max_images)
    b, k, s = len(rows), 1 + cfg.max_tiles, cfg.vision.image_size
    tiles = np.zeros((b, max_images, k, s, s, 3), np.uint8)
    tile_mask = np.zeros((b, max_images, k), bool)
    sizes = np.zeros((b, max_images, 2), np.int32)
    grid = np.zeros((b, max_images, 2), np.int32)
    index = np.full((b, capacity), -1, np.int32)
    for r, images in enumerate(rows):
        if len(images) > max_images:
            raise ValueError(f"row {r} has {len(images)} images; the batch holds at most max_images={max_images}")
        for m, img in enumerate(images):
            tiles[r, m], n, (h, w) = preprocess_anyres_uint8(img, cfg)
            tile_mask[r, m, :n] = True
            sizes[r, m] = h, w
            grid[r, m] = grid_shape(h, w, cfg)
        try:
            index[r] = row_image_index([tuple(hw) for hw in sizes[r, :len(images)]], cfg, capacity)
        except ValueError as e:
            raise ValueError(f"row {r}: {e}") from None
    return dict(tiles=tiles, tile_mask=tile_mask, image_sizes=sizes, grid=grid, image_index=index)
