"""A synthetic "shapes world": small images of coloured shapes, with captions, boxes and Q&A.

It is the data behind the offline demo and many tests. A tiny LLaVA (tiny ViT + tiny LLaMA,
trained from scratch on CPU) can learn it in minutes: small images (64 px by default),
1-4 solid shapes on a plain background, a few shapes and colours, short definite answers.

Generate a data set (about 2 s for 2000 + 200 images at 64 px on one CPU core):

    python -m llava_jax.demo.dataset --out /tmp/shapes --num-train 2000 --num-eval 200

or from Python: ``generate(out_dir, num_train=2000, num_eval=200, seed=0)``.

Files written under ``out_dir``
-------------------------------
``images/{id}.png``
    Train ids are ``train_000000``..., held-out eval ids ``eval_000000``... (disjoint seeds).
``annotations.jsonl`` / ``eval_annotations.jsonl``
    One row per image (train / eval), exactly the keys and types of LLaVA's
    ``caps_boxes_coco2014_val_80.jsonl``: ``{"id": str, "image": "<id>.png", "captions": [5 str],
    "instances": [{"category": str, "bbox": [x1, y1, x2, y2]}]}``; the bbox is normalised to
    0-1 (3 decimals) and tight around the drawn pixels. Choice: the colour lives in the category
    string, ``"category": "red circle"`` (``"<color> <shape>"``), so no key is added.
``stage1.json``
    LLaVA pretrain rows (like ``blip_laion_cc_sbu_558k.json``), one per train image:
    ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nDescribe the image
    concisely."}, {"from": "gpt", "value": <one of the captions>}]}``; ``<image>`` is randomly
    before or after the instruction.
``stage2.json``
    LLaVA instruction rows (like ``llava_v1_5_mix665k.json``): one per train image with 1-3
    question/answer turns (``<image>\\n`` starts the first human turn), plus a few text-only rows
    (no ``image`` key, no ``<image>``). ``num_text_existence=N`` adds N more text-only rows that
    tell a scene in words (one of its captions) and ask 3-6 existence questions about it,
    answered in the image rows' format (``ShapesWorld.text_existence_turns``): the verdict
    without the seeing (off by default; BENCHMARKS.md, "Session 8"). Question types: ``color``, ``shape``, ``count``,
    ``position``, ``existence`` (yes/no about 50/50), and rarely ``describe`` (answer = a caption).
    ``ShapesWorld(turns=(lo, hi), question_mix={category: weight})`` set the questions per row and
    their mix; ``existence_evidence=True`` makes existence answers state what the image has of the
    asked shape before the verdict ("The circle is blue. No.", "There is no circle. No."; one
    colour per object: "The circles are red and red. Yes."), and ``existence_recheck=True``
    also restates the asked object when its shape is there ("The circle is blue. A green
    circle? No.");
    ``image_only_answers=True`` keeps every answer of a row unanswerable from the turns before
    it (no question about a shape the row has named; the description last): evaluation asks
    one question at a time. ``stage2_rows_per_image=k`` writes k conversations per image (ids
    ``train_000000``, ``train_000000_1``, ...), so the questions a leak-free row cannot hold go
    into another row;
    ``shape_negative_prob`` sets the share of "no" existence answers in these rows that name a
    shape in the image ("Is there a red circle?" next to a blue circle); the others name a shape
    the image lacks in a colour it has ("Is there a red cross?" next to a red circle); default
    None: the mix of ``eval.jsonl``, half sharing a colour or shape with the image, half any
    absent pair.
``eval.jsonl``
    Held-out questions, one per row, in the LLaVA eval question format plus scoring info:
    ``{"question_id": int, "image": "eval_000000.png", "text": question (no <image>),
    "category": one of EVAL_CATEGORIES, "answer": canonical short answer, "choices": [all
    canonical answers], "chance": 1/len(choices)}``. Score with ``score_answer``.
``manifest.json``
    Settings, relative file names, counts, chance rates and the eval majority baseline.

Definite answers
----------------
Every question has one correct answer: "What color is the circle?" is asked only if there is
exactly one circle, "What shape is red?" only if exactly one object is red, position questions
only about a unique object. Boxes never overlap (rejection sampling, at least one background
pixel between any two boxes), and box centres are kept away from the thirds lines that define
left/center/right and top/middle/bottom, so positions are unambiguous too.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from llava_jax.demo.scenes import ShapesWorld
from llava_jax.demo.scoring import chance_rates
from llava_jax.demo.world import (
    DEFAULT_COLORS,
    DEFAULT_SHAPES,
    EVAL_CATEGORIES,
    STAGE1_INSTRUCTIONS,
    article,
    capitalize,
    number_word,
)

# ----------------------------------------------------------------------------- text-only rows

def _text_only_conversation(rng: random.Random) -> list[tuple[str, str]]:
    sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
    mixes = [("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple")]
    turns = []
    for _ in range(rng.randint(1, 2)):
        kind = rng.choice(["sides", "add", "mix"])
        if kind == "sides":
            s = rng.choice(sorted(sides))
            turns.append((f"How many sides does {article(s)} {s} have?", f"{capitalize(number_word(sides[s]))}."))
        elif kind == "add":
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            turns.append((f"What is {a} plus {b}?", f"{a + b}."))
        else:
            c1, c2, out = rng.choice(mixes)
            turns.append((f"What color do you get when you mix {c1} and {c2}?", f"{capitalize(out)}."))
    return turns


def _conv(turns: Sequence[tuple[str, str]], image_first: bool | None) -> list[dict[str, str]]:
    """LLaVA conversation list; image_first None: text-only, True/False: '<image>' before/after."""
    out = []
    for i, (q, a) in enumerate(turns):
        if i == 0 and image_first is not None:
            q = f"<image>\n{q}" if image_first else f"{q}\n<image>"
        out.append({"from": "human", "value": q})
        out.append({"from": "gpt", "value": a})
    return out


# ----------------------------------------------------------------------------- writing

def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def generate(
    out_dir: str | Path,
    num_train: int = 2000,
    num_eval: int = 200,
    seed: int = 0,
    image_size: int = 64,
    *,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] | Mapping[str, tuple[int, int, int]] = DEFAULT_COLORS,
    min_objects: int = 1,
    max_objects: int = 4,
    eval_questions_per_image: int = 3,
    num_text_only: int | None = None,
    num_text_existence: int = 0,
    stage2_rows_per_image: int = 1,
    image_format: str = "png",
    **world_kwargs: Any,
) -> dict[str, Any]:
    """Write a shapes-world data set to `out_dir` (see the module docstring for the files).

    Returns the manifest (also written to manifest.json, with relative file names) plus
    `root` (absolute out_dir) and `seconds` (wall time). Same arguments -> identical files."""
    t0 = time.perf_counter()
    fmt = image_format.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    ext = "jpg" if fmt in ("jpg", "jpeg") else "png"
    if not 1 <= eval_questions_per_image <= len(EVAL_CATEGORIES):
        raise ValueError(f"eval_questions_per_image must be in 1..{len(EVAL_CATEGORIES)}")
    world = ShapesWorld(seed, image_size, shapes, colors, min_objects, max_objects, **world_kwargs)
    root = Path(out_dir)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    def save(img: Image.Image, name: str) -> None:
        if ext == "png":
            img.save(img_dir / name, format="PNG", compress_level=1)
        else:
            img.save(img_dir / name, format="JPEG", quality=95)

    # ---- train: annotations, stage 1, stage 2
    annotations, stage1, stage2 = [], [], []
    train_sigs = set()
    for i in range(num_train):
        scene = world.sample_scene(i, "train")
        train_sigs.add(scene.signature())
        name = f"{scene.id}.{ext}"
        save(world.render(scene), name)
        rng = world.rng("train", i, "text")
        ann = world.annotation(scene, name, rng)
        annotations.append(ann)
        instr = rng.choice(STAGE1_INSTRUCTIONS)
        stage1.append({"id": scene.id, "image": name,
                       "conversations": _conv([(instr, rng.choice(ann["captions"]))], rng.random() < 0.5)})
        qas = world.conversation(scene, rng, ann["captions"])
        stage2.append({"id": scene.id, "image": name,
                       "conversations": _conv([(qa.question, qa.response) for qa in qas], True)})
        for r in range(1, stage2_rows_per_image):  # more conversations about the same image
            qas = world.conversation(scene, world.rng("train", i, f"text{r}"), ann["captions"])
            stage2.append({"id": f"{scene.id}_{r}", "image": name,
                           "conversations": _conv([(qa.question, qa.response) for qa in qas], True)})

    n_text = max(2, num_train // 50) if num_text_only is None else int(num_text_only)
    trng = world.rng("text_only", 0, "rows")
    for j in range(n_text):
        row = {"id": f"text_{j:06d}", "conversations": _conv(_text_only_conversation(trng), None)}
        stage2.insert(trng.randint(0, len(stage2)), row)
    xrng = world.rng("text_existence", 0, "rows")
    for j in range(int(num_text_existence)):
        scene = world.sample_scene(j, "text")
        row = {"id": f"text_existence_{j:06d}",
               "conversations": _conv(world.text_existence_turns(scene, xrng), None)}
        stage2.insert(xrng.randint(0, len(stage2)), row)

    # ---- eval: held-out scenes (own seeds; any layout identical to a train one is resampled)
    eval_ann, eval_rows = [], []
    n_exist = 0
    for i in range(num_eval):
        attempt = 0
        scene = world.sample_scene(i, "eval", attempt)
        while scene.signature() in train_sigs and attempt < 10:
            attempt += 1
            scene = world.sample_scene(i, "eval", attempt)
        name = f"{scene.id}.{ext}"
        save(world.render(scene), name)
        rng = world.rng("eval", i, "text", attempt)
        eval_ann.append(world.annotation(scene, name, rng))
        k = i % len(EVAL_CATEGORIES)
        order = EVAL_CATEGORIES[k:] + EVAL_CATEGORIES[:k]
        got = 0
        for cat in order:
            if got == eval_questions_per_image:
                break
            yes = (n_exist % 2 == 0) if cat == "existence" else None
            qa = world.make_question(scene, cat, rng, canonical_only=True, existence_yes=yes)
            if qa is None:
                continue
            n_exist += cat == "existence"
            choices = world.choices(cat)
            eval_rows.append({
                "question_id": len(eval_rows), "image": name, "text": qa.question,
                "category": cat, "answer": qa.answer, "choices": choices, "chance": 1 / len(choices),
            })
            got += 1

    # ---- write
    files = {
        "image_folder": "images", "annotations": "annotations.jsonl",
        "eval_annotations": "eval_annotations.jsonl", "stage1": "stage1.json",
        "stage2": "stage2.json", "eval": "eval.jsonl", "manifest": "manifest.json",
    }
    _write_jsonl(root / files["annotations"], annotations)
    _write_jsonl(root / files["eval_annotations"], eval_ann)
    (root / files["stage1"]).write_text(json.dumps(stage1), encoding="utf-8")
    (root / files["stage2"]).write_text(json.dumps(stage2), encoding="utf-8")
    _write_jsonl(root / files["eval"], eval_rows)

    per_cat = Counter(r["category"] for r in eval_rows)
    majority = {}
    for cat in EVAL_CATEGORIES:
        answers = Counter(r["answer"] for r in eval_rows if r["category"] == cat)
        majority[cat] = (max(answers.values()) / per_cat[cat]) if per_cat[cat] else None
    exist = [r for r in eval_rows if r["category"] == "existence"]
    manifest = {
        "format": "llava_jax.synthetic.shapes/1",
        "config": {**world.config(), "image_format": ext,
                   "eval_questions_per_image": eval_questions_per_image},
        "files": files,
        "counts": {
            "train_images": num_train, "eval_images": num_eval,
            "stage1_rows": len(stage1), "stage2_rows": len(stage2), "stage2_text_only_rows": n_text,
            "stage2_text_existence_rows": int(num_text_existence),
            "stage2_rows_per_image": int(stage2_rows_per_image),
            "eval_questions": len(eval_rows), "eval_questions_per_category": dict(per_cat),
        },
        "chance": chance_rates(world),
        "majority_baseline": majority,
        "eval_existence_yes_rate": (sum(r["answer"] == "yes" for r in exist) / len(exist)) if exist else None,
    }
    (root / files["manifest"]).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return {**manifest, "root": str(root.resolve()), "seconds": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate the synthetic shapes-world data set.")
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    p.add_argument("--colors", default=",".join(DEFAULT_COLORS))
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--eval-questions-per-image", type=int, default=3)
    p.add_argument("--image-format", default="png")
    a = p.parse_args(argv)
    m = generate(a.out, a.num_train, a.num_eval, a.seed, a.image_size,
                 shapes=a.shapes.split(","), colors=a.colors.split(","), max_objects=a.max_objects,
                 eval_questions_per_image=a.eval_questions_per_image, image_format=a.image_format)
    print(json.dumps({"root": m["root"], "seconds": round(m["seconds"], 2), "counts": m["counts"],
                      "chance": m["chance"], "majority_baseline": m["majority_baseline"]}, indent=1))


if __name__ == "__main__":
    main()
