"""One tokenizer call, made the way the checkpoint's weights were trained to read text.

The original LLaVA trained with the SLOW SentencePiece tokenizer of its pinned transformers
(4.31 for LLaVA-1.5, 4.37.2 at its last commit). transformers 5 only has fast tokenizers, and
for LLaMA's ``tokenizer.model`` they differ from that slow tokenizer in three ways that change
token ids on real LLaVA data (measured on ``../shared/llava_reference`` with the original's code,
see ``tests/test_original_llava.py``):

* whitespace runs: the converted BPE merges ``"are  lined"`` as ``▁▁ lined`` where SentencePiece
  gives ``▁ ▁l ined``;
* a text that starts with a space: SentencePiece keeps its dummy prefix (``" Hello"`` ->
  ``▁ ▁Hello``), the fast Metaspace drops it (``▁Hello``);
* the ``legacy`` flag: a ``tokenizer_config.json`` without ``legacy`` meant ``True`` in
  transformers 4 (every LLaMA-1-era checkpoint and what LLaVA trained with) and means ``False``
  in transformers 5.

So for SentencePiece-style vocabularies (a BPE with the ``▁`` metaspace: LLaMA, LLaMA-2,
Vicuna, Mistral, and the demo's own tokenizer) :class:`PromptEncoder` reproduces the slow
tokenizer's call: split at added tokens (honouring their ``lstrip``/``rstrip``), then

* ``legacy=True``: every text piece gets SentencePiece's dummy prefix ``▁``;
* ``legacy=False``: the call's text gets one ``▁`` in front (``"▁" + text``), pieces are encoded
  without a dummy prefix (a piece that starts with a space through the ``<unk>`` trick of
  transformers' ``LlamaTokenizer._tokenize``), and a lone leading ``▁`` is dropped when a special
  token follows it;

with the pieces encoded by the SentencePiece library itself when the directory has the
``tokenizer.model`` (exact by construction), else by the fast tokenizer's own BPE. A missing
``legacy`` key is read as ``True`` (logged once). Other tokenizers (byte-level BPE: Llama-3,
Qwen2) are called as they are. Every call returns character offsets, from which labels are
derived (:mod:`llava_jax.data.tokenize`). :func:`legacy_flag` says how the flag is read when
the config lacks it; llava-jax writes it whenever it saves a tokenizer
(:func:`llava_jax.data.tokenize.save_tokenizer`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import weakref
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)
METASPACE = "\u2581"


class Encoding(NamedTuple):
    """One call's result: ``ids`` [T] int32, ``offsets`` [T, 2] character ranges into the text
    (zero-width for inserted tokens), ``special`` [T] bool: tokens the call inserted (BOS)."""

    ids: np.ndarray
    offsets: np.ndarray
    special: np.ndarray


def _byte_to_char(text: str) -> np.ndarray:
    """Character index of every UTF-8 byte offset of ``text`` (length len(bytes) + 1)."""
    lens = [len(c.encode("utf-8")) for c in text]
    out = np.repeat(np.arange(len(text)), lens) if text else np.zeros(0, np.int64)
    return np.concatenate([out, [len(text)]]).astype(np.int64)


class _SentencePiecePieces:
    """Text pieces encoded by the SentencePiece library from ``tokenizer.model``."""

    def __init__(self, model_file: str, dummy_prefix: bool):
        import sentencepiece as spm

        data = open(model_file, "rb").read()
        if not dummy_prefix:  # what the slow tokenizer loads for legacy=False
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto.FromString(data)
            proto.normalizer_spec.add_dummy_prefix = False
            data = proto.SerializeToString()
        self.sp = spm.SentencePieceProcessor(model_proto=data)

    def __call__(self, text: str) -> list[tuple[int, int, int]]:
        try:
            proto = self.sp.encode(text, return_type="proto")
        except TypeError:  # sentencepiece < 0.2.1
            proto = self.sp.encode(text, out_type="immutable_proto")
        b2c = _byte_to_char(text)
        return [(p.id, int(b2c[p.begin]), int(b2c[p.end])) for p in proto.pieces]


class _FastBpePieces:
    """Text pieces encoded by the fast tokenizer's BPE (no ``tokenizer.model`` at hand)."""

    def __init__(self, backend_json: dict, dummy_prefix: bool):
        from tokenizers import Tokenizer

        j = dict(backend_json)
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": METASPACE}
        norms = ([{"type": "Prepend", "prepend": METASPACE}] if dummy_prefix else []) + [replace]
        j.update(normalizer={"type": "Sequence", "normalizers": norms}, pre_tokenizer=None,
                 post_processor=None, added_tokens=[])
        self.tok = Tokenizer.from_str(json.dumps(j))

    def __call__(self, text: str) -> list[tuple[int, int, int]]:
        enc = self.tok.encode(text, add_special_tokens=False)
        return [(i, s, e) for i, (s, e) in zip(enc.ids, enc.offsets)]


def _is_metaspace_bpe(backend_json: dict) -> bool:
    """A SentencePiece-style BPE: the ``▁`` metaspace in the pre-tokenizer or normalizer."""
    if backend_json.get("model", {}).get("type") != "BPE":
        return False
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" or node.get("content") == METASPACE or node.get("prepend") == METASPACE:
                found.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk([backend_json.get("pre_tokenizer"), backend_json.get("normalizer")])
    return bool(found)


def _pipeline_is_legacy(backend_json: dict) -> bool:
    """Whether a tokenizer.json pipeline prefixes every piece (legacy: a ``Prepend`` normalizer or a
    Metaspace that prepends ``always``) rather than the first one only."""
    text = json.dumps([backend_json.get("normalizer"), backend_json.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text


def legacy_flag(tokenizer) -> bool:
    """Whether a SentencePiece-style tokenizer is ``legacy`` (see the module docstring), read from
    its files, since transformers 5 neither keeps nor saves the flag and rebuilds the pipeline
    on load:

    1. ``tokenizer_config.json`` has ``legacy``: that;
    2. else a ``tokenizer.json`` is there: the pipeline it holds (transformers 5 writes the flag
       only there: a Metaspace that prepends ``always`` is legacy, ``first`` is not);
    3. else (``tokenizer.model`` only, LLaMA-1 era): ``True``, as transformers 4 read it (logged).

    A tokenizer built in memory answers with its own ``legacy`` attribute."""
    folder = str(tokenizer.name_or_path)
    cfg = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isdir(folder):
        return bool(getattr(tokenizer, "legacy", True))
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            legacy = json.load(f).get("legacy")
        if legacy is not None:
            return bool(legacy)
    tok_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tok_json):
        with open(tok_json, encoding="utf-8") as f:
            return _pipeline_is_legacy(json.load(f))
    log.info("%s: no 'legacy' key and no tokenizer.json; tokenizing as legacy=True, as transformers 4 (and "
             "every LLaVA checkpoint trained with it) read it", folder)
    return True


class PromptEncoder:
    """Makes one tokenizer call (see the module docstring). Build with :func:`prompt_encoder`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.n_vocab = len(tokenizer)
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        self.sentencepiece = _is_metaspace_bpe(backend)
        self.bos_id = tokenizer.bos_token_id
        # whether a call adds BOS: what the tokenizer's own post-processor does
        self.add_bos = self.bos_id is not None and tokenizer("", add_special_tokens=True).input_ids[:1] == [self.bos_id]
        self.model_file = None
        if not self.sentencepiece:
            self.kind, self.legacy = "fast", None
            return
        self.legacy = legacy_flag(tokenizer)
        model_file = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
        if model_file and os.path.isfile(model_file):
            self.kind, self.model_file = "sentencepiece", model_file
            self.pieces = _SentencePiecePieces(model_file, dummy_prefix=self.legacy)
        else:
            self.kind = "bpe"
            self.pieces = _FastBpePieces(backend, dummy_prefix=self.legacy)
        self.added = {t.content: (int(i), t) for i, t in tokenizer.added_tokens_decoder.items()}
        self.special_ids = set(tokenizer.all_special_ids)
        alts = sorted(self.added, key=len, reverse=True)
        self.added_re = re.compile("|".join(map(re.escape, alts))) if alts else None
        self.unk = tokenizer.unk_token
        self.unk_len = len(self.pieces(self.unk)) if self.unk else 0
        self.lone_metaspace = tokenizer.convert_tokens_to_ids(METASPACE)

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        if not self.sentencepiece:
            enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                                 return_special_tokens_mask=True)
            offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
            special = np.asarray(enc["special_tokens_mask"], bool) & (offsets[:, 1] <= offsets[:, 0])
            return Encoding(np.asarray(enc["input_ids"], np.int32), offsets, special)
        toks = self._slow_call(text)
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            toks.insert(0, (int(self.bos_id), 0, 0, True))
        ids = np.asarray([t[0] for t in toks], np.int32)
        offsets = np.asarray([(t[1], t[2]) for t in toks], np.int64).reshape(-1, 2)
        special = np.asarray([t[3] for t in toks], bool)
        return Encoding(ids, offsets, special)

    def _split_added(self, text: str) -> list[tuple[int, int, int | None]]:
        """(start, end, added-token id or None) over ``text``, as the slow tokenizer splits it:
        added tokens are matched leftmost-longest, ``rstrip``/``lstrip`` eat the whitespace
        beside them, empty pieces are dropped."""
        parts: list[list] = []
        pos = 0
        for m in (self.added_re.finditer(text) if self.added_re else ()):
            parts.append([pos, m.start(), None])
            parts.append([m.start(), m.end(), self.added[m.group()][0]])
            pos = m.end()
        parts.append([pos, len(text), None])
        for k, (s, e, tid) in enumerate(parts):
            if tid is None:
                continue
            tok = self.tokenizer.added_tokens_decoder[tid]
            if tok.rstrip and k + 1 < len(parts):
                nxt = parts[k + 1]
                nxt[0] += len(text[nxt[0]:nxt[1]]) - len(text[nxt[0]:nxt[1]].lstrip())
            if tok.lstrip and k > 0:
                prv = parts[k - 1]
                prv[1] -= len(text[prv[0]:prv[1]]) - len(text[prv[0]:prv[1]].rstrip())
        return [(s, e, tid) for s, e, tid in parts if e > s]

    def _encode_piece(self, text: str) -> list[tuple[int, int, int]]:
        if self.legacy or self.kind != "sentencepiece" or not text.startswith((METASPACE, " ")):
            return self.pieces(text)
        # transformers' LlamaTokenizer._tokenize: encode "<unk>" + text and drop the <unk> pieces,
        # so SentencePiece (no dummy prefix) keeps the leading space as it would mid-text.
        n = len(self.unk)
        return [(i, s - n, e - n) for i, s, e in self.pieces(self.unk + text)[self.unk_len:]]

    def _slow_call(self, text: str) -> list[tuple[int, int, int, bool]]:
        shift = 0
        if not self.legacy and text:
            text, shift = METASPACE + text.replace(METASPACE, " "), 1
        toks: list[tuple[int, int, int, bool]] = []
        for s, e, tid in self._split_added(text):
            if tid is not None:
                toks.append((tid, s, e, False))
            else:
                toks.extend((i, s + a, s + b, False) for i, a, b in self._encode_piece(text[s:e]))
        if shift and len(toks) > 1 and toks[0][0] == self.lone_metaspace and toks[1][0] in self.special_ids:
            toks = toks[1:]
        n = len(text) - shift
        return [(i, min(max(s - shift, 0), n), min(max(e - shift, 0), n), sp) for i, s, e, sp in toks]


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def prompt_encoder(tokenizer) -> PromptEncoder:
    """The :class:`PromptEncoder` of ``tokenizer`` (built once per tokenizer, rebuilt when tokens
    were added since)."""
    with _LOCK:
        enc = _CACHE.get(tokenizer)
        if enc is None or enc.n_vocab != len(tokenizer):
            enc = _CACHE[tokenizer] = PromptEncoder(tokenizer)
        return enc
