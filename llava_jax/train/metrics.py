"""Training metrics: console (progress bar with ETA), TensorBoard (tensorboardX, no TensorFlow
needed) and a JSONL file, written from process 0 only.

The workdir may be a bucket (`gs://...`): metrics.jsonl is then kept in memory and the object
rewritten at most every `remote_flush_secs` (and on close), since object stores cannot append;
TensorBoard event files go through the same `etils.epath` file system (gcsfs), not
tensorboardX's own google-cloud-storage writer."""
from __future__ import annotations

import io
import json
import logging
import sys
import time

from llava_jax.fileio import as_path, is_remote

log = logging.getLogger(__name__)

# bf16 dense peak TFLOP/s per device, for MFU; the first name found in the device kind wins
# (so "h100 pcie" before "h100"). The one table: the trainer and tools/bench (report.py) read it.
PEAK_TFLOPS = (
    ("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("h800", 989.0), ("gh200", 989.0),
    ("b200", 2250.0), ("a100", 312.0), ("a10g", 125.0), ("l40s", 362.0), ("l4", 121.0),
    ("tpu v4", 275.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v5p", 459.0), ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0), ("tpu v6e", 918.0), ("tpu v6", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """Peak bf16 TFLOP/s of a device kind; None for CPUs and unknown devices (no MFU then)."""
    kind = device_kind.lower()
    for name, tf in PEAK_TFLOPS:
        if name in kind:
            return tf
    return None


def peak_flops_per_device() -> float | None:
    import jax

    tf = peak_tflops(jax.devices()[0].device_kind)
    return None if tf is None else tf * 1e12


class MetricsWriter:
    def __init__(self, workdir, enabled: bool = True, tensorboard: bool = True, progress_total: int = 0,
                 progress_bar: bool = True, start: int = 0, remote_flush_secs: float = 30.0):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.t0 = time.perf_counter()
        self.start = start
        self.total = progress_total
        if not enabled:
            return
        self.jsonl = _JsonlFile(as_path(workdir) / "metrics.jsonl", remote_flush_secs)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                if is_remote(workdir):
                    _register_epath_event_writer(str(workdir).split("://")[0])
                self.tb = SummaryWriter(str(as_path(workdir) / "tensorboard"))
            except ImportError:  # pragma: no cover
                log.warning("tensorboardX not installed: no TensorBoard logs")
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=progress_total, initial=start, unit="step", dynamic_ncols=True)

    def advance(self, step: int):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        text = (f"step {step}/{self.total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                f"gnorm {metrics['grad_norm']:.3f} tok/s {metrics['tokens_per_s']:.0f} "
                f"pack {metrics['packing_efficiency']:.2f}"
                + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""))
        if self.bar is not None:  # the bar shows the one ETA
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {metrics['loss']:.4f}")
            self.bar.write(text)
        else:
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / max(done, 1) * max(self.total - step, 0)
            print(f"{text} eta {eta / 60:.1f} min", flush=True)

    def close(self, final_step: int | None = None):
        """`final_step`: where the run really ended (e.g. the data ran out before the estimated
        total): the bar ends there, at 100%."""
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            if final_step is not None and final_step != self.bar.total:
                self.bar.total = final_step
                self.bar.update(final_step - self.bar.n)
                self.bar.refresh()
            self.bar.close()


class _JsonlFile:
    """Append lines locally; on a bucket, keep the text and rewrite the object (throttled)."""

    def __init__(self, path, flush_secs: float):
        self.path = path
        self.remote = is_remote(path)
        self.flush_secs = flush_secs
        self.last_flush = 0.0
        if self.remote:
            self.text = path.read_text() if path.exists() else ""
            self.dirty = False
        else:
            self.f = open(path, "a")

    def write(self, line: str):
        if not self.remote:
            self.f.write(line)
            self.f.flush()
            return
        self.text += line
        self.dirty = True
        if time.monotonic() - self.last_flush >= self.flush_secs:
            self.flush()

    def flush(self):
        if self.remote and self.dirty:
            self.path.write_text(self.text)
            self.dirty = False
            self.last_flush = time.monotonic()

    def close(self):
        if self.remote:
            self.flush()
        else:
            self.f.close()


class _EpathEventFile:
    """A tensorboardX record writer for bucket paths: buffers the event file and rewrites the
    object on each flush (TensorBoard reads whole event files, so this is what it sees)."""

    def __init__(self, path: str):
        self.path = as_path(path)
        self.buffer = io.BytesIO()
        self.closed = False

    def write(self, data: bytes):
        self.buffer.write(data)

    def flush(self):
        self.path.write_bytes(self.buffer.getvalue())

    def close(self):
        if not self.closed:
            self.flush()
            self.closed = True


class _EpathEventFactory:
    def open(self, path):
        return _EpathEventFile(path)

    def directory_check(self, path):
        as_path(path).mkdir(parents=True, exist_ok=True)


def _register_epath_event_writer(scheme: str):
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _EpathEventFactory())
