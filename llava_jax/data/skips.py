"""Skip accounting: every row that is not trained on is named, counted once and logged.

Bad data never raises out of a source or a Grain worker (one bad row must not stop training);
it is turned into a small dict that travels where a row would have, and is counted at the end
of the stream. Two vocabularies, one per stage:

* Sources (:mod:`llava_jax.data.sources`, :mod:`llava_jax.data.tfds_source`) return an *error
  record* (:func:`error_record`) with ``"error": "<kind>: <detail>"``, ``kind`` a short stable
  slug (``bad_json``, ``no_conversations``, ``bad_image``...; read it with :func:`error_kind`).
* The pipeline's per-sample step (:mod:`llava_jax.data.pipeline`, in the Grain workers) raises
  :class:`DropSample` with one of the fixed :data:`SKIP_REASONS` (a source's error record is
  ``malformed``) and emits a *skip marker* (:func:`skip_marker`) in the sample stream instead of
  a sample.

The packer (:mod:`llava_jax.data.packing`, main process) counts each marker into the counters of
:func:`empty_counters` (:func:`count_skip`), so counts are exact whatever the number of workers
and are part of the checkpointed iterator state, and reports it once to a :class:`SkipLog`
(:func:`marker_reason` is the reason it logs).

Data that cannot train anything is the one error: :class:`NoTrainingData`, for a data set with
no rows (before reading) and for a stream in which every record is being skipped.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping

import numpy as np

__all__ = [
    "SKIP_REASONS",
    "MARKER_KEYS",
    "DropSample",
    "NoTrainingData",
    "SkipLog",
    "count_skip",
    "empty_counters",
    "error_kind",
    "error_record",
    "is_skip_marker",
    "marker_reason",
    "skip_marker",
]

# ---------------------------------------------------------------------------------------------
# Source error records
# ---------------------------------------------------------------------------------------------


def error_kind(reason: str) -> str:
    """The stable slug of an error reason: the text before the first ``:``."""
    return str(reason).split(":", 1)[0].strip() or "unknown"


def error_record(source: str, row: int, id_: str, reason: str) -> dict:
    """A source's record for an unusable row: the usual keys, no content, ``error`` = reason."""
    return {
        "id": id_,
        "source": source,
        "row": row,
        "image_path": None,
        "conversations": [],
        "error": reason,
    }


# ---------------------------------------------------------------------------------------------
# Pipeline skip reasons, markers and counters
# ---------------------------------------------------------------------------------------------

# Why a record was skipped. The set is fixed so that every stats dict has the same structure
# (static pytrees for the trainer; Grain checkpoints prefer fixed-shape states).
SKIP_REASONS: tuple[str, ...] = (
    "malformed",  # the source flagged the row ("error" key) or the record could not be read
    "conversation",  # templates rejected the conversation (empty, wrong roles, no <image> for plain...)
    "tokenize",  # any other error while rendering/tokenizing
    "image_missing",  # the image file does not exist
    "image_corrupt",  # the image could not be decoded
    "image_mismatch",  # number of <image> tokens != number of images of the record
    "too_many_images",  # more images than max_images_per_row
    "too_long",  # over max_length and the length policy drops it
    "no_targets",  # nothing supervised (e.g. only prompt tokens)
)

# The keys of a skip marker; packing.group_elements sends exactly these between processes.
MARKER_KEYS: tuple[str, ...] = ("skip", "detail", "id", "source", "row")


def empty_counters() -> dict[str, int]:
    return {"samples": 0, "truncated": 0, **{f"skipped/{r}": 0 for r in SKIP_REASONS}}


class NoTrainingData(RuntimeError):
    """The data yields nothing to train on: no rows at all, or every record is skipped. The
    message is one line (counts by reason, the last skipped record)."""


class DropSample(Exception):
    """Raised by the per-sample steps: the sample is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def skip_marker(reason: str, detail: str, meta: Mapping) -> dict:
    """What the per-sample step emits instead of a sample (``meta``: source, row, id)."""
    return {"skip": reason, "detail": detail, **meta}


def is_skip_marker(element: Mapping) -> bool:
    return "skip" in element


def count_skip(counters: dict[str, int], reason: str) -> None:
    """Adds one skip to ``counters``; a reason it has no counter for counts as ``malformed``
    (the counters' keys are fixed, see :data:`SKIP_REASONS`)."""
    key = f"skipped/{reason}" if f"skipped/{reason}" in counters else "skipped/malformed"
    counters[key] += 1


def marker_reason(marker: Mapping) -> str:
    """``"<reason>: <detail>"`` (just the reason without a detail), as a :class:`SkipLog` takes it."""
    detail = marker.get("detail") or ""
    return f"{marker['skip']}: {detail}" if detail else marker["skip"]


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
