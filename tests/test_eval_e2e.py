"""End to end on the shapes world: a tiny model answers the held-out questions through the
answer CLI (a llava-hf directory), a scripted judge on 127.0.0.1 reviews them through the
LLaVA-Bench CLI (with retries: an HTTP 500, a reply without scores, one that never has them),
and the summary equals the one computed by hand from the answers and the world's own scorer.
Another backbone: the answer CLI on SigLIP x Qwen2 equals transformers' greedy generation."""
import json
from pathlib import Path

import numpy as np
import pytest

from judge_server import ScriptedJudge, section, user_content
from shapes_model import make_shapes_model
from llava_jax.demo import dataset, scoring
from llava_jax.eval import answer as answer_cli
from llava_jax.eval import llava_bench
from llava_jax.eval.report import read_jsonl

REF_SCORE, RIGHT, WRONG = 10, 9, 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Shapes-world eval set in LLaVA-Bench form + a tiny random model saved as llava-hf."""
    root = tmp_path_factory.mktemp("shapes_bench")
    questions, anns = make_shapes_model(root)
    # LLaVA-Bench files: questions as they are, the canonical answers as the references, the
    # captions + boxes of each image as the context (the same format as caps_boxes_coco2014_val_80)
    refs = [{"question_id": q["question_id"], "text": q["answer"], "answer_id": f"ref{q['question_id']}"}
            for q in questions]
    (root / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    return root, questions, anns


def scripted_reply(questions, anns):
    """A judge that knows the truth: reference REF_SCORE; model RIGHT if the world's scorer
    accepts its answer, else WRONG; reply formats vary with the question id. Question 1 gets an
    HTTP 500 first, question 2 a reply without scores first, question 4 never gives scores."""
    truth = {}
    for q in questions:
        ctx = llava_bench.context_text(next(a for a in anns if a["image"] == q["image"]))
        truth[(ctx, q["text"])] = q
    state = {"500": False}

    def reply(body):
        c = user_content(body)
        q = truth[(section(c, "Context"), section(c, "Question"))]
        qid, retry = q["question_id"], len(body["messages"]) > 2
        if qid == 1 and not state["500"]:
            state["500"] = True
            return 500, "try again"
        if qid == 4 or (qid == 2 and not retry):
            return "Both assistants answered the question."
        model = RIGHT if scoring.score_answer(q["category"], section(c, "Assistant 2"), q["answer"]) else WRONG
        fmt = ["{a} {b}\nreasons", "{a}, {b}", "Assistant 1: {a}\nAssistant 2: {b}", "**{a} {b}**\n"][qid % 4]
        return fmt.format(a=REF_SCORE, b=model)

    return reply


def test_shapes_world_answers_judged_into_a_summary(bench, tmp_path):
    root, questions, anns = bench
    answers_path = tmp_path / "answers.jsonl"
    args = ["--model", str(root / "hf"), "--questions", str(root / "data" / "eval.jsonl"),
            "--image_folder", str(root / "data" / "images"), "--out", str(answers_path),
            "--max_new_tokens", "6", "--batch_size", "8", "--model_id", "tiny-shapes"]
    answers = answer_cli.main(args)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(a["model_id"] == "tiny-shapes" and a["answer_id"] and a["prompt"] for a in answers)
    # resumable: a rerun asks nothing again (same answer ids, no new lines)
    assert [a["answer_id"] for a in answer_cli.main(args)] == [a["answer_id"] for a in answers]
    assert len(read_jsonl(answers_path)) == len(questions)

    out = tmp_path / "judged"
    with ScriptedJudge(scripted_reply(questions, anns)) as judge:
        obj = llava_bench.main(["--questions", str(root / "data" / "eval.jsonl"),
                                "--references", str(root / "refs.jsonl"), "--answers", str(answers_path),
                                "--context", str(root / "data" / "eval_annotations.jsonl"),
                                "--judge_url", judge.url, "--judge_model", "scripted", "--out_dir", str(out),
                                "--workers", "3", "--no_progress"])
    n = len(questions)
    assert len(judge.requests) == n + 1 + 1 + 1  # + the 500, + one re-ask for q2, + one for q4
    reviews = read_jsonl(out / "reviews.jsonl")
    assert [r["question_id"] for r in reviews] == [q["question_id"] for q in questions]
    by_id = {r["question_id"]: r for r in reviews}
    assert by_id[2]["attempts"] == 2 and not by_id[2]["failed"]
    assert by_id[4]["failed"] and by_id[4]["score"] is None and by_id[4]["attempts"] == 2
    assert all(r["rule"] == "llava_jax" and r["model_id"] == "tiny-shapes" for r in reviews)

    # the summary, by hand: per category, model mean from the world's own scorer
    expected: dict[str, list[int]] = {}
    for q, a in zip(questions, answers):
        if q["question_id"] != 4:
            ok = scoring.score_answer(q["category"], a["text"], q["answer"])
            expected.setdefault(q["category"], []).append(RIGHT if ok else WRONG)
    rows = {r["category"]: r for r in obj["rows"]}
    assert set(rows) == set(expected) | {"overall"}
    for cat, scores in expected.items():
        mean = sum(scores) / len(scores)
        assert rows[cat]["n"] == len(scores)
        assert rows[cat]["model"] == pytest.approx(mean * 10)
        assert rows[cat]["reference"] == pytest.approx(REF_SCORE * 10)
        assert rows[cat]["relative"] == pytest.approx(mean / REF_SCORE * 100)
    flat = [s for v in expected.values() for s in v]
    assert rows["overall"]["n"] == n - 1 and rows["overall"]["failed"] == 1
    assert rows["overall"]["relative"] == pytest.approx(sum(flat) / len(flat) / REF_SCORE * 100)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["failures"][0]["question_id"] == 4 and saved["judge_model"] == "scripted"
    assert saved["model_id"] == "tiny-shapes"
    assert "| overall |" in (out / "summary.md").read_text() and (out / "summary.png").stat().st_size > 0

    # a rerun judges only the failed question again; --summary_only just re-reads the reviews
    with ScriptedJudge(lambda body: f"{REF_SCORE} {WRONG}") as judge:
        llava_bench.main(["--questions", str(root / "data" / "eval.jsonl"), "--references", str(root / "refs.jsonl"),
                          "--answers", str(answers_path), "--context", str(root / "data" / "eval_annotations.jsonl"),
                          "--judge_url", judge.url, "--out_dir", str(out), "--no_progress"])
        assert len(judge.requests) == 1
    again = llava_bench.main(["--out_dir", str(out), "--summary_only"])
    assert {r["category"]: r for r in again["rows"]}["overall"]["failed"] == 0


def test_two_image_questions_equal_llava_generate(bench, tmp_path, monkeypatch):
    """Plain LLaVA (one view per image): questions listing two images (`image` a list; without and
    with `<image>` placeholders) answered by the answer CLI = transformers'
    LlavaForConditionalGeneration greedy generate on the same prompt ids and pixels (token ids
    compared: this random model writes byte-fallback pieces whose streamed text may keep a
    character that the full decode later merges into a replacement character)."""
    torch = pytest.importorskip("torch")
    import numpy as np
    from transformers import LlavaForConditionalGeneration

    from llava_jax.eval.answer import question_message
    from llava_jax.models.pixels import normalize
    from llava_jax.serve import generator as generator_mod

    root, questions, _ = bench
    images = sorted({q["image"] for q in questions})[:2]
    assert len(images) == 2
    qs = [{"question_id": "front", "image": images, "text": "How many shapes are in the image?"},
          {"question_id": "placed", "image": images, "text": "<image>\nWhich shape is yellow?\n<image>"}]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    folder = root / "data" / "images"
    gens, replies = [], {}  # the generator the CLI built; each prompt's generated ids and text
    orig_end, orig_init = generator_mod.ChatSession._end, generator_mod.ChatGenerator.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        gens.append(self)

    def end(self, slot, reason):
        c, ts = self.rows[slot]
        orig_end(self, slot, reason)
        replies[tuple(c.encoded.ids)] = (list(ts.ids), c.text)

    monkeypatch.setattr(generator_mod.ChatGenerator, "__init__", init)
    monkeypatch.setattr(generator_mod.ChatSession, "_end", end)
    answers = answer_cli.main(["--model", str(root / "hf"), "--questions", str(qfile), "--image_folder", str(folder),
                               "--out", str(tmp_path / "a.jsonl"), "--max_new_tokens", "6", "--batch_size", "2"])
    (gen,) = gens
    ref = LlavaForConditionalGeneration.from_pretrained(root / "hf", dtype=torch.float32).eval()

    def cut(ids):
        return ids[:next((i for i, t in enumerate(ids) if t in gen.eos_ids), len(ids))]

    for q, a in zip(qs, answers):
        enc = gen.encode([question_message(q, folder)])
        assert enc.images.shape[0] == 2 and enc.ids.count(gen.cfg.image_token_id) == 2 * gen.cfg.num_image_tokens
        pix = torch.from_numpy(np.ascontiguousarray(np.transpose(normalize(enc.images), (0, 3, 1, 2))))
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor([enc.ids]), attention_mask=torch.ones_like(torch.tensor([enc.ids])),
                               pixel_values=pix, max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=gen.tokenizer.pad_token_id)
        ids, text = replies[tuple(enc.ids)]
        assert cut(ids) == cut(out[0, len(enc.ids):].tolist()) and cut(ids)
        assert a["text"] == text.strip()


@pytest.mark.slow
def test_briefly_trained_demo_model_from_its_workdir(tmp_path):
    """The demo trainer (tiny config, a few steps) -> answers straight from its workdir via
    --workdir (the config the run recorded) -> the scripted judge -> a summary."""
    import os
    import subprocess
    import sys

    from llava_jax.data.tokenizer_build import build_llama_tokenizer
    from llava_jax.demo.run import SYSTEM, corpus

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    dataset.generate(data, num_train=48, num_eval=4, seed=0, image_size=16)
    build_llama_tokenizer(corpus(data) + [SYSTEM], tmp_path / "tok", vocab_size=400)
    w = tmp_path / "stage2"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    p = subprocess.run([sys.executable, "-m", "llava_jax.train", f"--config={repo}/configs/demo.py:tiny_stage2",
                        f"--workdir={w}", f"--config.tokenizer_path={tmp_path / 'tok'}",
                        f"--config.data.sources={data / 'stage2.json'}", f"--config.data.image_folder={data / 'images'}",
                        "--config.train.num_steps=8", "--config.train.ckpt_every=8",
                        # the tower too: tiny_stage2 freezes a tower a stage-0 run would have trained,
                        # and a workdir whose params no checkpoint provided is refused (build.trained_model)
                        "--config.trainable=('.*',)"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=repo)
    assert p.returncode == 0, p.stderr[-3000:]
    questions = read_jsonl(data / "eval.jsonl")
    anns = read_jsonl(data / "eval_annotations.jsonl")
    # the workdir alone: the answer CLI rebuilds the model from the run_config.json the run recorded
    answers = answer_cli.main(["--workdir", str(w),
                               "--questions", str(data / "eval.jsonl"), "--image_folder", str(data / "images"),
                               "--out", str(tmp_path / "answers.jsonl"), "--max_new_tokens", "8"])
    assert len(answers) == len(questions) and answers[0]["model_id"] == "stage2"
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"question_id": q["question_id"], "text": q["answer"]}) + "\n"
                            for q in questions))
    with ScriptedJudge(scripted_reply(questions, anns)) as judge:
        obj = llava_bench.main(["--questions", str(data / "eval.jsonl"), "--references", str(refs),
                                "--answers", str(tmp_path / "answers.jsonl"),
                                "--context", str(data / "eval_annotations.jsonl"), "--judge_url", judge.url,
                                "--out_dir", str(tmp_path / "judged"), "--no_progress"])
    overall = obj["rows"][-1]
    assert overall["category"] == "overall" and overall["n"] + overall["failed"] == len(questions)


def test_answers_on_siglip_qwen2_equal_transformers_generate(tmp_path):
    """Eval on another backbone: the answer CLI (through the serving generator: the checkpoint's
    Qwen2 chat template, its SigLIP processor, batches of 2 with a padded last one) on a SigLIP x
    Qwen2 llava-hf dir with the real Qwen2 tokenizer. Each answer is transformers' greedy
    `generate` of the same prompt on that dir; question 0 is the steered one, ended by <|im_end|>."""
    pytest.importorskip("torch")
    from serve_util import STEER_QUESTION, chat_pixels, make_chat_checkpoint, rand_image
    from transformers import LlavaForConditionalGeneration

    from hf_util import hf_generate
    from llava_jax.serve.generator import ChatGenerator

    d, _, tok = make_chat_checkpoint(tmp_path / "ckpt", backbone="siglip_qwen2")
    rand_image(0).save(tmp_path / "a.png")
    rand_image(1, 30, 60).save(tmp_path / "b.png")
    questions = [{"question_id": 0, "image": "a.png", "text": STEER_QUESTION},
                 {"question_id": 1, "image": "b.png", "text": "Describe the picture."},
                 {"question_id": 2, "image": "a.png", "text": "What color is it?"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = answer_cli.main(["--model", d, "--questions", str(tmp_path / "q.jsonl"), "--image_folder",
                               str(tmp_path), "--out", str(tmp_path / "answers.jsonl"), "--max_new_tokens", "12",
                               "--batch_size", "2"])
    gen = ChatGenerator.from_pretrained(d)
    assert gen.template == "chat_template" and gen.cfg.vision.is_siglip and gen.cfg.text.model_type == "qwen2"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    encs = [gen.encode([answer_cli.question_message(q, tmp_path)]) for q in questions]
    hf = LlavaForConditionalGeneration.from_pretrained(d).eval()
    refs = hf_generate(hf, [e.ids for e in encs], np.concatenate([chat_pixels(gen, e) for e in encs]), 12,
                       eos_token_id=end)
    assert refs[0][-1] == end and len(refs[0]) < 12  # the steered answer ends at the end of turn
    assert [a["text"] for a in answers] == [tok.decode(r, skip_special_tokens=True).strip() for r in refs]
    assert all(a["text"] for a in answers)
