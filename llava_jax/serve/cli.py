"""Terminal chat: `python -m llava_jax.chat --model DIR [--image photo.jpg]`.

Type a message and the reply streams in. Commands:
  /image PATH   switch to another image (starts a new conversation about it)
  /reset        forget the conversation (the current image is attached again to the next message)
  /help         this list
  /quit         leave (Ctrl-D works too)
The prompt template comes from the checkpoint (its chat template if the tokenizer has one, else
vicuna_v1) unless --template says otherwise. Works with piped stdin (one message per line).
"""
from __future__ import annotations

import argparse
import sys

from llava_jax.cli import HelpFormatter
from llava_jax.serve.__main__ import add_model_args, load_generator
from llava_jax.serve.engine import SamplingParams
from llava_jax.serve.generator import Completion, RequestError

HELP = __doc__.split("Commands:\n", 1)[1].split("The prompt", 1)[0]


def _load_image(path):
    from llava_jax.data.images import load_image

    return load_image(path)


def main(argv=None, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    p = argparse.ArgumentParser(prog="python -m llava_jax.chat", formatter_class=HelpFormatter,
                                description="Chat with a LLaVA checkpoint in the terminal.",
                                epilog="in-chat commands:\n" + HELP.rstrip() + "\nType a message and the reply "
                                "streams in; piped stdin works too (one message per line).")
    add_model_args(p)
    p.add_argument("--image", default=None, help="image to talk about")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512, help="max new tokens per reply")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    args = p.parse_args(argv)

    gen = load_generator(args)
    interactive = stdin.isatty()

    def say(msg):
        print(msg, file=out if interactive else sys.stderr, flush=True)

    image = None
    if args.image:
        try:
            image = _load_image(args.image)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    history: list[dict] = []
    attach = image is not None  # the image goes with the next user message
    say(f"llava-jax chat: {gen.name} (template {gen.template}); /help for commands")
    turn = 0
    while True:
        if interactive:
            out.write("USER: ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        cmd, _, rest = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            break
        if cmd == "/help":
            say(HELP.rstrip())
            continue
        if cmd == "/reset":
            history, attach = [], image is not None
            say("(conversation reset)")
            continue
        if cmd == "/image":
            if not rest.strip():
                say("usage: /image PATH")
                continue
            try:
                image = _load_image(rest.strip())
            except (ValueError, OSError) as e:
                say(f"error: {e}")
                continue
            history, attach = [], True
            say(f"(image {rest.strip()}; new conversation)")
            continue
        if cmd.startswith("/") and cmd[1:].isalpha():
            say(f"unknown command {cmd}; /help lists them")
            continue
        content = ([{"type": "image", "image": image}] if attach else []) + [{"type": "text", "text": line}]
        msgs = ([{"role": "system", "content": args.system}] if args.system is not None else []) + history + [
            {"role": "user", "content": content}]
        try:
            enc = gen.encode(msgs)
        except RequestError as e:
            say(f"error: {e}")
            continue
        room = gen.context_length - len(enc.ids)
        if room < 1:
            say(f"error: the conversation is {len(enc.ids)} tokens, the context is {gen.context_length}: /reset")
            continue
        params = SamplingParams(max_new_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed + turn)
        out.write("ASSISTANT: ")
        out.flush()

        def show(delta):
            out.write(delta)
            out.flush()

        comp = Completion(enc, params, (), show)
        try:
            gen.run([comp])
        except KeyboardInterrupt:
            comp.cancelled = True
        out.write("\n")
        out.flush()
        if comp.text.strip():
            history += [{"role": "user", "content": content}, {"role": "assistant", "content": comp.text}]
            attach = False
        else:  # an empty reply cannot be templated: drop the exchange (its image goes with the next one)
            say("(empty reply; not kept in the conversation)")
        turn += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
