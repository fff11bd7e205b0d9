"""Modern backbones' chat formats with their REAL tokenizers (``../shared/tokenizers``), on real rows.

* The checkpoint's own chat template (``"chat_template"``) and the named templates ``llama3`` /
  ``qwen2`` give the ids of ``tokenizer.apply_chat_template``; labels supervise exactly each
  assistant reply plus its end marker (``<|eot_id|>``, ``<|im_end|>``): decoding the supervised
  tokens of each turn gives that text.
* Train/serve prefix, for every template: the generation prompt the server builds for the first
  turn is a prefix of the training ids of the 2-turn conversation, and supervision starts right
  where the prompt ends.
"""
from __future__ import annotations

import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from llava_jax.data.templates import CHAT_TEMPLATE, IMAGE_TOKEN, TEMPLATES
from llava_jax.data.tokenize import (IGNORE_INDEX, add_llava_special_tokens, end_of_turn_ids, load_tokenizer,
                                     tokenize_conversation)
from test_original_llava import conversation_rows

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
END = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}


def real_tokenizer(name, tmp_path_factory=None):
    d = TOKENIZERS / name
    if not d.is_dir():
        pytest.skip(f"real tokenizers not found at {d} (expects ../shared next to the repo)")
    tok = load_tokenizer(d)
    ids = add_llava_special_tokens(tok, pad_token=None if tok.pad_token else "<pad>")
    return tok, ids.image_token_id


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def modern(request):
    return (request.param, *real_tokenizer(request.param))


def hf_messages(row):
    """The row as apply_chat_template messages: "<image>\\n" in front of the user text."""
    out = []
    for t in row:
        v = t["value"]
        if IMAGE_TOKEN in v:
            v = IMAGE_TOKEN + "\n" + v.replace(IMAGE_TOKEN, "").strip()
        out.append({"role": "user" if t["from"] == "human" else "assistant", "content": v})
    return out


def supervised_runs(labels):
    sup = np.concatenate([[False], labels != IGNORE_INDEX, [False]]).astype(np.int8)
    d = np.diff(sup)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def test_chat_templates_equal_apply_chat_template_and_supervise_each_reply(modern):
    name, tok, image_id = modern
    rows = conversation_rows()
    for i, row in enumerate(rows):
        turns = [(t["from"], t["value"]) for t in row]
        msgs = hf_messages(row)
        want_text = tok.apply_chat_template(msgs, tokenize=False)
        want_ids = list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
        own = tokenize_conversation(tok, CHAT_TEMPLATE, turns, image_id, 1)
        named = tokenize_conversation(tok, name, turns, image_id, 1)
        assert own["text"] == want_text, f"row {i}"
        assert named["text"] == want_text.removeprefix(tok.bos_token or ""), f"row {i}"  # BOS from the tokenizer
        assert own["input_ids"].tolist() == want_ids, f"row {i}"
        assert named["input_ids"].tolist() == want_ids and named["labels"].tolist() == own["labels"].tolist()
        labels = own["labels"]
        assert (labels[labels != IGNORE_INDEX] == own["input_ids"][labels != IGNORE_INDEX]).all()
        replies = [t["value"] for t in row if t["from"] == "gpt"]
        runs = supervised_runs(labels)
        assert len(runs) == len(replies), f"row {i}"
        for (s, e), reply in zip(runs, replies):
            got = tok.decode(own["input_ids"][s:e].tolist(), skip_special_tokens=False)
            assert got == (reply.strip() if name == "llama3" else reply) + END[name], f"row {i}"
    assert len(rows) == 240
    end = tok.convert_tokens_to_ids(END[name])
    assert end_of_turn_ids(tok, CHAT_TEMPLATE) == end_of_turn_ids(tok, name) == [end]


def _serving_generator(tok, image_id, template):
    """The server's prompt builder (ChatGenerator.encode) on a stand-in model config."""
    from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
    from llava_jax.serve.generator import ChatGenerator

    # a real (tiny) config, so every field the generator reads exists: 8 px / patch 4 = 4 image tokens
    cfg = LlavaConfig(vision=VisionConfig(image_size=8, patch_size=4), image_token_id=image_id,
                      text=TextConfig(vocab_size=max(len(tok), image_id + 1), eos_token_id=None))
    return ChatGenerator(types.SimpleNamespace(config=cfg), tok, template=template, engine=object())


def _prefix_cases(tmp_path_factory):
    cases = []
    src = TOKENIZERS / "llama_sp"
    if src.is_dir():
        d = tmp_path_factory.mktemp("llama_sp") / "tok"
        shutil.copytree(src, d)
        cases += [("llama_sp", d, t) for t in sorted(TEMPLATES) if t not in ("llama3", "qwen2")]
    cases += [(n, TOKENIZERS / n, t) for n in ("llama3", "qwen2") if (TOKENIZERS / n).is_dir()
              for t in (n, CHAT_TEMPLATE)]
    return cases


@pytest.mark.parametrize("template", sorted(TEMPLATES) + [CHAT_TEMPLATE])
def test_serving_prompt_is_a_prefix_of_the_training_ids(template, tmp_path_factory):
    from PIL import Image

    cases = [c for c in _prefix_cases(tmp_path_factory) if c[2] == template]
    if not cases:
        pytest.skip(f"no real tokenizer under {TOKENIZERS} for template {template!r}")
    for tok_name, path, _ in cases:
        tok = load_tokenizer(path)
        image_id = add_llava_special_tokens(tok, pad_token=None if tok.pad_token else "<pad>").image_token_id
        gen = _serving_generator(tok, image_id, template)
        image = Image.new("RGB", (8, 8))
        question, answer = "What is in the picture?", "A small black square."
        if template == "plain":  # one exchange, image only
            turns = [("human", IMAGE_TOKEN), ("gpt", answer)]
            messages = [{"role": "user", "content": [{"type": "image", "image": image}]}]
        else:
            turns = [("human", f"{IMAGE_TOKEN}\n{question}"), ("gpt", answer), ("human", "Why?"), ("gpt", "It is.")]
            messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": question}]}]
        train = tokenize_conversation(tok, template, turns, image_id, gen.cfg.num_image_tokens)
        prompt = gen.encode(messages).ids
        assert train["input_ids"][:len(prompt)].tolist() == prompt, (tok_name, template)
        first_supervised = int(np.flatnonzero(train["labels"] != IGNORE_INDEX)[0])
        assert first_supervised == len(prompt), (tok_name, template)
