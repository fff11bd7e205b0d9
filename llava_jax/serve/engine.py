"""KV-cache generation: left-padded batched prefill, then one compiled decode step per token.

Prompts are left-padded to a length bucket (so a new prompt length reuses a compiled prefill),
their RoPE positions count real tokens only (cumsum of the mask), and the cache marks padded
slots with segment 0 so they are never attended. Greedy by default; temperature / top-k / top-p
sampling with a seed.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.llava import LlavaModel

PROMPT_BUCKETS = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def bucket(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(np.ceil(n / 512) * 512)


def sample_logits(logits, key, temperature, top_k: int, top_p: float):
    """logits [B, V] fp32 -> token ids [B]."""
    if temperature <= 0:
        return jnp.argmax(logits, -1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, -1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, -1)
        cum = jnp.cumsum(probs, -1)
        # smallest set whose mass reaches top_p: keep tokens whose preceding mass < top_p
        keep = (cum - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, -1)


class Engine:
    """Compiled prefill/decode for one model. `generate` takes token-id prompts (image tokens
    already expanded) with images in the [B, M, H, W, 3] layout."""

    def __init__(self, model: LlavaModel):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.config

    @partial(jax.jit, static_argnums=(0, 6))
    def _prefill(self, state, ids, seg, images, image_mask, max_len: int):
        model = nnx.merge(self.graphdef, state)
        pos = jnp.maximum(jnp.cumsum(seg, -1) - 1, 0)
        embeds = model.embed_inputs(ids, images=images, image_mask=image_mask) if images is not None \
            else model.embed_inputs(ids)
        cache = model.llm.init_cache(ids.shape[0], max_len)
        h, cache = model.llm(embeds, pos, seg, cache=cache, return_hidden=True)
        logits = model.llm.logits(h[:, -1:])[:, 0].astype(jnp.float32)
        return logits, cache, pos[:, -1] + 1

    @partial(jax.jit, static_argnums=(0,))  # no donation yet: see issue 6 (compiled decode loop)
    def _decode(self, state, tokens, next_pos, cache):
        model = nnx.merge(self.graphdef, state)
        emb = model.llm.embed_tokens(tokens[:, None])
        seg = jnp.ones_like(tokens)[:, None]
        logits, cache = model.llm(emb, next_pos[:, None], seg, cache=cache)
        return logits[:, 0].astype(jnp.float32), cache

    def generate(self, prompts: Sequence[Sequence[int]], images=None, image_mask=None,
                 params: SamplingParams = SamplingParams(), eos_ids: Sequence[int] = (), stream=None):
        """Returns a list of generated id lists (stopping at, and excluding, any EOS id).
        `stream(step, tokens[B])` is called after each step when given."""
        b = len(prompts)
        p = bucket(max(len(x) for x in prompts))
        ids = np.zeros((b, p), np.int32)
        seg = np.zeros((b, p), np.int32)
        for i, x in enumerate(prompts):  # left padding
            ids[i, p - len(x):] = x
            seg[i, p - len(x):] = 1
        max_len = p + params.max_new_tokens
        logits, cache, next_pos = self._prefill(
            self.state, jnp.asarray(ids), jnp.asarray(seg),
            None if images is None else jnp.asarray(images),
            None if image_mask is None else jnp.asarray(image_mask), max_len)
        key = jax.random.key(params.seed)
        out = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        eos = set(int(e) for e in eos_ids)
        for step in range(params.max_new_tokens):
            key, sub = jax.random.split(key)
            tok = sample_logits(logits, sub, params.temperature, params.top_k, params.top_p)
            tok_np = np.asarray(tok)
            for i in range(b):
                if not done[i]:
                    if int(tok_np[i]) in eos:
                        done[i] = True
                    else:
                        out[i].append(int(tok_np[i]))
            if stream is not None:
                stream(step, tok_np)
            if done.all() or step == params.max_new_tokens - 1:
                break
            logits, cache = self._decode(self.state, tok, next_pos, cache)
            next_pos = next_pos + 1
        return out
