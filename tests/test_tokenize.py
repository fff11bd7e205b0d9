"""Tokenization + labels: the original LLaVA's segment rule, labels from character offsets.

Checked on real LLaVA data (../shared/llava_reference) for every template, with an offline
LLaMA-style tokenizer (both transformers `legacy` modes) and a Qwen2-style ByteLevel one. The
comparison with the original LLaVA's own code and LLaMA's real tokenizer is
tests/test_original_llava.py.
"""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from llava_jax.data.templates import get_template, render
from llava_jax.data.tokenize import (
    IGNORE_INDEX,
    add_llava_special_tokens,
    expand_image_tokens,
    load_tokenizer,
    supervised_mask,
    tokenize_conversation,
)
from test_templates import SYS_L2, SYS_V1
from tokenizer_util import make_bytelevel_tokenizer, make_llama_tokenizer, segment_ids

REF = Path(__file__).resolve().parents[2] / "shared" / "llava_reference"
N_IMG = 576  # CLIP ViT-L/14 at 336 px


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """name -> (tokenizer, LlavaTokenIds); tokenizers loaded back from disk with load_tokenizer."""
    d = tmp_path_factory.mktemp("tokenizers")
    paths = {
        "llama": make_llama_tokenizer(d),
        "llama_legacy": make_llama_tokenizer(d, legacy=True),
        "bytelevel": make_bytelevel_tokenizer(d),
    }
    out = {}
    for name, path in paths.items():
        tok = load_tokenizer(path)
        out[name] = (tok, add_llava_special_tokens(tok))
    return out


def _jsonl(name):
    p = REF / name
    if not p.is_file():
        pytest.skip(f"LLaVA reference data not found at {p} (expects ../shared/llava_reference next to the repo)")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def reference_conversations():
    """(row name, turns): 90 coco 30x3 rows (image first / last alternating), 90 LLaVA-Bench
    question+GPT-4 answer rows, and 30 three-turn conversations (the 3 questions of each image)."""
    rows = []
    for i, r in enumerate(_jsonl("coco2014_val_gpt4_qa_30x3.jsonl")):
        q = r["instruction"]
        human = f"<image>\n{q}" if i % 2 == 0 else f"{q}\n<image>"
        rows.append((f"coco2014_val_gpt4_qa_30x3.jsonl:{i}", [("human", human), ("gpt", r["output"])]))
    answers = {a["question_id"]: a["text"] for a in _jsonl("qa90_gpt4_answer.jsonl")}
    by_image = defaultdict(list)
    for q in _jsonl("qa90_questions.jsonl"):
        a = answers[q["question_id"]]
        rows.append((f"qa90:{q['question_id']}", [("human", "<image>\n" + q["text"]), ("gpt", a)]))
        by_image[q["image"]].append((q["text"], a))
    for img, qas in sorted(by_image.items()):
        turns = []
        for j, (q, a) in enumerate(qas):
            turns += [("user", ("<image>\n" if j == 0 else "") + q), ("assistant", a)]
        rows.append((f"qa90-multi:{img}", turns))
    return rows


# ----------------------------------------------------------------------------- helpers
def expected_text(name, turns):
    """Hand-written renderings (independent of templates.py)."""

    def place(q):  # LLaVA preprocess_multimodal (one "<image>\n" per image: our n-image extension)
        n = q.count("<image>")
        return ("<image>\n" * n + q.replace("<image>", "").strip()).strip() if n else q

    pairs = [(place(turns[i][1]), turns[i + 1][1]) for i in range(0, len(turns), 2)]
    if name == "vicuna_v1":
        return SYS_V1 + " " + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in pairs)
    if name == "llava_hf":
        return "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in pairs)
    if name == "llama_2":
        (q0, a0), rest = pairs[0], pairs[1:]
        return f"[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\n{q0} [/INST] {a0} </s>" + "".join(
            f"<s>[INST] {q} [/INST] {a} </s>" for q, a in rest
        )
    if name == "chatml":
        return "<|im_start|>system\nAnswer the questions.<|im_end|>" + "".join(
            f"<|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>" for q, a in pairs
        )
    if name == "plain":
        assert len(pairs) == 1
        return "<image>" + pairs[0][1] + "\n"
    raise AssertionError(name)


def runs_of(mask):
    """[start, end) index ranges of the True runs of a boolean array."""
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def collapse_images(ids, image_id, n):
    """Undo the image expansion, asserting every image is exactly n consecutive ids."""
    keep = np.ones(len(ids), dtype=bool)
    for s, e in runs_of(ids == image_id):
        assert (e - s) % n == 0 and e - s > 0, f"image run of {e - s} tokens, expected multiples of {n}"
        for k in range(s, e, n):
            keep[k + 1 : k + n] = False
    return ids[keep]


def decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_conversation(tok, image_id, name, turns, n_img=N_IMG):
    t = get_template(name)
    out = tokenize_conversation(tok, name, turns, image_id, n_img)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape

    text = expected_text(name, turns)
    assert render(name, turns).text == text

    # input ids (before expansion) == the original's tokenizer_image_token rule made with this
    # tokenizer's own calls: each segment between images tokenized alone, BOS on the first only
    assert collapse_images(ids, image_id, n_img).tolist() == segment_ids(tok, text, image_id)

    # image expansion: exactly num_image_tokens ids per image, never supervised
    n_images = text.count("<image>")
    assert out["num_images"] == n_images
    assert int((ids == image_id).sum()) == n_images * n_img
    assert (labels[ids == image_id] == IGNORE_INDEX).all()

    # supervised tokens: labels equal ids, one run per reply, decoding to reply + end separator
    sup = labels != IGNORE_INDEX
    assert (labels[sup] == ids[sup]).all()
    replies = [x for r, x in turns if r in ("gpt", "assistant")]
    runs = runs_of(sup)
    assert len(runs) == len(replies)
    for (s, e), reply in zip(runs, replies):
        want = reply + t.reply_suffix
        got = decode(tok, ids[s:e])
        assert got in (want, t.reply_prefix + want), (got, want)

    # every token after each generation prompt up to the end of its reply is supervised, and
    # the generation prompt is a prefix of the training sequence (what inference sees)
    for k, (s, e) in enumerate(runs):
        gen = tokenize_conversation(tok, name, turns[: 2 * k + 1], image_id, n_img, add_generation_prompt=True)
        g = gen["input_ids"]
        assert ids[: len(g)].tolist() == g.tolist()
        assert s == len(g), (decode(tok, ids[s:e]), decode(tok, g[-3:]))
    return out


# ----------------------------------------------------------------------------- reference rows
CASES = [
    ("vicuna_v1", "llama"),
    ("vicuna_v1", "llama_legacy"),
    ("plain", "llama"),
    ("plain", "llama_legacy"),
    ("llama_2", "llama"),
    ("llama_2", "llama_legacy"),
    ("llava_hf", "llama"),
    ("llava_hf", "llama_legacy"),
    ("chatml", "bytelevel"),
]


@pytest.mark.parametrize("template,tokname", CASES)
def test_reference_rows(toks, template, tokname):
    tok, ids = toks[tokname]
    rows = reference_conversations()
    if get_template(template).max_exchanges == 1:
        rows = [r for r in rows if len(r[1]) == 2]
    checked = 0
    for row, turns in rows:
        try:
            check_conversation(tok, ids.image_token_id, template, turns)
        except AssertionError as e:
            raise AssertionError(f"{template}/{tokname} row {row}: {e}") from e
        checked += 1
    assert checked == (180 if template == "plain" else 210)


# ----------------------------------------------------------------------------- hard cases
HARD = [
    # reply beginning with an emoji (byte fallback: lone "▁" then 4 byte tokens), accents
    [("human", "<image>\nWhat is this?"), ("gpt", "😀 A cat."), ("human", "Where?"), ("gpt", "Über den Tisch.")],
    # replies without a final period / with trailing space / CJK / newlines inside
    [("human", "Q?\n<image>"), ("gpt", "yes"), ("human", "and?"), ("gpt", "猫が います\nline two "),
     ("human", "ok"), ("gpt", "1,000 $19.99 (1) [2] {3}")],
    # a reply quoting the chat format itself
    [("human", "<image>\nShow a chat."), ("gpt", "It says USER: hi ASSISTANT: yo"), ("human", "More"), ("gpt", "there")],
    # text-only multi-turn
    [("human", "Hi"), ("gpt", "Hello!"), ("human", "Bye"), ("gpt", "Bye.")],
]


@pytest.mark.parametrize("template,tokname", CASES)
@pytest.mark.parametrize("k", range(len(HARD)))
def test_hard_conversations(toks, template, tokname, k):
    turns = HARD[k]
    if template == "plain":
        turns = [("human", "<image>"), turns[1]]
    tok, ids = toks[tokname]
    check_conversation(tok, ids.image_token_id, template, turns, n_img=3)


# ----------------------------------------------------------------------------- units / API
def test_supervised_mask_boundaries():
    # tokens: BOS (post-processor, empty), "ab" [0,2), " c" [2,4), zero-width [4,4) inside the
    # span, "de" [4,6) straddling its end, "f" [6,7) outside
    offsets = [(0, 0), (0, 2), (2, 4), (4, 4), (4, 6), (6, 7)]
    special = [1, 0, 0, 0, 0, 0]
    m = supervised_mask(offsets, [(3, 5)], special)
    assert m.tolist() == [False, False, True, True, True, False]
    # a BOS at (0, 0) is never supervised even when a span starts at 0
    assert supervised_mask(offsets, [(0, 1)], special).tolist() == [False, True, False, False, False, False]
    assert supervised_mask(offsets, [], special).tolist() == [False] * 6


def test_add_llava_special_tokens(toks, tmp_path):
    path = make_llama_tokenizer(tmp_path, vocab_size=800)
    tok = load_tokenizer(path)
    assert len(tok) == 800 and tok.pad_token is None
    got = add_llava_special_tokens(tok)
    # llava-hf layout: <image> = old vocab size (32000 for LLaMA), <pad> right after it
    assert got == (800, 801) and got.image_token_id == 800 and got.pad_token_id == 801
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 801
    assert add_llava_special_tokens(tok) == got  # idempotent
    assert tok("x<image>y <image>\n<pad>", add_special_tokens=False).input_ids.count(800) == 2
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.convert_tokens_to_ids(["<image>", "<pad>"]) == [800, 801] and again.pad_token == "<pad>"
    # helper variant with the tokens already added
    pre = load_tokenizer(make_llama_tokenizer(tmp_path, llava_tokens=True))
    assert add_llava_special_tokens(pre) == (800, 801)
    # ByteLevel/Qwen tokenizer: keep its own pad token when asked
    bl = load_tokenizer(make_bytelevel_tokenizer(tmp_path))
    ids = add_llava_special_tokens(bl, pad_token=None)
    assert ids.pad_token_id == bl.convert_tokens_to_ids("<|endoftext|>")


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path / "missing")

    class Slow:
        is_fast = False

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Slow())
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        load_tokenizer(tmp_path)


def test_image_token_must_be_special(tmp_path):
    tok = load_tokenizer(make_llama_tokenizer(tmp_path))
    turns = [("human", "<image>\nQ"), ("gpt", "A")]
    with pytest.raises(ValueError, match="add_llava_special_tokens"):
        tokenize_conversation(tok, "vicuna_v1", turns, image_token_id=len(tok), num_image_tokens=4)
    ids = add_llava_special_tokens(tok)
    with pytest.raises(ValueError, match="add_llava_special_tokens"):  # wrong id
        tokenize_conversation(tok, "vicuna_v1", turns, image_token_id=ids.pad_token_id, num_image_tokens=4)
    with pytest.raises(ValueError, match="num_image_tokens"):
        tokenize_conversation(tok, "vicuna_v1", turns, image_token_id=ids.image_token_id, num_image_tokens=0)


def test_multiple_images_and_expansion(toks):
    tok, ids = toks["llama"]
    img = ids.image_token_id
    turns = [("human", "<image> and <image>\ncompare"), ("gpt", "Same."), ("human", "<image>\nthird"), ("gpt", "Other.")]
    out = check_conversation(tok, img, "vicuna_v1", turns, n_img=5)
    assert out["num_images"] == 3
    assert [e - s for s, e in runs_of(out["input_ids"] == img)] == [5, 5, 5]  # "<image>\n<image>\n..."
    # expand_image_tokens on its own
    e_ids, e_lab = expand_image_tokens(np.array([1, img, 7, img], np.int32), np.array([-100, -100, 7, -100], np.int32), img, 3)
    assert e_ids.tolist() == [1, img, img, img, 7, img, img, img]
    assert e_lab.tolist() == [-100, -100, -100, -100, 7, -100, -100, -100]


def test_max_length(toks):
    tok, ids = toks["llama"]
    img = ids.image_token_id
    turns = [("human", "<image>\nDescribe."), ("gpt", "A long answer about the picture " * 4)]
    full = tokenize_conversation(tok, "vicuna_v1", turns, img, 8)
    n = len(full["input_ids"])
    cut = tokenize_conversation(tok, "vicuna_v1", turns, img, 8, max_length=n - 5)
    assert cut["input_ids"].tolist() == full["input_ids"][: n - 5].tolist()
    assert cut["labels"].tolist() == full["labels"][: n - 5].tolist()
    assert cut["num_images"] == 1
    same = tokenize_conversation(tok, "vicuna_v1", turns, img, 8, max_length=n + 10)
    assert len(same["input_ids"]) == n
    last_img = int(np.flatnonzero(full["input_ids"] == img)[-1])
    with pytest.raises(ValueError, match="cut image tokens"):
        tokenize_conversation(tok, "vicuna_v1", turns, img, 8, max_length=last_img)


def test_generation_prompt_ids(toks):
    tok, ids = toks["llama"]
    out = tokenize_conversation(tok, "vicuna_v1", [("human", "<image>\nWhat?")], ids.image_token_id, 4,
                                add_generation_prompt=True)
    assert (out["labels"] == IGNORE_INDEX).all() and out["num_images"] == 1
    assert decode(tok, out["input_ids"][-3:]).endswith("ASSISTANT:")
    assert out["input_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize("split", [True, False])
def test_small_tokenizer_keeps_punctuation_out_of_words(tmp_path, split):
    """A small BPE trained on question-heavy text learns "circle?" as one piece unless
    punctuation is split off while training; with the split the word keeps one id in every
    template, and the saved tokenizer (plain LLaMA pipeline at load time) still encodes it so."""
    from transformers import AutoTokenizer

    from llava_jax.data.tokenizer_build import build_llama_tokenizer

    texts = ["What color is the circle?", "Which color does the circle have?", "Where is the red circle?"] * 300
    build_llama_tokenizer(texts, tmp_path / "tok", vocab_size=300, split_punctuation=split)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    pieces = tok.tokenize("What color is the circle?")
    if split:
        assert pieces[-2:] == ["▁circle", "?"], pieces
        assert tok.decode(tok("Is it a circle? Yes.")["input_ids"], skip_special_tokens=True) == "Is it a circle? Yes."
    else:
        assert "▁circle?" in pieces, pieces
