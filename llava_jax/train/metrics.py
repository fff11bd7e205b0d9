"""Training metrics: console (progress bar with ETA), TensorBoard (tensorboardX, no TensorFlow
needed) and a JSONL file, written from process 0 only."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
from absl import logging

# bf16 dense peak per device, for MFU.
PEAK_TFLOPS = {
    "h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
    "tpu v6 lite": 918.0, "tpu v6e": 918.0,
}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    for name, tf in PEAK_TFLOPS.items():
        if name in kind:
            return tf * 1e12
    return None  # CPU and unknown devices: MFU not reported


class MetricsWriter:
    def __init__(self, workdir: Path, enabled: bool = True, tensorboard: bool = True, progress_total: int = 0,
                 progress_bar: bool = True, start: int = 0):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.t0 = time.perf_counter()
        self.start = start
        self.total = progress_total
        if not enabled:
            return
        self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            except ImportError:  # pragma: no cover
                logging.warning("tensorboardX not installed: no TensorBoard logs")
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
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        text = (f"step {step}/{self.total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                f"gnorm {metrics['grad_norm']:.3f} tok/s {metrics['tokens_per_s']:.0f} "
                f"pack {metrics['packing_efficiency']:.2f}"
                + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "")
                + f" eta {eta / 60:.1f}min")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {metrics['loss']:.4f}")
            self.bar.write(text)
        else:
            logging.info(text)
            print(text, flush=True)

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
