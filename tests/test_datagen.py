"""Instruction-data generation, offline parts: annotations (JSONL + COCO), prompts and the context
format (the 80 reference annotations render with every caption and box), reply parsing and
validation, rows, the template backend, and the stage-1 builder with noun-phrase filtering."""
import json
from collections import Counter

import pytest

from conftest import SHARED
from llava_jax.datagen import offline
from llava_jax.datagen.annotations import Annotation, Instance, load_coco, load_jsonl
from llava_jax.datagen.parse import DETAIL_INSTRUCTIONS, Rejected, make_row, parse_reply, reply_to_row
from llava_jax.datagen.prompts import (TASKS, canonical_task, load_prompts, parse_context,
                                       render_context, write_builtin_prompts)
from llava_jax.datagen.runner import SettingsMismatch, generate
from llava_jax.datagen.backends import TemplateBackend

REF = SHARED / "caps_boxes_coco2014_val_80.jsonl"


def ref_annotations():
    if not REF.exists():
        pytest.skip(f"reference annotations not found at {REF} (../shared/llava_reference is absent)")
    errors = []
    anns = load_jsonl(REF, errors)
    assert not errors
    return anns


def raw_ref_rows():
    return [json.loads(line) for line in REF.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- context / prompts

def test_reference_annotations_render_every_caption_and_box():
    anns = ref_annotations()
    raw = raw_ref_rows()
    assert len(anns) == 80
    prompts = load_prompts(TASKS)
    n_boxes = 0
    for ann, row in zip(anns, raw):
        for task in TASKS:
            msgs = prompts[task].messages(render_context(ann))
            assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * len(prompts[task].examples) + ["user"]
            ctx = msgs[-1]["content"]
            for cap in row["captions"]:  # every caption, whitespace collapsed
                assert " ".join(cap.split()) in ctx
            lines = ctx.split("\n")
            for inst in row["instances"]:  # every box, on its own line, 3 decimals
                line = f"{inst['category']}: [" + ", ".join(f"{v:.3f}" for v in inst["bbox"]) + "]"
                assert line in lines, line
            # and nothing else: the context parses back to exactly the annotation
            caps, insts = parse_context(ctx)
            assert caps == [" ".join(c.split()) for c in row["captions"]]
            assert [(i.category, list(i.bbox)) for i in insts] == [(i["category"], i["bbox"]) for i in row["instances"]]
        n_boxes += len(row["instances"])
        if not row["instances"]:
            assert "(none listed)" in render_context(ann)
    assert n_boxes > 300


def test_box_rounding_is_documented_fixed_decimals():
    ann = Annotation("x", "x.jpg", ("a cat",), (Instance("cat", (0.1, 0.33333, 0.5, 1.2)),
                                                 Instance("dog", (-0.0, 0.0004, 0.9996, 0.25)),))
    ctx = render_context(ann)
    assert "cat: [0.100, 0.333, 0.500, 1.000]" in ctx  # clipped to [0, 1]
    assert "dog: [0.000, 0.000, 1.000, 0.250]" in ctx
    assert "cat: [0.10, 0.33, 0.50, 1.00]" in render_context(ann, decimals=2)


def test_builtin_prompts_are_ours_and_consistent():
    prompts = load_prompts(TASKS)
    assert set(prompts) == set(TASKS)
    for task, p in prompts.items():
        assert len(p.examples) >= 2 and len(p.system) > 400
        assert "caption" in p.system and "box" in p.system
        for caps, conv in p.examples:
            c, insts = parse_context(caps)  # few-shot contexts use the live context format
            assert render_context(Annotation("e", "e.jpg", tuple(c), tuple(insts))) == caps
            pairs = parse_reply(task, conv)  # and our own examples pass our own validation
            assert pairs and all(q or task == "detail" for q, _ in pairs)
    # conversation examples: several exchanges; complex: exactly one
    assert all(len(parse_reply("conversation", c)) >= 3 for _, c in prompts["conversation"].examples)


def test_prompt_folder_swap_aliases_and_single_folder(tmp_path):
    d = write_builtin_prompts(tmp_path / "mine")
    (d / "detail").rename(d / "detail_description")  # the original release's folder name
    (d / "detail_description" / "system_message.txt").write_text("Describe it. Do it well.\n")
    (d / "detail_description" / "002_caps.txt").write_text((d / "conversation" / "000_caps.txt").read_text())
    (d / "detail_description" / "002_conv.txt").write_text("A cat rests on a kitchen counter beside a bowl.")
    p = load_prompts(["detail", "conv"], d)
    assert p["detail"].system == "Describe it. Do it well."
    assert len(p["detail"].examples) == 3
    assert p["detail"].sha256 != load_prompts(["detail"])["detail"].sha256
    assert p["conversation"].sha256 == load_prompts(["conversation"])["conversation"].sha256
    single = load_prompts(["complex"], d / "complex")
    assert single["complex"].system == load_prompts(["complex"])["complex"].system
    with pytest.raises(ValueError, match="single prompt"):
        load_prompts(["complex", "detail"], d / "complex")
    (d / "complex" / "005_conv.txt").write_text("orphan")
    with pytest.raises(FileNotFoundError, match="005_conv"):
        load_prompts(["complex"], d)
    with pytest.raises(ValueError, match="unknown generation type"):
        canonical_task("summary")
    assert canonical_task("complex_reasoning") == "complex"


# ----------------------------------------------------------------------------- parsing

CONV = "Question:\nWhat is on the table?\n===\nAnswer:\nA bowl of fruit.\n===\nQuestion:\nHow many cups?\n===\nAnswer:\nTwo cups."


def test_parse_conversation_formats():
    assert parse_reply("conversation", CONV) == [("What is on the table?", "A bowl of fruit."),
                                                 ("How many cups?", "Two cups.")]
    loose = "**Question 1:** What is on the table?\n**Answer 1:** A bowl of fruit.\n\nQ: How many cups?\nA: Two cups.\n"
    assert parse_reply("conversation", loose) == parse_reply("conversation", CONV)
    multi = "Question:\nWhy?\nAnswer:\nFirst line.\n\nSecond paragraph."
    assert parse_reply("complex", multi) == [("Why?", "First line.\n\nSecond paragraph.")]


@pytest.mark.parametrize("task,text,finish,reason", [
    ("conversation", "", None, "empty"),
    ("conversation", "  \n===\n ", None, "empty"),
    ("detail", None, None, "empty"),
    ("conversation", CONV, "length", "truncated"),
    ("conversation", "I'm sorry, but I can't help with that.", None, "refusal"),
    ("detail", "As an AI language model I cannot see images.", None, "refusal"),
    ("conversation", "Sure! Here are some questions.", None, "malformed"),
    ("conversation", "Question:\nWhat is it?\n===\nQuestion:\nAnd this?", None, "malformed"),
    ("conversation", "Question:\nWhat is it?", None, "malformed"),
    ("conversation", "Answer:\nA cat.", None, "malformed"),
    ("conversation", "Question:\n\n===\nAnswer:\nA cat.", None, "malformed"),
    ("complex", CONV, None, "malformed"),
    ("detail", "Question:\nWhat?\nAnswer:\nA cat sits on a mat in a very sunny room today.", None, "malformed"),
    ("detail", "A cat.", None, "malformed"),
    ("detail", "The <image> shows a cat sitting on a mat in a sunny room.", None, "malformed"),
    ("detail", "According to the captions, a cat sits on a mat in a sunny room.", None, "leak"),
    ("detail", "A cat at [0.412, 0.301, 0.705, 0.688] sits on a mat in a sunny room.", None, "leak"),
    ("conversation", "Question:\nWhere is the cat?\nAnswer:\nIts box starts at x = 0.412.", None, "leak"),
    ("conversation", "Question:\nWhat do the bounding boxes show?\nAnswer:\nA cat.", None, "leak"),
])
def test_rejections(task, text, finish, reason):
    with pytest.raises(Rejected) as e:
        parse_reply(task, text, finish)
    assert e.value.reason == reason
    ann = Annotation("1", "1.jpg", ("a cat",))
    assert reply_to_row(task, ann, text, finish).row is None


def test_rows_image_token_placement_is_seeded_and_balanced():
    ann = Annotation("42", "42.jpg", ("a cat",))
    pairs = parse_reply("conversation", CONV)
    row = make_row("conversation", ann, pairs, seed=0)
    assert row["id"] == "42_conversation" and row["image"] == "42.jpg"
    conv = row["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt", "human", "gpt"]
    first = conv[0]["value"]
    assert first in ("<image>\nWhat is on the table?", "What is on the table?\n<image>")
    assert all("<image>" not in t["value"] for t in conv[1:])
    assert make_row("conversation", ann, pairs, seed=0) == row  # deterministic
    before = Counter()
    instr = Counter()
    for i in range(400):
        a = Annotation(str(i), f"{i}.jpg", ("a cat",))
        r = make_row("detail", a, [("", "A cat sits on a mat in a sunny room.")], seed=3)
        v = r["conversations"][0]["value"]
        before[v.startswith("<image>\n")] += 1
        instr[v.replace("<image>", "").strip()] += 1
    assert 160 < before[True] < 240  # about half before, half after
    assert set(instr) == set(DETAIL_INSTRUCTIONS)
    flips = sum(make_row("complex", Annotation(str(i), "x", ("c",)), [("Q?", "A.")], seed=0)["conversations"][0]["value"]
                != make_row("complex", Annotation(str(i), "x", ("c",)), [("Q?", "A.")], seed=1)["conversations"][0]["value"]
                for i in range(100))
    assert 25 < flips < 75  # the seed matters


# ----------------------------------------------------------------------------- template backend

def test_template_backend_on_reference_annotations(tmp_path):
    anns = ref_annotations()
    s = generate(anns, list(TASKS), TemplateBackend(), load_prompts(TASKS), tmp_path / "out", progress=False,
                 log=lambda *_: None)
    assert (s["generated"], s["rejected"], s["failed"]) == (240, 0, 0)
    rows = json.loads((tmp_path / "out" / "llava_instruct.json").read_text())
    assert len(rows) == 240 and len({r["id"] for r in rows}) == 240
    assert [r["id"] for r in rows[:3]] == [f"{anns[0].id}_{t}" for t in TASKS]
    for t in TASKS:
        assert len(json.loads((tmp_path / "out" / f"{t}.json").read_text())) == 80
    # facts are definite: counts in the first answer equal the annotation's
    r0 = rows[0]["conversations"][1]["value"]
    assert r0 == "The image shows ten donuts."


def test_template_backend_on_shapes_world(tmp_path):
    from llava_jax.datagen.annotations import position_of
    from llava_jax.demo import dataset

    dataset.generate(tmp_path / "w", num_train=30, num_eval=0, seed=1, image_size=32)
    anns = load_jsonl(tmp_path / "w" / "annotations.jsonl")
    for ann in anns:
        reply = offline.write_reply("conversation", ann)
        pairs = parse_reply("conversation", reply)
        counts = Counter(i.category for i in ann.instances)
        for q, a in pairs:
            if q.startswith("How many "):
                n = next(offline._NUMBERS.index(w) for w in a.split() if w in offline._NUMBERS[1:])
                cat = next(c for c in counts if offline.plural(c) in q or c in q)
                assert n == counts[cat], (q, a, counts)
            if q.startswith("Where is the "):
                cat = q[len("Where is the "):-len(" in the image?")]
                inst = next(i for i in ann.instances if i.category == cat)
                assert position_of(inst.bbox) in a.replace(" side", "").replace(" part", "") or \
                    position_of(inst.bbox) == "center"
        for task in ("detail", "complex"):
            parse_reply(task, offline.write_reply(task, ann))


def test_run_settings_mismatch(tmp_path):
    anns = [Annotation("1", "1.jpg", ("a cat on a mat",), (Instance("cat", (0.1, 0.1, 0.5, 0.5)),))]
    generate(anns, ["detail"], TemplateBackend(), load_prompts(["detail"]), tmp_path, progress=False,
             log=lambda *_: None)
    d = write_builtin_prompts(tmp_path / "p")
    (d / "detail" / "system_message.txt").write_text("Another system message entirely.")
    with pytest.raises(SettingsMismatch, match=r"prompts\[detail\]"):
        generate(anns, ["detail"], TemplateBackend(), load_prompts(["detail"], d), tmp_path, progress=False,
                 log=lambda *_: None)
    with pytest.raises(SettingsMismatch, match="seed"):
        generate(anns, ["detail"], TemplateBackend(seed=1), load_prompts(["detail"]), tmp_path, seed=1,
                 progress=False, log=lambda *_: None)
    # adding a type to the same folder is fine
    s = generate(anns, ["detail", "complex"], TemplateBackend(), load_prompts(["detail", "complex"]), tmp_path,
                 progress=False, log=lambda *_: None)
    assert (s["already_done"], s["generated"]) == (1, 1)


# ----------------------------------------------------------------------------- annotations

def test_coco_files_give_the_reference_format(tmp_path):
    raw = raw_ref_rows() if REF.exists() else pytest.skip(f"{REF} absent")
    W, H = 640, 427
    images, caps, insts, cats = [], [], [], {}
    for r in raw:
        iid = int(r["id"])
        images.append({"id": iid, "file_name": r["image"], "width": W, "height": H})
        caps += [{"id": len(caps), "image_id": iid, "caption": c} for c in r["captions"]]
        for inst in r["instances"]:
            cid = cats.setdefault(inst["category"], len(cats) + 1)
            x1, y1, x2, y2 = inst["bbox"]
            insts.append({"id": len(insts), "image_id": iid, "category_id": cid, "iscrowd": 0,
                          "bbox": [x1 * W, y1 * H, (x2 - x1) * W, (y2 - y1) * H]})
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": images, "annotations": insts, "categories": [{"id": i, "name": n} for n, i in cats.items()]}))
    anns = load_coco(tmp_path / "captions.json", tmp_path / "instances.json")
    by_id = {a.id: a for a in anns}
    assert len(anns) == 80
    for r in raw:
        a = by_id[r["id"]]
        assert a.image == r["image"]
        assert list(a.captions) == [" ".join(c.split()) for c in r["captions"]]
        assert [i.category for i in a.instances] == [i["category"] for i in r["instances"]]
        for got, want in zip(a.instances, r["instances"]):
            assert max(abs(g - w) for g, w in zip(got.bbox, want["bbox"])) < 1e-9
    assert [a.id for a in anns] == sorted(by_id)
    assert len(load_coco(tmp_path / "captions.json", limit=5)) == 5
    assert load_coco(tmp_path / "captions.json")[0].instances == ()


def test_bad_annotation_rows_are_skipped_and_named(tmp_path):
    p = tmp_path / "a.jsonl"
    good = {"id": "1", "image": "1.jpg", "captions": ["a cat"], "instances": []}
    p.write_text("\n".join([
        json.dumps(good), "{not json", json.dumps({**good, "id": "2", "captions": []}),
        json.dumps({**good, "id": "3", "instances": [{"category": "cat", "bbox": [10, 20, 30, 40]}]}),
        json.dumps(good), "", json.dumps({**good, "id": 4}),
    ]) + "\n")
    errors = []
    anns = load_jsonl(p, errors)
    assert [a.id for a in anns] == ["1", "4"]
    assert len(errors) == 4
    assert all(str(p) in e for e in errors)
    assert any(":2: bad JSON" in e for e in errors) and any("COCO pixel boxes" in e for e in errors)
    assert any("repeats" in e for e in errors)


# ----------------------------------------------------------------------------- stage 1

def test_stage1_rows_from_json_tsv_and_jsonl(tmp_path):
    from llava_jax.data.templates import render
    from llava_jax.datagen.stage1 import BRIEF_INSTRUCTIONS, build, read_pairs

    (tmp_path / "p.json").write_text(json.dumps([
        {"image": "00001/000010001.jpg", "caption": "a dog  on\nthe beach"},
        {"image": "x.jpg", "caption": ""}, {"image": "y.jpg", "caption": "a cat <image>"},
        {"file_name": "z.png", "text": "a red kite", "id": 77}]))
    errs = Counter()
    pairs = read_pairs(tmp_path / "p.json", errors=errs)
    assert [(p.id, p.image, p.caption) for p in pairs] == [(None, "00001/000010001.jpg", "a dog on the beach"),
                                                         ("77", "z.png", "a red kite")]
    assert errs == {"empty_caption": 1, "image_token_in_caption": 1}
    s = build(pairs, tmp_path / "s1.json", seed=0)
    rows = json.loads((tmp_path / "s1.json").read_text())
    assert s["rows"] == 2 and [r["id"] for r in rows] == ["000010001", "77"]
    for r in rows:
        human = r["conversations"][0]["value"]
        assert human.replace("<image>", "").strip() in BRIEF_INSTRUCTIONS and human.count("<image>") == 1
        assert render("plain", r["conversations"]).text.startswith("<image>")
    # CC3M-style TSV without a header: caption<TAB>url; and a TSV with a header
    (tmp_path / "cc.tsv").write_text("a dog on the beach\thttp://x/1.jpg\nthe sky\thttp://x/2.jpg\n")
    pairs = read_pairs(tmp_path / "cc.tsv")
    assert [(p.caption, p.image) for p in pairs] == [("a dog on the beach", "http://x/1.jpg"),
                                                     ("the sky", "http://x/2.jpg")]
    rows = json.loads((tmp_path / "s1.json").read_text()) if build(pairs, tmp_path / "s1.json") else None
    assert [r["id"] for r in rows] == ["000000000", "000000001"]  # URLs: row numbers
    (tmp_path / "h.tsv").write_text("id\timage\tcaption\nk1\ta.jpg\tA cat.\n")
    assert [(p.id, p.image, p.caption) for p in read_pairs(tmp_path / "h.tsv")] == [("k1", "a.jpg", "A cat.")]
    (tmp_path / "p.jsonl").write_text('{"image": "a.jpg", "caption": "x y"}\nbad\n')
    errs = Counter()
    assert len(read_pairs(tmp_path / "p.jsonl", errors=errs)) == 1 and errs == {"bad_json": 1}


def test_noun_phrase_heuristic():
    from llava_jax.datagen.stage1 import noun_phrases

    assert noun_phrases("A large brown dog running on the beach.") == ["large brown dog", "beach"]
    assert noun_phrases("A man dressed in a suit standing next to a building") == ["man", "suit", "building"]
    assert noun_phrases("A family sitting at a dining table with pizza") == ["family", "dining table", "pizza"]
    assert noun_phrases("an apple, books, and a teddy bear; two cats") == ["apple", "books", "teddy bear", "cats"]
    assert noun_phrases("Three very old red brick train station buildings") == ["train station buildings"]
    assert noun_phrases("") == [] and noun_phrases("is on the of") == []


def test_np_filter_keeps_frequent_phrases_and_caps_them(tmp_path):
    from llava_jax.datagen.stage1 import Pair, build, np_filter

    caps = (["a dog on the beach"] * 150          # 'dog' and 'beach': 150 each -> capped at 100
            + ["a cat on a sofa"] * 5               # 'cat', 'sofa': 5 -> all kept
            + ["a zebra on a unicycle"] * 2         # freq 2 < 3 -> dropped
            + ["a cat near a tricycle"]             # "cat" selects it although "tricycle" is rare
            + ["the of and"])                       # no noun phrase -> dropped
    keep, st = np_filter(caps, min_freq=3, max_per_np=100, seed=0)
    kept = Counter(caps[i] for i in keep)
    assert kept["a cat on a sofa"] == 5 and kept["a cat near a tricycle"] == 1
    assert kept["a zebra on a unicycle"] == 0 and kept["the of and"] == 0
    # 'dog' and 'beach' each pick 100 of the same 150 captions with their own seeded sample
    assert 100 <= kept["a dog on the beach"] <= 150
    assert st["capped_noun_phrases"] == 2 and st["kept_noun_phrases"] == 4
    assert keep == sorted(keep) and np_filter(caps, seed=0)[0] == keep and np_filter(caps, seed=1)[0] != keep
    s = build([Pair(None, f"{i}.jpg", c) for i, c in enumerate(caps)], tmp_path / "f.json", np_filter_on=True)
    assert s["rows"] == len(keep) and s["np_filter"]["selected"] == len(keep)


def test_stage1_from_tfds(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image

    from llava_jax.datagen.stage1 import main
    from test_sources import build_tfds, png_bytes

    caps = ["a red square", "", "two blue circles"]
    b = build_tfds(tmp_path / "tfds", "datagen_test_caps",
                   lambda: tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                                       "caption": tfds.features.Text()}),
                   lambda i: {"image": png_bytes(np.full((5, 7, 3), 40 * i, np.uint8)), "caption": caps[i]}, 3)
    out = tmp_path / "s1.json"
    assert main(["--tfds", str(b.data_dir), "--split", "train", "--image-folder", str(tmp_path / "img"),
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert sorted(r["conversations"][1]["value"] for r in rows) == ["a red square", "two blue circles"]
    for r in rows:
        assert r["image"].endswith(".png")
        assert Image.open(tmp_path / "img" / r["image"]).size == (7, 5)


def test_real_gpt4_outputs_pass_validation():
    """No false rejections on the original project's GPT-4 outputs (30 images x 3 types, and the
    90 LLaVA-Bench reference answers), put back into the reply format."""
    path = SHARED / "coco2014_val_gpt4_qa_30x3.jsonl"
    if not path.exists():
        pytest.skip(f"{path} absent")
    task = {"conv": "conversation", "detail": "detail", "complex": "complex"}
    pairs = [(task[r["type"]], r["instruction"], r["output"])
             for r in map(json.loads, path.read_text().splitlines())]
    qs = {q["question_id"]: q for q in map(json.loads, (SHARED / "qa90_questions.jsonl").read_text().splitlines())}
    for a in map(json.loads, (SHARED / "qa90_gpt4_answer.jsonl").read_text().splitlines()):
        q = qs[a["question_id"]]
        pairs.append((task[q["category"]], q["text"], a["text"]))
    assert len(pairs) == 180
    for t, question, answer in pairs:
        reply = answer if t == "detail" else f"Question:\n{question}\n===\nAnswer:\n{answer}"
        (q, a), = parse_reply(t, reply)
        assert q.split() == ([] if t == "detail" else question.split()) and a.split() == answer.split()


def test_jsonl_log_drops_a_cut_last_line(tmp_path):
    from llava_jax.datagen.runner import JsonlLog

    log = JsonlLog(tmp_path / "r.jsonl")
    log.append({"key": "a"})
    with open(tmp_path / "r.jsonl", "ab") as f:
        f.write(b'{"key": "b", "row": {"id"')  # a writer killed mid-line
    assert log.read() == [{"key": "a"}]
    log.append({"key": "c"})
    assert log.read() == [{"key": "a"}, {"key": "c"}]
