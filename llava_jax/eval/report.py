"""Summary tables (printed, JSON, Markdown) and a small bar-chart PNG drawn with PIL.

Every eval CLI ends with `write_report(out_dir, name, title, columns, rows, extra)`: it prints
one aligned table, and writes `{name}.json` (the rows plus `extra`, full precision) and
`{name}.md` (the same table in Markdown)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _cells(columns: Sequence[tuple[str, str]], rows: Sequence[Mapping], digits: int) -> list[list[str]]:
    return [[fmt(r.get(key), digits) for key, _ in columns] for r in rows]


def text_table(columns: Sequence[tuple[str, str]], rows: Sequence[Mapping], digits: int = 1) -> str:
    """columns: [(row key, header)]. First column left-aligned, the others right-aligned."""
    head = [h for _, h in columns]
    body = _cells(columns, rows, digits)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(c) for c in body])


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[Mapping], digits: int = 1) -> str:
    head = [h for _, h in columns]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    out += ["| " + " | ".join(c) + " |" for c in _cells(columns, rows, digits)]
    return "\n".join(out)


def write_report(out_dir, name: str, title: str, columns: Sequence[tuple[str, str]], rows: Sequence[Mapping],
                 extra: Mapping | None = None, digits: int = 1, notes: Sequence[str] = (),
                 echo: bool = True) -> dict:
    """Print the table; write {name}.json and {name}.md under out_dir (if given). Returns the
    JSON object."""
    table = text_table(columns, rows, digits)
    if echo:
        print(f"\n{title}\n{table}")
        for n in notes:
            print(n)
    obj = {"title": title, "rows": list(rows), **(extra or {})}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
        md = f"## {title}\n\n{markdown_table(columns, rows, digits)}\n"
        if notes:
            md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        (out / f"{name}.md").write_text(md, encoding="utf-8")
    return obj


# ----------------------------------------------------------------------------- bar chart

_PALETTE = [(66, 103, 178), (230, 126, 34), (39, 174, 96), (142, 68, 173), (192, 57, 43)]


def _nice_top(v: float) -> float:
    """The smallest 5 x step >= v with step in {1, 2, 2.5, 5} x 10^k (axis ticks at steps)."""
    if v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v / 5))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if 5 * m * mag >= v)
    return 5 * step


def bar_chart(path, categories: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
              title: str = "", ylabel: str = "", ymax: float | None = None, width: int = 720,
              height: int = 420) -> Path:
    """Grouped vertical bars: one group per category, one bar per series (values may be None).
    Values are written above the bars. Pure PIL (default bitmap font), no matplotlib."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    vals = [v for s in series.values() for v in s if v is not None and not math.isnan(v)]
    top = ymax if ymax is not None else _nice_top(max(vals) * 1.1 if vals else 1.0)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, upper, lower = 60, 20, 40, 60
    pw, ph = width - left - right, height - upper - lower
    d.text((left, 10), title, fill="black", font=font)
    if ylabel:
        d.text((left + 4, 24), ylabel, fill="black", font=font)
    # axes and grid
    for k in range(6):
        v = top * k / 5
        y = upper + ph - ph * k / 5
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        d.text((6, y - 6), f"{v:g}", fill="black", font=font)
    d.line([(left, upper), (left, upper + ph), (left + pw, upper + ph)], fill="black")
    n_cat, n_ser = max(1, len(categories)), max(1, len(series))
    group = pw / n_cat
    bar = group * 0.8 / n_ser
    for ci, cat in enumerate(categories):
        gx = left + ci * group + group * 0.1
        for si, (name, values) in enumerate(series.items()):
            v = values[ci]
            if v is None or math.isnan(v):
                continue
            h = ph * min(max(v, 0.0), top) / top
            x0, x1 = gx + si * bar, gx + (si + 1) * bar - 2
            d.rectangle([x0, upper + ph - h, x1, upper + ph], fill=_PALETTE[si % len(_PALETTE)])
            d.text((x0, upper + ph - h - 12), f"{v:.1f}", fill="black", font=font)
        d.text((gx, upper + ph + 6), str(cat)[:int(group / 6) + 1], fill="black", font=font)
    # legend
    lx = left
    for si, name in enumerate(series):
        d.rectangle([lx, height - 20, lx + 10, height - 10], fill=_PALETTE[si % len(_PALETTE)])
        d.text((lx + 14, height - 22), name, fill="black", font=font)
        lx += 20 + 7 * len(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def read_jsonl(path, what: str = "file") -> list[dict]:
    """Rows of a JSONL file; a bad row raises ValueError naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{what} {path} line {i} is not JSON: {e}") from None
    return rows


def read_rows(path, what: str = "file") -> list[dict]:
    """A JSON list, a JSON object with one list value, or JSONL."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    s = text.lstrip()
    if s.startswith("["):
        return json.loads(text)
    if s.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return read_jsonl(p, what)
        for key in ("annotations", "questions", "data"):
            if isinstance(obj.get(key), list):
                return obj[key]
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1 and "question_id" not in obj:
            return lists[0]
        return [obj]
    return read_jsonl(p, what)
