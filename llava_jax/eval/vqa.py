"""Short-answer scoring: VQAv2-style accuracy and POPE yes/no metrics.

    python -m llava_jax.eval.vqa vqa --answers answers.jsonl --annotations v2_mscoco_val2014_annotations.json \\
        --out_dir results/vqav2
    python -m llava_jax.eval.vqa pope --answers answers.jsonl --questions llava_pope_test.jsonl \\
        --out_dir results/pope

VQA: both the prediction and the human answers are normalised as the official VQAv2 evaluation
does (punctuation, number words -> digits, articles dropped, contractions given their
apostrophes), then accuracy = min(#humans who gave that answer / 3, 1), averaged over the ten
leave-one-annotator-out subsets as the official script does (`leave_one_out=False` gives the plain
formula). Two deliberate differences from the official script: the prediction and the human answers
are always normalised (the official one skips it when all ten humans agree; LLaVA normalises its
predictions before submission anyway), and contractions are matched in lower case (the official table
has a few capitalised keys, "Im", "Ive", that can never match lower-cased text).

POPE: each reply is read as yes or no (`yes_no`), then accuracy, precision, recall, F1 (the
positive class is "yes") and the yes-ratio, per POPE category (adversarial / popular / random, the
question's `category`) and over all questions.
"""
from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path
from typing import Mapping, Sequence

from llava_jax.eval.report import bar_chart, read_jsonl, read_rows, write_report

# ----------------------------------------------------------------------------- normalisation

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The contracted forms of the VQAv2 table; each is reached from every spelling that drops one
# or more of its apostrophes ("dont" -> "don't", "couldnt've" / "couldn'tve" -> "couldn't've").
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        spots = [i for i, ch in enumerate(word) if ch == "'"]
        for k in range(1, len(spots) + 1):
            for drop in itertools.combinations(spots, k):
                table["".join(ch for i, ch in enumerate(word) if i not in drop)] = word
    return table


CONTRACTIONS = _contraction_table()


def _punctuation(text: str) -> str:
    out = text
    strip_all = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        # next to a space (or in a text with a "1,000"-style number) a mark is deleted; inside a
        # word it becomes a space ("black/white" -> "black white")
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """VQAv2 answer normalisation: "Two dogs." -> "2 dogs", "The Man's hat" -> "man's hat",
    "dont" -> "don't", "black/white" -> "black white", "1,000" -> "1000"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: Sequence[str], leave_one_out: bool = True,
                 normalize: bool = True) -> float:
    """VQA accuracy of one prediction against the human answers (10 in VQAv2), in [0, 1]."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    f = normalize_answer if normalize else (lambda s: s.strip())
    pred = f(prediction)
    gts = [f(a) for a in human_answers]
    if not leave_one_out:
        return min(1.0, sum(g == pred for g in gts) / 3)
    accs = []
    for i in range(len(gts)):
        matches = sum(g == pred for j, g in enumerate(gts) if j != i)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def load_vqa_annotations(path) -> dict:
    """{question_id: {"answers": [str], "answer_type": str | None}} from the official VQAv2
    annotation JSON ({"annotations": [{question_id, answers: [{answer}], answer_type}]}) or a
    JSON/JSONL list of {question_id, answers: [str or {answer}], answer_type?}."""
    rows = read_rows(path, "annotations")
    out = {}
    for i, r in enumerate(rows):
        if "question_id" not in r or "answers" not in r:
            raise ValueError(f"annotations {path} row {i}: needs question_id and answers, got keys {sorted(r)}")
        answers = [a["answer"] if isinstance(a, Mapping) else str(a) for a in r["answers"]]
        out[r["question_id"]] = {"answers": answers, "answer_type": r.get("answer_type")}
    return out


def score_vqa(answers: Sequence[Mapping], annotations: Mapping, leave_one_out: bool = True) -> dict:
    """Accuracy (%) over every annotated question, overall and per answer_type; a question
    without a prediction scores 0 and is listed under `missing`."""
    pred = {a["question_id"]: a.get("text", a.get("answer", "")) for a in answers}
    # question ids may have been turned into strings on the way (JSON keys)
    pred.update({str(k): v for k, v in list(pred.items())})
    per_type: dict[str, list[float]] = {}
    allacc, missing = [], []
    for qid, ann in annotations.items():
        p = pred.get(qid, pred.get(str(qid)))
        if p is None:
            missing.append(qid)
            acc = 0.0
        else:
            acc = vqa_accuracy(p, ann["answers"], leave_one_out)
        allacc.append(acc)
        if ann.get("answer_type"):
            per_type.setdefault(ann["answer_type"], []).append(acc)

    def row(name, accs):
        return {"subset": name, "n": len(accs), "accuracy": 100 * sum(accs) / len(accs) if accs else None}

    rows = [row("overall", allacc)] + [row(t, v) for t, v in sorted(per_type.items())]
    return {"rows": rows, "missing": missing}


# ----------------------------------------------------------------------------- POPE

_NEGATIONS = frozenset({"no", "not", "none", "nothing", "nobody", "neither", "nor", "never", "cannot", "without"})
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def yes_no(text: str | None) -> str:
    """"yes" or "no" for a reply to a yes/no question, in this order:

    1. the reply's first word when it is yes/no ("Yes, there is..." / "No.");
    2. else the first later sentence that starts with yes/no: a verdict after the evidence
       ("The cross is green. No." -> "no"; LLaVA's POPE script reads only the first sentence and
       would count that reply as "yes");
    3. else "no" when the first sentence holds a negation ("There is not a dog", "There isn't any
       dog"), else "yes" (as LLaVA's POPE script)."""
    t = (text or "").replace("\u2019", "'").strip().lower()
    words = _WORD.findall(t)
    if words and words[0] in ("yes", "no"):
        return words[0]
    sentences = re.split(r"(?<=[.!?;])\s+", t)
    for sentence in sentences[1:]:
        first = _WORD.findall(sentence)[:1]
        if first and first[0] in ("yes", "no"):
            return first[0]
    for w in _WORD.findall(sentences[0]):
        if w in _NEGATIONS or w.endswith("n't"):
            return "no"
    return "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Binary metrics with "yes" as the positive class. predictions/labels: "yes"/"no".
    precision / recall / F1 are None when undefined (no "yes" predicted / no "yes" label);
    F1 is 0 when precision and recall are both 0."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions vs {len(labels)} labels")
    for x in list(predictions) + list(labels):
        if x not in ("yes", "no"):
            raise ValueError(f"POPE predictions and labels must be 'yes' or 'no', got {x!r}")
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l == "yes" for p, l in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "accuracy": (tp + tn) / n if n else None, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else None}


def score_pope(answers: Sequence[Mapping], questions: Sequence[Mapping]) -> dict:
    """Questions carry `label` (yes/no) and optionally `category`. Rows per category and 'all';
    a question without an answer is listed under `missing` and left out."""
    pred = {a["question_id"]: yes_no(a.get("text")) for a in answers}
    groups: dict[str, tuple[list, list]] = {}
    missing = []
    for q in questions:
        label = str(q.get("label", q.get("answer", ""))).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"POPE question {q.get('question_id')}: label must be yes/no, got {label!r}")
        if q["question_id"] not in pred:
            missing.append(q["question_id"])
            continue
        for key in ([q["category"]] if q.get("category") else []) + ["all"]:
            g = groups.setdefault(key, ([], []))
            g[0].append(pred[q["question_id"]])
            g[1].append(label)
    order = sorted(k for k in groups if k != "all") + (["all"] if "all" in groups else [])
    rows = [{"subset": k, **pope_metrics(*groups[k])} for k in order]
    return {"rows": rows, "missing": missing}


def _pct(rows, keys):
    return [{**r, **{k: (None if r[k] is None else 100 * r[k]) for k in keys}} for r in rows]


VQA_COLUMNS = [("subset", "subset"), ("n", "n"), ("accuracy", "accuracy %")]
POPE_COLUMNS = [("subset", "category"), ("n", "n"), ("accuracy", "accuracy %"), ("precision", "precision %"),
                ("recall", "recall %"), ("f1", "F1 %"), ("yes_ratio", "yes %")]


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.vqa", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    v = sub.add_parser("vqa", help="VQAv2-style short-answer accuracy")
    v.add_argument("--answers", required=True, help="answers JSONL (question_id, text)")
    v.add_argument("--annotations", required=True, help="official VQAv2 annotations JSON, or JSON/JSONL rows "
                   "with question_id and answers")
    v.add_argument("--plain", action="store_true", help="min(#matches/3, 1) without leave-one-out averaging")
    v.add_argument("--out_dir", default=None)
    q = sub.add_parser("pope", help="POPE yes/no metrics")
    q.add_argument("--answers", required=True, help="answers JSONL (question_id, text)")
    q.add_argument("--questions", required=True, help="POPE questions with label (yes/no) and category")
    q.add_argument("--out_dir", default=None)
    a = p.parse_args(argv)

    answers = read_jsonl(a.answers, "answers")
    if a.task == "vqa":
        res = score_vqa(answers, load_vqa_annotations(a.annotations), leave_one_out=not a.plain)
        notes = [f"{len(res['missing'])} annotated questions have no answer (scored 0)"] if res["missing"] else []
        obj = write_report(a.out_dir, "summary", "VQA accuracy", VQA_COLUMNS, res["rows"],
                           {"answers": a.answers, "missing": res["missing"]}, notes=notes)
        series = {"accuracy %": [r["accuracy"] for r in res["rows"]]}
        plot_rows = res["rows"]
    else:
        res = score_pope(answers, read_rows(a.questions, "questions"))
        rows = _pct(res["rows"], ["accuracy", "precision", "recall", "f1", "yes_ratio"])
        notes = [f"{len(res['missing'])} questions have no answer (left out)"] if res["missing"] else []
        obj = write_report(a.out_dir, "summary", "POPE", POPE_COLUMNS, rows,
                           {"answers": a.answers, "missing": res["missing"]}, notes=notes)
        series = {k: [r[key] for r in rows] for k, key in
                  (("accuracy %", "accuracy"), ("F1 %", "f1"), ("yes %", "yes_ratio"))}
        plot_rows = rows
    if a.out_dir:
        bar_chart(Path(a.out_dir) / "summary.png", [r["subset"] for r in plot_rows],
                  series, title=obj["title"], ylabel="%", ymax=100)
    return obj


if __name__ == "__main__":
    main()
