"""Train a small LLaMA-style tokenizer offline (the demo has no pretrained Vicuna tokenizer;
tests use it too): SentencePiece-like BPE with byte fallback (`<0x00>`..`<0xFF>`), Metaspace
"▁", `<unk>`=0 `<s>`=1 `</s>`=2, BOS added, saved as a transformers `LlamaTokenizer` so
`AutoTokenizer.from_pretrained(dir)` loads the same pipeline a real LLaMA tokenizer gets."""
from __future__ import annotations

import json
import os
from typing import Iterable


def build_llama_tokenizer(texts: Iterable[str], out_dir, *, vocab_size: int = 800, legacy: bool = False,
                          llava_tokens: bool = False, split_punctuation: bool = True) -> str:
    """Train on `texts`, save under `out_dir`, return `out_dir`. `vocab_size` is an upper bound
    (a small corpus may reach fewer pieces). `legacy` is transformers' LlamaTokenizer flag;
    `llava_tokens` also adds `<image>` and `<pad>` as llava-hf does. `split_punctuation` keeps
    punctuation out of the learned merges, so a small vocabulary spends its pieces on words:
    without it a 512-piece BPE on the shapes world learned "circle?" next to "circle" (two
    unrelated ids for one word, depending on the question template). Encoding still runs the
    plain Metaspace pipeline that transformers rebuilds for LLaMA; with no merge across
    punctuation, "circle?" simply encodes as "circle" + "?"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    from llava_jax.data.tokenize import add_llava_special_tokens, save_tokenizer

    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([metaspace, pre_tokenizers.Punctuation("isolated")])
                         if split_punctuation else metaspace)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, min_frequency=1,
                                  show_progress=False)
    # "<image>" is added later as a special token; keep it out of the learned pieces.
    tok.train_from_iterator([t.replace("<image>", " ") for t in texts], trainer)
    vocab = tok.get_vocab(with_added_tokens=True)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    hf = LlamaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=legacy)
    if llava_tokens:
        add_llava_special_tokens(hf)
    path = os.fspath(out_dir)
    # transformers 5 neither saves `legacy` nor keeps it on the object; save_tokenizer records it
    hf.legacy = legacy
    save_tokenizer(hf, path)
    return path
