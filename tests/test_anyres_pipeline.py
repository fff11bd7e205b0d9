"""LLaVA-NeXT AnyRes through the training pipeline: packed rows give each sample's own per-token
loss (the train loss function), the pipeline's ids and pixels equal transformers'
`LlavaNextProcessor`, jitted train steps learn and trace once across image sizes, bad images are
skipped and counted, the per-row view budget, and the batch spec matches the pipeline's batches."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from llava_jax.config import IGNORE_INDEX, LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from llava_jax.data import anyres  # noqa: E402
from llava_jax.data.images import normalize  # noqa: E402
from llava_jax.data.packing import shift_labels  # noqa: E402
from llava_jax.data.pipeline import SampleProcessor  # noqa: E402
from llava_jax.data.pipeline_config import PipelineConfig  # noqa: E402
from llava_jax.data.tokenize import tokenize_conversation  # noqa: E402
from llava_jax.models.llava import LlavaModel  # noqa: E402
from llava_jax import train_step as st  # noqa: E402
from test_anyres import PATCH, PINPOINTS, S, hf_image_processor, make_image  # noqa: E402
from test_pipeline import run  # noqa: E402
from test_chat_templates import real_tokenizer  # noqa: E402

VOCAB = 832  # the 800-token test tokenizer + <image> (800) + <pad> (801)
L = 512
# (height, width) of the test images: landscape, portrait, square, extreme, odd.
SHAPES = {"wide": (37, 91), "tall": (60, 23), "square": (50, 50), "strip": (13, 90), "odd": (101, 33)}


def anyres_config(image_id: int) -> LlavaConfig:
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=S,
                          patch_size=PATCH)
    text = TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    return LlavaConfig(vision=vision, text=text, image_token_id=image_id,
                       image_grid_pinpoints=tuple(map(tuple, PINPOINTS)))


def turns(*texts):
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("anyres_images")
    out = {}
    for i, (name, (h, w)) in enumerate(SHAPES.items()):
        out[name] = d / f"{name}.png"
        make_image(h, w, "RGB", seed=i).save(out[name])
    return out


@pytest.fixture(scope="module")
def records(image_files):
    """One image each (different aspect ratios), one sample with two images in two turns, and a
    text-only one."""
    f = {k: str(v) for k, v in image_files.items()}
    return [
        {"id": "wide", "image_path": f["wide"], "conversations": turns("<image>\nWhat is shown?", "A wide picture.")},
        {"id": "two", "image_path": [f["tall"], f["square"]],
         "conversations": turns("<image>\nWhat is this one?", "A tall one.", "And <image> this one?", "A square.")},
        {"id": "text", "conversations": turns("What is two plus two?", "Four, as every child knows.")},
        {"id": "strip", "image_path": f["strip"], "conversations": turns("<image>\nDescribe it.", "A thin strip.")},
        {"id": "odd", "image_path": f["odd"], "conversations": turns("Look: <image>", "It is tall and noisy.")},
    ]


def pipeline_config(cfg: LlavaConfig, **kw) -> PipelineConfig:
    base = dict(max_length=L, max_images_per_row=3, image_size=S, num_image_tokens=cfg.num_image_tokens,
                template="vicuna_v1", batch_size=2, pack_bins=2, seed=0, shuffle=False, prefetch_batches=0,
                anyres=cfg)
    base.update(kw)
    return PipelineConfig(**base)


def batches(records, tokenizer, pcfg, n=None):
    return run(records, tokenizer, pcfg, n=n)[0]


def init_model(cfg: LlavaConfig, seed: int = 0) -> LlavaModel:
    """A random model; eager init takes ~15 s here, jitted without LLVM's optimisations (as
    build.model does on CPU) ~2 s."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(seed))))
    state = jax.jit(lambda: nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(seed)))[1],
                    compiler_options={"xla_backend_optimization_level": 0})()
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model(tokenizer):
    return init_model(anyres_config(tokenizer.convert_tokens_to_ids("<image>")))


def reference_sample(rec, tokenizer, cfg):
    """The sample alone in its own row, built without the pipeline: the images opened with PIL,
    the token counts from their sizes, `anyres_batch` for the one row; padded to the pipeline's
    row shape (L tokens, 3 image slots) so one compiled evaluation serves every sample."""
    paths = rec.get("image_path") or []
    paths = [paths] if isinstance(paths, str) else paths
    images = [Image.open(p) for p in paths]
    counts = [anyres.num_image_tokens(im.height, im.width, cfg) for im in images]
    tok = tokenize_conversation(tokenizer, "vicuna_v1", rec["conversations"], cfg.image_token_id, counts)
    n = len(tok["input_ids"])
    pad = lambda x, v: np.pad(x, (0, L - n), constant_values=v)[None].astype(np.int32)  # noqa: E731
    views = anyres.anyres_batch([images], cfg, max_images=3, capacity=anyres.index_capacity(cfg, 3, L))
    return {"input_ids": pad(tok["input_ids"], 0), "targets": pad(shift_labels(tok["labels"]), IGNORE_INDEX),
            "segment_ids": pad(np.ones(n), 0), "positions": pad(np.arange(n), 0),
            "tiles": views["tiles"], "image_index": views["image_index"]}, n


@pytest.fixture(scope="module")
def evaluate(model):
    """batch -> (per-token NLL [B, L] from the logits, (sum, count) of the train step's loss
    function `train_step.batch_loss`), jitted."""
    graphdef, trainable, frozen = st.split_model(model, [r".*"])

    @jax.jit
    def run(batch):
        m = nnx.merge(graphdef, trainable, frozen)
        logits = m(batch["input_ids"], tiles=batch["tiles"], image_index=batch["image_index"],
                   positions=batch["positions"], segment_ids=batch["segment_ids"]).astype(jnp.float32)
        t = batch["targets"]
        tgt = jnp.take_along_axis(logits, jnp.where(t == IGNORE_INDEX, 0, t)[..., None], -1)[..., 0]
        nll = jnp.where(t == IGNORE_INDEX, 0.0, jax.nn.logsumexp(logits, -1) - tgt)
        return nll, st.batch_loss(trainable, frozen, graphdef, batch)

    def f(batch):
        nll, (s, n) = run({k: jnp.asarray(v) for k, v in batch.items() if k not in ("stats", "tile_mask")})
        return np.asarray(nll), (float(s), int(n))

    return f


# ------------------------------------------------------------------ (a) packed == alone
def test_packed_anyres_batch_gives_each_samples_loss(model, evaluate, tokenizer, records):
    cfg = model.config
    got = batches(records, tokenizer, pipeline_config(cfg))
    by_ids = {}
    for rec in records:
        ref, n = reference_sample(rec, tokenizer, cfg)
        by_ids[tuple(ref["input_ids"][0, :n])] = (rec["id"], ref, n)
    seen, shared_rows, worst = [], 0, 0.0
    for b in got:
        b = {k: v for k, v in b.items() if k != "stats"}
        assert "images" not in b and b["tiles"].shape[1:] == (3, 1 + cfg.max_tiles, S, S, 3)
        nll, _ = evaluate(b)
        for r in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][r]
            shared_rows += int(seg.max() >= 2)
            for k in range(1, int(seg.max()) + 1):
                sel = seg == k
                name, ref, n = by_ids[tuple(b["input_ids"][r][sel])]  # the pipeline's ids, exactly
                np.testing.assert_array_equal(b["targets"][r][sel], ref["targets"][0, :n])
                alone, (s_alone, n_alone) = evaluate(ref)
                assert (alone[0, :n] > 0).sum() == n_alone > 0 and not alone[0, n:].any()
                worst = max(worst, float(np.abs(alone[0, :n] - nll[r][sel]).max()))
                # the train loss function on this segment alone vs. inside the packed batch
                only = dict(b, targets=np.where(np.arange(len(b["targets"]))[:, None] == r,
                                                np.where(sel, b["targets"], IGNORE_INDEX), IGNORE_INDEX))
                _, (s_packed, n_packed) = evaluate(only)
                assert n_packed == n_alone
                np.testing.assert_allclose(s_packed, s_alone, rtol=2e-6, err_msg=name)
                seen.append(name)
    print(f"{len(seen)} segments, {shared_rows} shared rows: max |packed - alone| per-token loss = {worst:.2e}")
    assert sorted(seen) == sorted(r["id"] for r in records)  # every sample, once
    assert shared_rows >= 2  # rows really hold several samples (the two-image one, the text-only one)
    assert worst <= 1e-5


# ------------------------------------------------------------------ (b) vs LlavaNextProcessor
def test_pipeline_ids_and_pixels_equal_llava_next_processor(records, tmp_path):
    """A real byte-level tokenizer (Qwen2's: the text around an image tokenizes the same whole or
    in segments, so transformers' processor and the LLaVA tokenization rule agree): the sample's
    input_ids equal `LlavaNextProcessor`'s expansion of the same text and images, and its views
    are the processor's pixel values."""
    from transformers import LlavaNextProcessor

    tok, image_id = real_tokenizer("qwen2")
    cfg = anyres_config(image_id)
    proc = LlavaNextProcessor(image_processor=hf_image_processor(), tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    sp = SampleProcessor(tok, pipeline_config(cfg, template="qwen2"), image_id)
    checked = 0
    for rec in records:
        sample = sp(rec)
        assert "skip" not in sample, sample
        paths = rec.get("image_path") or []
        paths = [paths] if isinstance(paths, str) else paths
        text = tokenize_conversation(tok, "qwen2", rec["conversations"], image_id, 1)["text"]
        ref = proc(images=[Image.open(p) for p in paths] or None, text=text, return_tensors="np")
        np.testing.assert_array_equal(sample["input_ids"], ref["input_ids"][0], err_msg=rec["id"])
        for i, (views, (h, w)) in enumerate(zip(sample["images"], sample["image_sizes"])):
            assert (h, w) == tuple(ref["image_sizes"][i])
            n = anyres.num_views(h, w, cfg)
            ours = normalize(views[:n], cfg.image_processor.mean, cfg.image_processor.std).transpose(0, 3, 1, 2)
            np.testing.assert_allclose(ours, ref["pixel_values"][i, :n], atol=1e-6)
            assert not views[n:].any()
            checked += 1
    assert checked == 5


# ------------------------------------------------------------------ (c) jitted train steps
def test_jitted_train_steps_learn_and_trace_once(model, tokenizer, records):
    """The trainer's step function, jitted once, on pipeline batches of different images (token
    counts, grids), alternating two of them: the loss of each falls, and it traces once."""
    from train_util import optim_config

    got = batches(records, tokenizer, pipeline_config(model.config, num_epochs=None), n=2)
    arrays = [{k: jnp.asarray(v) for k, v in b.items() if k != "stats"} for b in got]
    assert not np.array_equal(arrays[0]["image_index"], arrays[1]["image_index"])
    graphdef, trainable, frozen = st.split_model(nnx.clone(model), [r".*"])
    # the whole model trains, the tower at a tenth of the rate (the LLaVA-NeXT stage-2 shape)
    tx, schedule = st.make_optimizer(optim_config(3e-3, group_lr=((r"vision/.*", 3e-4),)), 100, trainable)
    opt_state = tx.init(trainable)
    step_fn = st.make_train_step(graphdef, tx, schedule)
    traces = []

    def counted(*args):
        traces.append(1)
        return step_fn(*args)

    step = jax.jit(counted)
    losses = []
    for i in range(6):
        trainable, opt_state, m = step(trainable, opt_state, frozen, arrays[i % 2], jnp.asarray(i + 1, jnp.int32))
        losses.append(float(m["loss"]))
    print(f"train losses (batches 0, 1, 0, 1, ...): {[round(x, 3) for x in losses]}")
    assert len(traces) == 1
    assert np.isfinite(losses).all()
    assert losses[4] < 0.95 * losses[0] and losses[5] < 0.95 * losses[1]


# ------------------------------------------------------------------ (d) bad images
def test_broken_anyres_image_is_skipped_and_counted(tokenizer, records, tmp_path):
    cfg = anyres_config(tokenizer.convert_tokens_to_ids("<image>"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad = [{"id": "corrupt", "image_path": str(tmp_path / "broken.png"),
            "conversations": turns("<image>\nWhat?", "Nothing.")},
           {"id": "missing", "image_path": str(tmp_path / "nowhere.png"),
            "conversations": turns("<image>\nWhat?", "Nothing.")},
           {"id": "mismatch", "image_path": records[0]["image_path"], "conversations": turns("No image?", "No.")}]
    pcfg = pipeline_config(cfg, batch_size=1, drop_remainder=False)
    assert pickle.loads(pickle.dumps(SampleProcessor(tokenizer, pcfg, cfg.image_token_id))).cfg == pcfg  # workers
    got = batches(records[:2] + bad + records[2:], tokenizer, pcfg)
    stats = got[-1]["stats"]
    assert int(stats["total/skipped/image_corrupt"]) == 1
    assert int(stats["total/skipped/image_missing"]) == 1
    assert int(stats["total/skipped/image_mismatch"]) == 1
    assert int(stats["total/skipped"]) == 3
    assert int(stats["total/samples"]) == len(records)
    assert sum(int(b["stats"]["num_images"]) for b in got) == 5


# ------------------------------------------------------------------ view budget, batch spec
def test_view_budget_and_batch_spec(tokenizer, records):
    from llava_jax import build
    from llava_jax import sharding as shd
    from llava_jax.train.defaults import base_config

    cfg = anyres_config(tokenizer.convert_tokens_to_ids("<image>"))
    budget = 1 + cfg.max_tiles  # one image with the most tiles
    got = batches(records, tokenizer, pipeline_config(cfg, max_views_per_row=budget, drop_remainder=False))
    views = np.concatenate([b["tile_mask"].sum((-1, -2)) for b in got])
    assert views.max() <= budget
    assert sum(int(b["stats"]["num_views"]) for b in got) == views.sum()
    stats = got[-1]["stats"]
    # the two-image sample takes more views than the budget: skipped, counted as too many images
    tall, square = SHAPES["tall"], SHAPES["square"]
    assert anyres.num_views(*tall, cfg) + anyres.num_views(*square, cfg) > budget
    assert int(stats["total/skipped/too_many_images"]) == 1 and int(stats["total/samples"]) == len(records) - 1
    with pytest.raises(ValueError, match="max_views_per_row"):
        pipeline_config(cfg, max_views_per_row=budget - 1)

    c = base_config()
    c.data.max_length, c.data.max_images_per_row, c.train.global_batch = L, 3, 2
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    spec = build.batch_spec(c, cfg, mesh)
    batch = {k: v for k, v in got[0].items() if k != "stats"}
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in spec.items()} == \
        {k: (v.shape, v.dtype) for k, v in batch.items()}
