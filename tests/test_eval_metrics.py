"""Evaluation arithmetic on hand-made cases: judge-score parsing (and the real LLaVA reviews),
LLaVA-Bench relative scores, VQA accuracy, ScienceQA, POPE, the judge client, reports."""
import json
import math
import os

import pytest

from conftest import SHARED
from judge_server import ScriptedJudge, section, user_content
from llava_jax.eval import llava_bench, scienceqa, vqa
from llava_jax.eval.judge import ChatClient, JudgeError, parse_scores
from llava_jax.eval.report import bar_chart, read_jsonl, write_report

needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"reference data folder {SHARED} is absent")

# ============================================================================ score parsing


@needs_shared
def test_parser_reproduces_the_reference_reviews():
    files = sorted((SHARED / "review").glob("*.jsonl"))
    assert files
    total, same, differ = 0, 0, []
    for f in files:
        for r in read_jsonl(f):
            total += 1
            got = parse_scores(r["text"])
            if got is not None and list(got) == [float(x) for x in r["score"]]:
                same += 1
            else:
                differ.append((f.name, r["question_id"], got, r["score"]))
    print(f"\nparsed {same}/{total} reference reviews to their stored score")
    assert total == 320
    # The two others are math reviews whose stored score was entered by hand and disagrees with
    # the text itself ("Assistant 1: 10\nAssistant 2: 4" stored as [10, 2]); we read the text.
    assert same == 318, differ
    assert sorted((n, q) for n, q, _, _ in differ) == [("review_bard_vicuna-13b.jsonl", 70),
                                                      ("review_llama-13b_vicuna-13b.jsonl", 70)]
    assert all(g == (10.0, 4.0) and s == [10, 2] for _, _, g, s in differ)


@pytest.mark.parametrize("text,expected", [
    ("8 9\nBoth are good.", (8, 9)),
    ("8,9", (8, 9)),
    ("8, 9.5\nexplanation", (8, 9.5)),
    ("**7 4**\n", (7, 4)),
    ("\n\n  6 8  \nstuff", (6, 8)),
    ("Scores: 8/10 and 9/10\nbecause", (8, 9)),
    ("Assistant 1: 7, Assistant 2: 9\nbecause", (7, 9)),
    ("8 out of 10, 6 out of 10", (8, 6)),
    ("9 8.\n", (9, 8)),
    ("Here are my ratings:\n8 9\nAssistant 1 is ...", (8, 9)),
    ("Let me think.\nScores: [3, 10]\n", (3, 10)),
    ("Long preamble with 2 numbers 3 and 4 but no pairs\n...\nAssistant 1: 3 (weak)\nAssistant 2: 9/10 (good)", (3, 9)),
    ("First, I solve it: x = 10.\nIn conclusion, the scores are (1, 5) for Assistant 1 and 2.", (1, 5)),
    ("0 9", (0, 9)),
])
def test_parse_scores_variants(text, expected):
    assert parse_scores(text) == tuple(float(x) for x in expected)


@pytest.mark.parametrize("text", [None, "", "   \n", "I cannot rate these answers.", "8 9 10\nthree numbers",
                                  "11 12\nout of range", "Assistant 1 scored 8.", "Assistant 1: 8\n(only one)",
                                  "We have the points (2, -2) and (10, 4)."])
def test_parse_scores_unparseable(text):
    assert parse_scores(text) is None


# ============================================================================ LLaVA-Bench

def _rev(cat, score, failed=False):
    return {"question_id": id(score), "category": cat, "score": None if failed else score, "failed": failed}


def test_relative_score_arithmetic():
    reviews = [_rev("conv", [8, 6]), _rev("conv", [10, 7]), _rev("detail", [5, 5]),
               _rev("complex", [9, 9.5]), _rev("complex", None, failed=True)]
    rows = {r["category"]: r for r in llava_bench.summarize(reviews, ["conv", "detail", "complex"])}
    assert list(rows) == ["conv", "detail", "complex", "overall"]
    c = rows["conv"]  # ref mean 9, model mean 6.5
    assert (c["n"], c["failed"]) == (2, 0)
    assert c["reference"] == pytest.approx(90) and c["model"] == pytest.approx(65)
    assert c["relative"] == pytest.approx(6.5 / 9 * 100)  # 72.2
    assert rows["detail"]["relative"] == pytest.approx(100) and rows["detail"]["model"] == pytest.approx(50)
    x = rows["complex"]
    assert (x["n"], x["failed"]) == (1, 1) and x["relative"] == pytest.approx(9.5 / 9 * 100)  # 105.6: > 100 is fine
    o = rows["overall"]  # means over the 4 scored reviews, not a mean of category ratios
    assert (o["n"], o["failed"]) == (4, 1)
    assert o["reference"] == pytest.approx(80) and o["model"] == pytest.approx(68.75)
    assert o["relative"] == pytest.approx(6.875 / 8 * 100)  # 85.9


def test_relative_score_edge_cases():
    rows = {r["category"]: r for r in llava_bench.summarize(
        [_rev("conv", [0, 3]), _rev("detail", None, failed=True)])}
    assert rows["conv"]["relative"] is None and rows["conv"]["model"] == pytest.approx(30)  # reference mean 0
    d = rows["detail"]
    assert (d["n"], d["failed"], d["relative"], d["reference"], d["model"]) == (0, 1, None, None, None)
    assert llava_bench.summarize([]) == [{"category": "overall", "n": 0, "failed": 0, "relative": None,
                                          "reference": None, "model": None}]


def test_review_one_retries_unparseable_once():
    calls = []

    def chat(msgs):
        calls.append(msgs)
        return "I like both." if len(calls) == 1 else "7 8\nok"

    r = llava_bench.review_one(chat, [{"role": "user", "content": "q"}])
    assert r == {"text": "7 8\nok", "score": [7.0, 8.0], "attempts": 2, "failed": False, "error": None}
    # the second request shows the judge its first reply and the format reminder
    assert calls[1][-2] == {"role": "assistant", "content": "I like both."}
    assert calls[1][-1]["content"] == llava_bench.RETRY_REMINDER

    calls.clear()
    r = llava_bench.review_one(lambda m: calls.append(m) or "no numbers", [{"role": "user", "content": "q"}])
    assert r["failed"] and r["score"] is None and r["attempts"] == 2 and len(calls) == 2

    def broken(msgs):
        raise JudgeError("endpoint down")

    r = llava_bench.review_one(broken, [])
    assert r["failed"] and r["attempts"] == 1 and "endpoint down" in r["error"]


def test_context_text_formats():
    row = {"id": "1", "image": "1.jpg", "captions": ["A cat.", "A pet."],
           "instances": [{"category": "cat", "bbox": [0.1, 0.2, 0.5, 0.9]}]}
    assert llava_bench.context_text(row) == "A cat.\nA pet.\n\ncat: [0.1, 0.2, 0.5, 0.9]"
    assert llava_bench.context_text({"image": "x", "caption": "A cat on a mat."}) == "A cat on a mat."
    with pytest.raises(ValueError, match="neither 'captions'"):
        llava_bench.context_text({"image": "x"})


def test_default_rule_and_messages():
    rule = llava_bench.rule_for(None, "detail")
    assert rule["source"] == "llava_jax" and "first line holds only the two scores" in rule["prompt"]
    assert "description" in rule["prompt"]
    msgs = llava_bench.judge_messages("CTX", "Q?", "REF", "MODEL", rule)
    assert msgs[0]["role"] == "system"
    content = msgs[1]["content"]
    assert section(content, "Context") == "CTX" and section(content, "Question") == "Q?"
    assert section(content, "Assistant 1") == "REF" and section(content, "Assistant 2") == "MODEL"


@needs_shared
def test_llava_rule_file_is_accepted(tmp_path):
    rules = llava_bench.load_rules(SHARED / "rule.json")
    for cat in ("conv", "detail", "complex"):
        r = llava_bench.rule_for(rules, cat, "rule.json")
        assert r["source"] == f"rule.json:llava_bench_{cat}" and r["prompt"] == rules[f"llava_bench_{cat}"]["prompt"]
    assert llava_bench.rule_for(rules, "unknown", "rule.json")["source"] == "rule.json:default"
    (tmp_path / "r.json").write_text(json.dumps({"conv": {"role": "Assistant", "prompt": "p"}}))
    with pytest.raises(ValueError, match="no rule for category 'detail'"):
        llava_bench.rule_for(llava_bench.load_rules(tmp_path / "r.json"), "detail")
    (tmp_path / "bad.json").write_text(json.dumps({"conv": {"role": "Assistant"}}))
    with pytest.raises(ValueError, match="needs a 'prompt'"):
        llava_bench.load_rules(tmp_path / "bad.json")


@needs_shared
def test_llava_bench_coco_files_through_a_scripted_judge(tmp_path):
    """The real LLaVA-Bench (COCO) files: 90 questions, GPT-4 references, captions + boxes; the
    "model" answers are the references cut to their first sentence. The judge gives 9 to
    the longer answer and 6 to the other, and 'forgets' the score line once per question."""
    questions = read_jsonl(SHARED / "qa90_questions.jsonl")
    refs = read_jsonl(SHARED / "qa90_gpt4_answer.jsonl")
    answers = [{"question_id": r["question_id"], "text": r["text"].split(". ")[0] + ".", "answer_id": "a",
                "model_id": "first-sentence"} for r in refs]
    seen = {}

    def reply(body):
        c = user_content(body)
        key = section(c, "Question") + section(c, "Context")[:40]
        if len(body["messages"]) == 2 and key not in seen:
            seen[key] = 1
            return "Both answers are fine."  # no scores: must be asked again
        a1, a2 = section(c, "Assistant 1"), section(c, "Assistant 2")
        return f"{9 if len(a1) >= len(a2) else 6} {9 if len(a2) > len(a1) else 6}\nreason"

    with ScriptedJudge(reply) as judge:
        client = ChatClient(judge.url, "scripted", api_key="k", backoff=0)
        reviews = llava_bench.run_reviews(questions, refs, answers,
                                          read_jsonl(SHARED / "caps_boxes_coco2014_val_80.jsonl"), client.chat,
                                          rules=llava_bench.load_rules(SHARED / "rule.json"), rules_name="rule.json",
                                          out_path=tmp_path / "reviews.jsonl", workers=4)
    assert len(judge.requests) == 180 and len(reviews) == 90
    assert all(r["attempts"] == 2 and not r["failed"] for r in reviews)
    # every request carries the captions + boxes of its image, and the rule of its category
    first = user_content(judge.requests[0])
    assert "\n\n" in section(first, "Context") and ": [" in section(first, "Context")
    cats = {r["category"] for r in reviews}
    assert cats == {"conv", "detail", "complex"}
    expected = {}
    for q in questions:
        ref = next(r for r in refs if r["question_id"] == q["question_id"])["text"]
        mod = next(a for a in answers if a["question_id"] == q["question_id"])["text"]
        expected.setdefault(q["category"], []).append((9 if len(ref) >= len(mod) else 6, 9 if len(mod) > len(ref) else 6))
    obj = llava_bench.report(reviews, tmp_path, echo=False)
    rows = {r["category"]: r for r in obj["rows"]}
    for cat, pairs in expected.items():
        ref_m = sum(p[0] for p in pairs) / len(pairs)
        mod_m = sum(p[1] for p in pairs) / len(pairs)
        assert rows[cat]["relative"] == pytest.approx(mod_m / ref_m * 100)
    assert rows["overall"]["n"] == 90
    assert [r["question_id"] for r in read_jsonl(tmp_path / "reviews.jsonl")] == [q["question_id"] for q in questions]
    assert (tmp_path / "summary.png").stat().st_size > 0


# ============================================================================ judge client

def test_chat_client_success_retry_and_errors(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    state = {"n": 0}

    def reply(body):
        state["n"] += 1
        if state["n"] == 1:
            return 500, "overloaded"
        if state["n"] == 2:
            return 429, "slow down"
        return "8 9\nfine"

    with ScriptedJudge(reply) as judge:
        c = ChatClient(judge.url, "judge-x", api_key_env="MY_JUDGE_KEY", backoff=0, temperature=0.0)
        assert c.chat([{"role": "user", "content": "hi"}]) == "8 9\nfine"
        assert len(judge.requests) == 3 and judge.requests[-1]["model"] == "judge-x"
        assert judge.requests[-1]["temperature"] == 0.0
        assert judge.headers[-1]["Authorization"] == "Bearer sk-test"

    with ScriptedJudge(lambda b: (401, "bad key")) as judge:
        c = ChatClient(judge.url, "m", api_key_env="MY_JUDGE_KEY", backoff=0)
        with pytest.raises(JudgeError, match=r"HTTP 401: bad key.*MY_JUDGE_KEY"):
            c.chat([])
        assert len(judge.requests) == 1  # not retried

    with ScriptedJudge(lambda b: (503, "down")) as judge:
        c = ChatClient(judge.url, "m", backoff=0, max_retries=2)
        with pytest.raises(JudgeError, match="after 3 attempts.*HTTP 503: down"):
            c.chat([])
        assert len(judge.requests) == 3


def test_chat_client_timeout_and_refused():
    with ScriptedJudge(lambda b: "1 2", delay_s=0.5) as judge:
        c = ChatClient(judge.url, "m", timeout=0.1, max_retries=1, backoff=0)
        with pytest.raises(JudgeError, match="after 2 attempts"):
            c.chat([])
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = ChatClient(f"http://127.0.0.1:{port}/v1", "m", timeout=1, max_retries=1, backoff=0)
    with pytest.raises(JudgeError, match="after 2 attempts"):
        c.chat([])
    assert ChatClient("http://h/v1/chat/completions", "m").url == "http://h/v1/chat/completions"
    assert ChatClient("http://h/v1/", "m").url == "http://h/v1/chat/completions"
    os.environ.pop("NO_SUCH_KEY_VAR", None)
    assert ChatClient("http://h/v1", "m", api_key_env="NO_SUCH_KEY_VAR").api_key is None


def test_chat_client_is_the_openai_sdk_with_extra_fields_and_no_key():
    os.environ.pop("NO_SUCH_KEY_VAR", None)
    with ScriptedJudge(lambda b: [{"type": "text", "text": "7 "}, {"type": "text", "text": "8"}]) as judge:
        c = ChatClient(judge.url + "/chat/completions", "m", api_key_env="NO_SUCH_KEY_VAR", temperature=0.3,
                       max_tokens=64, extra_body={"seed": 1, "top_p": 0.5})
        assert c.chat([{"role": "user", "content": "hi"}], temperature=0.0, seed=2) == "7 8"  # content parts joined
        assert judge.requests[-1] == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                      "temperature": 0.0, "max_tokens": 64, "seed": 2, "top_p": 0.5}
        assert judge.headers[-1]["User-Agent"].startswith("OpenAI/Python")
        assert judge.headers[-1]["Authorization"] == "Bearer EMPTY"  # no key: the placeholder
        assert c.requests_sent == 1
    with ScriptedJudge(lambda b: (404, "no such model")) as judge:
        with pytest.raises(JudgeError, match=r"HTTP 404: no such model \(the URL should be the API root"):
            ChatClient(judge.url, "m", backoff=0).chat([])
        assert len(judge.requests) == 1


# ============================================================================ VQA

@pytest.mark.parametrize("raw,norm", [
    ("Two dogs.", "2 dogs"),
    ("The Man's hat", "man's hat"),
    ("dont", "don't"),
    ("couldnt've", "couldn't've"),
    ("black/white", "black white"),
    ("hello , world", "hello world"),
    ("1,000", "1000"),
    ("yes!", "yes"),
    ("3.5", "3.5"),
    ("a couple", "couple"),
    ("none", "0"),
    ("Ten", "10"),
    ("eleven", "eleven"),
    ("it's", "it's"),
    ("  multi\nline\tanswer ", "multi line answer"),
    ("(left)", "left"),
])
def test_vqa_normalisation(raw, norm):
    assert vqa.normalize_answer(raw) == norm


@pytest.mark.parametrize("k,official,plain", [(0, 0.0, 0.0), (1, 0.3, 1 / 3), (2, 0.6, 2 / 3), (3, 0.9, 1.0),
                                              (4, 1.0, 1.0), (10, 1.0, 1.0)])
def test_vqa_accuracy_by_number_of_matching_humans(k, official, plain):
    # leave-one-out: the k subsets without a matching human have k matches, the others k-1
    humans = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa.vqa_accuracy("Cat.", humans) == pytest.approx(official)
    assert vqa.vqa_accuracy("a cat", humans, leave_one_out=False) == pytest.approx(plain)


def test_vqa_accuracy_edge_cases():
    assert vqa.vqa_accuracy("two", ["2"] * 10) == 1.0  # number words
    assert vqa.vqa_accuracy("Two", ["2"] * 10, normalize=False) == 0.0
    assert vqa.vqa_accuracy("yes", ["yes"]) == 0.0  # one human: leave-one-out leaves none
    assert vqa.vqa_accuracy("yes", ["yes"], leave_one_out=False) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        vqa.vqa_accuracy("x", [])


def test_score_vqa_and_cli(tmp_path, capsys):
    ann = {"annotations": [
        {"question_id": 1, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
        {"question_id": 2, "answer_type": "number", "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7},
        {"question_id": 3, "answer_type": "number", "answers": [{"answer": "4"}] * 10},
    ]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    answers = [{"question_id": 1, "text": "Yes."}, {"question_id": 2, "text": "two"}]  # 3 missing
    (tmp_path / "ans.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    res = vqa.score_vqa(answers, vqa.load_vqa_annotations(tmp_path / "ann.json"))
    rows = {r["subset"]: r for r in res["rows"]}
    assert rows["overall"]["accuracy"] == pytest.approx(100 * (1 + 0.9 + 0) / 3)
    assert rows["yes/no"]["accuracy"] == pytest.approx(100) and rows["number"]["accuracy"] == pytest.approx(45)
    assert res["missing"] == [3]
    obj = vqa.main(["vqa", "--answers", str(tmp_path / "ans.jsonl"), "--annotations", str(tmp_path / "ann.json"),
                    "--out_dir", str(tmp_path / "out")])
    assert obj["rows"][0]["accuracy"] == pytest.approx(63.333, abs=1e-3)
    assert "VQA accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["missing"] == [3]
    assert "| overall | 3 | 63.3 |" in (tmp_path / "out" / "summary.md").read_text()
    # JSONL annotations with plain string answers work too
    (tmp_path / "ann.jsonl").write_text(json.dumps({"question_id": 7, "answers": ["red"] * 10}) + "\n")
    assert vqa.load_vqa_annotations(tmp_path / "ann.jsonl") == {7: {"answers": ["red"] * 10, "answer_type": None}}


# ============================================================================ POPE

@pytest.mark.parametrize("text,yn", [
    ("Yes, there is a dog.", "yes"), ("No.", "no"), ("NO", "no"), ("There is no dog in the image.", "no"),
    ("There isn't a cat.", "no"), ("There isn\u2019t a cat.", "no"), ("Not at all", "no"),
    ("I see a dog. There is no cat.", "yes"), ("A dog is there.", "yes"), ("", "yes"), (None, "yes"),
    ("Nothing like that.", "no"), ("Yes", "yes"),
    # evidence first, verdict last (the demo's existence answers; LLaVA's script reads the first
    # sentence only and says "yes" to the first two)
    ("The cross is green. No.", "no"), ("The circles are red and blue. No, it is not there.", "no"),
    ("The cross is blue. Yes.", "yes"), ("There is no circle. No.", "no"), ("There is no circle.", "no"),
])
def test_pope_yes_no(text, yn):
    assert vqa.yes_no(text) == yn


def test_pope_metrics_hand_computed():
    m = vqa.pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6) and m["yes_ratio"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    m = vqa.pope_metrics(["yes", "yes", "yes", "no"], ["yes", "no", "no", "no"])
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == 1.0 and m["f1"] == pytest.approx(0.5)


def test_pope_metrics_edge_cases():
    m = vqa.pope_metrics(["no", "no"], ["yes", "no"])  # never says yes: precision undefined
    assert m["precision"] is None and m["recall"] == 0.0 and m["f1"] is None and m["yes_ratio"] == 0.0
    m = vqa.pope_metrics(["no", "yes"], ["no", "no"])  # no positive labels: recall undefined
    assert m["precision"] == 0.0 and m["recall"] is None and m["f1"] is None and m["accuracy"] == 0.5
    m = vqa.pope_metrics(["no", "yes"], ["yes", "no"])  # precision = recall = 0
    assert m["f1"] == 0.0
    m = vqa.pope_metrics([], [])
    assert m["n"] == 0 and m["accuracy"] is None
    with pytest.raises(ValueError, match="'maybe'"):
        vqa.pope_metrics(["maybe"], ["yes"])
    with pytest.raises(ValueError):
        vqa.pope_metrics(["yes"], [])


def test_score_pope_per_category_and_cli(tmp_path):
    qs = [{"question_id": i, "image": "x.jpg", "text": "Is there a dog?", "label": lab, "category": cat}
          for i, (lab, cat) in enumerate([("yes", "random"), ("no", "random"), ("yes", "adversarial"),
                                          ("no", "adversarial"), ("no", "adversarial")])]
    ans = [{"question_id": 0, "text": "Yes"}, {"question_id": 1, "text": "No, there is not."},
           {"question_id": 2, "text": "There is no dog."}, {"question_id": 3, "text": "Yes."}]  # 4 missing
    res = vqa.score_pope(ans, qs)
    rows = {r["subset"]: r for r in res["rows"]}
    assert list(rows) == ["adversarial", "random", "all"] and res["missing"] == [4]
    assert rows["random"]["accuracy"] == 1.0 and rows["random"]["f1"] == 1.0
    assert rows["adversarial"]["accuracy"] == 0.0 and rows["adversarial"]["f1"] == 0.0
    assert rows["all"]["n"] == 4 and rows["all"]["accuracy"] == 0.5 and rows["all"]["yes_ratio"] == 0.5
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(a) + "\n" for a in ans))
    obj = vqa.main(["pope", "--answers", str(tmp_path / "a.jsonl"), "--questions", str(tmp_path / "q.jsonl"),
                    "--out_dir", str(tmp_path / "o")])
    assert obj["rows"][-1]["accuracy"] == pytest.approx(50.0)  # reported in %
    assert (tmp_path / "o" / "summary.png").exists()


# ============================================================================ ScienceQA

PROBLEMS = {
    "10": {"question": "Which state is farthest north?", "choices": ["West Virginia", "Louisiana", "Arizona"],
           "answer": 0, "hint": "", "image": "image.png", "grade": "grade4", "subject": "social science"},
    "11": {"question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1,
           "hint": "Select the best answer.", "image": None, "grade": "grade8", "subject": "language science"},
    "12": {"question": "What is the boiling point of water?", "choices": ["100 C", "50 C", "0 C", "10 C"],
           "answer": 0, "hint": "", "image": None, "grade": "grade7", "subject": "natural science"},
    "13": {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1,
           "hint": "Look at the picture.", "image": "image.png", "grade": "grade2", "subject": "natural science"},
    "99": {"question": "train only", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
           "grade": "grade1", "subject": "natural science"},
}


def test_scienceqa_prompt_and_questions():
    assert scienceqa.build_prompt(PROBLEMS["11"]) == (
        "Context: Select the best answer.\nWhich word is a noun?\nA. run\nB. dog\n"
        "Answer with the option's letter from the given choices directly.")
    assert scienceqa.build_prompt(PROBLEMS["10"]).startswith("Which state is farthest north?\nA. West Virginia\n")
    qs = scienceqa.make_questions(PROBLEMS, ["10", "11"])
    assert qs[0]["image"] == "10/image.png" and "image" not in qs[1] and qs[1]["category"] == "language science"
    with pytest.raises(ValueError, match="2..10 choices"):
        scienceqa.build_prompt({"question": "q", "choices": ["only"]})


@pytest.mark.parametrize("text,n,idx", [
    ("B", 3, 1), ("B.", 3, 1), (" (B) ", 3, 1), ("[C]", 3, 2), ("B. Louisiana", 3, 1), ("(C) Arizona", 3, 2),
    ("A: West Virginia", 3, 0), ("The answer is C.", 3, 2), ("the correct answer is (A) because", 3, 0),
    ("I think the answer is B because it is north.", 3, 1), ("**B**", 3, 1),
    ("E", 3, None), ("D.", 3, None), ("The answer is B. No wait, the answer is C.", 3, None),
    ("The answer is B. So the answer is B.", 3, 1), ("", 3, None), (None, 3, None), ("Louisiana", 3, None),
    ("b", 3, None), ("A cat.", 3, None),
])
def test_scienceqa_answer_extraction(text, n, idx):
    assert scienceqa.extract_answer(text, n) == idx


def test_scienceqa_option_text_matching_is_opt_in():
    ch = PROBLEMS["10"]["choices"]
    assert scienceqa.extract_answer("Louisiana.", 3) is None
    assert scienceqa.extract_answer("louisiana.", 3, ch) == 1


def _write_sqa(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["99"], "test": ["10", "11", "12", "13"]}))
    return tmp_path / "problems.json", tmp_path / "pid_splits.json"


def test_scienceqa_scoring_hand_computed(tmp_path):
    probs, splits = _write_sqa(tmp_path)
    problems, pids = scienceqa.load_split(probs, splits, "test")
    assert pids == ["10", "11", "12", "13"]
    answers = [{"question_id": "10", "text": "A"},            # right (image, SOC, G1-6, NO-text)
               {"question_id": "11", "text": "The answer is B."},  # right (TXT, LAN, G7-12)
               {"question_id": "12", "text": "boiling"}]      # failure; 13 has no answer: failure
    res = scienceqa.score(problems, pids, answers)
    assert res["overall"] == {"n": 4, "correct": 2, "accuracy": 50.0}
    assert res["image"] == {"n": 2, "correct": 1, "accuracy": 50.0}
    s = res["subsets"]
    assert s["NAT"]["n"] == 2 and s["NAT"]["correct"] == 0 and s["SOC"]["accuracy"] == 100.0
    assert s["LAN"]["accuracy"] == 100.0
    assert (s["TXT"]["n"], s["IMG"]["n"], s["NO"]["n"]) == (2, 2, 1)  # 13 has text and image
    assert (s["G1-6"]["n"], s["G7-12"]["n"]) == (2, 2)
    assert [(f["question_id"], f["reason"]) for f in res["failures"]] == [("12", "no valid option letter"),
                                                                         ("13", "no answer")]
    with pytest.raises(ValueError, match="no split 'val'"):
        scienceqa.load_split(probs, splits, "val")


def test_scienceqa_cli(tmp_path):
    probs, splits = _write_sqa(tmp_path)
    common = ["--problems", str(probs), "--pid_splits", str(splits), "--split", "test"]
    assert scienceqa.main(common + ["--write_questions", str(tmp_path / "q.jsonl")]) is None
    qs = read_jsonl(tmp_path / "q.jsonl")
    assert [q["question_id"] for q in qs] == ["10", "11", "12", "13"]
    ans = [{"question_id": q["question_id"], "text": "B", "model_id": "m"} for q in qs]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(a) + "\n" for a in ans))
    obj = scienceqa.main(common + ["--answers", str(tmp_path / "a.jsonl"), "--out_dir", str(tmp_path / "o")])
    assert obj["rows"][0] == {"subset": "overall", "n": 4, "correct": 2, "accuracy": 50.0}
    assert obj["model_id"] == "m" and obj["failures"] == []
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "| overall | 4 | 2 | 50.0 |" in md and "| image questions | 2 | 1 | 50.0 |" in md
    assert len(read_jsonl(tmp_path / "o" / "predictions.jsonl")) == 4


# ============================================================================ reports

def test_write_report_and_bar_chart(tmp_path, capsys):
    cols = [("name", "name"), ("n", "n"), ("v", "value")]
    rows = [{"name": "a", "n": 3, "v": 12.345}, {"name": "longer", "n": 10, "v": None},
            {"name": "nan", "n": 0, "v": math.nan}]
    obj = write_report(tmp_path, "s", "Title", cols, rows, {"k": 1}, notes=["a note"])
    out = capsys.readouterr().out
    assert "Title" in out and "12.3" in out and "a note" in out
    assert json.loads((tmp_path / "s.json").read_text())["k"] == 1 and obj["rows"][0]["v"] == 12.345
    md = (tmp_path / "s.md").read_text()
    assert "| name | n | value |" in md and "| longer | 10 | - |" in md and "- a note" in md
    from PIL import Image

    p = bar_chart(tmp_path / "c.png", ["conv", "detail", "overall"], {"x": [50.0, None, 120.0], "y": [1, 2, 3]},
                  title="t")
    img = Image.open(p)
    assert img.size == (720, 420) and len(set(img.getdata())) > 3
