"""Replies -> LLaVA rows, with validation. A reply that fails is rejected with a reason.

Reply formats (what the prompts ask for):

* ``conversation``: blocks ``Question:`` / ``Answer:`` alternating, first a question, separated
  by lines of ``===`` (separators optional). Labels are case-insensitive and may be written
  ``Q:`` / ``A:``, numbered (``Question 2:``), in bold (``**Question:**``), with the text on the
  label's line or below it. At least one exchange.
* ``complex``: the same format with exactly one exchange.
* ``detail``: plain prose (surrounding ``===`` lines are dropped). The human turn is an
  instruction drawn from :data:`DETAIL_INSTRUCTIONS`.

Rejection reasons (``Rejected.reason``), checked in this order:

``empty``       the reply is empty or only whitespace / separators
``truncated``   the backend stopped on its token limit (``finish_reason == "length"``)
``refusal``     the reply starts like a refusal ("I'm sorry", "I cannot", "As an AI ...")
``malformed``   no question/answer structure, an unpaired or empty question or answer, more
                than one exchange for ``complex``, a Q/A label inside a ``detail`` reply, an
                ``<image>`` token, or a ``detail`` reply of fewer than 8 words
``leak``        the text mentions what the model was given instead of the image ("caption",
                "bounding box", "bbox", "coordinates", "annotation") or quotes a box:
                a bracketed pair of fractions (``[0.37, 0.58``) or a number with 3 decimals
                between 0 and 1 (``0.584``)

Rows::

    {"id": "<image id>_<type>", "image": <file name>,
     "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}

``<image>`` goes on the first human turn, before (``"<image>\\n" + text``) or after
(``text + "\\n<image>"``) it with probability 1/2, decided by ``random.Random(f"{seed}|{id}|{type}")``
(deterministic per item, independent of order and concurrency); the same generator picks the
``detail`` instruction.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from llava_jax.datagen.annotations import Annotation

__all__ = ["DETAIL_INSTRUCTIONS", "Rejected", "parse_reply", "make_row", "REJECT_REASONS"]

IMAGE_TOKEN = "<image>"
REJECT_REASONS = ("empty", "truncated", "refusal", "malformed", "leak")

# Our own wording (the human turn of a detail row).
DETAIL_INSTRUCTIONS: tuple[str, ...] = (
    "Describe this image in detail.",
    "Give a thorough description of what you see in the picture.",
    "What is going on in this image? Please describe it fully.",
    "Walk me through everything that appears in this photo.",
    "Could you write a detailed account of the scene shown here?",
    "Explain in detail what this image depicts.",
    "Provide a comprehensive description of the picture.",
    "Tell me about this image, covering all the important details.",
    "Paint a full picture in words of the scene in this photograph.",
    "Describe the contents of this image carefully and completely.",
    "What can you see in this picture? Be as detailed as you can.",
    "Write a rich, detailed description of the image.",
)


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REJECT_REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


_LABEL = re.compile(
    r"^\s*[#>*_\s]*(?P<label>question|answer|q|a)\s*(?:\d+)?\s*[*_]*\s*[:：]\s*[*_]*\s*(?P<rest>.*?)\s*$",
    re.IGNORECASE)
_SEP = re.compile(r"^\s*(?:={3,}|-{3,})\s*$")
_REFUSAL = re.compile(r"^\s*(?:i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i'?m unable|i am unable|"
                      r"as an ai\b|unfortunately,? i)", re.IGNORECASE)
_LEAK_WORDS = re.compile(r"\b(?:captions?|captioned|bounding[- ]box(?:es)?|bbox(?:es)?|coordinates?|"
                         r"annotations?|annotated)\b", re.IGNORECASE)
_LEAK_NUMS = re.compile(r"\[\s*[01]?\.\d+\s*,\s*[01]?\.\d+|(?<![\d.])[01]\.\d{3}(?!\d|\.\d)")


def _split_qa(text: str) -> list[tuple[str, str]]:
    blocks: list[list] = []  # [label, lines]
    for line in text.split("\n"):
        if _SEP.match(line):
            continue
        m = _LABEL.match(line)
        if m:
            label = "q" if m.group("label").lower().startswith("q") else "a"
            blocks.append([label, [m.group("rest")] if m.group("rest") else []])
        elif blocks:
            blocks[-1][1].append(line)
        elif line.strip():
            raise Rejected("malformed", "text before the first 'Question:'")
    if not blocks:
        raise Rejected("malformed", "no 'Question:' / 'Answer:' blocks")
    pairs = []
    for i, (label, lines) in enumerate(blocks):
        want = "q" if i % 2 == 0 else "a"
        if label != want:
            raise Rejected("malformed", f"block {i + 1} is {'a question' if label == 'q' else 'an answer'}, "
                                        f"expected {'a question' if want == 'q' else 'an answer'}")
        body = "\n".join(lines).strip()
        body = re.sub(r"\n{3,}", "\n\n", body)
        if not body:
            raise Rejected("malformed", f"empty {'question' if label == 'q' else 'answer'} in block {i + 1}")
        if i % 2 == 0:
            pairs.append([body, None])
        else:
            pairs[-1][1] = body
    if pairs[-1][1] is None:
        raise Rejected("malformed", "the last question has no answer")
    return [(q, a) for q, a in pairs]


def _check_leak(texts) -> None:
    for t in texts:
        m = _LEAK_WORDS.search(t) or _LEAK_NUMS.search(t)
        if m:
            raise Rejected("leak", f"mentions {m.group(0)!r}")


def parse_reply(task: str, text: str | None, finish_reason: str | None = None) -> list[tuple[str, str]]:
    """[(question, answer), ...] for ``task``; raises :class:`Rejected`.

    For ``detail`` the question is empty (the row builder picks the instruction)."""
    body = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    stripped = "\n".join(line for line in body.split("\n") if not _SEP.match(line)).strip()
    if not stripped:
        raise Rejected("empty")
    if finish_reason == "length":
        raise Rejected("truncated", "the reply hit the token limit")
    if _REFUSAL.match(stripped):
        raise Rejected("refusal", stripped[:60])
    if IMAGE_TOKEN in stripped:
        raise Rejected("malformed", f"{IMAGE_TOKEN} inside the reply")
    if task == "detail":
        if any(_LABEL.match(line) for line in stripped.split("\n")):
            raise Rejected("malformed", "a Question/Answer label in a detail description")
        if len(stripped.split()) < 8:
            raise Rejected("malformed", "description shorter than 8 words")
        text_out = re.sub(r"\n{3,}", "\n\n", stripped)
        _check_leak([text_out])
        return [("", text_out)]
    pairs = _split_qa(stripped)
    if task == "complex" and len(pairs) != 1:
        raise Rejected("malformed", f"expected one question and answer, got {len(pairs)}")
    _check_leak([t for p in pairs for t in p])
    return pairs


def item_rng(seed: int, ann_id: str, task: str) -> random.Random:
    return random.Random(f"{seed}|{ann_id}|{task}")


def make_row(task: str, ann: Annotation, pairs: list[tuple[str, str]], seed: int = 0) -> dict:
    """The LLaVA row of one parsed reply (see the module docstring)."""
    rng = item_rng(seed, ann.id, task)
    image_first = rng.random() < 0.5
    if task == "detail":
        pairs = [(rng.choice(DETAIL_INSTRUCTIONS), pairs[0][1])]
    conv = []
    for i, (q, a) in enumerate(pairs):
        if i == 0:
            q = f"{IMAGE_TOKEN}\n{q}" if image_first else f"{q}\n{IMAGE_TOKEN}"
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": a})
    return {"id": f"{ann.id}_{task}", "image": ann.image, "conversations": conv}


@dataclass(frozen=True)
class Parsed:
    row: dict | None
    reason: str | None = None
    detail: str = ""


def reply_to_row(task: str, ann: Annotation, text: str | None, finish_reason: str | None = None,
                 seed: int = 0) -> Parsed:
    try:
        pairs = parse_reply(task, text, finish_reason)
    except Rejected as e:
        return Parsed(None, e.reason, e.detail)
    return Parsed(make_row(task, ann, pairs, seed))
