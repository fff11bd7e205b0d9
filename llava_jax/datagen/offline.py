"""The offline template writer: deterministic replies from captions + boxes, no model.

It writes what an LLM would be asked to write, in the same reply format, so the rest of the
tool (parsing, validation, rows, resume) runs unchanged without a network. Only facts that
follow from the annotation are stated, so every answer is definite:

* conversation: 2-4 exchanges drawn (seeded per item) from: which objects are present (all of
  them, with counts), how many of a category there are, where a category with a single
  instance is (thirds of the frame: "in the top left", "on the right", "in the center"), whether
  one single-instance object is left or right of another (box centres at least 0.15 apart),
  and what the picture shows (a caption) when there are no boxes.
* detail: the first caption, the inventory with counts, each object's position (up to 8,
  left to right), and which object dominates the frame when one covers over a quarter of it.
* complex: one step-by-step question: which object is nearest the centre (when unambiguous:
  the runner-up is at least 0.05 further), else which object is the main subject (largest
  box), else (no boxes) what kind of place this is, answered from the captions.

Works for the shapes world (categories such as ``"red circle"``) and for COCO annotations.
"""
from __future__ import annotations

import math
import random
from collections import Counter

from llava_jax.datagen.annotations import position_of
from llava_jax.datagen.annotations import Annotation, Instance

__all__ = ["write_reply", "plural", "position_phrase"]

_IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep",
              "skis": "pairs of skis", "scissors": "pairs of scissors", "bus": "buses", "glass": "glasses",
              "wine glass": "wine glasses", "child": "children", "man": "men", "woman": "women",
              "tv": "TVs", "cross": "crosses"}
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve")


def plural(noun: str) -> str:
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        p = _IRREGULAR[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        p = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def _num(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _centre(i: Instance) -> tuple[float, float]:
    x1, y1, x2, y2 = i.bbox
    return (x1 + x2) / 2, (y1 + y2) / 2


def _area(i: Instance) -> float:
    x1, y1, x2, y2 = i.bbox
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def position(i: Instance) -> str:
    return position_of(i.bbox)  # the shapes world's thirds rule: one vocabulary of positions


def position_phrase(pos: str) -> str:
    if pos == "center":
        return "in the center of the image"
    if pos in ("left", "right"):
        return f"on the {pos} side of the image"
    if pos in ("top", "bottom"):
        return f"at the {pos} of the image"
    return f"in the {pos} part of the image"


def _short_phrase(pos: str) -> str:
    return position_phrase(pos).replace(" side of the image", "").replace(" part of the image", "").replace(
        " of the image", "")


def _inventory(insts) -> str:
    counts = Counter(i.category for i in insts)
    return _join(f"{_a(c)} {c}" if n == 1 else f"{_num(n)} {plural(c)}" for c, n in counts.items())


def _conversation(ann: Annotation, rng: random.Random) -> list[tuple[str, str]]:
    insts = list(ann.instances)
    if not insts:
        return [("What does the picture show?", _cap(ann.captions[0].rstrip(".")) + "."),
                ("Can you name any particular objects in it?",
                 "No single object stands out clearly enough to name with certainty; the scene as a whole "
                 "is what the picture is about.")]
    counts = Counter(i.category for i in insts)
    singles = [i for i in insts if counts[i.category] == 1]
    pool: list[tuple[str, str]] = []
    for c, n in sorted(counts.items()):
        if n == 1:
            pool.append((f"How many {plural(c)} are there in the picture?", f"There is one {c} in the picture."))
        else:
            pool.append((f"How many {plural(c)} can you see?", f"I can see {_num(n)} {plural(c)}."))
    for i in singles:
        pool.append((f"Where is the {i.category} in the image?",
                     f"The {i.category} is {position_phrase(position(i))}."))
    for a in singles:
        for b in singles:
            if a is b:
                continue
            dx = _centre(a)[0] - _centre(b)[0]
            if abs(dx) >= 0.15 and a.category < b.category:
                side = "left" if dx < 0 else "right"
                pool.append((f"Is the {a.category} to the left or to the right of the {b.category}?",
                             f"The {a.category} is to the {side} of the {b.category}."))
    rng.shuffle(pool)
    k = rng.randint(1, 3)
    first = ("What objects can you see in this image?", f"The image shows {_inventory(insts)}.")
    return [first] + pool[:k]


def _detail(ann: Annotation, rng: random.Random) -> str:
    insts = list(ann.instances)
    first = _cap(ann.captions[0].rstrip(".")) + "."
    if not insts:
        extra = [c for c in ann.captions[1:] if c != ann.captions[0]]
        more = (" " + _cap(extra[0].rstrip(".")) + ".") if extra else ""
        return f"{first}{more} The scene is taken in as a whole, without any single object standing out."
    sentences = [first, f"Looking more closely, the picture contains {_inventory(insts)}."]
    counts = Counter(i.category for i in insts)
    ordered = sorted(insts, key=lambda i: (_centre(i)[0], _centre(i)[1]))
    for cat in list(dict.fromkeys(i.category for i in ordered))[:8]:
        where = list(dict.fromkeys(position(i) for i in ordered if i.category == cat))
        if counts[cat] == 1:
            sentences.append(f"The {cat} is {position_phrase(where[0])}.")
        elif len(where) == 1:
            sentences.append(f"All {_num(counts[cat])} {plural(cat)} are {position_phrase(where[0])}.")
        else:
            sentences.append(f"The {plural(cat)} are spread over the image: "
                             f"{_join(_short_phrase(w) for w in where)}.")
    big = max(insts, key=_area)
    if _area(big) > 0.25:
        sentences.append(f"The {big.category} takes up a large part of the frame and draws the eye first.")
    return " ".join(sentences)


def _complex(ann: Annotation, rng: random.Random) -> tuple[str, str]:
    insts = list(ann.instances)
    if not insts:
        return ("What kind of place is shown here, and what suggests it?",
                f"Let me go through what is visible. {_cap(ann.captions[0].rstrip('.'))}. "
                "Since no individual object stands out, the setting itself is the subject, and the overall "
                "scene is what tells us what kind of place this is.")
    if len(insts) >= 2:
        dist = sorted(((math.dist(_centre(i), (0.5, 0.5)), j) for j, i in enumerate(insts)))
        if dist[1][0] - dist[0][0] >= 0.05 and Counter(i.category for i in insts)[insts[dist[0][1]].category] == 1:
            near = insts[dist[0][1]]
            steps = [f"the {i.category} is {position_phrase(position(i))}" for i in insts[:6]]
            return ("Which object is closest to the center of the picture? Explain how you can tell.",
                    "Let's check where each object is. " + _cap(_join(steps)) + ". "
                    f"Comparing these, the {near.category} sits nearest to the middle of the frame, while the "
                    f"other objects are further out. So the {near.category} is the object closest to the center.")
    big = max(insts, key=_area)
    others = [i for i in insts if i is not big]
    counts = Counter(i.category for i in insts)
    name = f"largest {big.category}" if counts[big.category] > 1 else big.category
    answer = (f"Step by step: the picture contains {_inventory(insts)}. The {name} is "
              f"{position_phrase(position(big))} and is the largest object in view")
    other_cats = sorted({i.category for i in others if i.category != big.category})
    if other_cats:
        answer += f", larger than the {_join(other_cats)}"
    elif others:
        answer += f", larger than the other {plural(big.category)}"
    answer += (f". The object that fills the most of the frame is usually what the photographer meant to show, "
               f"so the {name} is most likely the main subject of this picture.")
    return ("What is most likely the main subject of this picture, and why?", answer)


def write_reply(task: str, ann: Annotation, seed: int = 0) -> str:
    """The reply text for ``task`` (conversation / detail / complex), in the prompts' format."""
    rng = random.Random(f"template|{seed}|{ann.id}|{task}")
    if task == "detail":
        return _detail(ann, rng)
    if task == "conversation":
        pairs = _conversation(ann, rng)
    elif task == "complex":
        pairs = [_complex(ann, rng)]
    else:
        raise ValueError(f"unknown task {task!r}")
    return "\n===\n".join(f"Question:\n{q}\n===\nAnswer:\n{a}" for q, a in pairs)
