"""Evaluation: answer generation (`answer`), LLaVA-Bench with an LLM judge (`llava_bench`,
`judge`), ScienceQA (`scienceqa`), VQAv2-style accuracy and POPE (`vqa`), summary tables and
plots (`report`). See docs/eval.md."""
