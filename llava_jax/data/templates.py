"""Conversation templates: render a conversation into the exact text LLaVA was trained on.

Released checkpoints only work well when they see the prompt format they were trained with, so
every template here reproduces, byte for byte, what the original LLaVA code
(haotian-liu/LLaVA, ``llava/conversation.py`` + ``llava/train/train.py``) renders.

``render(template, turns)`` returns the text and the CHARACTER spans of everything that is
supervised (each assistant reply plus its end separator). Tokenization and labels are derived
from these spans in :mod:`llava_jax.data.tokenize` (one tokenizer call on the whole text, labels
from offsets), so labels never depend on re-tokenizing pieces.

Rendered formats (``S`` = system prompt, ``q``/``a`` = human/assistant texts after image
placement, ``|...|`` = a supervised span):

``vicuna_v1`` (LLaVA-1.5 stage 2; original ``conv_vicuna_v1``, SeparatorStyle.TWO, sep " ",
sep2 "</s>")::

    S USER: q1 ASSISTANT: |a1</s>|USER: q2 ASSISTANT: |a2</s>|
    generation prompt: S USER: q ASSISTANT:            (no trailing space)

``plain`` (stage 1 pretraining; original ``conv_llava_plain`` + ``preprocess_plain``): the human
turn is replaced by just the image token(s); exactly one human/gpt exchange::

    <image>|caption\\n|
    generation prompt: <image>

``llama_2`` (original ``conv_llava_llama_2``, SeparatorStyle.LLAMA_2, sep "<s>", sep2 "</s>",
system = LLaVA's LLaMA-2 system prompt, not Meta's default one)::

    [INST] <<SYS>>\\nS\\n<</SYS>>\\n\\nq1 [/INST] |a1 </s>|<s>[INST] q2 [/INST] |a2 </s>|
    generation prompt: ... [INST] q [/INST]            (no trailing space)

  Derivation: the original builds ``sep + "[INST] " + msg + " [/INST]"`` for user turns
  (system wrapped into the first one) and ``" " + a + " " + sep2`` for replies, then
  ``lstrip("<s>")``. So the text does NOT start with ``<s>`` (the tokenizer adds BOS), every
  later user turn starts with a literal ``<s>`` (tokenized to the BOS id), and the text ends with
  ``a_last </s>``: there is no trailing ``<s>`` (the ``<s>`` belongs to the start of the next
  user turn). The supervised span is ``a + " </s>"``; the space before ``a`` is separator.

``chatml`` (original ``conv_chatml_direct``, SeparatorStyle.MPT, sep "<|im_end|>"; no newline
between turns, unlike some other ChatML renderers)::

    <|im_start|>system\\nS<|im_end|><|im_start|>user\\nq<|im_end|><|im_start|>assistant\\n|a<|im_end|>|
    generation prompt: ...<|im_start|>assistant\\n

``llava_hf`` (llava-hf/llava-1.5-*-hf prompt format; no system prompt)::

    USER: q1 ASSISTANT: |a1</s>|USER: q2 ASSISTANT: |a2</s>|
    generation prompt: USER: q ASSISTANT:

  This is vicuna_v1 without the system prompt, ending turns with ``</s>`` as the weights were
  trained (vicuna_v1). Some versions of the chat_template.json shipped with llava-hf checkpoints
  end assistant turns with a space instead; compare with the checkpoint's own template where
  exact ``apply_chat_template`` parity matters. A system text, when given, renders as
  ``S USER: ...`` (as that chat template does).

Image placement (``Template.image_placement``):

* ``"front"`` (all templates but ``plain``; original ``preprocess_multimodal``): in every human
  turn containing ``<image>``, all ``<image>`` occurrences are removed, the rest is stripped, and
  ``"<image>\\n"`` is put in front; then the result is stripped again. So ``"Q\\n<image>"`` and
  ``"<image>\\nQ"`` both become ``"<image>\\nQ"``, and a turn that is only ``"<image>"`` stays
  ``"<image>"`` (no newline; exactly what the original does). The original supports one image;
  with ``n`` images we put ``n`` copies of ``"<image>\\n"`` in front (same text for ``n == 1``).
  Turns without ``<image>`` are left untouched (text-only rows; not stripped).
* ``"replace"`` (``plain``): the human text becomes ``"<image>" * n`` (n >= 1 required; the
  original asserts the image token is present).

Other choices:

* ``turns`` is a sequence of ``(role, text)`` pairs or dicts in LLaVA (``{"from", "value"}``) or
  HF (``{"role", "content"}``) form. Roles ``human``/``user`` and ``gpt``/``assistant`` (any
  case) are accepted. An optional leading ``system`` turn replaces the template's system prompt
  (an empty system prompt renders no system block at all).
* Conversations must start with a human turn and alternate strictly. Without
  ``add_generation_prompt`` they must end with an assistant turn; with it, with a human turn.
  Empty texts and ``<image>`` inside assistant replies are rejected. All of these raise
  :class:`ValueError` (the data sources count and skip such rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, NamedTuple, Sequence

IMAGE_TOKEN = "<image>"  # DEFAULT_IMAGE_TOKEN of the original code
CHAT_TEMPLATE = "chat_template"  # the name of "the checkpoint tokenizer's own chat template"

HUMAN = "human"
GPT = "gpt"
SYSTEM = "system"
_ROLE_ALIASES = {
    "human": HUMAN,
    "user": HUMAN,
    "gpt": GPT,
    "assistant": GPT,
    "system": SYSTEM,
}


@dataclasses.dataclass(frozen=True)
class Template:
    """How one conversation format is rendered.

    All ``*_format`` fields are ``str.format`` patterns; ``{role}`` is the role name from
    ``roles``, ``{content}`` the turn text (after image placement), ``{system}`` the system
    prompt (in ``system_format``) or the rendered system block (in ``first_user_format``).

    Rendered text = [system block] + for each exchange:
    user turn + ``assistant_prefix`` + ``reply_prefix`` + |reply + ``reply_suffix``|, where only
    the part between bars is supervised. A generation prompt ends with ``assistant_prefix``.
    """

    name: str
    system: str
    roles: tuple[str, str]  # display names of (human, assistant)
    system_format: str  # the system block; rendered only when the system prompt is non-empty
    user_format: str  # one human turn
    assistant_prefix: str  # opens an assistant turn; the generation prompt ends with it
    reply_prefix: str  # unsupervised text between assistant_prefix and the reply
    reply_suffix: str  # supervised end-of-turn separator appended to each reply
    first_user_format: str | None = None  # first human turn, may embed {system}; else user_format
    image_placement: str = "front"  # "front" | "replace"
    max_exchanges: int | None = None  # plain: 1
    description: str = ""
    turn_end: str = ""  # unsupervised text after each reply's reply_suffix (Qwen2: "\n")
    strip_content: bool = False  # strip every message text (Llama-3's `| trim`)

    def __post_init__(self):
        if self.image_placement not in ("front", "replace"):
            raise ValueError(
                f"template {self.name!r}: image_placement must be 'front' or 'replace', "
                f"got {self.image_placement!r}"
            )


class Rendered(NamedTuple):
    """Result of :func:`render`: ``text`` and the supervised ``reply_spans`` [(start, end), ...]
    as character offsets into ``text`` (end exclusive), in order."""

    text: str
    reply_spans: list[tuple[int, int]]


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
CHATML_SYSTEM = "Answer the questions."
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
QWEN2_SYSTEM = "You are a helpful assistant"  # as the Qwen2 tokenizer's own chat template writes it

VICUNA_V1 = Template(
    name="vicuna_v1",
    system=VICUNA_SYSTEM,
    roles=("USER", "ASSISTANT"),
    system_format="{system} ",
    user_format="{role}: {content} ",
    assistant_prefix="{role}:",
    reply_prefix=" ",
    reply_suffix="</s>",
    description="LLaVA-1.5 stage 2 (Vicuna v1): 'S USER: q ASSISTANT: a</s>'",
)

PLAIN = Template(
    name="plain",
    system="",
    roles=("", ""),
    system_format="",
    user_format="{content}",
    assistant_prefix="",
    reply_prefix="",
    reply_suffix="\n",
    image_placement="replace",
    max_exchanges=1,
    description="stage 1 pretraining: '<image>caption\\n'",
)

LLAMA_2 = Template(
    name="llama_2",
    system=LLAVA_LLAMA_2_SYSTEM,
    roles=("USER", "ASSISTANT"),
    system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
    first_user_format="[INST] {system}{content} [/INST]",
    user_format="<s>[INST] {content} [/INST]",
    assistant_prefix="",
    reply_prefix=" ",
    reply_suffix=" </s>",
    description="LLaVA LLaMA-2 chat: '[INST] <<SYS>>...<</SYS>>\\n\\nq [/INST] a </s><s>[INST] ...'",
)

CHATML = Template(
    name="chatml",
    system=CHATML_SYSTEM,
    roles=("user", "assistant"),
    system_format="<|im_start|>system\n{system}<|im_end|>",
    user_format="<|im_start|>{role}\n{content}<|im_end|>",
    assistant_prefix="<|im_start|>{role}\n",
    reply_prefix="",
    reply_suffix="<|im_end|>",
    description="ChatML as LLaVA's chatml_direct: no newline between turns",
)

LLAVA_HF = Template(
    name="llava_hf",
    system="",
    roles=("USER", "ASSISTANT"),
    system_format="{system} ",
    user_format="{role}: {content} ",
    assistant_prefix="{role}:",
    reply_prefix=" ",
    reply_suffix="</s>",
    description="llava-hf checkpoints: 'USER: <image>\\nq ASSISTANT: a</s>'",
)

LLAVA_V1 = dataclasses.replace(
    VICUNA_V1,
    name="llava_v1",
    system=LLAVA_V1_SYSTEM,
    description="the original's conv_llava_v1 (its CLI's template for llava-v1.5 checkpoints): vicuna_v1 "
    "with 'a curious human ... the human's questions'",
)

LLAMA3 = Template(
    name="llama3",
    system="",
    roles=("user", "assistant"),
    system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user_format="<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_prefix="<|start_header_id|>{role}<|end_header_id|>\n\n",
    reply_prefix="",
    reply_suffix="<|eot_id|>",
    strip_content=True,
    description="Llama-3-Instruct: '<|start_header_id|>user<|end_header_id|>\\n\\nq<|eot_id|>...' (BOS from "
    "the tokenizer)",
)

QWEN2 = Template(
    name="qwen2",
    system=QWEN2_SYSTEM,
    roles=("user", "assistant"),
    system_format="<|im_start|>system\n{system}<|im_end|>\n",
    user_format="<|im_start|>{role}\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>{role}\n",
    reply_prefix="",
    reply_suffix="<|im_end|>",
    turn_end="\n",
    description="Qwen2 ChatML: '<|im_start|>user\\nq<|im_end|>\\n<|im_start|>assistant\\na<|im_end|>\\n'",
)

TEMPLATES: dict[str, Template] = {
    t.name: t for t in (VICUNA_V1, LLAVA_V1, PLAIN, LLAMA_2, CHATML, LLAVA_HF, LLAMA3, QWEN2)
}

# Names the original LLaVA code / scripts use for the same formats (``--version``).
TEMPLATE_ALIASES: dict[str, str] = {
    "v1": "vicuna_v1",
    "llava_llama_2": "llama_2",
    "chatml_direct": "chatml",
    "llava-hf": "llava_hf",
}


def get_template(name: str | Template) -> Template:
    """Look a template up by name (or an alias such as ``v1``); a Template is returned as is."""
    if isinstance(name, Template):
        return name
    key = TEMPLATE_ALIASES.get(name, name)
    if key not in TEMPLATES:
        known = ", ".join(sorted(TEMPLATES))
        aliases = ", ".join(f"{a}->{t}" for a, t in sorted(TEMPLATE_ALIASES.items()))
        raise KeyError(f"unknown conversation template {name!r}; known: {known} (aliases: {aliases})")
    return TEMPLATES[key]


def resolve_template(name: str | Template) -> str | Template:
    """A name from config or command line -> a :class:`Template`, or :data:`CHAT_TEMPLATE` (the
    checkpoint tokenizer's own chat template, rendered by :func:`render_chat_template`)."""
    return CHAT_TEMPLATE if name == CHAT_TEMPLATE else get_template(name)


def default_template(tokenizer) -> str:
    """The template a checkpoint is served and evaluated with unless one is named: the llava-jax
    template its tokenizer's chat template was written from (`chat_template_jinja`, e.g. by
    `save_pretrained(..., template=...)`), else its own chat template when it has one, else
    ``vicuna_v1`` (the LLaVA-1.5 recipe)."""
    jinja = getattr(tokenizer, "chat_template", None)
    if not jinja:
        return "vicuna_v1"
    return template_of_chat_template(jinja) or CHAT_TEMPLATE


def chat_template_jinja(template: str = "vicuna_v1") -> str | None:
    """The llava-jax conversation template as a Jinja chat template (`tokenizer.chat_template`):
    what llama.cpp's tools and server apply to chat messages (llama-mtmd-cli refuses a model
    without one), and what an exported llava-hf directory carries so that it is served, chatted
    with and evaluated in the format it was trained in (`template_of_chat_template`). It renders
    exactly what `render` renders for messages whose user content already holds the image
    markers in front ("<__media__>\\n" + text for llama.cpp, as llava-jax puts "<image>\\n" in
    front). None for templates with a shape this simple form does not cover (a system block
    inside the first user turn, stripped contents, image-replacing `plain`)."""
    t = get_template(template)
    if t.first_user_format is not None or t.strip_content or t.image_placement != "front":
        return None
    user, asst = t.roles
    lits = [t.system, t.system_format, t.user_format, t.assistant_prefix, t.reply_prefix, t.reply_suffix, t.turn_end]
    if any(c in s for s in lits for c in ("{%", "{{", "{#", "%}", "}}")):
        return None

    def fmt(s: str, **kw) -> str:  # str.format fields -> Jinja expressions; literal text stays literal
        for k, v in kw.items():
            s = s.replace("{" + k + "}", v)
        return s

    msg = "{{ message['content'] }}"
    default_sys = fmt(t.system_format, system=t.system) if t.system else ""
    return ("{% if messages[0]['role'] == 'system' %}{% if messages[0]['content'] %}"
            + fmt(t.system_format, system="{{ messages[0]['content'] }}") + "{% endif %}"
            + "{% else %}" + default_sys + "{% endif %}"
            + "{% for message in messages %}{% if message['role'] == 'user' %}"
            + fmt(t.user_format, role=user, content=msg)
            + "{% elif message['role'] == 'assistant' %}"
            + fmt(t.assistant_prefix, role=asst) + t.reply_prefix + msg + t.reply_suffix + t.turn_end
            + "{% endif %}{% endfor %}{% if add_generation_prompt %}" + fmt(t.assistant_prefix, role=asst)
            + "{% endif %}")


def template_of_chat_template(jinja) -> str | None:
    """The name of the llava-jax template whose `chat_template_jinja` is exactly `jinja`, else None."""
    if not isinstance(jinja, str):
        return None
    return next((name for name in TEMPLATES if chat_template_jinja(name) == jinja), None)


def _normalize_turn(i: int, turn: Any) -> tuple[str, str]:
    if isinstance(turn, dict):
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
    else:
        try:
            role, text = turn
        except (TypeError, ValueError):
            raise ValueError(f"turn {i}: expected a (role, text) pair or a dict, got {turn!r}") from None
    if not isinstance(role, str) or role.strip().lower() not in _ROLE_ALIASES:
        raise ValueError(
            f"turn {i}: unknown role {role!r}; expected human/user, gpt/assistant or a leading system"
        )
    if not isinstance(text, str):
        raise ValueError(f"turn {i}: text must be a string, got {type(text).__name__}")
    return _ROLE_ALIASES[role.strip().lower()], text


def normalize_turns(turns: Iterable[Any]) -> tuple[str | None, list[tuple[str, str]]]:
    """Returns (system override or None, [(role, text)]) with roles in {"human", "gpt"}."""
    items = [_normalize_turn(i, t) for i, t in enumerate(turns)]
    system = None
    if items and items[0][0] == SYSTEM:
        system = items[0][1]
        items = items[1:]
    for i, (role, _) in enumerate(items):
        if role == SYSTEM:
            raise ValueError("a system turn is only allowed as the first turn")
    return system, items


def _place_images(template: Template, text: str) -> str:
    n = text.count(IMAGE_TOKEN)
    if template.image_placement == "replace":
        if n == 0:
            raise ValueError(
                f"template {template.name!r} needs {IMAGE_TOKEN!r} in the human turn (image-caption "
                "pairs only)"
            )
        return IMAGE_TOKEN * n
    if n == 0:
        return text
    rest = text.replace(IMAGE_TOKEN, "").strip()
    return ((IMAGE_TOKEN + "\n") * n + rest).strip()


def checked_turns(turns: Sequence[Any], add_generation_prompt: bool) -> tuple[str | None, list[tuple[str, str]]]:
    """(system override or None, [(role, text)]) of a well-formed conversation; raises ValueError
    otherwise (see the module docstring). Every renderer checks conversations here."""
    system_override, items = normalize_turns(turns)
    if not items:
        raise ValueError("empty conversation")
    for i, (role, text) in enumerate(items):
        expected = HUMAN if i % 2 == 0 else GPT
        if role != expected:
            raise ValueError(
                f"turn {i}: expected a {expected} turn (conversations start with human and "
                f"alternate human/gpt), got {role}"
            )
        if not text.strip():
            raise ValueError(f"turn {i}: empty {role} text")
        if role == GPT and IMAGE_TOKEN in text:
            raise ValueError(f"turn {i}: {IMAGE_TOKEN!r} inside an assistant reply")
    last = items[-1][0]
    if add_generation_prompt and last != HUMAN:
        raise ValueError("add_generation_prompt=True needs a conversation that ends with a human turn")
    if not add_generation_prompt and last != GPT:
        raise ValueError(
            "conversation ends with a human turn: nothing to supervise (use add_generation_prompt=True "
            "for prompts)"
        )
    return system_override, items


def render(
    template: str | Template,
    turns: Sequence[Any],
    add_generation_prompt: bool = False,
) -> Rendered:
    """Render ``turns`` with ``template``; returns ``Rendered(text, reply_spans)``.

    ``turns``: [(role, text)] (or LLaVA/HF dicts), roles human/user and gpt/assistant, optionally
    a leading system turn. ``add_generation_prompt``: the conversation ends with a human turn and
    the text is extended with the assistant prefix, ready for generation.
    ``reply_spans``: character spans of each reply + its end separator (the supervised text).
    Raises ValueError on a malformed conversation (see module docstring).
    """
    t = get_template(template)
    system_override, items = checked_turns(turns, add_generation_prompt)
    n_exchanges = (len(items) + 1) // 2
    if t.max_exchanges is not None and n_exchanges > t.max_exchanges:
        raise ValueError(
            f"template {t.name!r} takes at most {t.max_exchanges} human/gpt exchange(s), got {n_exchanges}"
        )
    if system_override is not None and t.system_format == "" and system_override:
        raise ValueError(f"template {t.name!r} has no system prompt")

    def clean(text: str) -> str:
        return text.strip() if t.strip_content else text

    system = clean(t.system if system_override is None else system_override)
    system_block = t.system_format.format(system=system) if system else ""
    user_role, asst_role = t.roles

    out: list[str] = []
    pos = 0
    spans: list[tuple[int, int]] = []

    def emit(s: str) -> None:
        nonlocal pos
        out.append(s)
        pos += len(s)

    if t.first_user_format is None:
        emit(system_block)
    for i, (role, text) in enumerate(items):
        if role == HUMAN:
            content = clean(_place_images(t, text))
            if i == 0 and t.first_user_format is not None:
                emit(t.first_user_format.format(role=user_role, content=content, system=system_block))
            else:
                emit(t.user_format.format(role=user_role, content=content))
        else:
            emit(t.assistant_prefix.format(role=asst_role))
            emit(t.reply_prefix)
            start = pos
            emit(clean(text))
            emit(t.reply_suffix)
            spans.append((start, pos))
            emit(t.turn_end)
    if add_generation_prompt:
        emit(t.assistant_prefix.format(role=asst_role))
    return Rendered("".join(out), spans)


def _chat_messages(tokenizer, system: str | None, items: list[tuple[str, str]]) -> list[dict]:
    """HF chat messages for the checkpoint's template. Images go in front of the user text, as
    LLaVA trains them: as ``{"type": "image"}`` parts when the template reads typed parts
    (llava-hf's), else as ``"<image>\\n"`` in the string content (Llama-3, Qwen2)."""
    typed = "type" in (tokenizer.chat_template or "")
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for role, text in items:
        n = text.count(IMAGE_TOKEN) if role == HUMAN else 0
        rest = text.replace(IMAGE_TOKEN, "").strip() if n else text
        role = "user" if role == HUMAN else "assistant"
        if typed:
            parts = [{"type": "image"}] * n + ([{"type": "text", "text": rest}] if rest else [])
            msgs.append({"role": role, "content": parts})
        else:
            msgs.append({"role": role, "content": ((IMAGE_TOKEN + "\n") * n + rest).strip() if n else rest})
    return msgs


def render_chat_template(tokenizer, turns: Sequence[Any], add_generation_prompt: bool = False) -> Rendered:
    """Render ``turns`` with the tokenizer's own chat template (``apply_chat_template``).

    The supervised span of each reply is found, not guessed: the generation prompt of the turns
    before it must be a prefix of the whole text (else ValueError: the template cannot be
    trained on safely); the span starts right there (whitespace the template puts before the
    reply included, as the model generates it), covers the reply (as written, or stripped if the
    template trims it) and ends after the special token that closes the turn (``<|eot_id|>``,
    ``<|im_end|>``, ``</s>``); a template that closes replies with no special token cannot teach
    the model to stop, and training on it raises ValueError. Generation prompts need no spans."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat_template' asked for, but the tokenizer has no chat template")
    system, items = checked_turns(turns, add_generation_prompt)

    def apply(n_items: int, gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(_chat_messages(tokenizer, system, items[:n_items]),
                                                 tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - jinja errors of the checkpoint's template
            raise ValueError(f"the chat template rejected this conversation: {e}") from None

    text = apply(len(items), add_generation_prompt)
    n_img = sum(t.count(IMAGE_TOKEN) for r, t in items if r == HUMAN)
    if text.count(IMAGE_TOKEN) != n_img:
        raise ValueError(f"the chat template wrote {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN!r} for {n_img} images")
    spans: list[tuple[int, int]] = []
    if add_generation_prompt:
        return Rendered(text, spans)
    enders = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    for k in range(1, len(items), 2):
        prompt = apply(k, True)
        if not text.startswith(prompt):
            raise ValueError(f"the chat template's generation prompt for reply {k // 2} is not a prefix of the "
                             "conversation; its replies cannot be located for labels")
        reply = items[k][1]
        pos = len(prompt)
        while pos < len(text) and text[pos].isspace() and not text.startswith(reply, pos):
            pos += 1
        for r in (reply, reply.strip()):
            if text.startswith(r, pos):
                break
        else:
            raise ValueError(f"reply {k // 2} does not follow its generation prompt in the chat template's text")
        end = pos + len(r)
        ender = next((e for e in enders if text.startswith(e, end)), None)
        if ender is None:
            raise ValueError(f"the chat template closes reply {k // 2} with {text[end:end + 12]!r}, not a special "
                             "token: training on it would not teach the model to stop")
        spans.append((len(prompt), end + len(ender)))
    return Rendered(text, spans)
