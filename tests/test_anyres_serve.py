"""Serving a LLaVA-NeXT (AnyRes) checkpoint: multi-image requests through the ChatGenerator and the
engine's buckets give transformers' `LlavaNextForConditionalGeneration` greedy tokens; a request's
tokens do not depend on its batch-mates (prefill and continuous-batching join); 50 requests of
random image sizes compile a bounded number of programs; the OpenAI-compatible server takes
several image_url parts; the eval answer path answers through the same generator."""
import base64
import json
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from serve_util import IMAGE_SIZE, hf_processor, make_chat_checkpoint, png_bytes, rand_image  # noqa: E402

from llava_jax.data import anyres  # noqa: E402
from llava_jax.serve.engine import IMAGE_BUCKETS, PROMPT_BUCKETS, Engine, Request, SamplingParams, bucket  # noqa: E402
from llava_jax.serve.generator import ChatGenerator, Completion  # noqa: E402

S = IMAGE_SIZE
PATCH = 7  # 4 x 4 patches per tile: 16 base tokens, up to 88 per image
PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]  # llava-v1.6's, scaled from 336
NEW = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d, hf, tok = make_chat_checkpoint(tmp_path_factory.mktemp("llava_next"), pinpoints=PINPOINTS, patch_size=PATCH)
    gen = ChatGenerator.from_pretrained(d, chunk_size=4, name="tiny-llava-next")
    assert gen.cfg.is_anyres and gen.cfg.max_tiles == 4
    return d, gen, hf, tok


def _message(images, text="Compare the pictures."):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images] +
             [{"type": "text", "text": text}]}]


def _tokens(gen, encs, max_new=NEW):
    """Greedy ids of encoded prompts run as ONE engine batch (no EOS: the full max_new)."""
    reqs = [Request(e.ids, e.images, SamplingParams(max_new_tokens=max_new), e.image_index) for e in encs]
    out = [[] for _ in encs]
    for step in gen.engine.stream(reqs):
        for i, t in enumerate(step.new_tokens):
            out[i].extend(t)
    return out


def _hf_greedy(hf, tok, enc, images, new=NEW):
    """transformers' LlavaNext greedy continuation of our prompt ids, with LlavaNextImageProcessor's pixels."""
    kw = {}
    if images:
        px = hf_processor(tok, pinpoints=PINPOINTS, patch_size=PATCH).image_processor(images=images, return_tensors="pt")
        kw = dict(pixel_values=px["pixel_values"], image_sizes=px["image_sizes"])
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([enc.ids]), attention_mask=torch.ones(1, len(enc.ids), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id, **kw)
    return out[0, len(enc.ids):].tolist()


def _reply(gen, tok, ids):
    """The text a reply of `ids` shows: up to the first stop id, detokenised."""
    k = next((i for i, t in enumerate(ids) if t in gen.eos_ids), len(ids))
    return tok.decode(ids[:k], skip_special_tokens=True)


# two images of different aspect ratios (a 1x2 and a 3x1 grid, both unpadded on one side)
TWO = [rand_image(1, w=91, h=37), rand_image(2, w=23, h=70)]


def test_two_images_greedy_equals_llava_next_generate(setup):
    _, gen, hf, tok = setup
    enc = gen.encode(_message(TWO))
    counts = [anyres.num_image_tokens(im.height, im.width, gen.cfg) for im in TWO]
    assert counts[0] != counts[1] and enc.images.shape == (2, 5, S, S, 3)
    proc = hf_processor(tok, pinpoints=PINPOINTS, patch_size=PATCH)
    ref_enc = proc(text=enc.text, images=TWO, return_tensors="pt")  # LlavaNextProcessor's expansion
    image_id = gen.cfg.image_token_id
    assert enc.ids.count(image_id) == sum(counts) == int((ref_enc["input_ids"] == image_id).sum())
    ref = _hf_greedy(hf, tok, enc, TWO)
    assert _tokens(gen, [enc]) == [ref]
    # the chat path (template EOS ids, detokenisation) says the same
    assert gen.chat(_message(TWO), SamplingParams(max_new_tokens=NEW)).text == _reply(gen, tok, ref)


def test_alone_equals_in_a_batch_and_joining(setup):
    _, gen, _, _ = setup
    target = gen.encode(_message(TWO))
    others = [gen.encode(_message([rand_image(3, w=60, h=60)], "What is it?")),
              gen.encode([{"role": "user", "content": "Hello there"}]),
              gen.encode(_message([rand_image(4, w=20, h=80), rand_image(5, w=84, h=30), rand_image(6, w=33, h=33)]))]
    alone = _tokens(gen, [target])[0]
    assert _tokens(gen, [others[0], target, others[1], others[2]])[1] == alone  # batch of 4, 3 image slots bucketed to 4
    # continuous batching: the request joins a running batch between decode chunks (the batch has
    # the shapes of the one above, so only the join compiles)
    mk = lambda e: Request(e.ids, e.images, SamplingParams(max_new_tokens=NEW), e.image_index)  # noqa: E731
    batch = gen.engine.open([mk(others[2]), mk(others[1])], slots=4)
    got, joined = [], None
    while batch.running:
        out = batch.step()
        if joined is not None and joined in out:
            got += out[joined][0]
        if joined is None and batch.can_join(mk(target)):
            joined = batch.join([mk(target)])[0]
    assert joined is not None and got == alone


def test_fifty_random_sizes_compile_a_bounded_number_of_programs(setup):
    """50 requests, 0-3 images of random sizes each, one at a time: one prefill program per
    (prompt, image-slot) bucket and one decode program per cache-length bucket that occurs,
    counted by the engine's trace counter and jit's own cache. (Batching multiplies the keys by
    the batch buckets and nothing else; the batch tests above run mixed sizes in one batch.)"""
    _, served, _, _ = setup
    eng = Engine(served.model, chunk_size=4)  # a fresh engine: its counters start at zero
    gen = ChatGenerator(served.model, served.tokenizer, engine=eng)
    rng = random.Random(0)
    sizes, prefill_keys, decode_keys = set(), set(), set()
    reqs = []
    for i in range(50):
        n = rng.randint(0, 3)
        ims = [rand_image(100 + 10 * i + j, w=rng.randint(8, 300), h=rng.randint(8, 300)) for j in range(n)]
        sizes.update(im.size for im in ims)
        reqs.append(gen.encode(_message(ims, "Describe." if n else "Say something.")))
    for e in reqs:
        c = gen.run([Completion(e, SamplingParams(max_new_tokens=2))])[0]
        assert c.error is None and c.completion_tokens > 0
        p = bucket(len(e.ids), PROMPT_BUCKETS)
        m = 0 if e.images is None else len(e.images)
        prefill_keys.add((p, bucket(m, IMAGE_BUCKETS) if m else 0))
        decode_keys.add(p)
    traces = dict(eng.traces)
    assert traces["prefill"] == len(prefill_keys) == eng.prefill._cache_size()
    assert traces["decode"] == len(decode_keys) == eng.decode_chunk._cache_size()
    # the bound: the buckets these requests can reach (prompts up to 3 of the largest images;
    # image slots: none, 1, 2, 4), a prefill and a decode program for each
    prompts = [p for p in PROMPT_BUCKETS if p <= bucket(3 * anyres.max_image_tokens(gen.cfg) + 64)]
    slots = 1 + len([m for m in IMAGE_BUCKETS if m <= bucket(3, IMAGE_BUCKETS)])
    bound = len(prompts) * slots + len(prompts)
    total = traces["prefill"] + traces["decode"]
    print(f"50 requests, {len(sizes)} image sizes: {traces['prefill']} prefill + {traces['decode']} decode = "
          f"{total} compiled programs (bound {bound})")
    assert len(sizes) > 60 and total <= bound


def test_openai_server_several_image_urls(setup):
    openai = pytest.importorskip("openai")
    from serve_util import serving

    _, gen, _, _ = setup
    url = lambda im: "data:image/png;base64," + base64.b64encode(png_bytes(im)).decode()  # noqa: E731
    content = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": url(TWO[0])}},
               {"type": "image_url", "image_url": {"url": url(TWO[1])}}, {"type": "text", "text": "the pictures."}]
    with serving(gen) as srv:
        host, port = srv.server_address[:2]
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tiny-llava-next", messages=[{"role": "user", "content": content}],
                                           max_tokens=8, temperature=0)
    direct = gen.chat([{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": TWO[0]},
                                                    {"type": "image", "image": TWO[1]},
                                                    {"type": "text", "text": "the pictures."}]}],
                      SamplingParams(max_new_tokens=8))
    assert r.choices[0].message.content == direct.text and direct.completion_tokens > 0
    assert r.usage.prompt_tokens == direct.prompt_tokens
    counts = sum(anyres.num_image_tokens(im.height, im.width, gen.cfg) for im in TWO)
    assert direct.encoded.ids.count(gen.cfg.image_token_id) == counts


# two images of different aspect ratios, as a question file lists them (LLaVA-NeXT's multi-image
# rows: `image` is a list), without and with `<image>` placeholders in the text
TWO_QUESTIONS = [{"question_id": "front", "image": ["a.png", "b.png"], "text": "Compare the pictures."},
                 {"question_id": "placed", "image": ["a.png", "b.png"],
                  "text": "Look at this:\n<image>\nand this one:\n<image>\nWhich is wider?"}]


def _save_two(folder):
    TWO[0].save(folder / "a.png")  # PNG: the same pixels come back
    TWO[1].save(folder / "b.png")


def test_eval_two_image_questions_equal_llava_next_generate(setup, tmp_path):
    """A question with a list of images (different aspect ratios) answered by eval.answer =
    transformers' LlavaNext greedy generate on the checkpoint's ids and LlavaNextImageProcessor's
    pixels; with `<image>` placeholders, image k is the k-th placeholder and the prompt is the
    one the training pipeline renders for that human turn (the template puts the images first)."""
    from llava_jax.data.templates import render
    from llava_jax.eval.answer import answer_questions, question_message

    _, gen, hf, tok = setup
    _save_two(tmp_path)
    answers = answer_questions(None, None, TWO_QUESTIONS, tmp_path, generator=gen, batch_size=2, max_new_tokens=NEW)
    for q, a in zip(TWO_QUESTIONS, answers):
        msg = question_message(q, tmp_path)
        images = [p["image"] for p in msg["content"] if p["type"] == "image"]
        assert [im.size for im in images] == [im.size for im in TWO]
        enc = gen.encode([msg])
        assert enc.images.shape == (2, 5, S, S, 3)
        assert a["text"] == _reply(gen, tok, _hf_greedy(hf, tok, enc, images)).strip()
    placed = gen.encode([question_message(TWO_QUESTIONS[1], tmp_path)])
    assert placed.text == render(gen.template, [("human", TWO_QUESTIONS[1]["text"])], add_generation_prompt=True).text
    assert "this:\n\nand this one:\n\nWhich" in placed.text  # the text between the images kept as written
    with pytest.raises(ValueError, match="question 9: the text has 2 <image> but there are 1 images"):
        question_message({"question_id": 9, "image": ["a.png"], "text": "<image> and <image>?"}, tmp_path)


@pytest.fixture(scope="module")
def lmms(setup):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional: pip install -e '.[lmms]')")
    from llava_jax.eval.lmms import LlavaJax

    return LlavaJax(pretrained=str(setup[0]), batch_size=2)


def test_lmms_generate_until_two_visuals_equals_eval_answer(lmms, tmp_path):
    """The lmms-eval plugin's generate_until with two visuals per request (one context without
    `<image>`, one with two) = eval.answer's answers to the same questions."""
    from lmms_eval.api.instance import Instance

    from llava_jax.eval.answer import answer_questions

    _save_two(tmp_path)
    lmms.task_dict = {"t": {"test": [{"q": q} for q in TWO_QUESTIONS]}}
    reqs = [Instance("generate_until", (q["text"], {"max_new_tokens": NEW, "until": []}, lambda d: list(TWO),
                                        i, "t", "test"), idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
            for i, q in enumerate(TWO_QUESTIONS)]
    got = lmms.generate_until(reqs)
    want = answer_questions(None, None, TWO_QUESTIONS, tmp_path, generator=lmms.gen, batch_size=2,
                            max_new_tokens=NEW)
    assert [g.strip() for g in got] == [a["text"] for a in want]
    assert any(got)  # (not all empty replies)


def test_eval_answers_through_the_generator(setup, tmp_path):
    from llava_jax.eval.answer import answer_questions

    _, gen, hf, tok = setup
    for i, (w, h) in enumerate([(91, 37), (30, 84), (50, 50)]):
        rand_image(20 + i, w=w, h=h).save(tmp_path / f"{i}.png")
    questions = [{"question_id": i, "image": f"{i}.png", "text": "What is shown?"} for i in range(3)]
    questions.append({"question_id": 3, "text": "Say hello."})
    answers = answer_questions(None, None, questions, tmp_path, generator=gen, batch_size=4, max_new_tokens=6,
                               out_path=tmp_path / "answers.jsonl")
    from llava_jax.eval.answer import question_message

    for q, a in zip(questions, answers):  # one batch of mixed sizes; each answer is transformers' alone
        msg = question_message(q, tmp_path)
        images = [p["image"] for p in msg["content"] if p["type"] == "image"]
        assert a["text"] == _reply(gen, tok, _hf_greedy(hf, tok, gen.encode([msg]), images, 6)).strip()
    assert sum(bool(a["text"]) for a in answers) >= 2  # (not all empty replies)
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3]


def test_lmms_loglikelihood_takes_anyres_tiles(setup, lmms):
    """The lmms-eval plugin's scoring path (`LlavaJax._logprobs`) on a two-image AnyRes prompt and
    its reply = transformers' LlavaNext log-probs on the same ids."""
    _, _, hf, tok = setup
    lm = lmms
    prompt, full, _, cont = lm._continuation_ids(_message(TWO), "Two pictures.")
    assert cont and prompt.image_index is not None
    got = lm._logprobs(np.asarray(full, np.int32), prompt.images, prompt.image_index)[:len(full)]
    px = hf_processor(tok, pinpoints=PINPOINTS, patch_size=PATCH).image_processor(images=TWO, return_tensors="pt")
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([full]), pixel_values=px["pixel_values"],
                    image_sizes=px["image_sizes"]).logits[0].float()
    np.testing.assert_allclose(got, torch.log_softmax(logits, -1).numpy(), atol=2e-4)
