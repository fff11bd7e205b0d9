"""Quality and memory of weight-only quantization against the full-precision model.

    python -m llava_jax.tools.quant_eval --demo-out /tmp/llava_jax_demo     # the trained demo model
    python -m llava_jax.tools.quant_eval --model DIR --questions q.jsonl --image-folder IMGS

For each mode (int8, int4): parameter bytes (LLM linear layers and the whole model); on the
evaluation questions, the full-precision greedy answers are teacher-forced through both models
and the logits that predict the answer tokens are compared (cosine similarity, top-1
agreement); then both models answer greedily with the engine (token agreement position by
position, identical answers) and, for the demo, the accuracy per the shapes-world scorer.
Prints a markdown table and writes JSON with `--out`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def load_demo(out: Path):
    from llava_jax.demo.run import load_trained_model, trained_stage_config

    data_dir = out / "data"
    c2 = trained_stage_config(out)
    model, tokenizer = load_trained_model(out, c2)
    questions = [json.loads(x) for x in (data_dir / "eval.jsonl").read_text().splitlines() if x.strip()]
    return model, tokenizer, questions, data_dir / "images", c2.data.template, c2.data.image_mode


def encode_questions(model, tokenizer, questions, image_folder, template, image_mode):
    """(prompt ids, (images [1, S, S, 3], has_image)) per question, encoded as the server and
    eval.answer encode them (`ChatGenerator.encode`)."""
    from llava_jax.eval.answer import question_message
    from llava_jax.serve.generator import ChatGenerator

    gen = ChatGenerator(model, tokenizer, template=template, image_mode=image_mode)
    size = model.config.vision.image_size
    prompts, images = [], []
    for q in questions:
        enc = gen.encode([question_message(q, image_folder)])
        prompts.append(enc.ids)
        img = np.zeros((1, size, size, 3), np.uint8)
        if enc.images is not None:
            img[0] = enc.images[0]
        images.append((img, enc.images is not None))
    return prompts, images


def answer(engine, prompts, images, eos, new_tokens, batch=32):
    from llava_jax.serve.engine import SamplingParams

    out = []
    for s in range(0, len(prompts), batch):
        p = prompts[s:s + batch]
        imgs = np.stack([im for im, _ in images[s:s + batch]])
        mask = np.array([[has] for _, has in images[s:s + batch]])
        out += engine.generate(p, imgs, mask, SamplingParams(max_new_tokens=new_tokens), eos_ids=eos)
    return out


def answer_logits(model, prompts, images, answers, batch=16):
    """Logits at the positions that predict each answer token (teacher forcing), concatenated."""
    import jax
    import jax.numpy as jnp

    fwd = jax.jit(lambda m, ids, att, imgs, mask: m(ids, attention_mask=att, images=imgs, image_mask=mask))
    rows = []
    for s in range(0, len(prompts), batch):
        seqs = [list(p) + list(a) for p, a in zip(prompts[s:s + batch], answers[s:s + batch])]
        L = max(len(x) for x in seqs)
        L = int(np.ceil(L / 32) * 32)
        ids = np.zeros((len(seqs), L), np.int32)
        att = np.zeros((len(seqs), L), np.int32)
        for i, x in enumerate(seqs):
            ids[i, :len(x)], att[i, :len(x)] = x, 1
        imgs = np.stack([im for im, _ in images[s:s + batch]])
        mask = np.array([[has] for _, has in images[s:s + batch]])
        logits = np.asarray(fwd(model, jnp.asarray(ids), jnp.asarray(att), jnp.asarray(imgs), jnp.asarray(mask)))
        for i, (p, a) in enumerate(zip(prompts[s:s + batch], answers[s:s + batch])):
            if a:
                rows.append(logits[i, len(p) - 1:len(p) - 1 + len(a)])
    return np.concatenate(rows) if rows else np.zeros((0, 1))


LLAVA_15 = ("7b", "13b")  # llava_jax.config presets llava_1_5_7b / llava_1_5_13b


def shapes_memory(size: str, modes, group_size: int, dtype="bfloat16") -> dict:
    """Param bytes of llava-1.5-`size` in `dtype` and quantized, from shapes alone (nothing is
    allocated: the model is built and quantized under eval_shape)."""
    import jax.numpy as jnp
    from flax import nnx

    from llava_jax.presets import PRESETS
    from llava_jax.models.llava import LlavaModel
    from llava_jax.serve.quant import param_bytes, quantize_model

    dt = jnp.dtype(dtype)
    cfg = PRESETS[f"llava_1_5_{size}"]().with_runtime(param_dtype=dt, dtype=dt)
    out = {}
    for mode in [None, *modes]:
        model = nnx.eval_shape(lambda m=mode: (lambda x: quantize_model(x, m, group_size) if m else x)(
            LlavaModel(cfg, rngs=nnx.Rngs(0))))
        out[mode or dtype] = {"model_bytes": param_bytes(model), "llm_linear_bytes": param_bytes(model, linear_only=True)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-out", default=None, help="a `python -m llava_jax.demo --out` directory")
    ap.add_argument("--model", default=None, help="a llava-hf directory (with tokenizer)")
    ap.add_argument("--questions", default=None, help="JSONL with question_id, image, text (for --model)")
    ap.add_argument("--image-folder", default=None)
    ap.add_argument("--template", default="vicuna_v1")
    ap.add_argument("--image-mode", default="pad")
    ap.add_argument("--modes", default="int8,int4")
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size")
    ap.add_argument("--num-questions", type=int, default=120)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--shapes-of", choices=sorted(LLAVA_15), default=None,
                    help="only print the memory of llava-1.5-7b/13b (bf16 vs quantized), computed from shapes")
    args = ap.parse_args(argv)
    modes = [x for x in args.modes.split(",") if x]
    if args.shapes_of:
        mem = shapes_memory(args.shapes_of, modes, args.group_size)
        base = mem["bfloat16"]
        print(f"llava-1.5-{args.shapes_of} parameter memory (GB = 1e9 bytes)\n")
        print("| weights | LLM linear layers | whole model |\n|---|---|---|")
        for k, v in mem.items():
            print(f"| {k} | {v['llm_linear_bytes'] / 1e9:.2f} GB ({v['llm_linear_bytes'] / base['llm_linear_bytes']:.0%}) "
                  f"| {v['model_bytes'] / 1e9:.2f} GB ({v['model_bytes'] / base['model_bytes']:.0%}) |")
        return mem

    from llava_jax.serve.engine import Engine
    from llava_jax.serve.quant import compare_logits, param_bytes, quantized_copy

    if args.demo_out:
        model, tok, questions, folder, template, mode = load_demo(Path(args.demo_out))
    elif args.model:
        import llava_jax
        from llava_jax.data.tokenize import load_tokenizer

        model, tok = llava_jax.from_pretrained(args.model), load_tokenizer(args.model)
        questions = [json.loads(x) for x in Path(args.questions).read_text().splitlines() if x.strip()]
        folder, template, mode = args.image_folder, args.template, args.image_mode
    else:
        ap.error("give --demo-out or --model")
    questions = questions[:args.num_questions]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    prompts, images = encode_questions(model, tok, questions, folder, template, mode)
    ref_ids = answer(Engine(model), prompts, images, eos, args.new_tokens)
    ref_logits = answer_logits(model, prompts, images, ref_ids)
    scorer = None
    if args.demo_out:
        from llava_jax.demo import scoring

        scorer = scoring.score_answer

    def accuracy(ids):
        if scorer is None:
            return None
        texts = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
        return float(np.mean([scorer(q["category"], t, q["answer"]) for q, t in zip(questions, texts)]))

    fp_total, fp_linear = param_bytes(model), param_bytes(model, linear_only=True)
    results = {"questions": len(questions), "new_tokens": args.new_tokens, "answer_tokens": int(len(ref_logits)),
               "full_precision": {"dtype": str(model.llm.layers.q_kernel[...].dtype), "model_bytes": fp_total,
                                  "llm_linear_bytes": fp_linear, "accuracy": accuracy(ref_ids)}, "modes": {}}
    for m in modes:
        t = time.perf_counter()
        q = quantized_copy(model, m, args.group_size)
        ids = answer(Engine(q), prompts, images, eos, args.new_tokens)
        stats = compare_logits(ref_logits, answer_logits(q, prompts, images, ref_ids))
        pos = [a == b for x, y in zip(ref_ids, ids) for a, b in zip(x, y)]
        results["modes"][m] = {
            **stats, "greedy_token_agreement": float(np.mean(pos)) if pos else 1.0,
            "identical_answers": float(np.mean([x == y for x, y in zip(ref_ids, ids)])),
            "accuracy": accuracy(ids), "model_bytes": param_bytes(q), "llm_linear_bytes": param_bytes(q, linear_only=True),
            "seconds": time.perf_counter() - t}
    fp = results["full_precision"]
    print(f"{len(questions)} questions, {results['answer_tokens']} teacher-forced answer tokens\n")
    print("| weights | LLM linear MB | model MB | logits cosine mean / min | top-1 agreement | greedy token agreement "
          "| identical answers | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    acc = (lambda a: "n/a" if a is None else f"{a:.1%}")
    print(f"| {fp['dtype']} | {fp['llm_linear_bytes'] / 1e6:.2f} | {fp['model_bytes'] / 1e6:.2f} | 1 / 1 | 100% | 100% "
          f"| 100% | {acc(fp['accuracy'])} |")
    for m, r in results["modes"].items():
        print(f"| {m} | {r['llm_linear_bytes'] / 1e6:.2f} ({r['llm_linear_bytes'] / fp_linear:.0%}) | "
              f"{r['model_bytes'] / 1e6:.2f} ({r['model_bytes'] / fp_total:.0%}) | {r['cosine_mean']:.6f} / "
              f"{r['cosine_min']:.6f} | {r['top1_agreement']:.1%} | {r['greedy_token_agreement']:.1%} | "
              f"{r['identical_answers']:.1%} | {acc(r['accuracy'])} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
