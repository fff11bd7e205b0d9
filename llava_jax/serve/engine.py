"""KV-cache generation: bucketed batched prefill, then a compiled decode loop run in chunks.

Shapes never depend on content, so nothing recompiles per request:
  * the batch is padded to a batch bucket (1, 2, 4, 8, ...) with idle rows;
  * prompts are left-padded to a prompt-length bucket; RoPE positions count real tokens only
    (cumsum of the mask) and padded cache slots carry segment 0, so they are never attended;
  * the cache holds `prompt bucket + new-token bucket` slots;
  * per-row sampling settings (temperature, top-k, top-p, seed, max new tokens) and the EOS ids
    are arrays, not static arguments.
One compiled prefill per (batch, prompt, images, new-token) bucket; one compiled decode chunk per
(batch, cache length). A chunk is a `lax.while_loop` of up to `chunk_size` decode steps that
exits early once every row is done; the host gets each chunk's tokens (streaming), checks stop
strings and cancellations, and launches the next chunk. The KV cache is donated to each chunk.

LLaVA-NeXT (AnyRes, `config.image_grid_pinpoints`): a request's images are its tiles
[M, 1 + max_tiles, S, S, 3] (base view first, padding views zeros) and its `image_index`, one
int32 per image token into the request's feature table (`llava_jax.data.anyres`). Everything that
depends on an image's size (its token count, grid, unpadding) is in that host-side index, which
is padded to the prompt bucket, so the compiled shapes are the same buckets as above: a new image
size never compiles a new program.

Continuous batching (`DecodeBatch`): between chunks, new requests can take free rows of a
running batch. They are prefilled on their own and their keys/values are written into the
shared cache so that their prompt ends exactly at the batch's write index; from then on every
row writes at the same index, so the batch keeps its single compiled decode chunk (one more
compiled `join` per joiner bucket). RoPE positions are per row, so a joiner's positions count
from its own first token, and its row's old slots are emptied (segment 0).

Sampling follows transformers' order: temperature, then top-k, then top-p; temperature 0 is
greedy (argmax over fp32 logits). Each row's random stream depends only on its own seed and
token index, so a seeded request samples the same tokens whatever batch it shares.

A model whose params are sharded on a mesh (e.g. loaded with `from_pretrained(..., mesh=mesh)`)
works as is: batch inputs are placed over the mesh's batch axes and the cache is constrained to
the logical-axis rules (`llava_jax.sharding`).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models.llava import LlavaModel, image_kwargs

PROMPT_BUCKETS = (32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
IMAGE_BUCKETS = (1, 2, 4, 8, 16)
MAX_EOS_IDS = 8

INT32_MAX = 2**31 - 1
FINISH_EOS = "stop"  # OpenAI's finish_reason for an end-of-sequence token or a stop string
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass
class Request:
    """One prompt: token ids with image tokens already expanded, and its images
    `[M, H, W, 3]` (uint8, or normalised float) in the order their tokens appear.
    AnyRes models: `images` are the tiles [M, 1 + max_tiles, S, S, 3] and `image_index` int32
    [number of image tokens] is each image token's row in the request's feature table (the
    `image_index` row of `data.anyres.anyres_batch` without its -1 padding)."""

    prompt: Sequence[int]
    images: np.ndarray | None = None
    params: SamplingParams = SamplingParams()
    image_index: np.ndarray | None = None


def bucket(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    step = buckets[-1] - buckets[-2] if len(buckets) > 1 else buckets[-1]
    return int(buckets[-1] + np.ceil((n - buckets[-1]) / step) * step)


# ---------------------------------------------------------------------------- sampling
def _row_keys(seeds, n_gen):
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, n_gen)


def sample_rows(logits, n_gen, samp):
    """logits [B, V] fp32 -> ids [B] int32, with per-row settings `samp` (arrays [B]:
    temperature, top_k, top_p, seed). Greedy-only batches skip the sort entirely."""
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    temperature = samp["temperature"]

    def sampled(_):
        v = logits.shape[-1]
        x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        desc = -jnp.sort(-x, axis=-1)
        k = jnp.where(samp["top_k"] > 0, jnp.minimum(samp["top_k"], v), v)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], -1)
        x = jnp.where(x < kth, -jnp.inf, x)
        desc = jnp.where(jnp.arange(v)[None] < k[:, None], desc, -jnp.inf)
        probs = jax.nn.softmax(desc, -1)
        # top-p: the smallest head of the sorted distribution whose mass reaches top_p
        keep = (jnp.cumsum(probs, -1) - probs) < samp["top_p"][:, None]
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), -1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
        tok = jax.vmap(jax.random.categorical)(_row_keys(samp["seed"], n_gen), x).astype(jnp.int32)
        return jnp.where(temperature > 0, tok, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)


# ---------------------------------------------------------------------------- engine
@dataclasses.dataclass
class StepOutput:
    """What one streaming step yields, per request (in request order): the tokens produced since
    the previous step (EOS excluded) and, once a request has ended, why (`stop`, `length`,
    `cancelled`; None while running)."""

    new_tokens: list[list[int]]
    finish: list[str | None]


def _mesh_of(state):
    for leaf in jax.tree.leaves(state):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None


class Engine:
    """Compiled prefill + chunked decode loop for one model.

    `stream(requests)` yields a `StepOutput` after the prefill and after every decode chunk;
    `generate(...)` returns the finished id lists. `stats` counts compilations (traces) per
    function, batches and rows served.
    """

    def __init__(self, model: LlavaModel, *, mesh=None, chunk_size: int = 8,
                 prompt_buckets: Sequence[int] = PROMPT_BUCKETS, batch_buckets: Sequence[int] = BATCH_BUCKETS,
                 new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS, donate: bool = True):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.config
        self.mesh = mesh if mesh is not None else _mesh_of(self.state)
        self.chunk_size = int(chunk_size)
        self.prompt_buckets = tuple(prompt_buckets)
        self.batch_buckets = tuple(batch_buckets)
        self.new_token_buckets = tuple(new_token_buckets)
        self.traces: collections.Counter = collections.Counter()
        self.stats: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self.prefill = jax.jit(self._prefill, static_argnames=("max_len",))
        self.decode_chunk = jax.jit(self._decode_chunk, donate_argnames=("carry",) if donate else ())
        self.join_cache = jax.jit(self._join, donate_argnames=("carry",) if donate else ())

    # ------------------------------------------------------------------ compiled parts
    def _constrain(self, x, axes):
        if self.mesh is None:
            return x
        from llava_jax.sharding import named_sharding

        return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, self.mesh))

    def _constrain_cache(self, cache):
        kv_axes = ("layers", "batch", "length", "kv_heads", "head_dim")
        return {"k": self._constrain(cache["k"], kv_axes), "v": self._constrain(cache["v"], kv_axes),
                "segment_ids": self._constrain(cache["segment_ids"], ("batch", "length")), "index": cache["index"]}

    @staticmethod
    def _embed(model, ids, images, image_mask, image_index):
        return model.embed_inputs(ids, **image_kwargs(images, image_mask, image_index))

    def _prefill(self, state, ids, seg, images, image_mask, image_index, samp, eos, *, max_len: int):
        self.traces["prefill"] += 1  # runs once per compilation
        model = nnx.merge(self.graphdef, state)
        b = ids.shape[0]
        pos = jnp.maximum(jnp.cumsum(seg, -1) - 1, 0)
        embeds = self._embed(model, ids, images, image_mask, image_index)
        cache = self._constrain_cache(model.llm.init_cache(b, max_len))
        h, cache = model.llm(embeds, pos, seg, cache=cache, return_hidden=True)
        logits = model.llm.logits(h[:, -1:])[:, 0].astype(jnp.float32)
        n_gen = jnp.zeros((b,), jnp.int32)
        tok = sample_rows(logits, n_gen, samp)
        emit = samp["max_new"] > 0
        n_gen = emit.astype(jnp.int32)
        done = ~emit | jnp.isin(tok, eos) | (n_gen >= samp["max_new"])
        carry = {"cache": self._constrain_cache(cache), "tok": tok, "pos": pos[:, -1] + 1, "n_gen": n_gen,
                 "done": done}
        return jnp.where(emit, tok, -1), carry

    def _decode_chunk(self, state, carry, samp, eos, cancel):
        self.traces["decode"] += 1
        model = nnx.merge(self.graphdef, state)
        b = carry["tok"].shape[0]
        n = self.chunk_size
        carry = dict(carry, done=carry["done"] | cancel)

        def cond(c):
            i, cr, _ = c
            return (i < n) & ~jnp.all(cr["done"])

        def body(c):
            i, cr, out = c
            emb = model.llm.embed_tokens(cr["tok"][:, None])
            logits, cache = model.llm(emb, cr["pos"][:, None], jnp.ones((b, 1), jnp.int32), cache=cr["cache"])
            logits = logits[:, 0].astype(jnp.float32)
            tok = sample_rows(logits, cr["n_gen"], samp)
            emit = ~cr["done"]
            out = out.at[:, i].set(jnp.where(emit, tok, -1))
            n_gen = cr["n_gen"] + emit.astype(jnp.int32)
            done = cr["done"] | (emit & jnp.isin(tok, eos)) | (n_gen >= samp["max_new"])
            cr = {"cache": self._constrain_cache(cache), "tok": tok, "pos": cr["pos"] + 1, "n_gen": n_gen,
                  "done": done}
            return i + 1, cr, out

        out0 = jnp.full((b, n), -1, jnp.int32)
        _, carry, out = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, out0))
        return out, carry

    def _join(self, state, carry, ids, seg, images, image_mask, image_index, samp, eos, slots):
        """Prefill k new prompts and write them into rows `slots` of a running batch, ending at
        the batch's current cache index (so they share its write position from now on). Slots
        >= the batch size (padding joiners) are dropped."""
        self.traces["join"] += 1
        model = nnx.merge(self.graphdef, state)
        k, p = ids.shape
        pos = jnp.maximum(jnp.cumsum(seg, -1) - 1, 0)
        embeds = self._embed(model, ids, images, image_mask, image_index)
        small = model.llm.init_cache(k, p)
        h, small = model.llm(embeds, pos, seg, cache=small, return_hidden=True)
        logits = model.llm.logits(h[:, -1:])[:, 0].astype(jnp.float32)
        tok = sample_rows(logits, jnp.zeros((k,), jnp.int32), samp)
        emit = samp["max_new"] > 0
        n_gen = emit.astype(jnp.int32)
        done = ~emit | jnp.isin(tok, eos) | (n_gen >= samp["max_new"])
        big = carry["cache"]
        start = big["index"] - p

        def put(dst, src, axis):  # rows `slots` of dst (batch axis `axis`) get src at [start, start + p)
            rows = jnp.take(dst, jnp.clip(slots, 0, dst.shape[axis] - 1), axis=axis)
            if src.dtype != rows.dtype:
                src = src.astype(rows.dtype)
            if axis == 0:  # segment ids [B, T]: the rest of the row is emptied
                rows = jax.lax.dynamic_update_slice(jnp.zeros_like(rows), src, (0, start))
                return dst.at[slots].set(rows, mode="drop")
            rows = jax.lax.dynamic_update_slice(rows, src, (0, 0, start, 0, 0))
            return dst.at[:, slots].set(rows, mode="drop")

        cache = {"k": put(big["k"], small["k"], 1), "v": put(big["v"], small["v"], 1),
                 "segment_ids": put(big["segment_ids"], seg.astype(jnp.int32), 0), "index": big["index"]}
        upd = lambda a, v: a.at[slots].set(v.astype(a.dtype), mode="drop")  # noqa: E731
        carry = {"cache": self._constrain_cache(cache), "tok": upd(carry["tok"], tok),
                 "pos": upd(carry["pos"], pos[:, -1] + 1), "n_gen": upd(carry["n_gen"], n_gen),
                 "done": upd(carry["done"], done)}
        return jnp.where(emit, tok, -1), carry

    # ------------------------------------------------------------------ host side
    def put(self, x):
        """Place a batch array: leading dim over the mesh's batch axes when it divides, else
        replicated."""
        if self.mesh is None:
            return jnp.asarray(x)
        from jax.sharding import NamedSharding, PartitionSpec

        from llava_jax.sharding import batch_sharding, data_parallel_size

        if x.shape and x.shape[0] % data_parallel_size(self.mesh) == 0:
            return jax.device_put(x, batch_sharding(self.mesh, x.ndim))
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

    def put_images(self, pk):
        """(images, image_mask, image_index) of a `pack` result on the device (None where absent)."""
        return tuple(None if pk[k] is None else self.put(pk[k]) for k in ("images", "image_mask", "image_index"))

    def pack(self, requests: Sequence[Request], eos_ids, b: int | None = None, min_new: int = 1):
        n = len(requests)
        if n == 0:
            raise ValueError("no requests")
        b = bucket(n, self.batch_buckets) if b is None else b
        lens = [len(r.prompt) for r in requests]
        if min(lens) < 1:
            raise ValueError("empty prompt: every request needs at least one token")
        p = bucket(max(lens), self.prompt_buckets)
        max_new = [int(r.params.max_new_tokens) for r in requests]
        if min(max_new) < 0:
            raise ValueError("max_new_tokens must be >= 0")
        new = bucket(max(max(max_new), min_new, 1), self.new_token_buckets)
        ids = np.zeros((b, p), np.int32)
        seg = np.zeros((b, p), np.int32)
        for i, r in enumerate(requests):  # left padding
            ids[i, p - lens[i]:] = np.asarray(r.prompt, np.int32)
            seg[i, p - lens[i]:] = 1
        seg[n:, -1] = 1  # idle rows: one token, so no row is fully masked
        images = image_mask = image_index = None
        with_images = [r for r in requests if r.images is not None and len(r.images)]
        if self.cfg.is_anyres:
            image_index = self._anyres_index(requests, p, b)  # (checks every request's image tokens)
            if not with_images:
                image_index = None  # text only: the text program, no tower
        else:
            t = self.cfg.num_image_tokens
            for i, r in enumerate(requests):
                n_tok = int(np.sum(np.asarray(r.prompt) == self.cfg.image_token_id))
                n_img = 0 if r.images is None else len(r.images)
                if n_tok != n_img * t:
                    raise ValueError(f"request {i}: {n_tok} image tokens but {n_img} images x {t} tokens")
        if with_images:
            m = bucket(max(len(r.images) for r in with_images), IMAGE_BUCKETS)
            first = np.asarray(with_images[0].images)
            images = np.zeros((b, m) + first.shape[1:], first.dtype)
            image_mask = np.zeros((b, m), bool)
            for i, r in enumerate(requests):
                if r.images is not None and len(r.images):
                    images[i, :len(r.images)] = np.asarray(r.images).astype(first.dtype)
                    image_mask[i, :len(r.images)] = True
        sp = [r.params for r in requests]
        pad = b - n
        samp = {
            "temperature": np.array([max(float(s.temperature), 0.0) for s in sp] + [0.0] * pad, np.float32),
            # any k >= the vocabulary means "all tokens": clamp so a huge k from a library
            # caller cannot overflow int32 (the server also refuses it, request.py)
            "top_k": np.array([min(max(int(s.top_k), 0), INT32_MAX) for s in sp] + [0] * pad, np.int32),
            "top_p": np.array([min(max(float(s.top_p), 1e-9), 1.0) for s in sp] + [1.0] * pad, np.float32),
            "seed": np.array([int(s.seed) % 2**32 for s in sp] + [0] * pad, np.uint32),
            "max_new": np.array(max_new + [0] * pad, np.int32),
        }
        eos = sorted({int(e) for e in eos_ids})
        if len(eos) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} EOS ids, got {len(eos)}")
        eos = np.array(eos + [-1] * (MAX_EOS_IDS - len(eos)), np.int32)
        return dict(ids=ids, seg=seg, images=images, image_mask=image_mask, image_index=image_index, samp=samp,
                    eos=eos, p=p, max_len=p + new, b=b)

    def _anyres_index(self, requests: Sequence[Request], p: int, b: int) -> np.ndarray:
        """int32 [b, p]: each request's image-token feature index, -1 after it. Its capacity is
        the prompt bucket (a prompt holds at most p image tokens), so it adds no bucket of its own."""
        from llava_jax.data.anyres import table_size

        index = np.full((b, p), -1, np.int32)
        n_table = table_size(self.cfg)
        for i, r in enumerate(requests):
            n_tok = int(np.sum(np.asarray(r.prompt) == self.cfg.image_token_id))
            n_img = 0 if r.images is None else len(r.images)
            idx = np.zeros((0,), np.int32) if r.image_index is None else np.asarray(r.image_index, np.int32)
            if n_img and r.image_index is None:
                raise ValueError(f"request {i}: an AnyRes (LLaVA-NeXT) model needs each request's image_index "
                                 "(data.anyres.anyres_batch); its images are tiles [M, 1 + max_tiles, S, S, 3]")
            if n_img and np.asarray(r.images).shape[1:2] != (1 + self.cfg.max_tiles,):
                raise ValueError(f"request {i}: images of shape {np.asarray(r.images).shape} are not AnyRes tiles "
                                 f"[M, 1 + max_tiles = {1 + self.cfg.max_tiles}, S, S, 3]")
            if n_tok != len(idx):
                raise ValueError(f"request {i}: {n_tok} image tokens but its image_index has {len(idx)} entries "
                                 "(data.anyres.num_image_tokens per image)")
            if len(idx) and (idx.min() < 0 or idx.max() >= n_img * n_table):
                raise ValueError(f"request {i}: image_index outside its {n_img} images' feature tables")
            index[i, :len(idx)] = idx
        return index

    def open(self, requests: Sequence[Request], eos_ids: Sequence[int] = (), *, slots: int | None = None,
             reserve_new_tokens: int = 0) -> "DecodeBatch":
        """Start a running batch (see DecodeBatch) with `requests` in slots 0..n-1."""
        return DecodeBatch(self, requests, eos_ids, slots=slots, reserve_new_tokens=reserve_new_tokens)

    def stream(self, requests: Sequence[Request], eos_ids: Sequence[int] = (),
               cancelled: Callable[[int], bool] | None = None) -> Iterator[StepOutput]:
        """Run `requests` as one batch; yield a StepOutput after the prefill and after every decode
        chunk. `cancelled(i)` is polled between chunks: True ends request i (finish `cancelled`)."""
        with self._lock:
            n = len(requests)
            batch = DecodeBatch(self, requests, eos_ids)
            finish: list[str | None] = [None] * n
            while batch.running:
                new = [[] for _ in range(n)]
                for slot, (toks, fin) in batch.step().items():
                    new[slot] = toks
                    finish[slot] = fin
                yield StepOutput(new, list(finish))
                if cancelled is not None:
                    for i in range(n):
                        if finish[i] is None and cancelled(i):
                            finish[i] = batch.cancel(i)

    def generate(self, prompts: Sequence[Sequence[int]], images=None, image_mask=None,
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), eos_ids: Sequence[int] = (),
                 stream: Callable[[StepOutput], None] | None = None, image_index=None) -> list[list[int]]:
        """Generated ids per prompt (stopping at, and excluding, any EOS id). `images`
        [B, M, H, W, 3] with `image_mask` [B, M] (None: all valid) give each row's images;
        `params` is one SamplingParams for all rows or one per row. `stream(StepOutput)` is
        called after every step when given. AnyRes models: `images` are tiles
        [B, M, 1 + max_tiles, S, S, 3] and `image_index` [B, C] (-1 padded), as
        `data.anyres.anyres_batch` gives them."""
        requests = []
        for i, p in enumerate(prompts):
            img = idx = None
            if images is not None:
                img = np.asarray(images[i])
                if image_mask is not None:
                    img = img[np.asarray(image_mask[i], bool)]
            if image_index is not None:
                idx = np.asarray(image_index[i])
                idx = idx[idx >= 0]
            sp = params if isinstance(params, SamplingParams) else params[i]
            requests.append(Request(list(p), img, sp, idx))
        out = [[] for _ in prompts]
        for step in self.stream(requests, eos_ids):
            for i, t in enumerate(step.new_tokens):
                out[i].extend(t)
            if stream is not None:
                stream(step)
        return out


class DecodeBatch:
    """A running batch: `slots` rows sharing one KV cache of `max_len` slots, for continuous
    batching. Created with a first group of requests (one prefill); more requests `join` free
    rows between decode chunks: their prompts are prefilled separately and written into the
    cache so that they end at the batch's current write index, so every row keeps writing at
    the same index (one compiled decode chunk for the whole life of the batch). A request can
    join when a row is free, its prompt bucket fits before the index and its max new tokens fit
    after it (`can_join`). Rows are identified by slot number; `step()` returns
    {slot: (new tokens, finish or None)} for the rows that were active.
    """

    def __init__(self, engine: Engine, requests: Sequence[Request], eos_ids=(), *, slots: int | None = None,
                 reserve_new_tokens: int = 0):
        self.engine = engine
        n = len(requests)
        b = bucket(max(n, slots or n), engine.batch_buckets)
        pk = engine.pack(requests, eos_ids, b=b, min_new=reserve_new_tokens)
        self.b, self.max_len, self.index = b, pk["max_len"], pk["p"]
        self.eos_ids = list(eos_ids)
        self.eos_set = {int(e) for e in eos_ids}
        self.eos = jnp.asarray(pk["eos"])
        self.samp = pk["samp"]
        self._samp_dev = None
        e = engine
        images, image_mask, image_index = e.put_images(pk)
        tok, self.carry = e.prefill(e.state, e.put(pk["ids"]), e.put(pk["seg"]), images, image_mask, image_index,
                                    self._samp(), self.eos, max_len=pk["max_len"])
        e.stats["batches"] += 1
        e.stats["rows"] += n
        self.active = np.zeros(b, bool)
        self.active[:n] = True
        self.n_gen = np.zeros(b, np.int64)
        self.max_new = self.samp["max_new"].astype(np.int64).copy()
        self._first = [(tok, list(range(n)))]  # first tokens not yet reported: (device ids, slots)

    def _samp(self):
        if self._samp_dev is None:
            self._samp_dev = {k: self.engine.put(v) for k, v in self.samp.items()}
        return self._samp_dev

    @property
    def running(self) -> bool:
        return bool(self.active.any())

    @property
    def free_slots(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.active)]

    def can_join(self, request: Request) -> bool:
        p = bucket(len(request.prompt), self.engine.prompt_buckets)
        return (not self.active.all() and 0 < len(request.prompt) and p <= self.index
                and self.index + int(request.params.max_new_tokens) <= self.max_len)

    def join(self, requests: Sequence[Request]) -> list[int]:
        """Add requests to free rows (each must pass `can_join`); returns their slots."""
        free = self.free_slots
        if len(requests) > len(free):
            raise ValueError(f"{len(requests)} requests but {len(free)} free rows")
        for r in requests:
            if not self.can_join(r):
                raise ValueError("a request does not fit this batch (see can_join)")
        e = self.engine
        k = bucket(len(requests), e.batch_buckets)
        pk = e.pack(requests, self.eos_ids, b=k)
        slots = free[:len(requests)]
        slot_arr = np.array(slots + [self.b] * (k - len(slots)), np.int32)
        images, image_mask, image_index = e.put_images(pk)
        samp_k = {key: e.put(v) for key, v in pk["samp"].items()}
        tok, self.carry = e.join_cache(e.state, self.carry, e.put(pk["ids"]), e.put(pk["seg"]), images, image_mask,
                                       image_index, samp_k, self.eos, jnp.asarray(slot_arr))
        for key in self.samp:
            self.samp[key][slots] = pk["samp"][key][:len(slots)]
        self._samp_dev = None
        self.active[slots] = True
        self.n_gen[slots] = 0
        self.max_new[slots] = pk["samp"]["max_new"][:len(slots)]
        self._first.append((tok, slots))
        e.stats["joined"] += len(slots)
        e.stats["rows"] += len(slots)
        return slots

    def finish(self, slot: int, reason: str = FINISH_CANCELLED) -> str:
        """End a row now, for `reason` (a cancelled request, or a stop string the caller found in
        the text); its output so far stands and the row is free for a new request. Every finish
        reason of a row is decided here or in `step` (EOS, length). Returns the reason."""
        if reason not in (FINISH_EOS, FINISH_LENGTH, FINISH_CANCELLED):
            raise ValueError(f"unknown finish reason {reason!r}")
        self.active[slot] = False
        return reason

    def cancel(self, slot: int) -> str:
        return self.finish(slot, FINISH_CANCELLED)

    def _take(self, slot, toks, out):
        fin = None
        got = []
        for t in toks:
            t = int(t)
            if t < 0:
                continue
            self.n_gen[slot] += 1
            if t in self.eos_set:
                fin = FINISH_EOS
                break
            got.append(t)
            if self.n_gen[slot] >= self.max_new[slot]:
                fin = FINISH_LENGTH
                break
        if self.max_new[slot] == 0:
            fin = FINISH_LENGTH
        prev = out.get(slot, ([], None))[0]
        out[slot] = (prev + got, fin)
        if fin is not None:
            self.active[slot] = False

    def step(self) -> dict[int, tuple[list[int], str | None]]:
        """Report the first tokens of rows that just started (prefill / join), or else run one
        decode chunk for the active rows."""
        out: dict[int, tuple[list[int], str | None]] = {}
        first, self._first = self._first, []
        for tok, slots in first:
            tok = np.asarray(tok)
            for j, s in enumerate(slots):
                if self.active[s]:
                    self._take(s, tok[j:j + 1], out)
        if not first and self.active.any():
            e = self.engine
            cancel = ~self.active
            toks, self.carry = e.decode_chunk(e.state, self.carry, self._samp(), self.eos, e.put(cancel))
            toks = np.asarray(toks)
            self.index = int(self.carry["cache"]["index"])
            for s in np.flatnonzero(self.active):
                self._take(int(s), toks[s], out)
        e = self.engine
        e.stats["tokens"] += sum(len(v[0]) for v in out.values())
        return out
