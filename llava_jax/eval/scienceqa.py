"""ScienceQA: multiple-choice prompts with lettered options, answer extraction, accuracy.

    # 1. prompts for a split (the official problems.json + pid_splits.json)
    python -m llava_jax.eval.scienceqa --problems ScienceQA/data/scienceqa/problems.json \\
        --pid_splits ScienceQA/data/scienceqa/pid_splits.json --split test \\
        --write_questions sqa_test.jsonl
    # 2. answers: python -m llava_jax.eval.answer --questions sqa_test.jsonl --image_folder .../images/test ...
    #    (or pass --model HF_DIR --image_folder ... here and both happen in one go)
    # 3. score
    python -m llava_jax.eval.scienceqa --problems ... --pid_splits ... --split test \\
        --answers answers.jsonl --out_dir results/scienceqa

Prompt (LLaVA-1.5 style): ``Context: <hint>`` (when there is one), the question, one line per
option ``A. ...``, then ``Answer with the option's letter from the given choices directly.``;
image questions get the image (``<split>/<pid>/image.png`` in the official layout, so
--image_folder is ``.../images/<split>``).

Answer extraction (`extract_answer`): a bare letter (``B``, ``B.``, ``(B)``), a letter prefix
(``B. Louisiana``, ``(B) Louisiana``, ``B: ...``), or ``The answer is B.``; the letter must be one
of this question's options. Anything else is a failure: counted as wrong and listed in
summary.json. Accuracy is reported overall, on image questions, and on the official ScienceQA
subsets (NAT/SOC/LAN subject, TXT/IMG/NO context, G1-6/G7-12 grade).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

from llava_jax.eval.report import bar_chart, read_jsonl, write_report

LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def load_split(problems_path, pid_splits_path, split: str) -> tuple[dict, list[str]]:
    """(problems, the split's pids in file order)."""
    problems = json.loads(Path(problems_path).read_text(encoding="utf-8"))
    splits = json.loads(Path(pid_splits_path).read_text(encoding="utf-8"))
    if split not in splits:
        raise ValueError(f"{pid_splits_path} has no split {split!r}; it has {sorted(splits)}")
    pids = [str(p) for p in splits[split]]
    missing = [p for p in pids if p not in problems]
    if missing:
        raise ValueError(f"{len(missing)} pids of split {split!r} are not in {problems_path} (first: {missing[:5]})")
    return problems, pids


def build_prompt(problem: Mapping, instruction: str = INSTRUCTION) -> str:
    choices = problem["choices"]
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a problem needs 2..{len(LETTERS)} choices, got {len(choices)}: {problem.get('question')!r}")
    lines = []
    hint = (problem.get("hint") or "").strip()
    if hint:
        lines.append(f"Context: {hint}")
    lines.append(problem["question"].strip())
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def make_questions(problems: Mapping, pids: Sequence[str], instruction: str = INSTRUCTION) -> list[dict]:
    """Question rows for `answer_questions` (question_id = pid, image = "<pid>/image.png" or
    absent, category = subject)."""
    rows = []
    for pid in pids:
        prob = problems[pid]
        row = {"question_id": pid, "text": build_prompt(prob, instruction), "category": prob.get("subject", "")}
        if prob.get("image"):
            row["image"] = f"{pid}/{prob['image']}"
        rows.append(row)
    return rows


_PREFIX = re.compile(r"^\(?([A-Z])(?:\)|\.|:)(?:\s|$)")
_BARE = re.compile(r"^[\s(\[]*([A-Z])[\s)\].]*$")
_ANSWER_IS = re.compile(r"\b(?i:the (?:correct |final |best )?answer is)[:\s]*\(?([A-Z])(?![A-Za-z'])")


def extract_answer(text: str | None, num_options: int, choices: Sequence[str] | None = None) -> int | None:
    """The chosen option's index, or None when no valid letter is found.

    `choices`, when given, also accepts a reply that is exactly one option's text (off by
    default in `score`, to keep the LLaVA protocol)."""
    if text is None:
        return None
    t = text.strip().strip("*").strip()
    valid = LETTERS[:num_options]
    letter = None
    if m := _BARE.match(t):
        letter = m.group(1)
    elif m := _PREFIX.match(t):
        letter = m.group(1)
    else:
        found = {m.group(1) for m in _ANSWER_IS.finditer(t)}
        if len(found) == 1:
            letter = found.pop()
    if letter is not None:
        return valid.index(letter) if letter in valid else None
    if choices:
        norm = t.rstrip(".").strip().lower()
        hits = [i for i, c in enumerate(choices) if c.strip().lower() == norm]
        if len(hits) == 1:
            return hits[0]
    return None


def _subsets(prob: Mapping) -> list[str]:
    out = []
    subj = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}.get(prob.get("subject"))
    if subj:
        out.append(subj)
    has_txt, has_img = bool((prob.get("hint") or "").strip()), bool(prob.get("image"))
    if has_txt:
        out.append("TXT")
    if has_img:
        out.append("IMG")
    if not has_txt and not has_img:
        out.append("NO")
    m = re.fullmatch(r"grade(\d+)", str(prob.get("grade", "")))
    if m:
        out.append("G1-6" if int(m.group(1)) <= 6 else "G7-12")
    return out


SUBSETS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


def score(problems: Mapping, pids: Sequence[str], answers: Sequence[Mapping] | Mapping,
          match_option_text: bool = False) -> dict:
    """Accuracy of `answers` (rows with question_id = pid and text) on `pids`.

    Returns {"overall", "image", "subsets": {name: {n, correct, accuracy}}, "failures": [...],
    "predictions": [...]}. A missing answer or one without a valid letter is a failure (wrong)."""
    by_id = answers if isinstance(answers, Mapping) else {str(a["question_id"]): a for a in answers}
    by_id = {str(k): v for k, v in by_id.items()}
    preds, failures = [], []
    tally: dict[str, list[int]] = {"overall": [0, 0], "image": [0, 0], **{s: [0, 0] for s in SUBSETS}}
    for pid in pids:
        prob = problems[pid]
        ans = by_id.get(pid)
        text = None if ans is None else ans.get("text")
        idx = extract_answer(text, len(prob["choices"]), prob["choices"] if match_option_text else None)
        ok = idx is not None and idx == int(prob["answer"])
        if idx is None:
            failures.append({"question_id": pid, "text": text,
                             "reason": "no answer" if ans is None else "no valid option letter"})
        preds.append({"question_id": pid, "pred": None if idx is None else LETTERS[idx],
                      "answer": LETTERS[int(prob["answer"])], "correct": ok})
        keys = ["overall"] + (["image"] if prob.get("image") else []) + _subsets(prob)
        for k in keys:
            tally[k][0] += 1
            tally[k][1] += ok

    def acc(k):
        n, c = tally[k]
        return {"n": n, "correct": c, "accuracy": c / n * 100 if n else None}

    return {"overall": acc("overall"), "image": acc("image"), "subsets": {s: acc(s) for s in SUBSETS},
            "failures": failures, "predictions": preds}


COLUMNS = [("subset", "subset"), ("n", "n"), ("correct", "correct"), ("accuracy", "accuracy %")]


def report(result: Mapping, out_dir=None, *, title: str = "ScienceQA", extra: Mapping | None = None,
           echo: bool = True) -> dict:
    rows = [{"subset": "overall", **result["overall"]}, {"subset": "image questions", **result["image"]}]
    rows += [{"subset": s, **v} for s, v in result["subsets"].items() if v["n"]]
    notes = [f"failures (no valid option letter, counted wrong): {len(result['failures'])}"]
    obj = write_report(out_dir, "summary", title, COLUMNS, rows,
                       {**(extra or {}), "failures": result["failures"]}, notes=notes, echo=echo)
    if out_dir is not None:
        (Path(out_dir) / "predictions.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in result["predictions"]), encoding="utf-8")
        bar_chart(Path(out_dir) / "summary.png", [r["subset"] for r in rows],
                  {"accuracy %": [r["accuracy"] for r in rows]}, title=title, ylabel="accuracy %", ymax=100)
    return obj


def main(argv: Sequence[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.scienceqa", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", required=True, help="ScienceQA problems.json")
    p.add_argument("--pid_splits", required=True, help="ScienceQA pid_splits.json")
    p.add_argument("--split", default="test")
    p.add_argument("--write_questions", default=None, help="write the question JSONL here (and stop unless "
                   "--answers or --model is given)")
    p.add_argument("--answers", default=None, help="answers JSONL (question_id = pid, text)")
    p.add_argument("--model", default=None, help="a llava-hf directory: generate the answers first")
    p.add_argument("--image_folder", default=None, help="folder holding <pid>/image.png (images/<split>)")
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--match_option_text", action="store_true",
                   help="also accept a reply that is exactly one option's text (not the LLaVA protocol)")
    p.add_argument("--out_dir", default=None, help="summary.{json,md,png}, predictions.jsonl (and answers.jsonl)")
    a = p.parse_args(argv)

    problems, pids = load_split(a.problems, a.pid_splits, a.split)
    questions = make_questions(problems, pids)
    if a.write_questions:
        Path(a.write_questions).parent.mkdir(parents=True, exist_ok=True)
        Path(a.write_questions).write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
        print(f"wrote {len(questions)} questions to {a.write_questions}", file=sys.stderr)
    if a.model:
        if not a.out_dir and not a.answers:
            p.error("--model needs --out_dir or --answers (where the answers go)")
        from llava_jax.eval.answer import answer_questions
        from llava_jax.serve.generator import ChatGenerator

        gen = ChatGenerator.from_pretrained(a.model, template=a.template)  # as the server loads it
        a.answers = a.answers or str(Path(a.out_dir) / "answers.jsonl")
        Path(a.answers).parent.mkdir(parents=True, exist_ok=True)
        answer_questions(None, None, questions, a.image_folder, generator=gen, batch_size=a.batch_size,
                         max_new_tokens=a.max_new_tokens, out_path=a.answers, model_id=Path(a.model).name,
                         progress=True)
    if not a.answers:
        if not a.write_questions:
            p.error("nothing to do: give --write_questions, --answers or --model")
        return None
    answers = read_jsonl(a.answers, "answers")
    result = score(problems, pids, answers, match_option_text=a.match_option_text)
    model_ids = sorted({str(r.get("model_id")) for r in answers if r.get("model_id")})
    return report(result, a.out_dir, title=f"ScienceQA ({a.split})",
                  extra={"split": a.split, "answers": a.answers,
                         "model_id": model_ids[0] if len(model_ids) == 1 else model_ids})


if __name__ == "__main__":
    main()
