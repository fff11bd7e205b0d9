"""Param paths and the regex tables over them.

Every policy that picks params (what trains, what decays, what stays fp32 when frozen, what a
previous stage provides, what is quantized) is a table of regexes matched against the param's
path string, e.g. ``llm/layers/q_kernel`` (top-level subtrees ``vision/``, ``projector/``,
``llm/``): `path_str` makes that string, `PathPatterns` matches it.
"""
from __future__ import annotations

import re
from typing import Sequence


def path_str(path) -> str:
    """'llm/layers/q_kernel' from an nnx path or a jax key path (a trailing `.value` dropped)."""
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if names and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


class PathPatterns:
    """A table of regexes over param paths; a path matches when one of them matches it whole."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns = list(patterns)
        self._compiled = [re.compile(p) for p in self.patterns]

    def __call__(self, path) -> bool:
        s = path if isinstance(path, str) else path_str(path)
        return any(c.fullmatch(s) for c in self._compiled)
