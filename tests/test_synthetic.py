"""Tests for the synthetic shapes world (llava_jax/demo/world.py, scenes.py, scoring.py, dataset.py)."""
from __future__ import annotations

import hashlib
from collections import Counter
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_jax.datagen.annotations import position_of
from llava_jax.demo import dataset as demo_data
from llava_jax.demo import scenes, scoring
from llava_jax.demo import world as demo_world

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "llava_reference"
CAPS_BOXES = REFERENCE / "caps_boxes_coco2014_val_80.jsonl"


# ----------------------------------------------------------------------------- fixtures

def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class DataSet:
    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.annotations = _read_jsonl(root / "annotations.jsonl")
        self.eval_annotations = _read_jsonl(root / "eval_annotations.jsonl")
        self.stage1 = json.loads((root / "stage1.json").read_text())
        self.stage2 = json.loads((root / "stage2.json").read_text())
        self.eval = _read_jsonl(root / "eval.jsonl")
        self.by_image = {a["image"]: a for a in self.annotations + self.eval_annotations}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> DataSet:
    root = tmp_path_factory.mktemp("shapes_default")
    manifest = demo_data.generate(root, num_train=300, num_eval=60, seed=0, image_size=64)
    return DataSet(root, manifest)


@pytest.fixture(scope="module")
def wide_set(tmp_path_factory) -> DataSet:
    """All shapes, more colours, another size: exercises every drawing path."""
    root = tmp_path_factory.mktemp("shapes_wide")
    manifest = demo_data.generate(root, num_train=120, num_eval=30, seed=3, image_size=48,
                            shapes=demo_world.ALL_SHAPES, colors=list(demo_world.COLOR_RGB), max_objects=5)
    return DataSet(root, manifest)


@pytest.fixture(scope="module")
def grid_set(tmp_path_factory) -> DataSet:
    """The demo's layout: a 3x3 grid of 16-px cells, one object per cell."""
    root = tmp_path_factory.mktemp("shapes_grid")
    manifest = demo_data.generate(root, num_train=150, num_eval=30, seed=5, image_size=48, grid=3,
                            size_range=(0.6, 0.9), turns=(3, 6), existence_evidence=True,
                            existence_recheck=True,
                            question_mix={"color": 3, "existence": 4, "position": 3, "shape": 1, "count": 1})
    return DataSet(root, manifest)


@pytest.fixture(scope="module")
def image_only_set(tmp_path_factory) -> DataSet:
    """The grid world with leak-free stage-2 rows, two per image (`image_only_answers`)."""
    root = tmp_path_factory.mktemp("shapes_image_only")
    manifest = demo_data.generate(root, num_train=100, num_eval=30, seed=6, image_size=48, grid=3,
                                  size_range=(0.6, 0.9), turns=(3, 6), existence_evidence=True,
                                  existence_recheck=True, image_only_answers=True, stage2_rows_per_image=2)
    return DataSet(root, manifest)


@pytest.fixture(params=["default_set", "wide_set", "grid_set", "image_only_set"])
def dataset(request) -> DataSet:
    return request.getfixturevalue(request.param)


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- determinism

def test_deterministic_for_a_seed(tmp_path):
    demo_data.generate(tmp_path / "a", num_train=25, num_eval=8, seed=7)
    demo_data.generate(tmp_path / "b", num_train=25, num_eval=8, seed=7)
    demo_data.generate(tmp_path / "c", num_train=25, num_eval=8, seed=8)
    a, b, c = (_hash_tree(tmp_path / d) for d in "abc")
    assert len(a) == 25 + 8 + 6  # images + 5 data files + manifest.json
    assert a == b
    assert set(a) == set(c)
    for name in ("annotations.jsonl", "stage1.json", "stage2.json", "eval.jsonl", "images/train_000000.png"):
        assert a[name] != c[name], name


def test_scene_depends_only_on_seed_split_index():
    w = scenes.ShapesWorld(seed=5)
    s1 = w.sample_scene(17, "train")
    for i in range(5):
        w.sample_scene(i, "eval")
    assert scenes.ShapesWorld(seed=5).sample_scene(17, "train") == s1
    assert w.sample_scene(17, "eval").signature() != s1.signature()


# ----------------------------------------------------------------------------- annotation format

def test_annotation_keys_and_types_match_reference(dataset):
    if not CAPS_BOXES.exists():
        pytest.skip(f"reference data absent: {CAPS_BOXES} (a user's clone has no ../shared)")
    ref = json.loads(CAPS_BOXES.read_text(encoding="utf-8").splitlines()[0])
    ref_inst = ref["instances"][0]
    for row in dataset.annotations + dataset.eval_annotations:
        assert list(row) == list(ref)
        for k in ref:
            assert type(row[k]) is type(ref[k]), k
        assert len(row["captions"]) == len(ref["captions"]) == 5
        assert all(isinstance(c, str) and c for c in row["captions"])
        assert len(set(row["captions"])) >= 4  # varied
        assert (Path(dataset.root) / "images" / row["image"]).is_file()
        assert row["image"] == f"{row['id']}.png"
        assert 1 <= len(row["instances"])
        for inst in row["instances"]:
            assert set(inst) == set(ref_inst)
            assert isinstance(inst["category"], str)
            color, shape = inst["category"].split(" ")
            assert color in dataset.manifest["config"]["colors"] and shape in dataset.manifest["config"]["shapes"]
            box = inst["bbox"]
            assert isinstance(box, list) and len(box) == 4 and all(type(v) is float for v in box)
            x1, y1, x2, y2 = box
            assert 0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0


def _pixel_box(bbox, size):
    return [int(round(v * size)) for v in bbox]  # x0, y0, x1 (exclusive), y1 (exclusive)


def _check_rendered(img: np.ndarray, instances, color_rgb, background):
    size = img.shape[0]
    covered = np.zeros(img.shape[:2], bool)
    boxes = [_pixel_box(i["bbox"], size) for i in instances]
    for inst, (x0, y0, x1, y1) in zip(instances, boxes):
        color, _shape = inst["category"].split(" ")
        rgb = np.array(color_rgb[color])
        mask = np.all(img == rgb, axis=-1)
        inside = mask[y0:y1, x0:x1]
        assert inside.any(), inst
        # The box is tight: the colour touches all four edges of the box (within 1 px).
        ys, xs = np.nonzero(inside)
        assert xs.min() <= 1 and ys.min() <= 1, inst
        assert xs.max() >= x1 - x0 - 2 and ys.max() >= y1 - y0 - 2, inst
        # The centre of the box is filled with the named colour (true for every shape drawn).
        cx, cy = int((inst["bbox"][0] + inst["bbox"][2]) / 2 * size), int((inst["bbox"][1] + inst["bbox"][3]) / 2 * size)
        assert tuple(img[cy, cx]) == tuple(color_rgb[color]), inst
        covered[y0:y1, x0:x1] = True
    # Boxes do not overlap and nothing is drawn outside them.
    area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes)
    assert covered.sum() == area
    outside = img[~covered]
    assert np.all(outside == np.array(background)), "pixels drawn outside every box"


def test_boxes_match_rendered_pixels(dataset):
    cfg = dataset.manifest["config"]
    color_rgb = {k: tuple(v) for k, v in cfg["colors"].items()}
    background = demo_world.BACKGROUND_RGB[cfg["background"]]
    for row in dataset.annotations + dataset.eval_annotations:
        img = np.asarray(Image.open(dataset.root / "images" / row["image"]).convert("RGB"))
        assert img.shape == (cfg["image_size"], cfg["image_size"], 3)
        _check_rendered(img, row["instances"], color_rgb, background)


def test_grid_layout_puts_each_object_whole_in_its_own_cell(grid_set):
    cell = 48 // 3
    names = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
    for ann in grid_set.annotations + grid_set.eval_annotations:
        cells = []
        for inst in ann["instances"]:
            x0, y0, x1, y1 = (round(v * 48) for v in inst["bbox"])  # pixel edges
            col, row = x0 // cell, y0 // cell
            assert (x1 - 1) // cell == col and (y1 - 1) // cell == row, (ann["id"], inst)
            cells.append(row * 3 + col)
            assert position_of(inst["bbox"]) == names[row * 3 + col]
        assert len(set(cells)) == len(cells), ann["id"]
    with pytest.raises(ValueError, match="grid"):
        scenes.ShapesWorld(image_size=48, grid=2, max_objects=5)


@pytest.mark.parametrize("size", [32, 128, 336])
def test_other_image_sizes(size):
    w = scenes.ShapesWorld(seed=1, image_size=size, shapes=demo_world.ALL_SHAPES)
    for i in range(15):
        scene = w.sample_scene(i)
        img = np.asarray(w.render(scene))
        assert img.shape == (size, size, 3)
        inst = [{"category": o.category, "bbox": o.bbox} for o in scene.objects]
        _check_rendered(img, inst, w.color_rgb, w.background_rgb)


def test_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match="available"):
        scenes.ShapesWorld(shapes=["circle", "blob"])
    with pytest.raises(ValueError, match="available"):
        scenes.ShapesWorld(colors=["red", "mauve"])
    with pytest.raises(ValueError, match="background"):
        scenes.ShapesWorld(colors=["red", "black"], background="black")
    with pytest.raises(ValueError, match="turns"):
        scenes.ShapesWorld(turns=(3, 2))
    with pytest.raises(ValueError, match="question_mix"):
        scenes.ShapesWorld(question_mix={"colour": 1.0})
    with pytest.raises(ValueError, match="question_mix"):
        scenes.ShapesWorld(question_mix={"color": 0.0})
    with pytest.raises(ValueError, match="shape_negative_prob"):
        scenes.ShapesWorld(shape_negative_prob=1.5)
    with pytest.raises(ValueError, match="existence_recheck .* needs existence_evidence"):
        scenes.ShapesWorld(existence_recheck=True)


# ----------------------------------------------------------------------------- LLaVA rows

def _check_llava_row(row):
    conv = row["conversations"]
    assert isinstance(row["id"], str) and row["id"]
    assert len(conv) >= 2 and len(conv) % 2 == 0
    for i, turn in enumerate(conv):
        assert set(turn) == {"from", "value"}
        assert turn["from"] == ("human" if i % 2 == 0 else "gpt")
        assert isinstance(turn["value"], str) and turn["value"].strip()
    n_image = [t["value"].count("<image>") for t in conv]
    if "image" in row:
        assert set(row) == {"id", "image", "conversations"}
        assert n_image[0] == 1 and sum(n_image) == 1
        v = conv[0]["value"]
        assert v.startswith("<image>\n") or v.endswith("\n<image>")
    else:
        assert set(row) == {"id", "conversations"}
        assert sum(n_image) == 0


def test_stage1_rows_are_llava_pretrain_rows(dataset):
    assert len(dataset.stage1) == len(dataset.annotations)
    caps = {a["image"]: a["captions"] for a in dataset.annotations}
    first = {"before": 0, "after": 0}
    for row in dataset.stage1:
        _check_llava_row(row)
        assert len(row["conversations"]) == 2
        assert row["conversations"][1]["value"] in caps[row["image"]]
        instr = row["conversations"][0]["value"].replace("<image>", "").strip()
        assert instr in demo_world.STAGE1_INSTRUCTIONS
        first["before" if row["conversations"][0]["value"].startswith("<image>") else "after"] += 1
    assert first["before"] > 0 and first["after"] > 0


def test_stage2_rows_are_llava_instruction_rows(dataset):
    text_only = [r for r in dataset.stage2 if "image" not in r]
    with_image = [r for r in dataset.stage2 if "image" in r]
    assert len(with_image) == dataset.manifest["counts"].get("stage2_rows_per_image", 1) * len(dataset.annotations)
    assert len(text_only) >= 2
    assert len({r["id"] for r in dataset.stage2}) == len(dataset.stage2)
    lo, hi = dataset.manifest["config"]["turns"]
    turns = []
    for row in dataset.stage2:
        _check_llava_row(row)
        if "image" in row:
            turns.append(len(row["conversations"]) // 2)
    # Fewer than `lo` only when a scene has too few distinct questions (rare; common when no
    # question may ask about what the row already named).
    rare = 0.9 if not dataset.manifest["config"].get("image_only_answers") else 0.5
    assert max(turns) <= hi and np.mean([t >= lo for t in turns]) > rare, (lo, hi, turns)
    assert max(len(r["conversations"]) for r in with_image) == 2 * hi  # multi-turn rows exist


# ----------------------------------------------------------------------------- answers

def _question_patterns(colors, shapes):
    alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
    groups = {
        "color": f"(?P<color>{alt(colors)})",
        "shape": f"(?P<shape>{alt(shapes)})",
        "shapes": f"(?P<shapes>{alt([demo_world.PLURALS[s] for s in shapes])})",
        "subject": f"(?P<subject>(?:(?:{alt(colors)}) )?(?:{alt(shapes)}))",
    }
    pats = []
    for kind, templates in demo_world.QUESTION_TEMPLATES.items():
        for t in templates:
            rx = re.escape(t)
            for name, g in groups.items():
                rx = rx.replace(re.escape("{" + name + "}"), g)
            pats.append((kind, re.compile(rx)))
    return pats


def _parse_question(pats, text):
    hits = [(kind, m.groupdict()) for kind, rx in pats if (m := rx.fullmatch(text))]
    assert len(hits) == 1, (text, hits)
    return hits[0]


def _expected(kind, args, instances, captions):
    """(category, canonical answer) recomputed from the annotation alone; asserts definiteness."""
    parsed = [dict(zip(("color", "shape"), i["category"].split(" ")), bbox=i["bbox"]) for i in instances]
    if kind == "color":
        hits = [p for p in parsed if p["shape"] == args["shape"]]
        assert len(hits) == 1, "colour question about a non-unique shape"
        return "color", hits[0]["color"]
    if kind == "shape":
        hits = [p for p in parsed if p["color"] == args["color"]]
        assert len(hits) == 1, "shape question about a non-unique colour"
        return "shape", hits[0]["shape"]
    if kind == "count":
        return "count", str(len(parsed))
    if kind == "count_color":
        return "count", str(sum(p["color"] == args["color"] for p in parsed))
    if kind == "count_shape":
        shape = {v: k for k, v in demo_world.PLURALS.items()}[args["shapes"]]
        return "count", str(sum(p["shape"] == shape for p in parsed))
    if kind == "position":
        words = args["subject"].split(" ")
        hits = [p for p in parsed if (p["color"], p["shape"]) == tuple(words)
                or (len(words) == 1 and p["shape"] == words[0])]
        assert len(hits) == 1, "position question about a non-unique object"
        x1, y1, x2, y2 = hits[0]["bbox"]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        # Definite: the centre is away from the thirds lines.
        assert all(abs(c - t) > 0.02 for c in (cx, cy) for t in (1 / 3, 2 / 3))
        h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
        v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
        return "position", f"{v} {h}".strip() or "center"
    if kind == "existence":
        present = any(p["color"] == args["color"] and p["shape"] == args["shape"] for p in parsed)
        return "existence", "yes" if present else "no"
    if kind == "describe":
        return "describe", None
    raise AssertionError(kind)


def test_question_mix_sets_the_share_of_each_category():
    def shares(world, n=400):
        cats = Counter()
        for i in range(n):
            scene = world.sample_scene(i)
            rng = world.rng("train", i, "text")
            cats.update(qa.category for qa in world.conversation(scene, rng, ["a caption"]))
        cats.pop("describe", None)
        total = sum(cats.values())
        return {c: k / total for c, k in cats.items()}

    # Only the weighted categories are asked ("describe" aside), in about the weights' ratio:
    # existence can always be asked, count too, so 3:1 should come out near 0.75.
    only = shares(scenes.ShapesWorld(seed=1, question_mix={"existence": 3, "count": 1}))
    assert set(only) == {"existence", "count"}, only
    assert 0.68 <= only["existence"] <= 0.82, only
    uniform = shares(scenes.ShapesWorld(seed=1))
    assert set(uniform) == set(demo_world.EVAL_CATEGORIES)


def test_shape_negative_prob_sets_how_often_a_no_names_a_shape_in_the_image():
    """Of the "no" existence answers in stage-2 rows, the share that name a shape in the image,
    counted from the scenes: all of them at 1.0 (where the scene allows one), about 3/4 at 0.75,
    fewer by default; with the option set, the others name a shape the image lacks in a colour
    it has; the eval path (make_question) keeps its own mix."""
    def shares(world, n=300):
        shape_hits = colour_only = total = 0
        for i in range(n):
            scene = world.sample_scene(i)
            shapes, colours = {o.shape for o in scene.objects}, {o.color for o in scene.objects}
            for qa in world.conversation(scene, world.rng("train", i, "text"), ["a caption"]):
                if qa.category == "existence" and qa.answer == "no":
                    colour, shape = re.search(r"\ba (\w+) (\w+)", qa.question).groups()
                    total += 1
                    shape_hits += shape in shapes
                    colour_only += shape not in shapes and colour in colours
        return shape_hits / total, colour_only / total

    mix = {"existence": 1.0}
    assert shares(scenes.ShapesWorld(seed=2, question_mix=mix, shape_negative_prob=1.0))[0] == 1.0
    shape_share, colour_share = shares(scenes.ShapesWorld(seed=2, question_mix=mix, shape_negative_prob=0.75))
    assert 0.7 <= shape_share <= 0.8 and shape_share + colour_share > 0.98, (shape_share, colour_share)
    shape_share, colour_share = shares(scenes.ShapesWorld(seed=2, question_mix=mix))
    assert shape_share < 0.7 and shape_share + colour_share < 0.9, (shape_share, colour_share)
    scene = scenes.ShapesWorld(seed=2).sample_scene(0)
    qa_set = scenes.ShapesWorld(seed=2, shape_negative_prob=1.0).make_question(
        scene, "existence", random.Random(7), existence_yes=False)
    qa_default = scenes.ShapesWorld(seed=2).make_question(scene, "existence", random.Random(7), existence_yes=False)
    assert qa_set == qa_default


def test_stage2_answers_are_correct(dataset):
    cfg = dataset.manifest["config"]
    pats = _question_patterns(cfg["colors"], cfg["shapes"])
    seen, existence = set(), []
    for row in dataset.stage2:
        if "image" not in row:
            continue
        ann = dataset.by_image[row["image"]]
        conv = row["conversations"]
        questions = [t["value"].replace("<image>", "").strip() for t in conv[0::2]]
        assert len(set(questions)) == len(questions), "repeated question in one conversation"
        for q, a in zip(questions, (t["value"] for t in conv[1::2])):
            kind, args = _parse_question(pats, q)
            cat, expected = _expected(kind, args, ann["instances"], ann["captions"])
            seen.add(cat)
            if cat == "describe":
                assert a in ann["captions"]
                continue
            assert scoring.score_answer(cat, a, expected), (q, a, expected)
            if cat == "existence":
                existence.append(expected == "yes")
    assert seen >= set(demo_world.EVAL_CATEGORIES)
    if len(existence) >= 80:
        assert 0.35 <= np.mean(existence) <= 0.65, np.mean(existence)


def test_existence_evidence_names_the_colours_of_that_shape(grid_set):
    """With existence_evidence the answer first says what the image has of the asked shape (colours
    in reading order: rows by thirds, then left to right), then (existence_recheck, when the shape
    is there) the asked object again, then the verdict; recomputed here from the annotations
    alone."""
    cfg = grid_set.manifest["config"]
    assert cfg["existence_evidence"] is True and cfg["existence_recheck"] is True
    pats = _question_patterns(cfg["colors"], cfg["shapes"])
    checked = Counter()
    for row in grid_set.stage2:
        if "image" not in row:
            continue
        conv = row["conversations"]
        for q, a in zip(conv[0::2], conv[1::2]):
            kind, args = _parse_question(pats, q["value"].replace("<image>", "").strip())
            if kind != "existence":
                continue
            objs = []
            for inst in grid_set.by_image[row["image"]]["instances"]:
                (color, shape), (x0, y0, x1, y1) = inst["category"].split(" "), inst["bbox"]
                objs.append((min(2, int(3 * (y0 + y1) / 2)), x0, color, shape))
            colors = []
            for *_, color, shape in sorted(objs):
                if shape == args["shape"]:
                    colors.append(color)
            n = sum(o[3] == args["shape"] for o in objs)
            plural = "crosses" if args["shape"] == "cross" else args["shape"] + "s"
            listed = " and ".join([", ".join(colors[:-1]), colors[-1]] if len(colors) > 1 else colors)
            evidence = (f"There is no {args['shape']}." if n == 0 else f"The {args['shape']} is {colors[0]}."
                        if n == 1 else f"The {plural} are {listed}.")
            verdict = "Yes" if args["color"] in colors else "No"
            if n:
                an = "An" if args["color"][0] in "aeiou" else "A"
                evidence += f" {an} {args['color']} {args['shape']}?"
            assert a["value"] == f"{evidence} {verdict}.", (q["value"], a["value"])
            checked[(min(n, 2), verdict)] += 1
    # every kind of evidence (no / one / several of the shape) with both verdicts where possible
    assert {(0, "No"), (1, "No"), (1, "Yes"), (2, "No"), (2, "Yes")} <= set(checked), checked


def test_eval_questions_are_correct_and_held_out(dataset):
    cfg = dataset.manifest["config"]
    pats = _question_patterns(cfg["colors"], cfg["shapes"])
    world = scenes.ShapesWorld(colors=cfg["colors"], shapes=cfg["shapes"],
                            min_objects=cfg["min_objects"], max_objects=cfg["max_objects"])
    chance = scoring.chance_rates(world)
    assert chance == scoring.chance_rates(dataset.manifest) == dataset.manifest["chance"]
    train_ids = {a["id"] for a in dataset.annotations}
    eval_ids = {a["id"] for a in dataset.eval_annotations}
    assert not train_ids & eval_ids
    assert {a["image"] for a in dataset.annotations}.isdisjoint(a["image"] for a in dataset.eval_annotations)
    train_layouts = {json.dumps(a["instances"]) for a in dataset.annotations}
    assert not any(json.dumps(a["instances"]) in train_layouts for a in dataset.eval_annotations)

    eval_images = {a["image"] for a in dataset.eval_annotations}
    assert [r["question_id"] for r in dataset.eval] == list(range(len(dataset.eval)))
    per_cat = {}
    for r in dataset.eval:
        assert set(r) == {"question_id", "image", "text", "category", "answer", "choices", "chance"}
        assert r["image"] in eval_images and "<image>" not in r["text"]
        assert r["category"] in demo_world.EVAL_CATEGORIES
        assert r["answer"] in r["choices"] and r["chance"] == pytest.approx(chance[r["category"]])
        ann = dataset.by_image[r["image"]]
        kind, args = _parse_question(pats, r["text"])
        cat, expected = _expected(kind, args, ann["instances"], ann["captions"])
        assert (cat, expected) == (r["category"], r["answer"]), r
        assert scoring.score_answer(cat, r["answer"], r["answer"])
        per_cat.setdefault(cat, []).append(r["answer"])
    assert set(per_cat) == set(demo_world.EVAL_CATEGORIES)
    yes = [a == "yes" for a in per_cat["existence"]]
    assert abs(sum(yes) - len(yes) / 2) <= 1  # exactly balanced
    counts = dataset.manifest["counts"]
    assert counts["eval_questions"] == len(dataset.eval)
    assert counts["eval_questions_per_category"] == {k: len(v) for k, v in per_cat.items()}


def test_manifest(default_set):
    m = json.loads((default_set.root / "manifest.json").read_text())
    assert {k: v for k, v in default_set.manifest.items() if k not in ("root", "seconds")} == m
    assert Path(default_set.manifest["root"]) == default_set.root.resolve()
    for name in m["files"].values():
        assert (default_set.root / name).exists(), name
    assert m["counts"]["train_images"] == 300 and m["counts"]["eval_images"] == 60
    assert m["counts"]["stage2_rows"] == 300 + m["counts"]["stage2_text_only_rows"]
    for cat, base in m["majority_baseline"].items():
        assert m["chance"][cat] <= base + 0.2 and base < 0.75, (cat, base)


# ----------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("category,pred,answer", [
    ("color", "Red.", "red"),
    ("color", "The circle is red.", "red"),
    ("color", "it's RED", "red"),
    ("shape", "A circle.", "circle"),
    ("shape", "The red shape is a circle.", "circle"),
    ("shape", "crosses", "cross"),
    ("count", "3", "3"),
    ("count", "Three.", "3"),
    ("count", "There are three shapes.", "3"),
    ("count", "There is one circle.", "1"),
    ("count", "4 shapes", "four"),
    ("position", "On the left.", "left"),
    ("position", "The red square is in the top left.", "top left"),
    ("position", "upper-left corner", "top left"),
    ("position", "In the centre.", "center"),
    ("position", "in the middle", "center"),
    ("position", "bottom center", "bottom"),
    ("existence", "Yes.", "yes"),
    ("existence", "yes, there is a blue triangle", "yes"),
    ("existence", "No.", "no"),
    ("existence", "No, there is no blue triangle.", "no"),
    ("existence", "There is no blue triangle.", "no"),
    ("existence", "There is a blue triangle.", "yes"),
    ("existence", "The circle is blue. No.", "no"),
    ("existence", "The circles are red and blue. Yes.", "yes"),
    ("existence", "There is no circle. No.", "no"),
    ("describe", "A red circle.", "a red circle"),
])
def test_score_answer_positives(category, pred, answer):
    assert scoring.score_answer(category, pred, answer)


@pytest.mark.parametrize("category,pred,answer", [
    ("color", "Blue.", "red"),
    ("color", "red or blue", "red"),
    ("color", "", "red"),
    ("color", "reddish", "red"),
    ("shape", "A square.", "circle"),
    ("shape", "circle or square", "circle"),
    ("count", "2", "3"),
    ("count", "Two.", "3"),
    ("count", "many", "3"),
    ("position", "On the right.", "left"),
    ("position", "On the left.", "top left"),
    ("position", "In the top left.", "left"),
    ("position", "", "center"),
    ("existence", "No.", "yes"),
    ("existence", "Yes.", "no"),
    ("existence", "There is no blue triangle.", "yes"),
    ("existence", "The circle is red. No.", "yes"),
    ("existence", "There is no circle. Yes.", "no"),
    ("existence", "maybe", "yes"),
    ("describe", "A blue circle.", "a red circle"),
])
def test_score_answer_negatives(category, pred, answer):
    assert not scoring.score_answer(category, pred, answer)


def test_chance_rates():
    w = scenes.ShapesWorld(shapes=("circle", "square", "triangle"), colors=("red", "green", "blue", "yellow", "cyan"),
                        max_objects=3)
    assert scoring.chance_rates(w) == pytest.approx(
        {"color": 1 / 5, "shape": 1 / 3, "count": 1 / 3, "position": 1 / 9, "existence": 0.5})


def test_text_existence_rows_answer_from_the_caption(tmp_path):
    """`num_text_existence` adds text-only stage-2 rows: a caption, then existence questions
    answered in the image rows' format. Each answer is recomputed here from the caption's words
    alone (the colours it names for the asked shape, and whether the asked pair is among them)."""
    n_rows = 40
    m = demo_data.generate(tmp_path, num_train=30, num_eval=6, seed=2, image_size=48, grid=3,
                           size_range=(0.6, 0.9), turns=(3, 6), existence_evidence=True,
                           existence_recheck=True, shape_negative_prob=0.75, num_text_existence=n_rows)
    assert m["counts"]["stage2_text_existence_rows"] == n_rows
    rows = [r for r in json.loads((tmp_path / "stage2.json").read_text())
            if r["id"].startswith("text_existence_")]
    assert len(rows) == n_rows and not any("image" in r for r in rows)
    cfg = m["config"]
    colors, shapes = cfg["colors"], cfg["shapes"]
    plurals = {("crosses" if s == "cross" else s + "s"): s for s in shapes}
    counts = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
    phrase = re.compile(r"\b(a|an|two|three|four) (%s) (%s)\b" % ("|".join(colors), "|".join([*shapes, *plurals])))
    verdicts = Counter()
    for row in rows:
        conv = row["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and 3 <= len(conv) // 2 <= 6
        first_q = conv[0]["value"]
        caption = first_q[: first_q.index(".") + 1]
        scene = Counter()
        for n, color, shape in phrase.findall(caption.lower()):
            scene[(color, plurals.get(shape, shape))] += counts[n]
        assert scene, caption
        asked_pairs = set()
        for q, a in zip(conv[0::2], conv[1::2]):
            words = q["value"][len(caption):] if q is conv[0] else q["value"]
            (color,) = [w for w in re.findall(r"[a-z]+", words) if w in colors]
            (shape,) = [w for w in re.findall(r"[a-z]+", words) if w in shapes]
            assert (color, shape) not in asked_pairs  # one question per pair
            asked_pairs.add((color, shape))
            named = sorted(c for (c, s), k in scene.items() if s == shape for _ in range(k))
            yes = (color, shape) in scene
            answer = a["value"]
            assert answer.endswith("Yes." if yes else "No."), (caption, q["value"], answer)
            if named:
                listed = re.match(r"The \w+ (?:is|are) (.+?)\. An? (\w+) (\w+)\? (?:Yes|No)\.$", answer)
                assert listed and (listed.group(2), listed.group(3)) == (color, shape), answer
                assert sorted(re.split(r", | and ", listed.group(1))) == named, (caption, answer)
            else:
                assert answer == f"There is no {shape}. No.", answer
            verdicts[yes] += 1
    assert verdicts[True] > 20 and verdicts[False] > 20, verdicts


def _named_words(text: str, colors, shapes) -> tuple[set, set]:
    words = set(re.findall(r"[a-z]+", text.lower()))
    singular = {demo_world.PLURALS[s]: s for s in shapes}
    return {singular.get(w, w) for w in words} & set(shapes), words & set(colors)


def test_image_only_answers_ask_nothing_the_row_already_said(tmp_path):
    """With `image_only_answers`, a later turn never asks about a shape any earlier turn named,
    a question without a shape never asks about a colour named before, "How many objects?"
    comes once, and the description (if any) is the last turn; the answers stay correct (the
    `dataset` fixture's answer check runs on this set too). Without it, most later turns ask
    about a shape already named: the leak the option removes."""
    kw = dict(num_train=200, num_eval=6, seed=4, image_size=48, grid=3, size_range=(0.6, 0.9), turns=(3, 6),
              existence_evidence=True, existence_recheck=True, shape_negative_prob=0.75,
              question_mix={"color": 3, "existence": 4, "position": 3, "shape": 1, "count": 1})
    m = demo_data.generate(tmp_path / "only", image_only_answers=True, stage2_rows_per_image=2, **kw)
    demo_data.generate(tmp_path / "plain", **kw)
    colors, shapes = m["config"]["colors"], m["config"]["shapes"]

    def later_turn_leaks(root):
        data = DataSet(root, json.loads((root / "manifest.json").read_text()))
        leaks = later = 0
        for row in data.stage2:
            if "image" not in row:
                continue
            shapes_named, colors_named, scene_asked = set(), set(), False
            turns = list(zip(row["conversations"][0::2], row["conversations"][1::2]))
            for i, (q, a) in enumerate(turns):
                q, a = q["value"].replace("<image>", ""), a["value"]
                if a in data.by_image[row["image"]]["captions"]:  # a description: the last turn
                    assert i == len(turns) - 1 or root.name == "plain", row
                    continue
                s, c = _named_words(q, colors, shapes)
                if i:
                    later += 1
                    leaks += bool(s & shapes_named if s else c & colors_named if c else scene_asked)
                scene_asked |= not s and not c
                sa, ca = _named_words(a, colors, shapes)
                shapes_named |= s | sa
                colors_named |= c | ca
        return leaks, later

    leaks, later = later_turn_leaks(tmp_path / "only")
    assert later > 200 and leaks == 0, (leaks, later)
    plain_leaks, plain_later = later_turn_leaks(tmp_path / "plain")
    assert plain_leaks / plain_later > 0.4, (plain_leaks, plain_later)
    rows = [r for r in json.loads((tmp_path / "only" / "stage2.json").read_text()) if "image" in r]
    assert len(rows) == 2 * 200 and len({r["id"] for r in rows}) == 400
    by_image = Counter(r["image"] for r in rows)
    assert set(by_image.values()) == {2}
    # the first conversation of each image is the one the default writes (same rng stream) only
    # when nothing was left out: at least the ids and images line up
    assert {r["id"] for r in rows if "_" not in r["id"][len("train_"):]} == {f"train_{i:06d}" for i in range(200)}
