"""Chat on top of the engine: messages with images in, streamed text out.

`ChatGenerator` owns a model, its tokenizer, a prompt template and the image preprocessing, and
runs batches of `Completion`s through one `Engine`. The HTTP server, the web page and the
terminal chat all go through it.

Template (how messages become a prompt), chosen from the checkpoint unless given:
  * `chat_template`: the tokenizer's own chat template (llava-hf, Llama-3 and Qwen2 checkpoints
    ship one), rendered with `apply_chat_template`;
  * otherwise `vicuna_v1` (the LLaVA-1.5 recipe), or any name from `llava_jax.data.templates`.
Images go in front of their user message's text, as LLaVA trains them. The prompt is tokenized
by the same function as training data (`tokenize_conversation`): segments between images are
separate tokenizer calls, as the original LLaVA trained. For a non-legacy LLaMA tokenizer this
puts a `▁` token (29871) after each image where transformers' `LlavaProcessor`, which tokenizes
the expanded prompt once, puts none; llava-hf weights are converted from the original's, so the
original's tokenization is what they were trained on.
Image mode: `pad` (LLaVA-1.5's expand-to-square) unless `config.json` says
`image_aspect_ratio` is something else, or `image_mode=` overrides it. The image processor (CLIP
or SigLIP) is the model's (`LlavaConfig.image_processor`, from the checkpoint's
preprocessor_config.json).
LLaVA-NeXT (AnyRes) checkpoints (`config.image_grid_pinpoints`): each image is tiled by
`llava_jax.data.anyres` (as `LlavaNextImageProcessor`; the image mode does not apply), its
`<image>` is expanded to that image's own token count (`anyres.num_image_tokens`, as
`LlavaNextProcessor` does) and the request carries its tiles and feature index to the engine.

Stop strings are matched on the decoded text: the reply ends before the first occurrence, and
text that could still become a stop string is held back from the stream until it cannot.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from llava_jax.data.images import preprocess_image_uint8, to_rgb
from llava_jax.data.templates import CHAT_TEMPLATE, IMAGE_TOKEN, default_template, resolve_template
from llava_jax.data.tokenize import end_of_turn_ids, expand_image_tokens, tokenize_conversation
from llava_jax.serve.engine import FINISH_EOS, Engine, Request, SamplingParams



class RequestError(ValueError):
    """A request that cannot be served as given (the server answers 4xx with this message)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


# ---------------------------------------------------------------------------- images
# What the OpenAI API accepts. Pillow would otherwise try every plugin it has on untrusted bytes
# (EPS runs Ghostscript where it is installed; an ICO may wrap a PNG larger than its header says).
ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image(data: bytes, *, max_bytes: int = 20 * 2**20, max_pixels: int = 40_000_000,
                 max_side: int = 8192, max_aspect: float = 20.0, param: str | None = None) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, refusing oversized or non-image input with a
    RequestError before any large allocation (the header gives the size). The side and aspect
    limits bound the preprocessing: "pad" builds a max-side square canvas, "crop" resizes the
    short side up to the model's size and the long side in proportion."""
    if len(data) > max_bytes:
        raise RequestError(f"image is {len(data)} bytes; the limit is {max_bytes}", param, "image_too_large", 413)
    if not data:
        raise RequestError("image data is empty", param, "invalid_image")
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_IMAGE_FORMATS)  # reads the header only
        w, h = img.size
    except Image.DecompressionBombError as e:
        raise RequestError(f"image too large: {e}", param, "image_too_large", 413) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for non-image bytes
        raise RequestError(f"could not decode the image ({type(e).__name__}): not a "
                           f"{'/'.join(ACCEPTED_IMAGE_FORMATS)} file", param, "invalid_image") from None
    if w * h > max_pixels:
        raise RequestError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", param,
                           "image_too_large", 413)
    if w < 1 or h < 1:
        raise RequestError(f"image has no pixels ({w}x{h})", param, "invalid_image")
    if max(w, h) > max_side:
        raise RequestError(f"image is {w}x{h}; the longest side may be at most {max_side}", param,
                           "image_too_large", 413)
    if max(w, h) / min(w, h) > max_aspect:
        raise RequestError(f"image is {w}x{h}; the aspect ratio may be at most {max_aspect:g}:1", param,
                           "invalid_image")
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:  # noqa: BLE001
        raise RequestError(f"could not decode the image ({type(e).__name__}): truncated or corrupt", param,
                           "invalid_image") from None


# ---------------------------------------------------------------------------- text streaming
class TextStream:
    """Incremental detokenization with stop strings.

    `add(ids)` returns the text that is now safe to show; it decodes the whole reply each time
    (robust for SentencePiece spaces and byte-fallback pieces) and holds back a trailing
    replacement character (an incomplete UTF-8 sequence) and any tail that is a prefix of a
    stop string. Once a stop string appears, `stopped` is set and the text ends before it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), lock=None):
        self.tokenizer = tokenizer
        self.lock = lock or threading.RLock()
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the text shown so far
        self.stopped = False

    def _decode(self) -> str:
        with self.lock:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, ids: Sequence[int]) -> str:
        if self.stopped or not ids:
            return ""
        self.ids.extend(int(i) for i in ids)
        full = self._decode()
        if self.stop:
            start = max(0, len(self.text) - max(len(s) for s in self.stop))
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._advance(full[:min(hits)])
        safe = len(full)
        while safe > len(self.text) and full[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if full[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._advance(full[:max(safe, len(self.text))])

    def finish(self) -> str:
        """The held-back rest, once generation has ended."""
        if self.stopped:
            return ""
        return self._advance(self._decode())

    def _advance(self, upto: str) -> str:
        if not upto.startswith(self.text):  # decoding changed earlier text (rare): show the new tail
            common = 0
            while common < min(len(upto), len(self.text)) and upto[common] == self.text[common]:
                common += 1
            delta = upto[common:]
        else:
            delta = upto[len(self.text):]
        self.text = upto
        return delta


# ---------------------------------------------------------------------------- requests
@dataclasses.dataclass
class Encoded:
    ids: list[int]
    images: np.ndarray | None  # [M, S, S, 3] uint8; AnyRes: tiles [M, 1 + max_tiles, S, S, 3] uint8
    text: str  # the rendered prompt (before image-token expansion)
    image_index: np.ndarray | None = None  # AnyRes: int32 [image tokens], see engine.Request


@dataclasses.dataclass
class Completion:
    """One request in flight. `on_delta(text)` is called with each new piece of text (from the
    generation thread) and `on_done(self)` once at the end."""

    encoded: Encoded
    params: SamplingParams = SamplingParams()
    stop: Sequence[str] = ()
    on_delta: Callable[[str], None] | None = None
    on_done: Callable[["Completion"], None] | None = None
    cancelled: bool = False
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded.ids)

    def fail(self, error: BaseException | str):
        """End this request with an error and tell its client (`on_done`); a request that has
        already ended keeps its result, so failing everything a broken batch held is safe."""
        if self.finish_reason is not None:
            return
        self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.finish_reason = "error"
        if self.on_done:
            self.on_done(self)


def _parts(content: Any) -> list[dict]:
    """A message's content as a list of parts {"type": "text", "text"} / {"type": "image", "image"}."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


class ChatGenerator:
    def __init__(self, model, tokenizer, *, template: str | None = None, image_mode: str = "pad",
                 engine: Engine | None = None, eos_ids: Sequence[int] | None = None, max_images: int = 8,
                 name: str = "llava-jax"):
        self.model = model
        self.cfg = model.config
        self.tokenizer = tokenizer
        template = resolve_template(template or default_template(tokenizer))
        if template == CHAT_TEMPLATE and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat_template' asked for, but the tokenizer has no chat template")
        self.template = template if template == CHAT_TEMPLATE else template.name
        self.image_mode = image_mode
        self.engine = engine or Engine(model)
        self.max_images = max_images
        self.name = name
        # stop on: the template's end of turn, the tokenizer's and the config's EOS, and `eos_ids`
        # (e.g. generation_config.json's)
        eos = set(end_of_turn_ids(tokenizer, self.template)) | {int(e) for e in (eos_ids or ())}
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        cfg_eos = self.cfg.text.eos_token_id
        eos.update([int(cfg_eos)] if isinstance(cfg_eos, int) else [int(e) for e in (cfg_eos or [])])
        self.eos_ids = sorted(eos)
        self.context_length = int(self.cfg.text.max_position_embeddings)
        self._run_lock = threading.Lock()
        self.tokenizer_lock = threading.RLock()  # HF fast tokenizers are not safe across threads

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, *, tokenizer_path=None, template: str | None = None, image_mode: str | None = None,
                        dtype=None, quantize: str | None = None, mesh=None, chunk_size: int = 8, name=None,
                        adapter=None, merge_adapter: bool = True, **load_kw) -> "ChatGenerator":
        """Load a llava-hf style directory (weights + tokenizer) for chat, or a llava-jax training
        workdir (its latest checkpoint, rebuilt from the config the run recorded; template and
        image mode default to the run's). `adapter`: a PEFT LoRA adapter directory put on that
        base (`convert.peft.load_adapter`), folded into the weights unless `merge_adapter=False`
        (then the adapters run beside the kernels, e.g. on an int4 base as QLoRA trained them).
        `quantize`: None, "int8" or "int4" (weight-only, LLM linear layers; after the merge).
        `mesh`: shard the params over it."""
        import jax
        import jax.numpy as jnp

        import llava_jax
        from llava_jax.build import RUN_CONFIG
        from llava_jax.data.tokenize import load_tokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory: give a llava-hf model directory (e.g. the OUT/hf "
                                    "that the demo and `python -m llava_jax.export` write) or a training workdir")
        if dtype is None:
            dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        if not (path / "config.json").exists() and (path / RUN_CONFIG).exists():
            return cls._from_workdir(path, template, image_mode, dtype, quantize, mesh, chunk_size, name, adapter,
                                     merge_adapter)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a llava-hf model directory (nor a training workdir "
                                    f"with {RUN_CONFIG}); export a workdir with `python -m llava_jax.export --workdir "
                                    "DIR --out HF_DIR`")
        from llava_jax.convert import peft

        model = peft.with_adapter(llava_jax.from_pretrained(path, dtype=dtype, mesh=mesh, **load_kw), path, adapter,
                                  merge_adapter)
        if quantize:
            from llava_jax.serve.quant import quantize_model

            model = quantize_model(model, quantize)
        tokenizer = load_tokenizer(tokenizer_path or path)
        if image_mode is None:
            cfg_json = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
            image_mode = "crop" if cfg_json.get("image_aspect_ratio", "pad") not in ("pad",) else "pad"
        eos = None
        gen_cfg = path / "generation_config.json"
        if gen_cfg.exists():
            e = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos = [e] if isinstance(e, int) else e
        return cls(model, tokenizer, template=template, image_mode=image_mode, eos_ids=eos,
                   engine=Engine(model, mesh=mesh, chunk_size=chunk_size), name=name or path.name)

    @classmethod
    def _from_workdir(cls, workdir: Path, template, image_mode, dtype, quantize, mesh, chunk_size, name, adapter,
                      merge_adapter):
        from llava_jax import build
        from llava_jax.convert import peft

        config = build.run_config(workdir)
        config.model.dtype = {v: k for k, v in build.DTYPES.items()}[dtype]
        model, tokenizer, config = build.trained_model(workdir, config, mesh)
        model = peft.with_adapter(model, workdir, adapter, merge_adapter)
        if quantize:
            from llava_jax.serve.quant import quantize_model

            model = quantize_model(model, quantize)
        return cls(model, tokenizer, template=template or config.data.template,
                   image_mode=image_mode or config.data.image_mode,
                   engine=Engine(model, mesh=mesh, chunk_size=chunk_size), name=name or workdir.name)

    # ------------------------------------------------------------------ prompts
    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> Encoded:
        """OpenAI-like messages [{"role", "content": str | [parts]}], parts
        {"type": "text", "text"} or {"type": "image", "image": PIL image}, -> prompt ids (image
        tokens expanded) and preprocessed images. Raises RequestError for bad conversations.
        `add_generation_prompt=False`: the messages end with an assistant reply, rendered closed
        (for scoring a reply, e.g. the lmms-eval plugin's loglikelihood)."""
        turns: list[tuple[str, list[dict]]] = []
        images: list[np.ndarray] = []
        size = self.cfg.vision.image_size
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "developer":
                role = "system"
            parts = _parts(m["content"])
            for p in parts:
                if p["type"] == "image":
                    if role != "user":
                        raise RequestError(f"messages[{i}]: images are only allowed in user messages",
                                           f"messages[{i}].content")
                    images.append(p["image"] if self.cfg.is_anyres else  # tiled below, with the token counts
                                  preprocess_image_uint8(p["image"], self.image_mode, size, self.cfg.image_processor))
                elif IMAGE_TOKEN in p.get("text", ""):
                    raise RequestError(f"messages[{i}]: the text may not contain {IMAGE_TOKEN!r}; send images as "
                                       "image_url parts", f"messages[{i}].content")
            if turns and turns[-1][0] == role and role != "system":  # merge consecutive same-role turns
                turns[-1] = (role, turns[-1][1] + [{"type": "text", "text": "\n"}] + parts)
            else:
                turns.append((role, parts))
        if len(images) > self.max_images:
            raise RequestError(f"{len(images)} images; at most {self.max_images} per request", "messages",
                               "too_many_images")
        conv = []
        for i, (role, parts) in enumerate(turns):
            if role == "system" and i > 0:
                raise RequestError("a system message is only allowed first", "messages")
            n_img = sum(p["type"] == "image" for p in parts)
            text = "".join(p.get("text", "") for p in parts if p["type"] == "text")
            if IMAGE_TOKEN in text:  # e.g. "<ima" + "ge>" in two text parts
                raise RequestError(f"messages[{i}]: the text may not contain {IMAGE_TOKEN!r}; send images as "
                                   "image_url parts", f"messages[{i}].content")
            conv.append({"role": role, "content": (IMAGE_TOKEN + "\n") * n_img + text if n_img else text})
        try:
            with self.tokenizer_lock:
                enc = tokenize_conversation(self.tokenizer, self.template, conv, self.cfg.image_token_id,
                                            1 if self.cfg.is_anyres else self.cfg.num_image_tokens,
                                            add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise RequestError(f"bad conversation: {e}", "messages") from None
        if self.cfg.is_anyres and images:
            return self._anyres_encoded(enc, images)
        imgs = np.stack(images) if images else None
        return Encoded([int(x) for x in enc["input_ids"]], imgs, enc["text"])

    def _anyres_encoded(self, enc: dict, images: list) -> Encoded:
        """LLaVA-NeXT: the prompt's single `<image>` tokens (in image order) expanded to each image's
        own count, and the request's tiles and feature index, from `data.anyres.anyres_batch`."""
        from llava_jax.data import anyres

        batch = anyres.anyres_batch([images], self.cfg, max_images=len(images))
        counts = [anyres.num_image_tokens(int(h), int(w), self.cfg) for h, w in batch["image_sizes"][0]]
        # tokenized with one token per image: the training pipeline's expansion, per image
        ids, _ = expand_image_tokens(np.asarray(enc["input_ids"]), np.asarray(enc["labels"]),
                                     self.cfg.image_token_id, counts)
        index = batch["image_index"][0]
        return Encoded([int(x) for x in ids], batch["tiles"][0], enc["text"], index[index >= 0])

    @property
    def image_tokens_text(self) -> str:
        """How many prompt tokens an image takes, for error messages."""
        if self.cfg.is_anyres:
            from llava_jax.data.anyres import max_image_tokens

            return f"{self.cfg.num_image_tokens} to {max_image_tokens(self.cfg)} by size (AnyRes)"
        return str(self.cfg.num_image_tokens)

    @functools.cached_property
    def _longest_token_chars(self) -> int:
        with self.tokenizer_lock:
            return max(1, max((len(t) for t in self.tokenizer.get_vocab()), default=1))

    def max_text_chars(self, n_tokens: int) -> int:
        """More characters of text than this cannot tokenize to `n_tokens` or fewer, so a longer
        text can be refused without tokenizing it. One token stands for at most as many
        characters as its vocabulary entry has (byte-level entries: one character per byte;
        byte-fallback entries like <0x0A> are longer than the byte they stand for); x2 leaves
        room for normalizers that compose characters (NFC: a letter and its accent become one)."""
        return 2 * n_tokens * self._longest_token_chars

    # ------------------------------------------------------------------ generation
    def run(self, completions: Sequence[Completion]) -> Sequence[Completion]:
        """Generate all `completions` as one engine batch (blocking), streaming text through
        their callbacks."""
        with self._run_lock:
            return self._run(completions)

    def _run(self, comps):
        session = ChatSession(self, comps)
        while session.running:
            session.step()
        return comps

    def session(self, completions: Sequence[Completion], *, slots: int | None = None,
                reserve_new_tokens: int = 0) -> "ChatSession":
        """A running batch that more completions can join (continuous batching); the caller
        drives it with `step()` from one thread."""
        return ChatSession(self, completions, slots=slots, reserve_new_tokens=reserve_new_tokens)

    def chat(self, messages, params: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
             on_delta=None) -> Completion:
        """One conversation -> one Completion (blocking)."""
        c = Completion(self.encode(messages), params, stop, on_delta)
        self.run([c])
        return c


class ChatSession:
    """Completions running in one engine DecodeBatch: text streaming, stop strings, cancellation
    and errors per row; new completions `join` free rows between steps."""

    def __init__(self, gen: ChatGenerator, comps: Sequence[Completion], *, slots: int | None = None,
                 reserve_new_tokens: int = 0):
        self.gen = gen
        self.rows: dict[int, tuple[Completion, TextStream]] = {}
        try:
            self.batch = gen.engine.open([self._request(c) for c in comps], gen.eos_ids, slots=slots,
                                         reserve_new_tokens=reserve_new_tokens)
        except Exception as e:  # noqa: BLE001
            self._fail(list(comps), e)
            raise
        for slot, c in enumerate(comps):
            self.rows[slot] = (c, TextStream(gen.tokenizer, c.stop, gen.tokenizer_lock))

    @staticmethod
    def _request(c: Completion) -> Request:
        return Request(c.encoded.ids, c.encoded.images, c.params, c.encoded.image_index)

    @property
    def running(self) -> bool:
        return bool(self.rows)

    @property
    def free(self) -> int:
        return len(self.batch.free_slots)

    def can_join(self, c: Completion) -> bool:
        return self.batch.can_join(self._request(c))

    def join(self, comps: Sequence[Completion]):
        try:
            slots = self.batch.join([self._request(c) for c in comps])
        except Exception as e:  # noqa: BLE001
            self._fail(list(comps), e)
            raise
        for slot, c in zip(slots, comps):
            self.rows[slot] = (c, TextStream(self.gen.tokenizer, c.stop, self.gen.tokenizer_lock))

    def _end(self, slot: int, reason: str):
        c, ts = self.rows.pop(slot)
        rest = ts.finish()
        if rest:
            c.text += rest
            if c.on_delta:
                c.on_delta(rest)
        c.finish_reason = reason
        if c.on_done:
            c.on_done(c)

    @staticmethod
    def _fail(comps, e):
        for c in comps:
            c.fail(e)

    def step(self):
        """One engine step; delivers text to the completions' callbacks."""
        for slot, (c, _) in list(self.rows.items()):
            if c.cancelled:
                self._end(slot, self.batch.cancel(slot))
        if not self.rows:
            return
        try:
            out = self.batch.step()
        except Exception as e:  # noqa: BLE001 - report to every request of the batch, then re-raise
            comps = [c for c, _ in self.rows.values()]
            self.rows.clear()
            self._fail(comps, e)
            raise
        for slot, (toks, fin) in out.items():
            if slot not in self.rows:
                continue
            c, ts = self.rows[slot]
            if toks:
                c.completion_tokens += len(toks)
                delta = ts.add(toks)
                if delta:
                    c.text += delta
                    if c.on_delta:
                        c.on_delta(delta)
                if ts.stopped:  # a stop string in the text: finished, as for EOS
                    self._end(slot, self.batch.finish(slot, FINISH_EOS))
                    continue
            if fin is not None:
                self._end(slot, fin)
