"""python -m llava_jax.datagen: captions + boxes -> LLaVA instruction rows.

    # an OpenAI-compatible endpoint (key read from $OPENAI_API_KEY, or the variable --api-key-env names)
    python -m llava_jax.datagen --annotations caps_boxes.jsonl --types conversation,detail,complex \
        --out out/instruct --base-url https://api.openai.com/v1 --model gpt-4o-mini --concurrency 16

    # COCO files instead of JSONL
    python -m llava_jax.datagen --coco-captions captions_train2014.json \
        --coco-instances instances_train2014.json --out out/instruct --base-url ... --model ...

    # offline, deterministic (shapes world, tests, a dry run of the whole flow)
    python -m llava_jax.datagen --annotations /tmp/shapes/annotations.jsonl --backend template --out out/t

    # look at the prompt of the first item; copy the built-in prompts to edit them
    python -m llava_jax.datagen --annotations caps_boxes.jsonl --types detail --show-prompt
    python -m llava_jax.datagen --write-prompts my_prompts      # then: --prompts my_prompts

Rerunning the same command resumes (finished items are skipped, cached replies are reused).
Exit status: 0 done, 1 some items failed (rerun to retry them), 2 stopped by a fatal backend
error (bad key / URL / model) or bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from llava_jax.cli import HelpFormatter
from llava_jax.datagen.annotations import load_coco, load_jsonl
from llava_jax.datagen.backends import OpenAIChatBackend, TemplateBackend
from llava_jax.datagen.prompts import TASKS, canonical_task, load_prompts, write_builtin_prompts
from llava_jax.datagen.runner import SettingsMismatch, generate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_jax.datagen",
                                description="Generate LLaVA instruction data (conversation / detail / complex) "
                                            "from image captions and object boxes with a text-only LLM.",
                                formatter_class=HelpFormatter)
    src = p.add_argument_group("input")
    src.add_argument("--annotations", action="append", default=[],
                     help="JSONL of {id, image, captions, instances[{category, bbox}]} (repeatable)")
    src.add_argument("--coco-captions", help="COCO captions_*.json")
    src.add_argument("--coco-instances", help="COCO instances_*.json (boxes; optional)")
    src.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--types", default=",".join(TASKS), help="comma-separated: conversation, detail, complex")
    p.add_argument("--out", help="output folder (rows, results log, cache, summary)")
    p.add_argument("--prompts", default=None, help="prompt folder (default: the built-in one)")
    p.add_argument("--seed", type=int, default=0, help="image-token placement and instruction choice")
    p.add_argument("--box-decimals", type=int, default=3, help="digits after the point of box coordinates")
    be = p.add_argument_group("backend")
    be.add_argument("--backend", choices=("openai", "template"), default="openai")
    be.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                    help="OpenAI-compatible API root (default: $OPENAI_BASE_URL or OpenAI)")
    be.add_argument("--model", default=None)
    be.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the API key (unset: no Authorization header)")
    be.add_argument("--temperature", type=float, default=0.7)
    be.add_argument("--top-p", type=float, default=None)
    be.add_argument("--max-tokens", type=int, default=1024,
                    help="reply token limit (0: not sent; models that want max_completion_tokens: "
                         "--max-tokens 0 --extra-body '{\"max_completion_tokens\": 1024}')")
    be.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    be.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    be.add_argument("--timeout", type=float, default=120.0, help="seconds per socket operation")
    be.add_argument("--max-retries", type=int, default=6, help="retries per request (429/5xx/timeouts)")
    be.add_argument("--backoff", type=float, default=1.0, help="first retry delay, doubled each retry")
    be.add_argument("--max-backoff", type=float, default=60.0)
    be.add_argument("--parse-retries", type=int, default=1, help="re-asks after a rejected reply")
    be.add_argument("--cache", default=None, help="request cache file (default OUT/cache.jsonl)")
    be.add_argument("--no-cache", action="store_true")
    p.add_argument("--retry-rejected", action="store_true", help="ask again for items rejected in earlier runs")
    p.add_argument("--force", action="store_true", help="resume even if run.json settings differ")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--show-prompt", action="store_true", help="print the chat of the first item and exit")
    p.add_argument("--write-prompts", metavar="DIR", help="copy the built-in prompt folder to DIR and exit")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.write_prompts:
        print(f"built-in prompts copied to {write_builtin_prompts(args.write_prompts)}")
        return 0
    try:
        tasks = [canonical_task(t) for t in args.types.split(",") if t.strip()]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not tasks:
        print("error: --types is empty", file=sys.stderr)
        return 2
    errors: list[str] = []
    if args.coco_captions:
        anns = load_coco(args.coco_captions, args.coco_instances, limit=args.limit)
    elif args.annotations:
        anns = load_jsonl(args.annotations, errors)
    else:
        print("error: give --annotations FILE.jsonl or --coco-captions FILE [--coco-instances FILE]",
              file=sys.stderr)
        return 2
    if args.limit is not None:
        anns = anns[:args.limit]
    for e in errors[:10]:
        print(f"[datagen] skipped annotation {e}", file=sys.stderr)
    if len(errors) > 10:
        print(f"[datagen] ... {len(errors) - 10} more bad annotation rows", file=sys.stderr)
    if not anns:
        print("error: no usable annotations", file=sys.stderr)
        return 2
    prompts = load_prompts(tasks, args.prompts)
    if args.show_prompt:
        from llava_jax.datagen.prompts import render_context

        for t in tasks:
            print(f"===== {t} ({prompts[t].source}) =====")
            for m in prompts[t].messages(render_context(anns[0], args.box_decimals)):
                print(f"--- {m['role']}\n{m['content']}")
        return 0
    if not args.out:
        print("error: --out is required", file=sys.stderr)
        return 2
    if args.backend == "template":
        backend = TemplateBackend(args.seed)
    else:
        if not args.model:
            print("error: --model is required for the openai backend (or use --backend template)", file=sys.stderr)
            return 2
        extra = json.loads(args.extra_body) if args.extra_body else None
        backend = OpenAIChatBackend(args.base_url, args.model, os.environ.get(args.api_key_env),
                                    temperature=args.temperature, max_tokens=args.max_tokens, top_p=args.top_p,
                                    timeout=args.timeout, max_retries=args.max_retries, backoff=args.backoff,
                                    max_backoff=args.max_backoff, extra_body=extra)
    try:
        summary = generate(anns, tasks, backend, prompts, args.out, seed=args.seed, concurrency=args.concurrency,
                           parse_retries=args.parse_retries,
                           cache_path=False if args.no_cache else (args.cache or True),
                           retry_rejected=args.retry_rejected, decimals=args.box_decimals,
                           progress=not args.no_progress, force=args.force)
    except SettingsMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary["bad_annotations"] = len(errors)
    if summary["fatal"]:
        return 2
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
