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
