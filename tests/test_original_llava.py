"""Token ids and labels equal the ORIGINAL LLaVA's, with LLaMA's real tokenizer, on real rows.

The reference is the original's own code (PyPI ``llava-torch==1.2.2.post1``, identical to
haotian-liu/LLaVA's last commit for ``train.py``, ``mm_utils.py``, ``conversation.py``) run under
its pinned tokenizer stack in a subprocess (``tests/original_llava.py``), with the real 32000-piece
SentencePiece tokenizer of LLaMA / Vicuna v1.5 (``../shared/tokenizers/llama_sp``) in each of the
three ``legacy`` settings a checkpoint can have, on the real rows of ``../shared/llava_reference``
(401 COCO captions as stage-1 ``plain`` rows; 240 conversations). Rows llava-jax treats differently
on purpose are checked against the original too (``test_deliberate_differences``).
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from llava_jax.data.tokenize import IGNORE_INDEX, add_llava_special_tokens, load_tokenizer, tokenize_conversation
from original_llava import run_original

SHARED = Path(__file__).resolve().parents[2] / "shared"
ORIGINAL_IMAGE = -200  # the original's IMAGE_TOKEN_INDEX


def _jsonl(name):
    p = SHARED / "llava_reference" / name
    if not p.is_file():
        pytest.skip(f"LLaVA reference data not found at {p} (expects ../shared next to the repo)")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def caption_rows():
    """401 stage-1 rows: every caption of caps_boxes_coco2014_val_80 after an image."""
    return [[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": c}]
            for r in _jsonl("caps_boxes_coco2014_val_80.jsonl") for c in r["captions"]]


def conversation_rows():
    """240 rows: the 90 coco 30x3 Q&As (image before / after the question, alternating), the 90
    LLaVA-Bench questions with GPT-4's answers, and per image one 3-turn conversation of each."""
    rows, by_image = [], [defaultdict(list), defaultdict(list)]
    for i, r in enumerate(_jsonl("coco2014_val_gpt4_qa_30x3.jsonl")):
        q = r["instruction"]
        rows.append([{"from": "human", "value": f"<image>\n{q}" if i % 2 == 0 else f"{q}\n<image>"},
                     {"from": "gpt", "value": r["output"]}])
        by_image[0][r["image"]].append((q, r["output"]))
    answers = {a["question_id"]: a["text"] for a in _jsonl("qa90_gpt4_answer.jsonl")}
    for q in _jsonl("qa90_questions.jsonl"):
        a = answers[q["question_id"]]
        rows.append([{"from": "human", "value": "<image>\n" + q["text"]}, {"from": "gpt", "value": a}])
        by_image[1][q["image"]].append((q["text"], a))
    for groups in by_image:
        for _, qas in sorted(groups.items()):
            turns = []
            for j, (q, a) in enumerate(qas):
                turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
            rows.append(turns)
    return rows


@pytest.fixture(scope="module", params=["legacy_true", "legacy_false", "legacy_absent"])
def llama(request, tmp_path_factory):
    """(tokenizer dir, llava-jax tokenizer with <image>/<pad> added, image id) for one setting."""
    src = SHARED / "tokenizers" / "llama_sp"
    if not src.is_dir():
        pytest.skip(f"real tokenizers not found at {src} (expects ../shared next to the repo)")
    d = tmp_path_factory.mktemp(request.param) / "llama_sp"
    shutil.copytree(src, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("legacy", None)
    if request.param != "legacy_absent":
        cfg["legacy"] = request.param == "legacy_true"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    return d, tok, add_llava_special_tokens(tok).image_token_id


def ours(tok, image_id, template, row):
    out = tokenize_conversation(tok, template, [(t["from"], t["value"]) for t in row], image_id, 1)
    to_original = lambda a: np.where(a == image_id, ORIGINAL_IMAGE, a).tolist()  # noqa: E731
    return to_original(out["input_ids"]), to_original(out["labels"])


@pytest.mark.parametrize("version,template", [("plain", "plain"), ("v1", "vicuna_v1"), ("llava_llama_2", "llama_2")])
def test_ids_and_labels_equal_the_original(llama, version, template):
    d, tok, image_id = llama
    rows = caption_rows() if template == "plain" else conversation_rows()
    ref = run_original(d, version, rows)
    assert ref["versions"] == {"transformers": "4.37.2", "tokenizers": "0.15.1", "sentencepiece": "0.1.99"}
    assert ref["legacy"] == (not d.parent.name.startswith("legacy_false"))  # absent = legacy, as it trained
    equal = 0
    for i, (row, want) in enumerate(zip(rows, ref["results"])):
        assert not want["mismatch"], f"row {i}: the original masked this row"
        ids, labels = ours(tok, image_id, template, row)
        assert ids == want["input_ids"], f"row {i}: {tok.convert_ids_to_tokens([x for x in ids if x >= 0][:40])}"
        assert labels == want["labels"], f"row {i}"
        equal += 1
    assert equal == (401 if template == "plain" else 240)


def test_deliberate_differences(llama):
    """Rows llava-jax treats differently from the original on purpose (docs/tokenization.md)."""
    d, tok, image_id = llama
    human = {"from": "human", "value": "<image>\nWhat is shown?"}
    rows = {
        # an empty reply: the original trains "ASSISTANT:USER: ..."; llava-jax skips the row
        "empty_reply": [human, {"from": "gpt", "value": ""}, {"from": "human", "value": "And?"},
                        {"from": "gpt", "value": "A cat."}],
        # a reply quoting the separator: the original's piece counts break and it masks the whole
        # sample; llava-jax supervises the reply as written
        "quotes_separator": [human, {"from": "gpt", "value": "It says USER: hi ASSISTANT: yo"},
                             {"from": "human", "value": "More"}, {"from": "gpt", "value": "There."}],
        # two images in one turn: the original keeps one image token; llava-jax one per image
        "two_images": [{"from": "human", "value": "<image> and <image>\ncompare"}, {"from": "gpt", "value": "Same."}],
    }
    ref = dict(zip(rows, run_original(d, "v1", list(rows.values()))["results"]))

    assert "ASSISTANT:USER:" in tok.decode([x for x in ref["empty_reply"]["input_ids"] if x >= 0])
    assert not ref["empty_reply"]["mismatch"]
    with pytest.raises(ValueError, match="empty gpt text"):
        ours(tok, image_id, "vicuna_v1", rows["empty_reply"])

    ids, labels = ours(tok, image_id, "vicuna_v1", rows["quotes_separator"])
    assert ref["quotes_separator"]["mismatch"] and set(ref["quotes_separator"]["labels"]) == {IGNORE_INDEX}
    assert ids == ref["quotes_separator"]["input_ids"]
    sup = [x for x in labels if x != IGNORE_INDEX]
    assert tok.decode(sup) == "It says USER: hi ASSISTANT: yo</s> There.</s>"

    assert ref["two_images"]["input_ids"].count(ORIGINAL_IMAGE) == 1
    ids, _ = ours(tok, image_id, "vicuna_v1", rows["two_images"])
    assert ids.count(ORIGINAL_IMAGE) == 2
    # the rest of the row is tokenized alike: one more "<image>\n" segment
    first = ids.index(ORIGINAL_IMAGE)
    assert ids[:first] == ref["two_images"]["input_ids"][:first]


@pytest.mark.parametrize("ours_name,version", [("vicuna_v1", "v1"), ("llava_v1", "llava_v1"),
                                               ("llama_2", "llava_llama_2"), ("chatml", "chatml_direct")])
def test_templates_render_the_original_conversation_text(ours_name, version):
    """Each template's text (training and generation prompt) equals the original's
    `conv_templates[version].get_prompt()` on the real conversations. (`plain` is not rendered
    by get_prompt in the original: preprocess_plain joins image, caption and "\n" itself, which
    the ids test above covers.)"""
    from llava_jax.data.templates import render

    rows = conversation_rows()
    ref = run_original(None, version, rows, mode="prompts")["results"]
    for i, (row, want) in enumerate(zip(rows, ref)):
        assert render(ours_name, [(t["from"], t["value"]) for t in row]).text == want["prompt"], f"row {i}"
    first = [row[:1] for row in rows]  # the first question as a generation prompt (the original's CLI)
    ref = run_original(None, version, first, mode="prompts", generation=True)["results"]
    for i, (row, want) in enumerate(zip(first, ref)):
        got = render(ours_name, [(t["from"], t["value"]) for t in row], add_generation_prompt=True).text
        assert got == want["prompt"], f"row {i}: {got[-40:]!r} vs {want['prompt'][-40:]!r}"
