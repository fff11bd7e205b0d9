"""Random-access data sources for the Grain pipeline, and a log of skipped rows.

Every source here follows Grain's random-access protocol (``__len__`` and ``__getitem__(i)``,
``i`` any int-like, negative allowed, ``IndexError`` out of range), is cheap to pickle (Grain
worker processes get a copy: files are reopened lazily in each process) and returns one plain
``dict`` per row. Rows that cannot be used are *not* raised: ``__getitem__`` returns a record
with an ``"error"`` key instead, so the pipeline can drop it and count it (see :class:`SkipLog`).

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

:class:`TfdsSource` (any TFDS image + text data set, as stage-1 caption pairs)::

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
:class:`SkipLog` counts by ``kind``.

Checks left to the pipeline, which counts them under its own reasons: template-level ones
(strict human/gpt alternation, last turn from gpt, empty texts, one exchange for ``plain``:
``render`` raises ``ValueError``) and the number of ``<image>`` tokens vs the number of images
(it compares after tokenization). An image list of one is returned as a plain string.

Memory (LlavaJsonSource)
------------------------
Rows are never kept as Python objects. Both formats are indexed once into two numpy arrays of
byte offsets into the original file (``int64`` start + ``uint32`` length = 12 bytes per row,
plus 4 bytes per row of line numbers for JSONL files that contain blank lines), and each
``__getitem__`` reads its row with ``os.pread`` and parses it. Measured on a synthetic
100K-row stage-2-like JSON list (``tests/test_sources.py::test_memory_per_row`` prints it):
12.0 bytes/row retained (tracemalloc), indexing peak ~17 MiB (one 4 MiB window of the file
as bytes, latin-1 str and the concatenated buffer, plus the offset arrays), ~0.2 s for the
30 MiB file (json.load: 0.9 s); ``__getitem__`` ~7 us. For comparison ``json.load`` of the same
file keeps ~1.7 KB/row of Python objects (peak 190 MiB); a 665K-row mix665k index is ~8 MB.

* JSON list (``[ {...}, {...} ]``): the file is scanned with ``json.JSONDecoder.raw_decode`` over
  a latin-1 view of the bytes (one char per byte, so string offsets ARE byte offsets; structural
  JSON characters are ASCII, so the scan is exact for UTF-8 files; the parsed objects are thrown
  away). A JSON list that does not parse is an error at construction (``ValueError`` naming the
  file and byte offset): unlike JSONL, one bad element makes the whole file unreadable.
* JSONL: newline positions (found with numpy); blank lines are skipped (not rows).

The format is taken from the content: a file whose first non-blank byte is ``[`` is a JSON list,
anything else is JSONL (pass ``format="json"|"jsonl"`` to force it).
The file must not change after indexing: the size and mtime are checked when a process first
opens it (``RuntimeError`` otherwise).
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import threading
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llava_jax.data.templates import IMAGE_TOKEN, normalize_turns

__all__ = [
    "LlavaJsonSource",
    "ConcatSource",
    "TfdsSource",
    "SkipLog",
    "error_kind",
    "DEFAULT_CAPTION_INSTRUCTION",
]

DEFAULT_CAPTION_INSTRUCTION = "Describe the image concisely."

_CHUNK = 4 << 20  # bytes per read while indexing
_WS = b" \t\r\n"


def error_kind(reason: str) -> str:
    """The stable slug of an error reason: the text before the first ``:``."""
    return str(reason).split(":", 1)[0].strip() or "unknown"


def _error_record(source: str, row: int, id_: str, reason: str) -> dict:
    return {
        "id": id_,
        "source": source,
        "row": row,
        "image_path": None,
        "conversations": [],
        "error": reason,
    }


def _check_index(i: Any, n: int) -> int:
    i = operator.index(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a source of {n} rows")
    return i


# ---------------------------------------------------------------------------------------------
# Indexing
# ---------------------------------------------------------------------------------------------


def _first_non_ws_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                return b""
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
            stripped = chunk.lstrip(_WS)
            if stripped:
                return stripped[:1]


def _index_jsonl(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Byte spans of the non-blank lines. Returns (starts, lengths, line_numbers or None)."""
    size = os.path.getsize(path)
    newlines = []
    with open(path, "rb") as f:
        base = 0
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 0x0A)
            newlines.append(nl.astype(np.int64) + base)
            base += len(chunk)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    lengths = ends - starts
    keep = lengths > 0
    # Lines of only whitespace (or a lone "\r", or a BOM) are blank too: check the short ones.
    short = np.flatnonzero(keep & (lengths <= 64))
    if len(short):
        with open(path, "rb") as f:
            for j in short:
                f.seek(int(starts[j]))
                text = f.read(int(lengths[j]))
                if not text.replace(b"\xef\xbb\xbf", b"").strip(_WS):
                    keep[j] = False
    line_numbers = None
    if not keep.all():
        line_numbers = (np.flatnonzero(keep) + 1).astype(np.uint32)
    starts, lengths = starts[keep], lengths[keep]
    if len(lengths) and lengths.max() >= 2**32:
        raise ValueError(f"{path}: a line of {int(lengths.max())} bytes (>= 4 GiB)")
    return starts, lengths.astype(np.uint32), line_numbers


def _index_json_list(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans of the elements of a top-level JSON array, one window of the file at a time.

    The bytes are decoded as latin-1 (one char per byte), so ``raw_decode`` positions are byte
    offsets; JSON's structural characters are ASCII, so this finds the same element boundaries
    as a UTF-8 parse (the mojibake inside the transient parsed strings does not matter).
    """
    decoder = json.JSONDecoder()
    starts = array("q")
    lengths = array("q")
    with open(path, "rb") as f:
        buf = ""  # decoded window; buf[0] is at byte `base` of the file
        base = 0
        pos = 0
        eof = False

        def more() -> bool:
            nonlocal buf, base, pos, eof
            if eof:
                return False
            chunk = f.read(_CHUNK)
            if not chunk:
                eof = True
                return False
            # Drop what has been consumed, keep the window small.
            buf = buf[pos:] + chunk.decode("latin-1")
            base += pos
            pos = 0
            return True

        def skip_ws() -> str:
            """Advance past whitespace; return the next char ('' at end of file)."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not more():
                    return ""

        def fail(msg: str) -> ValueError:
            return ValueError(
                f"{path}: not a valid JSON list at byte {base + pos} (after {len(starts)} rows): "
                f"{msg}. Fix the file, or use one row per line (JSONL), where a bad row is skipped"
            )

        more()
        if buf.startswith("\xef\xbb\xbf"):  # UTF-8 BOM
            pos = 3
        if skip_ws() != "[":
            raise fail("expected '['")
        pos += 1
        c = skip_ws()
        if c == "]":
            pos += 1
        else:
            while True:
                if c == "":
                    raise fail("unexpected end of file")
                while True:
                    try:
                        _, end = decoder.raw_decode(buf, pos)
                        # Objects, arrays, strings and literals end where they end; a number
                        # ("-1" of "-1.5e3") is complete only when a delimiter follows it.
                        if eof or buf[pos] not in "-0123456789" or (
                            end < len(buf) and buf[end] in " \t\r\n,]"
                        ):
                            break
                    except json.JSONDecodeError as e:
                        if eof:
                            raise fail(f"{e.msg} at byte {base + e.pos}") from None
                    if not more():
                        continue  # eof now set: parse the rest once more, then fail or break
                starts.append(base + pos)
                lengths.append(end - pos)
                pos = end
                c = skip_ws()
                if c == ",":
                    pos += 1
                    c = skip_ws()
                    continue
                if c == "]":
                    pos += 1
                    break
                raise fail(f"expected ',' or ']', got {c!r}" if c else "unexpected end of file")
        if skip_ws() != "":
            raise fail("extra data after the closing ']'")
    lengths_np = np.frombuffer(lengths, dtype=np.int64)
    if len(lengths_np) and lengths_np.max() >= 2**32:
        raise ValueError(f"{path}: a row of {int(lengths_np.max())} bytes (>= 4 GiB)")
    return np.frombuffer(starts, dtype=np.int64).copy(), lengths_np.astype(np.uint32)


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
            format = "json" if _first_non_ws_byte(self.path) == b"[" else "jsonl"
        if format not in ("json", "jsonl"):
            raise ValueError(f"format must be 'json' or 'jsonl', got {format!r}")
        self.format = format
        st = os.stat(self.path)
        self._stamp = (st.st_size, st.st_mtime_ns)
        if format == "json":
            self._starts, self._lengths = _index_json_list(self.path)
            self._lines = None
        else:
            self._starts, self._lengths, self._lines = _index_jsonl(self.path)
        self._fd: int | None = None

    # -- protocol --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: Any) -> dict:
        i = _check_index(i, len(self))
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
            return _error_record(self.name, i, "", f"bad_json: {e} ({self.where(i)})")
        return self.make_record(row, i)

    def make_record(self, row: Any, i: int) -> dict:
        """Validate a parsed row and build its record (an error record when unusable)."""
        if not isinstance(row, dict):
            return _error_record(
                self.name, i, "", f"not_a_dict: row is a {type(row).__name__} ({self.where(i)})"
            )
        rid = row.get("id")
        id_ = f"{self.name}:{i}" if rid is None else str(rid)

        def err(reason: str) -> dict:
            return _error_record(self.name, i, id_, f"{reason} ({self.where(i)})")

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
        i = _check_index(i, len(self))
        k = bisect.bisect_right(self.offsets, i) - 1
        return k, i - self.offsets[k]

    def __getitem__(self, i: Any) -> dict:
        k, j = self.locate(i)
        return self.sources[k][j]

    def __repr__(self) -> str:
        return f"ConcatSource([{', '.join(repr(s) for s in self.sources)}])"


# ---------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------


def _walk_features(feature: Any, prefix: str, in_sequence: bool, out: list) -> None:
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.FeaturesDict):
        for key, sub in feature.items():
            _walk_features(sub, f"{prefix}/{key}" if prefix else key, in_sequence, out)
    elif isinstance(feature, tfds.features.Sequence):
        _walk_features(feature.feature, prefix, True, out)
    else:
        out.append((prefix, feature, in_sequence))


def _get_path(example: Any, key: str) -> Any:
    for part in key.split("/"):
        example = example[part]
    return example


def _nested(key: str, value: Any) -> dict:
    parts = key.split("/")
    d: Any = value
    for part in reversed(parts):
        d = {part: d}
    return d


def _as_text(value: Any) -> str | None:
    """A decoded Text value (bytes / str / numpy scalar, or a sequence: first non-empty one)."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _as_text(value.item())
    if isinstance(value, (list, tuple, np.ndarray)):
        for v in value:
            t = _as_text(v)
            if t is not None and t.strip():
                return t
        return None
    return None


class TfdsSource:
    """A TFDS data set with an image and a text feature, as stage-1 (caption) records.

    Reads through TFDS's array-record random access (``builder.as_data_source``, what
    ``tfds.data_source`` does), which needs no TensorFlow. The data set must be prepared
    already (``file_format="array_record"``); nothing is downloaded.

    Args:
      name_or_builder_dir: a prepared builder directory (``.../<name>/<config>/<version>``,
        holding ``dataset_info.json``), or a data set name (``"coco_captions"``,
        ``"my_ds/config:1.0.0"``) found under ``data_dir`` (TFDS' default data dir if None).
      split: any TFDS split spec (``"train"``, ``"train[:1%]"``, ...).
      image_key, text_key: feature paths (``"image"``, ``"captions/text"``); default: the only
        ``Image`` feature (outside sequences) and the only ``Text`` feature. ``ValueError``
        listing the features when there are none or several.
        A text feature inside a ``Sequence`` (several captions) gives its first non-empty one.
      instruction: the human turn's text after ``"<image>\\n"``; a string, or a sequence of
        strings of which row ``i`` gets one chosen deterministically from ``i``. Default
        ``"Describe the image concisely."`` (the ``plain`` template replaces it by the image
        token anyway).
      name: the records' ``source`` (default: the data set name).
      id_key: a feature whose value becomes the record ``id`` (default ``"<name>/<split>/<row>"``).

    Image choice: records carry the ENCODED image bytes (``image_bytes``), not the uint8 array
    that TFDS decodes to by default (a ``SkipDecoding`` decoder is installed): the pipeline's
    ``images.decode_and_preprocess_uint8`` decodes JPEGs at reduced scale (several times
    faster for large photos) and applies LLaVA's exact RGB conversion, and bytes are much
    smaller to pass between Grain worker processes.
    """

    def __init__(
        self,
        name_or_builder_dir: str | os.PathLike,
        split: str,
        image_key: str | None = None,
        text_key: str | None = None,
        data_dir: str | os.PathLike | None = None,
        instruction: str | Sequence[str] | None = None,
        name: str | None = None,
        id_key: str | None = None,
    ):
        self.split = split
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        builder = self._make_builder(os.fspath(name_or_builder_dir))
        # Reopen from the resolved directory in other processes (no registry lookup needed).
        self.builder_dir = os.fspath(builder.data_dir)
        self.dataset_name = builder.name
        self.name = name if name is not None else builder.name
        if instruction is None:
            instruction = DEFAULT_CAPTION_INSTRUCTION
        self.instructions = (instruction,) if isinstance(instruction, str) else tuple(instruction)
        if not self.instructions or not all(isinstance(s, str) for s in self.instructions):
            raise ValueError("instruction must be a string or a non-empty sequence of strings")
        self.id_key = id_key
        self.image_key, self.text_key = self._pick_keys(builder.info.features, image_key, text_key)
        self._builder = builder
        self._ds = None
        try:
            self._len = len(self._data_source())
        except Exception as e:  # noqa: BLE001 - bad split spec, not prepared, wrong file format
            raise ValueError(
                f"cannot open split {split!r} of {self.builder_dir} as a random-access source "
                f"(splits: {sorted(builder.info.splits)}; it must be prepared with "
                f"file_format='array_record'): {type(e).__name__}: {e}"
            ) from e

    def _make_builder(self, spec: str):
        import tensorflow_datasets as tfds

        if os.path.isfile(os.path.join(spec, "dataset_info.json")):
            return tfds.builder_from_directory(spec)
        try:
            return tfds.builder(spec, data_dir=self.data_dir)
        except Exception as e:  # noqa: BLE001 - registry / file lookup errors of many types
            raise ValueError(
                f"cannot find the TFDS data set {spec!r} (data_dir={self.data_dir!r}): {e}. "
                "Pass a prepared builder directory (holding dataset_info.json) or a name under "
                "data_dir; prepare it first with file_format='array_record'"
            ) from e

    def _pick_keys(self, features, image_key, text_key) -> tuple[str, str]:
        import tensorflow_datasets as tfds

        leaves: list = []
        _walk_features(features, "", False, leaves)
        leaves.sort(key=lambda leaf: leaf[0])  # FeaturesDict order is not the declared order
        listing = ", ".join(
            f"{k}: {type(f).__name__}{' (in a Sequence)' if seq else ''}" for k, f, seq in leaves
        )
        by_key = {k: (f, seq) for k, f, seq in leaves}

        def pick(key, cls, what, allow_seq):
            if key is not None:
                if key not in by_key:
                    raise ValueError(f"{self.dataset_name}: no feature {key!r}; features: {listing}")
                f, seq = by_key[key]
                if not isinstance(f, cls) or (seq and not allow_seq):
                    raise ValueError(
                        f"{self.dataset_name}: feature {key!r} is a {type(f).__name__}"
                        f"{' in a Sequence' if seq else ''}, not a {what}; features: {listing}"
                    )
                return key
            found = [k for k, f, seq in leaves if isinstance(f, cls) and (allow_seq or not seq)]
            if len(found) != 1:
                arg = "image_key" if cls is tfds.features.Image else "text_key"
                problem = f"no {what} feature" if not found else f"several {what} features {found}"
                raise ValueError(
                    f"{self.dataset_name}: {problem}; pass {arg}=. Features: {listing}"
                )
            return found[0]

        image_key = pick(image_key, tfds.features.Image, "Image", allow_seq=False)
        text_key = pick(text_key, tfds.features.Text, "Text", allow_seq=True)
        img = by_key[image_key][0]
        if np.dtype(img.np_dtype) != np.uint8:
            raise ValueError(f"{self.dataset_name}: image feature {image_key!r} is not uint8")
        return image_key, text_key

    def _data_source(self):
        if self._ds is None:
            import tensorflow_datasets as tfds

            if getattr(self, "_builder", None) is None:
                self._builder = tfds.builder_from_directory(self.builder_dir)
            self._ds = self._builder.as_data_source(
                split=self.split,
                decoders=_nested(self.image_key, tfds.decode.SkipDecoding()),
            )
        return self._ds

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ds"] = None
        state["_builder"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (
            f"TfdsSource({self.builder_dir!r}, split={self.split!r}, image_key={self.image_key!r}, "
            f"text_key={self.text_key!r}, rows={len(self)})"
        )

    def instruction_for(self, i: int) -> str:
        n = len(self.instructions)
        return self.instructions[0] if n == 1 else self.instructions[(i * 2654435761 % 2**32) % n]

    def __getitem__(self, i: Any) -> dict:
        i = _check_index(i, len(self))
        default_id = f"{self.dataset_name}/{self.split}/{i}"
        where = f"({self.builder_dir} split {self.split!r} row {i})"

        def err(id_: str, reason: str) -> dict:
            rec = _error_record(self.name, i, id_, f"{reason} {where}")
            rec["image_bytes"] = None
            return rec

        try:
            ex = self._data_source()[i]
        except Exception as e:  # noqa: BLE001 - a corrupt record can fail in many ways
            return err(default_id, f"bad_record: {type(e).__name__}: {e}")
        id_ = default_id
        if self.id_key is not None:
            try:
                v = _get_path(ex, self.id_key)
                id_ = _as_text(v) if _as_text(v) is not None else str(np.asarray(v).item())
            except Exception as e:  # noqa: BLE001
                return err(default_id, f"bad_record: id {self.id_key!r}: {type(e).__name__}: {e}")
        image = _get_path(ex, self.image_key)
        if isinstance(image, np.ndarray) and image.dtype == object and image.ndim == 0:
            image = image.item()
        if not isinstance(image, (bytes, np.bytes_)) or not len(image):
            return err(id_, f"bad_image: {self.image_key!r} is empty or not encoded bytes")
        try:
            caption = _as_text(_get_path(ex, self.text_key))
        except UnicodeDecodeError as e:
            return err(id_, f"bad_caption: {self.text_key!r} is not UTF-8: {e}")
        if caption is None or not caption.strip():
            return err(id_, f"bad_caption: empty {self.text_key!r}")
        if IMAGE_TOKEN in caption:
            return err(id_, f"bad_caption: {IMAGE_TOKEN!r} inside the caption")
        return {
            "id": id_,
            "source": self.name,
            "row": i,
            "image_path": None,
            "image_bytes": bytes(image),
            "conversations": [
                {"from": "human", "value": IMAGE_TOKEN + "\n" + self.instruction_for(i)},
                {"from": "gpt", "value": caption},
            ],
        }


# ---------------------------------------------------------------------------------------------
# Skip log
# ---------------------------------------------------------------------------------------------


class SkipLog:
    """Counts skipped rows by reason kind (and by source); optionally appends them to a JSONL file.

    ``record(source, row, id, reason)`` is thread-safe (one lock); each call appends one line
    ``{"time", "source", "row", "id", "kind", "reason"}`` to ``path`` when given (opened in
    append mode per call, so several processes can share a file; lines are short single
    writes). ``kind`` is :func:`error_kind` of the reason (``"bad_json: ..."`` -> ``bad_json``).

    ``summary()`` returns ``{"total", "by_kind", "by_source", "examples"}`` (up to
    ``max_examples`` full reasons per kind); ``str(log)`` is a one-line human summary.
    """

    def __init__(self, path: str | os.PathLike | None = None, max_examples: int = 3):
        self.path = None if path is None else os.fspath(path)
        self.max_examples = max_examples
        self.by_kind: Counter = Counter()
        self.by_source: Counter = Counter()
        self.examples: dict[str, list[dict]] = {}
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def record(self, source: str, row: int, id: str, reason: str) -> None:  # noqa: A002
        kind = error_kind(reason)
        row = int(row) if isinstance(row, (int, np.integer)) else row
        entry = {"source": source, "row": row, "id": str(id), "kind": kind, "reason": str(reason)}
        with self._lock:
            self.by_kind[kind] += 1
            self.by_source[source] += 1
            ex = self.examples.setdefault(kind, [])
            if len(ex) < self.max_examples:
                ex.append(entry)
            if self.path is not None:
                line = json.dumps({"time": round(time.time(), 3), **entry}, ensure_ascii=False)
                from llava_jax.fileio import append_text  # local or gs://

                append_text(self.path, line + "\n")

    def record_error(self, record: dict) -> None:
        """``record`` taking the fields from an error record of a source."""
        self.record(record.get("source", "?"), record.get("row", -1), record.get("id", ""),
                    record["error"])

    def summary(self) -> dict:
        with self._lock:
            return {
                "total": sum(self.by_kind.values()),
                "by_kind": dict(self.by_kind.most_common()),
                "by_source": dict(self.by_source.most_common()),
                "examples": {k: list(v) for k, v in self.examples.items()},
            }

    def __str__(self) -> str:
        s = self.summary()
        if not s["total"]:
            return "skipped 0 rows"
        kinds = ", ".join(f"{k} {n}" for k, n in s["by_kind"].items())
        sources = ", ".join(f"{k} {n}" for k, n in s["by_source"].items())
        return f"skipped {s['total']} rows: {kinds} (by source: {sources})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


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
