"""Grain's random-access protocol, which every data source here follows (`sources.py`,
`tfds_source.py`): ``__len__`` and ``__getitem__(i)`` for any int-like ``i``, negative from the
end, ``IndexError`` out of range."""
from __future__ import annotations

import operator
from typing import Any


def check_index(i: Any, n: int) -> int:
    """``i`` checked against a source of ``n`` rows by the protocol's rule; the index as a
    non-negative int."""
    i = operator.index(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a source of {n} rows")
    return i
