"""LLaVA-NeXT AnyRes against transformers: the image processor's pixels, the processor's image-token
counts, LlavaNextForConditionalGeneration's logits on a batch of differently shaped images, jit
without retracing across image sizes, and the llava_next export round trip."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
from PIL import Image  # noqa: E402

import llava_jax  # noqa: E402
from hf_util import IMAGE_TOKEN  # noqa: E402
from llava_jax.config import LlavaConfig, VisionConfig  # noqa: E402
from llava_jax.data import anyres  # noqa: E402
from llava_jax.data.images import normalize  # noqa: E402

S, PATCH = 28, 7  # tile size, patch size: 4 x 4 patches per tile
PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]  # llava-v1.6's, scaled from 336
# (height, width, mode): landscape, portrait, square, extreme ratios, odd sizes, alpha and grey.
SHAPES = [(37, 91, "RGB"), (60, 23, "RGBA"), (50, 50, "L"), (13, 90, "RGB"), (101, 33, "RGB"), (29, 57, "LA"),
          (400, 300, "RGB"), (28, 28, "RGB"), (85, 29, "P")]


def make_image(h, w, mode, seed=0):
    a = np.random.default_rng(seed + h * 1000 + w).integers(0, 256, (h, w, 4), np.uint8)
    a[..., 3] = np.where(a[..., 3] < 60, 0, a[..., 3])  # some fully transparent pixels
    return Image.fromarray(a, "RGBA").convert(mode)


def small_config(tower: str = "clip_vision_model", **kw) -> LlavaConfig:
    vision = VisionConfig(model_type=tower, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          image_size=S, patch_size=PATCH)
    return LlavaConfig(vision=vision, image_grid_pinpoints=tuple(map(tuple, PINPOINTS)), **kw)


def hf_image_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=PINPOINTS)


# ------------------------------------------------------------------ host side
def test_tiles_equal_llava_next_image_processor():
    cfg = small_config()
    images = [make_image(h, w, m) for h, w, m in SHAPES]
    ref = hf_image_processor()(images=images, return_tensors="np")
    for i, img in enumerate(images):
        tiles, n, size = anyres.preprocess_anyres_uint8(img, cfg)
        assert size == tuple(ref["image_sizes"][i])
        ours = normalize(tiles[:n], cfg.image_processor.mean, cfg.image_processor.std).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(ours, ref["pixel_values"][i, :n], atol=1e-6, err_msg=str(SHAPES[i]))
        assert not ref["pixel_values"][i, n:].any()  # transformers' batch padding starts where our tiles end
        assert not tiles[n:].any()


def test_image_token_counts_equal_llava_next_processor(tmp_path):
    from tokenizer_util import make_llama_tokenizer
    from transformers import AutoTokenizer, LlavaNextProcessor

    tok = AutoTokenizer.from_pretrained(make_llama_tokenizer(tmp_path, llava_tokens=True))
    image_id = tok.convert_tokens_to_ids("<image>")
    cases = [("default", small_config()),  # CLIP: class token dropped
             ("full", small_config("siglip_vision_model", vision_feature_select_strategy="full"))]  # no class token
    for strategy, cfg in cases:
        proc = LlavaNextProcessor(image_processor=hf_image_processor(), tokenizer=tok, patch_size=PATCH,
                                  vision_feature_select_strategy=strategy,
                                  num_additional_image_tokens=cfg.vision.num_class_tokens)
        for h, w, mode in SHAPES + [(700, 30, "RGB"), (30, 700, "RGB"), (56, 112, "RGB")]:
            out = proc(images=[make_image(h, w, mode)], text="<image>\nWhat is it?", return_tensors="np")
            n_ref = int((out["input_ids"] == image_id).sum())
            assert anyres.num_image_tokens(h, w, cfg) == n_ref, (strategy, h, w)
            assert len(anyres.feature_index(h, w, cfg)) == n_ref
            assert n_ref <= anyres.max_image_tokens(cfg)


def test_llava_v1_6_geometry():
    """The released llava-v1.6 geometry: 5 views, at most 2928 image tokens."""
    from llava_jax.presets import CLIP_VIT_L_14_336

    cfg = LlavaConfig(vision=CLIP_VIT_L_14_336, image_grid_pinpoints=((336, 672), (672, 336), (672, 672),
                                                                       (1008, 336), (336, 1008)))
    assert cfg.max_tiles == 4 and anyres.max_image_tokens(cfg) == 576 + 48 * 49
    assert anyres.num_image_tokens(672, 672, cfg) == 576 + 48 * 49


def test_config_refuses_bad_pinpoints_and_class_token_layout():
    with pytest.raises(ValueError, match="multiples"):
        small_config().replace(image_grid_pinpoints=((S, S + 1),))
    with pytest.raises(ValueError, match="one feature per patch"):
        small_config(vision_feature_select_strategy="full")  # CLIP with its class token kept


# ------------------------------------------------------------------ model vs transformers
def make_hf_llava_next(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=S, patch_size=PATCH),
        text_config=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: make every param matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_hf_llava_next()
    d = tmp_path_factory.mktemp("llava_next")
    hf.save_pretrained(d)
    return hf, d


def make_rows(cfg, rows_of_shapes, seed=0):
    """(ids, mask, images per row): each row BOS, some text, its images' tokens with text between."""
    rng = np.random.default_rng(seed)
    text = lambda n: np.where((t := rng.integers(3, 128, n)) == IMAGE_TOKEN, 5, t)  # noqa: E731
    rows, images = [], []
    for shapes in rows_of_shapes:
        ims = [make_image(h, w, m, seed) for h, w, m in shapes]
        parts = [[1], text(2)]
        for h, w, _ in shapes:
            parts += [[IMAGE_TOKEN] * anyres.num_image_tokens(h, w, cfg), text(3)]
        rows.append(np.concatenate(parts))
        images.append(ims)
    L = max(len(r) for r in rows) + 2
    ids = np.zeros((len(rows), L), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask, images


BATCH = [[(37, 91, "RGB"), (60, 23, "RGBA")], [(50, 50, "L")], [(13, 90, "RGB")], []]


def test_fp32_logits_match_llava_next_on_mixed_aspect_ratios(pair):
    hf, d = pair
    model = llava_jax.from_pretrained(d)
    cfg = model.config
    assert cfg.is_anyres and cfg.image_grid_pinpoints == tuple(map(tuple, PINPOINTS))
    ids, mask, images = make_rows(cfg, BATCH)
    flat = [im for row in images for im in row]
    px = hf_image_processor()(images=flat, return_tensors="pt")  # padded to the batch's most views
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=px["pixel_values"],
                 image_sizes=px["image_sizes"]).logits.numpy()
    batch = anyres.anyres_batch(images, cfg, max_images=2)
    out = np.asarray(model(ids, attention_mask=mask, tiles=batch["tiles"], image_index=batch["image_index"]))
    diff = np.abs(out - ref)[mask.astype(bool)].max()
    print(f"llava_next fp32 max|diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_jit_does_not_retrace_across_image_sizes(pair):
    _, d = pair
    model = llava_jax.from_pretrained(d)
    traces = []

    @jax.jit
    def logits(ids, mask, tiles, index):
        traces.append(1)
        return model(ids, attention_mask=mask, tiles=tiles, image_index=index)

    L = 200
    outs = []
    for shapes in ([[(37, 91, "RGB")], [(60, 23, "RGB"), (13, 90, "RGB")]],
                   [[(400, 300, "RGB"), (50, 50, "RGB")], [(85, 29, "RGB")]]):
        ids, mask, images = make_rows(model.config, shapes)
        ids = np.pad(ids, ((0, 0), (0, L - ids.shape[1])))
        mask = np.pad(mask, ((0, 0), (0, L - mask.shape[1])))
        b = anyres.anyres_batch(images, model.config, max_images=2, capacity=L)
        outs.append(np.asarray(logits(ids, mask, b["tiles"], b["image_index"])))
        ref = np.asarray(model(ids, attention_mask=mask, tiles=b["tiles"], image_index=b["image_index"]))
        np.testing.assert_allclose(outs[-1][mask.astype(bool)], ref[mask.astype(bool)], atol=1e-4)
    assert len(traces) == 1


def test_token_count_mismatch_is_named(pair):
    _, d = pair
    model = llava_jax.from_pretrained(d)
    ids, mask, _ = make_rows(model.config, [[(37, 91, "RGB")]])
    b = anyres.anyres_batch([[make_image(60, 23, "RGB")]], model.config, max_images=1)
    with pytest.raises(ValueError, match="row 0: .* image tokens but its AnyRes images give"):
        model(ids, attention_mask=mask, tiles=b["tiles"], image_index=b["image_index"])


def test_export_round_trip(pair, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    hf, d = pair
    model = llava_jax.from_pretrained(d)
    out = llava_jax.save_pretrained(model, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava_next" and cfg["image_grid_pinpoints"] == PINPOINTS
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaNextImageProcessor" and pre["image_grid_pinpoints"] == PINPOINTS
    back, info = LlavaNextForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref, got = hf.state_dict(), back.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        np.testing.assert_array_equal(got[k].numpy(), ref[k].numpy(), err_msg=k)
    again = llava_jax.from_pretrained(out)  # and our own import of the export
    assert again.config.image_grid_pinpoints == model.config.image_grid_pinpoints
    np.testing.assert_array_equal(np.asarray(again.projector.image_newline.value),
                                  hf.model.image_newline.detach().numpy())


def test_packed_row_equals_samples_alone(pair):
    """Two AnyRes samples packed in one row (segments, restarting positions; the row's images in
    order, each with its own token count) give each sample's logits as when it runs alone."""
    _, d = pair
    model = llava_jax.from_pretrained(d)
    cfg = model.config
    samples = [[(37, 91, "RGB"), (60, 23, "RGB")], [(50, 50, "RGB")]]
    alone = []
    for shapes in samples:
        ids, mask, images = make_rows(cfg, [shapes], seed=len(shapes))
        n = int(mask.sum())
        b = anyres.anyres_batch(images, cfg, max_images=3)
        alone.append((ids[0, :n], images[0], np.asarray(model(ids[:, :n], tiles=b["tiles"],
                                                                image_index=b["image_index"]))[0]))
    ids = np.concatenate([a[0] for a in alone])[None]
    seg = np.concatenate([np.full(len(a[0]), i + 1) for i, a in enumerate(alone)])[None]
    pos = np.concatenate([np.arange(len(a[0])) for a in alone])[None]
    b = anyres.anyres_batch([alone[0][1] + alone[1][1]], cfg, max_images=3)
    packed = np.asarray(model(ids, tiles=b["tiles"], image_index=b["image_index"], segment_ids=seg, positions=pos))[0]
    n0 = len(alone[0][0])
    np.testing.assert_allclose(packed[:n0], alone[0][2], atol=1e-5)
    np.testing.assert_allclose(packed[n0:], alone[1][2], atol=1e-5)


def test_gguf_export_refuses_anyres(pair, tmp_path):
    """llama.cpp's LLaVA-1.5 mmproj has no image_newline or grid: refused, not written wrong."""
    from llava_jax.convert.gguf_export import export_gguf

    _, d = pair
    with pytest.raises(NotImplementedError, match="AnyRes"):
        export_gguf(llava_jax.from_pretrained(d), None, tmp_path)


def test_single_view_inputs_are_refused(pair):
    """The plain layouts (one tower-sized view per image) are not LLaVA-NeXT's inputs: refused."""
    _, d = pair
    model = llava_jax.from_pretrained(d)
    ids = np.array([[1] + [IMAGE_TOKEN] * 16 + [5]])
    with pytest.raises(NotImplementedError, match="tiles= and image_index="):
        model(ids, images=np.zeros((1, 1, S, S, 3), np.uint8))
