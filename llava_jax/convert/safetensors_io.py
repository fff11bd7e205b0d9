"""Checkpoint weight files: safetensors read and written with the `safetensors` library (numpy
frontend, bfloat16 included), pickle `.bin` through torch when it is installed, and checkpoint
file discovery (single file, sharded `*.safetensors.index.json`, or `.bin`).

Files are opened lazily by `safe_open` (memory-mapped), one tensor at a time, so importing a
checkpoint never holds a second full copy of it in host RAM. Errors name the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(k)`, `get(k)` (a numpy array, bf16 included)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = str(path)
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
