"""Answer generation for a question file (`question_id`, `image`, `text`, `category`; `image` is a
path or a list of paths, placed where `text` has `<image>`, else before it): batched
decoding through the serving `ChatGenerator` (greedy by default; the same prompts, image
preprocessing and stop tokens as the server), written as JSONL (`question_id`, `prompt`,
`text`, `answer_id`, `model_id`). A rerun skips ids already answered in the output file.

    python -m llava_jax.eval.answer --model HF_DIR --questions qa90_questions.jsonl \\
        --image_folder coco/val2014 --out answers.jsonl
    # a training workdir instead of an exported directory (rebuilt from the config it recorded):
    python -m llava_jax.eval.answer --workdir /tmp/llava_jax_demo/stage2 --questions ... --out ...
"""
from __future__ import annotations

import argparse
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from llava_jax.cli import VERBOSE_HELP, setup
from llava_jax.data.images import load_image
from llava_jax.data.templates import IMAGE_TOKEN
from llava_jax.serve.engine import SamplingParams
from llava_jax.serve.generator import ChatGenerator, Completion


def read_answers(path) -> dict:
    """{question_id: answer row} of an answers JSONL file (later rows win)."""
    done = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # a run killed mid-write leaves a partial last line: that question is redone
                continue
            done[rec["question_id"]] = rec
    return done


def answer_questions(model, tokenizer, questions: Iterable[dict], image_folder=None, *, template="vicuna_v1",
                     image_mode="pad", max_new_tokens=32, batch_size=16, out_path=None, model_id="llava-jax",
                     generator: ChatGenerator | None = None, progress: bool = False,
                     sampling: SamplingParams | None = None, prompt_suffix: str = "") -> list[dict]:
    """Answers in question order, generated through the same `ChatGenerator` as the server (its
    prompt, image preprocessing and stop tokens); `generator` (e.g. `ChatGenerator.from_pretrained`)
    replaces the one built from model/tokenizer/template/image_mode. `sampling` overrides greedy
    decoding (its max_new_tokens wins); `prompt_suffix` is appended to every question (e.g.
    "\\nAnswer the question using a single word or phrase."). With `out_path`, answers are
    appended as each batch finishes and ids already in the file are not asked again."""
    gen = generator or ChatGenerator(model, tokenizer, template=template, image_mode=image_mode)
    params = sampling or SamplingParams(max_new_tokens=max_new_tokens)
    questions = list(questions)
    counts = Counter(q["question_id"] for q in questions)
    if len(counts) != len(questions):
        dup = sorted(str(i) for i, n in counts.items() if n > 1)[:5]
        raise ValueError(f"duplicate question_id in the question file: {dup}")
    done: dict = read_answers(out_path) if out_path is not None and Path(out_path).exists() else {}
    todo = [q for q in questions if q["question_id"] not in done]
    out_f = open(out_path, "a", encoding="utf-8") if out_path is not None else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), unit="q")
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            comps = [Completion(gen.encode([question_message(q, image_folder, prompt_suffix)]), params) for q in chunk]
            if len(todo) > batch_size:
                # pad the last batch to the full size: the same compiled shapes serve every batch
                comps += [Completion(comps[0].encoded, params) for _ in range(batch_size - len(comps))]
            gen.run(comps)
            for q, c in zip(chunk, comps):
                if c.error:
                    raise RuntimeError(f"question {q['question_id']}: generation failed: {c.error}")
                rec = {"question_id": q["question_id"], "prompt": q["text"] + prompt_suffix, "text": c.text.strip(),
                       "answer_id": uuid.uuid4().hex, "model_id": model_id}
                if "category" in q:
                    rec["category"] = q["category"]
                done[q["question_id"]] = rec
                if out_f:
                    out_f.write(json.dumps(rec) + "\n")
                    out_f.flush()
            if bar:
                bar.update(len(chunk))
    finally:
        if out_f:
            out_f.close()
        if bar:
            bar.close()
    return [done[q["question_id"]] for q in questions]


def user_message(text: str, images: Sequence = ()) -> dict:
    """One user message of a text in LLaVA's question format and its images (PIL), for
    `ChatGenerator.encode`: with `<image>` in the text, image k is the k-th `<image>` (their
    numbers must agree); without, all images come before the text (LLaVA's `model_vqa`). The text
    between the placeholders is kept verbatim, so the prompt is the one the training pipeline
    renders for the same human turn (its template then puts the images in front of the turn,
    as LLaVA trains them: `data.templates`, "Image placement"). `eval.answer` question rows and
    the lmms-eval plugin's contexts both go through here."""
    images = list(images)
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) == 1:
        return {"role": "user", "content": [{"type": "image", "image": im} for im in images] +
                [{"type": "text", "text": text}]}
    if len(pieces) - 1 != len(images):
        raise ValueError(f"the text has {len(pieces) - 1} {IMAGE_TOKEN} but there are {len(images)} images")
    content: list[dict] = []
    for i, piece in enumerate(pieces):
        # verbatim, not stripped: pieces are joined as they are, and "a:\n<image>\nb" must keep
        # the newline between "a:" and "b" (the template strips the ends)
        if piece:
            content.append({"type": "text", "text": piece})
        if i < len(images):
            content.append({"type": "image", "image": images[i]})
    return {"role": "user", "content": content}


def question_images(q: dict) -> list[str]:
    """A question row's image paths: `image` is one path, a list of paths (several images, as in
    LLaVA-NeXT's multi-image data), or absent / empty (text only)."""
    image = q.get("image")
    if not image:
        return []
    return [image] if isinstance(image, str) else list(image)


def question_message(q: dict, image_folder, prompt_suffix: str = "") -> dict:
    """A question row as one user message (`user_message`): its images (paths relative to
    `image_folder`) where its text has `<image>`, else before its text."""
    images = [load_image(Path(image_folder or ".") / p) for p in question_images(q)]
    try:
        return user_message(q["text"] + prompt_suffix, images)
    except ValueError as e:
        raise ValueError(f"question {q.get('question_id')}: {e}") from None


# ----------------------------------------------------------------------------- loading

def load_from_workdir(workdir, config=None):
    """(model, tokenizer, template, image_mode) of a training workdir (its latest checkpoint), built
    as the trainer built it (`llava_jax.build.trained_model`: from the config the run recorded
    unless `config` is given), on one device."""
    from llava_jax import build

    model, tok, config = build.trained_model(workdir, config)
    return model, tok, config.data.template, config.data.image_mode


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.answer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a llava-hf directory (weights + tokenizer)")
    p.add_argument("--workdir", default=None, help="or: a training workdir (its latest checkpoint, rebuilt from the "
                   "config the run recorded)")
    p.add_argument("--questions", required=True, help="question JSONL: question_id, image (a path or a list of "
                   "paths; absent: text only), text (images go where it has <image>, else first)[, category]")
    p.add_argument("--image_folder", default=None, help="question `image` paths are relative to this")
    p.add_argument("--out", required=True, help="answers JSONL (appended; answered ids are skipped)")
    p.add_argument("--template", default=None, help="conversation template (default: the checkpoint tokenizer's chat template if it has one, else "
                   "vicuna_v1; with --workdir the run's data.template)")
    p.add_argument("--image_mode", default=None, help="pad or crop (default: config.json's image_aspect_ratio, else pad; "
                   "with --workdir the run's data.image_mode)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt_suffix", default="", help="appended to every question (use \\n for a newline)")
    p.add_argument("--model_id", default=None, help="recorded in every answer (default: the model dir name)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (--model)")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    a = p.parse_args(argv)
    setup(a.verbose)
    if bool(a.model) == bool(a.workdir):
        p.error("give exactly one of --model or --workdir")
    if a.model:  # loaded exactly as the server loads it (template, image mode, stop tokens)
        import jax.numpy as jnp

        gen = ChatGenerator.from_pretrained(a.model, template=a.template, image_mode=a.image_mode,
                                            dtype=getattr(jnp, a.dtype))
        model_id = Path(a.model).name
    else:
        model, tok, template, image_mode = load_from_workdir(a.workdir)
        gen = ChatGenerator(model, tok, template=a.template or template, image_mode=a.image_mode or image_mode)
        model_id = Path(a.workdir).name
    from llava_jax.eval.report import read_jsonl

    questions = read_jsonl(a.questions, "questions")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    sampling = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    answers = answer_questions(None, None, questions, a.image_folder, generator=gen, batch_size=a.batch_size,
                               out_path=a.out, model_id=a.model_id or model_id, progress=True, sampling=sampling,
                               prompt_suffix=a.prompt_suffix.replace("\\n", "\n"))
    print(f"{len(answers)} answers in {a.out}")
    return answers


if __name__ == "__main__":
    main()
