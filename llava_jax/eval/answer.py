"""Answer generation for a question file (`question_id`, `image`, `text`, `category`): batched
decoding through the KV-cache engine (greedy by default), written as JSONL (`question_id`,
`prompt`, `text`, `answer_id`, `model_id`). A rerun skips ids already answered in the output file.

    python -m llava_jax.eval.answer --model HF_DIR --questions qa90_questions.jsonl \\
        --image_folder coco/val2014 --out answers.jsonl
    # a training workdir instead of an exported directory:
    python -m llava_jax.eval.answer --config configs/demo.py:stage2 --workdir /tmp/llava_jax_demo/stage2 \\
        --config_override tokenizer_path=/tmp/llava_jax_demo/tokenizer --questions ... --out ...
"""
from __future__ import annotations

import argparse
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

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


def load_config(spec: str, overrides: Sequence[str] = ()):
    """`path/to/config.py:arg` -> its get_config(arg), with `key.sub=value` overrides (values
    parsed as JSON when they parse, else kept as strings)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("llava_eval_config", path)
    if mod_spec is None:
        raise ValueError(f"cannot load config file {path!r}")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    c = mod.get_config(arg) if arg else mod.get_config()
    for o in overrides:
        key, _, raw = o.partition("=")
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, val)
    return c


def load_from_workdir(config, workdir):
    """(model, tokenizer, template, image_mode) from a training config + workdir (its latest
    checkpoint), built as the trainer builds it, on one device."""
    import jax

    from llava_jax.train import mesh as mesh_lib
    from llava_jax.train.trainer import apply_workdir_params, build_model, load_run_tokenizer

    tok, ids = load_run_tokenizer(config)
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = build_model(config, mesh, ids, vocab_size=len(tok))
    model = apply_workdir_params(model, str(workdir), [r".*"])
    return model, tok, config.data.template, config.data.image_mode


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.answer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a llava-hf directory (weights + tokenizer)")
    p.add_argument("--config", default=None, help="or: a training config path:arg (with --workdir)")
    p.add_argument("--config_override", action="append", default=[], help="key.sub=value for --config")
    p.add_argument("--workdir", default=None, help="the training workdir whose latest checkpoint is used")
    p.add_argument("--questions", required=True, help="question JSONL: question_id, image, text[, category]")
    p.add_argument("--image_folder", default=None, help="question `image` paths are relative to this")
    p.add_argument("--out", required=True, help="answers JSONL (appended; answered ids are skipped)")
    p.add_argument("--template", default=None, help="conversation template (default: the checkpoint tokenizer's chat template if it has one, else vicuna_v1; with --config the config's)")
    p.add_argument("--image_mode", default=None, help="pad or crop (default pad, or the config's)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt_suffix", default="", help="appended to every question (use \\n for a newline)")
    p.add_argument("--model_id", default=None, help="recorded in every answer (default: the model dir name)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (--model)")
    a = p.parse_args(argv)
    if bool(a.model) == bool(a.config):
        p.error("give exactly one of --model or --config (+ --workdir)")
    if a.model:
        model, tok = load_model(a.model, a.dtype)
        template, image_mode, model_id = default_template(tok), "pad", Path(a.model).name
    else:
        if not a.workdir:
            p.error("--config needs --workdir")
        model, tok, template, image_mode = load_from_workdir(load_config(a.config, a.config_override), a.workdir)
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
