"""Stage-1 (feature alignment) data: image-caption pairs -> ``plain``-style LLaVA rows.

    python -m llava_jax.datagen.stage1 --pairs cc3m.tsv --out stage1.json [--np-filter]
    python -m llava_jax.datagen.stage1 --pairs pairs.json --out stage1.json
    python -m llava_jax.datagen.stage1 --tfds coco_captions --split train --data-dir ~/tensorflow_datasets \
        --image-folder out/images --out out/stage1.json

Inputs
------
* JSON list or JSONL of objects: the image under ``image`` (or ``file_name``, ``image_path``,
  ``url``), the caption under ``caption`` (or ``text``, ``blip_caption``, ``caption_text``), an
  optional ``id``; ``--image-key`` / ``--caption-key`` / ``--id-key`` name others.
* TSV: with a header naming the columns (the names above), or without one in CC3M's order
  ``caption<TAB>image`` (``--tsv-columns image,caption`` for the other order).
* A prepared TFDS data set (array_record; read without TensorFlow through
  :class:`llava_jax.data.tfds_source.TfdsSource`): its encoded images are written to
  ``--image-folder`` as ``<id>.<jpg|png|...>`` and the rows point at them.

The image value is used as is (a path relative to the training ``image_folder``). The row id is
the ``id`` field when there is one, else the image file's stem, else (URLs, duplicates) the row
number, zero-padded to 9 digits.

Rows (like ``blip_laion_cc_sbu_558k.json``)::

    {"id": ..., "image": ..., "conversations": [
        {"from": "human", "value": "<image>\\n<instruction>"  or  "<instruction>\\n<image>"},
        {"from": "gpt", "value": <caption>}]}

The instruction is drawn from :data:`BRIEF_INSTRUCTIONS` (our own list) and the image token
placed before or after it, both by ``random.Random(f"{seed}|{id}")``. (The ``plain`` template
keeps only the image and the caption, so the instruction matters for other templates only.)
Empty captions and captions holding ``<image>`` are skipped and counted.

Noun-phrase filtering (``--np-filter``), the paper's CC3M -> 595K selection
---------------------------------------------------------------------------
1. Extract the noun phrases of every caption (:func:`noun_phrases`, below), each counted once
   per caption; ``freq[np]`` = the number of captions that contain it.
2. Drop noun phrases with ``freq < --min-np-freq`` (default 3: rare combinations of concepts and
   attributes).
3. Every remaining phrase selects its captions: all of them if ``freq <= --max-per-np``
   (default 100), else a random subset of that size (seeded per phrase: ``Random(f"{seed}|{np}")``).
4. The output is the union of the selected captions, in input order; a caption no phrase
   selected (rare phrases only, or none) is left out.

The noun-phrase extractor is a heuristic (no tagger is needed): the caption is lower-cased and
split into words (letters with inner hyphens or apostrophes, numbers) and punctuation marks; punctuation and words
that cannot be part of a noun phrase act as boundaries: function words (articles, determiners, pronouns, prepositions, conjunctions,
auxiliaries), number words and digits, frequent caption verbs (sits, holding, ...), adverbs in
``-ly`` and verb forms in ``-ing`` (except a list of common nouns in ``-ly`` / ``-ing`` such as
family, building, ceiling, painting). Each maximal run of remaining words is a phrase candidate;
trailing ``-ed`` words are dropped ("man dressed" -> "man"), then the last 3 words are kept
(English noun phrases end in their head noun): "a large brown dog running on the beach" ->
["large brown dog", "beach"]. ``--np-extractor spacy`` uses spaCy's ``noun_chunks`` (with a
leading determiner dropped) instead, when spaCy and ``en_core_web_sm`` are installed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import sys
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from llava_jax.cli import HelpFormatter

__all__ = ["BRIEF_INSTRUCTIONS", "Pair", "read_pairs", "tfds_pairs", "noun_phrases", "np_filter",
           "make_rows", "build"]

IMAGE_TOKEN = "<image>"

# Our own wording: short-description requests.
BRIEF_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Give a short caption for this picture.",
    "What does this image show, in a few words?",
    "Summarize the photo in one sentence.",
    "Write a brief description of the image.",
    "Provide a one-line summary of what is pictured.",
    "In short, what is in this picture?",
    "Caption this image concisely.",
    "Tell me briefly what you see.",
    "Give a quick description of the scene.",
    "Sum up the content of the image in a sentence.",
    "What is this a picture of? Keep it short.",
)

IMAGE_KEYS = ("image", "file_name", "image_path", "url")
CAPTION_KEYS = ("caption", "text", "blip_caption", "caption_text")


@dataclass(frozen=True)
class Pair:
    id: str | None
    image: str
    caption: str


# ----------------------------------------------------------------------------- reading

def _pick(d: dict, key: str | None, choices: Sequence[str]):
    if key is not None:
        return d.get(key)
    for k in choices:
        if k in d:
            return d[k]
    return None


def read_pairs(path: str | os.PathLike, *, image_key: str | None = None, caption_key: str | None = None,
               id_key: str | None = "id", tsv_columns: Sequence[str] | None = None,
               errors: Counter | None = None) -> list[Pair]:
    """Pairs from a JSON list, JSONL or TSV file (see the module docstring). Rows without an
    image or a caption are skipped and counted in ``errors`` (by reason)."""
    path = os.fspath(path)
    errs = errors if errors is not None else Counter()
    out: list[Pair] = []

    def add(d: dict) -> None:
        img, cap = _pick(d, image_key, IMAGE_KEYS), _pick(d, caption_key, CAPTION_KEYS)
        if not isinstance(img, str) or not img.strip():
            errs["no_image"] += 1
            return
        if not isinstance(cap, str) or not " ".join(cap.split()):
            errs["empty_caption"] += 1
            return
        if IMAGE_TOKEN in cap:
            errs["image_token_in_caption"] += 1
            return
        id_ = d.get(id_key) if id_key else None
        out.append(Pair(None if id_ is None else str(id_), img.strip(), " ".join(cap.split())))

    if path.lower().endswith((".tsv", ".tsv.gz")) or path.lower().endswith(".txt"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            first = next(rows, None)
            if first is None:
                return out
            names = [c.strip().lower() for c in first]
            known = set(IMAGE_KEYS) | set(CAPTION_KEYS) | {"id", image_key, caption_key, id_key} - {None}
            if tsv_columns is None and any(n in known for n in names):
                cols = names
            else:
                cols = list(tsv_columns) if tsv_columns else ["caption", "image"]
                rows = _chain([first], rows)
            for r in rows:
                if not r or not any(x.strip() for x in r):
                    continue
                if len(r) < len(cols):
                    errs["short_tsv_row"] += 1
                    continue
                add(dict(zip(cols, r)))
        return out
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 12).lstrip()
        f.seek(0)
        if head.startswith("["):
            data = json.load(f)
            for d in data:
                if isinstance(d, dict):
                    add(d)
                else:
                    errs["not_an_object"] += 1
        else:
            for line in f:
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    errs["bad_json"] += 1
                    continue
                if isinstance(d, dict):
                    add(d)
                else:
                    errs["not_an_object"] += 1
    return out


def _chain(*its):
    for it in its:
        yield from it


_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


def _image_ext(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


def tfds_pairs(name_or_dir: str, split: str, image_folder: str | os.PathLike, *, data_dir: str | None = None,
               image_key: str | None = None, text_key: str | None = None, id_key: str | None = None,
               errors: Counter | None = None) -> list[Pair]:
    """Pairs from a prepared TFDS data set; the images are written under ``image_folder``."""
    from llava_jax.data.skips import error_kind
    from llava_jax.data.tfds_source import TfdsSource

    src = TfdsSource(name_or_dir, split, image_key=image_key, text_key=text_key, data_dir=data_dir, id_key=id_key)
    folder = Path(image_folder)
    folder.mkdir(parents=True, exist_ok=True)
    errs = errors if errors is not None else Counter()
    out = []
    for i in range(len(src)):
        rec = src[i]
        if "error" in rec:
            errs[error_kind(rec["error"])] += 1
            continue
        data = rec["image_bytes"]
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(rec["id"])).strip("._") or f"{i:09d}"
        name = f"{safe}.{_image_ext(data)}"
        p = folder / name
        if not p.exists() or p.stat().st_size != len(data):
            p.write_bytes(data)
        out.append(Pair(safe, name, " ".join(rec["conversations"][1]["value"].split())))
    return out


# ----------------------------------------------------------------------------- noun phrases

_FUNCTION = set("""
a an the this that these those some any each every its his her their our my your another other others several
many few much more most all both no not such own same either neither
he she it they we you i him them us me who whom which what whose there here where when how why someone something
in on at of with without to from by for near next beside besides behind under underneath over above below into onto
upon through across along alongside around between among against during after before about up down out off inside
outside while as than like via toward towards past beneath within atop top front
and or but nor so yet then if because though although whilst
is are was were be been being am has have had do does did can could will would may might shall should must
get gets got getting
full apart away together alone again very just also only even still too really almost
""".split())
_NUMBER_WORDS = set("""zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen
fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred thousand dozen couple pair
first second third""".split())
_VERBS = set("""
sit sits sat stand stands stood hold holds held walk walks walked look looks looked ride rides rode lie lies lay
lays play plays played eat eats ate fly flies flew wear wears wore carry carries carried pose poses posed stare
stares wait waits watch watches make makes made take takes took show shows shown go goes went come comes came
run runs ran jump jumps jumped swim swims rest rests park parks use uses used see seen seems seem appear appears
contains contain filled covered topped made set placed located displayed shown seen
""".split())
_LY_NOUNS = {"family", "butterfly", "jelly", "belly", "lily", "rally", "ally", "assembly", "supply", "fly", "holly",
             "trolley", "volley", "alley", "valley", "pulley", "bully", "reply", "monopoly", "italy", "july"}
_ING_NOUNS = {"building", "buildings", "ceiling", "clothing", "painting", "paintings", "wedding", "evening", "morning",
              "ring", "rings", "king", "thing", "things", "string", "swing", "wing", "wings", "spring", "sibling",
              "railing", "awning", "pudding", "stuffing", "icing", "frosting", "topping", "toppings", "lighting",
              "clearing", "landing", "parking", "sing", "sling", "ding", "wring", "bring", "sting", "nothing",
              "something", "anything", "everything", "setting", "living", "dining", "meeting", "opening",
              "crossing", "offering", "drawing", "drawings", "dressing", "seasoning", "filling", "stocking",
              "stockings", "siding", "bedding", "ping", "skiing", "surfing", "skateboarding", "snowboarding",
              "boxing", "camping", "fishing", "shopping", "writing", "lettering", "carving", "housing",
              "dumpling", "dumplings", "herring", "sapling", "seedling", "duckling", "earring",
              "earrings", "viking", "ceilings", "railings", "awnings", "evenings", "mornings"}
_WORD = re.compile(r"[^\W\d_]+(?:[-'][^\W\d_]+)*|\d+(?:[.,]\d+)?|[^\w\s]")


def _boundary(w: str) -> bool:
    if not (w[0].isalnum()):  # punctuation
        return True
    if w in _FUNCTION or w in _NUMBER_WORDS or w in _VERBS or w[0].isdigit() or len(w) == 1:
        return True
    if w.endswith("ly") and len(w) > 4 and w not in _LY_NOUNS:
        return True
    if w.endswith("ing") and len(w) > 4 and w not in _ING_NOUNS:
        return True
    return False


def noun_phrases(caption: str, max_words: int = 3) -> list[str]:
    """Heuristic noun phrases of a caption (see the module docstring), in order, deduplicated."""
    words = _WORD.findall(caption.lower())
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        while run and run[-1].endswith("ed") and len(run[-1]) > 3:
            run.pop()
        if run:
            p = " ".join(run[-max_words:])
            if p not in out:
                out.append(p)
        run.clear()

    for w in words:
        if _boundary(w):
            flush()
        else:
            run.append(w)
    flush()
    return out


def spacy_noun_phrases() -> Callable[[str], list[str]]:
    try:
        import spacy
    except ImportError:
        raise SystemExit("--np-extractor spacy needs spaCy: pip install spacy && "
                         "python -m spacy download en_core_web_sm") from None
    nlp = spacy.load("en_core_web_sm", disable=["ner", "lemmatizer"])
    dets = {"a", "an", "the", "this", "that", "these", "those", "some", "its", "his", "her", "their"}

    def extract(caption: str) -> list[str]:
        out = []
        for chunk in nlp(caption.lower()).noun_chunks:
            toks = [t.text for t in chunk]
            while toks and toks[0] in dets:
                toks = toks[1:]
            p = " ".join(toks)
            if p and p not in out:
                out.append(p)
        return out

    return extract


def np_filter(captions: Sequence[str], *, min_freq: int = 3, max_per_np: int = 100, seed: int = 0,
              extractor: Callable[[str], list[str]] = noun_phrases) -> tuple[list[int], dict]:
    """Indices (ascending) of the captions the noun-phrase selection keeps, and its figures."""
    ids: dict[str, int] = {}
    flat = array("i")
    offsets = array("q", [0])
    for c in captions:
        for p in extractor(c):
            flat.append(ids.setdefault(p, len(ids)))
        offsets.append(len(flat))
    freq = Counter(flat)
    names = list(ids)
    kept = {i for i, n in freq.items() if n >= min_freq}
    members: dict[int, list[int]] = {i: [] for i in kept}
    for ci in range(len(captions)):
        for k in range(offsets[ci], offsets[ci + 1]):
            j = flat[k]
            if j in members:
                members[j].append(ci)
    selected: set[int] = set()
    capped = 0
    for j, caps in members.items():
        if len(caps) > max_per_np:
            capped += 1
            caps = random.Random(f"{seed}|{names[j]}").sample(caps, max_per_np)
        selected.update(caps)
    stats = {"captions": len(captions), "noun_phrases": len(ids), "kept_noun_phrases": len(kept),
             "capped_noun_phrases": capped, "selected": len(selected),
             "min_freq": min_freq, "max_per_np": max_per_np}
    return sorted(selected), stats


# ----------------------------------------------------------------------------- rows

def _row_id(p: Pair, i: int, used: set) -> str:
    cand = p.id
    if cand is None and "://" not in p.image:
        cand = Path(p.image).stem or None
    if cand is None or cand in used:
        cand = f"{i:09d}"
        while cand in used:
            cand += "_"
    used.add(cand)
    return cand


def make_rows(pairs: Sequence[Pair], seed: int = 0, instructions: Sequence[str] = BRIEF_INSTRUCTIONS) -> list[dict]:
    rows, used = [], set()
    for i, p in enumerate(pairs):
        id_ = _row_id(p, i, used)
        rng = random.Random(f"{seed}|{id_}")
        instr = rng.choice(list(instructions))
        human = f"{IMAGE_TOKEN}\n{instr}" if rng.random() < 0.5 else f"{instr}\n{IMAGE_TOKEN}"
        rows.append({"id": id_, "image": p.image,
                     "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": p.caption}]})
    return rows


def build(pairs: Sequence[Pair], out: str | os.PathLike, *, seed: int = 0, np_filter_on: bool = False,
          min_freq: int = 3, max_per_np: int = 100, extractor=noun_phrases) -> dict:
    """Write the stage-1 rows for ``pairs`` to ``out`` (a JSON list); returns figures."""
    stats: dict = {"pairs": len(pairs)}
    if np_filter_on:
        keep, fstats = np_filter([p.caption for p in pairs], min_freq=min_freq, max_per_np=max_per_np,
                                 seed=seed, extractor=extractor)
        pairs = [pairs[i] for i in keep]
        stats["np_filter"] = fstats
    rows = make_rows(pairs, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False)
    os.replace(tmp, out)
    stats["rows"] = len(rows)
    stats["out"] = str(out)
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_jax.datagen.stage1",
                                description="Image-caption pairs -> stage-1 (plain) LLaVA rows.",
                                formatter_class=HelpFormatter)
    p.add_argument("--pairs", help="JSON / JSONL / TSV file of image-caption pairs")
    p.add_argument("--tfds", help="a prepared TFDS data set name or builder directory")
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--image-folder", help="(TFDS) where the images are written")
    p.add_argument("--image-key", default=None)
    p.add_argument("--caption-key", default=None, help="JSON key, or (TFDS) the text feature")
    p.add_argument("--id-key", default="id")
    p.add_argument("--tsv-columns", default=None, help="column names of a header-less TSV (default caption,image)")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--np-filter", action="store_true", help="noun-phrase frequency selection (CC3M -> 595K)")
    p.add_argument("--min-np-freq", type=int, default=3)
    p.add_argument("--max-per-np", type=int, default=100)
    p.add_argument("--np-extractor", choices=("heuristic", "spacy"), default="heuristic")
    a = p.parse_args(argv)
    errors: Counter = Counter()
    if a.tfds:
        if not a.image_folder:
            p.error("--tfds needs --image-folder (the images are written there)")
        pairs = tfds_pairs(a.tfds, a.split, a.image_folder, data_dir=a.data_dir, image_key=a.image_key,
                           text_key=a.caption_key, id_key=None if a.id_key == "id" else a.id_key, errors=errors)
    elif a.pairs:
        pairs = read_pairs(a.pairs, image_key=a.image_key, caption_key=a.caption_key, id_key=a.id_key,
                           tsv_columns=a.tsv_columns.split(",") if a.tsv_columns else None, errors=errors)
    else:
        p.error("give --pairs FILE or --tfds NAME")
    extractor = spacy_noun_phrases() if a.np_extractor == "spacy" else noun_phrases
    stats = build(pairs, a.out, seed=a.seed, np_filter_on=a.np_filter, min_freq=a.min_np_freq,
                  max_per_np=a.max_per_np, extractor=extractor)
    stats["skipped"] = dict(errors)
    print(json.dumps(stats, indent=1))
    return 0 if stats["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
