"""A prepared TFDS image + text data set as a random-access source of stage-1 caption records.

The record format (and its error records) is described in :mod:`llava_jax.data.sources`, beside
the LLaVA JSON one: both feed the same pipeline. ``tensorflow_datasets`` is imported only when a
:class:`TfdsSource` is built or read, so the rest of the data package works without it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from llava_jax.data.skips import error_record
from llava_jax.data.random_access import check_index
from llava_jax.data.templates import IMAGE_TOKEN

__all__ = ["TfdsSource"]

DEFAULT_CAPTION_INSTRUCTION = "Describe the image concisely."  # the caption request of a row


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
        i = check_index(i, len(self))
        default_id = f"{self.dataset_name}/{self.split}/{i}"
        where = f"({self.builder_dir} split {self.split!r} row {i})"

        def err(id_: str, reason: str) -> dict:
            rec = error_record(self.name, i, id_, f"{reason} {where}")
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
