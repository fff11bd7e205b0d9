"""lmms-eval model `llava_jax`, registered through lmms-eval's plugin entry point (group
`lmms_eval.models`, see setup.py), so that an installed llava-jax is evaluated with

    lmms-eval --model llava_jax --model_args pretrained=DIR --tasks mme,pope --batch_size 8

`DIR` is a llava-hf directory or a training workdir (anything `ChatGenerator.from_pretrained`
opens). Further `--model_args`: `template`, `image_mode`, `dtype` (float32 | bfloat16),
`quantize` (int8 | int4), `max_new_tokens` (default when a task sets none).

* `generate_until`: the requests run through the serving `ChatGenerator` (the engine's batched
  decoding, the server's prompt and image preprocessing), `--batch_size` at a time, in request
  order, grouped by generation arguments; `until` strings are stop strings; greedy unless the
  task asks for `temperature` > 0 with `do_sample`. A request's images (one or several) are
  placed as `llava_jax.eval.answer` places a question's: image k at the context's k-th
  `<image>`, or all before the text when it has none (`eval.answer.user_message`).
* `loglikelihood`: the context as the user turn and the continuation as the assistant reply,
  rendered by the model's template, one forward pass; returns (the mean negative log-likelihood
  of the continuation's tokens, whether greedy decoding would produce exactly those tokens).
  A loss, not a log-probability: that is what lmms-eval's own models return (`loss.item()` of
  the transformers forward) and what its `multiple_choice` scoring expects (it takes the
  choice with the smallest value, `np.argmin(lls)`, in lmms-eval 0.7.3). Each pair travels
  wrapped in lmms-eval's `GenerationResult` where lmms-eval has one: its evaluator (0.7.3,
  `api/instance.py: unwrap_generation_output`) turns any other non-string output into its
  `str()`, and a multiple-choice task then fails unpacking "(6.2, False)"; the wrapper passes
  the pair through unchanged.

This module imports lmms-eval; llava-jax itself never imports it.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
from PIL import Image

from lmms_eval.api.instance import Instance

try:  # lmms-eval >= 0.7: model outputs other than str / GenerationResult are str()-ed
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # pragma: no cover - older lmms-eval passes tuples through
    GenerationResult = None
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from llava_jax.eval.answer import user_message
from llava_jax.models.llava import image_kwargs
from llava_jax.serve.engine import SamplingParams, bucket
from llava_jax.serve.generator import ChatGenerator, Completion

MODEL_ID = "llava_jax"


def manifest() -> ModelManifest:
    """The entry point's payload (lmms-eval >= 0.6: `ModelRegistryV2.load_entrypoint_manifests`)."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LlavaJax")


def _messages(context: str, visuals: Sequence[Any]) -> list[dict]:
    """One user message (`eval.answer.user_message`, the message of a question row too): image k
    where the context has its k-th `<image>`, else all before the text."""
    images = []
    for v in visuals:
        if not isinstance(v, Image.Image):
            raise NotImplementedError(f"llava_jax takes images only; this task gives a {type(v).__name__} visual")
        images.append(v)
    try:
        return [user_message(context, images)]
    except ValueError as e:
        raise ValueError(f"the task's context and visuals disagree: {e}") from None


class LlavaJax(lmms):
    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 1, template: str | None = None,
                 image_mode: str | None = None, dtype: str | None = None, quantize: str | None = None,
                 max_new_tokens: int = 1024, device: str | None = None, max_batch_size=None, **kwargs):
        super().__init__()
        del device, max_batch_size  # jax picks the device; batches are fixed-size
        if kwargs:
            raise TypeError(f"llava_jax: unknown model_args {sorted(kwargs)}")
        import jax.numpy as jnp

        self.batch_size = max(1, int(batch_size)) if str(batch_size).isdigit() else 1
        self.default_max_new_tokens = int(max_new_tokens)
        self.gen = ChatGenerator.from_pretrained(pretrained, template=template, image_mode=image_mode,
                                                 dtype=getattr(jnp, dtype) if dtype else None, quantize=quantize)
        self._logprob_fn = None

    # ------------------------------------------------------------------ helpers
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        vis = doc_to_visual(self.task_dict[task][split][doc_id])
        if vis is None:
            return []
        return list(vis) if isinstance(vis, (list, tuple)) else [vis]

    def _sampling(self, gen_kwargs: dict, prompt_len: int) -> tuple[SamplingParams, list[str]]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(kw.get("num_beams", 1) or 1) > 1:
            raise NotImplementedError("llava_jax decodes greedily or by sampling; num_beams > 1 is not supported")
        temp = float(kw.get("temperature", 0.0) or 0.0)
        if not kw.get("do_sample", temp > 0):
            temp = 0.0
        room = self.gen.context_length - prompt_len
        if room < 1:
            raise ValueError(f"the prompt has {prompt_len} tokens; the model's context is {self.gen.context_length}")
        max_new = min(int(kw.get("max_new_tokens", self.default_max_new_tokens)), room)
        top_p = kw.get("top_p")
        return SamplingParams(max_new_tokens=max_new, temperature=temp, top_p=1.0 if top_p is None else float(top_p),
                              seed=int(kw.get("seed", 0) or 0)), until

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):  # one batch holds one set of generation arguments
            groups.setdefault(json.dumps(a[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=self.rank != 0, desc="llava_jax generate")
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                comps = []
                for i in chunk:
                    context, gen_kwargs, doc_to_visual, doc_id, task, split = args[i][:6]
                    enc = self.gen.encode(_messages(context, self._visuals(doc_to_visual, doc_id, task, split)))
                    params, until = self._sampling(gen_kwargs, len(enc.ids))
                    comps.append(Completion(enc, params, until))
                if len(idx) > self.batch_size:  # the same compiled shapes for every batch (as eval.answer)
                    comps += [Completion(comps[0].encoded, comps[0].params, comps[0].stop)
                              for _ in range(self.batch_size - len(comps))]
                self.gen.run(comps)
                for i, c in zip(chunk, comps):
                    if c.error:
                        raise RuntimeError(f"request {i}: generation failed: {c.error}")
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), c.text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("llava_jax: multi-round generation is not implemented")

    # ------------------------------------------------------------------ loglikelihood
    def _continuation_ids(self, messages: list[dict], continuation: str):
        """(prompt encoding, full ids, index where the continuation starts, its token ids)."""
        prompt = self.gen.encode(messages)
        n = len(prompt.ids)

        def closed(reply):
            enc = self.gen.encode(messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
            if enc.ids[:n] != prompt.ids:
                raise ValueError("the template does not render the prompt as a prefix of prompt + reply; "
                                 "cannot score a continuation")
            return enc.ids

        full = closed(continuation.lstrip(" "))  # the reply starts after the template's "ASSISTANT: "
        # what closes a reply (e.g. </s>): the common tail of two one-character replies
        a, b = closed("0")[n:], closed("1")[n:]
        k = 0
        while k < min(len(a), len(b)) and a[len(a) - 1 - k] == b[len(b) - 1 - k]:
            k += 1
        marker = a[len(a) - k:] if k else []
        end = len(full) - len(marker) if marker and full[len(full) - len(marker):] == marker else len(full)
        return prompt, full, n, full[n:end]

    def _logprobs(self, ids: np.ndarray, images, image_index=None):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        if self._logprob_fn is None:
            graphdef, state = nnx.split(self.gen.model)

            @jax.jit
            def fn(state, ids, mask, images, image_mask, image_index):
                model = nnx.merge(graphdef, state)
                logits = model(ids, attention_mask=mask, **image_kwargs(images, image_mask, image_index))
                return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

            self._logprob_fn = lambda *a: fn(state, *a)
        length = bucket(len(ids))
        padded = np.zeros((1, length), np.int32)
        padded[0, :len(ids)] = ids
        mask = (np.arange(length) < len(ids))[None].astype(np.int32)
        if images is None:
            return np.asarray(self._logprob_fn(padded, mask, None, None, None))[0]
        index = None
        if image_index is not None:  # padded to the length bucket, as the engine pads it to the prompt's
            index = np.full((1, length), -1, np.int32)
            index[0, :len(image_index)] = image_index
        return np.asarray(self._logprob_fn(padded, mask, images[None], np.ones((1, len(images)), bool), index))[0]

    def loglikelihood(self, requests: list[Instance]) -> list:
        from tqdm import tqdm

        res = []
        for r in tqdm(requests, disable=self.rank != 0, desc="llava_jax loglikelihood"):
            context, target, doc_to_visual, doc_id, task, split = r.args[:6]
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            if isinstance(continuation, list):
                continuation = continuation[0]
            messages = _messages(context, self._visuals(doc_to_visual, doc_id, task, split))
            prompt, full, start, cont = self._continuation_ids(messages, str(continuation))
            if not cont:
                res.append(self._pair(0.0, True))
                continue
            logp = self._logprobs(np.asarray(full, np.int32), prompt.images, prompt.image_index)
            pos = np.arange(start, start + len(cont)) - 1  # the logits at t predict token t + 1
            nll = -float(logp[pos, cont].mean())
            greedy = bool((logp[pos].argmax(-1) == np.asarray(cont)).all())
            res.append(self._pair(nll, greedy))
        return res

    @staticmethod
    def _pair(nll: float, greedy: bool):
        return (nll, greedy) if GenerationResult is None else GenerationResult(text=(nll, greedy))

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("llava_jax: loglikelihood_rolling is not implemented")
