"""Chat prompts -> greedy ids equal transformers' `generate`, for both template styles: the
LLaVA-1.5 `vicuna_v1` text (original LLaVA) and a llava-hf checkpoint's own chat template.

Prompt ids follow the original LLaVA's rule (text between images tokenized as separate calls),
which differs from `LlavaProcessor` (one call over the expanded prompt) right after each image
with this non-legacy LLaMA-style tokenizer (the text there starts with SentencePiece's `▁`);
transformers' model gets our ids, and `LlavaProcessor` gives the reference pixels."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from serve_util import hf_processor, make_chat_checkpoint, rand_image  # noqa: E402
from tokenizer_util import segment_ids  # noqa: E402

from llava_jax.data.images import normalize  # noqa: E402
from llava_jax.serve.engine import SamplingParams  # noqa: E402
from llava_jax.serve.generator import ChatGenerator  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image", "image": rand_image(1)},
                                  {"type": "text", "text": "What is in the image?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Describe the picture."},
                                  {"type": "image", "image": rand_image(2, 50, 30)}]},
     {"role": "assistant", "content": "A man rides a horse."},
     {"role": "user", "content": "What color is it?"}],
    [{"role": "user", "content": "How many people are there?"}],
]


@pytest.fixture(scope="module", params=["vicuna_v1", "chat_template"])
def setup(request, tmp_path_factory):
    d, hf, tok = make_chat_checkpoint(tmp_path_factory.mktemp(request.param),
                                      chat_template=request.param == "chat_template")
    gen = ChatGenerator.from_pretrained(d, image_mode="crop")  # LlavaProcessor's CLIP processing
    assert gen.template == request.param
    return gen, hf, tok


def _hf_generate(hf, tok, texts, prompts, images, new):
    """transformers' greedy continuation of our prompt ids (left-padded), with `LlavaProcessor`'s
    pixels for the images; also returns what the processor made of the texts."""
    proc = hf_processor(tok)
    kw = {"images": images} if images else {}
    enc = proc(text=texts, padding=True, padding_side="left", return_tensors="pt", **kw)
    L = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    px = {"pixel_values": enc["pixel_values"]} if images else {}
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, **px, max_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)
    return [list(map(int, r)) for r in out[:, L:].numpy()], enc


@pytest.mark.parametrize("rows", [[0], [0, 1, 2]], ids=["single", "mixed_batch"])
def test_chat_greedy_equals_transformers(setup, rows):
    gen, hf, tok = setup
    convs = [CONVERSATIONS[r] for r in rows]
    encs = [gen.encode(c) for c in convs]
    if gen.template == "vicuna_v1":
        assert encs[0].text.startswith("A chat between") and encs[0].text.endswith("ASSISTANT:")
    else:
        assert encs[0].text == "USER: <image>\nWhat is in the image? ASSISTANT:"
    images = [p["image"] for c in convs for m in c if not isinstance(m["content"], str)
              for p in m["content"] if p["type"] == "image"]
    ref, enc = _hf_generate(hf, tok, [e.text for e in encs], [e.ids for e in encs], images, new=10)
    n_img = gen.cfg.num_image_tokens
    for e, ids, mask in zip(encs, enc["input_ids"].numpy(), enc["attention_mask"].numpy()):
        img = gen.cfg.image_token_id
        # the original's rule, images expanded as LlavaProcessor expands them
        want = [x for t in segment_ids(tok, e.text, img) for x in ([t] * n_img if t == img else [t])]
        assert e.ids == want
        proc_ids = ids[mask.astype(bool)].tolist()
        if "<image>" in e.text:  # LlavaProcessor has no "▁" at the start of the text after the image
            after = e.ids.index(img) + n_img
            assert proc_ids[:after] == e.ids[:after] and proc_ids[after] != e.ids[after]
        else:
            assert proc_ids == e.ids
    ours_px = np.concatenate([np.asarray(normalize(e.images)) for e in encs if e.images is not None])
    np.testing.assert_allclose(ours_px, enc["pixel_values"].numpy().transpose(0, 2, 3, 1), atol=1e-5)
    prompts = [e.ids for e in encs]
    imgs = np.zeros((len(encs), 1, 28, 28, 3), np.uint8)
    mask = np.zeros((len(encs), 1), bool)
    for i, e in enumerate(encs):
        if e.images is not None:
            imgs[i], mask[i] = e.images, True
    ours = gen.engine.generate(prompts, imgs, mask, SamplingParams(max_new_tokens=10))
    assert ours == ref


def test_an_exported_model_is_served_in_the_format_it_was_trained_in(tmp_path):
    """`save_pretrained(..., template=T)` writes T as the tokenizer's Jinja chat template:
    transformers' `apply_chat_template` renders llava-jax's T prompt, and the chat/server/eval
    loader reads T back (`default_template`), with T's own stop tokens; without `template` the
    directory keeps no chat template and is served as vicuna_v1, as before."""
    import llava_jax
    from llava_jax.data.templates import (TEMPLATES, chat_template_jinja, default_template, render,
                                          template_of_chat_template)
    from llava_jax.data.tokenize import load_tokenizer

    d, _, _ = make_chat_checkpoint(tmp_path / "ckpt")
    model, tok = llava_jax.from_pretrained(d), load_tokenizer(d)
    conv = [("human", "<image>\nWhat is it?"), ("gpt", "A cat."), ("human", "And its colour?")]
    for name in ("llava_hf", "vicuna_v1"):
        out = llava_jax.save_pretrained(model, tmp_path / name, tokenizer=tok, template=name)
        gen = ChatGenerator.from_pretrained(out)
        assert gen.template == name and default_template(load_tokenizer(out)) == name
        msgs = [{"role": {"human": "user", "gpt": "assistant"}[r], "content": c} for r, c in conv]
        hf_text = load_tokenizer(out).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert hf_text == render(name, conv, True).text
        asked = ChatGenerator(model, tok, template=name)
        assert gen.eos_ids == asked.eos_ids
        m = [{"role": "user", "content": [{"type": "image", "image": rand_image(3)},
                                          {"type": "text", "text": "What is it?"}]}]
        assert gen.encode(m).ids == asked.encode(m).ids
    assert getattr(tok, "chat_template", None) is None  # the caller's tokenizer is left as it was
    plain = llava_jax.save_pretrained(model, tmp_path / "none", tokenizer=tok)
    assert not getattr(load_tokenizer(plain), "chat_template", None)
    assert ChatGenerator.from_pretrained(plain).template == "vicuna_v1"
    # every template with a Jinja form maps back to one that renders the same text
    for name in TEMPLATES:
        j = chat_template_jinja(name)
        if j is not None:
            back = template_of_chat_template(j)
            assert render(back, conv, True).text == render(name, conv, True).text, (name, back)
