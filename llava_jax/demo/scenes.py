"""`ShapesWorld`: samples, renders and describes scenes of the shapes world, and asks questions
with one definite answer about them."""
from __future__ import annotations

import random
from collections import Counter
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw

from llava_jax.demo.world import (
    ALL_SHAPES,
    BACKGROUND_RGB,
    COLOR_RGB,
    DEFAULT_COLORS,
    DEFAULT_SHAPES,
    EVAL_CATEGORIES,
    PLURALS,
    POSITIONS,
    QA,
    QUESTION_TEMPLATES,
    Obj,
    Scene,
    article,
    capitalize,
    draw_shape,
    group_phrases,
    join_words,
    number_word,
    object_phrase,
    position_phrase,
    reading_order,
    shape_evidence,
)

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
        existence_recheck: bool = False,
        shape_negative_prob: float | None = None,
        image_only_answers: bool = False,
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
        if existence_recheck and not existence_evidence:
            raise ValueError("existence_recheck restates the asked object after the evidence: it needs existence_evidence=True")
        self.existence_recheck = bool(existence_recheck)
        if shape_negative_prob is not None and not 0 <= shape_negative_prob <= 1:
            raise ValueError(f"shape_negative_prob must be None or in [0, 1], got {shape_negative_prob}")
        self.shape_negative_prob = None if shape_negative_prob is None else float(shape_negative_prob)
        self.question_mix = question_mix
        self.image_only_answers = bool(image_only_answers)
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
            "existence_recheck": self.existence_recheck,
            "shape_negative_prob": self.shape_negative_prob,
            "image_only_answers": self.image_only_answers,
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
            return join_words(group_phrases(shuffled()))

        lr = shuffled() if self.reading_order else sorted(objs, key=lambda o: (o.box[0] + o.box[2], o.box[1]))
        count = f"{number_word(n)} {'shape' if n == 1 else 'shapes'}"
        there = "There is" if n == 1 else "There are"
        templates = [
            lambda: f"{capitalize(groups())} on a {bg} background.",
            lambda: f"{there} {count}: {groups()}.",
            lambda: capitalize(join_words([f"{object_phrase(o)} {position_phrase(o.position)}" for o in lr])) + ".",
            lambda: f"An image of {groups()}.",
            lambda: f"{capitalize(count)} on a {bg} background: {groups()}.",
            lambda: f"A simple drawing of {groups()}.",
            lambda: capitalize(join_words([f"{object_phrase(o)} {position_phrase(o.position)}" for o in shuffled()]))
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
                      shape_negatives: float | None = None,
                      exclude_shapes: frozenset[str] = frozenset()) -> QA | None:
        """One definite question of `category` about `scene`, or None if none can be asked.

        canonical_only: eval mode - count questions only ask the total count.
        existence_yes: force a yes/no existence answer (None: fair coin).
        shape_negatives: the share of "no" existence answers that name a shape in the image in
        another colour; the others name a shape the image lacks in a colour it has ("Is there a
        red cross?" next to a red circle; any absent pair where there is none). None: half of
        them share a colour or shape with the image, half are any absent pair.
        exclude_shapes: existence questions name none of these shapes; the coin and the kind of
        "no" are drawn first, and None comes back when they leave no candidate (so excluding
        shapes does not tilt the yes/no share toward the "no"s that are always possible)."""
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
            resp = f"{capitalize(o.color)}." if short else rng.choice(
                [f"The {o.shape} is {o.color}.", f"It is {o.color}."])
            return QA("color", q, o.color, resp)

        if category == "shape":
            cands = [o for o in objs if color_counts[o.color] == 1]
            if not cands:
                return None
            o = rng.choice(cands)
            q = rng.choice(T["shape"]).format(color=o.color)
            resp = f"{capitalize(article(o.shape))} {o.shape}." if short else rng.choice(
                [f"The {o.color} shape is {article(o.shape)} {o.shape}.", f"It is {article(o.shape)} {o.shape}."])
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
                resp = rng.choice([f"{n}", f"{capitalize(number_word(n))}."])
            else:
                resp = (f"There is {number_word(n)} {noun}." if n == 1
                        else f"There are {number_word(n)} {noun_pl}.")
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
            resp = f"{capitalize(o.position)}." if short else f"The {subject} is {phrase}."
            return QA("position", q, o.position, resp)

        if category == "existence":
            yes = rng.random() < 0.5 if existence_yes is None else existence_yes
            if yes:
                cands = [o for o in objs if o.shape not in exclude_shapes]
                if not cands:
                    return None
                o = rng.choice(cands) if exclude_shapes else rng.choice(objs)
                color, shape = o.color, o.shape
            else:
                present = set(combo_counts)
                absent = [(c, s) for c in self.colors for s in self.shapes if f"{c} {s}" not in present]
                if not absent:
                    return None
                if shape_negatives is None:  # half of the time a hard negative: shares colour or shape
                    hard = [(c, s) for c, s in absent if c in color_counts or s in shape_counts]
                    rest = absent
                    share = 0.5
                else:  # a shape in the image in another colour, else an absent shape in a colour it has
                    hard = [(c, s) for c, s in absent if s in shape_counts]
                    rest = [(c, s) for c, s in absent if s not in shape_counts and c in color_counts] or absent
                    share = shape_negatives
                pool = hard if hard and rng.random() < share else rest
                if exclude_shapes:
                    pool = [(c, s) for c, s in pool if s not in exclude_shapes]
                    if not pool:
                        return None
                color, shape = rng.choice(pool)
            q = rng.choice(T["existence"]).format(color=color, shape=shape)
            thing = f"{article(color)} {color} {shape}"
            if self.existence_evidence:  # "The circle is blue. No."
                evidence = shape_evidence(objs, shape)
                if self.existence_recheck and shape in shape_counts:  # "The circle is blue. A green circle? No."
                    evidence += f" {capitalize(thing)}?"
                resp = f"{evidence} {'Yes' if yes else 'No'}."
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
    def text_existence_turns(self, scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
        """A text-only conversation about a scene told in words: the first question starts with
        one of its captions, then `turns` existence questions answered exactly as about the
        image ("The circle is blue. A green circle? No."). The evidence is read from the
        caption instead of the image, so these rows teach the verdict (compare the asked colour
        with the ones just named) apart from seeing."""
        k = rng.randint(*self.turns)
        caption = self.captions(scene, rng, k=1)[0]
        turns: list[tuple[str, str]] = []
        seen: set[str] = set()
        for _ in range(10 * k):
            if len(turns) == k:
                break
            qa = self.make_question(scene, "existence", rng, shape_negatives=self.shape_negative_prob)
            if qa is None:
                continue
            asked = " ".join(w for w in qa.question.rstrip("?").split() if w in self.colors or w in self.shapes)
            if asked in seen:  # one question per (colour, shape), whatever its wording
                continue
            seen.add(asked)
            turns.append((qa.question if turns else f"{caption} {qa.question}", qa.response))
        return turns

    def conversation(self, scene: Scene, rng: random.Random, captions: Sequence[str]) -> list[QA]:
        """`turns` (lo..hi) distinct questions about one scene (stage 2); categories drawn
        uniformly or by `question_mix`.

        With `image_only_answers`, no question asks about a shape the conversation has already
        named (in a question or an answer), a question that names no shape asks about no colour
        already named, one question at most asks about the whole scene ("How many objects?"),
        and the description (if drawn) comes last: every answer has to be read
        from the image, as in evaluation, which asks one question at a time. Without it, about
        63% of the later turns asked about a shape named earlier ("The circle is yellow." twice
        in one row), so half the training answers could be copied from the text above them."""
        k = rng.randint(*self.turns)
        mix = self.question_mix
        qas: list[QA] = []
        seen: set[str] = set()
        named_shapes: set[str] = set()
        named_colors: set[str] = set()
        asked_scene = False
        answers: list[str] = []  # the row's existence answers so far
        yes_first = self.image_only_answers and rng.random() < 0.5
        describe = rng.random() < self.describe_prob
        if describe and self.image_only_answers:
            k -= 1  # the description takes the last turn
        elif describe:
            qa = self.make_question(scene, "describe", rng, captions=captions)
            qas.append(qa)
            seen.add(qa.question)
        tries = 0
        while len(qas) < k and tries < max(20, 10 * k):
            tries += 1
            cat = (rng.choice(EVAL_CATEGORIES) if mix is None
                   else rng.choices(EVAL_CATEGORIES, weights=[mix[c] for c in EVAL_CATEGORIES])[0])
            # Leak-free rows can ask each shape once, and a "no" about an absent shape is almost
            # always possible while a "yes" needs a present shape not yet asked about: left to
            # the coin, 1 existence answer in 5 was "yes". So a row never has more "no"s than
            # "yes"s after its first existence answer, which is "yes" in half the rows (40% and
            # 62% "yes" for the two halves; a "yes" that cannot be asked is not replaced).
            force_yes = (self.image_only_answers and (answers or yes_first)
                         and answers.count("no") >= answers.count("yes")) or None
            qa = self.make_question(scene, cat, rng, shape_negatives=self.shape_negative_prob,
                                    existence_yes=force_yes, exclude_shapes=frozenset(named_shapes))
            if qa is None or qa.question in seen:
                continue
            if self.image_only_answers:
                shapes, colors = self._named(qa.question)
                # a question is about the shapes it names, else the colours, else the whole scene
                if (shapes & named_shapes if shapes else colors & named_colors if colors else asked_scene):
                    continue
                asked_scene |= not shapes and not colors
                more_shapes, more_colors = self._named(qa.response)
                named_shapes |= shapes | more_shapes
                named_colors |= colors | more_colors
            qas.append(qa)
            seen.add(qa.question)
            if qa.category == "existence":
                answers.append(qa.answer)
        if describe and self.image_only_answers:
            qas.append(self.make_question(scene, "describe", rng, captions=captions))
        return qas

    def _named(self, text: str) -> tuple[set[str], set[str]]:
        """The shapes (singular) and colours a question or answer names."""
        words = {w.strip(".,?!").lower() for w in text.split()}
        singular = {PLURALS[s]: s for s in self.shapes}
        return ({singular.get(w, w) for w in words} & set(self.shapes)), words & set(self.colors)
