"""Data-pipeline throughput: llava_jax's Grain pipeline vs the original LLaVA image path.

    python -m llava_jax.tools.data_bench --num-images 200

Workload: N synthetic photo-like 640x480 JPEGs (q90) -> 336 px, LLaVA-1.5 "pad" mode, each
with a stage-2-like vicuna_v1 conversation (576 image tokens + ~100-200 text tokens), tokenized
and packed into 2048-token rows (4 image slots per row), batched.

Measured in the same run (single-process rates are the median of ``--rounds`` interleaved
rounds; each round processes every image once):

* ``original``: the original LLaVA image path (``llava/train/train.py``):
  ``Image.open(f).convert("RGB")`` -> ``expand2square`` with the mean colour ->
  ``CLIPImageProcessorPil`` (the PIL implementation of transformers' CLIP processor) producing
  float32 ``pixel_values``. Images only: no tokenization (which favours the baseline).
* ``ours per-sample``: the pipeline's per-record step (``SampleProcessor``: read + decode +
  uint8 preprocessing + render + tokenize + length policy) called in-process on one core, for
  each ``image_decode`` mode.
* ``ours pipeline``: the full Grain pipeline (``make_iterator``: shuffle, workers, packing,
  batching, stats) in-process and with 1 and 2 worker processes (``--worker-counts``), steady
  state: after the first batch (worker start-up) and a warm-up that drains the buffers,
  samples/s over ``--measure`` samples. Its source has ``--source-rows`` rows cycling over the N
  image files (Grain's shuffled index costs ~0.3 ms on a 100-row source, ~20 us on a 20K- or
  665K-row one: a tiny source would bias the pipeline rows).

"per CPU-s" = samples per CPU-second of every process involved (this one + live workers, from
/proc): the per-core rate, robust to other load on the machine; samples/s is wall-clock and is
not (worker scaling needs idle cores: on a loaded 2-core machine 2 workers cannot show it).

Exactness of each ``image_decode`` mode against the original path is printed too (uint8 level
deviation vs the exact result, and max |diff| of the normalized floats vs transformers).
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CONV_WORDS = (
    "the a picture image photo shows man woman dog cat car street table kitchen tree sky red blue "
    "green yellow white black small large two three several people standing sitting next to near "
    "behind in front of on under with holding wearing looking at bright dark sunny cloudy day night "
    "what where why how many is are there this that which color describe detail scene object"
).split()


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_jpeg(rng: np.random.Generator, w: int = 640, h: int = 480, quality: int = 90) -> bytes:
    """A photo-like test image: smooth colour fields + a few sharp shapes + mild sensor noise."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    ph = rng.uniform(0, 6.28, 6)
    fr = rng.uniform(8, 60, 6)
    base = np.stack(
        [120 + 70 * np.sin(x / fr[c] + ph[c]) * np.cos(y / fr[c + 3] - ph[c + 3]) for c in range(3)], -1
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 160))
        col = tuple(int(c) for c in rng.integers(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=col)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _sentence(rng: np.random.Generator, lo: int, hi: int) -> str:
    n = int(rng.integers(lo, hi))
    return " ".join(rng.choice(CONV_WORDS, n)).capitalize() + "."


def make_records(image_paths: Sequence[str], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for i, p in enumerate(image_paths):
        turns = []
        for t in range(int(rng.integers(1, 4))):
            q = _sentence(rng, 6, 16) + "?"
            q = f"<image>\n{q}" if t == 0 else q
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": " ".join(
                _sentence(rng, 8, 20) for _ in range(int(rng.integers(1, 4))))}]
        recs.append({"id": f"bench{i}", "source": "bench", "row": i, "image_path": p, "conversations": turns})
    return recs


def build_tokenizer(out_dir: str):
    """An offline LLaMA-style BPE tokenizer (byte fallback, Metaspace) with <image>/<pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    from llava_jax.data.templates import VICUNA_SYSTEM
    from llava_jax.data.tokenize import add_llava_special_tokens

    rng = np.random.default_rng(0)
    corpus = [VICUNA_SYSTEM, "USER: ASSISTANT: </s>"] + [_sentence(rng, 5, 30) for _ in range(2000)]
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=special,
                                                        show_progress=False))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    hf = LlamaTokenizerFast(vocab=tok.get_vocab(with_added_tokens=True), merges=merges,
                            add_bos_token=True, add_eos_token=False, legacy=False)
    add_llava_special_tokens(hf)
    path = os.path.join(out_dir, "tokenizer")
    hf.save_pretrained(path)
    from llava_jax.data.tokenize import load_tokenizer

    return load_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# Paths under test
# ---------------------------------------------------------------------------------------------


def original_processor(size: int):
    from transformers import CLIPImageProcessorPil

    from llava_jax.data.images import CLIP_MEAN, CLIP_STD

    # openai/clip-vit-large-patch14-336's preprocessor_config.json
    return CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )


def original_path(path: str, processor) -> np.ndarray:
    """llava/train/train.py LazySupervisedDataset.__getitem__, image part (image_aspect_ratio=pad)."""
    from PIL import Image

    from llava_jax.data.images import expand2square

    image = Image.open(path).convert("RGB")
    image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return processor(images=image, return_tensors="np")["pixel_values"][0]


def _children_cpu_s() -> float | None:
    """CPU seconds (user + system) used so far by the live child processes (Linux /proc)."""
    me, total = os.getpid(), 0.0
    try:
        tck = os.sysconf("SC_CLK_TCK")
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                total += (int(fields[11]) + int(fields[12])) / tck
    except (OSError, ValueError, AttributeError):
        return None
    return total


def _rate(fn, items) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process)."""
    t, c = time.perf_counter(), time.process_time()
    for x in items:
        fn(x)
    return len(items) / (time.perf_counter() - t), len(items) / max(time.process_time() - c, 1e-9)


def bench_single(records, processors: dict, rounds: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds; the median samples/s per path (one core, in-process)."""
    rates: dict[str, list] = {k: [] for k in processors}
    for _ in range(rounds):
        for name, fn in processors.items():
            rates[name].append(_rate(fn, records))
    return {k: {"samples_per_s": statistics.median(r[0] for r in v),
                "samples_per_cpu_s": statistics.median(r[1] for r in v)} for k, v in rates.items()}


def bench_pipeline(records, tokenizer, cfg, warmup: int, measure: int) -> dict[str, float]:
    """Steady-state rate of the full pipeline; CPU use of the main process and the workers."""
    from llava_jax.data.pipeline import make_iterator

    t0 = time.perf_counter()
    it = make_iterator(records, tokenizer, cfg, 0, 1)
    try:
        b = next(it)
        first = time.perf_counter() - t0
        n = int(b["stats"]["num_samples"])
        while n < warmup:
            n += int(next(it)["stats"]["num_samples"])
        n, eff = 0, []
        t, c, k = time.perf_counter(), time.process_time(), _children_cpu_s()
        while n < measure:
            b = next(it)
            n += int(b["stats"]["num_samples"])
            eff.append(float(b["stats"]["packing_efficiency"]))
        dt, dmain = time.perf_counter() - t, time.process_time() - c
        k2 = _children_cpu_s()
    finally:
        t_close = time.perf_counter()
        it.close()
        t_close = time.perf_counter() - t_close
    dworkers = (k2 - k) if (k is not None and k2 is not None) else float("nan")
    return {"samples_per_s": n / dt, "first_batch_s": first, "packing_efficiency": float(np.mean(eff)),
            "main_cpu_per_s": dmain / dt, "worker_cpu_per_s": dworkers / dt,
            "samples_per_cpu_s": n / max(dmain + dworkers, 1e-9), "close_s": t_close,
            "total_s": time.perf_counter() - t0}


def exactness(records, cfg_by_mode: dict, processor, k: int) -> dict[str, dict[str, float]]:
    from llava_jax.data.images import normalize
    from llava_jax.data.pipeline import decode_image

    paths = [r["image_path"] for r in records[:k]]
    ref_f = np.stack([original_path(p, processor) for p in paths]).transpose(0, 2, 3, 1)
    exact = np.stack([decode_image(p, cfg_by_mode["exact"]) for p in paths]).astype(np.int16)
    out = {}
    for mode, c in cfg_by_mode.items():
        u8 = np.stack([decode_image(p, c) for p in paths])
        d = np.abs(u8.astype(np.int16) - exact)
        out[mode] = {"mean": float(d.mean()), "p99": float(np.percentile(d, 99)), "max": float(d.max()),
                     "float_max_vs_transformers": float(np.abs(normalize(u8) - ref_f).max())}
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    import PIL
    from PIL import features

    import grain
    import transformers

    accel = "none (CPU only)"
    try:
        import jax

        devs = jax.devices()
        accel = f"{devs[0].platform}: {len(devs)} x {devs[0].device_kind}"
    except Exception:  # noqa: BLE001
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "cpu": cpu,
        "cpus": os.cpu_count(), "usable_cpus": usable, "python": platform.python_version(),
        "pillow": PIL.__version__, "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "grain": getattr(grain, "__version__", "?"), "transformers": transformers.__version__,
        "device": accel,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--size", type=int, default=336)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--num-image-tokens", type=int, default=576)
    p.add_argument("--max-images-per-row", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the single-core runs")
    p.add_argument("--worker-counts", default="0,1,2", help="comma list; 0 = in-process pipeline")
    p.add_argument("--modes", default="fast,draft", help="image_decode modes for the pipeline runs")
    p.add_argument("--measure", type=int, default=None, help="samples timed per pipeline run (default 2N)")
    p.add_argument("--warmup", type=int, default=None, help="samples before timing a pipeline run")
    p.add_argument("--source-rows", type=int, default=20000,
                   help="rows of the pipeline's source (cycling over the N image files)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: built offline)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llava_jax.data.pipeline import SampleProcessor, resolve_ids
    from llava_jax.data.pipeline_config import PipelineConfig
    from llava_jax.data.tokenize import add_llava_special_tokens, load_tokenizer

    info = machine_info()
    tmp = tempfile.TemporaryDirectory(prefix="llava_data_bench_")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(a.num_images):
        path = os.path.join(tmp.name, f"{i:05d}.jpg")
        Path(path).write_bytes(make_jpeg(rng, a.width, a.height))
        paths.append(path)
    records = make_records(paths)
    if a.tokenizer:
        tok = load_tokenizer(a.tokenizer)
        add_llava_special_tokens(tok)
    else:
        tok = build_tokenizer(tmp.name)

    base = PipelineConfig(
        max_length=a.max_length, max_images_per_row=a.max_images_per_row, image_size=a.size,
        image_mode="pad", template="vicuna_v1", num_image_tokens=a.num_image_tokens,
        batch_size=a.batch_size, seed=0, num_epochs=None,
    )
    modes = ["exact", "fast", "draft"]
    cfgs = {m: base.replace(image_decode=m) for m in modes}
    image_id, _ = resolve_ids(tok, base)
    procs = {m: SampleProcessor(tok, cfgs[m], image_id) for m in modes}
    clip = original_processor(a.size)
    single = {"original": lambda r: original_path(r["image_path"], clip)}
    single.update({f"ours:{m}": procs[m] for m in modes})
    for m in modes:  # sanity: every bench record is a usable sample
        el = procs[m](records[0])
        assert "skip" not in el, el
    lengths = [len(procs["fast"](r)["input_ids"]) for r in records[: min(50, len(records))]]
    single_rates = bench_single(records, single, a.rounds)
    exact = exactness(records, cfgs, clip, k=min(20, len(records)))

    # The pipeline reads a large source that cycles over the N image files (as a real data set
    # would be large): Grain's shuffled index is slow on tiny domains (~0.3 ms at n=100, ~20 us
    # at n=20K or 665K), an artefact a 200-row source would add to every sample.
    pipe_records = make_records([paths[i % len(paths)] for i in range(max(len(paths), a.source_rows))], seed=1)
    measure = a.measure or max(2 * a.num_images, 64)
    warmup = a.warmup if a.warmup is not None else 4 * a.batch_size * 3 + 64
    pipe = {}
    for m in [s for s in a.modes.split(",") if s]:
        for w in [int(s) for s in a.worker_counts.split(",") if s != ""]:
            c = cfgs[m].replace(worker_count=w, read_threads=1)
            pipe[(m, w)] = bench_pipeline(pipe_records, tok, c, warmup, measure)

    orig = single_rates["original"]["samples_per_cpu_s"]
    rows = [("original LLaVA image path: PIL open+RGB, expand2square, CLIPImageProcessorPil -> float32",
             "1 (in-proc)", single_rates["original"]["samples_per_s"], orig)]
    for m in modes:
        r = single_rates[f"ours:{m}"]
        rows.append((f"ours, per-sample step (decode+uint8 preprocess+tokenize), image_decode={m}",
                     "1 (in-proc)", r["samples_per_s"], r["samples_per_cpu_s"]))
    for (m, w), res in pipe.items():
        rows.append((f"ours, Grain pipeline (shuffle+workers+pack+batch), image_decode={m}",
                     f"{w} worker{'s' if w != 1 else ''}" if w else "0 (in-proc)",
                     res["samples_per_s"], res["samples_per_cpu_s"]))

    print(f"# llava_jax data pipeline benchmark  {info['date']}")
    print(f"host {info['host']}: {info['platform']}")
    print(f"CPU: {info['cpu']} ({info['cpus']} logical CPUs, {info['usable_cpus']} usable); "
          f"accelerator: {info['device']}")
    print(f"Python {info['python']}, Pillow {info['pillow']} (libjpeg-turbo: {info['libjpeg_turbo']}), "
          f"grain {info['grain']}, transformers {info['transformers']}")
    print(f"workload: {a.num_images} JPEG {a.width}x{a.height} q90 -> {a.size} px pad; vicuna_v1, "
          f"{a.num_image_tokens} image tokens, sample length mean {np.mean(lengths):.0f} tokens; "
          f"rows of {a.max_length} tokens x {a.max_images_per_row} images, batch {a.batch_size}")
    print("'per CPU-s' = samples per CPU-second of all processes involved (main + workers): the per-core rate")
    print()
    w0 = max(len(r[0]) for r in rows)
    print(f"| {'path':<{w0}} | {'processes':>11} | {'samples/s':>9} | {'per CPU-s':>9} | {'vs original (per CPU-s)':>23} |")
    print(f"|{'-' * (w0 + 2)}|{'-' * 13}|{'-' * 11}|{'-' * 11}|{'-' * 25}|")
    for name, procs_s, rate, per_core in rows:
        print(f"| {name:<{w0}} | {procs_s:>11} | {rate:>9.1f} | {per_core:>9.1f} | {per_core / orig:>22.2f}x |")
    print()
    for m in modes:
        pws = sorted(w for (mm, w) in pipe if mm == m)
        if 1 in pws and 2 in pws:
            s1, s2 = pipe[(m, 1)]["samples_per_s"], pipe[(m, 2)]["samples_per_s"]
            print(f"scaling image_decode={m}: 1 worker {s1:.1f}/s, 2 workers {s2:.1f}/s = {s2 / s1:.2f}x "
                  f"({info['usable_cpus']} usable cores shared with the main process)")
    for (m, w), res in pipe.items():
        print(f"pipeline image_decode={m} workers={w}: CPU use main {res['main_cpu_per_s']:.2f} + workers "
              f"{res['worker_cpu_per_s']:.2f} cores; first batch after {res['first_batch_s']:.1f} s "
              f"(worker start-up); packing efficiency {res['packing_efficiency']:.3f}")
    print()
    print("exactness vs the exact path (uint8 levels) and vs transformers (normalized float max|diff|), "
          f"{min(20, len(records))} images:")
    for m, e in exact.items():
        print(f"  image_decode={m:<5}: mean {e['mean']:.3f}  p99 {e['p99']:.0f}  max {e['max']:.0f}  | "
              f"float max|diff| vs CLIPImageProcessorPil {e['float_max_vs_transformers']:.2e}")
    result = {"machine": info, "args": vars(a), "single_core_samples_per_s": single_rates,
              "pipeline": {f"{m}/{w}": v for (m, w), v in pipe.items()}, "exactness": exact,
              "mean_sample_tokens": float(np.mean(lengths))}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
