"""Image annotations for instruction generation: captions + object boxes.

One :class:`Annotation` per image. Two input formats:

* **JSONL** in the format of LLaVA's ``caps_boxes_coco2014_val_80.jsonl`` (and of the shapes
  world's ``annotations.jsonl``), one image per line::

      {"id": "000000296284", "image": "000000296284.jpg",
       "captions": ["A donut shop ...", ...],
       "instances": [{"category": "donut", "bbox": [0.37, 0.584, 0.504, 0.709]}, ...]}

  ``bbox`` is ``[x1, y1, x2, y2]`` normalised to 0-1, origin at the top-left corner.

* **COCO** ``captions_*.json`` (+ optionally ``instances_*.json``): ``id`` is the image id as
  12 digits (``"000000296284"``, as in the reference file), ``image`` the ``file_name``, boxes
  ``[x, y, w, h]`` in pixels become ``[x1, y1, x2, y2]`` divided by the image width / height,
  clipped to 0-1 and rounded to 3 decimals; crowd boxes (``iscrowd``) are kept like any other
  (the reference file keeps them too). Images without a caption are left out.

Bad JSONL rows are not fatal: they are skipped and reported (file and line) through
``errors``; a COCO file that does not parse is an error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from typing import Iterable, Sequence

__all__ = ["Instance", "Annotation", "load_jsonl", "load_coco", "clean_text"]


def clean_text(text: str) -> str:
    """Whitespace collapsed to single spaces (newlines too), stripped."""
    return " ".join(str(text).split())


def position_of(bbox: Sequence[float]) -> str:
    """Canonical position of a normalised box from its centre's thirds: "top left", "top", "top
    right", "left", "center", "right", "bottom left", "bottom" or "bottom right"."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    if v == "middle":
        return h
    if h == "center":
        return v
    return f"{v} {h}"


@dataclasses.dataclass(frozen=True)
class Instance:
    category: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2, normalised 0-1


@dataclasses.dataclass(frozen=True)
class Annotation:
    id: str
    image: str
    captions: tuple[str, ...]
    instances: tuple[Instance, ...] = ()

    def to_json(self) -> dict:
        return {"id": self.id, "image": self.image, "captions": list(self.captions),
                "instances": [{"category": i.category, "bbox": list(i.bbox)} for i in self.instances]}

    @classmethod
    def from_json(cls, row: dict, where: str = "") -> "Annotation":
        """Validated; raises ValueError naming ``where`` and the problem."""
        at = f"{where}: " if where else ""
        if not isinstance(row, dict):
            raise ValueError(f"{at}expected a JSON object, got {type(row).__name__}")
        id_ = row.get("id")
        if isinstance(id_, int) and not isinstance(id_, bool):
            id_ = str(id_)
        if not isinstance(id_, str) or not id_.strip():
            raise ValueError(f"{at}'id' must be a non-empty string")
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{at}'image' must be a non-empty string (the image file name)")
        caps = row.get("captions")
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{at}'captions' must be a list of strings")
        caps = [clean_text(c) for c in caps]
        caps = [c for c in caps if c]
        if not caps:
            raise ValueError(f"{at}no non-empty caption")
        insts = row.get("instances", [])
        if not isinstance(insts, list):
            raise ValueError(f"{at}'instances' must be a list")
        out = []
        for j, inst in enumerate(insts):
            if not isinstance(inst, dict):
                raise ValueError(f"{at}instance {j} is not an object")
            cat, box = inst.get("category"), inst.get("bbox")
            if not isinstance(cat, str) or not clean_text(cat):
                raise ValueError(f"{at}instance {j}: 'category' must be a non-empty string")
            if (not isinstance(box, (list, tuple)) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in box)):
                raise ValueError(f"{at}instance {j}: 'bbox' must be 4 finite numbers [x1, y1, x2, y2]")
            x1, y1, x2, y2 = (float(v) for v in box)
            if not (-0.01 <= x1 <= x2 <= 1.01 and -0.01 <= y1 <= y2 <= 1.01):
                raise ValueError(f"{at}instance {j}: bbox {list(box)} is not normalised "
                                 "[x1, y1, x2, y2] with 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1 "
                                 "(COCO pixel boxes: use --coco-captions/--coco-instances)")
            out.append(Instance(clean_text(cat), (x1, y1, x2, y2)))
        return cls(id_.strip(), image.strip(), tuple(caps), tuple(out))


def load_jsonl(paths: str | os.PathLike | Iterable[str | os.PathLike],
               errors: list[str] | None = None) -> list[Annotation]:
    """Annotations from one or more JSONL files. Bad lines are skipped and described in
    ``errors`` (``"file:line: problem"``); a repeated id is a bad line too (ids key the output)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Annotation] = []
    seen: set[str] = set()
    errs = errors if errors is not None else []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"annotation file not found: {path}")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    ann = Annotation.from_json(json.loads(line), where)
                except json.JSONDecodeError as e:
                    errs.append(f"{where}: bad JSON: {e.msg}")
                    continue
                except ValueError as e:
                    errs.append(str(e))
                    continue
                if ann.id in seen:
                    errs.append(f"{where}: id {ann.id!r} repeats an earlier row")
                    continue
                seen.add(ann.id)
                out.append(ann)
    return out


def _norm_box(box: Sequence[float], w: float, h: float, decimals: int = 3) -> tuple[float, ...]:
    x, y, bw, bh = (float(v) for v in box)

    def c(v: float) -> float:
        return round(min(1.0, max(0.0, v)), decimals) + 0.0  # + 0.0: no "-0.0"

    return (c(x / w), c(y / h), c((x + bw) / w), c((y + bh) / h))


def load_coco(captions_path: str | os.PathLike, instances_path: str | os.PathLike | None = None,
              limit: int | None = None) -> list[Annotation]:
    """Annotations from COCO ``captions_*.json`` and (optionally) ``instances_*.json``.

    Images are ordered by image id; captions keep the file's order; instances keep the file's
    order within an image. ``limit`` keeps the first N images (by id)."""
    with open(captions_path, encoding="utf-8") as f:
        caps_json = json.load(f)
    images = {}
    for im in caps_json.get("images", []):
        images[im["id"]] = im
    captions: dict[int, list[str]] = defaultdict(list)
    for a in caps_json.get("annotations", []):
        t = clean_text(a.get("caption", ""))
        if t:
            captions[a["image_id"]].append(t)
    boxes: dict[int, list[Instance]] = defaultdict(list)
    if instances_path is not None:
        with open(instances_path, encoding="utf-8") as f:
            inst_json = json.load(f)
        for im in inst_json.get("images", []):
            images.setdefault(im["id"], im)
        names = {c["id"]: clean_text(c["name"]) for c in inst_json.get("categories", [])}
        for a in inst_json.get("annotations", []):
            im = images.get(a["image_id"])
            if im is None or a.get("category_id") not in names:
                continue
            w, h = float(im["width"]), float(im["height"])
            boxes[a["image_id"]].append(Instance(names[a["category_id"]], _norm_box(a["bbox"], w, h)))
    out = []
    for image_id in sorted(captions, key=lambda k: (isinstance(k, str), k)):
        im = images.get(image_id)
        if im is None:
            continue
        id_ = f"{image_id:012d}" if isinstance(image_id, int) else str(image_id)
        out.append(Annotation(id_, im["file_name"], tuple(captions[image_id]), tuple(boxes.get(image_id, ()))))
        if limit is not None and len(out) >= limit:
            break
    return out
