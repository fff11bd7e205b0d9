"""LLaVA-Bench with an LLM judge: relative scores of model answers against reference answers.

    python -m llava_jax.eval.llava_bench \\
        --questions qa90_questions.jsonl --references qa90_gpt4_answer.jsonl \\
        --context caps_boxes_coco2014_val_80.jsonl --answers answers.jsonl \\
        --judge_url https://api.openai.com/v1 --judge_model gpt-4o --out_dir results/llava_bench

For each question the judge (any OpenAI-compatible endpoint, key from $OPENAI_API_KEY or
--judge_api_key_env) sees the context (captions + boxes, or a description), the question, the
reference answer as "Assistant 1" and the model's answer as "Assistant 2", and rates both 1-10.
The prompt is this project's own (`default_rule`) unless --rules names a file in the format of
LLaVA's rule.json (keys `llava_bench_<category>` / `<category>` / `default`, each with `role`
and `prompt`).

Outputs under --out_dir: reviews.jsonl (one judge review per question; a rerun judges only the
questions without a successful review), summary.json / summary.md (per category and overall:
relative score = mean(model) / mean(reference) x 100, and both means x 10, as the LLaVA paper
reports), summary.png (the same per category). A reply without a score pair is asked again once
(with a reminder of the format); if it still has none, the question counts as a failure: it is
listed and left out of the means.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Mapping, Sequence

from llava_jax.eval.judge import ChatClient, JudgeError, parse_scores
from llava_jax.eval.report import bar_chart, read_jsonl, write_report

DEFAULT_SYSTEM = "You are a careful, impartial judge of answers to questions about images."

_PROMPT = (
    "Above are a user's question about an image and the answers of two AI assistants. You cannot "
    "see the image: the context describes it (captions, and objects with boxes given as normalised "
    "[x1, y1, x2, y2] coordinates, or a written description) and is the ground truth.\n"
    "Rate each answer on an integer scale from 1 to 10 (10 is best) for how correct it is with respect "
    "to the context, and how helpful, relevant and detailed it is. {focus} Judge the content, not the "
    "length or the style, and do not let the order in which the answers appear influence you.\n"
    "Reply format: the first line holds only the two scores, Assistant 1's then Assistant 2's, "
    "separated by a space (for example: 7 4). From the second line on, explain your ratings briefly."
)
_FOCUS = {
    "conv": "The question asks about what is in the image: an answer that states things the context "
            "contradicts is wrong, however fluent.",
    "detail": "The question asks for a description: reward covering the objects, their attributes and "
              "where they are; penalise objects or details that the context does not support.",
    "complex": "The question needs reasoning: reward sound reasoning grounded in the context; penalise "
               "claims the context does not support.",
}
_GENERIC_FOCUS = "An answer that states things the context contradicts is wrong, however fluent."

RETRY_REMINDER = ("Your reply did not start with a line holding the two scores. Reply again: the first "
                  "line must hold only the two scores (Assistant 1's, then Assistant 2's) separated by a "
                  "space, then your explanation.")


def default_rule(category: str) -> dict:
    """This project's judge prompt for a category (conv / detail / complex, or any other)."""
    return {"role": "Assistant", "prompt": _PROMPT.format(focus=_FOCUS.get(category, _GENERIC_FOCUS)),
            "system": DEFAULT_SYSTEM, "source": "llava_jax"}


def load_rules(path) -> dict:
    """A rule file in the format of LLaVA's rule.json: {key: {"role": ..., "prompt": ...}}."""
    try:
        rules = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"rules file {path}: {e}") from None
    if not isinstance(rules, dict):
        raise ValueError(f"rules file {path}: expected a JSON object of {{key: {{role, prompt}}}}")
    for k, v in rules.items():
        if not isinstance(v, dict) or "prompt" not in v:
            raise ValueError(f"rules file {path}: rule {k!r} needs a 'prompt' (and a 'role')")
    return rules


def rule_for(rules: Mapping | None, category: str, rules_name: str = "rules") -> dict:
    """The rule for a question category: `llava_bench_<category>`, then `<category>`, then
    `default` from `rules`; our own prompt when `rules` is None."""
    if rules is None:
        return default_rule(category)
    for key in (f"llava_bench_{category}", category, "default"):
        if key in rules:
            r = rules[key]
            return {"role": r.get("role", "Assistant"), "prompt": r["prompt"],
                    "system": r.get("system", DEFAULT_SYSTEM), "source": f"{rules_name}:{key}"}
    raise ValueError(f"{rules_name} has no rule for category {category!r} (looked for llava_bench_{category}, "
                     f"{category}, default; it has {sorted(rules)})")


def context_text(row: Mapping) -> str:
    """Captions + boxes (LLaVA's caps_boxes format) or a description (`caption`, `description`
    or `context`), rendered as the judge sees it."""
    if "captions" in row:
        caps = "\n".join(row["captions"])
        boxes = "\n".join(f"{inst['category']}: {list(inst['bbox'])}" for inst in row.get("instances", []))
        return caps + ("\n\n" + boxes if boxes else "")
    for key in ("caption", "description", "context"):
        if isinstance(row.get(key), str):
            return row[key]
    raise ValueError(f"context row {row.get('id', row.get('image'))!r} has neither 'captions' (+ 'instances') "
                     "nor a 'caption' / 'description' / 'context' text")


def judge_messages(context: str, question: str, answer1: str, answer2: str, rule: Mapping) -> list[dict]:
    """Chat messages for one review: Assistant 1 = the reference, Assistant 2 = the model."""
    role = rule.get("role", "Assistant")
    content = (f"[Context]\n{context}\n\n"
               f"[Question]\n{question}\n\n"
               f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
               f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
               f"[System]\n{rule['prompt']}\n\n")
    return [{"role": "system", "content": rule.get("system", DEFAULT_SYSTEM)},
            {"role": "user", "content": content}]


def review_one(chat: Callable[[list[dict]], str], messages: list[dict], retries: int = 1) -> dict:
    """Ask the judge; if the reply holds no score pair, ask again (at most `retries` times) with
    the first reply and a reminder of the format. Returns text, score [ref, model] or None,
    attempts, failed, error."""
    msgs = list(messages)
    text, error = None, None
    for attempt in range(1, retries + 2):
        try:
            text = chat(msgs)
        except JudgeError as e:
            return {"text": text, "score": None, "attempts": attempt, "failed": True, "error": str(e)}
        score = parse_scores(text)
        if score is not None:
            return {"text": text, "score": list(score), "attempts": attempt, "failed": False, "error": None}
        error = "no score pair in the judge's reply"
        msgs = list(messages) + [{"role": "assistant", "content": text}, {"role": "user", "content": RETRY_REMINDER}]
    return {"text": text, "score": None, "attempts": retries + 1, "failed": True, "error": error}


def _by_id(rows: Sequence[Mapping], what: str) -> dict:
    out = {}
    for r in rows:
        if "question_id" not in r:
            raise ValueError(f"{what}: row without question_id: {str(r)[:200]}")
        out[r["question_id"]] = r
    return out


def run_reviews(questions: Sequence[Mapping], references: Sequence[Mapping], answers: Sequence[Mapping],
                contexts: Sequence[Mapping] | None, chat: Callable[[list[dict]], str], *,
                rules: Mapping | None = None, rules_name: str = "rules", out_path=None, judge_model: str = "",
                workers: int = 4, retries: int = 1, rejudge_failed: bool = True, skip_missing: bool = False,
                progress: bool = False) -> list[dict]:
    """Judge every question (in parallel, `workers` at a time); returns the reviews in question
    order. With `out_path`, reviews are appended as they arrive and a rerun keeps the successful
    ones (and, unless `rejudge_failed` is False, asks again for failed ones); the file is
    rewritten in question order at the end."""
    refs, ans = _by_id(references, "references"), _by_id(answers, "answers")
    ctx_by_image = {}
    for c in contexts or []:
        if "image" in c:
            ctx_by_image[c["image"]] = c
    missing = [q["question_id"] for q in questions if q["question_id"] not in ans or q["question_id"] not in refs]
    if missing and not skip_missing:
        raise ValueError(f"{len(missing)} questions have no model answer or no reference answer "
                         f"(first: {missing[:10]}); pass skip_missing to judge the rest")
    missing_set = set(missing)
    questions = [q for q in questions if q["question_id"] not in missing_set]
    done: dict = {}
    if out_path is not None and Path(out_path).exists():
        for r in read_jsonl(out_path, "reviews"):
            if not (r.get("failed") and rejudge_failed):
                done[r["question_id"]] = r
    todo = [q for q in questions if q["question_id"] not in done]

    jobs = []
    for q in todo:
        qid = q["question_id"]
        category = q.get("category", "all")
        if "context" in q and isinstance(q["context"], str):
            ctx = q["context"]
        elif q.get("image") in ctx_by_image:
            ctx = context_text(ctx_by_image[q["image"]])
        else:
            raise ValueError(f"question {qid}: no context for image {q.get('image')!r} in the context file")
        rule = rule_for(rules, category, rules_name)
        msgs = judge_messages(ctx, q["text"], refs[qid]["text"], ans[qid]["text"], rule)
        meta = {"review_id": uuid.uuid4().hex, "question_id": qid, "category": category,
                "answer1_id": refs[qid].get("answer_id"), "answer2_id": ans[qid].get("answer_id"),
                "model_id": ans[qid].get("model_id"), "judge_model": judge_model, "rule": rule["source"]}
        jobs.append((meta, msgs))

    out_f = open(out_path, "a", encoding="utf-8") if out_path is not None else None
    bar = None
    if progress and jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="review")
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futs = {pool.submit(review_one, chat, msgs, retries): meta for meta, msgs in jobs}
            for fut in as_completed(futs):
                rec = {**futs[fut], **fut.result()}
                done[rec["question_id"]] = rec
                if out_f:
                    out_f.write(json.dumps(rec) + "\n")
                    out_f.flush()
                if bar:
                    bar.update(1)
    finally:
        if out_f:
            out_f.close()
        if bar:
            bar.close()
    reviews = [done[q["question_id"]] for q in questions]
    if out_path is not None:
        tmp = Path(str(out_path) + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in reviews), encoding="utf-8")
        os.replace(tmp, out_path)
    return reviews


def summarize(reviews: Sequence[Mapping], categories: Sequence[str] | None = None) -> list[dict]:
    """One row per category (in `categories` order, else first-seen) and `overall`:
    n (scored reviews), failed, reference / model = mean score x 10, relative =
    mean(model) / mean(reference) x 100 (None when undefined). Failed reviews are not averaged."""
    order = list(categories or [])
    for r in reviews:
        if r.get("category") not in order:
            order.append(r.get("category"))

    def row(name, rs):
        scored = [r["score"] for r in rs if not r.get("failed") and r.get("score") is not None]
        n = len(scored)
        ref = sum(s[0] for s in scored) / n if n else None
        mod = sum(s[1] for s in scored) / n if n else None
        rel = mod / ref * 100 if n and ref else None
        return {"category": name, "n": n, "failed": len(rs) - n, "relative": rel,
                "reference": None if ref is None else ref * 10, "model": None if mod is None else mod * 10}

    rows = [row(c, [r for r in reviews if r.get("category") == c]) for c in order]
    rows.append(row("overall", list(reviews)))
    return rows


COLUMNS = [("category", "category"), ("n", "n"), ("failed", "failed"), ("relative", "relative %"),
           ("model", "model x10"), ("reference", "reference x10")]


def report(reviews: Sequence[Mapping], out_dir=None, *, title: str = "LLaVA-Bench (LLM judge)",
           extra: Mapping | None = None, plot: bool = True, echo: bool = True) -> dict:
    rows = summarize(reviews, ["conv", "detail", "complex"] if any(
        r.get("category") in ("conv", "detail", "complex") for r in reviews) else None)
    rows = [r for r in rows if r["n"] or r["failed"]]
    failures = [{"question_id": r["question_id"], "category": r.get("category"), "error": r.get("error"),
                 "text": (r.get("text") or "")[:500]} for r in reviews if r.get("failed")]
    notes = ["relative % = mean(model score) / mean(reference score) x 100; x10 = mean score x 10 "
             "(scores 1-10, as in the LLaVA paper); failed reviews are left out of the means."]
    obj = write_report(out_dir, "summary", title, COLUMNS, rows, {**(extra or {}), "failures": failures},
                       notes=notes, echo=echo)
    if out_dir is not None and plot:
        cats = [r["category"] for r in rows]
        bar_chart(Path(out_dir) / "summary.png", cats,
                  {"relative %": [r["relative"] for r in rows], "model x10": [r["model"] for r in rows],
                   "reference x10": [r["reference"] for r in rows]}, title=title, ylabel="score")
    return obj


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m llava_jax.eval.llava_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", default=None, help="question JSONL (question_id, image, text, category)")
    p.add_argument("--references", default=None, help="reference answers JSONL (question_id, text)")
    p.add_argument("--answers", default=None, help="the model's answers JSONL (question_id, text)")
    p.add_argument("--context", default=None,
                   help="context JSONL keyed by image: captions + instances, or caption/description")
    p.add_argument("--rules", default=None, help="a rule file in LLaVA's rule.json format (default: our prompt)")
    p.add_argument("--judge_url", default=os.environ.get("LLAVA_JAX_JUDGE_URL", "https://api.openai.com/v1"),
                   help="OpenAI-compatible API root")
    p.add_argument("--judge_model", default="gpt-4o", help="judge model name sent to the endpoint")
    p.add_argument("--judge_api_key_env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--judge_timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--judge_max_retries", type=int, default=5, help="retries on transport errors / 429 / 5xx")
    p.add_argument("--judge_temperature", type=float, default=0.2)
    p.add_argument("--judge_max_tokens", type=int, default=1024)
    p.add_argument("--workers", type=int, default=4, help="concurrent judge requests")
    p.add_argument("--parse_retries", type=int, default=1, help="re-asks when a reply has no score pair")
    p.add_argument("--skip_missing", action="store_true", help="judge only questions that have answers")
    p.add_argument("--out_dir", required=True, help="reviews.jsonl, summary.{json,md,png} go here")
    p.add_argument("--summary_only", action="store_true", help="only summarise an existing reviews.jsonl")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    if not a.summary_only and not (a.questions and a.references and a.answers):
        p.error("--questions, --references and --answers are needed (unless --summary_only)")

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reviews_path = out / "reviews.jsonl"
    if a.summary_only:
        reviews = read_jsonl(reviews_path, "reviews")
    else:
        client = ChatClient(a.judge_url, a.judge_model, api_key_env=a.judge_api_key_env, timeout=a.judge_timeout,
                            max_retries=a.judge_max_retries, temperature=a.judge_temperature,
                            max_tokens=a.judge_max_tokens)
        rules = load_rules(a.rules) if a.rules else None
        reviews = run_reviews(read_jsonl(a.questions, "questions"), read_jsonl(a.references, "references"),
                              read_jsonl(a.answers, "answers"),
                              read_jsonl(a.context, "context") if a.context else None, client.chat,
                              rules=rules, rules_name=str(a.rules), out_path=reviews_path,
                              judge_model=a.judge_model, workers=a.workers, retries=a.parse_retries,
                              skip_missing=a.skip_missing, progress=not a.no_progress)
    model_ids = sorted({str(r.get("model_id")) for r in reviews if r.get("model_id")})
    extra = {"model_id": model_ids[0] if len(model_ids) == 1 else model_ids,
             "judge_model": a.judge_model, "rules": a.rules or "llava_jax default prompt",
             "reviews": str(reviews_path)}
    obj = report(reviews, out, extra=extra)
    print(f"\nwrote {reviews_path}, {out / 'summary.json'}, {out / 'summary.md'}, {out / 'summary.png'}",
          file=sys.stderr)
    return obj


if __name__ == "__main__":
    main()
