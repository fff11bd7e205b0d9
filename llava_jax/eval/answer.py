"""Answer generation for a question file (`question_id`, `image`, `text`, `category`): batched
decoding through the KV-cache engine (greedy by default), written as JSONL (`question_id`,
`prompt`, `text`, `answer_id`, `model_id`). A rerun skips ids already answered in the output file.

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

import numpy as np

from llava_jax.cli import VERBOSE_HELP, setup
from llava_jax.data.images import load_image, preprocess_image_uint8
from llava_jax.data.templates import default_template
from llava_jax.data.tokenize import tokenize_conversation
from llava_jax.serve.engine import Engine, SamplingParams


def build_prompt(tokenizer, model_cfg, template: str, question: str, has_image: bool):
    text = ("<image>\n" + question) if has_image else question
    enc = tokenize_conversation(tokenizer, template, [("human", text)],
                                image_token_id=model_cfg.image_token_id,
                                num_image_tokens=model_cfg.num_image_tokens, add_generation_prompt=True)
    return enc["input_ids"]


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
                     engine: Engine | None = None, progress: bool = False,
                     sampling: SamplingParams | None = None, prompt_suffix: str = "") -> list[dict]:
    """Answers in question order. `sampling` overrides greedy decoding (its max_new_tokens wins);
    `prompt_suffix` is appended to every question (e.g. "\\nAnswer the question using a single word
    or phrase."). With `out_path`, answers are appended as each batch finishes and ids already
    in the file are not asked again."""
    cfg = model.config
    engine = engine or Engine(model)
    params = sampling or SamplingParams(max_new_tokens=max_new_tokens)
    questions = list(questions)
    counts = Counter(q["question_id"] for q in questions)
    if len(counts) != len(questions):
        dup = sorted(str(i) for i, n in counts.items() if n > 1)[:5]
        raise ValueError(f"duplicate question_id in the question file: {dup}")
    done: dict = read_answers(out_path) if out_path is not None and Path(out_path).exists() else {}
    todo = [q for q in questions if q["question_id"] not in done]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    size = cfg.vision.image_size
    out_f = open(out_path, "a", encoding="utf-8") if out_path is not None else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), unit="q")
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            prompts, imgs = [], np.zeros((len(chunk), 1, size, size, 3), np.uint8)
            mask = np.zeros((len(chunk), 1), bool)
            for i, q in enumerate(chunk):
                has_image = bool(q.get("image"))
                prompts.append(build_prompt(tokenizer, cfg, template, q["text"] + prompt_suffix, has_image))
                if has_image:
                    path = Path(image_folder or ".") / q["image"]
                    imgs[i, 0] = preprocess_image_uint8(load_image(path), image_mode, size)
                    mask[i, 0] = True
            if len(todo) > batch_size and len(chunk) < batch_size:
                # pad the last batch to the full size: the same compiled shapes serve every batch
                pad = batch_size - len(chunk)
                prompts += [prompts[0]] * pad
                imgs = np.concatenate([imgs, np.repeat(imgs[:1], pad, 0)])
                mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
            outs = engine.generate(prompts, imgs, mask, params, eos_ids=eos)[:len(chunk)]
            for q, out_ids in zip(chunk, outs):
                rec = {"question_id": q["question_id"], "prompt": q["text"] + prompt_suffix,
                       "text": tokenizer.decode(out_ids, skip_special_tokens=True).strip(),
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


# ----------------------------------------------------------------------------- loading

def load_model(path, dtype: str = "float32"):
    """(model, tokenizer) from a llava-hf directory (config, weights and tokenizer, as written
    by `llava_jax.save_pretrained` / `python -m llava_jax.export`)."""
    import jax.numpy as jnp

    from llava_jax.convert.hf import from_pretrained
    from llava_jax.data.tokenize import add_llava_special_tokens, load_tokenizer

    tok = load_tokenizer(path)
    add_llava_special_tokens(tok)
    model = from_pretrained(path, dtype=getattr(jnp, dtype))
    return model, tok


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
    p.add_argument("--questions", required=True, help="question JSONL: question_id, image, text[, category]")
    p.add_argument("--image_folder", default=None, help="question `image` paths are relative to this")
    p.add_argument("--out", required=True, help="answers JSONL (appended; answered ids are skipped)")
    p.add_argument("--template", default=None, help="conversation template (default: the checkpoint tokenizer's chat template if it has one, else "
                   "vicuna_v1; with --workdir the run's data.template)")
    p.add_argument("--image_mode", default=None, help="pad or crop (default pad, or the config's)")
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
    if a.model:
        model, tok = load_model(a.model, a.dtype)
        template, image_mode, model_id = default_template(tok), "pad", Path(a.model).name
    else:
        model, tok, template, image_mode = load_from_workdir(a.workdir)
        model_id = Path(a.workdir).name
    from llava_jax.eval.report import read_jsonl

    questions = read_jsonl(a.questions, "questions")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    sampling = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    answers = answer_questions(model, tok, questions, a.image_folder, template=a.template or template,
                               image_mode=a.image_mode or image_mode, batch_size=a.batch_size, out_path=a.out,
                               model_id=a.model_id or model_id, progress=True, sampling=sampling,
                               prompt_suffix=a.prompt_suffix.replace("\\n", "\n"))
    print(f"{len(answers)} answers in {a.out}")
    return answers


if __name__ == "__main__":
    main()
