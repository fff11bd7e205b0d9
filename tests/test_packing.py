"""Packing: shifted targets, length policy, first-fit rows, checkpointable packer, and the model
check that a packed batch gives the same per-token loss as its samples run alone (no leaks)."""
from __future__ import annotations

import numpy as np
import pytest

import grain

from llava_jax.data.packing import (
    IGNORE_INDEX,
    PackIterDataset,
    RowSpec,
    apply_length_policy,
    batch_rows,
    build_row,
    group_elements,
    shift_labels,
    ungroup,
)
from llava_jax.data.skips import SKIP_REASONS, DropSample

IMG = 7  # image token id in the pure-numpy tests
T = 3  # tokens per image in the pure-numpy tests


# ---------------------------------------------------------------------------------------------
# Pure numpy pieces
# ---------------------------------------------------------------------------------------------


def test_shift_labels():
    lab = np.array([-100, -100, 5, 6, -100, 8], np.int32)
    np.testing.assert_array_equal(shift_labels(lab), [-100, 5, 6, -100, 8, -100])


def _sample(ids, labels, n_img=0, value=0):
    ids = np.asarray(ids, np.int32)
    return {
        "input_ids": ids,
        "targets": shift_labels(np.asarray(labels, np.int32)),
        "images": np.full((n_img, 2, 2, 3), value, np.uint8),
    }


def test_length_policy_drop_and_truncate():
    # [bos, img x3, prompt, prompt, reply x4]: supervised from index 6 on.
    ids = np.array([1, IMG, IMG, IMG, 20, 21, 30, 31, 32, 33], np.int32)
    lab = np.array([-100] * 6 + [30, 31, 32, 33], np.int32)
    out_ids, tgt, trunc = apply_length_policy(ids, lab, 10, "drop", IMG)
    assert not trunc and len(out_ids) == 10 and tgt[-1] == IGNORE_INDEX
    with pytest.raises(DropSample) as e:
        apply_length_policy(ids, lab, 9, "drop", IMG)
    assert e.value.reason == "too_long"
    # truncate after the image, supervised tokens remain: targets of the cut text are gone.
    out_ids, tgt, trunc = apply_length_policy(ids, lab, 8, "truncate", IMG)
    assert trunc
    np.testing.assert_array_equal(out_ids, ids[:8])
    np.testing.assert_array_equal(tgt, [-100, -100, -100, -100, -100, 30, 31, -100])
    # the cut would leave no supervised target (cut before the 2nd reply token): drop.
    with pytest.raises(DropSample) as e:
        apply_length_policy(ids, lab, 6, "truncate", IMG)
    assert e.value.reason == "too_long"
    # the cut falls inside the image span: drop, never a cut image.
    with pytest.raises(DropSample) as e:
        apply_length_policy(ids, lab, 3, "truncate", IMG)
    assert e.value.reason == "too_long" and "image" in str(e.value)
    # an image beyond the cut is never cut off, even when supervised tokens precede it.
    ids2 = np.array([1, 30, 31, 20, IMG, IMG, IMG, 40], np.int32)
    lab2 = np.array([-100, 30, 31, -100, -100, -100, -100, 40], np.int32)
    with pytest.raises(DropSample, match="image"):
        apply_length_policy(ids2, lab2, 6, "truncate", IMG)
    # fits but supervises nothing.
    with pytest.raises(DropSample) as e:
        apply_length_policy(ids, np.full_like(lab, -100), 16, "drop", IMG)
    assert e.value.reason == "no_targets"


def test_build_row_layout():
    spec = RowSpec(max_length=12, max_images=3, image_shape=(2, 2, 3), pad_token_id=0)
    a = _sample([1, IMG, IMG, IMG, 9], [-100, -100, -100, -100, 9], n_img=1, value=11)
    b = _sample([1, 5, 6], [-100, 5, 6])
    c = _sample([1, IMG, IMG, IMG], [-100] * 4, n_img=1, value=22)
    row = build_row([a, b, c], spec)
    np.testing.assert_array_equal(row["input_ids"], [1, IMG, IMG, IMG, 9, 1, 5, 6, 1, IMG, IMG, IMG])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3])
    # targets: shifted inside each segment, -100 at every segment end (no cross-segment target)
    np.testing.assert_array_equal(row["targets"], [-100, -100, -100, 9, -100, 5, 6, -100, -100, -100, -100, -100])
    np.testing.assert_array_equal(row["image_mask"], [True, True, False])
    assert row["images"][0].max() == 11 and row["images"][1].min() == 22 and row["images"][2].max() == 0
    with pytest.raises(ValueError, match="overflow"):
        build_row([a, a, a], spec)


# ---------------------------------------------------------------------------------------------
# The Grain packer
# ---------------------------------------------------------------------------------------------


def _stream(n=60, seed=0, skip_every=7):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if skip_every and i % skip_every == 3:
            out.append({"skip": SKIP_REASONS[i % len(SKIP_REASONS)], "source": "s", "row": i, "id": str(i),
                        "detail": "x"})
            continue
        k = int(rng.integers(0, 3))
        text = int(rng.integers(2, 12))
        ids = np.concatenate([[1], np.full(k * T, IMG), rng.integers(10, 99, text)]).astype(np.int32)
        lab = np.where(np.arange(len(ids)) > k * T + 1, ids, -100).astype(np.int32)
        s = _sample(ids, lab, n_img=k, value=i)
        s["id"] = str(i)
        out.append(s)
    return out


class _Log:
    def __init__(self):
        self.rows = []

    def record(self, source, row, id, reason):  # noqa: A002
        self.rows.append((source, row, id, reason))


def _packed(stream, bins=3, max_length=24, max_images=3, batch=2, log=None, max_segments=None, group=1):
    spec = RowSpec(max_length=max_length, max_images=max_images, image_shape=(2, 2, 3),
                   max_segments=max_segments)
    ds = grain.MapDataset.source(stream)
    if group > 1:
        ds = ds.batch(group, batch_fn=group_elements)
    ds = ds.to_iter_dataset()
    ds = PackIterDataset(ds, spec, bins, skip_log=log)
    return ds.batch(batch, drop_remainder=False, batch_fn=batch_rows)


def _flat(batch):
    out = {k: v for k, v in batch.items() if k != "stats"}
    out.update({"stats/" + k: v for k, v in batch["stats"].items()})
    return out


def _assert_same(a, b):
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_packer_rows_are_valid_and_complete():
    stream = _stream()
    log = _Log()
    batches = list(_packed(stream, log=log))
    samples = [s for s in stream if "skip" not in s]
    n_seg = sum(int(b["stats"]["num_samples"]) for b in batches)
    assert n_seg == len(samples)
    last = batches[-1]["stats"]
    assert int(last["total/samples"]) == len(samples)
    n_skips = len(stream) - len(samples)
    assert int(last["total/skipped"]) == n_skips == len(log.rows)
    for r in SKIP_REASONS:
        assert int(last[f"total/skipped/{r}"]) == sum(1 for s in stream if s.get("skip") == r)
    # every sample appears once, intact, with its images in token order
    by_id = {s["id"]: s for s in samples}
    seen = set()
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            seg, ids, img_slot = b["segment_ids"][r], b["input_ids"][r], 0
            assert (b["input_ids"][r][seg == 0] == 0).all()
            assert b["stats"]["row_efficiency"][r] == pytest.approx((seg > 0).mean())
            for k in range(1, seg.max() + 1):
                piece = ids[seg == k]
                match = [i for i, s in by_id.items() if np.array_equal(s["input_ids"], piece) and i not in seen]
                assert match, "segment does not match any sample"
                s = by_id[match[0]]
                seen.add(match[0])
                np.testing.assert_array_equal(b["targets"][r][seg == k], s["targets"])
                np.testing.assert_array_equal(b["positions"][r][seg == k], np.arange(len(piece)))
                for j in range(len(s["images"])):
                    assert b["image_mask"][r, img_slot]
                    np.testing.assert_array_equal(b["images"][r, img_slot], s["images"][j])
                    img_slot += 1
            assert b["image_mask"][r].sum() == img_slot
            assert (ids == IMG).sum() == img_slot * T
    assert len(seen) == len(samples)
    eff = [float(b["stats"]["packing_efficiency"]) for b in batches]
    print("packing efficiency per batch:", np.round(eff, 3))


def test_unpacked_and_max_segments():
    stream = _stream(skip_every=0)
    for b in _packed(stream, bins=1, max_segments=1):
        assert b["segment_ids"].max() <= 1
        assert (b["stats"]["num_samples"] == b["input_ids"].shape[0])
    for b in _packed(stream, bins=4, max_segments=2):
        assert b["segment_ids"].max() <= 2


def test_packing_is_deterministic_and_denser_with_more_bins():
    stream = _stream(200, skip_every=0)
    a, b = list(_packed(stream, bins=4)), list(_packed(stream, bins=4))
    for x, y in zip(a, b, strict=True):
        _assert_same(x, y)
    rows = {k: sum(x["input_ids"].shape[0] for x in _packed(stream, bins=k)) for k in (1, 4)}
    assert rows[4] < rows[1]


def test_group_roundtrip_and_same_rows():
    stream = _stream(40)
    back = [x for g in (group_elements(stream[i : i + 6]) for i in range(0, 40, 6)) for x in ungroup(g)]
    assert len(back) == len(stream)
    for a, b in zip(stream, back):
        assert a.keys() - {"truncated"} <= b.keys() | {"detail"}
        for k, v in a.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(v, b[k])
            else:
                assert b[k] == v
    for x, y in zip(_packed(stream), _packed(stream, group=5), strict=True):
        _assert_same(x, y)


@pytest.mark.parametrize("bins,group", [(1, 1), (3, 1), (3, 4)])
def test_packer_checkpoint_restore_at_every_step(bins, group):
    stream = _stream(50)
    ds = _packed(stream, bins=bins, group=group)
    ref = list(ds)
    it = iter(ds)
    for k in range(len(ref)):
        state = it.get_state()
        log = _Log()
        it2 = iter(_packed(stream, bins=bins, log=log, group=group))
        it2.set_state(state)
        rest = list(it2)
        assert len(rest) == len(ref) - k
        for x, y in zip(rest, ref[k:]):
            _assert_same(x, y)
        # skips consumed before the checkpoint are not logged again by the restored iterator
        later_skips = int(ref[-1]["stats"]["total/skipped"]) - (int(ref[k - 1]["stats"]["total/skipped"]) if k else 0)
        assert len(log.rows) <= later_skips
        _assert_same(next(it), ref[k])


def test_all_skipped_raises_instead_of_hanging():
    stream = [{"skip": "malformed", "source": "s", "row": i, "id": str(i), "detail": "bad"} for i in range(5)]
    spec = RowSpec(max_length=8, max_images=1, image_shape=(2, 2, 3))
    ds = grain.MapDataset.source(stream).repeat(None).to_iter_dataset()
    ds = PackIterDataset(ds, spec, 2, skip_log=_Log(), max_consecutive_skips=5)
    with pytest.raises(RuntimeError, match="every record is being skipped"):
        next(iter(ds))


# ---------------------------------------------------------------------------------------------
# Model check: packed per-token loss == samples alone; no attention leaks between segments
# ---------------------------------------------------------------------------------------------

VOCAB = 832  # covers the 800-token test tokenizer + <image> (800) + <pad> (801)


# Each LLM backbone: Mistral with a sliding window (6) shorter than every packed sample, so the
# window runs inside segments while the segment boundary still cuts it off.
BACKBONE_TEXT = {"llama": {}, "qwen2": {}, "mistral": {"sliding_window": 6}}
# The model fixture's cases: each LLM with CLIP, and the SigLIP tower ("full" features: the 4
# patches of 28 px / 14, no class token) with Qwen2 (LLaVA-OneVision's pairing).
MODELS = {name: (name, "clip") for name in BACKBONE_TEXT} | {"siglip_qwen2": ("qwen2", "siglip")}


def make_hf_llava_for_tokenizer(image_token_id: int, vocab_size: int = VOCAB, seed: int = 0, text_type: str = "llama",
                                vision_type: str = "clip"):
    """A tiny random transformers LLaVA whose vocab covers the test tokenizer (hf_util's configs
    use vocab 128-160 and image token 100), on the `text_type` LLM architecture and the
    `vision_type` tower (clip, features -2 / "default"; siglip, -1 / "full")."""
    import torch
    from transformers import (CONFIG_MAPPING, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              SiglipVisionConfig)

    siglip = vision_type == "siglip"
    vc = (SiglipVisionConfig if siglip else CLIPVisionConfig)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14)
    tc = CONFIG_MAPPING[text_type](vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, **BACKBONE_TEXT[text_type])
    features = dict(vision_feature_layer=-1, vision_feature_select_strategy="full") if siglip else dict(
        vision_feature_layer=-2)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_token_id, **features)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tokenizer, tmp_path_factory):
    pytest.importorskip("torch")
    import llava_jax

    text_type, vision_type = MODELS[request.param]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert len(tokenizer) <= VOCAB
    hf = make_hf_llava_for_tokenizer(image_id, text_type=text_type, vision_type=vision_type)
    d = tmp_path_factory.mktemp("tiny_llava")
    hf.save_pretrained(d)
    m = llava_jax.from_pretrained(d, image_token_id=image_id)
    assert m.config.image_token_id == image_id and m.config.num_image_tokens == 4
    assert m.config.text.model_type == text_type and m.config.vision.is_siglip == (vision_type == "siglip")
    assert m.config.text.sliding_window == BACKBONE_TEXT[text_type].get("sliding_window")
    return m


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    words = ["red circle", "blue square", "green star", "a small cat", "two dogs", "the big tree"]
    recs = []
    for i in range(12):
        w, h = int(rng.integers(26, 34)), int(rng.integers(26, 34))
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        q = f"What is shown in picture {i}?" + " Describe it." * int(i % 3)
        a = f"It shows {words[i % len(words)]} number {i}." + " It is nice." * int(i % 2)
        has_image = i % 4 != 3
        recs.append({
            "id": f"r{i}", "source": "test", "row": i,
            "image_path": str(p) if has_image else None,
            "conversations": [{"from": "human", "value": ("<image>\n" if has_image else "") + q},
                              {"from": "gpt", "value": a}],
        })
    return recs


def _cfg(**kw):
    from llava_jax.data.pipeline_config import PipelineConfig

    base = dict(max_length=256, max_images_per_row=3, image_size=28, num_image_tokens=4, template="vicuna_v1",
                batch_size=2, pack_bins=2, seed=0, shuffle=False, prefetch_batches=0)
    base.update(kw)
    return PipelineConfig(**base)


def _nll(logits, targets):
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    safe = np.where(targets == IGNORE_INDEX, 0, targets)
    tgt = np.take_along_axis(logits, safe[..., None], -1)[..., 0]
    return np.where(targets == IGNORE_INDEX, 0.0, logz - tgt)


def _forward(model, batch):
    import jax.numpy as jnp

    logits = model(input_ids=jnp.asarray(batch["input_ids"]), images=jnp.asarray(batch["images"]),
                   image_mask=jnp.asarray(batch["image_mask"]), positions=jnp.asarray(batch["positions"]),
                   segment_ids=jnp.asarray(batch["segment_ids"]))
    return np.asarray(logits, np.float32)


def _forward_alone(model, ids, images):
    import jax.numpy as jnp

    ids = jnp.asarray(ids[None])
    if len(images):
        return np.asarray(model(input_ids=ids, images=jnp.asarray(images[None]),
                                image_mask=jnp.ones((1, len(images)), bool)), np.float32)[0]
    return np.asarray(model(input_ids=ids), np.float32)[0]


def _packed_batch(records, tokenizer):
    from llava_jax.data.pipeline import make_iterator

    it = make_iterator(records, tokenizer, _cfg(), 0, 1)
    try:
        for b in it:
            if b["segment_ids"].max() >= 3 and b["image_mask"].sum(-1).max() >= 2:
                return b
    finally:
        it.close()
    raise AssertionError("no batch with a densely packed row")


def test_packed_loss_equals_samples_alone(model, tokenizer, records):
    from llava_jax.data.tokenize import tokenize_conversation

    batch = _packed_batch(records, tokenizer)
    stats = batch.pop("stats")
    assert stats["num_samples"] >= 4
    nll = _nll(_forward(model, batch), batch["targets"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    # reference token ids per record, straight from the tokenizer (not from the pipeline)
    ref = {}
    for r in records:
        tok = tokenize_conversation(tokenizer, "vicuna_v1", r["conversations"], image_id, 4)
        ref[tuple(tok["input_ids"])] = (r, tok)
    worst, n_seg = 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][row]
        slot = 0
        for k in range(1, seg.max() + 1):
            sel = seg == k
            ids = batch["input_ids"][row][sel]
            rec, tok = ref[tuple(ids)]
            k_img = int(tok["num_images"])
            imgs = batch["images"][row, slot : slot + k_img]
            slot += k_img
            # the pipeline's targets are the shifted labels of this very sample
            np.testing.assert_array_equal(batch["targets"][row][sel], shift_labels(tok["labels"]))
            alone = _nll(_forward_alone(model, ids, imgs), batch["targets"][row][sel])
            assert (alone > 0).sum() == (batch["targets"][row][sel] != IGNORE_INDEX).sum()
            worst = max(worst, float(np.abs(alone - nll[row][sel]).max()))
            n_seg += 1
    print(f"{n_seg} segments: max |packed - alone| per-token loss = {worst:.2e}")
    assert n_seg >= 4
    assert worst <= 1e-5


def test_no_attention_leak_between_segments(model, tokenizer, records):
    batch = _packed_batch(records, tokenizer)
    batch.pop("stats")
    base = _forward(model, batch)
    seg = batch["segment_ids"]
    row = int(np.argmax(seg.max(-1)))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    # perturb segment 2 of that row: its text tokens and its image(s)
    victim = seg[row] == 2
    pert = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(1)
    text = victim & (pert["input_ids"][row] != image_id)
    pert["input_ids"][row][text] = rng.integers(3, 700, int(text.sum()))
    n_before = int((batch["input_ids"][row][seg[row] < 2] == image_id).sum()) // 4
    n_victim = int((batch["input_ids"][row][victim] == image_id).sum()) // 4
    pert["images"][row, n_before : n_before + n_victim] = rng.integers(0, 255, pert["images"][row, :n_victim].shape)
    out = _forward(model, pert)
    others = (seg[row] != 2) & (seg[row] > 0)
    assert np.abs(out[row][victim] - base[row][victim]).max() > 1e-3  # the perturbation matters
    np.testing.assert_allclose(out[row][others], base[row][others], atol=1e-6, rtol=0)
    other_rows = [r for r in range(seg.shape[0]) if r != row]
    np.testing.assert_allclose(out[other_rows], base[other_rows], atol=1e-6, rtol=0)
