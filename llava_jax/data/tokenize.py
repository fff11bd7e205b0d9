"""Tokenize a rendered conversation with labels that cannot mismatch.

The original LLaVA derives label masks by re-tokenizing pieces of the prompt (split on the
separators) and counting tokens; when the counts disagree with the whole-string tokenization
(tokenizer version, ``legacy`` flag, unusual characters, separators inside texts) it masks the
whole sample and prints a warning. Here the WHOLE rendered text is tokenized ONCE with a fast
tokenizer (``return_offsets_mapping=True``) and labels come from character offsets:

* ``input_ids`` are exactly ``tokenizer(text).input_ids`` (BOS as the tokenizer adds it; literal
  special tokens in the text such as ``</s>``, ``<s>``, ``<|im_end|>`` become their ids), then each
  ``<image>`` id is expanded to ``num_image_tokens`` copies (the HF llava convention; the model
  scatters the projected image features into those positions).
* **What is supervised.** For each assistant turn: everything the model has to generate after
  the generation prompt, i.e. ``reply_prefix + reply + reply_suffix`` of the template. The reply
  spans of :func:`~llava_jax.data.templates.render` (reply + end separator) are extended to the
  left by ``len(template.reply_prefix)``. For ``vicuna_v1``/``llava_hf``/``llama_2`` that is the
  one space after ``ASSISTANT:`` / ``[/INST]``: generation prompts end without it, so at
  inference the model produces it (inside ``▁word`` or as a lone ``▁``). For ``chatml`` and
  ``plain`` the prefix is empty. This is exactly what the original LLaVA supervises when its
  counts do match (its ``instruction_len = len(tokenize(prompt + " ")) - 2`` drops the trailing
  ``▁``, which then belongs to the reply).
* **Boundary rule.** A token is supervised iff the characters it was produced from intersect a
  supervised range (non-empty intersection). Consequences:

  - SentencePiece/Metaspace: for ``ASSISTANT: a1`` the token ``▁a1`` (covering `` a1``) is
    supervised; when the reply starts with a character that has no ``▁x`` piece (an emoji in
    byte fallback, a rare letter), the lone ``▁`` token is supervised too. Decoding the
    supervised tokens of one turn gives ``reply + reply_suffix``, preceded by the template's
    ``reply_prefix`` (one space) unless the decoder strips it (LLaMA's decoder strips one leading
    space at the start of a decode).
  - ByteLevel (GPT-2/Qwen): ``Ġa1`` is supervised likewise.
  - A token that straddles a boundary (prompt characters merged with supervised ones) is
    supervised. With the templates here this does not occur at the end of a range (the end
    separators ``</s>``, ``<|im_end|>`` are special tokens, ``\\n`` ends the ``plain`` text), and
    at the start only through the ``▁``/``Ġ`` space described above.
  - Tokens with an empty character range: tokens inserted by the post-processor (BOS, flagged in
    ``special_tokens_mask``) are never supervised; other zero-width tokens (e.g. whitespace
    trimmed away by ``trim_offsets``) are supervised iff their position lies inside a range.
  - Image tokens are never supervised (``<image>`` is rejected inside replies).

Labels use ``IGNORE_INDEX`` (-100) for unsupervised positions and are aligned with
``input_ids`` (unshifted: the loss shifts them, as HF does).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from llava_jax.config import IGNORE_INDEX
from llava_jax.data.templates import CHAT_TEMPLATE, IMAGE_TOKEN, Template, get_template, render, render_chat_template

PAD_TOKEN = "<pad>"


class LlavaTokenIds(NamedTuple):
    image_token_id: int
    pad_token_id: int | None


def load_tokenizer(path: str | os.PathLike):
    """Load a HF tokenizer (a local directory with tokenizer.json / tokenizer_config.json) as a
    FAST tokenizer. Raises ValueError when only a slow tokenizer is available: character offsets,
    which the labels are derived from, need a fast (``tokenizers``-backed) one."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:  # noqa: BLE001 - re-raised with a clearer message
        where = "directory" if os.path.isdir(path) else "path (not a local directory)"
        raise ValueError(
            f"could not load a tokenizer from {where} {path!r}: {type(e).__name__}: {e}. "
            "Expected a HF tokenizer directory containing tokenizer.json (a fast tokenizer)."
        ) from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"tokenizer at {path!r} ({type(tok).__name__}) is not a fast tokenizer; llava_jax needs "
            "character offsets (return_offsets_mapping). Convert it to a tokenizer.json, e.g. load it "
            "once with transformers on a machine with sentencepiece and call save_pretrained."
        )
    return tok


def save_tokenizer(tokenizer, out_dir) -> None:
    """``tokenizer.save_pretrained(out_dir)``, plus what transformers 5 leaves out and the prompt
    tokenization depends on: the ``legacy`` flag of a SentencePiece-style tokenizer (written into
    ``tokenizer_config.json``) and its ``tokenizer.model`` (copied, so SentencePiece keeps encoding
    the pieces; see :mod:`llava_jax.data.encoder`)."""
    import json
    import shutil

    from llava_jax.data.encoder import prompt_encoder

    out_dir = os.fspath(out_dir)
    tokenizer.save_pretrained(out_dir)
    enc = prompt_encoder(tokenizer)
    if enc.legacy is None:
        return
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["legacy"] = enc.legacy
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    src = enc.model_file
    if src and not os.path.exists(os.path.join(out_dir, "tokenizer.model")):
        shutil.copyfile(src, os.path.join(out_dir, "tokenizer.model"))


def add_llava_special_tokens(
    tokenizer, image_token: str = IMAGE_TOKEN, pad_token: str | None = PAD_TOKEN
) -> LlavaTokenIds:
    """Add ``<image>`` (and ``<pad>``) as llava-hf does and return their ids.

    On a 32000-token LLaMA vocabulary this gives ``<image>`` = 32000 and ``<pad>`` = 32001 (in
    this order), as in llava-hf checkpoints. ``<image>`` is added as a special, non-normalized
    token so it always tokenizes to one id. ``<pad>`` is added and made the pad token; pass
    ``pad_token=None`` to keep the tokenizer's existing pad token (e.g. Qwen's). Tokens that are
    already present (a llava-hf tokenizer) are not added again. Mutates ``tokenizer``.
    """
    from tokenizers import AddedToken

    # Always (re-)declare <image> as an added special token: a vocab that merely learned the
    # string as a BPE piece would still merge it with neighbours ("▁<image>\n").
    if image_token not in tokenizer.get_added_vocab():
        tokenizer.add_tokens(
            [AddedToken(image_token, special=True, normalized=False, lstrip=False, rstrip=False)],
            special_tokens=True,
        )
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab() or tokenizer.pad_token != pad_token:
            tokenizer.add_special_tokens(
                {"pad_token": AddedToken(pad_token, special=True, normalized=False)}
            )
    pad_id = tokenizer.pad_token_id
    # Sanity: <image> must encode to exactly one id.
    ids = tokenizer(f"a{image_token}b", add_special_tokens=False).input_ids
    if ids.count(image_id) != 1:
        raise ValueError(f"{image_token!r} does not tokenize to a single id (got {ids})")
    return LlavaTokenIds(int(image_id), None if pad_id is None else int(pad_id))


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; labels are computed from character "
            "offsets, which need one (see load_tokenizer)"
        )


def supervised_mask(
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
    special_tokens_mask: Sequence[int] | None = None,
) -> np.ndarray:
    """Boolean mask: which tokens (given their character ``offsets``) are supervised by
    ``spans``. See the module docstring for the boundary rule."""
    n = len(offsets)
    if n == 0 or len(spans) == 0:
        return np.zeros(n, dtype=bool)
    off = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    s, e = off[:, 0], off[:, 1]
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    span_s, span_e = sp[:, 0][None, :], sp[:, 1][None, :]
    overlap = (s[:, None] < span_e) & (e[:, None] > span_s)  # non-empty intersection
    point = (s[:, None] >= span_s) & (s[:, None] < span_e)  # zero-width token inside a span
    empty = e <= s
    mask = np.where(empty, point.any(axis=1), overlap.any(axis=1))
    if special_tokens_mask is not None:
        added = np.asarray(special_tokens_mask, dtype=bool)
        mask &= ~(added & empty)
    return mask


def label_spans(template: str | Template, reply_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The character ranges to supervise: each reply span (reply + end separator, from
    ``render``) extended left by the template's ``reply_prefix`` (what the model generates after
    the generation prompt)."""
    if template == CHAT_TEMPLATE:  # render_chat_template's spans already start where generation does
        return list(reply_spans)
    p = len(get_template(template).reply_prefix)
    return [(s - p, e) for s, e in reply_spans]


def encode_prompt(tokenizer, text: str, *, add_special_tokens: bool = True, image_token_id: int | None = None):
    """THE tokenization rule, for training, serving and eval alike: ``text`` is split at
    ``<image>`` and each segment is tokenized as its own call (special tokens such as BOS only
    on the first), with the image token id between segments, as the original LLaVA's
    ``tokenizer_image_token`` does; each call is made as the checkpoint's tokenizer was trained
    to (:mod:`llava_jax.data.encoder`). Returns an :class:`~llava_jax.data.encoder.Encoding`
    with offsets into ``text``."""
    from llava_jax.data.encoder import Encoding, prompt_encoder

    _check_fast(tokenizer)
    call = prompt_encoder(tokenizer)
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, offsets, special = [], [], []
    pos = 0
    for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(np.asarray([image_token_id], np.int32))
            offsets.append(np.asarray([[pos, pos + len(IMAGE_TOKEN)]], np.int64))
            special.append(np.zeros(1, bool))
            pos += len(IMAGE_TOKEN)
        enc = call(chunk, add_special_tokens=add_special_tokens and k == 0)
        ids.append(enc.ids)
        offsets.append(enc.offsets + pos)
        special.append(enc.special)
        pos += len(chunk)
    return Encoding(np.concatenate(ids).astype(np.int32), np.concatenate(offsets), np.concatenate(special))


def encode_with_labels(tokenizer, text: str, spans: Sequence[tuple[int, int]], *, add_special_tokens: bool = True,
                       image_token_id: int | None = None):
    """Tokenize ``text`` by :func:`encode_prompt`; returns ``(input_ids, labels)`` as np.int32
    arrays (before image expansion). ``labels[i] = input_ids[i]`` where token i intersects one of
    the character ``spans`` (see :func:`label_spans`), else IGNORE_INDEX."""
    enc = encode_prompt(tokenizer, text, add_special_tokens=add_special_tokens, image_token_id=image_token_id)
    mask = supervised_mask(enc.offsets, spans, enc.special)
    labels = np.where(mask, enc.ids, IGNORE_INDEX).astype(np.int32)
    return enc.ids, labels


def expand_image_tokens(input_ids: np.ndarray, labels: np.ndarray, image_token_id: int,
                        num_image_tokens: int | Sequence[int]):
    """Repeat every ``image_token_id`` ``num_image_tokens`` times (labels IGNORE_INDEX there).

    ``num_image_tokens``: one count for every image (LLaVA-1.5: 576), or one count per image in
    order (LLaVA-NeXT AnyRes: ``data.anyres.num_image_tokens`` of each image's size; 1 leaves an
    image as its single token, for a caller that learns the counts later)."""
    is_img = input_ids == image_token_id
    counts = np.asarray(num_image_tokens, np.int64)
    if counts.ndim and counts.size != int(is_img.sum()):
        raise ValueError(f"{int(is_img.sum())} image tokens in the text but {counts.size} per-image token counts")
    if counts.size and counts.min() < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    reps = np.ones(len(input_ids), np.int64)
    reps[is_img] = counts
    ids = np.repeat(input_ids, reps).astype(np.int32)
    lab = np.repeat(np.where(is_img, IGNORE_INDEX, labels), reps).astype(np.int32)
    return ids, lab


def tokenize_conversation(
    tokenizer,
    template: str | Template,
    turns: Sequence[Any],
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    max_length: int | None = None,
    add_generation_prompt: bool = False,
) -> dict:
    """Render ``turns`` with ``template``, tokenize by :func:`encode_prompt`, derive labels from
    offsets, expand images (``num_image_tokens``: one count for all images, or one per image as
    :func:`expand_image_tokens` takes it). The one path from a conversation to ids: the data pipeline, the
    server, the chat CLI and ``eval.answer`` all call it.

    ``template``: a name from :mod:`llava_jax.data.templates` or ``"chat_template"`` (the
    tokenizer's own, :func:`~llava_jax.data.templates.render_chat_template`; BOS is added unless
    the rendered text starts with it, as ``apply_chat_template`` / ``LlavaProcessor`` do).
    Returns ``{"input_ids": np.int32[L], "labels": np.int32[L] (IGNORE_INDEX = -100 = ignore),
    "num_images": int, "text": the rendered prompt}``. ``max_length`` truncates the (expanded)
    sequence on the right; it raises ValueError when that would cut into or drop an image's
    tokens (the images would no longer match the pixel inputs). Raises ValueError for malformed
    conversations (see templates.render) and when ``<image>`` is not the single token
    ``image_token_id`` of this tokenizer.
    """
    if template == CHAT_TEMPLATE:
        text, spans = render_chat_template(tokenizer, turns, add_generation_prompt=add_generation_prompt)
        bos = tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
    else:
        template = get_template(template)
        text, spans = render(template, turns, add_generation_prompt=add_generation_prompt)
        add_special = True
    num_images = text.count(IMAGE_TOKEN)
    if num_images and tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
        raise ValueError(
            f"{IMAGE_TOKEN!r} is not a token of this tokenizer with id image_token_id={image_token_id} (it maps "
            f"to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}): call add_llava_special_tokens(tokenizer) and "
            "pass its id"
        )
    ids, labels = encode_with_labels(tokenizer, text, label_spans(template, spans), add_special_tokens=add_special,
                                     image_token_id=image_token_id)
    ids, labels = expand_image_tokens(ids, labels, image_token_id, num_image_tokens)
    if max_length is not None and len(ids) > max_length:
        img_pos = np.flatnonzero(ids == image_token_id)
        if img_pos.size and img_pos[-1] >= max_length:
            raise ValueError(
                f"sequence of {len(ids)} tokens truncated to max_length={max_length} would cut image "
                f"tokens (last image token at {int(img_pos[-1])}); raise max_length or drop the sample"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "num_images": num_images, "text": text}


def end_of_turn_ids(tokenizer, template: str | Template) -> list[int]:
    """The token that closes an assistant reply in ``template``, where it is a single token
    (``</s>``, ``<|eot_id|>``, ``<|im_end|>``), as ``[id]``; else ``[]``. Generation stops on it
    besides the tokenizer's and the model config's EOS (a Llama-3 or Qwen2 tokenizer's EOS is
    not its end of turn)."""
    if template == CHAT_TEMPLATE:
        try:
            text, ((start, end),) = render_chat_template(tokenizer, [("human", "Hi"), ("gpt", "Hello")])
        except ValueError:
            return []
        marker = text[text.index("Hello", start) + len("Hello"):end]
    else:
        marker = get_template(template).reply_suffix.strip()
    ids = tokenizer(marker, add_special_tokens=False).input_ids if marker else []
    return [int(ids[0])] if len(ids) == 1 else []
