"""Scoring free-text answers to shapes-world questions (`score_answer`) and the chance rate of
each question type (`chance_rates`)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from llava_jax.demo.world import ALL_SHAPES, COLOR_RGB, NUMBER_WORDS, PLURALS, POSITIONS

if TYPE_CHECKING:
    from llava_jax.demo.scenes import ShapesWorld


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
