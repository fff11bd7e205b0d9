"""GPT-assisted instruction-data generation: captions + boxes -> LLaVA instruction rows.

A text-only LLM sees an image only as its captions and object boxes (``prompts.render_context``)
and writes, per image, a conversation, a detailed description and a complex-reasoning Q&A, with
our own system messages and few-shot examples (``llava_jax/datagen/prompts/``, swappable).
Replies are parsed and validated into LLaVA rows (``parse``); bad ones are rejected and counted.

    python -m llava_jax.datagen --annotations caps_boxes.jsonl --out DIR --base-url URL --model M
    python -m llava_jax.datagen --annotations shapes/annotations.jsonl --backend template --out DIR
    python -m llava_jax.datagen.stage1 --pairs pairs.tsv --out stage1.json --np-filter

Modules: ``annotations`` (JSONL / COCO input), ``prompts`` (prompt folders, context format),
``backends`` (OpenAI-compatible HTTP with retries; offline template writer), ``parse`` (replies
-> rows), ``runner`` (concurrency, cache, resume, summary), ``offline`` (the template writer),
``stage1`` (image-caption pairs -> plain rows, noun-phrase filtering). See docs/datagen.md.
"""
from llava_jax.datagen.annotations import Annotation, Instance, load_coco, load_jsonl
from llava_jax.datagen.backends import OpenAIChatBackend, TemplateBackend
from llava_jax.datagen.parse import Rejected, make_row, parse_reply
from llava_jax.datagen.prompts import TASKS, build_messages, load_prompts, parse_context, render_context
from llava_jax.datagen.runner import generate

__all__ = ["Annotation", "Instance", "load_coco", "load_jsonl", "OpenAIChatBackend", "TemplateBackend",
           "Rejected", "make_row", "parse_reply", "TASKS", "build_messages", "load_prompts", "parse_context",
           "render_context", "generate"]
