"""A tiny chat checkpoint built offline for the serving tests: a random transformers LLaVA (or
LLaVA-NeXT, with AnyRes grid pinpoints) whose vocabulary is the offline LLaMA-style test tokenizer
(+ <image>, <pad>), saved with that tokenizer (optionally carrying a llava-hf style chat template)
in one directory. `backbone=` (a `CHAT_BACKBONES` name) builds another LLM / tower instead, with a
real tokenizer from ../shared/tokenizers and its chat template, steered so that its greedy reply
to `STEER_MESSAGES` ends with the template's end-of-turn token."""
from __future__ import annotations

import contextlib
import io
import json
import os
import time

import numpy as np

from tokenizer_util import make_llama_tokenizer

# The chat template llava-hf ships with llava-1.5-*-hf (chat_template.json): "USER: <image>\nq ASSISTANT:".
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

IMAGE_SIZE = 28
PATCH = 14

# The other backbones served (tests/test_serve_api.py, tests/test_serve_cli.py, eval in
# tests/test_eval_e2e.py): the LLM's transformers model_type and config fields, the real tokenizer
# (../shared/tokenizers/<name>: its chat template, its end of turn) and the tower.
CHAT_BACKBONES = {
    "qwen2": dict(llm="qwen2", tokenizer="qwen2", text=dict(rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1000000.0})),
    # a window of 5, shorter than every prompt: each decode step attends through it over the KV cache
    "mistral_window": dict(llm="mistral", tokenizer="llama3", text=dict(sliding_window=5)),
    "siglip_qwen2": dict(llm="qwen2", tokenizer="qwen2", siglip=True,
                         text=dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}

# The request every backbone checkpoint is steered on (the CLI test's first turn: --image a.png).
STEER_QUESTION = "What is in the image?"


def steer_messages():
    return [{"role": "user", "content": [{"type": "image", "image": rand_image(0)},
                                         {"type": "text", "text": STEER_QUESTION}]}]


def make_chat_checkpoint(out_dir, *, chat_template: bool = False, seed: int = 0, max_positions: int = 512,
                         siglip_resample: int | None = None, pinpoints=None, patch_size: int = PATCH,
                         backbone: str | None = None):
    """Save a tiny random LLaVA + tokenizer under `out_dir`; returns (dir, hf_model, tokenizer).
    `siglip_resample`: a SigLIP tower instead of CLIP (features -1, "full", as llava-hf's SigLIP
    models), saved with its SiglipImageProcessor (that PIL filter) as LlavaProcessor saves it.
    `pinpoints`: a LLaVA-NeXT (`LlavaNextForConditionalGeneration`) with these AnyRes grid
    pinpoints instead, saved with its `LlavaNextProcessor` (`hf_processor(..., pinpoints=)`).
    `backbone`: a `CHAT_BACKBONES` LLM (and tower) with that real tokenizer (skips when
    ../shared/tokenizers is absent), its greedy reply to `steer_messages()` ending with the
    template's end of turn (`steer_end_of_turn`)."""
    import torch
    from transformers import (CONFIG_MAPPING, AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              SiglipVisionConfig)

    from llava_jax.data.tokenize import add_llava_special_tokens

    out_dir = os.fspath(out_dir)
    spec = CHAT_BACKBONES[backbone] if backbone else {}
    if backbone:
        from test_chat_templates import real_tokenizer

        tok, _ = real_tokenizer(spec["tokenizer"])  # + <image> (and <pad> where it has none)
    else:
        tok = AutoTokenizer.from_pretrained(make_llama_tokenizer(os.path.join(out_dir, "_tok"), llava_tokens=True))
    ids = add_llava_special_tokens(tok, pad_token=None) if backbone else add_llava_special_tokens(tok)
    if chat_template:
        tok.chat_template = LLAVA_HF_CHAT_TEMPLATE
    siglip = siglip_resample is not None or spec.get("siglip", False)
    vc = (SiglipVisionConfig if siglip else CLIPVisionConfig)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=patch_size)
    features = dict(vision_feature_layer=-1, vision_feature_select_strategy="full") if siglip else dict(
        vision_feature_layer=-2)
    text_cls = CONFIG_MAPPING[spec["llm"]] if backbone else LlamaConfig
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id) if backbone else dict(
        bos_token_id=1, eos_token_id=2)
    tc = text_cls(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  pad_token_id=ids.pad_token_id, **special, **spec.get("text", {}))
    if pinpoints is not None:
        features["image_grid_pinpoints"] = [list(p) for p in pinpoints]
    cfg = (LlavaNextConfig if pinpoints else LlavaConfig)(
        vision_config=vc, text_config=tc, image_token_index=ids.image_token_id, pad_token_id=ids.pad_token_id,
        **features)
    torch.manual_seed(seed)
    hf = (LlavaNextForConditionalGeneration if pinpoints else LlavaForConditionalGeneration)(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # a stronger LM head so greedy choices are not near-ties (fp32 vs torch rounding)
        hf.lm_head.weight.mul_(4.0)
    hf.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if siglip or pinpoints:
        hf_processor(tok, siglip_resample if siglip_resample is not None else 3, pinpoints,
                     patch_size).save_pretrained(out_dir)
    if backbone:
        from test_chat_templates import END

        steer_end_of_turn(out_dir, hf, tok.convert_tokens_to_ids(END[spec["tokenizer"]]))
        hf.save_pretrained(out_dir)
    return out_dir, hf, tok


def chat_pixels(gen, enc):
    """transformers' pixel_values for a `ChatGenerator.encode` result: the generator's own
    preprocessed images, normalised with the checkpoint's mean/std (the processor's equality is
    tests/test_images.py's and tests/test_siglip.py's)."""
    from llava_jax.data.images import normalize

    ip = gen.cfg.image_processor
    return np.asarray(normalize(enc.images, ip.mean, ip.std)).transpose(0, 3, 1, 2)


def chat_reference(out_dir, gen, enc, end_id: int, new: int):
    """transformers' greedy reply to `enc` (a `gen.encode` result) from the checkpoint saved in
    `out_dir`, stopping at `end_id`: the new ids, `end_id` last when it was generated."""
    from hf_util import hf_generate
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(out_dir).eval()
    return hf_generate(hf, [enc.ids], chat_pixels(gen, enc) if enc.images is not None else None, new,
                       eos_token_id=end_id)[0]


def steer_end_of_turn(out_dir, hf, end_id: int, new: int = 12, first: int = 3, scale: float = 1.25):
    """Make `hf`'s greedy reply to `steer_messages()` end with `end_id` (a random model never
    emits it): find a step k >= `first` whose greedy token X is new in the reply and has a clear
    positive logit, and give `end_id` the LM-head row `scale` * X's row, so that its logit is
    `scale` times X's everywhere: above every other token at step k, still below the winner at
    each earlier step (checked with a margin). The JAX side reads the saved checkpoint, so the
    prompt and pixels come from a ChatGenerator on it."""
    import torch

    from llava_jax.serve.generator import ChatGenerator

    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()  # untied
    gen = ChatGenerator.from_pretrained(out_dir)
    enc = gen.encode(steer_messages())
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([enc.ids]), pixel_values=torch.tensor(chat_pixels(gen, enc)),
                          max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    toks = out.sequences[0, len(enc.ids):].tolist()
    logits = torch.stack(out.logits)[:, 0].float()  # [steps, vocab]
    top2 = logits.topk(2, -1).values
    for k in range(first, new - 1):
        x, s = toks[k], logits[:, toks[k]]
        if x in toks[:k] or x == end_id or s[k] * (scale - 1) < 0.5 or top2[k, 0] - top2[k, 1] < 0.1:
            continue
        if all(scale * s[j] < top2[j, 0] - 0.5 for j in range(k)):
            break
    else:
        raise AssertionError(f"no step of the greedy reply {toks} can be steered to end there")
    with torch.no_grad():
        hf.lm_head.weight[end_id] = scale * hf.lm_head.weight[x]
    from hf_util import hf_generate

    ref = hf_generate(hf, [enc.ids], chat_pixels(gen, enc), new, eos_token_id=end_id)[0]
    assert ref == toks[:k] + [end_id], (ref, toks, k)


def hf_processor(tok, siglip_resample: int | None = None, pinpoints=None, patch_size: int = PATCH):
    from transformers import CLIPImageProcessorPil, LlavaProcessor, SiglipImageProcessorPil

    if pinpoints is not None:
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        ip = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                        image_grid_pinpoints=[list(p) for p in pinpoints])
        return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)

    if siglip_resample is not None:
        ip = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=siglip_resample)
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="full",
                              num_additional_image_tokens=0)
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def rand_image(seed: int, w: int = 40, h: int = 33):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def http_request(srv, method, path, body=None, headers=None, timeout=120):
    """(status, body bytes) of one request to a test server; dict/list bodies are sent as JSON,
    with a JSON content type unless `headers` are given."""
    import http.client
    import json

    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if headers is None else headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


@contextlib.contextmanager
def serving(gen, limits=None, **kw):
    """A server for `gen` on a free loopback port (small token limits unless `limits` is given),
    shut down gracefully and closed afterwards; `kw` go to `make_server`."""
    from llava_jax.serve.server import Limits, make_server, serve_in_thread

    srv = make_server(gen, "127.0.0.1", 0, limits=limits or Limits(max_tokens=16, default_max_tokens=8), **kw)
    serve_in_thread(srv)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def error(data) -> dict:
    """The OpenAI-shaped error object of a reply body (all four fields, a message)."""
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def stats(srv) -> dict:
    return json.loads(http_request(srv, "GET", "/stats")[1])


def wait_for(cond, timeout=20.0):
    """Poll `cond` until true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
