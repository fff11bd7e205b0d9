"""The shapes world's vocabulary, scene geometry, phrasing and drawing (the offline demo's data;
:mod:`llava_jax.demo.scenes` samples scenes and Q&A from it, :mod:`llava_jax.demo.dataset`
writes data sets)."""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Sequence

from PIL import ImageDraw

from llava_jax.datagen.annotations import position_of

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


def position_phrase(position: str) -> str:
    """"left" -> "on the left", "top" -> "at the top", "top left" -> "in the top left"."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"in the {position}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def join_words(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def object_phrase(obj: Obj) -> str:
    return f"{article(obj.color)} {obj.color} {obj.shape}"


def group_phrases(objs: Sequence[Obj]) -> list[str]:
    """["a red circle", "two blue squares"] in first-seen order."""
    counts = Counter((o.color, o.shape) for o in objs)
    out = []
    for (color, shape), n in counts.items():
        if n == 1:
            out.append(f"{article(color)} {color} {shape}")
        else:
            out.append(f"{number_word(n)} {color} {PLURALS[shape]}")
    return out


def reading_order(objs: Sequence[Obj]) -> list[Obj]:
    """Top to bottom, then left to right, by the thirds of the image."""
    third = lambda v: min(2, int(3 * v))  # noqa: E731
    return sorted(objs, key=lambda o: (third((o.bbox[1] + o.bbox[3]) / 2), o.bbox[0]))


def shape_evidence(objs: Sequence[Obj], shape: str) -> str:
    """What the image has of one shape, one colour per object in reading order: "The circle is
    blue.", "The circles are red and red.", "There is no circle." (one word per object, repeats
    included: a model that lists the objects it sees need not also decide which colours it has
    already said; with distinct colours only, the demo model wrote "red and red" anyway)."""
    found = [o.color for o in reading_order(objs) if o.shape == shape]
    if not found:
        return f"There is no {shape}."
    return f"The {shape} is {found[0]}." if len(found) == 1 else f"The {PLURALS[shape]} are {join_words(found)}."


@dataclasses.dataclass(frozen=True)
class QA:
    category: str  # color/shape/count/position/existence/describe
    question: str
    answer: str  # canonical short answer (lower case), used for scoring
    response: str  # the gpt turn text used for training


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
