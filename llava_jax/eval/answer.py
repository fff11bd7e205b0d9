"""Answer generation for a question file (`question_id`, `image`, `text`, `category`): batched
greedy decoding through the KV-cache engine, written as JSONL (`question_id`, `prompt`, `text`,
`answer_id`, `model_id`). A rerun skips ids already answered in the output file."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

from llava_jax.data.images import load_image, preprocess_image_uint8
from llava_jax.data.templates import get_template
from llava_jax.data.tokenize import tokenize_conversation
from llava_jax.serve.engine import Engine, SamplingParams


def build_prompt(tokenizer, model_cfg, template: str, question: str, has_image: bool):
    text = ("<image>\n" + question) if has_image else question
    enc = tokenize_conversation(tokenizer, get_template(template), [("human", text)],
                                image_token_id=model_cfg.image_token_id,
                                num_image_tokens=model_cfg.num_image_tokens, add_generation_prompt=True)
    return enc["input_ids"]


def answer_questions(model, tokenizer, questions: Iterable[dict], image_folder=None, *, template="vicuna_v1",
                     image_mode="pad", max_new_tokens=32, batch_size=16, out_path=None, model_id="llava-jax",
                     engine: Engine | None = None, progress: bool = False) -> list[dict]:
    cfg = model.config
    engine = engine or Engine(model)
    questions = list(questions)
    done: dict = {}
    if out_path is not None and Path(out_path).exists():
        for line in Path(out_path).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["question_id"]] = rec
    todo = [q for q in questions if q["question_id"] not in done]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    size = cfg.vision.image_size
    out_f = open(out_path, "a") if out_path is not None else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="q")
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            prompts, imgs = [], np.zeros((len(chunk), 1, size, size, 3), np.uint8)
            mask = np.zeros((len(chunk), 1), bool)
            for i, q in enumerate(chunk):
                has_image = bool(q.get("image"))
                prompts.append(build_prompt(tokenizer, cfg, template, q["text"], has_image))
                if has_image:
                    path = Path(image_folder or ".") / q["image"]
                    imgs[i, 0] = preprocess_image_uint8(load_image(path), image_mode, size)
                    mask[i, 0] = True
            outs = engine.generate(prompts, imgs, mask, SamplingParams(max_new_tokens=max_new_tokens), eos_ids=eos)
            for q, ids in zip(chunk, outs):
                rec = {"question_id": q["question_id"], "prompt": q["text"],
                       "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                       "answer_id": uuid.uuid4().hex, "model_id": model_id}
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
