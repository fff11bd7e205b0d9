"""KV-cache generation equals transformers' greedy `generate` on the same tiny checkpoint."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import llava_jax  # noqa: E402
from hf_util import IMAGE_TOKEN, make_hf_llava, num_image_tokens  # noqa: E402
from llava_jax.serve.engine import Engine, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = make_hf_llava("gqa_llama3_list_tied", seed=7)
    d = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(d)
    return hf, llava_jax.from_pretrained(d)


def _prompt(hf, rng, n_text):
    t = num_image_tokens(hf)
    text = rng.integers(3, hf.config.text_config.vocab_size, n_text)
    text[text == IMAGE_TOKEN] = 4
    return [1] + [IMAGE_TOKEN] * t + list(map(int, text))


def _hf_generate(hf, prompts, pixels, new):
    L = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), L), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as for batched generation
        ids[i, L - len(p):] = p
        mask[i, L - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels), max_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return [list(map(int, r)) for r in out[:, L:].numpy()]


@pytest.mark.parametrize("lengths", [(5,), (3, 9, 6)])
def test_greedy_equals_transformers_generate(pair, lengths):
    hf, model = pair
    rng = np.random.default_rng(len(lengths))
    prompts = [_prompt(hf, rng, n) for n in lengths]
    s = hf.config.vision_config.image_size
    pixels = rng.normal(size=(len(prompts), 3, s, s)).astype(np.float32)
    ref = _hf_generate(hf, prompts, pixels, new=8)
    images = np.transpose(pixels, (0, 2, 3, 1))[:, None]
    ours = Engine(model).generate(prompts, images, np.ones((len(prompts), 1), bool), SamplingParams(max_new_tokens=8))
    assert ours == ref
