"""Image preprocessing for LLaVA: CLIP and SigLIP preprocessing plus LLaVA-1.5's "pad" mode, in
numpy/PIL.

Which processor runs is a checkpoint's `LlavaConfig.image_processor` (`ImageProcessorConfig`,
chosen once, from its preprocessor_config.json, by `convert.hf.resolve_config`); every function
here takes it as ``processor`` (None: CLIP's). SigLIP (``SiglipImageProcessorPil``) differs from
CLIP only in step 2-3: it resizes straight to ``size``×``size`` (no aspect ratio kept, no crop)
with the config's filter, and its mean/std are 0.5.

The reference is transformers' ``CLIPImageProcessorPil`` (transformers 5,
``transformers/models/clip/image_processing_pil_clip.py`` on top of ``PilBackend``); the steps
below reproduce it exactly (the tests check ``pixel_values`` to ≤ 1e-5, in practice bit-equal):

1. ``to_rgb``: any band named ``A`` or a ``transparency`` entry in ``img.info`` → convert to RGBA
   and alpha-composite onto opaque white; everything else → ``img.convert("RGB")``.
2. resize the shortest edge to ``size`` with PIL bicubic on uint8 (long edge
   ``int(size * long / short)``, truncated, as transformers computes it),
3. center crop ``size``×``size`` (offsets ``(dim - size) // 2``),
4. rescale ×1/255 and normalize with the OpenAI CLIP mean/std, in float32.

LLaVA-1.5's ``image_aspect_ratio="pad"`` runs ``expand2square`` (paste onto a square canvas of
the mean colour ``int(m * 255)``) before step 2; ``"crop"`` is the plain CLIP processing.

Steps 1–3 are integer-only (``preprocess_image_uint8``). The data pipeline ships those uint8
images to the accelerator (4× less host→device traffic than float32) and runs ``normalize``
there; ``preprocess_images`` is the host-side float API equivalent to the transformers processor.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, BinaryIO, Sequence, Union

import numpy as np
from PIL import Image

# The vision tower's pixel convention: its mean/std are config (ImageProcessorConfig), `normalize`
# lives with the model; the pipeline ships uint8 and the model normalizes on device.
from llava_jax.config import CLIP_MEAN, CLIP_STD, ImageProcessorConfig
from llava_jax.models.pixels import normalize

CLIP_PROCESSOR = ImageProcessorConfig()

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MODES",
    "mean_color",
    "to_rgb",
    "expand2square",
    "resize_shortest_edge_size",
    "preprocess_image_uint8",
    "normalize",
    "preprocess_images",
    "load_image",
    "decode_and_preprocess_uint8",
]


# "pad": LLaVA-1.5's square canvas of the mean colour, then the processor; "crop": the processor
# alone (named after CLIP's center crop; for SigLIP it is the plain resize to the square).
MODES = ("pad", "crop")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


def mean_color(mean: Sequence[float] = CLIP_MEAN) -> tuple[int, ...]:
    """LLaVA-1.5's pad colour: ``tuple(int(x * 255) for x in mean)``; (122, 116, 104) for CLIP.

    ``int`` truncates (not rounds), exactly as the original LLaVA ``train.py`` does.
    """
    return tuple(int(x * 255) for x in mean)


def _check_mode_size(mode: str, size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"image mode must be one of {MODES}, got {mode!r}")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"image size must be a positive int, got {size!r}")


# ---------------------------------------------------------------------------------------------
# Mode conversion and geometry
# ---------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to RGB the way transformers' ``convert_to_rgb`` does.

    Transparency is detected as transformers does it: a band named ``"A"`` (RGBA, LA, PA) or a
    ``transparency`` key in ``img.info`` (palette/L/RGB images with a transparent colour). Such
    images are converted to RGBA and alpha-composited onto opaque white. All other modes go
    through PIL's ``convert("RGB")``: L/P/CMYK/YCbCr/1 as usual; note that 16/32-bit integer and
    float modes (``I;16``, ``I``, ``F``) are *clipped* to 0..255 by PIL, not rescaled.

    Premultiplied ``RGBa``/``La`` have lower-case ``a`` bands, so (like transformers) they are not
    treated as transparent.

    Unlike the original LLaVA (``Image.open(f).convert("RGB")``, which simply drops alpha), this
    follows transformers / the project's design: RGBA on white.
    """
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def expand2square(img: Image.Image, background_color: Any) -> Image.Image:
    """Paste ``img`` centred on a square canvas of ``background_color`` (original LLaVA's helper).

    Width > height: pasted at ``(0, (width - height) // 2)``; height > width: at
    ``((height - width) // 2, 0)``; square images are returned unchanged. The canvas has the
    image's mode, so convert to RGB first (``to_rgb``) and pass an RGB tuple.
    """
    width, height = img.size
    if width == height:
        return img
    if width > height:
        result = Image.new(img.mode, (width, width), background_color)
        result.paste(img, (0, (width - height) // 2))
        return result
    result = Image.new(img.mode, (height, height), background_color)
    result.paste(img, ((height - width) // 2, 0))
    return result


def resize_shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(new_width, new_height)`` for a shortest-edge resize, computed as transformers does.

    ``get_resize_output_image_size(default_to_square=False)``: the long edge is
    ``int(size * long / short)`` in Python floats (truncation, not rounding), which is what makes
    e.g. 640×480 → 448×336 and 37×53 → 336×481.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if width <= height:
        return new_short, new_long
    return new_long, new_short


def _center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    # transformers' center_crop: top = (H - crop) // 2, left = (W - crop) // 2. After a
    # shortest-edge resize to `size` the crop always fits, so its zero-padding branch never runs.
    top = (height - size) // 2
    left = (width - size) // 2
    return left, top, left + size, top + size


def preprocess_image_uint8(img: Image.Image, mode: str = "pad", size: int = 336,
                           processor: ImageProcessorConfig | None = None) -> np.ndarray:
    """Everything but rescale/normalize: RGB conversion, optional pad, resize, crop → uint8 HWC.

    Args:
      img: any PIL image (any mode; converted with ``to_rgb``).
      mode: ``"pad"`` (LLaVA-1.5: ``expand2square`` with the CLIP mean colour first) or
        ``"crop"`` (plain CLIP: shortest-edge resize + center crop).
      size: shortest-edge resize target and crop size (336 for CLIP-L/336).
      processor: the checkpoint's image processor (None: CLIP's).

    Returns:
      ``np.ndarray`` uint8 ``[size, size, 3]``; ``normalize`` of it (with the processor's
      mean/std) equals transformers' ``CLIPImageProcessorPil`` / ``SiglipImageProcessorPil``
      output (transposed to HWC).
    """
    _check_mode_size(mode, size)
    processor = processor or CLIP_PROCESSOR
    img = to_rgb(img)
    if mode == "pad":
        return np.asarray(_pad_and_resize(img, size, processor), dtype=np.uint8)
    # Always call resize, like transformers: PIL returns a copy when the size is unchanged.
    if processor.type == "siglip":
        return np.asarray(img.resize((size, size), resample=processor.resample), dtype=np.uint8)
    new_w, new_h = resize_shortest_edge_size(img.width, img.height, size)
    img = img.resize((new_w, new_h), resample=processor.resample)
    img = img.crop(_center_crop_box(new_w, new_h, size))
    return np.asarray(img, dtype=np.uint8)


def _pad_and_resize(img: Image.Image, size: int, processor: ImageProcessorConfig) -> Image.Image:
    """``expand2square(img, mean colour).resize((size, size))``, bit-exactly, but faster for
    landscape images. (The canvas is square, so CLIP's shortest-edge resize and center crop and
    SigLIP's square resize are the same resize here.)

    PIL's resampler is separable: a horizontal pass over every input row, rounded to uint8, then
    a vertical pass. On the square canvas of a landscape image (width > height) each canvas row
    is either a full image row or a full background row, with identical horizontal geometry
    (``width → size``). Horizontally resampling a constant row gives back exactly that constant
    (PIL's fixed-point weights sum to 2**22 within a few units, far below the rounding margin),
    so the intermediate equals "background canvas with the horizontally resized image pasted at
    the same row offset". Building it directly skips the horizontal pass over the padding rows
    (~13% of the whole preprocessing for 4:3 images at 336). The vertical pass is unchanged.
    Portrait images mix padding and image within rows, so they take the plain route.
    ``tests/test_images.py`` checks equality with the plain route on many sizes.
    """
    width, height = img.size
    background = mean_color(processor.mean)
    resample = processor.resample
    if width <= height:
        return expand2square(img, background).resize((size, size), resample=resample)
    rows = img.resize((size, height), resample=resample)  # horizontal pass only
    intermediate = Image.new("RGB", (size, width), background)
    intermediate.paste(rows, (0, (width - height) // 2))
    return intermediate.resize((size, size), resample=resample)  # vertical pass only


def preprocess_images(
    images: Sequence[Image.Image],
    mode: str = "pad",
    size: int = 336,
    layout: str = "NCHW",
    dtype: Any = np.float32,
    processor: ImageProcessorConfig | None = None,
) -> np.ndarray:
    """Preprocess a list of PIL images into one normalized batch (the public API).

    Args:
      images: PIL images of any size and mode.
      mode: ``"pad"`` (LLaVA-1.5, square canvas of the mean colour first) or ``"crop"``
        (plain CLIP shortest-edge resize + center crop).
      size: shortest-edge / crop size (336 for CLIP-L/336).
      layout: ``"NCHW"`` (default; same as transformers' ``pixel_values``, so one array feeds
        both the HF reference and llava_jax) or ``"NHWC"`` (llava_jax's native layout).
      dtype: output dtype; normalization is always computed in float32 and cast at the end.
      processor: the checkpoint's image processor (None: CLIP's).

    Returns:
      ``np.ndarray`` ``[N, 3, size, size]`` or ``[N, size, size, 3]``.
    """
    _check_mode_size(mode, size)
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    processor = processor or CLIP_PROCESSOR
    if len(images):
        batch = np.stack([preprocess_image_uint8(im, mode=mode, size=size, processor=processor) for im in images])
    else:
        batch = np.zeros((0, size, size, 3), np.uint8)
    out = normalize(batch, processor.mean, processor.std)
    if layout == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out.astype(dtype, copy=False))


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _source_name(src: Any, name: str | None) -> str:
    if name is not None:
        return str(name)
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return str(getattr(src, "name", None) or f"<{type(src).__name__}>")


def _open(src: ImageSource, name: str | None):
    """Open lazily (header only). Returns (image, file_to_close_or_None)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        fp: Any = io.BytesIO(bytes(src))
        owned = None
    elif isinstance(src, (str, os.PathLike)):
        fp = owned = open(src, "rb")
    else:
        fp, owned = src, None
    try:
        return Image.open(fp), owned
    except BaseException:
        if owned is not None:
            owned.close()
        raise


def _unreadable(src: Any, name: str | None, err: BaseException) -> ValueError:
    """The error of an unusable image, for every caller (the pipeline counts and skips the
    sample, the chat and the server report it): what it was and why."""
    if isinstance(err, FileNotFoundError):
        return ValueError(f"cannot read image {_source_name(src, name)!r}: no such file")
    return ValueError(
        f"cannot read image {_source_name(src, name)!r}: {type(err).__name__}: {err} "
        "(corrupt, truncated or not an image)"
    )


def load_image(path_or_bytes: ImageSource, name: str | None = None) -> Image.Image:
    """Open an image file / bytes / file object, decode it fully and convert it to RGB.

    Like the original LLaVA, EXIF orientation is *not* applied (``Image.open`` + RGB conversion
    only); RGB conversion follows transformers (``to_rgb``: alpha composited on white).

    Args:
      path_or_bytes: a path, raw encoded bytes, or a binary file object.
      name: label used in error messages (e.g. the file name inside a tar or parquet row);
        defaults to the path, or ``"<N bytes>"``.

    Raises:
      ValueError: naming the source, for missing, corrupt, truncated or non-image inputs.
        Callers in the data pipeline count and skip these.
    """
    img, owned = None, None
    try:
        img, owned = _open(path_or_bytes, name)
        img.load()  # force the full decode here, so truncation errors surface inside the try
        return to_rgb(img)
    # PIL's format plugins raise a zoo of types for malformed files (OSError,
    # UnidentifiedImageError, SyntaxError, struct.error, EOFError, IndexError, ...), and a
    # decompression bomb raises its own error: all mean "this sample is unusable".
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path_or_bytes, name, e) from e
    finally:
        if owned is not None:
            owned.close()


def _draft_scale(img: Image.Image, mode: str, size: int, draft_gap: float = 1.0) -> int:
    """The JPEG DCT-domain reduction (1, 2, 4 or 8) that keeps the final resize a downsample.

    "crop" resizes the image's shortest edge to ``size``, so that edge must stay ≥ size after
    the reduction; "pad" resizes the square canvas (side = the image's longest edge), so the
    longest edge must stay ≥ size. libjpeg scales by 1/s with ceil rounding, so
    ``s ≤ edge // (draft_gap * size)`` guarantees ``ceil(edge / s) ≥ draft_gap * size``.
    """
    w, h = img.size
    edge = min(w, h) if mode == "crop" else max(w, h)
    ratio = int(edge // (draft_gap * size))
    for s in (8, 4, 2):
        if ratio >= s:
            return s
    return 1


def decode_and_preprocess_uint8(
    jpeg_bytes_or_path: ImageSource,
    mode: str = "pad",
    size: int = 336,
    name: str | None = None,
    draft_gap: float = 1.0,
    processor: ImageProcessorConfig | None = None,
) -> np.ndarray:
    """Fast data-pipeline path: decode (at reduced scale if possible) + the uint8 preprocessing.

    For JPEGs whose relevant edge (shortest edge for "crop", longest for "pad": the edge that
    ends up resized to ``size``) is at least ``2 * draft_gap * size``, the file is decoded with
    PIL ``Image.draft`` at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT: far less decode and
    resize work), choosing the largest power of two that keeps that edge ≥ ``draft_gap * size``,
    so the final bicubic resize still downsamples. The resize then uses PIL's ``box`` argument
    so that every output pixel samples the same place of the original image as the full path
    (same output size, crop offsets and pad offsets, to sub-pixel accuracy). Other formats, and
    JPEGs below the threshold, decode at full resolution: the result is then bit-identical to
    ``preprocess_image_uint8(load_image(src), mode, size)``.

    A reduced-scale result is NOT bit-identical to the full-resolution path: libjpeg's DCT
    reduction replaces part of the bicubic antialiasing. Measured |diff| in uint8 levels
    (mean / 99th percentile / max) with the default ``draft_gap=1``:

    * synthetic photo-like JPEGs (tests/test_images.py; 1344×1008 … 4000×3000 at 336,
      1200×700 at 64): mean 0.17–0.59, p99 ≤ 5, max ≤ 20 (the max sits on sharp edges);
    * real detailed images (a circuit-board photo 720×477 "pad"; text/line-art diagrams
      ~2000 px): mean 0.9–2.6, p99 12–21, max ≤ 55.

    ``draft_gap=2`` (Pillow's ``thumbnail`` convention: keep ≥ 2× the target before the final
    resize) roughly halves the mean deviation at a smaller speed-up.

    Throughput on one core (synthetic JPEG q90, size 336, vs the original LLaVA route
    ``Image.open → convert("RGB") → expand2square → CLIP processor`` with float output; noisy,
    shared 2-core machine): 500×375 and 640×480 ≈1.5–1.9× (no draft below 2× the target: the
    gain is uint8 output and the landscape pad shortcut; PIL's bicubic resize dominates),
    1024×768 ≈2.7–3×, 2000×1500 ≈4.5–9×, 4000×3000 ≈7–15×.

    Args:
      jpeg_bytes_or_path: path, encoded bytes or binary file object (any format PIL reads).
      mode, size: as ``preprocess_image_uint8``.
      name: label for error messages (defaults to the path or ``"<N bytes>"``).
      draft_gap: the reduced edge must stay ≥ ``draft_gap * size`` (≥ 1).
      processor: the checkpoint's image processor (None: CLIP's). SigLIP's square resize
        shrinks both edges to ``size``, so the shortest edge bounds the reduction as for "crop".

    Returns:
      uint8 ``[size, size, 3]``.

    Raises:
      ValueError: naming the source, for corrupt/truncated/non-image inputs (as ``load_image``).
    """
    if draft_gap < 1:
        raise ValueError(
            f"draft_gap must be >= 1 (the final resize must downsample), got {draft_gap}"
        )
    _check_mode_size(mode, size)
    img, owned = None, None
    try:
        img, owned = _open(jpeg_bytes_or_path, name)
        width, height = img.size
        scale = 1
        s = _draft_scale(img, mode, size, draft_gap) if img.format in ("JPEG", "MPO") else 1
        if s > 1:
            # Pillow picks the largest of 8/4/2/1 ≤ min(W // req_w, H // req_h); asking for
            # (W // s, H // s) yields s (or less, for degenerate thin images: still safe).
            drafted = img.draft("RGB", (max(1, width // s), max(1, height // s)))
            if drafted is not None:
                # Pillow returns box = (0, 0, W / scale, H / scale): read back the scale it chose.
                scale = int(round(width / drafted[1][2]))
        img.load()
        rgb = to_rgb(img)
    except Exception as e:  # noqa: BLE001 - see load_image
        raise _unreadable(jpeg_bytes_or_path, name, e) from e
    finally:
        if owned is not None:
            owned.close()

    if scale == 1:
        return preprocess_image_uint8(rgb, mode=mode, size=size, processor=processor)
    return _preprocess_drafted(rgb, width, height, scale, mode, size, processor)


def _preprocess_drafted(
    rgb: Image.Image, width: int, height: int, scale: float, mode: str, size: int,
    processor: ImageProcessorConfig | None = None,
) -> np.ndarray:
    """Resize a reduced-scale decode so its output grid matches the full-resolution path.

    Original-image coordinate u maps to u / scale in the reduced image. PIL's
    ``resize(box=...)`` maps output pixel centres to ``box0 + (i + 0.5) * (box1 - box0) / n``,
    so choosing the box as the full-resolution region divided by ``scale`` reproduces the
    full-resolution sampling positions.
    """
    processor = processor or CLIP_PROCESSOR
    resample = processor.resample
    if mode == "crop":
        box = (0, 0, width / scale, height / scale)
        if processor.type == "siglip":
            return np.asarray(rgb.resize((size, size), resample=resample, box=box), dtype=np.uint8)
        new_w, new_h = resize_shortest_edge_size(width, height, size)
        out = rgb.resize((new_w, new_h), resample=resample, box=box)
        return np.asarray(out.crop(_center_crop_box(new_w, new_h, size)), dtype=np.uint8)

    # "pad": the full path pastes the image at integer offset `off` on an L×L canvas (L = long
    # edge). In reduced space that offset is off / scale, usually fractional: paste at the
    # integer ceil(off / scale) instead and start the resize box at the fractional remainder
    # (PIL forbids negative box origins, hence ceil). The canvas is sized so that both the
    # pasted image and the box (length L / scale from that origin) fit inside it.
    side = max(width, height)
    off_x = 0 if width >= height else (height - width) // 2
    off_y = (width - height) // 2 if width > height else 0
    background = mean_color(processor.mean)
    # The reduced decode has ceil(edge / scale) pixels; when scale does not divide the edge, the
    # last row/column covers only part of a reduced pixel, the rest of which is padding in the
    # full-resolution path. Along the padded (short) side, blend that line with the background
    # by its coverage: an area-average of the two, as the full-resolution pixels would give.
    short_edge, n_lines = (height, rgb.height) if width > height else (width, rgb.width)
    coverage = short_edge / scale - (n_lines - 1)
    if width != height and coverage < 1:
        if width > height:
            line_box = (0, n_lines - 1, rgb.width, n_lines)
        else:
            line_box = (n_lines - 1, 0, n_lines, rgb.height)
        line = rgb.crop(line_box)
        blended = Image.blend(line, Image.new("RGB", line.size, background), 1 - coverage)
        rgb.paste(blended, line_box[:2])
    px, py = math.ceil(off_x / scale), math.ceil(off_y / scale)
    bx, by = px - off_x / scale, py - off_y / scale
    span = side / scale
    canvas_w = max(math.ceil(bx + span), px + rgb.width)
    canvas_h = max(math.ceil(by + span), py + rgb.height)
    canvas = Image.new("RGB", (canvas_w, canvas_h), background)
    canvas.paste(rgb, (px, py))
    out = canvas.resize((size, size), resample=resample, box=(bx, by, bx + span, by + span))
    return np.asarray(out, dtype=np.uint8)
