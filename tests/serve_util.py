"""A tiny chat checkpoint built offline for the serving tests: a random transformers LLaVA (or
LLaVA-NeXT, with AnyRes grid pinpoints) whose vocabulary is the offline LLaMA-style test tokenizer
(+ <image>, <pad>), saved with that tokenizer (optionally carrying a llava-hf style chat template)
in one directory."""
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


def make_chat_checkpoint(out_dir, *, chat_template: bool = False, seed: int = 0, max_positions: int = 512,
                         siglip_resample: int | None = None, pinpoints=None, patch_size: int = PATCH):
    """Save a tiny random LLaVA + tokenizer under `out_dir`; returns (dir, hf_model, tokenizer).
    `siglip_resample`: a SigLIP tower instead of CLIP (features -1, "full", as llava-hf's SigLIP
    models), saved with its SiglipImageProcessor (that PIL filter) as LlavaProcessor saves it.
    `pinpoints`: a LLaVA-NeXT (`LlavaNextForConditionalGeneration`) with these AnyRes grid
    pinpoints instead, saved with its `LlavaNextProcessor` (`hf_processor(..., pinpoints=)`)."""
    import torch
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, SiglipVisionConfig)

    out_dir = os.fspath(out_dir)
    tok = AutoTokenizer.from_pretrained(make_llama_tokenizer(os.path.join(out_dir, "_tok"), llava_tokens=True))
    from llava_jax.data.tokenize import add_llava_special_tokens

    ids = add_llava_special_tokens(tok)
    if chat_template:
        tok.chat_template = LLAVA_HF_CHAT_TEMPLATE
    siglip = siglip_resample is not None
    vc = (SiglipVisionConfig if siglip else CLIPVisionConfig)(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=patch_size)
    features = dict(vision_feature_layer=-1, vision_feature_select_strategy="full") if siglip else dict(
        vision_feature_layer=-2)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                     bos_token_id=1, eos_token_id=2, pad_token_id=ids.pad_token_id)
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
        hf_processor(tok, siglip_resample, pinpoints, patch_size).save_pretrained(out_dir)
    return out_dir, hf, tok


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
