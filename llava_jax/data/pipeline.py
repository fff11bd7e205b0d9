"""The Grain input pipeline: records -> packed multimodal rows -> batches.

::

    random-access source(s)                      (llava_jax.data.sources; read in the workers)
      -> seeded shuffle, reshuffled every epoch   (grain MapDataset.shuffle + repeat)
      -> per-process shard                        (ds[process_index::process_count])
      -> decode + preprocess + tokenize           (SampleProcessor, in Grain worker processes)
      -> groups of 8 samples per IPC message      (packing.group_elements; mp_prefetch)
      -> packing into fixed rows                  (packing.PackIterDataset, main process)
      -> batch (+ stats)                          (packing.batch_rows)
      -> prefetch                                 (a background thread of finished batches)

Usage::

    cfg = PipelineConfig(max_length=2048, max_images_per_row=4, image_size=336,
                         num_image_tokens=576, template="vicuna_v1", batch_size=8,
                         worker_count=8, seed=0, num_epochs=None)
    it = make_iterator(LlavaJsonSource(json_path, image_folder), tokenizer, cfg)
    batch = next(it); stats = batch.pop("stats")
    state = it.get_state()              # JSON-able dict, save with the model checkpoint
    it = make_iterator(..., state=state)  # yields exactly the batches the first one would have

Batch (numpy, per process, B = batch_size, L = max_length, M = max_images_per_row)::

    input_ids   int32 [B, L]
    targets     int32 [B, L]       ALREADY SHIFTED: label of token t+1 of the same segment, else
                                   -100; the loss is CE(logits[:, t], targets[:, t]), no shift
    segment_ids int32 [B, L]       1..k per packed sample, 0 = padding
    positions   int32 [B, L]       restart at 0 per segment
    images      uint8 [B, M, H, W, 3]  in the order of the row's image-token spans
    image_mask  bool  [B, M]
    (LLaVA-NeXT AnyRes, ``cfg.anyres`` set: instead of images / image_mask, K = max_tiles, C =
    ``anyres.index_capacity``)
    tiles       uint8 [B, M, 1 + K, H, W, 3]  per image slot its base view, then its tiles
    tile_mask   bool  [B, M, 1 + K]           which views are real
    image_index int32 [B, C]                  per image token of the row, its feature-table row
    stats       dict of numpy scalars (pop it before device_put; see packing.batch_rows):
                num_rows, num_samples, num_tokens, num_target_tokens, num_images,
                packing_efficiency, row_efficiency [B], total/samples, total/truncated,
                total/skipped, total/skipped/<reason> for reason in skips.SKIP_REASONS

Skipped records (counted by reason, never a crash): the source's error records
(``malformed``), conversations the templates reject (``conversation``), other tokenization
errors (``tokenize``), missing/corrupt images (``image_missing``/``image_corrupt``), a number
of ``<image>`` tokens different from the number of images (``image_mismatch``), more images
than a row holds (``too_many_images``), over-long samples (``too_long``, see
``length_policy``), samples with nothing supervised (``no_targets``). The workers turn each into
a small *skip marker* that travels in the sample stream; the packer (main process) counts them,
so counts are exact and independent of the number of workers, are part of the checkpointed
iterator state, and reach the trainer in every batch's ``stats``. Each skip is also reported to
a :class:`llava_jax.data.skips.SkipLog` (file/source, row, id, reason) once.

Determinism: for a given config (seed, worker_count, process_index/count, ...), the batches are
a pure function of the data. The per-sample stream is even independent of ``worker_count`` and
``worker_group_size`` (Grain's mp_prefetch gives worker ``i`` the elements ``i::n`` and
interleaves them round-robin, and nothing is filtered before it), so the batches are the same
with 0, 1 or N workers; but Grain's iterator *state* has a different structure per worker count
/ group size, so restore with the same ones (a mismatch raises a ValueError that says so).

Grain notes (0.2.18): ``mp_prefetch`` reads absl flags, so outside an absl app they are marked
parsed here (else ``UnparsedFlagAccessError``); workers are *spawned* (scripts that build a
pipeline need an ``if __name__ == "__main__":`` guard) and start in ~2-5 s (imports);
``close()`` the iterator when done (workers otherwise linger until garbage collection, and
interpreter shutdown prints ``__del__`` noise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

import grain

from llava_jax.config import LlavaConfig
from llava_jax.data import anyres
from llava_jax.data import images as imglib
from llava_jax.data.packing import (
    PackIterDataset,
    RowSpec,
    apply_length_policy,
    batch_rows,
    group_elements,
)
from llava_jax.data.pipeline_config import PipelineConfig
from llava_jax.data.skips import DropSample, NoTrainingData, SkipLog, skip_marker
from llava_jax.data.templates import IMAGE_TOKEN, resolve_template
from llava_jax.data.tokenize import expand_image_tokens, tokenize_conversation

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class SafeSource:
    """Wraps a random-access source: a ``__getitem__`` that raises becomes an error record (the
    pipeline counts it as ``malformed``) instead of killing a worker; ``row``/``source`` are
    filled in when the source's records lack them."""

    def __init__(self, source: Any, name: str | None = None):
        self.source = source
        self.name = name or getattr(source, "name", None) or type(source).__name__

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        try:
            rec = self.source[i]
        except Exception as e:  # noqa: BLE001 - counted and skipped downstream
            return {"id": str(i), "source": self.name, "row": int(i),
                    "error": f"read_error: {type(e).__name__}: {e}"}
        if isinstance(rec, Mapping) and ("source" not in rec or "row" not in rec):
            rec = {"source": self.name, "row": int(i), **rec}
        return rec

    def __repr__(self) -> str:
        return f"SafeSource({self.source!r})"


def _is_source(x: Any) -> bool:
    return (not isinstance(x, (Mapping, str, bytes))) and hasattr(x, "__getitem__") and hasattr(x, "__len__")


def as_source(sources: Any) -> Any:
    """One random-access source from a source or a list/tuple of sources (concatenated)."""
    if isinstance(sources, (list, tuple)) and sources and all(_is_source(s) for s in sources):
        if len(sources) == 1:
            return sources[0]
        from llava_jax.data.sources import ConcatSource

        return ConcatSource(list(sources))
    if not _is_source(sources):
        raise TypeError(f"expected a random-access source (__len__ + __getitem__), got {type(sources).__name__}")
    return sources


def _names(sources: Any) -> str:
    """The files (or names) of a source or list of sources, for messages."""
    parts = list(sources) if isinstance(sources, (list, tuple)) and all(_is_source(s) for s in sources) else [sources]
    parts = [p for s in parts for p in getattr(s, "sources", [s])]
    return ", ".join(str(getattr(p, "path", None) or getattr(p, "name", None) or type(p).__name__) for p in parts)


def make_skip_log(path: str | os.PathLike | None = None):
    """The project's :class:`llava_jax.data.skips.SkipLog`."""
    return SkipLog(path)


# ---------------------------------------------------------------------------------------------
# Per-record processing (runs in the Grain workers)
# ---------------------------------------------------------------------------------------------


def _decode_draft(src, mode: str, size: int, name: str | None, min_ratio: float, processor) -> np.ndarray:
    """``"draft"`` decode: JPEG DCT reduction by the largest 2/4/8 that keeps the resized edge
    >= ``min_ratio * size`` (a slight upsample allowed), resampled on the full-resolution grid
    (``images._preprocess_drafted``); other inputs take ``decode_and_preprocess_uint8``."""
    img, owned = None, None
    try:
        img, owned = imglib._open(src, name)  # noqa: SLF001 - same package
        width, height = img.size
        edge = min(width, height) if mode == "crop" else max(width, height)
        scale = 1
        if img.format in ("JPEG", "MPO"):
            s = next((s for s in (8, 4, 2) if edge / s >= min_ratio * size), 1)
            if s > 1:
                drafted = img.draft("RGB", (max(1, width // s), max(1, height // s)))
                if drafted is not None:
                    scale = int(round(width / drafted[1][2]))
        img.load()
        rgb = imglib.to_rgb(img)
    except Exception as e:  # noqa: BLE001 - as images.load_image
        raise imglib._unreadable(src, name, e) from e  # noqa: SLF001
    finally:
        if owned is not None:
            owned.close()
    if scale == 1:
        return imglib.preprocess_image_uint8(rgb, mode=mode, size=size, processor=processor)
    return imglib._preprocess_drafted(rgb, width, height, scale, mode, size, processor)  # noqa: SLF001


def _is_decoded(src: Any) -> bool:
    """A decoded HWC (or HW) uint8 array, as opposed to a path or encoded bytes (a 1-D array)."""
    return isinstance(src, np.ndarray) and src.ndim in (2, 3)


def _full_decode(src: Any, name: str | None):
    """The PIL image of a decoded array, or the full decode of a path / encoded bytes."""
    if _is_decoded(src):
        from PIL import Image

        return Image.fromarray(src)
    return imglib.load_image(src.tobytes() if isinstance(src, np.ndarray) else src, name)


def decode_image(src: Any, cfg: PipelineConfig, name: str | None = None) -> np.ndarray:
    """One image (path, encoded bytes, or a decoded HWC uint8 array) -> uint8 [S, S, 3] per
    ``cfg.image_decode``. Raises ValueError for unreadable inputs (cause kept)."""
    mode, size, proc = cfg.image_mode, cfg.image_size, cfg.image_processor
    if _is_decoded(src) or cfg.image_decode == "exact":
        return imglib.preprocess_image_uint8(_full_decode(src, name), mode=mode, size=size, processor=proc)
    if isinstance(src, np.ndarray):
        src = src.tobytes()
    if cfg.image_decode == "fast":
        return imglib.decode_and_preprocess_uint8(src, mode, size, name=name, draft_gap=cfg.draft_gap, processor=proc)
    return _decode_draft(src, mode, size, name, cfg.draft_min_ratio, proc)


def decode_anyres(src: Any, model_cfg: LlavaConfig, name: str | None = None):
    """One image (path, encoded bytes, or a decoded HWC uint8 array) -> its AnyRes views:
    ``anyres.preprocess_anyres_uint8`` of the full decode. Raises ValueError for unreadable inputs."""
    return anyres.preprocess_anyres_uint8(_full_decode(src, name), model_cfg)


def _listify(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, np.ndarray) and x.ndim == 4:  # a stack of decoded images
        return list(x)
    return [x]


class SampleProcessor:
    """record -> sample dict or skip marker (see :mod:`llava_jax.data.packing`). Picklable; one
    copy per Grain worker. Never raises for bad data."""

    def __init__(self, tokenizer: Any, cfg: PipelineConfig, image_token_id: int):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.image_token_id = int(image_token_id)
        self.template = resolve_template(cfg.template)

    def _image_sources(self, rec: Mapping) -> list[tuple[Any, str]]:
        data = rec.get("image_bytes")
        if data is not None:
            items = _listify(data)
            where = f"{rec.get('source')}:{rec.get('row')}"
            return [(d, f"{where}[{i}]" if len(items) > 1 else where) for i, d in enumerate(items)]
        out = []
        for p in _listify(rec.get("image_path")):
            p = os.fspath(p)
            if self.cfg.image_root and not os.path.isabs(p):
                p = os.path.join(self.cfg.image_root, p)
            out.append((p, p))
        return out

    def _decode(self, src: Any, name: str):
        """``decode_image``'s uint8 view, or with ``cfg.anyres`` ``preprocess_anyres_uint8``'s
        (views, number of real views, (height, width)); unreadable images raise DropSample."""
        try:
            if self.cfg.anyres is not None:
                return decode_anyres(src, self.cfg.anyres, name)
            return decode_image(src, self.cfg, name)
        except ValueError as e:
            missing = isinstance(e.__cause__, FileNotFoundError)
            raise DropSample("image_missing" if missing else "image_corrupt", str(e)) from e
        except Exception as e:  # noqa: BLE001
            raise DropSample("image_corrupt", f"{name}: {type(e).__name__}: {e}") from e

    def process(self, rec: Any) -> dict:
        cfg = self.cfg
        if not isinstance(rec, Mapping):
            raise DropSample("malformed", f"record is a {type(rec).__name__}, not a dict")
        if rec.get("error") is not None:
            raise DropSample("malformed", str(rec["error"]))
        conv = rec.get("conversations")
        if not isinstance(conv, (list, tuple)) or not conv:
            raise DropSample("conversation", "empty or missing conversations")
        try:
            # AnyRes: each <image> stays one token until its image's size gives its count.
            tok = tokenize_conversation(self.tokenizer, self.template, conv, self.image_token_id,
                                        1 if cfg.anyres is not None else cfg.num_image_tokens)
        except ValueError as e:
            raise DropSample("conversation", str(e)) from e
        except Exception as e:  # noqa: BLE001
            raise DropSample("tokenize", f"{type(e).__name__}: {e}") from e
        srcs = self._image_sources(rec)
        n_img = int(tok["num_images"])
        if n_img != len(srcs):
            raise DropSample("image_mismatch", f"{n_img} {IMAGE_TOKEN} in the text, {len(srcs)} image(s)")
        if n_img > cfg.max_images_per_row:
            raise DropSample("too_many_images", f"{n_img} images > max_images_per_row={cfg.max_images_per_row}")
        if cfg.anyres is not None:
            return self._anyres_sample(tok, srcs)
        ids, targets, truncated = apply_length_policy(
            tok["input_ids"], tok["labels"], cfg.max_length, cfg.length_policy, self.image_token_id)
        s = cfg.image_size
        if n_img:
            images = np.stack([self._decode(src, name) for src, name in srcs])
        else:
            images = np.zeros((0, s, s, 3), np.uint8)
        return {"input_ids": ids, "targets": targets, "images": images, "truncated": truncated}

    def _anyres_sample(self, tok: dict, srcs: list) -> dict:
        """The AnyRes sample: ``images`` uint8 [k, 1 + max_tiles, S, S, 3] (each image's views),
        ``image_sizes`` int32 [k, 2], and each <image> expanded to its image's token count BEFORE
        the length policy (an image's tokens are never cut, and over-long samples are counted)."""
        cfg, mcfg = self.cfg, self.cfg.anyres
        decoded = [self._decode(src, name) for src, name in srcs]
        sizes = np.asarray([hw for _, _, hw in decoded], np.int32).reshape(-1, 2)
        n_views = sum(n for _, n, _ in decoded)
        if cfg.max_views_per_row is not None and n_views > cfg.max_views_per_row:
            raise DropSample("too_many_images", f"{len(decoded)} images take {n_views} AnyRes views > "
                                                f"max_views_per_row={cfg.max_views_per_row}")
        counts = [anyres.num_image_tokens(h, w, mcfg) for h, w in sizes]
        ids, labels = expand_image_tokens(tok["input_ids"], tok["labels"], self.image_token_id, counts)
        ids, targets, truncated = apply_length_policy(ids, labels, cfg.max_length, cfg.length_policy,
                                                      self.image_token_id)
        s = mcfg.vision.image_size
        views = (np.stack([v for v, _, _ in decoded]) if decoded
                 else np.zeros((0, 1 + mcfg.max_tiles, s, s, 3), np.uint8))
        return {"input_ids": ids, "targets": targets, "images": views, "image_sizes": sizes,
                "truncated": truncated}

    def __call__(self, rec: Any) -> dict:
        meta = {"source": "?", "row": -1, "id": ""}
        if isinstance(rec, Mapping):
            meta = {"source": str(rec.get("source", "?")), "row": _int_or(rec.get("row"), -1),
                    "id": str(rec.get("id", ""))}
        try:
            return {**self.process(rec), **meta}
        except DropSample as e:
            return skip_marker(e.reason, e.detail, meta)
        except Exception as e:  # noqa: BLE001 - bad data must never kill a worker
            return skip_marker("malformed", f"unexpected {type(e).__name__}: {e}", meta)


def _int_or(x: Any, default: int) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return default


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def resolve_ids(tokenizer: Any, cfg: PipelineConfig) -> tuple[int, int]:
    image_id = cfg.image_token_id
    if image_id is None:
        vocab = tokenizer.get_vocab()
        if IMAGE_TOKEN not in vocab:
            raise ValueError(
                f"the tokenizer has no {IMAGE_TOKEN!r} token: call "
                "llava_jax.data.tokenize.add_llava_special_tokens(tokenizer) or set image_token_id")
        image_id = int(vocab[IMAGE_TOKEN])
    ids = tokenizer(f"a{IMAGE_TOKEN}b", add_special_tokens=False).input_ids
    if list(ids).count(image_id) != 1:
        raise ValueError(
            f"{IMAGE_TOKEN!r} does not tokenize to the single id image_token_id={image_id} (got {ids}); "
            "call add_llava_special_tokens(tokenizer) and pass its id")
    pad = cfg.pad_token_id
    if pad is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
    if pad == image_id:
        raise ValueError(f"pad_token_id must differ from image_token_id ({image_id})")
    return int(image_id), int(pad)


def _default_process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app they are unparsed, which
    makes ``mp_prefetch`` raise ``UnparsedFlagAccessError``. Mark them parsed (defaults)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _load_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        from llava_jax.data.tokenize import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def make_sample_dataset(
    sources: Any,
    tokenizer: Any,
    cfg: PipelineConfig,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The stream before packing: shuffled, sharded, processed samples and skip markers."""
    tokenizer = _load_tokenizer(tokenizer)
    image_id, _ = resolve_ids(tokenizer, cfg)
    pi, pc = _default_process(process_index, process_count)
    ds = grain.MapDataset.source(SafeSource(as_source(sources)))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # a different permutation per epoch (seed + epoch)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    if pc > 1:
        ds = ds[pi::pc]
    ds = ds.map(SampleProcessor(tokenizer, cfg, image_id))
    if cfg.worker_group_size > 1:
        # Consecutive samples travel as one element (fewer inter-process messages); the packer
        # ungroups them in order, so the sample stream is the same for every group size.
        ds = ds.batch(cfg.worker_group_size, batch_fn=group_elements)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=max(cfg.read_buffer_size, 1)))
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        if cfg.min_shm_bytes is not None:
            ds = grain.experimental.WithOptionsIterDataset(
                ds, grain.experimental.DatasetOptions(min_shm_size=int(cfg.min_shm_bytes)))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=max(cfg.worker_buffer_size, 1)))
    return ds


def make_pipeline(
    sources: Any,
    tokenizer: Any,
    cfg: PipelineConfig,
    process_index: int | None = None,
    process_count: int | None = None,
    skip_log: Any = None,
) -> grain.IterDataset:
    """Build the pipeline (a Grain ``IterDataset`` of batches; see the module docstring).

    Args:
      sources: a random-access source (``__len__`` + ``__getitem__`` -> record dict), or a list
        of them (concatenated).
      tokenizer: a fast HF tokenizer with ``<image>`` added (``add_llava_special_tokens``) or a
        tokenizer directory.
      cfg: :class:`PipelineConfig`.
      process_index, process_count: this host's shard (default: ``jax.process_index()`` /
        ``jax.process_count()``). Shards are disjoint and cover each epoch.
      skip_log: a :class:`~llava_jax.data.skips.SkipLog` (or any object with
        ``record(source, row, id, reason)``); default: a new SkipLog. Each skipped record is
        reported once, from the main process.
    """
    tokenizer = _load_tokenizer(tokenizer)
    image_id, pad_id = resolve_ids(tokenizer, cfg)
    pi, pc = _default_process(process_index, process_count)
    ds = make_sample_dataset(sources, tokenizer, cfg, pi, pc)
    spec = RowSpec(
        max_length=cfg.max_length,
        max_images=cfg.max_images_per_row,
        image_shape=(cfg.image_size, cfg.image_size, 3),
        pad_token_id=pad_id,
        max_segments=(cfg.max_samples_per_row if cfg.pack else 1),
        anyres=cfg.anyres,
        max_views=cfg.max_views_per_row,
    )
    num_bins = cfg.num_bins
    if skip_log is None:
        skip_log = make_skip_log()
    check = {"worker_count": cfg.worker_count, "worker_group_size": cfg.worker_group_size,
             "process_index": pi, "process_count": pc,
             "seed": cfg.seed, "shuffle": cfg.shuffle, "num_epochs": cfg.num_epochs,
             "max_length": cfg.max_length, "pack": cfg.pack, "num_bins": num_bins}
    try:
        n = len(as_source(sources))
    except Exception:  # noqa: BLE001 - a source without a length: no guard, no check
        n = None
    if n == 0:
        raise NoTrainingData(f"the training data has no rows ({_names(sources)}): nothing to train on; "
                             "check data.sources")
    # The skipped-rows guard counts skipped rows in a row. Reshuffled every epoch, data with
    # one usable row per epoch of a shard can show 2 * (per_epoch - 1) skipped rows in a row
    # (the usable row first in one epoch, last in the next), so the guard allows twice an
    # epoch's rows: more means no row of the shard is usable (it would spin forever otherwise).
    max_skips = None if n is None else 2 * -(-n // pc)
    ds = PackIterDataset(ds, spec, num_bins, skip_log=skip_log, state_check=check,
                         max_consecutive_skips=max_skips)
    ds = ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder, batch_fn=batch_rows)
    if cfg.prefetch_batches > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch_batches)
    return ds


def make_iterator(
    sources: Any,
    tokenizer: Any,
    cfg: PipelineConfig,
    process_index: int | None = None,
    process_count: int | None = None,
    state: dict | None = None,
    skip_log: Any = None,
):
    """``iter(make_pipeline(...))``, restored to ``state`` (from ``it.get_state()``) if given.

    The iterator is a Grain ``DatasetIterator``: ``get_state()`` / ``set_state(state)``; call
    ``close()`` when done with worker processes (otherwise they stop at garbage collection).
    ``it.skip_log`` is the SkipLog the skips are reported to.
    """
    if skip_log is None:
        skip_log = make_skip_log()
    it = iter(make_pipeline(sources, tokenizer, cfg, process_index, process_count, skip_log=skip_log))
    if state is not None:
        it.set_state(state)
    try:
        it.skip_log = skip_log
    except AttributeError:  # pragma: no cover - grain iterators are plain objects
        pass
    return it
