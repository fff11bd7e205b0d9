"""Paths that may be local or in a bucket (`gs://...`, `s3://...`).

`etils.epath` gives one Path type for both (gs:// through fsspec + gcsfs, or tf.io.gfile when
TensorFlow is installed). Object stores cannot append, so `append_text` rewrites the object on a
remote path; callers that append often (metrics) buffer and rewrite at most every few seconds.
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
    """A local `pathlib`-compatible path, or an `epath.Path` for a URI."""
    return epath.Path(path)


def append_text(path, text: str) -> None:
    """Append `text` to a file; on an object store, read + rewrite (no append there)."""
    if not is_remote(path):
        with open(os.fspath(path), "a", encoding="utf-8") as f:
            f.write(text)
        return
    p = epath.Path(path)
    old = p.read_text() if p.exists() else ""
    p.write_text(old + text)
