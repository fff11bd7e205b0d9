"""Random-access data sources for the Grain pipeline: LLaVA JSON/JSONL files, TFDS, mixtures.

Every source (here and in :mod:`llava_jax.data.tfds_source`) follows Grain's random-access
protocol (:mod:`llava_jax.data.random_access`), is cheap to pickle (Grain worker processes
get a copy: files are reopened lazily in each process) and returns one plain ``dict`` per row.
Rows that cannot be used are *not* raised: ``__getitem__`` returns a record with an ``"error"``
key instead, so the pipeline can drop it and count it (see :mod:`llava_jax.data.skips`).

Record formats
--------------
:class:`LlavaJsonSource` (LLaVA JSON / JSONL rows)::

    {"id": str, "source": str, "row": int,
     "image_path": str | None,              # image_folder / row["image"]; None for text-only rows
                                            # (a list of paths for a row with several images)
     "conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}

Roles are canonicalised (``user`` -> ``human``, ``assistant`` -> ``gpt``, any case); a
``system`` turn can only come first. Texts are returned unchanged (``<image>`` before or after
the text is left to :func:`llava_jax.data.templates.render`, which places it).

:class:`~llava_jax.data.tfds_source.TfdsSource` (any TFDS image + text data set, as stage-1
caption pairs)::

    {"id": str, "source": str, "row": int,
     "image_path": None,
     "image_bytes": bytes,                  # the ENCODED image (JPEG/PNG/... as stored)
     "conversations": [{"from": "human", "value": "<image>\\n" + instruction},
                       {"from": "gpt", "value": caption}]}

Error records (both sources) have the same keys (``conversations`` empty, image fields None)
plus ``"error": "<kind>: <detail>"``. ``kind`` is a short stable slug, the detail names the file
and row. Kinds: ``bad_json`` (a JSONL line that does not parse, or invalid UTF-8),
``not_a_dict``, ``no_conversations`` (missing, not a list, or empty), ``bad_turn`` (a turn that
is not a dict / pair, a role outside human/gpt/user/assistant/system, a non-string value, a
system turn not first), ``bad_image_field`` (``image`` neither a non-empty string nor a
non-empty list of them), and for TFDS ``bad_record``, ``bad_image``, ``bad_caption``.
:class:`~llava_jax.data.skips.SkipLog` counts by ``kind``.

Checks left to the pipeline, which counts them under its own reasons: template-level ones
(strict human/gpt alternation, last turn from gpt, empty texts, one exchange for ``plain``:
``render`` raises ``ValueError``) and the number of ``<image>`` tokens vs the number of images
(it compares after tokenization). An image list of one is returned as a plain string.

Memory: a :class:`LlavaJsonSource` keeps about 12 bytes per row, an index of where each row is
in the file (:mod:`llava_jax.data.json_index`), and reads a row with ``os.pread`` when asked. The
file must not change after indexing: the size and mtime are checked when a process first
opens it (``RuntimeError`` otherwise).
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Sequence

from llava_jax.data.json_index import detect_format, index_rows
from llava_jax.data.random_access import check_index
from llava_jax.data.skips import error_record
from llava_jax.data.templates import normalize_turns
from llava_jax.data.tfds_source import TfdsSource

__all__ = [
    "LlavaJsonSource",
    "ConcatSource",
    "sources_from_config",
]

# ---------------------------------------------------------------------------------------------
# LLaVA JSON / JSONL
# ---------------------------------------------------------------------------------------------


class LlavaJsonSource:
    """LLaVA conversation rows from a JSON list or a JSONL file, by random access.

    Args:
      path: ``blip_laion_cc_sbu_558k.json``-, ``llava_v1_5_mix665k.json``-style JSON list, or a
        JSONL file with one row per line.
      image_folder: ``image_path`` is ``os.path.join(image_folder, row["image"])`` (an absolute
        ``image`` stays as is); None keeps ``row["image"]`` unchanged.
      name: the ``source`` of every record (default: the file name without extension).
      format: ``"json"`` / ``"jsonl"`` to force the format; default: from the content.

    Records: see the module docstring. Indexing happens in the constructor (one pass over the
    file); the index travels with a pickle, the open file does not.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_folder: str | os.PathLike | None = None,
        name: str | None = None,
        format: str | None = None,  # noqa: A002 - matches the file-format vocabulary
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        self.name = name if name is not None else Path(self.path).stem
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"LLaVA data file not found: {self.path}")
        if format is None:
            format = detect_format(self.path)
        if format not in ("json", "jsonl"):
            raise ValueError(f"format must be 'json' or 'jsonl', got {format!r}")
        self.format = format
        st = os.stat(self.path)
        self._stamp = (st.st_size, st.st_mtime_ns)
        self._starts, self._lengths, self._lines = index_rows(self.path, format)
        self._fd: int | None = None

    # -- protocol --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: Any) -> dict:
        i = check_index(i, len(self))
        raw = os.pread(self._file(), int(self._lengths[i]), int(self._starts[i]))
        return self.parse_row(raw, i)

    def __repr__(self) -> str:
        return f"LlavaJsonSource({self.path!r}, name={self.name!r}, rows={len(self)})"

    @property
    def index_nbytes(self) -> int:
        """Bytes held by the row index (the only per-row memory this source keeps)."""
        return sum(a.nbytes for a in (self._starts, self._lengths, self._lines) if a is not None)

    # -- file handling ---------------------------------------------------------------------

    def _file(self) -> int:
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY)
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self._stamp:
                os.close(fd)
                raise RuntimeError(
                    f"{self.path} changed since it was indexed (size/mtime differ): "
                    "build the source again"
                )
            self._fd = fd  # pread does not move a file position: safe to share across fork
        return self._fd

    def close(self, _os_close=os.close) -> None:  # bound early: __del__ may run at shutdown
        if getattr(self, "_fd", None) is not None:
            fd, self._fd = self._fd, None
            try:
                _os_close(fd)
            except OSError:
                pass

    def __del__(self):
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- parsing ---------------------------------------------------------------------------

    def where(self, i: int) -> str:
        """Human-readable location of row ``i`` (for error messages)."""
        if self.format == "jsonl":
            line = int(self._lines[i]) if self._lines is not None else i + 1
            return f"{self.path} line {line}"
        return f"{self.path} row {i} (byte {int(self._starts[i])})"

    def parse_row(self, raw: bytes | str, i: int) -> dict:
        """Parse one row's JSON text into a record (an error record when unusable)."""
        try:
            row = json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            return error_record(self.name, i, "", f"bad_json: {e} ({self.where(i)})")
        return self.make_record(row, i)

    def make_record(self, row: Any, i: int) -> dict:
        """Validate a parsed row and build its record (an error record when unusable)."""
        if not isinstance(row, dict):
            return error_record(
                self.name, i, "", f"not_a_dict: row is a {type(row).__name__} ({self.where(i)})"
            )
        rid = row.get("id")
        id_ = f"{self.name}:{i}" if rid is None else str(rid)

        def err(reason: str) -> dict:
            return error_record(self.name, i, id_, f"{reason} ({self.where(i)})")

        conv = row.get("conversations")
        if conv is None:
            return err("no_conversations: no 'conversations' key")
        if not isinstance(conv, list):
            return err(f"no_conversations: 'conversations' is a {type(conv).__name__}, not a list")
        if not conv:
            return err("no_conversations: empty 'conversations'")
        try:
            system, turns = normalize_turns(conv)
        except ValueError as e:
            return err(f"bad_turn: {e}")
        if not turns:
            return err("no_conversations: only a system turn")

        image = row.get("image")
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        images = image if isinstance(image, list) else [] if image is None else [image]
        if image is not None and (
            not images or not all(isinstance(p, str) and p.strip() for p in images)
        ):
            return err(
                "bad_image_field: 'image' must be a non-empty string (or a list of them), "
                f"got {image!r:.80}"
            )
        paths = [p if self.image_folder is None else os.path.join(self.image_folder, p) for p in images]
        image_path = None if not paths else paths[0] if not isinstance(image, list) else paths
        conversations = [{"from": role, "value": text} for role, text in turns]
        if system is not None:
            conversations.insert(0, {"from": "system", "value": system})
        return {
            "id": id_,
            "source": self.name,
            "row": i,
            "image_path": image_path,
            "conversations": conversations,
        }


# ---------------------------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------------------------


class ConcatSource:
    """Several sources one after another (a mix665k-style mixture of separate files).

    Index ``j`` maps to ``sources[k][j - offsets[k]]``; each record keeps its own ``source``
    name and its ``row`` inside that source. Shuffling/weighting is the sampler's job.
    """

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("ConcatSource needs at least one source")
        self.offsets: list[int] = [0]
        for s in self.sources:
            self.offsets.append(self.offsets[-1] + len(s))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: Any) -> tuple[int, int]:
        """(index of the source, row inside it) for global index ``i``."""
        i = check_index(i, len(self))
        k = bisect.bisect_right(self.offsets, i) - 1
        return k, i - self.offsets[k]

    def __getitem__(self, i: Any) -> dict:
        k, j = self.locate(i)
        return self.sources[k][j]

    def __repr__(self) -> str:
        return f"ConcatSource([{', '.join(repr(s) for s in self.sources)}])"


def sources_from_config(specs, image_folder: str | None = None) -> list:
    """Sources from config entries: `{"path": file.json|.jsonl, "image_folder": dir, "name"?}` or
    `{"tfds": name_or_builder_dir, "split": ..., "data_dir"?, "image_key"?, "text_key"?,
    "instruction"?}`. `specs` may also be a string: a JSON list of such entries, or the path of
    one LLaVA JSON/JSONL file whose images are under `image_folder`."""
    if isinstance(specs, str):
        text = specs.strip()
        specs = json.loads(text) if text.startswith("[") else ([{"path": text}] if text else [])
    out = []
    for spec in specs:
        spec = dict(spec)
        if "tfds" in spec:
            name = spec.pop("tfds")
            out.append(TfdsSource(name, spec.pop("split", "train"), **spec))
        elif "path" in spec:
            out.append(LlavaJsonSource(spec["path"], spec.get("image_folder") or image_folder or None,
                                       name=spec.get("name")))
        else:
            raise ValueError(f"data source needs 'path' (LLaVA JSON/JSONL) or 'tfds': {spec}")
    if not out:
        raise ValueError("config.data.sources is empty: give at least one source")
    return out
