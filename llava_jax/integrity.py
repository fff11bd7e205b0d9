"""Is a checkpoint step what was saved? Checksums taken at save time, checked after a restore.

Why checksums of array VALUES, stored in the step's own JSON part, rather than a manifest of
file hashes: Orbax writes each array into OCDBT data files from every host, asynchronously, and
commits the step by a rename; a file manifest could only be written after that commit (a
SIGKILL in between leaves a committed step without one) and would mean reading the whole
checkpoint back (tens of GB for a 7B stage 2, from a bucket). The value checksums are computed
on the devices from the arrays being saved (one pass over memory, any sharding, no host copy),
travel inside the JSON item that Orbax commits together with the arrays, and are recomputed on
the restored arrays. Flipped bytes that decode to other values fail the comparison; damage that
Orbax cannot read at all (a truncated file, an empty step folder) raises while restoring, and
`item_error` turns either into one line naming the step folder's file or item.

The checksum of an array is two sums mod 2**32 of its raw bits as unsigned words: the plain sum
and the sum weighted by (2 * flat index + 1). Integer sums do not depend on the reduction order,
so the values match on any mesh (a run may resume on another one); an odd weight is invertible
mod 2**32, so any one changed word changes both sums.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models.params import path_str

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _word_sums(x) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:  # 8-byte types bitcast to a trailing pair of uint32 words
        words = jax.lax.bitcast_convert_type(x, _UINT.get(x.dtype.itemsize, jnp.uint32)).astype(jnp.uint32)
    # flat index from per-axis iotas (no reshape: that would gather a sharded array)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * (index * 2 + 1), dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda leaves: [_word_sums(x) for x in leaves])


def tree_checksums(tree) -> dict[str, list]:
    """{param path: [dtype, sum, weighted sum]} of every array of `tree` (JSON-able)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    sums = _tree_sums([x for _, x in flat])
    out = {}
    for (path, x), s in zip(flat, sums):
        a, b = (int(v) for v in np.asarray(s.addressable_data(0)))  # replicated: any shard has it
        out[path_str(path)] = [np.dtype(x.dtype).name, a, b]
    return out


def mismatched_arrays(tree, saved: dict[str, list]) -> list[str]:
    """Paths of `tree`'s arrays whose checksum differs from `saved` (from `tree_checksums` at
    save time). An array restored into another dtype than it was saved in (a run resumed with a
    changed param dtype: Orbax casts) cannot be compared and is not checked."""
    now = tree_checksums(tree)
    return [p for p, (dtype, *sums) in now.items()
            if p in saved and saved[p][0] == dtype and list(saved[p][1:]) != sums]


def json_digest(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (what a JSON round trip gives back)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def one_line(e: BaseException, limit: int = 240) -> str:
    """The most specific message of an exception chain on one line: Orbax wraps TensorStore's
    error ('Error reading "a/0.0" ... byte range ... not valid') in one that prints a whole
    TensorStore spec."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _orbax_echo(unraisable) -> bool:
    """An abandoned Orbax read coroutine, collected after the first read failed."""
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def _late_tensorstore_completion(unraisable) -> bool:
    """A TensorStore read that Orbax stopped waiting for (another read had failed) finishing
    after Orbax closed its event loop: TensorStore's done-callback then calls
    `loop.call_soon_threadsafe` on the closed loop, from its own thread, so Python reports
    "Exception ignored in: None ... Event loop is closed". This can land any time after the
    restore returned, hence a filter that stays (`_keep_late_completions_quiet`)."""
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
        return False
    tb = unraisable.exc_traceback
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "call_soon_threadsafe":
            args = frame.f_locals.get("args", ())
            return any(type(a).__module__.startswith("tensorstore") for a in args)
        tb = tb.tb_next
    return False


_late_filter_installed = False


def _keep_late_completions_quiet():
    """Install (once per process) a hook that drops `_late_tensorstore_completion` and passes
    every other unraisable exception to the hook that was there before."""
    global _late_filter_installed
    if _late_filter_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _late_tensorstore_completion(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    _late_filter_installed = True


@contextlib.contextmanager
def quiet_failed_reads():
    """While restoring: when one array read fails, Orbax's other reads of the same damaged file
    fail too, in coroutines nobody awaits any more; Python prints each one ("Exception ignored
    in: <coroutine ...>", a whole TensorStore spec) when it is collected, and a read still in
    flight in TensorStore can complete onto Orbax's closed event loop. The first failure is
    what gets reported (one line), so those echoes are dropped; any other unraisable exception
    still reaches the previous hook."""
    _keep_late_completions_quiet()
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _orbax_echo(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()  # the abandoned coroutines go now, while the hook is in place
        sys.unraisablehook = previous


# Orbax's small JSON files of an item (the arrays' tree, shardings, per-host array metadata, the
# JSON item itself) and Grain's per-process iterator states: parsed before the restore so a
# damaged one is named exactly. A file of another layout is simply not pre-checked; the restore
# still fails on it.
_JSON_FILES = ("_METADATA", "_sharding", "metadata", "array_metadatas/process_*", "process_*-of-*.json")


def item_error(step_dir, item: str) -> str | None:
    """'<file>: <what is wrong>' for a missing item folder or an unreadable JSON file in it, else None."""
    folder = step_dir / item
    if not step_dir.exists() or not any(step_dir.iterdir()):
        return f"{step_dir}: the step folder is empty"
    if not folder.is_dir():
        return f"{folder}: missing"
    for pattern in _JSON_FILES:
        for f in sorted(folder.glob(pattern)):
            try:
                json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                return f"{f}: not valid JSON ({one_line(e, 120)})"
    return None
