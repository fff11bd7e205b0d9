"""The command line: flags -> geometry and jobs -> results -> printed / appended markdown and JSON."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

from llava_jax.tools.bench.report import markdown_block, render_table
from llava_jax.tools.bench.runner import RESULT_PREFIX, build_jobs, cuda_available, run_isolated, run_job
from llava_jax.tools.bench.workload import PRESETS, Geometry, variant_label


def parse_args(argv=None):
    # The package docstring is the tool's documentation; its first line describes the command.
    summary = importlib.import_module(__package__).__doc__.split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m llava_jax.tools.bench", description=summary)
    p.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    p.add_argument("--tasks", default="stage1,stage2,decode", help="comma list of stage1, stage2, decode")
    p.add_argument("--frameworks", default="jax,torch",
                   help="comma list of jax, torch, llamacpp (llama.cpp: decode at batch 1, from its cached build)")
    p.add_argument("--llamacpp_quants", default="f16,q4_K_M", help="GGUF types of the LLM for llama.cpp rows")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0 = all CPUs)")
    p.add_argument("--variants", default=None, help="llava-jax option sets (see module doc); default per preset")
    p.add_argument("--torch_compile", choices=("auto", "yes", "no"), default="auto",
                   help="auto: compile on CUDA, eager elsewhere (torch.compile on CPU is slow)")
    p.add_argument("--torch_eager", action="store_true", help="also measure eager transformers beside compiled")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one subprocess per measurement (auto: on GPU)")
    p.add_argument("--steps", type=int, help="timed training steps (preset default)")
    p.add_argument("--warmup", type=int, help="untimed training steps first (preset default)")
    p.add_argument("--decode_repeats", type=int, help="timed generate calls per length (median)")
    p.add_argument("--decode_batches", help="comma list (preset default)")
    p.add_argument("--new_tokens", type=int)
    p.add_argument("--decode_chunk", type=int, default=0,
                   help="llava-jax decode steps per compiled chunk, where the engine has chunks (0 = its default)")
    p.add_argument("--seq_len", type=int)
    p.add_argument("--train_batch", type=int)
    p.add_argument("--grad_clip", type=float, default=1.0, help="global-norm clipping on both sides (0 = off)")
    p.add_argument("--peak_tflops", type=float, help="override the per-device bf16 peak used for MFU")
    p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for the llava-jax workers (isolated runs)")
    p.add_argument("--profile_dir", help="write jax.profiler / torch.profiler traces here")
    p.add_argument("--markdown", help="append the results to this markdown file (e.g. BENCHMARKS.md)")
    p.add_argument("--json", help="append raw results as JSON lines to this file")
    p.add_argument("--from_json", help="render the table from saved JSON lines instead of running")
    p.add_argument("--resume", action="store_true",
                   help="with --json: a job that file already holds a result for (done or failed) is not run "
                        "again; its recorded result goes into the table (a rerun after a cut-off run)")
    p.add_argument("--worker_timeout", type=int, default=1800)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.frameworks = [f for f in args.frameworks.split(",") if f]
    args.llamacpp_quants = [q for q in args.llamacpp_quants.split(",") if q]
    if args.variants is None:
        args.variants = PRESETS[args.preset]["variants"]
    return args


def geometry_from_args(args) -> Geometry:
    geo = PRESETS[args.preset]["geometry"]
    over = {k: getattr(args, k) for k in ("steps", "warmup", "decode_repeats", "new_tokens", "seq_len", "train_batch")
            if getattr(args, k) is not None}
    if args.decode_batches:
        over["decode_batches"] = tuple(int(x) for x in args.decode_batches.split(","))
    return dataclasses.replace(geo, **over)


# What makes two jobs the same measurement: everything `build_jobs` puts in a job but the
# command line that asked for it.
_JOB_FIELDS = ("framework", "work", "stage", "batch", "variant", "compiled", "quant", "geometry", "opts")


def _job_key(job: dict) -> str:
    return json.dumps({k: job.get(k) for k in _JOB_FIELDS}, sort_keys=True)


def _read_results(path: str) -> list[dict]:
    """The results saved as JSON lines at `path` (`--json`), oldest first."""
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _recorded(path: str) -> dict[str, dict]:
    """{job key: its newest result} from the JSON lines at `path` (none when it does not exist)."""
    return {_job_key(r): r for r in _read_results(path)} if Path(path).exists() else {}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(run_job(json.loads(args.worker))), flush=True)
        return 0
    geo = geometry_from_args(args)
    command = "python -m llava_jax.tools.bench " + " ".join(argv)
    preset = args.preset
    if args.from_json:
        results = _read_results(args.from_json)
        geo = Geometry(**{**results[0]["geometry"], "decode_batches": tuple(results[0]["geometry"]["decode_batches"])})
        preset = results[0].get("preset", preset)
    else:
        jobs = build_jobs(args, geo)
        for j in jobs:
            j.update(command=command, preset=args.preset)
        isolate = {"auto": cuda_available(), "yes": True, "no": False}[args.isolate]
        if not isolate:
            if args.xla_flags:
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
            if any(j["framework"] == "jax" and j["variant"]["xla"] != "default" for j in jobs):
                raise SystemExit("xla= flag sets need --isolate=yes (XLA reads its flags at start-up)")
        if args.resume and not args.json:
            raise SystemExit("--resume needs --json (the file it resumes from)")
        recorded = _recorded(args.json) if args.resume else {}
        results = []
        for i, job in enumerate(jobs):
            what = f"{job['framework']} {job['work']}{job.get('stage', '')}" + \
                   (f" B={job['batch']}" if job["work"] == "decode" else "") + \
                   (f" [{variant_label(job['variant'])}]" if job["framework"] == "jax" else
                    f" [{job['quant']}]" if job["framework"] == "llamacpp" else
                    f" [{'compiled' if job['compiled'] else 'eager'}]")
            r = recorded.get(_job_key(job))
            if r is not None:
                print(f"[{i + 1}/{len(jobs)}] {what}: recorded in {args.json} "
                      f"({'done' if r['ok'] else 'failed: ' + str(r.get('error'))}), not run again",
                      file=sys.stderr, flush=True)
                results.append(r)
                continue
            print(f"[{i + 1}/{len(jobs)}] {what} ...", file=sys.stderr, flush=True)
            r = run_isolated(job, args.worker_timeout, args.xla_flags) if isolate else run_job(job)
            if not r["ok"]:
                print(f"    FAILED: {r.get('error')}\n{r.get('traceback', '')}", file=sys.stderr, flush=True)
            else:
                print(f"    {r['sec_per_step'] * 1e3:.2f} ms/step ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            results.append(r)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({k: v for k, v in r.items() if k != "traceback"}) + "\n")
    table = render_table(results, geo, args.peak_tflops)
    block = markdown_block(results, preset, table)
    print(block)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + block)
    return 0 if all(r["ok"] for r in results) else 1
