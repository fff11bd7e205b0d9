"""Checkpoint weight files: safetensors read and written with the `safetensors` library (numpy
frontend, bfloat16 included), pickle `.bin` through torch when it is installed, and checkpoint
file discovery (single file, sharded `*.safetensors.index.json`, or `.bin`).

Files are opened lazily by `safe_open` (memory-mapped), one tensor at a time, so importing a
checkpoint never holds a second full copy of it in host RAM. Errors name the file: the header's
length is checked against the file's size before anything is read (a broken length made older
readers fail with struct.error or try to allocate 2**62 bytes), and a broken index names the index.

Writing into a folder that already holds a model would leave the old weight files next to the
new ones (a single-file export after a sharded one: loaders follow the stale index to the old
shards), so `prepare_output_dir` refuses a non-empty folder unless asked to overwrite, and then
removes the weight files first (`WEIGHT_FILES`: only what a model export writes).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np


# The weight files an export writes and `prepare_output_dir(overwrite=True)` removes.
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


def _check_header(path: str) -> None:
    """A safetensors file starts with an 8-byte little-endian header length, then that many
    bytes of JSON; the length must fit in the file (ValueError naming the file otherwise)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if size < 8:
        raise ValueError(f"{path} is not a safetensors file: {size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > size - 8:
        raise ValueError(f"{path} is not a readable safetensors file: its header length {n} does not fit the "
                         f"file's {size} bytes (truncated or not safetensors)")
    if head[8:9] != b"{":
        raise ValueError(f"{path} is not a readable safetensors file: its header is not JSON")


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(k)`, `get(k)` (a numpy array, bf16 included)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = str(path)
        if os.path.isfile(self.path):  # a missing file: the library's error below names it
            _check_header(self.path)
        try:
            self._f = safe_open(self.path, framework="numpy")
            self.metadata = self._f.metadata() or {}
            self._shapes = {k: tuple(self._f.get_slice(k).get_shape()) for k in self._f.keys()}
        except Exception as e:  # noqa: BLE001 - the library's errors name no file
            raise ValueError(f"{self.path} is not a readable safetensors file: {type(e).__name__}: {e}") from None

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> np.ndarray:
        try:
            return self._f.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{self.path}: tensor {key!r} could not be read: {type(e).__name__}: {e}") from None


class TorchBinFile:
    """A pickle `pytorch_model*.bin`, read with torch (only when torch is importable)."""

    def __init__(self, path):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError(
                f"{path} is a PyTorch pickle checkpoint and torch is not installed; convert it to "
                "safetensors first (e.g. load with transformers and save_pretrained(safe_serialization=True))"
            ) from e
        self.path = str(path)
        self._sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)

    def keys(self):
        return list(self._sd)

    def shape(self, key):
        return tuple(self._sd[key].shape)

    def get(self, key):
        import torch

        t = self._sd[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def checkpoint_files(path: str | os.PathLike) -> list:
    """Open every weight file of a checkpoint (a directory or a single file)."""
    p = Path(path)
    if p.is_file():
        return [SafetensorsFile(p) if p.suffix == ".safetensors" else TorchBinFile(p)]
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = p / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index} is not a readable weight index (a JSON object with a "
                                 f"\"weight_map\"): {type(e).__name__}: {e}") from None
            opener = SafetensorsFile if index_name.startswith("model.safetensors") else TorchBinFile
            return [opener(p / s) for s in shards]
    st = sorted(p.glob("*.safetensors"))
    if st:
        return [SafetensorsFile(f) for f in st]
    bins = sorted(p.glob("*.bin"))
    bins = [b for b in bins if b.name != "training_args.bin"]
    if bins:
        return [TorchBinFile(b) for b in bins]
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {p}")


def check_output_dir(out_dir, overwrite: bool = False) -> bool:
    """FileExistsError for a file, or for a folder holding anything unless `overwrite`; True
    when the folder holds something (so `overwrite` has files to replace). Creates nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder")
    full = out.is_dir() and any(out.iterdir())
    if full and not overwrite:
        raise FileExistsError(f"{out} is not empty: pass --overwrite (overwrite=True) to replace the model in it "
                              "(its weight files are removed first, other files are kept)")
    return full


def prepare_output_dir(out_dir, overwrite: bool = False) -> Path:
    """`out_dir`, created, ready for a model's files (`check_output_dir`); with `overwrite`,
    the `WEIGHT_FILES` in it are removed first. Other files are left alone (the export rewrites
    its config, processor and tokenizer files)."""
    out = Path(out_dir)
    if check_output_dir(out, overwrite):
        for pattern in WEIGHT_FILES:
            for f in out.glob(pattern):
                if f.is_file():
                    f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_safetensors(path, tensors: list[tuple[str, np.ndarray]], metadata: dict | None = None):
    """Write tensors to one .safetensors file (the `safetensors` library)."""
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(arr) for name, arr in tensors}, str(path), metadata=metadata or {"format": "pt"})


def write_sharded(out_dir, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int = 5 * 10**9):
    """Stream tensors into shards of at most `max_shard_bytes` (a tensor larger than the limit gets
    a shard of its own) plus `model.safetensors.index.json` when there is more than one shard.
    Only the shard being filled is held in memory."""
    out_dir = Path(out_dir)
    current: list[tuple[str, np.ndarray]] = []
    current_bytes = 0
    written: list[str] = []
    weight_map: dict[str, int] = {}
    total = 0

    def flush():
        name = f"model-{len(written) + 1:05d}.safetensors"
        write_safetensors(out_dir / name, current)
        written.append(name)

    for name, arr in tensors:
        if current and current_bytes + arr.nbytes > max_shard_bytes:
            flush()
            current, current_bytes = [], 0
        current.append((name, arr))
        current_bytes += arr.nbytes
        weight_map[name] = len(written)
        total += arr.nbytes
    flush()
    n = len(written)
    if n == 1:
        os.replace(out_dir / written[0], out_dir / "model.safetensors")
        return ["model.safetensors"]
    final_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for old, new in zip(written, final_names):
        os.replace(out_dir / old, out_dir / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final_names[v] for k, v in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return final_names
