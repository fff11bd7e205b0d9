"""Image preprocessing vs transformers' CLIPImageProcessorPil, plus LLaVA-1.5 pad mode.

The reference for "crop" is ``CLIPImageProcessorPil`` itself; for "pad" it is what the original
LLaVA does: ``expand2square(img, tuple(int(x * 255) for x in processor.image_mean))`` (written
out again below, independent of the code under test) and then the processor.
"""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from llava_jax.data import images as I

transformers = pytest.importorskip("transformers")
from transformers import CLIPImageProcessorPil  # noqa: E402  (needs no torch / torchvision)
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb  # noqa: E402
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

_PROCESSORS = {}


def hf_processor(size):
    if size not in _PROCESSORS:
        _PROCESSORS[size] = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    return _PROCESSORS[size]


def llava_expand2square(pil_img, background_color):
    """Verbatim logic of the original LLaVA helper (llava/mm_utils.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def reference(img, mode, size):
    proc = hf_processor(size)
    if mode == "pad":
        mean = tuple(int(x * 255) for x in proc.image_mean)
        img = llava_expand2square(hf_convert_to_rgb(img, return_numpy=False), mean)
    return proc(img, return_tensors="np")["pixel_values"]


def random_image(width, height, mode, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "RGBA":
        # varied alpha, including fully transparent and fully opaque pixels
        a[..., 3].flat[::7] = 0
        a[..., 3].flat[1::7] = 255
        return Image.fromarray(a, "RGBA")
    if mode == "LA":
        return Image.fromarray(a[..., :2].copy(), "LA")
    if mode == "L":
        return Image.fromarray(a[..., 0].copy(), "L")
    if mode == "CMYK":
        return Image.fromarray(a, "CMYK")
    if mode == "P":
        return Image.fromarray(a[..., :3].copy()).quantize(16)
    if mode == "P+transparency":
        im = Image.fromarray(a[..., :3].copy()).quantize(16)
        im.info["transparency"] = 3
        return im
    if mode == "I;16":
        return Image.fromarray(a[..., 0].astype(np.uint16) * 3)  # values up to 765: clipped
    return Image.fromarray(a[..., :3].copy(), "RGB")


def photo_like(width, height, seed=0):
    """Smooth gradients + blurred shapes + mild noise: a stand-in for natural photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack(
        [
            np.sin(xx * rng.uniform(2, 9) + rng.uniform(0, 6)) * 0.5 + 0.5,
            np.cos(yy * rng.uniform(2, 9)) * 0.5 + 0.5,
            (xx + yy) / 2,
        ],
        -1,
    )
    im = Image.fromarray((base * 200).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 3)), y0 + int(rng.integers(10, height // 3))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    im = im.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(im).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# equality with transformers
# --------------------------------------------------------------------------------------------


def test_constants_match_transformers():
    assert I.CLIP_MEAN == tuple(OPENAI_CLIP_MEAN)
    assert I.CLIP_STD == tuple(OPENAI_CLIP_STD)
    assert I.mean_color() == (122, 116, 104)
    proc = hf_processor(28)
    assert proc.rescale_factor == 1 / 255


SHAPES = [(37, 53), (640, 480), (480, 640), (333, 333), (1, 400), (400, 1), (3, 5)]
MODES = ["RGB", "RGBA", "L", "P", "P+transparency", "LA", "CMYK", "I;16"]


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers_all_modes(shape, mode):
    w, h = shape
    for i, pil_mode in enumerate(MODES):
        img = random_image(w, h, pil_mode, seed=i)
        ref = reference(img, mode, 28)
        ours = I.preprocess_images([img], mode=mode, size=28)
        assert ours.shape == ref.shape == (1, 3, 28, 28)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=f"{pil_mode} {shape}")
        # in fact the numpy path reproduces transformers' float32 arithmetic bit for bit
        assert np.array_equal(ours, ref), (pil_mode, shape)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_matches_transformers_clip336_batch(mode):
    imgs = [random_image(640, 480, "RGB", 1), random_image(300, 500, "RGBA", 2)]
    ref = np.concatenate([reference(im, mode, 336) for im in imgs])
    ours = I.preprocess_images(imgs, mode=mode, size=336)
    assert ours.shape == (2, 3, 336, 336)
    assert np.abs(ours - ref).max() <= 1e-5


def test_pad_rgba_without_prior_conversion_matches():
    """Original LLaVA order on an RGBA image (pad the RGBA image, let the processor composite)
    gives the same pixels: the canvas is opaque, so compositing commutes with padding."""
    img = random_image(50, 31, "RGBA", 3)
    mean = tuple(int(x * 255) for x in hf_processor(28).image_mean)
    ref = hf_processor(28)(llava_expand2square(img, mean), return_tensors="np")["pixel_values"]
    assert np.array_equal(I.preprocess_images([img], mode="pad", size=28), ref)


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "RGBa", "CMYK", "YCbCr", "I", "I;16", "F"]
)
def test_to_rgb_matches_transformers(mode):
    base = random_image(9, 7, "RGBA", 4)
    wide = np.asarray(base)[..., 0].astype(np.int32) * 2 - 100  # -100..410: outside 0..255
    if mode == "I":
        img = Image.fromarray(wide)
    elif mode == "F":
        img = Image.fromarray(wide.astype(np.float32) + 0.25)
    elif mode == "I;16":
        img = Image.fromarray(np.clip(wide, 0, None).astype(np.uint16))
    else:
        img = base.convert(mode)
    assert img.mode == mode
    ours = np.asarray(I.to_rgb(img))
    ref = hf_convert_to_rgb(img, return_numpy=True)
    assert ours.shape == (7, 9, 3) and np.array_equal(ours, ref), mode


def test_to_rgb_transparency_info():
    # An RGB image with a transparent colour key: transformers composites it on white too.
    img = random_image(8, 8, "RGB", 5)
    img.info["transparency"] = tuple(int(v) for v in np.asarray(img)[0, 0])
    assert np.array_equal(np.asarray(I.to_rgb(img)), hf_convert_to_rgb(img, return_numpy=True))
    assert tuple(np.asarray(I.to_rgb(img))[0, 0]) == (255, 255, 255)


def test_expand2square_offsets():
    wide = Image.new("RGB", (10, 4), (255, 0, 0))
    sq = np.asarray(I.expand2square(wide, (1, 2, 3)))
    assert sq.shape == (10, 10, 3)
    assert (sq[3:7, :, 0] == 255).all()
    assert (sq[:3] == (1, 2, 3)).all() and (sq[7:] == (1, 2, 3)).all()
    tall = Image.new("RGB", (3, 8), (255, 0, 0))
    sq = np.asarray(I.expand2square(tall, (1, 2, 3)))
    assert (sq[:, 2:5, 0] == 255).all()
    assert (sq[:, :2] == (1, 2, 3)).all() and (sq[:, 5:] == (1, 2, 3)).all()
    same = Image.new("RGB", (5, 5))
    assert I.expand2square(same, (0, 0, 0)) is same


def test_pad_landscape_shortcut_is_bit_exact():
    """The landscape pad route (horizontal pass on image rows only) equals the plain route."""
    rng = np.random.default_rng(6)
    for _ in range(60):
        w = int(rng.integers(2, 700))
        h = int(rng.integers(1, w))
        size = int(rng.choice([28, 30, 336, 800]))  # 800: upsampling too
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        plain = I.expand2square(img, I.mean_color()).resize((size, size), Image.Resampling.BICUBIC)
        ours = I.preprocess_image_uint8(img, "pad", size)
        assert np.array_equal(ours, np.asarray(plain)), (w, h, size)


def test_uint8_path_geometry():
    img = random_image(640, 480, "RGB")
    for mode in ("pad", "crop"):
        out = I.preprocess_image_uint8(img, mode=mode, size=30)
        assert out.dtype == np.uint8 and out.shape == (30, 30, 3)
    assert I.resize_shortest_edge_size(640, 480, 336) == (448, 336)
    assert I.resize_shortest_edge_size(37, 53, 336) == (336, 481)  # int() truncation, not round
    with pytest.raises(ValueError, match="mode"):
        I.preprocess_image_uint8(img, mode="squash")


# --------------------------------------------------------------------------------------------
# normalize and layouts
# --------------------------------------------------------------------------------------------


def test_normalize_exact_for_every_uint8_value():
    x = np.tile(np.arange(256, dtype=np.uint8)[:, None, None], (1, 1, 3))  # [256, 1, 3]
    # transformers: float64 rescale, cast to float32, then float32 (x - mean) / std
    rescaled = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.array(OPENAI_CLIP_MEAN, np.float32), np.array(OPENAI_CLIP_STD, np.float32)
    ref = (rescaled - mean) / std
    out = I.normalize(x)
    assert out.dtype == np.float32 and np.array_equal(out, ref)


def test_normalize_jax_matches_numpy():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x = np.random.default_rng(7).integers(0, 256, (2, 3, 5, 4, 3), dtype=np.uint8)  # [..., H, W, 3]
    ref = I.normalize(x)
    out = I.normalize(jnp.asarray(x))
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32 and out.shape == x.shape
    assert np.abs(np.asarray(out) - ref).max() <= 1e-6
    jitted = jax.jit(I.normalize)(jnp.asarray(x))
    assert np.abs(np.asarray(jitted) - ref).max() <= 1e-6


def test_layouts_and_dtype():
    imgs = [random_image(40, 30, "RGB", 8), random_image(30, 45, "L", 9)]
    nchw = I.preprocess_images(imgs, mode="pad", size=28)
    nhwc = I.preprocess_images(imgs, mode="pad", size=28, layout="NHWC")
    assert nchw.shape == (2, 3, 28, 28) and nhwc.shape == (2, 28, 28, 3)
    assert nchw.flags.c_contiguous and nhwc.flags.c_contiguous
    assert np.array_equal(nchw, nhwc.transpose(0, 3, 1, 2))
    uint8 = np.stack([I.preprocess_image_uint8(im, "pad", 28) for im in imgs])
    assert np.array_equal(nhwc, I.normalize(uint8))
    half = I.preprocess_images(imgs, mode="pad", size=28, dtype=np.float16)
    assert half.dtype == np.float16 and np.abs(half.astype(np.float32) - nchw).max() < 1e-2
    assert I.preprocess_images([], size=28).shape == (0, 3, 28, 28)
    with pytest.raises(ValueError, match="layout"):
        I.preprocess_images(imgs, size=28, layout="HWC")


# --------------------------------------------------------------------------------------------
# loading and errors
# --------------------------------------------------------------------------------------------


def test_load_image_path_bytes_and_no_exif_transpose(tmp_path):
    img = random_image(20, 10, "RGB", 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW; the original LLaVA ignores it, so do we
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    for src in (data, str(path), path, io.BytesIO(data)):
        loaded = I.load_image(src)
        assert loaded.mode == "RGB" and loaded.size == (20, 10)
    rgba = random_image(6, 6, "RGBA", 11)
    loaded = np.asarray(I.load_image(encode(rgba, "PNG")))
    assert np.array_equal(loaded, hf_convert_to_rgb(rgba, return_numpy=True))


def test_corrupt_and_truncated_raise_valueerror_with_name(tmp_path):
    good = encode(photo_like(120, 90), "JPEG", quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    for fn in (I.load_image, lambda s, **kw: I.decode_and_preprocess_uint8(s, "pad", 28, **kw)):
        for path in (truncated, garbage, text, missing):
            with pytest.raises(ValueError, match=path.name):
                fn(str(path))
        with pytest.raises(ValueError, match="shard-3/000017.jpg"):
            fn(good[:300], name="shard-3/000017.jpg")
        with pytest.raises(ValueError, match="bytes"):
            fn(b"definitely not an image")


# --------------------------------------------------------------------------------------------
# fast path (JPEG draft decoding)
# --------------------------------------------------------------------------------------------


def _diff(src, mode, size, **kw):
    full = I.preprocess_image_uint8(I.load_image(src), mode, size).astype(np.int16)
    fast = I.decode_and_preprocess_uint8(src, mode, size, **kw).astype(np.int16)
    assert fast.shape == (size, size, 3)
    return np.abs(full - fast)


@pytest.mark.parametrize(
    "shape,mode,size",
    [
        ((640, 480), "pad", 336),  # long edge 640 < 2 * 336: no draft
        ((700, 500), "crop", 336),  # short edge 500 < 2 * 336: no draft
        ((110, 40), "crop", 28),  # short edge 40 < 56
    ],
)
def test_fast_path_identical_below_2x(shape, mode, size):
    data = encode(photo_like(*shape), "JPEG", quality=90)
    assert I._draft_scale(Image.open(io.BytesIO(data)), mode, size) == 1
    assert _diff(data, mode, size).max() == 0


def test_fast_path_identical_for_non_jpeg():
    data = encode(photo_like(400, 300), "PNG")  # draft only exists for JPEG
    for mode in ("pad", "crop"):
        assert _diff(data, mode, 28).max() == 0


# Measured |diff| on these images (mean / p99 / max, uint8 levels), draft_gap=1 (draft_gap=2):
#   1344x1008 crop 336 s=2: 0.37 / 2 / 9    (s=1: identical)
#   1344x1008 pad  336 s=4: 0.41 / 4 / 12   (0.21 / 1 / 7)
#   1200x700  crop  64 s=8: 0.59 / 5 / 16   (0.22 / 1 / 2)
#   700x1200  pad   64 s=8: 0.22 / 2 / 6    (same: s=8 either way)
#   3001x677  pad  336 s=8: 0.17 / 4 / 20   (0.06 / 1 / 5)
# The max sits on sharp steps (bicubic overshoot vs the DCT box-like reduction), p99 on the
# image/padding boundary. Asserted bounds leave a margin for other libjpeg / Pillow builds.
@pytest.mark.parametrize(
    "shape,mode,size,scale",
    [
        ((1344, 1008), "crop", 336, 2),
        ((1344, 1008), "pad", 336, 4),
        ((1200, 700), "crop", 64, 8),
        ((700, 1200), "pad", 64, 8),
        ((3001, 677), "pad", 336, 8),
    ],
)
def test_fast_path_close(shape, mode, size, scale):
    data = encode(photo_like(*shape, seed=shape[0]), "JPEG", quality=90)
    assert I._draft_scale(Image.open(io.BytesIO(data)), mode, size) == scale
    d = _diff(data, mode, size)
    assert d.mean() <= 1.0, d.mean()
    assert np.percentile(d, 99) <= 8, np.percentile(d, 99)
    # draft_gap=2 (Pillow's thumbnail convention) trades speed for a smaller deviation
    d2 = _diff(data, mode, size, draft_gap=2.0)
    assert d2.mean() <= d.mean() + 1e-9


@pytest.mark.parametrize(
    "pil_mode,kw",
    [("L", {}), ("CMYK", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0})],
    ids=["gray", "cmyk", "progressive", "444"],
)
def test_fast_path_jpeg_variants(pil_mode, kw):
    # measured: mean 0.31-0.71, p99 <= 8, max <= 27 (pad: s=8, crop: s=4 at 112); at this small
    # output the image/padding boundary rows are a larger share of the pixels, hence the p99.
    data = encode(photo_like(900, 700, seed=1).convert(pil_mode), "JPEG", quality=90, **kw)
    for mode in ("pad", "crop"):
        d = _diff(data, mode, 112)
        assert d.mean() <= 1.0 and np.percentile(d, 99) <= 12, (mode, d.mean())
    with pytest.raises(ValueError, match="draft_gap"):
        I.decode_and_preprocess_uint8(data, "pad", 112, draft_gap=0.5)


# --------------------------------------------------------------------------------------------
# SigLIP preprocessing (SiglipImageProcessorPil: resize to the square, no crop, mean/std 0.5)
# --------------------------------------------------------------------------------------------
from transformers import SiglipImageProcessorPil  # noqa: E402
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD  # noqa: E402

from llava_jax.config import ImageProcessorConfig  # noqa: E402


def siglip_reference(img, mode, size, resample):
    proc = SiglipImageProcessorPil(size={"height": size, "width": size}, resample=resample)
    if mode == "pad":
        mean = tuple(int(x * 255) for x in proc.image_mean)
        img = llava_expand2square(hf_convert_to_rgb(img, return_numpy=False), mean)
    return proc(img, return_tensors="np")["pixel_values"]


def test_siglip_processor_defaults_match_transformers():
    proc = SiglipImageProcessorPil()
    ours = ImageProcessorConfig.of_type("siglip")
    assert ours.mean == tuple(IMAGENET_STANDARD_MEAN) == tuple(proc.image_mean)
    assert ours.std == tuple(IMAGENET_STANDARD_STD) == tuple(proc.image_std)
    assert ours.resample == proc.resample and proc.do_convert_rgb and proc.rescale_factor == 1 / 255
    assert I.mean_color(ours.mean) == (127, 127, 127)


@pytest.mark.parametrize("resample", [3, 2], ids=["bicubic", "bilinear"])
@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_siglip_matches_transformers_all_modes(shape, mode, resample):
    w, h = shape
    proc = ImageProcessorConfig(type="siglip", resample=resample, mean=(0.5,) * 3, std=(0.5,) * 3)
    for i, pil_mode in enumerate(MODES):
        img = random_image(w, h, pil_mode, seed=i)
        ref = siglip_reference(img, mode, 28, resample)
        ours = I.preprocess_images([img], mode=mode, size=28, processor=proc)
        assert ours.shape == ref.shape == (1, 3, 28, 28)
        assert np.array_equal(ours, ref), (pil_mode, shape)


def test_siglip_fast_path():
    """The JPEG fast path with SigLIP's square resize: identical below 2x, and at 4000x3000 (a
    1/8 DCT reduction) within the deviations documented for CLIP."""
    proc = ImageProcessorConfig.of_type("siglip")
    small = encode(photo_like(660, 500), "JPEG", quality=90)  # both edges < 2 * 336: no draft
    for mode in ("crop", "pad"):
        full = I.preprocess_image_uint8(I.load_image(small), mode, 336, processor=proc)
        assert np.array_equal(I.decode_and_preprocess_uint8(small, mode, 336, processor=proc), full)
    big = encode(photo_like(4000, 3000), "JPEG", quality=90)
    for mode in ("crop", "pad"):
        full = I.preprocess_image_uint8(I.load_image(big), mode, 336, processor=proc).astype(np.int16)
        fast = I.decode_and_preprocess_uint8(big, mode, 336, processor=proc).astype(np.int16)
        d = np.abs(full - fast)
        assert d.mean() < 1.0 and np.percentile(d, 99) <= 6, (mode, d.mean())
