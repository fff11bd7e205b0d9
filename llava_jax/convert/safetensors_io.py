"""Streaming safetensors reader/writer (numpy, incl. bfloat16 via ml_dtypes) and checkpoint
file discovery (single file, sharded `*.safetensors.index.json`, or pickle `.bin`).

The reader memory-maps each file and hands out zero-copy views per tensor, so importing a
checkpoint never holds a second full copy of it in host RAM. We parse the (simple, documented)
format ourselves because safetensors' numpy frontend cannot return bfloat16.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """One memory-mapped .safetensors file: `keys()`, `shape(k)`, `get(k)` (a read-only view)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        with open(self.path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._base = 8 + n

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        info = self._header[key]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        arr = np.frombuffer(self._mm, dtype=dtype, count=(end - start) // dtype.itemsize, offset=self._base + start)
        return arr.reshape(info["shape"])


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
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
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


def _header_for(tensors: list[tuple[str, np.ndarray]]):
    header, offset = {}, 0
    for name, arr in tensors:
        nbytes = arr.nbytes
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header


def write_safetensors(path, tensors: list[tuple[str, np.ndarray]], metadata: dict | None = None):
    """Write tensors (in the given order) to one .safetensors file."""
    header = _header_for(tensors)
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr).tobytes())


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
