"""Offline test tokenizers (no hub, no sentencepiece): tiny BPE vocabularies trained in
milliseconds with the ``tokenizers`` library, wrapped in transformers classes and saved with
``save_pretrained`` so that ``AutoTokenizer.from_pretrained(path)`` loads them.

* :func:`make_llama_tokenizer` - LLaMA/Vicuna-style: SentencePiece-like BPE with byte fallback
  (``<0x00>``..``<0xFF>``), Metaspace "▁", ``<unk>``=0 ``<s>``=1 ``</s>``=2, BOS added. Saved as
  a transformers ``LlamaTokenizer`` (the class llava-hf checkpoints use), so loading rebuilds the
  same pipeline a real LLaMA tokenizer gets in transformers 5.
* :func:`make_bytelevel_tokenizer` - GPT-2/Qwen2-style ByteLevel BPE with ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>`` (for ChatML), saved as a ``Qwen2Tokenizer``; no BOS.

Both are deterministic (same corpus, same trainer) and build in well under a second.
Keep these signatures stable: other tests import them.
"""

from __future__ import annotations

import os

_TEMPLATE_TEXT = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "USER: <image>\nWhat is in the image? ASSISTANT: The image shows a cat.</s>"
    "USER: What color is it? ASSISTANT: It is black and white.</s>",
    "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the "
    "visual content that the user provides, and assist the user with a variety of tasks using natural "
    "language.\n<</SYS>>\n\nDescribe the picture. [/INST] A man rides a horse. </s><s>[INST] Why? [/INST]",
    "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHello<|im_end|>"
    "<|im_start|>assistant\nHi there<|im_end|>",
]

_ENGLISH = """
The quick brown fox jumps over the lazy dog. A man is riding a bicycle down the street next to a
bus. Two dogs are playing with a frisbee in the park while people watch. The kitchen has a white
refrigerator, a stove, a sink and wooden cabinets. There are several cars parked along the road,
and a traffic light is visible in the background. A woman holding an umbrella walks in the rain.
The table is covered with plates of food, cups of coffee and a vase of flowers. A group of people
stand on a beach near the ocean, flying kites in the wind. The giraffe is eating leaves from a
tall tree. A train travels on the tracks past a station. This image depicts a living room with a
couch, a television, a lamp and a bookshelf. What are the main objects in the picture? How many
people are there? Where is the boy standing? Why might the person be doing this? Describe the
scene in detail. It appears that they are preparing for a trip, possibly to the airport. The
color of the suitcases is black and brown with yellow details. He is wearing a red shirt, blue
jeans and black shoes. She is sitting on a bench reading a book. Their luggage is stacked on the
sidewalk. In addition, the sky is clear and sunny, which suggests a warm day outside.
"""

_DIGITS = "0 1 2 3 4 5 6 7 8 9 10 12 20 25 50 100 2014 3.5 1,000 42% $19.99 (1) [2] {3} #4 @5"


def _corpus() -> list[str]:
    lines = [s for s in _ENGLISH.split("\n") if s.strip()]
    return (_TEMPLATE_TEXT + lines + [_DIGITS]) * 2


def segment_ids(tok, text: str, image_id: int) -> list[int]:
    """The original LLaVA's ``tokenizer_image_token`` rule made with ``tok``'s own calls: each text
    segment between ``<image>`` tokenized alone (BOS on the first only), the image id between."""
    out: list[int] = []
    for k, chunk in enumerate(text.split("<image>")):
        out += ([image_id] if k else []) + tok(chunk, add_special_tokens=k == 0).input_ids
    return out


def make_llama_tokenizer(
    tmpdir,
    *,
    vocab_size: int = 800,
    legacy: bool = False,
    llava_tokens: bool = False,
) -> str:
    """Build a LLaMA-style tokenizer offline, save it under ``tmpdir`` and return its directory.

    Vocab: ``<unk>``=0, ``<s>``=1, ``</s>``=2, the 256 byte-fallback tokens ``<0x00>``..``<0xFF>``
    (ids 3..258, as in LLaMA), then BPE pieces up to ``vocab_size`` (an upper bound: the corpus
    is small, about 1000 tokens are reachable; the default 800 is reached exactly). ``legacy`` is
    transformers' LlamaTokenizer flag (False: "▁" is prepended only at the start of the text,
    True: also after every special token, like sentencepiece); it is written to
    tokenizer_config.json. ``llava_tokens=True`` also adds ``<image>`` and ``<pad>`` as llava-hf
    does (ids ``vocab_size`` and ``vocab_size + 1`` with the default size).
    """
    from llava_jax.data.tokenizer_build import build_llama_tokenizer

    path = os.path.join(os.fspath(tmpdir), "llama_tokenizer" + ("_legacy" if legacy else ""))
    if llava_tokens:
        path += "_llava"
    return build_llama_tokenizer(_corpus(), path, vocab_size=vocab_size, legacy=legacy, llava_tokens=llava_tokens)


def make_bytelevel_tokenizer(tmpdir, *, vocab_size: int = 800, llava_tokens: bool = False) -> str:
    """Build a GPT-2/Qwen2-style ByteLevel BPE tokenizer offline (no BOS; ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>`` special, eos ``<|im_end|>``, pad ``<|endoftext|>``), save
    under ``tmpdir`` and return its directory. ``<|endoftext|>`` = 0, BPE pieces up to
    ``vocab_size`` (an upper bound, about 850 are reachable), then ``<|im_start|>``,
    ``<|im_end|>``. ``llava_tokens=True`` also adds ``<image>`` and ``<pad>``."""
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    vocab = tok.get_vocab(with_added_tokens=True)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    hf = Qwen2Tokenizer(vocab=vocab, merges=merges)
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
                  special_tokens=True)
    hf.eos_token = "<|im_end|>"
    if llava_tokens:
        from llava_jax.data.tokenize import add_llava_special_tokens

        add_llava_special_tokens(hf)
    path = os.path.join(os.fspath(tmpdir), "bytelevel_tokenizer" + ("_llava" if llava_tokens else ""))
    hf.save_pretrained(path)
    return path
