"""A synthetic "shapes world": small images of coloured shapes, with captions, boxes and Q&A.

It is the data behind the offline demo and many tests. A tiny LLaVA (tiny ViT + tiny LLaMA,
trained from scratch on CPU) can learn it in minutes: small images (64 px by default),
1-4 solid shapes on a plain background, a few shapes and colours, short definite answers.

Generate a data set (about 2 s for 2000 + 200 images at 64 px on one CPU core):

    python -m llava_jax.data.synthetic --out /tmp/shapes --num-train 2000 --num-eval 200

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
    (no ``image`` key, no ``<image>``). Question types: ``color``, ``shape``, ``count``,
    ``position``, ``existence`` (yes/no about 50/50), and rarely ``describe`` (answer = a caption).
    ``ShapesWorld(turns=(lo, hi), question_mix={category: weight})`` set the questions per row and
    their mix; ``existence_evidence=True`` makes existence answers state what the image has of the
    asked shape before the verdict ("The circle is blue. No.", "There is no circle. No.");
    ``shape_negative_prob`` sets the share of "no" existence answers in these rows that name a
    shape in the image ("Is there a red circle?" next to a blue circle; default None: the mix of
    ``eval.jsonl``, half sharing a colour or shape with the image, half any absent pair).
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
import dataclasses
import json
import math
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- vocabulary

ALL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "diamond")
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
    "cyan": (20, 190, 200),
    "black": (25, 25, 25),
}
DEFAULT_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}

PLURALS: dict[str, str] = {s: s + "s" for s in ALL_SHAPES}
PLURALS["cross"] = "crosses"

EVAL_CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "position", "existence")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)

# Question templates per category. Placeholders: {color}, {shape}, {shapes} (plural shape),
# {subject} ("circle" or "red circle"), {count_of} (see _count_question). Tests parse the
# generated questions back with these templates, so keep the placeholders whole words.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the {shape}?",
        "What is the color of the {shape}?",
        "Which color does the {shape} have?",
    ),
    "shape": (
        "What shape is {color}?",
        "What is the shape of the {color} object?",
        "Which shape is {color}?",
    ),
    "count": (
        "How many shapes are in the image?",
        "How many shapes are there?",
        "How many objects can you see?",
    ),
    "count_color": ("How many {color} shapes are there?",),
    "count_shape": ("How many {shapes} are there?", "How many {shapes} are in the image?"),
    "position": (
        "Where is the {subject}?",
        "Where is the {subject} located?",
        "In which part of the image is the {subject}?",
    ),
    "existence": (
        "Is there a {color} {shape} in the image?",
        "Is there a {color} {shape}?",
        "Does the image contain a {color} {shape}?",
    ),
    "describe": (
        "Describe the image briefly.",
        "What is in the image?",
        "Give a short description of the image.",
    ),
}

STAGE1_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
)

# The shape-independent part of the star: a 5-point star, normalised to fill [0, 1]^2.
_STAR_UNIT: list[tuple[float, float]] = []


def _star_unit() -> list[tuple[float, float]]:
    if not _STAR_UNIT:
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), -r * math.sin(a)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        _STAR_UNIT.extend(((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts)
    return _STAR_UNIT


# ----------------------------------------------------------------------------- scene

@dataclasses.dataclass(frozen=True)
class Obj:
    """One shape. ``box`` is in pixels, inclusive: it covers columns x0..x1 and rows y0..y1."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    image_size: int

    @property
    def category(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def bbox(self) -> list[float]:
        """Normalised [x1, y1, x2, y2] (pixel edges, 0-1), rounded like the reference file."""
        x0, y0, x1, y1 = self.box
        s = float(self.image_size)
        return [round(x0 / s, 3), round(y0 / s, 3), round((x1 + 1) / s, 3), round((y1 + 1) / s, 3)]

    @property
    def position(self) -> str:
        return position_of(self.bbox)


@dataclasses.dataclass(frozen=True)
class Scene:
    id: str
    objects: tuple[Obj, ...]
    image_size: int

    def signature(self) -> tuple:
        return tuple(sorted((o.shape, o.color, o.box) for o in self.objects))


def position_of(bbox: Sequence[float]) -> str:
    """Canonical position of a normalised box from its centre's thirds: one of POSITIONS."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    if v == "middle":
        return h
    if h == "center":
        return v
    return f"{v} {h}"


def position_phrase(position: str) -> str:
    """"left" -> "on the left", "top" -> "at the top", "top left" -> "in the top left"."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"in the {position}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _phrase(obj: Obj) -> str:
    return f"{_article(obj.color)} {obj.color} {obj.shape}"


def _group_phrases(objs: Sequence[Obj]) -> list[str]:
    """["a red circle", "two blue squares"] in first-seen order."""
    counts = Counter((o.color, o.shape) for o in objs)
    out = []
    for (color, shape), n in counts.items():
        if n == 1:
            out.append(f"{_article(color)} {color} {shape}")
        else:
            out.append(f"{_number_word(n)} {color} {PLURALS[shape]}")
    return out


def reading_order(objs: Sequence[Obj]) -> list[Obj]:
    """Top to bottom, then left to right, by the thirds of the image."""
    third = lambda v: min(2, int(3 * v))  # noqa: E731
    return sorted(objs, key=lambda o: (third((o.bbox[1] + o.bbox[3]) / 2), o.bbox[0]))


def shape_evidence(objs: Sequence[Obj], shape: str) -> str:
    """What the image has of one shape, in reading order: "The circle is blue.", "The circles are
    red and green.", "There is no circle." """
    found = [o.color for o in reading_order(objs) if o.shape == shape]
    if not found:
        return f"There is no {shape}."
    colors = list(dict.fromkeys(found))
    return f"The {shape} is {colors[0]}." if len(found) == 1 else f"The {PLURALS[shape]} are {_join(colors)}."


@dataclasses.dataclass(frozen=True)
class QA:
    category: str  # color/shape/count/position/existence/describe
    question: str
    answer: str  # canonical short answer (lower case), used for scoring
    response: str  # the gpt turn text used for training


# ----------------------------------------------------------------------------- the world

class ShapesWorld:
    """Samples, renders and describes scenes. Deterministic: a scene depends only on
    (seed, split, index) and the settings, never on what was generated before."""

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        shapes: Sequence[str] = DEFAULT_SHAPES,
        colors: Sequence[str] | Mapping[str, tuple[int, int, int]] = DEFAULT_COLORS,
        min_objects: int = 1,
        max_objects: int = 4,
        size_range: tuple[float, float] = (0.16, 0.34),
        background: str = "white",
        position_margin: float = 0.03,
        short_answer_prob: float = 0.5,
        describe_prob: float = 0.1,
        grid: int = 0,
        reading_order: bool = False,
        turns: tuple[int, int] = (1, 3),
        question_mix: Mapping[str, float] | None = None,
        existence_evidence: bool = False,
        shape_negative_prob: float | None = None,
    ):
        unknown = [s for s in shapes if s not in ALL_SHAPES]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; available: {list(ALL_SHAPES)}")
        if isinstance(colors, Mapping):
            self.color_rgb = {str(k): tuple(int(c) for c in v) for k, v in colors.items()}
        else:
            missing = [c for c in colors if c not in COLOR_RGB]
            if missing:
                raise ValueError(f"unknown colors {missing}; available: {list(COLOR_RGB)} "
                                 "(or pass a mapping name -> (r, g, b))")
            self.color_rgb = {c: COLOR_RGB[c] for c in colors}
        if background not in BACKGROUND_RGB:
            raise ValueError(f"unknown background {background!r}; available: {list(BACKGROUND_RGB)}")
        bg = BACKGROUND_RGB[background]
        if background in self.color_rgb or bg in self.color_rgb.values():
            raise ValueError(f"background {background!r} equals one of the shape colours")
        if len(shapes) < 1 or len(self.color_rgb) < 2:
            raise ValueError("need at least 1 shape and 2 colours")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        lo, hi = size_range
        if not 0 < lo <= hi < 1:
            raise ValueError(f"size_range must satisfy 0 < lo <= hi < 1, got {size_range}")
        if grid and (grid < 2 or max_objects > grid * grid or image_size // grid < 8):
            raise ValueError(f"grid={grid} needs grid >= 2, max_objects <= grid**2 and cells of >= 8 px "
                             f"(image_size {image_size}, max_objects {max_objects})")
        t_lo, t_hi = (int(t) for t in turns)
        if not 1 <= t_lo <= t_hi:
            raise ValueError(f"turns must satisfy 1 <= lo <= hi, got {turns}")
        if question_mix is not None:
            bad = sorted(set(question_mix) - set(EVAL_CATEGORIES))
            if bad or any(w < 0 for w in question_mix.values()) or sum(question_mix.values()) <= 0:
                raise ValueError(f"question_mix needs non-negative weights over {list(EVAL_CATEGORIES)} "
                                 f"(not all zero), got {dict(question_mix)}")
            question_mix = {c: float(question_mix.get(c, 0.0)) for c in EVAL_CATEGORIES}
        self.turns = (t_lo, t_hi)
        self.existence_evidence = bool(existence_evidence)
        if shape_negative_prob is not None and not 0 <= shape_negative_prob <= 1:
            raise ValueError(f"shape_negative_prob must be None or in [0, 1], got {shape_negative_prob}")
        self.shape_negative_prob = None if shape_negative_prob is None else float(shape_negative_prob)
        self.question_mix = question_mix
        self.grid = int(grid)
        self.reading_order = bool(reading_order)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.shapes = tuple(shapes)
        self.colors = tuple(self.color_rgb)
        self.min_objects = int(min_objects)
        self.max_objects = int(max_objects)
        self.size_range = (float(lo), float(hi))
        self.background = background
        self.background_rgb = bg
        self.position_margin = float(position_margin)
        self.short_answer_prob = float(short_answer_prob)
        self.describe_prob = float(describe_prob)

    # -- settings --------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "image_size": self.image_size, "shapes": list(self.shapes),
            "colors": {k: list(v) for k, v in self.color_rgb.items()},
            "min_objects": self.min_objects, "max_objects": self.max_objects,
            "size_range": list(self.size_range), "background": self.background,
            "position_margin": self.position_margin, "short_answer_prob": self.short_answer_prob,
            "describe_prob": self.describe_prob, "grid": self.grid,
            "reading_order": self.reading_order, "turns": list(self.turns),
            "question_mix": self.question_mix, "existence_evidence": self.existence_evidence,
            "shape_negative_prob": self.shape_negative_prob,
        }

    def rng(self, split: str, index: int, purpose: str, attempt: int = 0) -> random.Random:
        # str seeds are hashed with sha512 by `random`: stable across runs and processes.
        return random.Random(f"{self.seed}|{split}|{index}|{attempt}|{purpose}")

    # -- layout ------------------------------------------------------------------------------
    def sample_scene(self, index: int, split: str = "train", attempt: int = 0) -> Scene:
        rng = self.rng(split, index, "scene", attempt)
        W = self.image_size
        n = rng.randint(self.min_objects, self.max_objects)
        if self.grid:
            return self._sample_grid_scene(rng, index, split, n)
        smin = max(6, round(self.size_range[0] * W))
        smax = max(smin, round(self.size_range[1] * W))
        pad, gap, m = max(1, W // 32), 1, self.position_margin
        boxes: list[tuple[int, int, int, int]] = []
        objs: list[Obj] = []

        def ok_centre(c: float) -> bool:
            return abs(c - 1 / 3) >= m and abs(c - 2 / 3) >= m

        def free(b) -> bool:
            return all(b[2] + gap < o[0] or o[2] + gap < b[0] or b[3] + gap < o[1] or o[3] + gap < b[1]
                       for o in boxes)

        for _ in range(n):
            shape, color = rng.choice(self.shapes), rng.choice(self.colors)
            hi = smax
            placed = None
            for _shrink in range(4):
                for _try in range(60):
                    s = rng.randint(smin, hi)
                    x0, y0 = rng.randint(pad, W - pad - s), rng.randint(pad, W - pad - s)
                    b = (x0, y0, x0 + s - 1, y0 + s - 1)
                    if ok_centre((x0 + s / 2) / W) and ok_centre((y0 + s / 2) / W) and free(b):
                        placed = b
                        break
                if placed or hi == smin:
                    break
                hi = max(smin, int(hi * 0.8))
            if placed is None:
                continue  # no room: this scene has fewer objects
            boxes.append(placed)
            objs.append(Obj(shape, color, placed, W))
        if len(objs) < self.min_objects:  # pragma: no cover - only with extreme settings
            return self.sample_scene(index, split, attempt + 1)
        return Scene(f"{split}_{index:06d}", tuple(objs), W)

    def _sample_grid_scene(self, rng: random.Random, index: int, split: str, n: int) -> Scene:
        """Grid layout: the image is `grid` x `grid` cells and each object sits inside its own
        cell (size from size_range relative to the cell, small jitter). With a ViT whose patch is
        one cell, every object is whole inside one patch: the layout the offline demo uses so
        that a tower trained from scratch in minutes can see shapes (see configs/demo.py)."""
        W, g = self.image_size, self.grid
        cell = W // g
        lo = max(5, round(self.size_range[0] * cell))
        hi = max(lo, min(cell - 2, round(self.size_range[1] * cell)))
        objs = []
        for k in rng.sample(range(g * g), n):
            r, c = divmod(k, g)
            s = rng.randint(lo, hi)
            x0 = c * cell + rng.randint(1, cell - 1 - s)
            y0 = r * cell + rng.randint(1, cell - 1 - s)
            objs.append(Obj(rng.choice(self.shapes), rng.choice(self.colors), (x0, y0, x0 + s - 1, y0 + s - 1), W))
        return Scene(f"{split}_{index:06d}", tuple(objs), W)

    # -- rendering -----------------------------------------------------------------------------
    def render(self, scene: Scene) -> Image.Image:
        img = Image.new("RGB", (scene.image_size, scene.image_size), self.background_rgb)
        draw = ImageDraw.Draw(img)
        for o in scene.objects:
            draw_shape(draw, o.shape, o.box, self.color_rgb[o.color])
        return img

    # -- language ------------------------------------------------------------------------------
    def captions(self, scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
        objs = list(scene.objects)
        n = len(objs)
        bg = self.background

        def shuffled() -> list[Obj]:
            if self.reading_order:
                return reading_order(objs)
            o = objs[:]
            rng.shuffle(o)
            return o

        def groups() -> str:
            return _join(_group_phrases(shuffled()))

        lr = shuffled() if self.reading_order else sorted(objs, key=lambda o: (o.box[0] + o.box[2], o.box[1]))
        count = f"{_number_word(n)} {'shape' if n == 1 else 'shapes'}"
        there = "There is" if n == 1 else "There are"
        templates = [
            lambda: f"{_cap(groups())} on a {bg} background.",
            lambda: f"{there} {count}: {groups()}.",
            lambda: _cap(_join([f"{_phrase(o)} {position_phrase(o.position)}" for o in lr])) + ".",
            lambda: f"An image of {groups()}.",
            lambda: f"{_cap(count)} on a {bg} background: {groups()}.",
            lambda: f"A simple drawing of {groups()}.",
            lambda: _cap(_join([f"{_phrase(o)} {position_phrase(o.position)}" for o in shuffled()]))
            + f" on a {bg} background.",
            lambda: f"A plain {bg} image showing {groups()}.",
        ]
        chosen = rng.sample(range(len(templates)), k)
        return [templates[i]() for i in chosen]

    def annotation(self, scene: Scene, image_name: str, rng: random.Random) -> dict[str, Any]:
        return {
            "id": scene.id,
            "image": image_name,
            "captions": self.captions(scene, rng),
            "instances": [{"category": o.category, "bbox": o.bbox} for o in scene.objects],
        }

    def make_question(self, scene: Scene, category: str, rng: random.Random, *,
                      canonical_only: bool = False, existence_yes: bool | None = None,
                      captions: Sequence[str] | None = None,
                      shape_negatives: float | None = None) -> QA | None:
        """One definite question of `category` about `scene`, or None if none can be asked.

        canonical_only: eval mode - count questions only ask the total count.
        existence_yes: force a yes/no existence answer (None: fair coin).
        shape_negatives: the share of "no" existence answers that name a shape in the image (None:
        half of them share a colour or shape with the image, half are any absent pair)."""
        objs = scene.objects
        short = rng.random() < self.short_answer_prob
        shape_counts = Counter(o.shape for o in objs)
        color_counts = Counter(o.color for o in objs)
        combo_counts = Counter(o.category for o in objs)
        T = QUESTION_TEMPLATES

        if category == "color":
            cands = [o for o in objs if shape_counts[o.shape] == 1]
            if not cands:
                return None
            o = rng.choice(cands)
            q = rng.choice(T["color"]).format(shape=o.shape)
            resp = f"{_cap(o.color)}." if short else rng.choice(
                [f"The {o.shape} is {o.color}.", f"It is {o.color}."])
            return QA("color", q, o.color, resp)

        if category == "shape":
            cands = [o for o in objs if color_counts[o.color] == 1]
            if not cands:
                return None
            o = rng.choice(cands)
            q = rng.choice(T["shape"]).format(color=o.color)
            resp = f"{_cap(_article(o.shape))} {o.shape}." if short else rng.choice(
                [f"The {o.color} shape is {_article(o.shape)} {o.shape}.", f"It is {_article(o.shape)} {o.shape}."])
            return QA("shape", q, o.shape, resp)

        if category == "count":
            kind = "total" if canonical_only else rng.choice(["total", "total", "color", "shape"])
            if kind == "total":
                n, q, noun = len(objs), rng.choice(T["count"]), "shape"
                noun_pl = "shapes"
            elif kind == "color":
                c = rng.choice(sorted(color_counts))
                n, q = color_counts[c], rng.choice(T["count_color"]).format(color=c)
                noun, noun_pl = f"{c} shape", f"{c} shapes"
            else:
                s = rng.choice(sorted(shape_counts))
                n, q = shape_counts[s], rng.choice(T["count_shape"]).format(shapes=PLURALS[s])
                noun, noun_pl = s, PLURALS[s]
            if short:
                resp = rng.choice([f"{n}", f"{_cap(_number_word(n))}."])
            else:
                resp = (f"There is {_number_word(n)} {noun}." if n == 1
                        else f"There are {_number_word(n)} {noun_pl}.")
            return QA("count", q, str(n), resp)

        if category == "position":
            cands = [o for o in objs if combo_counts[o.category] == 1]
            if not cands:
                return None
            o = rng.choice(cands)
            subject = o.shape if shape_counts[o.shape] == 1 and rng.random() < 0.5 else o.category
            q = rng.choice(T["position"]).format(subject=subject)
            phrase = position_phrase(o.position)
            # Short answers name the place ("Top left.", "Center."), like LLaVA's single-phrase
            # answers; the long ones say it in a sentence ("The circle is in the top left.").
            resp = f"{_cap(o.position)}." if short else f"The {subject} is {phrase}."
            return QA("position", q, o.position, resp)

        if category == "existence":
            yes = rng.random() < 0.5 if existence_yes is None else existence_yes
            if yes:
                o = rng.choice(objs)
                color, shape = o.color, o.shape
            else:
                present = set(combo_counts)
                absent = [(c, s) for c in self.colors for s in self.shapes if f"{c} {s}" not in present]
                if not absent:
                    return None
                if shape_negatives is None:  # half of the time a hard negative: shares colour or shape
                    hard = [(c, s) for c, s in absent if c in color_counts or s in shape_counts]
                    share = 0.5
                else:
                    hard = [(c, s) for c, s in absent if s in shape_counts]
                    share = shape_negatives
                color, shape = rng.choice(hard if hard and rng.random() < share else absent)
            q = rng.choice(T["existence"]).format(color=color, shape=shape)
            thing = f"{_article(color)} {color} {shape}"
            if self.existence_evidence:  # "The circle is blue. No."
                resp = f"{shape_evidence(objs, shape)} {'Yes' if yes else 'No'}."
            elif yes:
                resp = "Yes." if short else f"Yes, there is {thing}."
            else:
                resp = "No." if short else f"No, there is no {color} {shape}."
            return QA("existence", q, "yes" if yes else "no", resp)

        if category == "describe":
            caps = list(captions) if captions else self.captions(scene, rng, k=1)
            cap = rng.choice(caps)
            return QA("describe", rng.choice(T["describe"]), cap, cap)

        raise ValueError(f"unknown question category {category!r}; known: {list(EVAL_CATEGORIES) + ['describe']}")

    def choices(self, category: str) -> list[str]:
        if category == "color":
            return list(self.colors)
        if category == "shape":
            return list(self.shapes)
        if category == "count":
            return [str(n) for n in range(self.min_objects, self.max_objects + 1)]
        if category == "position":
            return list(POSITIONS)
        if category == "existence":
            return ["yes", "no"]
        raise ValueError(f"no fixed choices for category {category!r}")

    # -- rows -----------------------------------------------------------------------------------
    def conversation(self, scene: Scene, rng: random.Random, captions: Sequence[str]) -> list[QA]:
        """`turns` (lo..hi) distinct questions about one scene (stage 2); categories drawn
        uniformly or by `question_mix`."""
        k = rng.randint(*self.turns)
        mix = self.question_mix
        qas: list[QA] = []
        seen: set[str] = set()
        if rng.random() < self.describe_prob:
            qa = self.make_question(scene, "describe", rng, captions=captions)
            qas.append(qa)
            seen.add(qa.question)
        tries = 0
        while len(qas) < k and tries < max(20, 10 * k):
            tries += 1
            cat = (rng.choice(EVAL_CATEGORIES) if mix is None
                   else rng.choices(EVAL_CATEGORIES, weights=[mix[c] for c in EVAL_CATEGORIES])[0])
            qa = self.make_question(scene, cat, rng, shape_negatives=self.shape_negative_prob)
            if qa is None or qa.question in seen:
                continue
            qas.append(qa)
            seen.add(qa.question)
        return qas


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], fill) -> None:
    """Fill `shape` so that its pixels span exactly the inclusive pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    elif shape == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        s = x1 - x0 + 1
        t = max(2, round(s * 0.34))
        a = (s - t) // 2
        draw.rectangle([x0 + a, y0, x0 + a + t - 1, y1], fill=fill)
        draw.rectangle([x0, y0 + a, x1, y0 + a + t - 1], fill=fill)
    elif shape == "star":
        w, h = x1 - x0, y1 - y0
        draw.polygon([(x0 + u * w, y0 + v * h) for u, v in _star_unit()], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; available: {list(ALL_SHAPES)}")


# ----------------------------------------------------------------------------- text-only rows

def _text_only_conversation(rng: random.Random) -> list[tuple[str, str]]:
    sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
    mixes = [("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple")]
    turns = []
    for _ in range(rng.randint(1, 2)):
        kind = rng.choice(["sides", "add", "mix"])
        if kind == "sides":
            s = rng.choice(sorted(sides))
            turns.append((f"How many sides does {_article(s)} {s} have?", f"{_cap(_number_word(sides[s]))}."))
        elif kind == "add":
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            turns.append((f"What is {a} plus {b}?", f"{a + b}."))
        else:
            c1, c2, out = rng.choice(mixes)
            turns.append((f"What color do you get when you mix {c1} and {c2}?", f"{_cap(out)}."))
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


# ----------------------------------------------------------------------------- scoring

_SYNONYMS = {
    "centre": "center", "middle": "center", "central": "center", "centered": "center",
    "upper": "top", "lower": "bottom", "grey": "gray", "colour": "color",
}
_PLURAL_TO_SHAPE = {p: s for s, p in PLURALS.items()}
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)}
_NUMBERS["none"] = 0
_NEGATIONS = {"no", "not", "none", "nope", "isnt", "arent", "doesnt", "dont", "nothing", "neither"}


def _tokens(text: str) -> list[str]:
    text = str(text).lower().replace("-", " ").replace("'", "").replace("’", "")
    toks = re.findall(r"[a-z]+|\d+", text)
    return [_SYNONYMS.get(t, t) for t in toks]


def _number(tokens: Sequence[str]) -> int | None:
    for t in tokens:
        if t.isdigit():
            return int(t)
        if t in _NUMBERS:
            return _NUMBERS[t]
    return None


def _directions(tokens: Sequence[str]) -> frozenset[str]:
    d = {t for t in tokens if t in ("left", "right", "top", "bottom", "center")}
    if len(d) > 1:
        d.discard("center")  # "top center" == "top", "center left" == "left"
    return frozenset(d)


def _yes_no(tokens: Sequence[str]) -> str | None:
    if not tokens:
        return None
    if tokens[0] in ("yes", "no"):
        return tokens[0]
    if tokens[-1] in ("yes", "no"):  # a verdict after the evidence: "The circle is blue. No."
        return tokens[-1]
    if any(t in _NEGATIONS for t in tokens):
        return "no"
    if "yes" in tokens or tokens[:2] in (["there", "is"], ["there", "are"]) or "contains" in tokens:
        return "yes"
    return None


def score_answer(category: str, predicted_text: str, answer: str) -> bool:
    """True if a free-form prediction gives the canonical `answer` for a `category` question.

    Case-insensitive and punctuation-blind. color/shape: the colour (shape) words mentioned in the
    prediction must be exactly {answer} ("The circle is red." is right for "red"; "red or blue" is
    not); plurals count ("circles"). count: the first number, digits or words ("Three." == "3").
    position: the set of direction words must match, with centre/middle/upper/lower synonyms
    ("in the upper left corner" == "top left"). existence: yes/no from the first word, else from
    negations. Other categories: normalised exact match or the answer's words inside the
    prediction."""
    pred, ans = _tokens(predicted_text), _tokens(answer)
    if not ans:
        raise ValueError(f"empty canonical answer for category {category!r}")
    if category == "color":
        colors = set(COLOR_RGB) | {"gray", "white", "brown", "pink", "magenta", "violet"}
        return {t for t in pred if t in colors} == {t for t in ans if t in colors} != set()
    if category == "shape":
        def shapes(toks):
            return {_PLURAL_TO_SHAPE.get(t, t) for t in toks if t in ALL_SHAPES or t in _PLURAL_TO_SHAPE}
        return shapes(pred) == shapes(ans) != set()
    if category == "count":
        n = _number(ans)
        return n is not None and _number(pred) == n
    if category == "position":
        return _directions(pred) == _directions(ans) != frozenset()
    if category == "existence":
        return _yes_no(pred) is not None and _yes_no(pred) == _yes_no(ans)
    if pred == ans:
        return True
    k = len(ans)
    return any(pred[i:i + k] == ans for i in range(len(pred) - k + 1))


def chance_rates(world: ShapesWorld | Mapping[str, Any]) -> dict[str, float]:
    """Accuracy of uniform guessing among the valid answers, per eval category.

    `world` is a ShapesWorld or a manifest dict written by `generate`."""
    if isinstance(world, Mapping):
        cfg = world.get("config", world)
        n_colors, n_shapes = len(cfg["colors"]), len(cfg["shapes"])
        n_counts = int(cfg["max_objects"]) - int(cfg["min_objects"]) + 1
    else:
        n_colors, n_shapes = len(world.colors), len(world.shapes)
        n_counts = world.max_objects - world.min_objects + 1
    return {
        "color": 1 / n_colors,
        "shape": 1 / n_shapes,
        "count": 1 / n_counts,
        "position": 1 / len(POSITIONS),
        "existence": 0.5,
    }


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

    n_text = max(2, num_train // 50) if num_text_only is None else int(num_text_only)
    trng = world.rng("text_only", 0, "rows")
    for j in range(n_text):
        row = {"id": f"text_{j:06d}", "conversations": _conv(_text_only_conversation(trng), None)}
        stage2.insert(trng.randint(0, len(stage2)), row)

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
