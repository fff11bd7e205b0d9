"""`python -m llava_jax.serve --model DIR`: the OpenAI-compatible API and the web chat page.

    python -m llava_jax.serve --model /models/llava-1.5-7b-hf --port 8000
    # then open http://127.0.0.1:8000/ or point an OpenAI client at http://127.0.0.1:8000/v1
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from llava_jax.cli import VERBOSE_HELP
from llava_jax.serve.request import Limits
from llava_jax.serve.transport import (
    DEFAULT_BACKLOG,
    DEFAULT_GRACEFUL_SHUTDOWN_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
)


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="a llava-hf style directory (weights, config.json, tokenizer) or a "
                   "llava-jax training workdir")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, if not inside --model")
    from llava_jax.data.templates import TEMPLATES

    p.add_argument("--template", default=None,
                   help=f"prompt template: chat_template (the tokenizer's own) or one of {', '.join(sorted(TEMPLATES))}; "
                        "default: chat_template when the tokenizer has one, else vicuna_v1")
    p.add_argument("--image-mode", choices=("pad", "crop"), default=None,
                   help="image preprocessing (default: config.json image_aspect_ratio, else pad)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="weight-only quantization of the LLM's linear layers")
    p.add_argument("--adapter", default=None,
                   help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, e.g. from "
                        "`python -m llava_jax.export --format=peft`) put on --model's weights, merged into them at "
                        "load (--quantize applies after the merge)")
    p.add_argument("--adapter-unmerged", action="store_true",
                   help="keep the adapter beside the kernels instead of merging it (slower; with --quantize, the "
                        "quantized base + fp32 adapter that QLoRA trained)")
    p.add_argument("--mesh", default=None,
                   help="shard the model over all devices: data,fsdp,tensor sizes, e.g. 1,1,-1 (tensor parallel)")
    p.add_argument("--decode-chunk", type=int, default=8, help="decode steps per compiled chunk (streaming granularity)")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def warmup_groups(gen, max_batch: int, max_prompt_tokens: int) -> list:
    """Encoded prompt groups for `BatchScheduler.warm_up`: the batch buckets up to `max_batch`
    with a short text prompt and with a one-image prompt, then one text prompt and one one-image
    prompt filling each prompt-length bucket up to `max_prompt_tokens` (an image prompt only where
    its image tokens fit: an AnyRes image takes hundreds to thousands, so its prompts live in the
    long buckets). Prompts with several images (larger image-slot buckets) are not warmed."""
    import dataclasses

    from PIL import Image

    from llava_jax.serve.engine import BATCH_BUCKETS, PROMPT_BUCKETS

    size = gen.cfg.vision.image_size
    picture = Image.new("RGB", (size, size))
    short = {False: gen.encode([{"role": "user", "content": "Hello"}]),
             True: gen.encode([{"role": "user", "content": [{"type": "image", "image": picture},
                                                            {"type": "text", "text": "Hello"}]}])}
    groups = [[short[image]] * b for b in BATCH_BUCKETS if b <= max_batch for image in (False, True)]
    # Only the shapes matter, so a bucket is filled with one ordinary token after the first (BOS)
    # rather than with text (a tokenizer may merge repeated filler words into a few tokens).
    filler = gen.tokenizer.encode("Hello", add_special_tokens=False)[0]
    prev = 0
    for p in PROMPT_BUCKETS:
        if p > max_prompt_tokens:
            break
        for e in short.values():
            if len(e.ids) <= prev:  # (a short prompt's own bucket is warmed above)
                ids = e.ids[:1] + [filler] * (p - len(e.ids)) + e.ids[1:]
                groups.append([dataclasses.replace(e, ids=ids)])
        prev = p
    return groups


def load_generator(args):
    """The ChatGenerator of --model (a llava-hf directory or a training workdir); a model that
    cannot be opened ends the command with one error line, not a traceback."""
    from llava_jax.build import DTYPES, ProvenanceError
    from llava_jax.cli import setup
    from llava_jax.convert.hf import CheckpointError
    from llava_jax.serve.generator import ChatGenerator

    setup(args.verbose)
    mesh = None
    if args.mesh:
        from llava_jax.sharding import make_mesh

        mesh = make_mesh(tuple(int(x) for x in args.mesh.split(",")))
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    try:
        return ChatGenerator.from_pretrained(
            args.model, tokenizer_path=args.tokenizer, template=args.template, image_mode=args.image_mode,
            dtype=dtype, quantize=None if args.quantize == "none" else args.quantize, mesh=mesh,
            chunk_size=args.decode_chunk, name=getattr(args, "served_model_name", None), adapter=args.adapter,
            merge_adapter=not args.adapter_unmerged)
    except (FileNotFoundError, CheckpointError, ProvenanceError, ValueError) as e:
        sys.exit(f"error: cannot open {args.model}: {e}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m llava_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LLAVA_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLAVA_JAX_API_KEY; none = open)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests per engine batch")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long an idle server waits to fill a batch")
    p.add_argument("--max-pending", type=int, default=32, help="queued + running requests before answering 429")
    p.add_argument("--batching", choices=("continuous", "windowed"), default="continuous",
                   help="continuous: requests join a running batch between decode chunks; windowed: batches run "
                        "to completion")
    p.add_argument("--session-tokens", type=int, default=None,
                   help="new tokens a running batch's cache holds past its first prompts (default: twice the largest "
                        "max_tokens of the requests that start it); more lets requests keep joining longer, at the "
                        "cost of cache memory and attention work")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the context length - 1")
    p.add_argument("--max-image-bytes", type=int, default=16 * 2**20)
    p.add_argument("--max-image-pixels", type=int, default=36_000_000)
    p.add_argument("--max-images", type=int, default=4, help="images per request")
    p.add_argument("--warmup", action="store_true",
                   help="compile before serving: every batch bucket up to --max-batch for a text and a one-image "
                        "prompt, and for one request every prompt-length bucket up to --max-prompt-tokens, at "
                        "--default-max-tokens (a request of another shape still compiles once on arrival)")
    p.add_argument("--body-timeout-s", "--body_timeout_s", type=float, default=Limits.body_timeout_s,
                   help="seconds a client may take to send a request body before it gets 408")
    http = p.add_argument_group("HTTP server (uvicorn)")
    http.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG,
                      help="connections waiting to be accepted (the listening socket's queue)")
    http.add_argument("--max-connections", "--max_connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                      help="open connections (or requests in progress) beyond which uvicorn answers 503 Service "
                           "Unavailable (plain text, not JSON) and closes the connection; 0: no limit. (Requests "
                           "beyond --max-pending queued or running get a JSON 429.)")
    http.add_argument("--keep-alive-s", "--keep_alive_s", type=float, default=DEFAULT_KEEP_ALIVE_S,
                      help="seconds an idle keep-alive connection stays open")
    http.add_argument("--graceful-shutdown-s", "--graceful_shutdown_s", type=float,
                      default=DEFAULT_GRACEFUL_SHUTDOWN_S,
                      help="on SIGINT / SIGTERM, seconds requests in progress may take to finish before they are "
                           "cancelled (a second Ctrl-C stops at once)")
    http.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log, INFO)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from llava_jax.serve.server import make_server

    gen = load_generator(args)
    limits = Limits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                    max_images=args.max_images, max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                    default_max_tokens=args.default_max_tokens, body_timeout_s=args.body_timeout_s)
    srv = make_server(gen, args.host, args.port, limits=limits, api_key=args.api_key, max_batch=args.max_batch,
                      window_s=args.batch_window_ms / 1000, max_pending=args.max_pending,
                      model_name=args.served_model_name, continuous=args.batching == "continuous",
                      reserve_new_tokens=args.session_tokens, backlog=args.backlog,
                      max_connections=args.max_connections or None, keep_alive_s=args.keep_alive_s,
                      graceful_shutdown_s=args.graceful_shutdown_s, access_log=args.access_log)
    if args.warmup:
        report = srv.app.scheduler.warm_up(warmup_groups(gen, args.max_batch, srv.app.max_prompt_tokens),
                                           args.default_max_tokens)
        print(f"warm-up: {report['compilations']} compiled in {report['seconds']:.0f}s", flush=True)
    host, port = srv.server_address[:2]
    print(f"llava-jax serving {srv.app.model_name!r} (template {gen.template}, image mode {gen.image_mode}) on "
          f"http://{host}:{port}/  (API: http://{host}:{port}/v1, key {'required' if args.api_key else 'not required'})",
          flush=True)
    try:
        srv.serve_forever()  # in the main thread: SIGINT / SIGTERM shut down gracefully, then it returns
    except KeyboardInterrupt:  # before uvicorn took over the signals
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
