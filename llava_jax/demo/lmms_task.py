"""The demo's held-out questions as lmms-eval tasks (lmms-eval's YAML task format over a local
JSON dataset), so the real lmms-eval CLI can evaluate a demo model offline:

    python -m llava_jax.demo.lmms_task --data /tmp/llava_jax_demo/data --out /tmp/llava_jax_demo/lmms_tasks
    lmms-eval --model llava_jax --model_args pretrained=/tmp/llava_jax_demo/hf \\
        --tasks shapes_qa,shapes_choice --include_path /tmp/llava_jax_demo/lmms_tasks --batch_size 16

* `shapes_qa` (generate_until): the question as asked, the model's free answer scored by the
  world's own scorer (`llava_jax.demo.scoring.score_answer`), metric `shapes_acc` (mean).
* `shapes_choice` (multiple_choice): the same questions with the row's `choices`; lmms-eval
  asks the model's loglikelihood of each and scores with its built-in `acc`.

The task files point at absolute paths of `--data` (its eval.jsonl and images); rerun the
command if the data moves.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from llava_jax.eval.report import read_jsonl

QA_TASK, CHOICE_TASK = "shapes_qa", "shapes_choice"

_UTILS = '''"""Written by llava_jax.demo.lmms_task: the shapes-world task functions."""
from PIL import Image

from llava_jax.demo.scoring import score_answer


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc):
    return doc["text"]


def doc_to_choice(doc):
    return list(doc["choices"])


def process_results(doc, results):
    return {"shapes_acc": float(score_answer(doc["category"], results[0], doc["answer"]))}
'''


def _yaml(task: str, data_file: Path, body: str) -> str:
    return (f"task: {task}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            f"  data_files:\n    test: {json.dumps(str(data_file))}\n"
            "test_split: test\n"
            "doc_to_visual: !function utils.doc_to_visual\n"
            "doc_to_text: !function utils.doc_to_text\n" + body +
            "metadata:\n  - version: 1.0\n")


def write_tasks(data_dir, out_dir, max_new_tokens: int = 32, limit: int | None = None) -> Path:
    """Write the two task YAMLs, their utils.py and the dataset (eval.jsonl rows with absolute
    `image_path`s) into `out_dir`; returns it."""
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    rows = read_jsonl(data_dir / "eval.jsonl", "questions")[:limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    data_file = (out_dir / "shapes_eval.jsonl").resolve()
    with open(data_file, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({**r, "image_path": str(data_dir / "images" / r["image"])}) + "\n")
    (out_dir / "utils.py").write_text(_UTILS, encoding="utf-8")
    (out_dir / f"{QA_TASK}.yaml").write_text(_yaml(QA_TASK, data_file, (
        "output_type: generate_until\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {int(max_new_tokens)}\n  temperature: 0\n  do_sample: false\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: shapes_acc\n    aggregation: mean\n    higher_is_better: true\n")),
        encoding="utf-8")
    (out_dir / f"{CHOICE_TASK}.yaml").write_text(_yaml(CHOICE_TASK, data_file, (
        "output_type: multiple_choice\n"
        "doc_to_choice: !function utils.doc_to_choice\n"
        "doc_to_target: answer\n"
        "target_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")),
        encoding="utf-8")
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llava_jax.demo.lmms_task", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the demo's data folder (eval.jsonl + images/)")
    p.add_argument("--out", required=True, help="the task folder to write (give it to lmms-eval as --include_path)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    a = p.parse_args(argv)
    out = write_tasks(a.data, a.out, a.max_new_tokens, a.limit)
    print(f"wrote tasks {QA_TASK}, {CHOICE_TASK} to {out} (lmms-eval --include_path {out})")


if __name__ == "__main__":
    main()
