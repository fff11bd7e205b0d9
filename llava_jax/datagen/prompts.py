"""Prompts: one system message and a few worked examples per generation type.

Types (``TASKS``) and their aliases (the folder names of the original LLaVA prompt release are
accepted too):

* ``conversation`` (``conv``): a multi-turn Q&A, as if the assistant saw the image.
* ``detail`` (``detail_description``): one rich description.
* ``complex`` (``complex_reasoning``): one question that needs reasoning, answered step by step.

Prompt folder layout (the built-in one is ``llava_jax/datagen/prompts/``; copy it with
``python -m llava_jax.datagen --write-prompts DIR``, edit, then pass ``--prompts DIR``)::

    DIR/<type>/system_message.txt      the system message
    DIR/<type>/000_caps.txt            example 0: the context (user turn)
    DIR/<type>/000_conv.txt            example 0: the reply (assistant turn)
    DIR/<type>/001_caps.txt ...        more examples, in file-name order

A folder holding ``system_message.txt`` directly is taken as the prompt of the one requested
type. The chat sent for an image is ``[system, (user: NNN_caps, assistant: NNN_conv)...,
user: context]``.

Context format (what the model sees of an image; :func:`render_context`)::

    Captions:
    <caption 1>
    ...
    <caption N>

    Objects (category: [x1, y1, x2, y2]):
    <category>: [<x1>, <y1>, <x2>, <y2>]
    ...

Captions are whitespace-collapsed (one line each) and kept in file order, all of them. Boxes
are printed in file order, all of them, every coordinate with exactly ``decimals`` (default 3)
digits after the point (``f"{v:.3f}"``: 0.37 -> ``0.370``), after clipping to [0, 1]. An image
without boxes gets ``(none listed)`` under the header. :func:`parse_context` reads it back.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llava_jax.datagen.annotations import Annotation, Instance, clean_text

__all__ = ["TASKS", "canonical_task", "PromptSet", "load_prompts", "builtin_prompt_dir",
           "render_context", "parse_context", "build_messages", "write_builtin_prompts"]

TASKS: tuple[str, ...] = ("conversation", "detail", "complex")
TASK_ALIASES: dict[str, str] = {
    "conversation": "conversation", "conv": "conversation", "conversations": "conversation",
    "detail": "detail", "detail_description": "detail", "details": "detail",
    "complex": "complex", "complex_reasoning": "complex", "reasoning": "complex",
}
CAPTIONS_HEADER = "Captions:"
OBJECTS_HEADER = "Objects (category: [x1, y1, x2, y2]):"
NO_OBJECTS = "(none listed)"


def canonical_task(name: str) -> str:
    key = name.strip().lower()
    if key not in TASK_ALIASES:
        raise ValueError(f"unknown generation type {name!r}; use {', '.join(TASKS)} "
                         f"(aliases: {', '.join(sorted(set(TASK_ALIASES) - set(TASKS)))})")
    return TASK_ALIASES[key]


def builtin_prompt_dir() -> Path:
    return Path(__file__).resolve().parent / "prompts"


def format_box(bbox: Sequence[float], decimals: int = 3) -> str:
    return "[" + ", ".join(f"{min(1.0, max(0.0, float(v))):.{decimals}f}" for v in bbox) + "]"


def render_context(ann: Annotation, decimals: int = 3) -> str:
    """The user message describing one image (format in the module docstring)."""
    lines = [CAPTIONS_HEADER, *(clean_text(c) for c in ann.captions), "", OBJECTS_HEADER]
    if ann.instances:
        lines += [f"{clean_text(i.category)}: {format_box(i.bbox, decimals)}" for i in ann.instances]
    else:
        lines.append(NO_OBJECTS)
    return "\n".join(lines)


_BOX_LINE = re.compile(r"^(?P<cat>.+?):\s*\[(?P<nums>[^\]]*)\]\s*$")


def parse_context(text: str) -> tuple[list[str], list[Instance]]:
    """(captions, instances) from a :func:`render_context` text; ValueError if it is not one."""
    lines = text.strip("\n").split("\n")
    if not lines or lines[0].strip() != CAPTIONS_HEADER:
        raise ValueError(f"context must start with {CAPTIONS_HEADER!r}")
    try:
        k = lines.index(OBJECTS_HEADER)
    except ValueError:
        raise ValueError(f"context has no {OBJECTS_HEADER!r} line") from None
    caps = [c for c in lines[1:k] if c.strip()]
    insts = []
    for line in lines[k + 1:]:
        if not line.strip() or line.strip() == NO_OBJECTS:
            continue
        m = _BOX_LINE.match(line.strip())
        if not m:
            raise ValueError(f"not an object line: {line!r}")
        nums = [float(v) for v in m.group("nums").split(",")]
        if len(nums) != 4:
            raise ValueError(f"a box needs 4 numbers: {line!r}")
        insts.append(Instance(m.group("cat").strip(), tuple(nums)))
    return caps, insts


@dataclass(frozen=True)
class PromptSet:
    task: str
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, reply)
    source: str  # the folder it came from

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(self.system.encode())
        for c, r in self.examples:
            h.update(b"\x00" + c.encode() + b"\x01" + r.encode())
        return h.hexdigest()

    def messages(self, context: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}]
        for c, r in self.examples:
            msgs += [{"role": "user", "content": c}, {"role": "assistant", "content": r}]
        msgs.append({"role": "user", "content": context})
        return msgs


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def _load_folder(task: str, folder: Path) -> PromptSet:
    sys_path = folder / "system_message.txt"
    if not sys_path.is_file():
        raise FileNotFoundError(f"{folder}: no system_message.txt (prompt folder layout: "
                                "system_message.txt, NNN_caps.txt, NNN_conv.txt)")
    system = _read(sys_path)
    if not system:
        raise ValueError(f"{sys_path} is empty")
    caps = sorted(p for p in folder.iterdir() if re.fullmatch(r"\d+_caps\.txt", p.name))
    examples = []
    for cp in caps:
        rp = folder / cp.name.replace("_caps.txt", "_conv.txt")
        if not rp.is_file():
            raise FileNotFoundError(f"{cp} has no matching {rp.name}")
        examples.append((_read(cp), _read(rp)))
    orphans = [p.name for p in folder.iterdir() if re.fullmatch(r"\d+_conv\.txt", p.name)
               and not (folder / p.name.replace("_conv.txt", "_caps.txt")).is_file()]
    if orphans:
        raise FileNotFoundError(f"{folder}: {orphans} without a matching NNN_caps.txt")
    return PromptSet(task, system, tuple(examples), str(folder))


def load_prompts(tasks: Sequence[str], prompt_dir: str | os.PathLike | None = None) -> dict[str, PromptSet]:
    """{task: PromptSet} for each requested task, from ``prompt_dir`` (None: built-in).

    ``prompt_dir`` holds one sub-folder per type (any alias as its name), or is itself one
    type's folder (has ``system_message.txt``) when a single type is requested."""
    tasks = [canonical_task(t) for t in tasks]
    root = Path(prompt_dir) if prompt_dir is not None else builtin_prompt_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"prompt folder not found: {root}")
    if (root / "system_message.txt").is_file():
        if len(tasks) != 1:
            raise ValueError(f"{root} holds a single prompt (system_message.txt) but {len(tasks)} types "
                             f"were requested; give one sub-folder per type ({', '.join(TASKS)})")
        return {tasks[0]: _load_folder(tasks[0], root)}
    out = {}
    for task in tasks:
        names = [a for a, t in TASK_ALIASES.items() if t == task]
        found = [root / n for n in names if (root / n).is_dir()]
        if not found:
            raise FileNotFoundError(f"{root}: no prompt folder for type {task!r} (looked for "
                                    f"{', '.join(names)})")
        out[task] = _load_folder(task, found[0])
    return out


def build_messages(prompts: PromptSet, ann: Annotation, decimals: int = 3) -> list[dict[str, str]]:
    return prompts.messages(render_context(ann, decimals))


def write_builtin_prompts(dest: str | os.PathLike) -> Path:
    """Copy the built-in prompt folder to ``dest`` (which must not exist) for editing."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; choose a new folder")
    shutil.copytree(builtin_prompt_dir(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest
