"""llama.cpp's side of the decode measurement (issue 23's CPU side-by-side): the same geometry,
random weights, exported with llava-jax's own GGUF export (`--quant f16 | q8_0 | q4_0 | q4_K_M`),
timed by `llama-mtmd-cli` and `llama-bench` from the build `python -m llava_jax.tools.llamacpp` caches.

The work is the llava-jax/transformers decode work at batch 1, timed by llama.cpp's own tools:
* prefill = the image's encoding (tower + projector; `llama-mtmd-cli` on one random image of
  `image_size` pixels, so llama.cpp neither resizes nor tiles; the time from its log line) +
  `prompt_len` tokens through the LLM (`llama-bench -p`, the length of the other sides' prompt:
  BOS + image tokens + text);
* ms/step = 1 / `llama-bench -n new_tokens -d prompt_len` tokens/s: one token at a time with the
  prompt's length already in the KV cache (decode steps only, as the other sides' ms/step).
`decode_repeats` is llama-bench's repetitions (it reports their mean).
"""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

from llava_jax.tools.bench.workload import Geometry

# The words the random model's tokenizer is trained on (llama.cpp tokenizes only the chat
# template's text here: the timed prompt is llama-bench's own tokens).
_WORDS = ("what is in the picture describe image colour shape left right top bottom small large "
          "red green blue yellow circle square triangle cross how many objects are there").split()


def _tokenizer(geo: Geometry, folder: Path):
    from llava_jax.data.tokenize import load_tokenizer
    from llava_jax.data.tokenizer_build import build_llama_tokenizer

    if geo.vocab < 320:  # 259 byte/special pieces come first
        raise ValueError(f"the llama.cpp job needs a vocabulary of >= 320 tokens for its tokenizer, not {geo.vocab} "
                         "(use --preset=demo or cpu)")
    texts = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    build_llama_tokenizer(texts, folder, vocab_size=min(geo.vocab, 1000), legacy=True)
    return load_tokenizer(folder)


def llamacpp_decode(geo: Geometry, batch: int, quant: str, opts: dict) -> dict:
    import numpy as np
    from PIL import Image

    from llava_jax.config import RuntimeOptions
    from llava_jax.convert.gguf_export import export_gguf
    from llava_jax.tools import llamacpp
    from llava_jax.tools.bench.jax_jobs import _random_model

    if batch != 1:
        raise ValueError("llama-mtmd-cli decodes one sequence: batch 1 only")
    bins = llamacpp.bin_dir()
    if bins is None:
        raise FileNotFoundError("no llama.cpp build: python -m llava_jax.tools.llamacpp")
    os.environ["LLAMA_CPP_BIN"] = str(bins)  # q4_K_M is made by its llama-quantize
    threads = opts.get("threads") or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = _random_model(geo.llava_config(RuntimeOptions()))
        files = export_gguf(model, _tokenizer(geo, d / "tok"), d / "gguf", quant=quant, name="bench")
        del model
        rng = np.random.default_rng(3)
        image = d / "image.png"
        Image.fromarray(rng.integers(0, 256, (geo.image_size, geo.image_size, 3), np.uint8)).save(image)
        kw = dict(threads=threads)
        encode_ms = llamacpp.image_encode_ms(files["llm"], files["mmproj"], image, **kw)
        prompt_ts = llamacpp.bench_llm(files["llm"], n_prompt=geo.prompt_len, reps=geo.decode_repeats, **kw)
        decode_ts = llamacpp.bench_llm(files["llm"], n_gen=geo.new_tokens, depth=geo.prompt_len,
                                       reps=geo.decode_repeats, **kw)
        file_bytes = Path(files["llm"]).stat().st_size
    return {"device": f"cpu:{platform.processor() or 'cpu'}", "device_kind": "cpu", "platform": "cpu", "threads": threads,
            "backend": f"llama.cpp {(llamacpp.commit() or '?')[:7]}",
            "prefill_s": encode_ms / 1e3 + geo.prompt_len / prompt_ts, "sec_per_step": 1 / decode_ts,
            "image_encode_s": encode_ms / 1e3, "prompt_tokens": geo.prompt_len, "llm_file_bytes": file_bytes,
            "peak_bytes": None, "peak_source": "", "compile_s": None}
