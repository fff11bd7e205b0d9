"""Rendered prompts must equal what the original LLaVA renders (hand-written expected strings)."""

import pytest

from llava_jax.data.templates import (
    TEMPLATES,
    Template,
    get_template,
    render,
)

SYS_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
SYS_L2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)


def spans_text(r):
    return [r.text[s:e] for s, e in r.reply_spans]


def test_registry_and_errors():
    assert set(TEMPLATES) == {"vicuna_v1", "llava_v1", "plain", "llama_2", "chatml", "llava_hf", "llama3", "qwen2"}
    assert get_template("v1") is TEMPLATES["vicuna_v1"]
    assert get_template("llava_llama_2") is TEMPLATES["llama_2"]
    t = TEMPLATES["chatml"]
    assert get_template(t) is t and isinstance(t, Template)
    with pytest.raises(KeyError, match="known: chatml, llama3, llama_2, llava_hf, llava_v1, plain, qwen2, vicuna_v1"):
        get_template("vicuna_v9")


# ----------------------------------------------------------------------------- vicuna_v1
def test_vicuna_v1_single_image_first():
    r = render("vicuna_v1", [("human", "<image>\nWhat is this?"), ("gpt", "A cat.")])
    assert r.text == SYS_V1 + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
    assert spans_text(r) == ["A cat.</s>"]


def test_vicuna_v1_image_last_moved_to_front():
    r = render("vicuna_v1", [("human", "What is this?\n<image>"), ("gpt", "A cat.")])
    assert r.text == SYS_V1 + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
    # image in the middle: removed, rest stripped, put in front (inner whitespace kept)
    r = render("vicuna_v1", [("human", "  Look <image> here "), ("gpt", "ok")])
    assert r.text == SYS_V1 + " USER: <image>\nLook  here ASSISTANT: ok</s>"
    # image only: the original strips the result, so no newline
    r = render("vicuna_v1", [("human", "<image>"), ("gpt", "ok")])
    assert r.text == SYS_V1 + " USER: <image> ASSISTANT: ok</s>"


def test_vicuna_v1_multi_turn_and_aliases():
    turns = [
        {"from": "human", "value": "<image>\nQ1?"},
        {"from": "gpt", "value": "A1."},
        {"role": "user", "content": "Q2?"},
        {"role": "assistant", "content": "A2."},
    ]
    r = render("vicuna_v1", turns)
    assert r.text == SYS_V1 + " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"
    assert spans_text(r) == ["A1.</s>", "A2.</s>"]
    r2 = render("vicuna_v1", [("Human", "<image>\nQ1?"), ("GPT", "A1."), ("USER", "Q2?"), ("Assistant", "A2.")])
    assert r2 == r


def test_vicuna_v1_text_only_and_generation():
    r = render("vicuna_v1", [("human", "Tell me a joke."), ("gpt", "No.")])
    assert r.text == SYS_V1 + " USER: Tell me a joke. ASSISTANT: No.</s>"
    g = render("vicuna_v1", [("human", "<image>\nWhat is this?")], add_generation_prompt=True)
    assert g.text == SYS_V1 + " USER: <image>\nWhat is this? ASSISTANT:"
    assert g.reply_spans == []
    g = render("vicuna_v1", [("human", "Q1"), ("gpt", "A1"), ("human", "Q2")], add_generation_prompt=True)
    assert g.text == SYS_V1 + " USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert spans_text(g) == ["A1</s>"]


def test_system_override():
    r = render("vicuna_v1", [("system", "Be brief."), ("human", "Q"), ("gpt", "A")])
    assert r.text == "Be brief. USER: Q ASSISTANT: A</s>"
    r = render("vicuna_v1", [("system", ""), ("human", "Q"), ("gpt", "A")])
    assert r.text == "USER: Q ASSISTANT: A</s>"
    with pytest.raises(ValueError, match="no system prompt"):
        render("plain", [("system", "x"), ("human", "<image>"), ("gpt", "c")])


# ----------------------------------------------------------------------------- plain
def test_plain():
    r = render("plain", [("human", "<image>\nDescribe the image briefly."), ("gpt", "A dog on grass.")])
    assert r.text == "<image>A dog on grass.\n"
    assert spans_text(r) == ["A dog on grass.\n"]
    assert r.reply_spans == [(7, len(r.text))]
    r = render("plain", [("human", "Render this: <image>"), ("gpt", "cap")])
    assert r.text == "<image>cap\n"
    g = render("plain", [("human", "<image>")], add_generation_prompt=True)
    assert g.text == "<image>" and g.reply_spans == []
    with pytest.raises(ValueError, match="needs '<image>'"):
        render("plain", [("human", "no image"), ("gpt", "cap")])
    with pytest.raises(ValueError, match="at most 1"):
        render("plain", [("human", "<image>"), ("gpt", "a"), ("human", "b"), ("gpt", "c")])


# ----------------------------------------------------------------------------- llama_2
def test_llama_2():
    r = render("llama_2", [("human", "<image>\nQ1?"), ("gpt", "A1.")])
    assert r.text == f"[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\n<image>\nQ1? [/INST] A1. </s>"
    assert spans_text(r) == ["A1. </s>"]
    r = render("llama_2", [("human", "Q1?\n<image>"), ("gpt", "A1."), ("human", "Q2?"), ("gpt", "A2.")])
    assert r.text == (
        f"[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\n<image>\nQ1? [/INST] A1. </s>"
        "<s>[INST] Q2? [/INST] A2. </s>"
    )
    assert spans_text(r) == ["A1. </s>", "A2. </s>"]
    g = render("llama_2", [("human", "Q1?"), ("gpt", "A1."), ("human", "Q2?")], add_generation_prompt=True)
    assert g.text == f"[INST] <<SYS>>\n{SYS_L2}\n<</SYS>>\n\nQ1? [/INST] A1. </s><s>[INST] Q2? [/INST]"
    # empty system: wrap_sys renders nothing
    r = render("llama_2", [("system", ""), ("human", "Q"), ("gpt", "A")])
    assert r.text == "[INST] Q [/INST] A </s>"


# ----------------------------------------------------------------------------- chatml
def test_chatml():
    r = render("chatml", [("human", "<image>\nQ1?"), ("gpt", "A1."), ("human", "Q2?"), ("gpt", "A2.")])
    assert r.text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nQ1?<|im_end|><|im_start|>assistant\nA1.<|im_end|>"
        "<|im_start|>user\nQ2?<|im_end|><|im_start|>assistant\nA2.<|im_end|>"
    )
    assert spans_text(r) == ["A1.<|im_end|>", "A2.<|im_end|>"]
    g = render("chatml", [("user", "Q?\n<image>")], add_generation_prompt=True)
    assert g.text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nQ?<|im_end|><|im_start|>assistant\n"
    )
    r = render("chatml", [("system", "Sys."), ("user", "hi"), ("assistant", "yo")])
    assert r.text == "<|im_start|>system\nSys.<|im_end|><|im_start|>user\nhi<|im_end|><|im_start|>assistant\nyo<|im_end|>"


# ----------------------------------------------------------------------------- llava_hf
def test_llava_hf():
    r = render("llava_hf", [("human", "<image>\nQ1?"), ("gpt", "A1."), ("human", "Q2?"), ("gpt", "A2.")])
    assert r.text == "USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"
    assert spans_text(r) == ["A1.</s>", "A2.</s>"]
    g = render("llava_hf", [("human", "<image>\nQ1?"), ("gpt", "A1."), ("human", "Q2?")], add_generation_prompt=True)
    assert g.text == "USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT:"
    g = render("llava_hf", [("human", "What is shown?\n<image>")], add_generation_prompt=True)
    assert g.text == "USER: <image>\nWhat is shown? ASSISTANT:"
    r = render("llava_hf", [("human", "Text only."), ("gpt", "Sure.")])
    assert r.text == "USER: Text only. ASSISTANT: Sure.</s>"


# ----------------------------------------------------------------------------- spans / validation
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_spans_are_replies_plus_separator(name):
    t = TEMPLATES[name]
    replies = ["First reply, with {braces} and ünïcode 😀.", "Second."]
    turns = [("human", "<image>\nQ {x}"), ("gpt", replies[0])]
    if t.max_exchanges is None:
        turns += [("human", "again"), ("gpt", replies[1])]
    else:
        replies = replies[:1]
    r = render(name, turns)
    assert spans_text(r) == [a + t.reply_suffix for a in replies]
    # spans are ordered, disjoint, and the last one ends the text (but for the template's
    # unsupervised end of turn)
    ends = [e for _, e in r.reply_spans]
    starts = [s for s, _ in r.reply_spans]
    assert all(e <= s for e, s in zip(ends[:-1], starts[1:]))
    assert ends[-1] == len(r.text) - len(t.turn_end)


@pytest.mark.parametrize(
    "turns, match",
    [
        ([], "empty conversation"),
        ([("gpt", "A")], "expected a human turn"),
        ([("human", "Q"), ("human", "Q2"), ("gpt", "A")], "expected a gpt turn"),
        ([("human", "Q"), ("gpt", "A"), ("gpt", "B")], "expected a human turn"),
        ([("human", "Q")], "ends with a human turn"),
        ([("bot", "Q"), ("gpt", "A")], "unknown role"),
        ([("human", "Q"), ("gpt", "  ")], "empty gpt text"),
        ([("human", ""), ("gpt", "A")], "empty human text"),
        ([("human", "Q"), ("gpt", "see <image>")], "inside an assistant reply"),
        ([("human", "Q"), ("system", "S"), ("gpt", "A")], "only allowed as the first"),
        ([("human", None), ("gpt", "A")], "must be a string"),
        (["oops"], "expected a \\(role, text\\) pair"),
    ],
)
def test_bad_conversations(turns, match):
    with pytest.raises(ValueError, match=match):
        render("vicuna_v1", turns)


def test_generation_prompt_needs_human_last():
    with pytest.raises(ValueError, match="ends with a human turn"):
        render("vicuna_v1", [("human", "Q"), ("gpt", "A")], add_generation_prompt=True)
