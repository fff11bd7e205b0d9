"""The Grain pipeline: batch format, determinism, epochs, checkpoint/restore (also with worker
processes), per-process shards, bad data skipped and counted, length policy, shapes world."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.data.images import preprocess_image_uint8
from llava_jax.data.packing import IGNORE_INDEX, ungroup
from llava_jax.data.pipeline import make_iterator, make_pipeline, make_sample_dataset
from llava_jax.data.pipeline_config import PipelineConfig
from llava_jax.data.skips import SKIP_REASONS
from llava_jax.data.tokenize import tokenize_conversation

T_IMG = 4  # image tokens per image in these tests
SIZE = 28


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        w, h = int(rng.integers(24, 40)), int(rng.integers(24, 40))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    # a tiny JPEG too
    Image.fromarray(rng.integers(0, 255, (30, 36, 3), dtype=np.uint8)).save(d / "j.jpg", quality=90)
    return d


def conv(*texts):
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


def make_records(image_dir, n=40, text_only_every=5):
    recs = []
    for i in range(n):
        img = i % text_only_every != 2
        q = f"Question {i}: what do you see?" + " Tell me more." * (i % 3)
        a = f"Answer {i}: a picture." + " It is nice." * (i % 4)
        recs.append({"id": f"r{i}", "source": "mem", "row": i,
                     "image_path": str(image_dir / f"{i % 40}.png") if img else None,
                     "conversations": conv(("<image>\n" if img else "") + q, a)})
    return recs


def cfg(**kw):
    base = dict(max_length=256, max_images_per_row=3, image_size=SIZE, num_image_tokens=T_IMG,
                template="vicuna_v1", batch_size=2, seed=0)
    base.update(kw)
    return PipelineConfig(**base)


def run(records, tokenizer, c, pi=0, pc=1, n=None, **kw):
    it = make_iterator(records, tokenizer, c, pi, pc, **kw)
    out = []
    try:
        for b in it:
            out.append(b)
            if n is not None and len(out) == n:
                break
    finally:
        it.close()
    return out, it


def flat(batch):
    out = {k: v for k, v in batch.items() if k != "stats"}
    out.update({"stats/" + k: v for k, v in batch["stats"].items()})
    return out


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        x, y = flat(x), flat(y)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def segments(batch):
    """(row, segment index k, token mask) for every packed sample of the batch."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for k in range(1, int(seg.max()) + 1):
            out.append((r, k, seg == k))
    return out


def reference(records, tokenizer, template="vicuna_v1"):
    """token ids (tuple) -> record, from the tokenizer directly."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ref = {}
    for rec in records:
        try:
            tok = tokenize_conversation(tokenizer, template, rec["conversations"], image_id, T_IMG)
        except ValueError:
            continue
        ref[tuple(tok["input_ids"])] = (rec, tok)
    return ref


# ---------------------------------------------------------------------------------------------


def test_batch_format_and_content(tokenizer, image_dir):
    recs = make_records(image_dir)
    batches, it = run(recs, tokenizer, cfg(drop_remainder=False))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ref = reference(recs, tokenizer)
    seen = []
    for b in batches:
        B, L, M = 2, 256, 3
        assert b["input_ids"].shape == (B, L) and b["input_ids"].dtype == np.int32 or b["input_ids"].shape[0] < B
        for k, dt in [("input_ids", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                      ("positions", np.int32), ("images", np.uint8), ("image_mask", np.bool_)]:
            assert b[k].dtype == dt, k
        assert b["images"].shape[1:] == (M, SIZE, SIZE, 3)
        st = b["stats"]
        assert set(f"total/skipped/{r}" for r in SKIP_REASONS) <= set(st)
        assert st["packing_efficiency"] == pytest.approx((b["segment_ids"] > 0).mean())
        assert int(st["num_samples"]) == len(segments(b))
        for r in range(b["input_ids"].shape[0]):
            seg, ids, tgt = b["segment_ids"][r], b["input_ids"][r], b["targets"][r]
            # targets are next tokens of the same segment
            t = np.flatnonzero(tgt != IGNORE_INDEX)
            assert (t + 1 < L).all() and (seg[t + 1] == seg[t]).all() and (tgt[t] == ids[t + 1]).all()
            assert (tgt[seg == 0] == IGNORE_INDEX).all() and (b["positions"][r][seg == 0] == 0).all()
            assert (ids == image_id).sum() == b["image_mask"][r].sum() * T_IMG
        slot = {}
        for r, k, m in segments(b):
            rec, tok = ref[tuple(b["input_ids"][r][m])]
            seen.append(rec["id"])
            np.testing.assert_array_equal(b["positions"][r][m], np.arange(m.sum()))
            s = slot.get(r, 0)
            if rec["image_path"]:
                # the k-th image span of the row is the k-th valid image slot
                want = preprocess_image_uint8(Image.open(rec["image_path"]), "pad", SIZE)
                np.testing.assert_array_equal(b["images"][r, s], want)
                slot[r] = s + 1
    assert sorted(seen) == sorted(r["id"] for r in recs)
    assert int(batches[-1]["stats"]["total/samples"]) == len(recs)
    assert it.skip_log.total == 0


def test_deterministic_seeded_and_reshuffled_per_epoch(tokenizer, image_dir):
    recs = make_records(image_dir, n=24)
    a, _ = run(recs, tokenizer, cfg(num_epochs=2, drop_remainder=False))
    b, _ = run(recs, tokenizer, cfg(num_epochs=2, drop_remainder=False))
    assert_batches_equal(a, b)
    c, _ = run(recs, tokenizer, cfg(num_epochs=2, drop_remainder=False, seed=1))
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    # two epochs: every record exactly twice, in a different order the second time
    ref = reference(recs, tokenizer)
    order = [ref[tuple(x["input_ids"][r][m])][0]["id"] for x in a for r, k, m in segments(x)]
    assert len(order) == 48 and all(order.count(r["id"]) == 2 for r in recs)
    assert int(a[-1]["stats"]["total/samples"]) == 48
    s_ds = make_sample_dataset(recs, tokenizer, cfg(num_epochs=2), 0, 1)
    ids = [x["id"] for e in s_ds for x in ungroup(e)]
    assert sorted(ids[:24]) == sorted(ids[24:]) and ids[:24] != ids[24:]


def test_unpacked_mode(tokenizer, image_dir):
    recs = make_records(image_dir, n=10)
    batches, _ = run(recs, tokenizer, cfg(pack=False, drop_remainder=False))
    assert sum(x["input_ids"].shape[0] for x in batches) == 10
    for x in batches:
        assert x["segment_ids"].max() == 1 and (x["segment_ids"][:, 0] == 1).all()
        assert (x["stats"]["num_samples"] == x["input_ids"].shape[0])


def test_forever_repeat(tokenizer, image_dir):
    recs = make_records(image_dir, n=6)
    batches, _ = run(recs, tokenizer, cfg(num_epochs=None, max_length=128), n=12)
    assert len(batches) == 12 and int(batches[-1]["stats"]["total/samples"]) > 12


@pytest.mark.parametrize("pack", [True, False])
def test_checkpoint_restore_in_process(tokenizer, image_dir, pack):
    recs = make_records(image_dir, n=30)
    c = cfg(num_epochs=2, pack=pack, batch_size=3, prefetch_batches=2)
    ref, _ = run(recs, tokenizer, c)
    assert len(ref) >= 8
    it = make_iterator(recs, tokenizer, c, 0, 1)
    for k in range(len(ref)):
        if k in (0, 1, 3, len(ref) // 2, len(ref) - 1):
            state = json.loads(json.dumps(it.get_state()))  # states are JSON-able
            rest, _ = run(recs, tokenizer, c, state=state)
            assert_batches_equal(rest, ref[k:])
        assert_batches_equal([next(it)], [ref[k]])
    it.close()


def test_checkpoint_restore_with_worker_processes(tokenizer, image_dir):
    """Workers: same batches as in-process decoding (the sample stream does not depend on the
    worker count), and a restored iterator continues exactly; a restore with another worker
    count fails loudly."""
    recs = make_records(image_dir, n=24)
    c0 = cfg(batch_size=2, pack_bins=2, read_threads=0)
    ref, _ = run(recs, tokenizer, c0)
    c2 = c0.replace(worker_count=2, worker_buffer_size=2)
    it = make_iterator(recs, tokenizer, c2, 0, 1)
    try:
        got = [next(it) for _ in range(3)]
        state = it.get_state()
        got += list(it)
    finally:
        it.close()
    assert_batches_equal(got, ref)
    rest, _ = run(recs, tokenizer, c2, state=state)
    assert_batches_equal(rest, ref[3:])
    with pytest.raises(ValueError, match="worker_count"):
        run(recs, tokenizer, c0, state=state)


def test_two_processes_get_disjoint_covering_shards(tokenizer, image_dir):
    recs = make_records(image_dir, n=33)
    c = cfg(drop_remainder=False)
    ids = [[x["id"] for e in make_sample_dataset(recs, tokenizer, c, pi, 2) for x in ungroup(e)] for pi in (0, 1)]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(r["id"] for r in recs)
    assert abs(len(ids[0]) - len(ids[1])) <= 1
    # and through the whole pipeline
    totals = [int(run(recs, tokenizer, c, pi, 2)[0][-1]["stats"]["total/samples"]) for pi in (0, 1)]
    assert sum(totals) == 33
    # 2 epochs: still disjoint per epoch
    c2 = c.replace(num_epochs=2)
    ids2 = [[x["id"] for e in make_sample_dataset(recs, tokenizer, c2, pi, 2) for x in ungroup(e)]
            for pi in (0, 1)]
    assert sorted(ids2[0] + ids2[1]) == sorted([r["id"] for r in recs] * 2)


class _RaisingSource:
    def __init__(self, recs, bad):
        self.recs, self.bad = recs, bad

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError("disk on fire")
        return self.recs[i]


def test_bad_data_is_skipped_and_counted(tokenizer, image_dir, tmp_path):
    good = make_records(image_dir, n=10)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 3)
    jpg = (image_dir / "j.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpg[: len(jpg) // 2])
    bad = [
        {"id": "corrupt", "image_path": str(corrupt), "conversations": conv("<image>\nQ?", "A.")},
        {"id": "truncated", "image_path": str(truncated), "conversations": conv("<image>\nQ?", "A.")},
        {"id": "badbytes", "image_path": None, "image_bytes": b"garbage", "conversations": conv("<image>\nQ?", "A.")},
        {"id": "missing", "image_path": str(tmp_path / "nope.png"), "conversations": conv("<image>\nQ?", "A.")},
        {"id": "malformed", "image_path": None, "conversations": [], "error": "bad_json: line 3"},
        {"id": "empty", "image_path": None, "conversations": []},
        {"id": "roles", "image_path": None, "conversations": conv("A.", "Q?")[::-1]},  # gpt first
        {"id": "noreply", "image_path": None, "conversations": conv("Q?")},
        {"id": "mismatch", "image_path": str(image_dir / "1.png"), "conversations": conv("no image token", "A.")},
        {"id": "mismatch2", "image_path": None, "conversations": conv("<image>\nQ?", "A.")},
        {"id": "toomany", "image_path": [str(image_dir / f"{i}.png") for i in range(4)],
         "conversations": conv("<image>" * 4 + "\nQ?", "A.")},
        "not a dict",
        {"id": "ok_bytes", "image_bytes": jpg, "conversations": conv("<image>\nFrom bytes?", "Yes.")},
        {"id": "ok_array", "image_bytes": np.frombuffer(jpg, np.uint8), "conversations": conv("<image>\nArray?", "Yes.")},
        {"id": "ok_two", "image_path": [str(image_dir / "5.png"), str(image_dir / "6.png")],
         "conversations": conv("<image><image>\nTwo?", "Yes.")},
    ]
    recs = good + bad
    for i, r in enumerate(recs):
        if isinstance(r, dict):
            r.setdefault("source", "mixed.json")
            r["row"] = i
    source = _RaisingSource(recs + [good[0]], bad=len(recs))  # the last index raises on read
    batches, it = run(source, tokenizer, cfg(drop_remainder=False))
    st = batches[-1]["stats"]
    counts = {r: int(st[f"total/skipped/{r}"]) for r in SKIP_REASONS}
    assert counts == {
        "malformed": 3,  # error record, not a dict, source raised
        "conversation": 3,  # empty, wrong roles, ends with a human turn
        "tokenize": 0,
        "image_missing": 1,
        "image_corrupt": 3,  # garbage file, truncated JPEG, garbage bytes
        "image_mismatch": 2,
        "too_many_images": 1,
        "too_long": 0,
        "no_targets": 0,
    }
    assert int(st["total/skipped"]) == 13
    assert int(st["total/samples"]) == 13  # 10 good + bytes + array + two images
    log = it.skip_log.summary()
    assert log["total"] == 13 and log["by_kind"]["image_corrupt"] == 3
    ex = log["examples"]["image_missing"][0]
    assert ex["source"] == "mixed.json" and ex["id"] == "missing" and "nope.png" in ex["reason"]
    assert any(e["id"] == str(len(recs)) and "disk on fire" in e["reason"] for e in log["examples"]["malformed"])


def test_length_policy(tokenizer, image_dir):
    long_answer = " ".join(["The answer is long."] * 60)
    recs = make_records(image_dir, n=8)
    recs.append({"id": "long_text", "source": "m", "row": 8, "image_path": str(image_dir / "3.png"),
                 "conversations": conv("<image>\nQ?", long_answer)})
    recs.append({"id": "long_prompt", "source": "m", "row": 9, "image_path": str(image_dir / "4.png"),
                 "conversations": conv("<image>\n" + " ".join(["Question?"] * 200), "A.")})
    # an image in a later turn, beyond the cut (the first reply is supervised before it)
    recs.append({"id": "late_image", "source": "m", "row": 10, "image_path": str(image_dir / "5.png"),
                 "conversations": conv(" ".join(["Q?"] * 150), "A.", "<image>\nAnd now?", "B.")})
    c = cfg(max_length=192, drop_remainder=False)
    ref = reference(recs, tokenizer)
    lengths = {rec["id"]: len(tok["input_ids"]) for rec, tok in ref.values()}
    assert all(lengths[r["id"]] <= 192 for r in recs[:8]) and all(lengths[r["id"]] > 192 for r in recs[8:])
    drop, _ = run(recs, tokenizer, c)
    st = drop[-1]["stats"]
    assert int(st["total/skipped/too_long"]) == 3 and int(st["total/samples"]) == 8
    trunc, _ = run(recs, tokenizer, c.replace(length_policy="truncate"))
    st = trunc[-1]["stats"]
    # long_text is truncated after its image; long_prompt has nothing supervised before the cut;
    # late_image's cut falls in/before its image: both dropped
    assert int(st["total/skipped/too_long"]) == 2 and int(st["total/samples"]) == 9
    assert int(st["total/truncated"]) == 1
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    found = False
    for b in trunc:
        for r, k, m in segments(b):
            ids = b["input_ids"][r][m]
            assert len(ids) <= 192
            assert (ids == image_id).sum() % T_IMG == 0
            if len(ids) == 192:  # the truncated sample: its image is whole, text cut, targets ok
                found = True
                assert (ids == image_id).sum() == T_IMG
                tg = b["targets"][r][m]
                assert tg[-1] == IGNORE_INDEX and (tg != IGNORE_INDEX).sum() > 0
    assert found


def test_all_bad_data_with_repeat_raises_not_hangs(tokenizer, image_dir):
    recs = [{"id": str(i), "source": "m", "row": i, "image_path": None, "conversations": [], "error": "bad_json"}
            for i in range(4)]
    with pytest.raises(RuntimeError, match="every record is being skipped"):
        run(recs, tokenizer, cfg(num_epochs=None), n=1)


def _bad_rows(n, start=0):
    return [{"id": f"bad{i}", "source": "m", "row": i, "image_path": None, "conversations": [], "error": "bad_json"}
            for i in range(start, start + n)]


def test_one_usable_row_in_51_trains_across_epoch_boundaries(tokenizer, image_dir):
    """Reshuffled per epoch, the usable row can come first in one epoch and last in the next:
    ~100 skipped rows in a row, which tripped a guard set at one epoch (51). The guard counts
    skipped rows against twice a shard's epoch; every skip is still counted and logged."""
    recs = make_records(image_dir, n=1) + _bad_rows(50, start=1)
    batches, it = run(recs, tokenizer, cfg(num_epochs=8, batch_size=1, drop_remainder=False))
    st = batches[-1]["stats"]
    assert int(st["total/samples"]) == 8 and int(st["total/skipped/malformed"]) == 400
    assert it.skip_log.summary()["total"] == 400


def test_all_bad_data_in_a_single_epoch_raises_at_its_end(tokenizer):
    """Once through data with no usable row (the guard's run of skips never gets long enough)
    used to end quietly with nothing trained."""
    from llava_jax.data.skips import NoTrainingData

    with pytest.raises(NoTrainingData, match=r"no usable sample in 6 rows: every record is being skipped"):
        run(_bad_rows(6), tokenizer, cfg(num_epochs=1))


def test_no_rows_at_all_is_an_error_before_reading(tokenizer):
    from llava_jax.data.skips import NoTrainingData

    with pytest.raises(NoTrainingData, match="the training data has no rows"):
        make_iterator([], tokenizer, cfg())


def test_step_estimate_packs_like_training(tokenizer):
    """`build.estimate_num_steps` (the schedule length when `train.num_steps` is -1) probes the
    data with the training run's packing window: on unshuffled data it counts exactly the rows
    the real iterator packs. (A probe with one open row counted 47 rows here instead of 43, and
    ~14% too many steps on the demo, so the cosine schedule was cut short.)"""
    import math

    from llava_jax.build import estimate_num_steps

    r = np.random.default_rng(1)
    records = [{"id": f"v{i}", "source": "mem", "row": i, "image_path": None,
                "conversations": conv("Tell me something.", " ".join(["ok"] * int(r.integers(1, 8))))}
               for i in range(60)]
    c = cfg(batch_size=4, num_epochs=1, max_length=128, shuffle=False, drop_remainder=False)
    batches, _ = run(records, tokenizer, c)
    rows = sum(int((np.asarray(b["segment_ids"]) > 0).any(axis=-1).sum()) for b in batches)
    assert rows < len(records)  # the samples really are packed
    assert estimate_num_steps(records, tokenizer, c, num_epochs=1, global_batch=1, probe=60) == rows
    assert estimate_num_steps(records, tokenizer, c, num_epochs=3, global_batch=4, probe=60) == math.ceil(3 * rows / 4)


def test_config_errors(tokenizer, image_dir):
    with pytest.raises(ValueError, match="length_policy"):
        cfg(length_policy="cut")
    with pytest.raises(ValueError, match="image_mode"):
        cfg(image_mode="stretch")
    with pytest.raises(KeyError):
        cfg(template="nope")
    with pytest.raises(ValueError, match="image_token_id"):
        make_pipeline(make_records(image_dir, 2), tokenizer, cfg(image_token_id=5), 0, 1)


def _shapes_world(tmp_path_factory):
    from llava_jax.demo.dataset import generate

    root = tmp_path_factory.mktemp("shapes")
    generate(root, num_train=40, num_eval=4, seed=0, image_size=32)
    return root


@pytest.mark.parametrize("stage,template,workers", [("stage1", "plain", 1), ("stage2", "vicuna_v1", 0)])
def test_shapes_world_end_to_end(tokenizer, tmp_path_factory, stage, template, workers):
    from llava_jax.data.sources import LlavaJsonSource

    root = _shapes_world(tmp_path_factory)
    src = LlavaJsonSource(root / f"{stage}.json", image_folder=root / "images")
    c = cfg(template=template, max_length=512 if stage == "stage2" else 128, max_images_per_row=4,
            batch_size=4, drop_remainder=False, image_decode="exact", worker_count=workers)
    batches, it = run(src, tokenizer, c)
    st = batches[-1]["stats"]
    assert int(st["total/skipped"]) == 0, it.skip_log.summary()
    assert int(st["total/samples"]) == len(src)
    n_img = sum(int(b["image_mask"].sum()) for b in batches)
    assert n_img == 40  # every train image exactly once (stage 2 also has text-only rows)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for b in batches:
        assert ((b["input_ids"] == image_id).sum(-1) == b["image_mask"].sum(-1) * T_IMG).all()
        assert (b["targets"] != IGNORE_INDEX).sum() > 0
    eff = float(np.mean([b["stats"]["packing_efficiency"] for b in batches]))
    print(f"{stage}: {len(src)} rows -> {sum(b['input_ids'].shape[0] for b in batches)} packed rows, "
          f"mean packing efficiency {eff:.2f}")


def test_data_bench_smoke(capsys):
    from llava_jax.tools import data_bench

    res = data_bench.main(["--num-images", "3", "--rounds", "1", "--worker-counts", "0", "--modes", "fast",
                           "--measure", "8", "--warmup", "4", "--source-rows", "12", "--size", "56",
                           "--num-image-tokens", "16", "--max-length", "256", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "original LLaVA image path" in out and "vs original" in out and "CPU:" in out
    assert res["single_core_samples_per_s"]["original"]["samples_per_s"] > 0
    assert res["pipeline"]["fast/0"]["samples_per_s"] > 0
    # "exact" equals transformers' CLIPImageProcessorPil (at 56 px "fast" already drafts 640x480)
    assert res["exactness"]["exact"]["float_max_vs_transformers"] < 1e-5


def test_pipeline_config_from_a_training_config_takes_every_data_field():
    """`config.data` is the one source of the trainer's pipeline settings: every field it shares
    with PipelineConfig arrives (no hand-kept list of fields), the geometry comes from the model."""
    from llava_jax.presets import llava_1_5_7b
    from llava_jax.train.defaults import base_config

    d = base_config().data
    d.update(template="vicuna_v1", image_mode="pad", max_length=999, max_images_per_row=3, pack=False, seed=7,
             shuffle=False, num_epochs=2, worker_count=1, length_policy="truncate")
    pcfg = PipelineConfig.from_config(d, llava_1_5_7b(), batch_size=5)
    for key in ("template", "image_mode", "max_length", "max_images_per_row", "pack", "seed", "shuffle", "num_epochs",
                "worker_count", "length_policy"):
        assert getattr(pcfg, key) == d[key], key
    assert (pcfg.image_size, pcfg.num_image_tokens, pcfg.image_token_id, pcfg.batch_size) == (336, 576, 32000, 5)
