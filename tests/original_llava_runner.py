"""Runs the ORIGINAL LLaVA's own preprocessing, in a subprocess, under its own pinned stack.

Started by ``tests/original_llava.py`` with ``PYTHONPATH`` pointing at a ``pip install --target``
folder that holds ``llava-torch==1.2.2.post1`` (the original haotian-liu/LLaVA package on PyPI:
``llava/train/train.py``, ``llava/mm_utils.py`` and ``llava/conversation.py`` are byte-identical
to the repository's last commit c121f04) and that commit's pins: transformers 4.37.2, tokenizers
0.15.1, sentencepiece 0.1.99. Nothing here re-implements the original: it calls its functions
the way its ``train.py`` does (slow tokenizer, ``pad_token = unk_token``, ``--version`` picks
``conversation_lib.default_conversation``, ``preprocess_multimodal`` then ``preprocess``).

stdin: JSON ``{"tokenizer_dir", "version", "rows": [[{"from", "value"}, ...], ...]}``; with
``"mode": "prompts"`` (no tokenizer needed) the result per row is ``{"prompt": conv.get_prompt()}``
for the conversation after ``preprocess_multimodal`` (and, with ``"generation": true``, the
last gpt turn replaced by the empty assistant message the original's CLI appends).
stdout: JSON ``{"versions": {...}, "legacy": bool, "results": [{"input_ids", "labels",
"mismatch"}, ...]}``; the image token is the original's ``IMAGE_TOKEN_INDEX`` (-200);
``mismatch`` is True when the original printed its "tokenization mismatch" warning (it then
masks the whole sample).
"""

import contextlib
import copy
import io
import json
import sys


def main() -> None:
    req = json.load(sys.stdin)
    # transformers 4.37's Trainer module imports these whenever the test environment has them
    # (peft is a test dependency; lmms-eval brings datasets and accelerate), and their current
    # releases need a newer huggingface-hub than the original's pinned 0.20.3. The original's
    # preprocessing uses none of them: hide them (find_spec then says "not installed").
    for optional in ("peft", "datasets", "accelerate"):
        sys.modules[optional] = None
    import sentencepiece
    import tokenizers
    import transformers

    from llava import conversation as conversation_lib
    from llava.train import train as llava_train

    if req.get("mode") == "prompts":
        data_args = llava_train.DataArguments(is_multimodal=True)
        data_args.mm_use_im_start_end = False
        conversation_lib.default_conversation = conversation_lib.conv_templates[req["version"]]
        out = []
        for conv in req["rows"]:
            (source,) = llava_train.preprocess_multimodal(copy.deepcopy([conv]), data_args)
            c = conversation_lib.default_conversation.copy()
            c.messages = []
            for j, turn in enumerate(source):
                c.append_message(c.roles[j % 2], turn["value"])
            if req.get("generation"):
                c.append_message(c.roles[1], None)
            out.append({"prompt": c.get_prompt()})
        json.dump({"results": out}, sys.stdout)
        return

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        req["tokenizer_dir"], model_max_length=2048, padding_side="right", use_fast=False
    )
    tokenizer.pad_token = tokenizer.unk_token  # train.py for every version but v0
    conversation_lib.default_conversation = conversation_lib.conv_templates[req["version"]]
    data_args = llava_train.DataArguments(is_multimodal=True)
    data_args.mm_use_im_start_end = False
    results = []
    for conv in req["rows"]:
        sources = llava_train.preprocess_multimodal(copy.deepcopy([conv]), data_args)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            out = llava_train.preprocess(sources, tokenizer, has_image=True)
        results.append({
            "input_ids": [int(x) for x in out["input_ids"][0]],
            "labels": [int(x) for x in out["labels"][0]],
            "mismatch": "tokenization mismatch" in printed.getvalue(),
        })
    json.dump({
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "sentencepiece": sentencepiece.__version__},
        "legacy": bool(tokenizer.legacy),
        "results": results,
    }, sys.stdout)


if __name__ == "__main__":
    main()
