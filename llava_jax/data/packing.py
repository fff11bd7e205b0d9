"""Packing tokenized multimodal samples into fixed rows, as a checkpointable Grain transformation.

A *sample* (what the per-record processing in :mod:`llava_jax.data.pipeline` emits) is a dict::

    {"input_ids": int32[n], "targets": int32[n], "images": uint8[k, H, W, 3], ...}

with ``targets`` ALREADY SHIFTED (``targets[t]`` = label of token ``t + 1``, ``-100`` at the
last token; see :func:`shift_labels`). Records that could not be used arrive as *skip markers*
``{"skip": reason, "source", "row", "id", "detail"}`` in the same stream, so that the counts are
made in ONE place (the main process, after Grain's worker processes) and are exact whatever the
number of workers (the reasons, markers and counters are in :mod:`llava_jax.data.skips`).

A *row* (what :class:`PackIterDataset` yields) holds one or more samples back to back::

    input_ids   int32 [L]       pad_token_id after the last segment
    targets     int32 [L]       -100 at padding and at the last token of every segment
    segment_ids int32 [L]       1..k for the k samples of the row, 0 = padding
    positions   int32 [L]       0.. restarting at every segment, 0 at padding
    images      uint8 [M,H,W,3] the row's images in the order of their image tokens, zeros after
    image_mask  bool  [M]       which image slots are used
    stats       dict            per-row counts + cumulative skip counters (see batch_rows)

LLaVA-NeXT AnyRes rows (``RowSpec.anyres`` set; the samples' ``images`` are each image's views
[k, 1 + K, H, W, 3] and they carry ``image_sizes`` [k, 2]) hold, instead of images / image_mask,
the arrays ``data.anyres.anyres_batch`` makes for a batch (the same ``row_image_index``)::

    tiles       uint8 [M,1+K,H,W,3]  per image slot its base view then its tiles, zeros after
    tile_mask   bool  [M,1+K]        which views are real
    image_index int32 [C]            the k-th image token's row in the row's feature table (image
                                     m's indices offset by m * table_size), -1 after the last

Because every segment's last target is -100 and the model attends causal AND same-segment with
per-segment positions, the per-token loss of a packed row equals that of its samples run alone.

Packing algorithm (deterministic, grain's ``FirstFitPackIterDataset`` scheme): samples fill up
to ``num_bins`` open rows first-fit (a sample goes into the first open row with room for its
tokens, its images and, optionally, one more segment). When a sample fits in no open row, all
open rows are emitted in order (a *packing window* closes) and the sample opens the next window.
Checkpointing: the state is the input position where the current window starts (the parent
iterator's state before the group holding its first sample + that sample's index in the group,
see :func:`group_elements`), the number of rows of that window already emitted and the counters
at the window start; a restore replays the window (at most ``num_bins`` rows worth of samples
are decoded again) without logging its skips a second time.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Sequence

import grain
import numpy as np

from llava_jax.config import IGNORE_INDEX, LlavaConfig
from llava_jax.data import anyres
from llava_jax.data.skips import (
    MARKER_KEYS,
    DropSample,
    NoTrainingData,
    count_skip,
    empty_counters,
    is_skip_marker,
    marker_reason,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Per-sample helpers (run in the Grain workers)
# ---------------------------------------------------------------------------------------------


def shift_labels(labels: np.ndarray) -> np.ndarray:
    """Next-token targets within one sample: ``targets[t] = labels[t + 1]``, ``-100`` at the end.

    With these, the loss is plain ``CE(logits[t], targets[t])`` (no shift in the trainer), and a
    packed row never asks a segment's last token to predict the next segment's first token.
    """
    labels = np.asarray(labels, dtype=np.int32)
    out = np.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    return out


def apply_length_policy(
    input_ids: np.ndarray,
    labels: np.ndarray,
    max_length: int,
    policy: str,
    image_token_id: int,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Fit one tokenized sample (unshifted ``labels``) into ``max_length`` tokens.

    Returns ``(input_ids, targets, truncated)`` with SHIFTED targets. Raises :class:`DropSample`:

    * ``too_long``: the sample is longer than ``max_length`` and ``policy == "drop"``; or
      ``policy == "truncate"`` but the cut would fall inside (or before) an image's tokens, or
      no supervised target would remain before the cut. Truncation keeps the first
      ``max_length`` tokens (text after the images is cut; images are never cut).
    * ``no_targets``: the sample (which fits) supervises nothing.
    """
    if policy not in ("drop", "truncate"):
        raise ValueError(f"length_policy must be 'drop' or 'truncate', got {policy!r}")
    input_ids = np.asarray(input_ids, dtype=np.int32)
    labels = np.asarray(labels, dtype=np.int32)
    n = len(input_ids)
    truncated = False
    if n > max_length:
        if policy == "drop":
            raise DropSample("too_long", f"{n} tokens > max_length={max_length}")
        img_pos = np.flatnonzero(input_ids == image_token_id)
        if img_pos.size and img_pos[-1] >= max_length:
            raise DropSample(
                "too_long",
                f"{n} tokens > max_length={max_length} and the cut would fall inside image tokens "
                f"(last image token at {int(img_pos[-1])})",
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        truncated = True
    targets = shift_labels(labels)
    if not np.any(targets != IGNORE_INDEX):
        if truncated:
            raise DropSample(
                "too_long", f"{n} tokens > max_length={max_length}: no supervised token before the cut"
            )
        raise DropSample("no_targets", "no supervised token")
    return input_ids, targets, truncated


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Static shape of a packed row. ``anyres``: the LLaVA-NeXT model config (AnyRes rows, see the
    module docstring; ``image_shape`` stays one view's (H, W, 3)); ``max_views``: the most REAL
    views (base + tiles) a row's images may take (None: no bound beyond ``max_images``)."""

    max_length: int
    max_images: int
    image_shape: tuple[int, int, int]  # (H, W, 3)
    pad_token_id: int = 0
    max_segments: int | None = None  # None: unlimited
    anyres: LlavaConfig | None = None
    max_views: int | None = None

    @property
    def sample_image_shape(self) -> tuple[int, ...]:
        """The shape of one image in a sample: a view, or an AnyRes image's 1 + max_tiles views."""
        if self.anyres is None:
            return tuple(self.image_shape)
        return (1 + self.anyres.max_tiles,) + tuple(self.image_shape)


class _Bin:
    __slots__ = ("samples", "tokens", "images", "views")

    def __init__(self):
        self.samples: list[dict] = []
        self.tokens = 0
        self.images = 0
        self.views = 0

    def fits(self, n_tok: int, n_img: int, n_views: int, spec: RowSpec) -> bool:
        if self.tokens + n_tok > spec.max_length or self.images + n_img > spec.max_images:
            return False
        if spec.max_views is not None and self.views + n_views > spec.max_views:
            return False
        return spec.max_segments is None or len(self.samples) < spec.max_segments

    def add(self, sample: dict, n_tok: int, n_img: int, n_views: int) -> None:
        self.samples.append(sample)
        self.tokens += n_tok
        self.images += n_img
        self.views += n_views


def num_tokens(sample: dict) -> int:
    return int(len(sample["input_ids"]))


def num_images(sample: dict) -> int:
    imgs = sample.get("images")
    return 0 if imgs is None else int(len(imgs))


def num_views(sample: dict, spec: RowSpec) -> int:
    """Real views the tower encodes for the sample's images: one per image, AnyRes base + tiles."""
    if spec.anyres is None:
        return num_images(sample)
    return sum(anyres.num_views(int(h), int(w), spec.anyres) for h, w in sample["image_sizes"])


def build_row(samples: Sequence[dict], spec: RowSpec) -> dict[str, Any]:
    """Concatenate ``samples`` into one row of ``spec`` (see the module docstring); no stats."""
    L, M = spec.max_length, spec.max_images
    input_ids = np.full((L,), spec.pad_token_id, np.int32)
    targets = np.full((L,), IGNORE_INDEX, np.int32)
    segment_ids = np.zeros((L,), np.int32)
    positions = np.zeros((L,), np.int32)
    images = np.zeros((M,) + spec.sample_image_shape, np.uint8)
    image_mask = np.zeros((M,), bool)
    sizes: list[tuple[int, int]] = []  # AnyRes: (height, width) of the row's images, in order
    t = m = 0
    for seg, s in enumerate(samples, start=1):
        ids = np.asarray(s["input_ids"])
        n = len(ids)
        if t + n > L:
            raise ValueError(f"row overflow: {t + n} tokens > max_length={L}")
        input_ids[t : t + n] = ids
        targets[t : t + n] = s["targets"]
        segment_ids[t : t + n] = seg
        positions[t : t + n] = np.arange(n, dtype=np.int32)
        t += n
        k = num_images(s)
        if k:
            if m + k > M:
                raise ValueError(f"row overflow: {m + k} images > max_images_per_row={M}")
            imgs = np.asarray(s["images"])
            if imgs.shape[1:] != spec.sample_image_shape:
                raise ValueError(f"image shape {imgs.shape[1:]} != {spec.sample_image_shape}")
            images[m : m + k] = imgs
            image_mask[m : m + k] = True
            m += k
            if spec.anyres is not None:
                sizes += [(int(h), int(w)) for h, w in s["image_sizes"]]
    row = {"input_ids": input_ids, "targets": targets, "segment_ids": segment_ids, "positions": positions}
    if spec.anyres is None:
        return {**row, "images": images, "image_mask": image_mask}
    tile_mask = np.zeros(images.shape[:2], bool)
    for i, (h, w) in enumerate(sizes):
        tile_mask[i, : anyres.num_views(h, w, spec.anyres)] = True
    capacity = anyres.index_capacity(spec.anyres, M, L)
    return {**row, "tiles": images, "tile_mask": tile_mask,
            "image_index": anyres.row_image_index(sizes, spec.anyres, capacity)}


def _row_stats(samples: Sequence[dict], spec: RowSpec, counters: dict[str, int]) -> dict[str, Any]:
    tokens = sum(num_tokens(s) for s in samples)
    tgt = sum(int(np.count_nonzero(np.asarray(s["targets"]) != IGNORE_INDEX)) for s in samples)
    out = {
        "num_samples": np.int32(len(samples)),
        "num_tokens": np.int32(tokens),
        "num_target_tokens": np.int32(tgt),
        "num_images": np.int32(sum(num_images(s) for s in samples)),
        "num_views": np.int32(sum(num_views(s, spec) for s in samples)),
        "row_efficiency": np.float32(tokens / spec.max_length),
    }
    # Cumulative counters (samples seen, truncated, skipped by reason) as of this row.
    out.update({f"total/{k}": np.int64(v) for k, v in counters.items()})
    return out


def batch_rows(rows: Sequence[dict]) -> dict[str, Any]:
    """Grain ``batch_fn``: stack rows into a batch; merge their stats into one small dict.

    ``stats`` of a batch: ``num_samples``, ``num_tokens`` (non-pad), ``num_target_tokens``,
    ``num_images`` (sums over the batch), ``packing_efficiency`` (non-pad tokens / B·L),
    ``row_efficiency`` float32[B], and the cumulative ``total/*`` counters as of the batch's
    last row: ``total/samples`` (samples packed so far), ``total/truncated``,
    ``total/skipped/<reason>`` and ``total/skipped`` (their sum).
    """
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "stats"}
    st = [r["stats"] for r in rows]
    b = len(rows)
    L = rows[0]["input_ids"].shape[0]
    n_tok = sum(int(s["num_tokens"]) for s in st)
    stats = {
        "num_rows": np.int32(b),
        "num_samples": np.int32(sum(int(s["num_samples"]) for s in st)),
        "num_tokens": np.int32(n_tok),
        "num_target_tokens": np.int32(sum(int(s["num_target_tokens"]) for s in st)),
        "num_images": np.int32(sum(int(s["num_images"]) for s in st)),
        "num_views": np.int32(sum(int(s["num_views"]) for s in st)),
        "packing_efficiency": np.float32(n_tok / (b * L)),
        "row_efficiency": np.asarray([s["row_efficiency"] for s in st], np.float32),
    }
    last = st[-1]
    totals = {k: v for k, v in last.items() if k.startswith("total/")}
    stats.update(totals)
    stats["total/skipped"] = np.int64(sum(int(v) for k, v in totals.items() if k.startswith("total/skipped/")))
    out["stats"] = stats
    return out


# ---------------------------------------------------------------------------------------------
# Groups: several samples per inter-process message
# ---------------------------------------------------------------------------------------------

_META_KEYS = ("id", "source", "row", "truncated")


def group_elements(elements: Sequence[dict]) -> dict[str, Any]:
    """Several samples / skip markers as ONE element with concatenated arrays (used as a Grain
    ``batch_fn`` in the workers). Each element crossing Grain's process boundary costs a
    shared-memory segment per large array plus a pickled message (measured ~2.5 ms CPU per
    element on the benchmark machine, as much as decoding the image); grouping 8 samples
    amortizes that. :func:`ungroup` restores the elements, in order."""
    samples = [e for e in elements if not is_skip_marker(e)]
    meta = []
    for e in elements:
        if is_skip_marker(e):
            meta.append({k: e.get(k) for k in MARKER_KEYS})
        else:
            meta.append({"n_tok": int(len(e["input_ids"])), "n_img": num_images(e),
                         **{k: e.get(k) for k in _META_KEYS}})
    out = {"meta": meta}
    if samples:
        out["input_ids"] = np.concatenate([np.asarray(e["input_ids"], np.int32) for e in samples])
        out["targets"] = np.concatenate([np.asarray(e["targets"], np.int32) for e in samples])
        out["images"] = np.concatenate([np.asarray(e["images"], np.uint8) for e in samples])
        if "image_sizes" in samples[0]:  # AnyRes samples
            out["image_sizes"] = np.concatenate([np.asarray(e["image_sizes"], np.int32) for e in samples])
    return out


def ungroup(element: dict) -> list[dict]:
    """Inverse of :func:`group_elements`; a plain (ungrouped) element gives ``[element]``."""
    if "meta" not in element:
        return [element]
    out, t, m = [], 0, 0
    for meta in element["meta"]:
        if is_skip_marker(meta):
            out.append(dict(meta))
            continue
        n, k = meta["n_tok"], meta["n_img"]
        out.append({
            "input_ids": element["input_ids"][t : t + n],
            "targets": element["targets"][t : t + n],
            "images": element["images"][m : m + k],
            **({"image_sizes": element["image_sizes"][m : m + k]} if "image_sizes" in element else {}),
            **{key: meta.get(key) for key in _META_KEYS},
        })
        t, m = t + n, m + k
    return out


# ---------------------------------------------------------------------------------------------
# Grain transformation
# ---------------------------------------------------------------------------------------------


class PackIterDataset(grain.IterDataset):
    """Packs a stream of samples / skip markers into rows (see the module docstring).

    Args:
      parent: IterDataset of sample dicts and skip markers, or of groups of them
        (:func:`group_elements`).
      spec: the row shape.
      num_bins: open rows of a packing window (1 + ``spec.max_segments == 1`` = no packing).
      skip_log: optional object with ``record(source, row, id, reason)``; each skipped record is
        reported to it once (not again when a restored iterator replays a window).
      state_check: extra JSON-able items stored in the state and compared on restore (e.g. the
        worker count and shard), so a mismatched restore fails loudly instead of silently
        yielding different data.
      max_consecutive_skips: raise :class:`NoTrainingData` (instead of spinning forever on a
        repeated data set) after this many skipped records in a row; the pipeline passes twice
        the records of one epoch of the shard. None: no limit. Either way a stream that ends
        without one usable sample raises it too.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        spec: RowSpec,
        num_bins: int,
        skip_log: Any = None,
        state_check: dict | None = None,
        max_consecutive_skips: int | None = None,
    ):
        super().__init__(parent)
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self._spec = spec
        self._num_bins = num_bins
        self._skip_log = skip_log
        self._state_check = dict(state_check or {})
        self._max_skips = None if max_consecutive_skips is None else max(1, int(max_consecutive_skips))

    def __iter__(self):
        return PackDatasetIterator(
            self._parent.__iter__(), self._spec, self._num_bins, self._skip_log, self._state_check,
            self._max_skips,
        )

    def __str__(self) -> str:
        return f"PackIterDataset(num_bins={self._num_bins}, spec={self._spec})"


class PackDatasetIterator(grain.DatasetIterator):
    """See :class:`PackIterDataset`. A *position* in the input is (parent state before a
    parent element, index inside that element's group)."""

    def __init__(self, parent, spec: RowSpec, num_bins: int, skip_log, state_check: dict,
                 max_consecutive_skips: int | None = None):
        super().__init__(parent)
        self._spec = spec
        self._num_bins = num_bins
        self._skip_log = skip_log
        self._state_check = state_check
        self._max_skips = max_consecutive_skips
        self._consecutive_skips = 0
        self._last_skip: dict | None = None
        self._replaying = False
        self._counters = empty_counters()
        self._group: list[dict] = []
        self._group_pos = 0
        self._group_state = copy.deepcopy(self._parent.get_state())
        self._reset_window((self._group_state, 0))

    # -- input ---------------------------------------------------------------------------
    def _next_element(self) -> tuple[tuple[Any, int], dict]:
        """((parent state before the group, index in group), element); StopIteration at the end."""
        while self._group_pos >= len(self._group):
            state = self._parent.get_state()
            el = next(self._parent)
            self._group, self._group_pos, self._group_state = ungroup(el), 0, state
        pos = (self._group_state, self._group_pos)
        el = self._group[self._group_pos]
        self._group_pos += 1
        return pos, el

    # -- window bookkeeping --------------------------------------------------------------
    def _reset_window(self, position) -> None:
        self._bins: list[_Bin] = []
        self._pending: list[dict] = []  # rows of the closed window not yet emitted
        self._emitted = 0  # rows of the closed window already emitted
        # Where to restart the current window: input position + counters before its first element.
        self._base = (copy.deepcopy(position[0]), int(position[1]), dict(self._counters))
        self._exhausted = False

    def _close_window(self) -> None:
        counters = dict(self._counters)
        self._pending = [
            {**build_row(b.samples, self._spec), "stats": _row_stats(b.samples, self._spec, counters)}
            for b in self._bins
            if b.samples
        ]
        self._bins = []
        self._emitted = 0

    def _consume(self, element: dict) -> bool:
        """Adds one element to the open bins. Returns False when it does not fit (the caller
        closes the window and retries it in a fresh one)."""
        if is_skip_marker(element):
            count_skip(self._counters, element["skip"])
            if not self._replaying:
                self._log_skip(element)
            self._consecutive_skips += 1
            self._last_skip = element
            if self._max_skips is not None and self._consecutive_skips > self._max_skips:
                self._raise_no_training_data(f"the last {self._consecutive_skips} rows")
            return True
        n_tok, n_img, n_views = num_tokens(element), num_images(element), num_views(element, self._spec)
        if not _Bin().fits(n_tok, n_img, n_views, self._spec):
            # The per-sample step enforces these; a sample reaching here is a bug upstream.
            raise ValueError(
                f"sample {element.get('id')!r} ({n_tok} tokens, {n_img} images, {n_views} views) does not fit a "
                f"row (max_length={self._spec.max_length}, max_images={self._spec.max_images}, "
                f"max_views={self._spec.max_views})"
            )
        for b in self._bins:
            if b.fits(n_tok, n_img, n_views, self._spec):
                b.add(element, n_tok, n_img, n_views)
                break
        else:
            if len(self._bins) >= self._num_bins:
                return False
            b = _Bin()
            b.add(element, n_tok, n_img, n_views)
            self._bins.append(b)
        self._consecutive_skips = 0
        self._counters["samples"] += 1
        self._counters["truncated"] += int(bool(element.get("truncated", False)))
        return True

    def _raise_no_training_data(self, where: str) -> None:
        skipped = {k: v for k, v in self._counters.items() if k.startswith("skipped/") and v}
        el = self._last_skip or {}
        raise NoTrainingData(
            f"no usable sample in {where}: every record is being skipped; counts so far {skipped}; "
            f"last: {el.get('source')} row {el.get('row')}: {el.get('detail', '')} (all skipped rows are in "
            "the skip log)")

    def _log_skip(self, el: dict) -> None:
        if self._skip_log is not None:
            reason = marker_reason(el)
            try:
                self._skip_log.record(el.get("source", "?"), el.get("row", -1), el.get("id", ""), reason)
            except Exception:  # noqa: BLE001 - a log must never stop training
                logger.exception("skip log failed")
        else:
            logger.warning(
                "skipped record (%s): source=%s row=%s id=%s: %s",
                el.get("skip"), el.get("source"), el.get("row"), el.get("id"), el.get("detail", ""),
            )

    def _fill(self) -> None:
        """Reads until a window closes (or the input ends); fills ``self._pending``."""
        while not self._pending:
            if self._exhausted:
                return
            counters_before = dict(self._counters)
            try:
                pos, el = self._next_element()
            except StopIteration:
                self._exhausted = True
                if not self._counters["samples"] and self._consecutive_skips:
                    # a finite stream of nothing but skips (e.g. one epoch of all-bad data)
                    self._raise_no_training_data(f"{self._consecutive_skips} rows")
                self._close_window()
                return
            if not self._consume(el):
                # `el` opens the next window: close this one; the next restore point is `el`.
                self._close_window()
                self._next_base = (copy.deepcopy(pos[0]), pos[1], counters_before)
                ok = self._consume(el)  # an empty row always takes it
                assert ok

    # -- iterator API --------------------------------------------------------------------
    def __next__(self):
        self._fill()
        if not self._pending:
            raise StopIteration
        row = self._pending.pop(0)
        self._emitted += 1
        if not self._pending and not self._exhausted:
            # Window fully emitted: the next restore point is the start of the open window.
            self._base, self._emitted = self._next_base, 0
        return row

    def get_state(self) -> dict[str, Any]:
        parent_state, skip, counters = self._base
        return {
            "parent": copy.deepcopy(parent_state),
            "skip": skip,
            "emitted": self._emitted,
            "counters": dict(counters),
            "check": dict(self._state_check),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        check = dict(state.get("check", {}))
        diff = {k: (check.get(k), self._state_check.get(k))
                for k in set(check) | set(self._state_check) if check.get(k) != self._state_check.get(k)}
        if diff:
            raise ValueError(
                "this iterator state was saved by a pipeline with different settings: "
                + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                + "; restore with the same settings (Grain's worker-process state depends on them)"
            )
        self._parent.set_state(state["parent"])
        self._group, self._group_pos, self._group_state = [], 0, copy.deepcopy(state["parent"])
        skip = int(state.get("skip", 0))
        try:
            for _ in range(skip):  # elements of earlier windows in the same group
                self._next_element()
        except StopIteration:
            pass
        self._counters = {**empty_counters(), **{k: int(v) for k, v in state["counters"].items()}}
        self._consecutive_skips = 0
        self._reset_window((state["parent"], skip))
        emitted = int(state["emitted"])
        if emitted:
            # The window was fully read (and its skips logged) before the checkpoint: replay it
            # silently and drop the rows that were already emitted.
            self._replaying = True
            try:
                self._fill()
            finally:
                self._replaying = False
            del self._pending[:emitted]
            self._emitted = emitted
            if not self._pending and not self._exhausted:
                self._base, self._emitted = self._next_base, 0

    def __str__(self) -> str:
        return f"PackDatasetIterator(num_bins={self._num_bins})"
